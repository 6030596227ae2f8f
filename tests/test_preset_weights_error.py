"""Loading weights from a preset folder (a `config.json` without weights) says what a preset is and how to build a
model from it, through every Auto class a transformers user would try; a real checkpoint still loads."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSeq2SeqLM

import hf_efficient
from tests.model_tester import AUTO_CLASS_BY_SUFFIX

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.parent.name for p in (REPO / "model_cards").glob("*/config.json"))


@pytest.mark.parametrize("preset", PRESETS)
def test_from_pretrained_on_a_preset_says_how_to_build_it(preset):
    folder = REPO / "model_cards" / preset
    head = json.loads((folder / "card.json").read_text())["head"]
    auto_classes = {**AUTO_CLASS_BY_SUFFIX, "ForConditionalGeneration": AutoModelForSeq2SeqLM}
    auto_class = next(auto for suffix, auto in auto_classes.items() if head.endswith(suffix))
    for loader in (auto_class, AutoModel):
        with pytest.raises(OSError, match=r"it is a configuration \(a preset\), not a checkpoint") as error:
            loader.from_pretrained(folder)
        message = str(error.value)
        assert "from_config(AutoConfig.from_pretrained(" in message and f"--model {preset}" in message
        assert "no file named" in message  # transformers' own reason is kept


def test_a_saved_checkpoint_still_loads(tmp_path):
    config = AutoConfig.for_model(
        "gmlp", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, max_position_embeddings=8
    )
    model = hf_efficient.models.gmlp.GMLPModel(config)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
