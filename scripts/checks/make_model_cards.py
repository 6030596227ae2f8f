"""Generate `model_cards/<preset>/README.md` from the preset's data (timm style: presets are data, not code).

Each preset folder holds `config.json` (loadable with `AutoConfig.from_pretrained(folder)`) and `card.json`:

    {
      "title": "gMLP-Ti/16 (224 px)",
      "summary": "one paragraph",
      "pipeline_tag": "image-classification",
      "tags": ["gmlp", "vision"],
      "license": "apache-2.0",
      "paper": {"title": "...", "arxiv": "2105.08050"},
      "head": "GMLPForImageClassification",
      "auto_class": "AutoModelForImageClassification",
      "task": "image-cls",                         # hf-efficient CLI task name
      "intended_use": "...",
      "published": [["ImageNet-1k top-1", "72.3%"], ...],   # the paper's own figures
      "notes": ["..."],                             # scaling notes, open choices
      "no_processor": "why",      # only a preset without a byte tokenizer or image processor (its own vocabulary)
      "example": ["python lines"]  # optional: the usage lines after the model is built, instead of the task's
    }

Besides the card, each preset folder gets what `from_pretrained` of its processor reads, generated here from the
package's own definitions (what `hf-efficient train` saves with a checkpoint): `preprocessor_config.json` for a
vision preset (`hf_efficient.cli.tasks.image.image_processor_for`: resize to `image_size`, scale to [-1, 1]), and
`tokenizer_config.json` for a text preset (`hf_efficient.data.default_tokenizer`: byte-level `ByT5Tokenizer`, which
needs no vocabulary file), so that `AutoImageProcessor.from_pretrained(folder)` /
`AutoTokenizer.from_pretrained(folder)` work. A text preset whose vocabulary is not the byte tokenizer's (other
than its 384 ids, or no token embeddings) declares `no_processor` with the reason.

    python scripts/checks/make_model_cards.py          # rewrite every card
    python scripts/checks/make_model_cards.py --check  # exit 1 if a committed card differs from its data

It also writes the README's architecture table (between `<!-- architectures:start -->` and
`<!-- architectures:end -->`) from the registry (`hf_efficient.ARCHITECTURES`, each folder's `AUTO_MAPPING` and
`ARCHITECTURE_CARD`) and the presets in `model_cards/`, so a new architecture or preset cannot be forgotten there.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CARDS = ROOT / "model_cards"


def count_parameters(config: dict) -> int | None:
    """Parameter count of the preset's head, built on the meta device (no memory)."""
    try:
        import torch
        from transformers import AutoConfig

        import hf_efficient  # registers the architectures

        card = json.loads((CARDS / config["_preset"] / "card.json").read_text())
        cfg = AutoConfig.from_pretrained(CARDS / config["_preset"])
        package = hf_efficient.get_architecture(cfg.model_type)
        head = getattr(package, card["head"])
        with torch.device("meta"):
            model = head(cfg)
        return sum(p.numel() for p in model.parameters())
    except Exception as error:  # a card must still render; the count is then omitted and reported
        print(f"warning: could not count parameters of {config['_preset']}: {error}", file=sys.stderr)
        return None


# Every file name a preset's processor may be saved as; the ones a preset should not have are removed (or, with
# --check, reported).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.json",
)


def _json(values: dict) -> str:
    return json.dumps(values, indent=2, sort_keys=True) + "\n"


def processor_kind(preset: str, card: dict, config: dict) -> str | None:
    """ "image" (an image processor), "text" (the byte tokenizer) or None (the card's `no_processor` says why)."""
    if config.get("image_size"):
        return "image"
    if card.get("no_processor"):
        return None
    from hf_efficient.data import default_tokenizer

    vocab, needed = config.get("vocab_size"), len(default_tokenizer())
    if vocab != needed:
        raise SystemExit(
            f"model_cards/{preset}: vocab_size={vocab} is not the byte tokenizer's {needed} ids; give the preset "
            f'vocab_size {needed}, or say in card.json why it has no tokenizer ("no_processor": "...")'
        )
    return "text"


def processor_files(preset: str, card: dict, config: dict) -> dict[str, str]:
    """File name -> text of the processor files of a preset folder (see the module's docstring)."""
    kind = processor_kind(preset, card, config)
    if kind == "image":
        from hf_efficient.cli.tasks.image import image_processor_for

        processor = image_processor_for(config["image_size"], config.get("num_channels") or 3)
        return {"preprocessor_config.json": _json(processor.to_dict())}
    if kind == "text":
        from hf_efficient.data import default_tokenizer

        tokenizer = default_tokenizer()
        settings = {"tokenizer_class": type(tokenizer).__name__, "mask_token": tokenizer.mask_token}
        if config.get("max_position_embeddings"):
            settings["model_max_length"] = config["max_position_embeddings"]
        return {"tokenizer_config.json": _json(settings)}
    return {}


def usage_lines(preset: str, card: dict, config: dict) -> list[str]:
    """The card's Python example: build the model from the preset, load its processor, run it once."""
    kind = processor_kind(preset, card, config)
    auto_class = card["auto_class"]
    loader = {"image": "AutoImageProcessor", "text": "AutoTokenizer"}.get(kind)
    files = {"image": "preprocessor_config.json", "text": "tokenizer_config.json"}.get(kind)
    lines = ["import hf_efficient  # registers the architectures with the Auto classes"]
    if kind is None:
        lines.append("import torch")
    if kind == "image":
        lines.append("from PIL import Image")
    lines += [
        f"from transformers import AutoConfig, {', '.join(sorted([auto_class] + ([loader] if loader else [])))}",
        "",
        f'folder = "model_cards/{preset}"  # config.json{f" and {files}" if files else ""}, no weights',
        "config = AutoConfig.from_pretrained(folder)",
        f"model = {auto_class}.from_config(config)  # random weights: train them before use",
    ]
    if card.get("example"):
        return lines + card["example"]
    task = card["task"]
    if kind == "image":
        mode = "L" if config.get("num_channels") == 1 else "RGB"
        size = config["image_size"]
        return lines + [
            f"processor = AutoImageProcessor.from_pretrained(folder)  # resizes to {size} x {size}, scales to [-1, 1]",
            f'inputs = processor(Image.new("{mode}", (40, 30)), return_tensors="pt")  # any image, as {mode}',
            "print(model(**inputs).logits.shape)  # (1, config.num_labels)",
        ]
    if kind is None:
        return lines + [
            f"# {card['no_processor']}",
            "input_ids = torch.randint(config.vocab_size, (1, 12))  # ids from your tokenizer",
            *(
                ["print(model.generate(input_ids, max_new_tokens=4, do_sample=True))"]
                if task == "clm"
                else ["print(model(input_ids).logits.shape)"]
            ),
        ]
    lines.append("tokenizer = AutoTokenizer.from_pretrained(folder)  # byte level (ByT5): one token per UTF-8 byte")
    if task == "clm":
        return lines + [
            '# a prompt (the byte vocabulary has no start-of-text token; the CLI\'s default prompt is "def ")',
            'inputs = tokenizer("def ", return_tensors="pt", add_special_tokens=False)',
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=8, do_sample=True)[0]))",
        ]
    if task == "mlm":
        return lines + [
            'inputs = tokenizer(f"import{tokenizer.mask_token}os", return_tensors="pt")  # mask: <extra_id_0>',
            "logits = model(**inputs).logits",
            "masked = inputs.input_ids[0] == tokenizer.mask_token_id",
            "print(tokenizer.decode(logits[0, masked].argmax(-1)))  # the predicted byte",
        ]
    if task == "seq-cls":
        return lines + [
            'inputs = tokenizer("import asyncio", return_tensors="pt")',
            "print(model(**inputs).logits.softmax(-1))  # (1, config.num_labels)",
        ]
    if task == "seq2seq":
        return lines + [
            'inputs = tokenizer("1987-03-09", return_tensors="pt")  # the source, with its end-of-text token',
            "output = model.generate(**inputs, max_new_tokens=8)",
            "print(tokenizer.decode(output[0], skip_special_tokens=True))  # the decoder's output",
        ]
    raise SystemExit(f'model_cards/{preset}: no usage example for task {task!r}; add an "example" to card.json')


def render(preset: str) -> str:
    folder = CARDS / preset
    card = json.loads((folder / "card.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    params = count_parameters({**config, "_preset": preset})
    paper = card["paper"]
    lines = [
        "---",
        "library_name: transformers",
        f"license: {card.get('license', 'apache-2.0')}",
        f"pipeline_tag: {card['pipeline_tag']}",
        "tags:",
        *[f"- {tag}" for tag in ["hf-efficient", *card.get("tags", [])]],
        f"- arxiv:{paper['arxiv']}",
        "---",
        "",
        f"# {card['title']}",
        "",
        card["summary"],
        "",
        f"This is an **architecture preset** of hf-efficient: "
        f"`config.json` holds the paper's sizes; the weights are randomly initialised until you train them. "
        f"Paper: *{paper['title']}* ([arXiv:{paper['arxiv']}](https://arxiv.org/abs/{paper['arxiv']})).",
        "",
        "| field | value |",
        "|---|---|",
        f"| model_type | `{config['model_type']}` |",
        f"| head | `{card['head']}` |",
    ]
    for key in card.get("config_fields", []):
        lines.append(f"| {key} | `{config.get(key)}` |")
    if params is not None:
        lines.append(f"| parameters | {params / 1e6:.1f}M |")
    lines += ["", "## Intended use", "", card["intended_use"], ""]
    kind = processor_kind(preset, card, config)
    holds = {
        "image": "`config.json` and the image processor (`preprocessor_config.json`), no weights",
        "text": "`config.json` and the byte-level tokenizer (`tokenizer_config.json`), no weights",
    }.get(kind, f"`config.json` only, no weights and no tokenizer ({card.get('no_processor')})")
    processor_note = {
        "image": " `AutoImageProcessor.from_pretrained(folder)` loads its image processor.",
        "text": " `AutoTokenizer.from_pretrained(folder)` loads its tokenizer.",
    }.get(kind, "")
    lines += [
        "## How to use and fine-tune",
        "",
        f"The preset folder holds {holds}: build the model with `{card['auto_class']}.from_config(config)` "
        f"(`from_pretrained` needs trained weights).{processor_note} From a source checkout the folder is "
        f'`model_cards/{preset}`; an installed package finds it as `hf_efficient.cli.models.preset_folders()["{preset}"]`.',
        "",
        "```python",
        *usage_lines(preset, card, config),
        "```",
        "",
        "Fine-tune with the standard `Trainer`, or from the shell:",
        "",
        "```bash",
        f"hf-efficient train --task {card['task']} --model model_cards/{preset} --output-dir out/{preset}",
        "```",
        "",
        "Save with `hf_efficient.save_pretrained_with_code(model, folder)` (or `hf-efficient publish`) so that the",
        "checkpoint loads with `trust_remote_code=True` where hf-efficient is not installed.",
        "",
        "## Published results (from the paper, not reproduced by this preset)",
        "",
        "| benchmark | result |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in card.get("published", [])],
        "",
    ]
    if card.get("notes"):
        lines += ["## Notes", "", *[f"- {note}" for note in card["notes"]], ""]
    return "\n".join(lines)


README = ROOT / "README.md"
TABLE_START, TABLE_END = "<!-- architectures:start -->", "<!-- architectures:end -->"


def architecture_table() -> str:
    """The README's architecture table: one row per registered architecture, its heads and its presets."""
    import hf_efficient

    presets: dict[str, list[str]] = {}
    for config_path in sorted(CARDS.glob("*/config.json")):
        model_type = json.loads(config_path.read_text()).get("model_type")
        presets.setdefault(model_type, []).append(config_path.parent.name)
    rows = [
        "| architecture | model_type | variants | heads | presets (`model_cards/`) |",
        "|---|---|---|---|---|",
    ]
    for model_type in hf_efficient.ARCHITECTURES:
        package = hf_efficient.get_architecture(model_type)
        info = getattr(package, "ARCHITECTURE_CARD", {})
        prefix = hf_efficient.get_config_class(model_type).__name__.removesuffix("Config")
        heads = ", ".join(cls.__name__.removeprefix(prefix) for cls in package.AUTO_MAPPING.values())
        names = ", ".join(f"`{name}`" for name in presets.get(model_type, [])) or "none yet"
        rows.append(
            f"| {info.get('name', model_type)} | `{model_type}` | {info.get('variants', '')} | {heads} | {names} |"
        )
    return "\n".join(rows)


def render_readme(text: str) -> str:
    if TABLE_START not in text or TABLE_END not in text:
        raise SystemExit(f"README.md lacks the {TABLE_START} / {TABLE_END} markers")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return f"{head}{TABLE_START}\n{architecture_table()}\n{TABLE_END}{tail}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if a committed README.md differs from its data")
    parser.add_argument("presets", nargs="*", help="preset names (default: every folder with a card.json)")
    args = parser.parse_args(argv)
    presets = args.presets or sorted(p.parent.name for p in CARDS.glob("*/card.json"))
    stale = []
    for preset in presets:
        folder = CARDS / preset
        card, config = (json.loads((folder / name).read_text()) for name in ("card.json", "config.json"))
        files = {"README.md": render(preset), **processor_files(preset, card, config)}
        extra = [name for name in PROCESSOR_FILES if name not in files and (folder / name).exists()]
        if args.check:
            differ = [
                name
                for name, text in files.items()
                if not (folder / name).is_file() or (folder / name).read_text() != text
            ]
            if differ or extra:
                stale.append(f"{preset} ({', '.join(differ + [f'{name} (not generated)' for name in extra])})")
        else:
            for name, text in files.items():
                (folder / name).write_text(text)
            for name in extra:
                (folder / name).unlink()
    readme = render_readme(README.read_text())
    if args.check and readme != README.read_text():
        stale.append("README.md architecture table")
    elif not args.check:
        README.write_text(readme)
    if stale:
        print("stale model cards (run scripts/checks/make_model_cards.py):", ", ".join(stale))
        return 1
    print(f"{len(presets)} model cards {'checked' if args.check else 'written'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
