"""scripts/converters/convert_timm_gmlp.py: timm-layout gMLP checkpoints port losslessly.

The core test builds a checkpoint with timm's tensor names and checks the converted model against a functional
reference of timm's gMLP forward written here (so it needs no timm). `test_against_real_timm` runs the same
comparison against timm itself when it is installed (`pip install -e .[timm]`, which needs a torchvision that
matches your torch; see the README).
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification

import hf_efficient  # noqa: F401
from tests.helpers import load_script

convert_timm_gmlp = load_script("scripts/converters/convert_timm_gmlp.py")

D, FFN, DEPTH, PATCH, IMAGE, CLASSES = 16, 48, 3, 4, 16, 5


def timm_layout_state_dict(seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    n = (IMAGE // PATCH) ** 2

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=generator) * scale

    state = {"stem.proj.weight": rand(D, 3, PATCH, PATCH), "stem.proj.bias": rand(D)}
    for i in range(DEPTH):
        prefix = f"blocks.{i}."
        state |= {
            prefix + "norm.weight": 1 + rand(D),
            prefix + "norm.bias": rand(D),
            prefix + "mlp_channels.fc1.weight": rand(FFN, D),
            prefix + "mlp_channels.fc1.bias": rand(FFN),
            prefix + "mlp_channels.gate.norm.weight": 1 + rand(FFN // 2),
            prefix + "mlp_channels.gate.norm.bias": rand(FFN // 2),
            prefix + "mlp_channels.gate.proj.weight": rand(n, n),
            prefix + "mlp_channels.gate.proj.bias": 1 + rand(n),
            prefix + "mlp_channels.fc2.weight": rand(D, FFN // 2),
            prefix + "mlp_channels.fc2.bias": rand(D),
        }
    state |= {
        "norm.weight": 1 + rand(D),
        "norm.bias": rand(D),
        "head.weight": rand(CLASSES, D),
        "head.bias": rand(CLASSES),
    }
    return state


def timm_gmlp_reference(state, image):
    """timm's MlpMixer(block_layer=SpatialGatingBlock, mlp_layer=GatedMlp) forward, written out functionally."""
    x = F.conv2d(image, state["stem.proj.weight"], state["stem.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (D,), state[p + "norm.weight"], state[p + "norm.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, state[p + "mlp_channels.fc1.weight"], state[p + "mlp_channels.fc1.bias"]))
        u, v = h.chunk(2, dim=-1)
        v = F.layer_norm(
            v,
            (FFN // 2,),
            state[p + "mlp_channels.gate.norm.weight"],
            state[p + "mlp_channels.gate.norm.bias"],
            eps=1e-5,
        )
        v = F.linear(
            v.transpose(-1, -2), state[p + "mlp_channels.gate.proj.weight"], state[p + "mlp_channels.gate.proj.bias"]
        )
        h = u * v.transpose(-1, -2)
        x = x + F.linear(h, state[p + "mlp_channels.fc2.weight"], state[p + "mlp_channels.fc2.bias"])
    x = F.layer_norm(x, (D,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return F.linear(x.mean(dim=1), state["head.weight"], state["head.bias"])


def test_conversion_matches_timm_layout_reference(tmp_path):
    state = timm_layout_state_dict()
    save_file(state, tmp_path / "timm.safetensors")
    assert (
        convert_timm_gmlp.main(
            ["--checkpoint", str(tmp_path / "timm.safetensors"), "--output-dir", str(tmp_path / "out")]
        )
        == 0
    )
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.image_size) == (D, DEPTH, IMAGE)
    image = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=image).logits, timm_gmlp_reference(state, image), rtol=0, atol=1e-5
        )
    assert (tmp_path / "out" / "modeling_gmlp.py").is_file()  # loads with trust_remote_code too


def test_unexpected_key_is_named():
    state = timm_layout_state_dict()
    state["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="blocks.0.extra.weight"):
        convert_timm_gmlp.convert(state)


def test_against_real_timm(tmp_path):
    timm = pytest.importorskip("timm", reason="optional: install timm (and a matching torchvision) to run")
    reference = timm.create_model("gmlp_ti16_224", pretrained=False, num_classes=7).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    model, _ = convert_timm_gmlp.convert(state)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=image).logits, reference(image), rtol=0, atol=1e-5)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
