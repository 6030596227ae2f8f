"""The documentation: the README is a short front page, every architecture has its page in the site's navigation,
the generated parts of the pages are current (`scripts/checks/make_docs.py --check`, also run by CI), and the site
builds with `mkdocs build --strict` where the `docs` extra is installed. (Every Python block of these pages runs in
`tests/test_docs_snippets.py`.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import hf_efficient
from hf_efficient.cli.parser import COMMANDS
from tests.helpers import load_script

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
make_docs = load_script("scripts/checks/make_docs.py")
# What a page for users must not carry: notes on how the package was developed, paths of the developers' machines,
# links to files outside the repository.
NOTEBOOK = re.compile(r"\bissues? \d+|\bformer(ly)?\b|/tmp/|\.\./shared/", re.I)


def nav_pages(nav) -> list[str]:
    """The pages of mkdocs.yml's `nav`, flattened."""
    pages = []
    for item in nav:
        for value in item.values() if isinstance(item, dict) else [item]:
            pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_generated_parts_are_current(capsys):
    assert make_docs.main(["--check"]) == 0, capsys.readouterr().out[-3000:]


def test_generated_part_is_rewritten_and_checked(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text("# Page\n\n<!-- make_docs:start heads gmlp -->\nstale\n<!-- make_docs:end -->\n\ntext after\n")
    monkeypatch.setattr(make_docs, "DOCS", tmp_path / "docs")
    monkeypatch.setattr(make_docs, "ROOT", tmp_path)
    assert make_docs.main(["--check"]) == 1
    assert make_docs.main([]) == 0 and make_docs.main(["--check"]) == 0
    text = page.read_text()
    assert "stale" not in text and "| `AutoModelForCausalLM` | `GMLPForCausalLM` |" in text
    assert text.startswith("# Page\n") and text.endswith("<!-- make_docs:end -->\n\ntext after\n")
    page.write_text("<!-- make_docs:start nonsense -->\n<!-- make_docs:end -->\n")
    with pytest.raises(ValueError, match="nonsense"):
        make_docs.main([])


def test_claims_table_is_a_generated_part_of_the_readme_and_the_claims_page():
    """The claims table users read is the runner's rendering of the committed study results (current: CI's
    make_docs --check), in the README and on the documentation's claims page."""
    for page in (REPO / "README.md", DOCS / "claims.md"):
        assert "<!-- make_docs:start claims -->" in page.read_text()
        assert page in make_docs.pages()
    assert make_docs.render_part("claims").startswith("| paper | claim | our setting | result | verdict |")
    # a model page shows its own study's rows only (or the no-results row)
    for page, study in [("aft", "aft"), ("combiner", "combiner"), ("ngram_transformer", "ngram")]:
        assert f"<!-- make_docs:start claims {study} -->" in (DOCS / "models" / f"{page}.md").read_text()
        rows = make_docs.render_part(f"claims {study}").splitlines()[2:]
        assert rows and all(row.endswith(f"({study}) |") or "no study results yet" in row for row in rows), rows
    with pytest.raises(ValueError, match="unknown study"):
        make_docs.render_part("claims nonsense")


def test_command_reference_lists_every_command_and_option():
    """The reference is generated from the argument dataclasses: every command and every option a user can type."""
    import dataclasses

    text = (DOCS / "command.md").read_text()
    for name, command in COMMANDS.items():
        assert f"## `{name}`" in text
        for dtype in command.arguments:
            for item in make_docs._fields(dtype):
                if not item.metadata.get("positional"):
                    assert f"`--{item.name.replace('_', '-')}`" in text, (name, item.name)
            assert dataclasses.is_dataclass(dtype)
    assert "`--max-train-minutes`" in text and "`--model-name-or-path`, `--model`" in text


def test_every_architecture_has_a_page_in_the_navigation():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    pages = nav_pages(config["nav"])
    assert sorted(pages) == sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")), "a page not in nav"
    for model_type in hf_efficient.ARCHITECTURES:
        assert f"models/{model_type}.md" in pages
        text = (DOCS / "models" / f"{model_type}.md").read_text()
        config_class = hf_efficient.get_config_class(model_type)
        assert f"::: {config_class.__module__}.{config_class.__name__}" in text
        for head in hf_efficient.get_architecture(model_type).AUTO_MAPPING.values():
            assert f"::: {head.__module__}.{head.__name__}" in text, head
        assert f"<!-- make_docs:start heads {model_type} -->" in text
        assert f"<!-- make_docs:start presets {model_type} -->" in text
        assert "arxiv.org/abs/" in text and "claims" in text.lower()


def test_readme_is_a_short_front_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for marker in ("<!-- architectures:start -->", "<!-- main-command -->", "<!-- test-command -->"):
        assert marker in text
    assert "benchmarks:start" not in text  # the tables are on the benchmark page
    for link in re.findall(r"\]\(([^)#]+)", text):  # every relative link names a file of the repository
        if "://" not in link:
            assert (REPO / link).exists(), link


@pytest.mark.parametrize(
    "path", [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted(DOCS.rglob("*.md"))], ids=lambda p: p.name
)
def test_no_development_notes_for_users(path):
    # docs/benchmarks.md's generated sections quote the results' own records (commands, import notes): not prose.
    text = re.sub(r"<!-- benchmarks:start .*?<!-- benchmarks:end -->", "", path.read_text(), flags=re.S)
    assert [match.group(0) for match in NOTEBOOK.finditer(text)] == []


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra (mkdocs-material, mkdocstrings) is not installed")
    pytest.importorskip("mkdocstrings_handlers.python")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "benchmarks" / "results" / "cpu-amd-epyc-2c" / "scaling_time.png").is_file()
