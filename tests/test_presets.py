"""Every preset folder in `model_cards/` (one test for all architectures): its config loads through `AutoConfig`,
its head builds, and its generated model card is complete. Architecture-specific checks (the paper's sizes) live in
each architecture's test file."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

import hf_efficient
from tests.helpers import load_script

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
        [sys.executable, str(REPO / "scripts" / "checks" / "make_model_cards.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# Presets with their own vocabulary (or no token embeddings): no tokenizer ships, and the card says why. Kept explicit
# so that a new preset cannot silently go without its processor.
WITHOUT_PROCESSOR = {"r-transformer-nottingham", "r-transformer-ptb-char", "r-transformer-ptb-word"}


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_folder_loads_its_processor_as_transformers_does(preset):
    """Issue 21: `AutoImageProcessor.from_pretrained(folder)` / `AutoTokenizer.from_pretrained(folder)` work on every
    preset folder, and what they load fits the config: a vision preset's processor makes pixel values of the model's
    image size and channels; a text preset's tokenizer is the package's byte tokenizer with the model's vocabulary,
    special ids and context length."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer

    from hf_efficient.data import default_tokenizer

    folder = REPO / "model_cards" / preset
    config = AutoConfig.from_pretrained(folder)
    card = json.loads((folder / "card.json").read_text())
    if getattr(config, "image_size", None):
        processor = AutoImageProcessor.from_pretrained(folder)
        channels = config.num_channels
        image = Image.new("L" if channels == 1 else "RGB", (37, 21))
        pixels = processor(image, return_tensors="pt")["pixel_values"]
        assert tuple(pixels.shape) == (1, channels, config.image_size, config.image_size), preset
        assert preset not in WITHOUT_PROCESSOR
    elif preset in WITHOUT_PROCESSOR:
        assert len(card.get("no_processor", "")) > 10, f"{preset}: card.json must say why it has no tokenizer"
        assert not (folder / "tokenizer_config.json").exists()
        assert card["no_processor"] in (folder / "README.md").read_text()
    else:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        reference = default_tokenizer()
        assert type(tokenizer) is type(reference) and len(tokenizer) == config.vocab_size, preset
        assert tokenizer.get_vocab() == reference.get_vocab()
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (config.pad_token_id, config.eos_token_id)
        assert tokenizer.mask_token == reference.mask_token == "<extra_id_0>"
        text = "def f(x):\n    return 'é' + x"
        assert tokenizer(text).input_ids == reference(text).input_ids
        if getattr(config, "max_position_embeddings", None):
            assert tokenizer.model_max_length == config.max_position_embeddings
    assert not (folder / "model.safetensors").exists()  # a preset is a configuration, never weights


def test_presets_load_their_processors_without_hf_efficient_imported():
    """As on the Hub: the processor files name transformers classes, so they load where the architectures are not
    registered (no `import hf_efficient`)."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from transformers import AutoImageProcessor, AutoTokenizer\n"
        "loaded = []\n"
        "for folder in sorted(Path(sys.argv[1]).glob('*/config.json')):\n"
        "    folder = folder.parent\n"
        "    if (folder / 'preprocessor_config.json').exists():\n"
        "        loaded.append((folder.name, type(AutoImageProcessor.from_pretrained(folder)).__name__))\n"
        "    elif (folder / 'tokenizer_config.json').exists():\n"
        "        loaded.append((folder.name, type(AutoTokenizer.from_pretrained(folder)).__name__))\n"
        "assert 'hf_efficient' not in sys.modules\n"
        "print(json.dumps(loaded))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "model_cards")], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = dict(json.loads(result.stdout.strip().splitlines()[-1]))
    assert set(loaded) == set(PRESETS) - WITHOUT_PROCESSOR
    assert {name for name in loaded.values()} <= {"ByT5Tokenizer", "ViTImageProcessorPil", "ViTImageProcessor"}


def test_a_text_preset_without_the_byte_vocabulary_must_say_why():
    """make_model_cards refuses a text preset whose vocab_size is not the byte tokenizer's unless card.json gives
    the reason (`no_processor`), naming the preset and the value."""
    make_model_cards = load_script("scripts/checks/make_model_cards.py")
    with pytest.raises(SystemExit, match=r"model_cards/my-preset: vocab_size=49 is not the byte tokenizer's 384"):
        make_model_cards.processor_files("my-preset", {"task": "clm"}, {"vocab_size": 49})
    assert make_model_cards.processor_files("my-preset", {"no_processor": "its own words"}, {"vocab_size": 49}) == {}
    files = make_model_cards.processor_files("my-preset", {}, {"vocab_size": 384, "max_position_embeddings": 64})
    assert json.loads(files["tokenizer_config.json"])["model_max_length"] == 64
    files = make_model_cards.processor_files("v", {}, {"image_size": 32, "num_channels": 1})
    saved = json.loads(files["preprocessor_config.json"])
    assert saved["size"] == {"height": 32, "width": 32} and saved["image_mean"] == [0.5]
