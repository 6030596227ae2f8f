"""scripts/converters/convert_timm_mixer.py: timm MLP-Mixer checkpoints port exactly, and upcycled ones start at the
dense model's outputs.

The core tests build a checkpoint with timm's tensor names and compare the converted model with a functional
re-implementation of timm's `MlpMixer` / `MixerBlock` forward written here from timm's semantics (no timm needed):
stem conv, per block `x + mlp_tokens(norm1(x)^T)^T` then `x + mlp_channels(norm2(x))` (LayerNorm eps 1e-6, exact
GELU), final LayerNorm, mean over patches, linear head. `test_against_real_timm` repeats the check against timm
itself when it is installed.
"""

import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, pipeline

import hf_efficient  # noqa: F401
from tests.helpers import load_script

convert_timm_mixer = load_script("scripts/converters/convert_timm_mixer.py")

C, TOKENS, CHANNELS, DEPTH, PATCH, IMAGE, CLASSES = 16, 8, 64, 4, 4, 16, 5
S = (IMAGE // PATCH) ** 2


def timm_layout_state_dict(seed=0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    state = {"stem.proj.weight": rand(C, 3, PATCH, PATCH), "stem.proj.bias": rand(C)}
    for i in range(DEPTH):
        p = f"blocks.{i}."
        state |= {
            p + "norm1.weight": 1 + rand(C),
            p + "norm1.bias": rand(C),
            p + "mlp_tokens.fc1.weight": rand(TOKENS, S),
            p + "mlp_tokens.fc1.bias": rand(TOKENS),
            p + "mlp_tokens.fc2.weight": rand(S, TOKENS),
            p + "mlp_tokens.fc2.bias": rand(S),
            p + "norm2.weight": 1 + rand(C),
            p + "norm2.bias": rand(C),
            p + "mlp_channels.fc1.weight": rand(CHANNELS, C),
            p + "mlp_channels.fc1.bias": rand(CHANNELS),
            p + "mlp_channels.fc2.weight": rand(C, CHANNELS),
            p + "mlp_channels.fc2.bias": rand(C),
        }
    state |= {"norm.weight": 1 + rand(C), "norm.bias": rand(C), "head.weight": rand(CLASSES, C), "head.bias": rand(5)}
    return state


def timm_mixer_reference(state, image):
    """timm's `MlpMixer.forward` with `MixerBlock`s, written out functionally."""

    def mlp(x, prefix):
        hidden = F.gelu(F.linear(x, state[prefix + "fc1.weight"], state[prefix + "fc1.bias"]))
        return F.linear(hidden, state[prefix + "fc2.weight"], state[prefix + "fc2.bias"])

    x = F.conv2d(image, state["stem.proj.weight"], state["stem.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (C,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        x = x + mlp(h.transpose(1, 2), p + "mlp_tokens.").transpose(1, 2)
        h = F.layer_norm(x, (C,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        x = x + mlp(h, p + "mlp_channels.")
    x = F.layer_norm(x, (C,), state["norm.weight"], state["norm.bias"], eps=1e-6)
    return F.linear(x.mean(dim=1), state["head.weight"], state["head.bias"])


IMAGE_BATCH = torch.randn(3, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def test_dense_conversion_matches_timm_exactly(tmp_path):
    state = timm_layout_state_dict()
    save_file(state, tmp_path / "timm.safetensors")
    argv = ["--checkpoint", str(tmp_path / "timm.safetensors"), "--output-dir", str(tmp_path / "out")]
    assert convert_timm_mixer.main(argv) == 0
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_sparse_layers) == (C, DEPTH, 0)
    assert (config.token_mixing_dim, config.channel_mixing_dim, config.image_size) == (TOKENS, CHANNELS, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=IMAGE_BATCH).logits, timm_mixer_reference(state, IMAGE_BATCH), rtol=0, atol=1e-5
        )
    assert (tmp_path / "out" / "modeling_sparse_mlp.py").is_file()  # loads with trust_remote_code too
    # the saved image processor makes the folder a pipeline
    top = pipeline("image-classification", model=str(tmp_path / "out"))(Image.new("RGB", (40, 30), (10, 200, 30)))
    assert len(top) == CLASSES and top[0]["label"].startswith("LABEL_")


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("upcycle, experts, top_k", [(2, (4, 4), (1, 2)), (4, (2, 8), (2, 1))])
def test_upcycled_model_starts_at_the_dense_outputs(upcycle, experts, top_k, implementation):
    state = timm_layout_state_dict(seed=3)
    model, config = convert_timm_mixer.convert(
        state, upcycle=upcycle, experts=experts, top_k=top_k, experts_implementation=implementation
    )
    assert config.num_sparse_layers == upcycle and config.num_token_experts == experts[0]
    assert config.capacity_factor is None
    with torch.no_grad():
        out = model(pixel_values=IMAGE_BATCH, output_router_logits=True)
    torch.testing.assert_close(out.logits, timm_mixer_reference(state, IMAGE_BATCH), rtol=0, atol=1e-5)
    assert all(torch.equal(r, torch.zeros_like(r)) for r in out.router_logits)  # router at zero
    sparse = model.model.layers[-1]
    for e in range(experts[1]):  # every expert is the dense MLP (output layer scaled by E / k)
        torch.testing.assert_close(
            sparse.channel_moe.experts.up_proj[e], state[f"blocks.{DEPTH - 1}.mlp_channels.fc1.weight"]
        )
    # the upcycled model trains: the zero router still gets a gradient
    model.train()
    torch.manual_seed(0)
    loss = model(pixel_values=IMAGE_BATCH, labels=torch.tensor([0, 1, 2])).loss
    loss.backward()
    assert sparse.channel_moe.router.weight.grad.abs().sum() > 0


def test_unexpected_key_is_named():
    state = timm_layout_state_dict()
    state["blocks.0.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="blocks.0.extra.weight"):
        convert_timm_mixer.convert(state)


def test_against_real_timm():
    timm = pytest.importorskip("timm", reason="optional: install timm (and a matching torchvision) to run")
    reference = timm.create_model("mixer_s32_224", pretrained=False, num_classes=7).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    image = torch.randn(1, 3, 224, 224)
    for upcycle in (0, 2):
        model, _ = convert_timm_mixer.convert(state, upcycle=upcycle)
        with torch.no_grad():
            torch.testing.assert_close(model(pixel_values=image).logits, reference(image), rtol=0, atol=1e-4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
