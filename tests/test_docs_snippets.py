"""Every ```python block of README.md, of every preset's model card (`model_cards/*/README.md`) and of every page of
the documentation (`docs/**/*.md`, with the files they include: `--8<-- "CONTRIBUTING.md"`) runs, so that no
documented snippet can rot. Each block runs on its own, as a reader would paste it: in a fresh namespace, in an empty
temporary folder (where `model_cards/` is the repository's, as in a checkout), offline (`HF_HUB_OFFLINE=1`: no Hub).

A block that legitimately cannot run here is marked in the markdown by an HTML comment on the line before its
fence, `<!-- not-run: <reason> -->`; the reason is required and the marked blocks are listed by
`test_not_run_blocks_are_few_and_say_why` (none at present). Shell blocks are out of scope.

The generated card of a trained checkpoint (`hf_efficient.cli.model_card`, written by `train` and `publish`) names the
checkpoint by its folder name or Hub repo id: its "Use" block runs here on a locally saved folder of that name, for
every task (`test_checkpoint_card_snippet_runs_on_a_local_folder`)."""

import re
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

import hf_efficient
from hf_efficient.cli import model_card, tasks
from hf_efficient.cli.tasks.image import image_processor_for
from hf_efficient.data import default_tokenizer

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[^\s`]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
# A file a documentation page includes (pymdownx.snippets, mkdocs.yml), named relative to the repository root.
INCLUDE = re.compile(r'^--8<--\s+"(?P<path>[^"]+)"\s*$', re.M)


def python_blocks(path: Path) -> list[dict]:
    """The ```python blocks of a markdown file: their code, first line number and `not-run` reason (or None)."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang").lower() not in ("python", "py"):
            continue
        line = text.count("\n", 0, match.start()) + 1
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = NOT_RUN.search(before)
        indent = match.group("indent")
        code = "\n".join(
            row[len(indent) :] if row.startswith(indent) else row for row in match.group("body").split("\n")
        )
        blocks.append({"code": code, "line": line, "not_run": marker.group("reason") if marker else None})
    return blocks


def documents() -> list[Path]:
    pages = sorted((REPO / "docs").rglob("*.md"))
    included = [REPO / match.group("path") for page in pages for match in INCLUDE.finditer(page.read_text())]
    found = [REPO / "README.md", *sorted((REPO / "model_cards").glob("*/README.md")), *pages, *included]
    return list(dict.fromkeys(found))


def snippets():
    for path in documents():
        for block in python_blocks(path):
            yield pytest.param(path, block, id=f"{path.relative_to(REPO).as_posix()}:{block['line']}")


RUNNABLE = [p for p in snippets() if p.values[1]["not_run"] is None]


@pytest.fixture
def reader_folder(tmp_path, monkeypatch):
    """An empty folder with the checkout's `model_cards/`, offline, as the current folder."""
    (tmp_path / "model_cards").symlink_to(REPO / "model_cards", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: the switch itself, for this in-process run
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    return tmp_path


def run_block(code: str, name: str) -> dict:
    namespace = {"__name__": "__main__"}
    with torch.random.fork_rng():
        exec(compile(code, name, "exec"), namespace)
    return namespace


def test_the_documents_have_python_blocks():
    """The extraction finds the README's quick start and a block in every preset's card (a changed fence would
    otherwise silently leave them untested)."""
    assert any("model.generate(**inputs" in block["code"] for block in python_blocks(REPO / "README.md"))
    models = sorted((REPO / "docs" / "models").glob("*.md"))
    assert [page.name for page in models if page.name != "index.md" and not python_blocks(page)] == []
    assert python_blocks(REPO / "docs" / "quickstart.md") and python_blocks(REPO / "CONTRIBUTING.md")
    assert REPO / "CONTRIBUTING.md" in documents()  # included by docs/contributing.md
    cards = sorted((REPO / "model_cards").glob("*/README.md"))
    assert len(cards) == len(list((REPO / "model_cards").glob("*/card.json")))
    assert [c.parent.name for c in cards if not python_blocks(c)] == []


def test_not_run_blocks_are_few_and_say_why():
    marked = [p for p in snippets() if p.values[1]["not_run"] is not None]
    for param in marked:
        assert len(param.values[1]["not_run"]) >= 10, f"{param.id}: a not-run marker needs its reason"
    assert len(marked) <= 2, f"too many blocks marked not-run: {[p.id for p in marked]}"


def test_not_run_marker_is_read(tmp_path):
    """The convention is parsed as documented (checked on a sample, so the marker cannot silently stop working)."""
    sample = "text\n<!-- not-run: needs a CUDA GPU -->\n```python\nraise SystemExit(1)\n```\n\n```python\nx = 1\n```\n"
    (tmp_path / "doc.md").write_text(sample)
    blocks = python_blocks(tmp_path / "doc.md")
    assert [b["not_run"] for b in blocks] == ["needs a CUDA GPU", None]
    assert blocks[1]["code"] == "x = 1\n"


@pytest.mark.parametrize("path, block", RUNNABLE)
def test_python_block_runs(path, block, reader_folder):
    run_block(block["code"], f"{path.relative_to(REPO)}:{block['line']}")


# ------------------------------------------------------------------------ the card of a trained checkpoint
def tiny_checkpoint(task_name: str, folder: Path):
    """A small model of the task's head saved as `train` / `publish` save it: weights with the model's code, its
    tokenizer or image processor, the generation config of a generating task, and the generated card."""
    from transformers import AutoConfig

    task = tasks.TASKS[task_name]
    if task.modality == "image":
        config = AutoConfig.for_model(
            "gmlp", hidden_size=32, intermediate_size=64, num_hidden_layers=2, image_size=8, patch_size=2,
            num_channels=3, max_position_embeddings=16, vocab_size=None, num_labels=3,
        )  # fmt: skip
        processing = image_processor_for(8, 3)
    elif task_name == "seq2seq":
        config = AutoConfig.for_model(
            "ngram_transformer", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_encoder_layers=1,
            num_attention_heads=2, max_position_embeddings=128, ngram_size=4, is_encoder_decoder=True,
        )  # fmt: skip
        processing = default_tokenizer()
    else:
        config = AutoConfig.for_model(
            "gmlp", hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
            causal=task_name == "clm", num_labels=2,
        )  # fmt: skip
        processing = default_tokenizer()
    package = hf_efficient.get_architecture(config.model_type)
    model = package.AUTO_MAPPING[task.auto_class](config)
    if task.generation is not None:
        from hf_efficient.cli.generate import default_generation_config

        model.generation_config = default_generation_config(model, processing, task)
    hf_efficient.save_pretrained_with_code(model, folder)
    processing.save_pretrained(folder)
    card = model_card.render(folder.name, model.config, task_name, {})
    (folder / "README.md").write_text(card)
    return card


@pytest.mark.parametrize("task_name", sorted(tasks.TASKS))
def test_checkpoint_card_snippet_runs_on_a_local_folder(task_name, reader_folder):
    """The "Use" block of a checkpoint's card, with its name (a Hub repo id once published) a local folder."""
    card = tiny_checkpoint(task_name, reader_folder / "my-checkpoint")
    blocks = python_blocks(reader_folder / "my-checkpoint" / "README.md")
    assert len(blocks) == 1 and blocks[0]["not_run"] is None, card
    assert "text2text-generation" not in blocks[0]["code"]  # (no such pipeline in transformers 5)
    namespace = run_block(blocks[0]["code"], f"card of a {task_name} checkpoint")
    assert "model" in namespace and "result" in namespace, "the Use block runs the model once, as `result`"
