"""Every preset folder in `model_cards/` (one test for all architectures): its config loads through `AutoConfig`,
its head builds, and its generated model card is complete. Architecture-specific checks (the paper's sizes) live in
each architecture's test file."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import hf_efficient

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.parent.name for p in (REPO / "model_cards").glob("*/config.json"))


def test_every_architecture_has_a_preset():
    types = {json.loads((REPO / "model_cards" / name / "config.json").read_text())["model_type"] for name in PRESETS}
    missing = sorted(set(hf_efficient.ARCHITECTURES) - types)
    assert not missing, f"architectures without a preset in model_cards/: {missing}"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_loads_builds_and_card_is_complete(preset):
    folder = REPO / "model_cards" / preset
    model_type = json.loads((folder / "config.json").read_text())["model_type"]
    assert model_type in hf_efficient.ARCHITECTURES, f"{preset}: unregistered model_type {model_type!r}"
    config = AutoConfig.from_pretrained(folder)
    assert isinstance(config, hf_efficient.get_config_class(model_type))

    card_data = json.loads((folder / "card.json").read_text())
    heads = {cls.__name__: cls for cls in hf_efficient.get_architecture(model_type).AUTO_MAPPING.values()}
    assert card_data["head"] in heads, f"{preset}: head {card_data['head']!r} is not one of {sorted(heads)}"
    with torch.device("meta"):
        model = heads[card_data["head"]](config)
    assert sum(p.numel() for p in model.parameters()) > 0

    card = (folder / "README.md").read_text()
    assert card.startswith("---\n")
    front_matter = card.split("---\n")[1]
    for key in ("library_name:", "tags:", "pipeline_tag:", "license:"):
        assert key in front_matter, (preset, key)
    assert "## Intended use" in card
    for _, figure in card_data.get("published", []):
        assert str(figure) in card, (preset, figure)
    paper = card_data.get("paper", {})
    if "arxiv" in paper:
        assert paper["arxiv"] in card, (preset, "the paper's arXiv id")


def test_model_cards_are_generated_from_their_data(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_model_cards.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
