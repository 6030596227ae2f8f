"""gMLP / aMLP: the generic tester for every head, plus reference agreement, presets and gMLP specifics."""

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, set_seed

from hf_efficient.models.gmlp import (
    GMLPConfig,
    GMLPForCausalLM,
    GMLPForImageClassification,
    GMLPForMaskedLM,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
    ops_gmlp,
)
from hf_efficient.models.gmlp.ops_gmlp import spatial_gating_projection, tiny_attention
from tests.helpers import TINY, causal_gmlp, tiny_config
from tests.model_tester import GenericModelTests
from tests.references.gmlp_reference import (
    sgu_projection_dense_reference,
    sgu_projection_reference,
    tiny_attention_reference,
)

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = TINY["gmlp"]["max_position_embeddings"]


class TestGMLP(GenericModelTests):
    model_type = "gmlp"
    all_heads = [
        GMLPModel,
        GMLPForCausalLM,
        GMLPForMaskedLM,
        GMLPForSequenceClassification,
        GMLPForTokenClassification,
        GMLPForImageClassification,
    ]
    variants = {"gmlp": {}, "amlp": {"tiny_attn_size": 8}}
    max_seq_length = MAX_LEN
    seq_length = 12
    invalid_configs = [
        ({"hidden_size": 0}, "hidden_size"),
        ({"intermediate_size": 63}, "intermediate_size"),
        ({"tiny_attn_size": -4}, "tiny_attn_size"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"image_size": 32}, "patch_size"),
        ({"image_size": 32, "patch_size": 5}, "patch_size"),
        ({"image_size": 32, "patch_size": 8, "max_position_embeddings": 10}, "max_position_embeddings"),
    ]

    def get_config(self, variant, head):
        kwargs = dict(self.variants[variant])
        if head is GMLPForImageClassification:
            kwargs.update(vocab_size=None, image_size=8, patch_size=2, num_channels=3, drop_path_rate=0.1)
        if head is GMLPForSequenceClassification or head is GMLPForTokenClassification or head is GMLPModel:
            kwargs["causal"] = False
        return tiny_config("gmlp", kwargs)


# ---------------------------------------------------------------------- reference agreement of the ops
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("with_positions", [False, True])
@pytest.mark.parametrize("num_queries", [None, 1, 3])
def test_sgu_projection_matches_reference(causal, with_positions, num_queries):
    torch.manual_seed(0)
    batch, total, channels, n = 2, 7, 5, 10
    gate = torch.randn(batch, total, channels)
    weight, bias = torch.randn(n, n), torch.randn(n)
    key_mask = positions = None
    if with_positions:
        key_mask = torch.ones(batch, total, dtype=torch.long)
        key_mask[0, :2] = 0  # left padding in sample 0
        positions = (key_mask.cumsum(-1) - 1).clamp(min=0)
    fast = spatial_gating_projection(
        gate, weight, bias, causal=causal, num_queries=num_queries, positions=positions, key_mask=key_mask
    )
    reference = sgu_projection_reference(
        gate, weight, bias, causal=causal, num_queries=num_queries, positions=positions, key_mask=key_mask
    )
    torch.testing.assert_close(fast.double(), reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("total", [7, 13])
def test_causal_blocked_sgu_projection_forward_and_gradients(total, padded, dtype, monkeypatch):
    """The blocked lower-triangular causal projection (blocks of 3 rows: several off-diagonal and partial diagonal
    blocks) equals the loop reference and, for the gradients of gate, W and b, the dense masked product (float64)."""
    monkeypatch.setattr(ops_gmlp, "CAUSAL_BLOCK", 3)
    generator = torch.Generator().manual_seed(1)
    batch, channels, n = 2, 5, 16
    gate = torch.randn(batch, total, channels, generator=generator).to(dtype)
    weight, bias = torch.randn(n, n, generator=generator), torch.randn(n, generator=generator)
    key_mask = None
    if padded:
        key_mask = torch.ones(batch, total, dtype=torch.long)
        key_mask[1, -3:] = 0
    leaves = [t.clone().requires_grad_() for t in (gate, weight, bias)]
    leaves64 = [t.detach().double().requires_grad_() for t in (gate, weight, bias)]
    fast = spatial_gating_projection(*leaves, causal=True, key_mask=key_mask)
    assert fast.dtype == dtype
    loop = sgu_projection_reference(gate, weight, bias, causal=True, key_mask=key_mask)
    dense = sgu_projection_dense_reference(*leaves64, causal=True, key_mask=key_mask)
    torch.testing.assert_close(dense.detach(), loop, rtol=0, atol=1e-10)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-1)
    torch.testing.assert_close(fast.double(), dense.detach(), **tol)
    grad_out = torch.randn(batch, total, channels, generator=generator)
    grads = torch.autograd.grad((fast.float() * grad_out).sum(), leaves)
    grads64 = torch.autograd.grad((dense * grad_out.double()).sum(), leaves64)
    for got, want in zip(grads, grads64):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, **tol)
    assert (grads[1][:total, :total].triu(1) == 0).all()  # the masked upper triangle gets no gradient


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("num_queries", [7, 2])
def test_tiny_attention_matches_reference(causal, padded, num_queries):
    torch.manual_seed(0)
    batch, total, dim = 2, 7, 8
    query = torch.randn(batch, num_queries, dim)
    key, value = torch.randn(batch, total, dim), torch.randn(batch, total, 6)
    key_mask = None
    if padded:
        key_mask = torch.ones(batch, total, dtype=torch.long)
        key_mask[1, :3] = 0
    fast = tiny_attention(query, key, value, causal=causal, key_mask=key_mask)
    reference = tiny_attention_reference(query, key, value, causal=causal, key_mask=key_mask)
    if padded and causal:
        # Padded queries with no real key attend to themselves (guard against empty softmax rows): compare the rest.
        defined = torch.ones(batch, num_queries, dtype=torch.bool)
        defined[1] = key_mask[1, total - num_queries :].bool()
        fast, reference = fast[defined], reference[defined]
    torch.testing.assert_close(fast.double(), reference, rtol=0, atol=1e-5)


def test_tiny_attention_has_no_nan_on_fully_padded_rows():
    query = key = value = torch.randn(1, 4, 8)
    key_mask = torch.tensor([[0, 0, 1, 1]])
    out = tiny_attention(query, key, value, causal=True, key_mask=key_mask)
    assert torch.isfinite(out).all()


def test_block_matches_reference_composition():
    """One aMLP block computed by hand from the paper's pseudocode equals the module."""
    config = TestGMLP().get_config("amlp", GMLPModel)
    set_seed(0)
    model = GMLPModel(config, causal=True).eval()
    block = model.layers[0]
    x = torch.randn(2, 6, config.hidden_size)
    with torch.no_grad():
        got = block(x, causal=True)
        h = torch.nn.functional.layer_norm(x, (config.hidden_size,), block.norm.weight, block.norm.bias, 1e-6)
        q, k, v = block.tiny_attn.qkv(h).chunk(3, dim=-1)
        attn = block.tiny_attn.out(tiny_attention_reference(q, k, v, causal=True).float())
        y = torch.nn.functional.gelu(block.fc1(h))
        u, g = y.chunk(2, dim=-1)
        g = torch.nn.functional.layer_norm(g, g.shape[-1:], block.sgu.norm.weight, block.sgu.norm.bias, 1e-5)
        g = sgu_projection_reference(g, block.sgu.proj.weight, block.sgu.proj.bias, causal=True).float() + attn
        expected = x + block.fc2(u * g)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- gMLP specifics
def test_causal_sgu_ignores_upper_triangle_of_w():
    config = TestGMLP().get_config("gmlp", GMLPForCausalLM)
    model = GMLPForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 10))
    before = model(ids).logits
    with torch.no_grad():
        for layer in model.model.layers:
            layer.sgu.proj.weight.add_(torch.triu(torch.randn_like(layer.sgu.proj.weight), diagonal=1))
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


def test_bidirectional_shorter_input_equals_masked_padding_to_n():
    config = TestGMLP().get_config("amlp", GMLPForMaskedLM)
    model = GMLPForMaskedLM(config).eval()
    ids = torch.randint(3, 64, (1, 9))
    padded = torch.cat([ids, torch.randint(3, 64, (1, MAX_LEN - 9))], dim=1)
    mask = torch.cat([torch.ones(1, 9), torch.zeros(1, MAX_LEN - 9)], dim=1).long()
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids).logits, model(padded, attention_mask=mask).logits[:, :9], atol=1e-5, rtol=0
        )
        # and future tokens do matter in the bidirectional form
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 64
        assert not torch.allclose(model(changed).logits[:, 0], model(ids).logits[:, 0])


def test_init_follows_paper_and_from_pretrained_keeps_weights(tmp_path):
    config = GMLPConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, max_position_embeddings=8
    )
    model = GMLPForCausalLM(config)
    sgu = model.model.layers[0].sgu.proj
    assert sgu.weight.abs().max() < 1e-4  # std 1e-6: near 0
    assert torch.equal(sgu.bias, torch.ones_like(sgu.bias))
    with torch.no_grad():
        sgu.weight.fill_(0.5)
    model.save_pretrained(tmp_path)
    loaded = GMLPForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded.model.layers[0].sgu.proj.weight, sgu.weight)  # not re-initialised on load


def test_cache_decoding_state_grows_linearly():
    """The causal LM caches gate inputs (and aMLP keys/values), one row per past token and layer."""
    config = TestGMLP().get_config("amlp", GMLPForCausalLM)
    model = GMLPForCausalLM(config).eval()
    out = model(torch.randint(3, 64, (2, 5)), use_cache=True)
    states = out.cache.get_states(1)
    assert states["gate"].shape == (2, 5, config.intermediate_size // 2)
    assert states["attn_key"].shape == (2, 5, config.tiny_attn_size)
    out = model(torch.randint(3, 64, (2, 1)), cache=out.cache, use_cache=True)
    assert out.cache.get_states(1)["gate"].shape[1] == 6
    assert out.cache.get_seq_length() == 6


def test_cache_rejected_for_bidirectional_model():
    config = TestGMLP().get_config("gmlp", GMLPForMaskedLM)
    model = GMLPForCausalLM(config).eval()
    cache = model(torch.randint(3, 64, (1, 4)), use_cache=True).cache
    with pytest.raises(ValueError, match="causal"):
        GMLPModel(config, causal=False)(torch.randint(3, 64, (1, 1)), cache=cache)


def test_attention_mask_length_mismatch_is_named():
    config = TestGMLP().get_config("gmlp", GMLPForCausalLM)
    model = GMLPForCausalLM(config).eval()
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 3\\)"):
        model(torch.randint(3, 64, (1, 5)), attention_mask=torch.ones(1, 3))


def test_negative_or_misshapen_position_ids_are_refused():
    """A negative position used to index the SGU's spatial matrix from its end."""
    model = GMLPModel(TestGMLP().get_config("gmlp", GMLPModel)).eval()
    ids = torch.randint(3, 64, (2, 4))
    with pytest.raises(ValueError, match="`position_ids` holds the position -1: positions start at 0"):
        model(ids, position_ids=torch.tensor([[-1, 0, 1, 2]]))
    with pytest.raises(ValueError, match="`position_ids` must have shape \\(2, 4\\) or \\(1, 4\\).*got \\(4,\\)"):
        model(ids, position_ids=torch.arange(4))
    with pytest.raises(ValueError, match="`position_ids` must have shape .*got \\(2, 3\\)"):
        model(ids, position_ids=torch.arange(3).expand(2, 3))


@pytest.mark.parametrize("variant", [{}, {"tiny_attn_size": 8}], ids=["gmlp", "amlp"])
def test_assisted_and_prompt_lookup_decoding_with_left_padding_equal_greedy(variant):
    """Assisted decoding crops the cache with `crop(-rejected)`, and `crop(0)` when every draft token was accepted:
    that must keep the whole state (it used to empty it, and the next step failed on a left-padded prompt)."""
    model, assistant = causal_gmlp(0, 2, **variant), causal_gmlp(5, 1, **variant)
    ids = torch.randint(3, 64, (1, 6), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids, ids, ids[:, :2]], dim=1)  # repeats: lookup matches
    mask = (torch.arange(ids.shape[1]) >= 3).long()[None]  # three left-padding positions
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=mask)
    greedy = model.generate(ids, **common)
    assert greedy.shape[1] == ids.shape[1] + 12
    torch.testing.assert_close(model.generate(ids, assistant_model=assistant, **common), greedy, rtol=0, atol=0)
    torch.testing.assert_close(model.generate(ids, prompt_lookup_num_tokens=3, **common), greedy, rtol=0, atol=0)


def test_cache_crop_follows_transformers_convention():
    """`crop(-n)` drops the last n positions, `crop(0)` keeps all, a positive value is an error (as DynamicLayer)."""
    model = causal_gmlp(0, 1)
    cache = model(torch.randint(3, 64, (1, 6)), use_cache=True).cache
    cache.crop(0)
    assert cache.get_seq_length() == 6 and cache.get_states(0)["gate"].shape[1] == 6
    cache.crop(-2)
    assert cache.get_seq_length() == 4 and cache.get_states(0)["key_mask"].shape[1] == 4
    with pytest.raises(ValueError, match="negative number of tokens"):
        cache.crop(3)


# ---------------------------------------------------------------------- presets
PRESETS = sorted(p.parent.name for p in (REPO / "model_cards").glob("gmlp-*/config.json")) + sorted(
    p.parent.name for p in (REPO / "model_cards").glob("amlp-*/config.json")
)


def test_vision_presets_exist():
    assert {"gmlp-ti16-224", "gmlp-s16-224", "gmlp-b16-224"} <= set(PRESETS)


@pytest.mark.parametrize(
    "preset, width, params_millions",
    [("gmlp-ti16-224", 128, 6), ("gmlp-s16-224", 256, 20), ("gmlp-b16-224", 512, 73)],
)
def test_vision_presets_match_paper_sizes(preset, width, params_millions):
    config = AutoConfig.from_pretrained(REPO / "model_cards" / preset)
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (width, 6 * width, 30)
    assert (config.image_size, config.patch_size, config.max_position_embeddings) == (224, 16, 196)
    with torch.device("meta"):
        model = GMLPForImageClassification(config)
    total = sum(p.numel() for p in model.parameters())
    # The paper's Table 2 reports 6M / 20M / 73M parameters.
    assert abs(total / 1e6 - params_millions) / params_millions < 0.06, total
