"""Attention Free Transformer: the generic tester for every head and every aft_type, plus AFT specifics."""

import pytest
import torch
from transformers import set_seed

from hf_efficient.models.aft import (
    AFTConfig,
    AFTForCausalLM,
    AFTForImageClassification,
    AFTForMaskedLM,
    AFTForSequenceClassification,
    AFTModel,
    ops_aft,
)
from hf_efficient.models.aft.modeling_aft import AFTLayer, AFTPositionBias
from tests.helpers import TINY, LargestTensor, assert_half_precision_close
from tests.model_tester import GenericModelTests
from tests.references.aft_reference import (
    aft_reference,
    conv1d_bias,
    conv2d_bias,
    local_bias,
    per_head_to_channels,
)

MAX_LEN = TINY["aft"]["max_position_embeddings"]
ALL_HEADS = [AFTModel, AFTForCausalLM, AFTForMaskedLM, AFTForSequenceClassification, AFTForImageClassification]
INVALID_CONFIGS = [
    ({"aft_type": "linear"}, "aft_type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"aft_type": "local", "local_window": 0}, "local_window"),
    ({"aft_type": "full", "position_bias_dim": -3}, "position_bias_dim"),
    ({"aft_type": "conv", "hidden_size": 30, "num_heads": 4}, "num_heads"),
    ({"aft_type": "conv", "conv_kernel_size": 4}, "conv_kernel_size"),
    ({"image_size": 32}, "patch_size"),
    ({"image_size": 32, "patch_size": 5}, "patch_size"),
    (
        {"aft_type": "full", "image_size": 32, "patch_size": 4, "max_position_embeddings": 64},
        "max_position_embeddings",
    ),
    ({"image_size": 32, "patch_size": 4, "causal": True}, "causal"),
    ({"drop_path_rate": 1.5}, "drop_path_rate"),
]


def tiny_config(head, **overrides) -> AFTConfig:
    kwargs = {**TINY["aft"], **overrides}
    if head is AFTForImageClassification:
        # 3 x 3 patches (+ a class token for full/local/simple)
        kwargs.update(vocab_size=None, image_size=6, patch_size=2, num_channels=3, drop_path_rate=0.1)
    if head in (AFTModel, AFTForSequenceClassification):
        kwargs["causal"] = False
    return AFTConfig(**kwargs)


def perturb_conv_kernels(model, seed):
    """AFT-conv starts as AFT-simple (gamma = beta = 0): give the kernels a non-zero value for the tests."""
    generator = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AFTLayer) and module.aft_type == "conv":
                module.conv_gamma.copy_(torch.rand(module.conv_gamma.shape, generator=generator) + 0.5)
                module.conv_beta.copy_(torch.randn(module.conv_beta.shape, generator=generator))
    return model


class AFTTests(GenericModelTests):
    model_type = "aft"
    all_heads = ALL_HEADS
    invalid_configs = INVALID_CONFIGS

    def get_config(self, variant, head):
        return tiny_config(head, **self.variants[variant])

    def make_model(self, variant, head, seed=0, **overrides):
        return perturb_conv_kernels(super().make_model(variant, head, seed=seed, **overrides), seed)


class TestAFTWithPositionBias(AFTTests):
    """AFT-full (factorised and full-matrix bias) and AFT-local: inputs are limited to max_position_embeddings."""

    variants = {
        "full": {"aft_type": "full"},
        "full-matrix": {"aft_type": "full", "position_bias_dim": None},
        "local": {"aft_type": "local"},
    }
    max_seq_length = MAX_LEN


class TestAFTUnbounded(AFTTests):
    """AFT-simple and AFT-conv: no position bias, any length."""

    variants = {"simple": {"aft_type": "simple"}, "conv": {"aft_type": "conv"}}
    max_seq_length = None


# ---------------------------------------------------------------------- the model computes the paper's equation
def _layer_reference(layer, config, x, causal):
    """The AFT layer recomputed from its parameters with the dense reference (explicit exp(K + w) weights)."""
    length = x.shape[1]
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    if config.aft_type == "simple":
        y = aft_reference(q, k, v, torch.zeros(length, length), causal)
    elif config.aft_type in ("full", "local"):
        bias = layer.position_bias
        w = bias.weight if bias.weight is not None else bias.u @ bias.v.T
        w = w[:length, :length].double()
        if config.aft_type == "local":
            s = config.local_window
            band = torch.stack(
                [
                    torch.stack([w[t, t + o] if 0 <= t + o < length else w.new_zeros(()) for o in range(-s + 1, s)])
                    for t in range(length)
                ]
            )
            band = band[:, : s if causal else None]
            w = local_bias(band, s, causal)
        y = aft_reference(q, k, v, w, causal)
    else:
        kernel = layer.conv_kernel()
        if config.is_vision:
            w_heads = conv2d_bias(kernel, config.grid_size)
        elif causal:
            # the causal text kernel covers the current and the ks - 1 previous tokens
            w_heads = conv1d_bias(kernel, length, causal=True)
        else:
            w_heads = conv1d_bias(kernel, length, causal=False)
        k, w = per_head_to_channels(k, w_heads, config.hidden_size)
        y = aft_reference(q, k, v, w, causal)
    return layer.o_proj(y.float())


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(
    "variant",
    [
        {"aft_type": "full"},
        {"aft_type": "full", "position_bias_dim": None},
        {"aft_type": "local"},
        {"aft_type": "local", "position_bias_dim": None},
        {"aft_type": "local", "local_window": 20},
        {"aft_type": "simple"},
        {"aft_type": "conv"},
    ],
    ids=["full", "full-matrix", "local", "local-matrix", "local-window20", "simple", "conv"],
)
def test_layer_matches_dense_reference(variant, causal):
    config = tiny_config(AFTModel, **variant)
    set_seed(0)
    model = perturb_conv_kernels(AFTModel(config), 0).eval()
    layer = model.layers[0].aft
    x = torch.randn(2, 11, config.hidden_size)
    with torch.no_grad():
        got, _ = layer(x, causal=causal, start=torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(got, _layer_reference(layer, config, x, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aft_type", ["full", "local", "simple", "conv"])
def test_image_layer_matches_dense_reference(aft_type):
    config = tiny_config(AFTForImageClassification, aft_type=aft_type)
    set_seed(0)
    model = perturb_conv_kernels(AFTForImageClassification(config), 0).eval()
    layer = model.model.layers[1].aft
    length = 9 if aft_type == "conv" else 10  # AFT-conv: the 3 x 3 grid; others: class token + 9 patches
    x = torch.randn(2, length, config.hidden_size)
    with torch.no_grad():
        got, _ = layer(x, causal=False, start=torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(got, _layer_reference(layer, config, x, False), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 7])
def test_factorised_band_equals_dense_bias(window, causal):
    config = tiny_config(AFTModel, aft_type="local", local_window=window)
    set_seed(0)
    bias = AFTModel(config).layers[0].aft.position_bias
    w = bias.u @ bias.v.T
    start = torch.tensor([0, 3, -2])
    with torch.no_grad():
        band = bias.band(start, 10, window, causal)
    offsets = range(-(window - 1), 1 if causal else window)
    for b, s0 in enumerate(start.tolist()):
        for t in range(10):
            for j, o in enumerate(offsets):
                p, q = s0 + t, s0 + t + o
                if 0 <= p < MAX_LEN and 0 <= q < MAX_LEN:
                    torch.testing.assert_close(band[b, t, j], w[p, q])


def _left_padded(ids, pad=3):
    """`ids` (one sample) after `pad` padding positions, and its attention mask."""
    no_tokens = torch.zeros(1, pad, dtype=torch.long)
    return torch.cat([no_tokens, ids], 1), torch.cat([no_tokens, torch.ones_like(ids)], 1)


def test_left_padded_batch_uses_each_samples_own_positions():
    """With a position bias, a left-padded sample equals the sample alone (positions start after the padding)."""
    config = tiny_config(AFTForCausalLM, aft_type="full")
    set_seed(0)
    model = AFTForCausalLM(config).eval()
    ids = torch.randint(3, 64, (1, 8))
    padded, mask = _left_padded(ids)
    with torch.no_grad():
        alone = model(ids).logits
        both = model(
            torch.cat([padded, torch.randint(3, 64, (1, 11))]), attention_mask=torch.cat([mask, mask.new_ones(1, 11)])
        ).logits
    torch.testing.assert_close(both[0, 3:], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head", [AFTForCausalLM, AFTForMaskedLM], ids=["causal", "bidirectional"])
def test_full_factorised_bias_equals_dense_bias(head, monkeypatch):
    """AFT-full streams its bias from the factors `(u, v)`: logits and every parameter gradient equal the path
    that forms the dense `u v^T` block and hands it to `aft_full`, on a left-padded batch."""
    config = tiny_config(head, aft_type="full")
    set_seed(0)
    model = head(config)
    model.eval()  # no dropout; gradients still flow
    ids = torch.randint(3, 64, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0

    def logits_and_grads():
        model.zero_grad()
        logits = model(ids, attention_mask=mask).logits
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = []
    factors = AFTPositionBias.factors
    monkeypatch.setattr(AFTPositionBias, "factors", lambda self, *a: calls.append(1) or factors(self, *a))
    logits, grads = logits_and_grads()
    assert len(calls) == config.num_hidden_layers

    def dense(self, query_start, num_queries, key_start, num_keys):
        u, v = factors(self, query_start, num_queries, key_start, num_keys)
        return u @ v.transpose(-1, -2)  # (B, Lq, Lk): aft_full's dense-bias path

    monkeypatch.setattr(AFTPositionBias, "factors", dense)
    dense_logits, dense_grads = logits_and_grads()
    torch.testing.assert_close(logits, dense_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == dense_grads.keys()
    bias_grads = [grad for name, grad in grads.items() if "position_bias" in name]
    assert len(bias_grads) == 2 * config.num_hidden_layers and all(grad.abs().sum() > 0 for grad in bias_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, dense_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_full_model_never_forms_the_length_squared_bias(monkeypatch):
    """Forward + backward of AFT-full at L = 2048 on a left-padded batch: no tensor of L * L elements or more
    (the dense per-sample bias would be 2 L^2). Tiles of 2^18 elements (128 queries x 2048 keys) instead of the
    default 2^22 = 2048^2, so that one tile is not the whole matrix at this length."""
    length = 2048
    monkeypatch.setattr(ops_aft, "_TILE_ELEMENTS", 1 << 18)
    config = tiny_config(AFTForCausalLM, aft_type="full", max_position_embeddings=length, num_hidden_layers=1)
    set_seed(0)
    model = AFTForCausalLM(config)
    ids = torch.randint(3, 64, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[0, :5] = 0
    with LargestTensor() as mode:
        loss = model(ids, attention_mask=mask, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert model.model.layers[0].aft.position_bias.u.grad.abs().sum() > 0
    assert 0 < mode.numel < length * length


# ---------------------------------------------------------------------- decoding state size
def _cache_numel(cache, layer_idx=1):
    return {name: t.numel() for name, t in cache.get_states(layer_idx).items()}


@pytest.mark.parametrize("aft_type", ["simple", "local", "conv", "full"])
def test_decoding_state_size(aft_type):
    """simple: O(d) per layer, local/conv: the last s - 1 keys plus O(d) sums, full: every past key."""
    config = tiny_config(AFTForCausalLM, aft_type=aft_type, max_position_embeddings=64)
    set_seed(0)
    model = AFTForCausalLM(config).eval()
    sizes = []
    for length in (4, 20):
        with torch.no_grad():
            out = model(torch.randint(3, 64, (1, length)), use_cache=True)
        sizes.append(_cache_numel(out.cache))
    d = config.hidden_size
    key_channels = config.num_heads if aft_type == "conv" else d
    window = {"simple": 0, "local": config.local_window - 1, "conv": config.conv_kernel_size - 1}.get(aft_type)
    if aft_type == "full":
        assert sizes[1]["keys"] == 20 * d and sizes[0]["keys"] == 4 * d
    else:
        assert sizes[0] == sizes[1], "the state must not grow with the prefix"
        assert sizes[1]["keys"] == window * key_channels
        assert sizes[1]["max"] + sizes[1]["num"] + sizes[1]["den"] == 2 * key_channels + d


@pytest.mark.parametrize("aft_type", ["simple", "conv"])
def test_unbounded_variants_accept_sequences_beyond_max_position_embeddings(aft_type):
    config = tiny_config(AFTForCausalLM, aft_type=aft_type)
    set_seed(0)
    model = AFTForCausalLM(config).eval()
    ids = torch.randint(3, 64, (1, 3 * MAX_LEN))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cached = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=cached.cache).logits
    assert torch.isfinite(full).all()
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_position_ids_are_rejected():
    model = AFTForCausalLM(tiny_config(AFTForCausalLM, aft_type="local"))
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.randint(3, 64, (1, 4)), position_ids=torch.arange(4)[None])


def test_conv_starts_as_simple():
    """gamma = beta = 0 at init: the reparameterised kernel is 0, so AFT-conv equals AFT-simple."""
    config = tiny_config(AFTModel, aft_type="conv")
    set_seed(0)
    layer = AFTModel(config).layers[0].aft
    assert torch.equal(layer.conv_kernel(), torch.zeros_like(layer.conv_weight))


def _reparameterised_kernel(layer, multiplier: float) -> torch.Tensor:
    """`m * (gamma * (w - mean(w)) / std(w) + beta)` per head, written out from the parameters."""
    flat = layer.conv_weight.flatten(1)
    standard = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, unbiased=False, keepdim=True) + 1e-5)
    kernel = multiplier * (layer.conv_gamma[:, None] * standard + layer.conv_beta[:, None])
    return kernel.view_as(layer.conv_weight)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_conv_gain_multiplier_scales_the_kernel(causal):
    """`conv_gain_multiplier` m: the kernel is m times the paper's, the layer still equals the dense reference, and
    the model still starts as AFT-simple (gamma = beta = 0)."""
    config = tiny_config(AFTModel, aft_type="conv", conv_gain_multiplier=7.5)
    set_seed(0)
    assert torch.equal(AFTModel(config).layers[0].aft.conv_kernel(), torch.zeros(config.num_heads, 3))
    model = perturb_conv_kernels(AFTModel(config), 0).eval()
    layer = model.layers[0].aft
    torch.testing.assert_close(layer.conv_kernel(), _reparameterised_kernel(layer, 7.5), atol=1e-6, rtol=1e-6)
    x = torch.randn(2, 11, config.hidden_size)
    with torch.no_grad():
        got, _ = layer(x, causal=causal, start=torch.zeros(1, dtype=torch.long))
        torch.testing.assert_close(got, _layer_reference(layer, config, x, causal), atol=1e-5, rtol=1e-5)


def test_conv_gain_multiplier_is_a_learning_rate_on_gamma_and_beta():
    """What the docstring promises: under Adam, m = 100 trains like m = 1 with a 100x learning rate on gamma and
    beta (the same kernels after a few steps), so the local kernel moves 100x faster than at m = 1."""

    def train(multiplier: float, gain_lr_scale: float) -> tuple[torch.Tensor, AFTForCausalLM]:
        config = tiny_config(AFTForCausalLM, aft_type="conv", conv_gain_multiplier=multiplier)
        set_seed(0)
        model = AFTForCausalLM(config)
        gains = [p for n, p in model.named_parameters() if n.endswith(("conv_gamma", "conv_beta"))]
        rest = [p for n, p in model.named_parameters() if not n.endswith(("conv_gamma", "conv_beta"))]
        optimizer = torch.optim.Adam([{"params": rest}, {"params": gains, "lr": 1e-3 * gain_lr_scale}], lr=1e-3)
        ids = torch.randint(3, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        return torch.stack([layer.aft.conv_kernel() for layer in model.model.layers]).detach(), model

    fast, _ = train(100.0, 1.0)
    scaled_lr, _ = train(1.0, 100.0)
    paper, _ = train(1.0, 1.0)
    torch.testing.assert_close(fast, scaled_lr, atol=1e-4, rtol=1e-3)
    assert fast.abs().max() > 20 * paper.abs().max() > 0


def test_conv_gain_multiplier_must_be_positive():
    with pytest.raises(ValueError, match="conv_gain_multiplier"):
        AFTConfig(aft_type="conv", conv_gain_multiplier=0.0)


# ---------------------------------------------------------------------- presets
PRESETS = {
    "aft-local-enwik8": (
        AFTForCausalLM,
        {
            "aft_type": "local",
            "num_hidden_layers": 24,
            "hidden_size": 256,
            "local_window": 32,
            "position_bias_dim": 256,
        },
    ),
    "aft-simple-enwik8": (AFTForCausalLM, {"aft_type": "simple", "num_hidden_layers": 24, "hidden_size": 256}),
    "aft-full-tiny": (
        AFTForImageClassification,
        {"aft_type": "full", "num_hidden_layers": 12, "hidden_size": 192, "image_size": 224, "patch_size": 16},
    ),
    "aft-conv-small": (
        AFTForImageClassification,
        {"aft_type": "conv", "num_hidden_layers": 12, "hidden_size": 384, "num_heads": 384, "conv_kernel_size": 15},
    ),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_with_the_papers_sizes(preset):
    from pathlib import Path

    from transformers import AutoConfig

    folder = Path(__file__).resolve().parents[1] / "model_cards" / preset
    config = AutoConfig.from_pretrained(folder)
    head, expected = PRESETS[preset]
    assert isinstance(config, AFTConfig)
    assert {key: getattr(config, key) for key in expected} == expected
    assert (folder / "README.md").read_text().count("arXiv:2105.14103") >= 1
    with torch.device("meta"):
        model = head(config)
    assert type(model) is head


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aft_type", ["full", "local", "simple", "conv"])
def test_half_precision_model_with_huge_keys_is_finite(aft_type, dtype):
    """Keys (and conv kernels) in the hundreds, where exp overflows float16/bfloat16 and float32: finite logits
    that match the float32 model."""
    config = tiny_config(AFTForCausalLM, aft_type=aft_type)
    set_seed(0)
    model = perturb_conv_kernels(AFTForCausalLM(config), 0).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.aft.k_proj.weight.mul_(400.0)
            if aft_type == "conv":
                layer.aft.conv_gamma.mul_(100.0)
    assert_half_precision_close(model, torch.randint(3, 64, (2, 12)), dtype, atol=0.15)


def test_text_position_embeddings_keep_padding_and_cache_exact():
    config = tiny_config(AFTForCausalLM, aft_type="simple", position_embeddings=True)
    set_seed(0)
    model = AFTForCausalLM(config).eval()
    ids = torch.randint(3, 64, (1, 9))
    padded, mask = _left_padded(ids)
    with torch.no_grad():
        alone = model(ids).logits
        left = model(padded, attention_mask=mask).logits
        prefix = model(padded[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        step = model(padded[:, -1:], attention_mask=mask, cache=prefix.cache).logits
    torch.testing.assert_close(left[0, 3:], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[0, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(3, 64, (1, MAX_LEN + 1)))
