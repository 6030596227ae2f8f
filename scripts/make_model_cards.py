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
      "notes": ["..."]                              # scaling notes, open choices
    }

    python scripts/make_model_cards.py          # rewrite every card
    python scripts/make_model_cards.py --check  # exit 1 if a committed card differs from its data

It also writes the README's architecture table (between `<!-- architectures:start -->` and
`<!-- architectures:end -->`) from the registry (`hf_efficient.ARCHITECTURES`, each folder's `AUTO_MAPPING` and
`ARCHITECTURE_CARD`) and the presets in `model_cards/`, so a new architecture or preset cannot be forgotten there.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARDS = ROOT / "model_cards"


def count_parameters(config: dict) -> int | None:
    """Parameter count of the preset's head, built on the meta device (no memory)."""
    try:
        import torch
        from transformers import AutoConfig

        import hf_efficient  # noqa: F401  (registers the architectures)

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
    lines += [
        "## How to use and fine-tune",
        "",
        "```python",
        "import hf_efficient  # registers the architectures with the Auto classes",
        f"from transformers import AutoConfig, {card['auto_class']}",
        "",
        f'config = AutoConfig.from_pretrained("model_cards/{preset}")',
        f"model = {card['auto_class']}.from_config(config)",
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
        text = render(preset)
        target = CARDS / preset / "README.md"
        if args.check:
            if not target.is_file() or target.read_text() != text:
                stale.append(preset)
        else:
            target.write_text(text)
    readme = render_readme(README.read_text())
    if args.check and readme != README.read_text():
        stale.append("README.md architecture table")
    elif not args.check:
        README.write_text(readme)
    if stale:
        print("stale model cards (run scripts/make_model_cards.py):", ", ".join(stale))
        return 1
    print(f"{len(presets)} model cards {'checked' if args.check else 'written'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
