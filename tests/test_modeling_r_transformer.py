"""R-Transformer: the generic tester for every head and rnn type, plus reference agreement, the two LocalRNN
computations, eager vs SDPA, output_attentions, cached decoding and presets."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, set_seed

from hf_efficient.models.r_transformer import (
    RTransformerCache,
    RTransformerConfig,
    RTransformerForCausalLM,
    RTransformerForImageClassification,
    RTransformerForSequenceClassification,
    RTransformerForTokenClassification,
    RTransformerModel,
)
from hf_efficient.models.r_transformer.modeling_r_transformer import RTransformerLocalRNN, RTransformerRNNWeights
from hf_efficient.models.r_transformer.ops_r_transformer import local_rnn, official_layer_norm
from tests import helpers
from tests.model_tester import AttentionTests, GenericModelTests
from tests.references.r_transformer_reference import (
    layer_norm_reference,
    local_rnn_reference,
    make_cell,
    model_reference,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_config(**overrides) -> RTransformerConfig:
    return helpers.tiny_config("r_transformer", **overrides)


class TestRTransformer(AttentionTests, GenericModelTests):
    model_type = "r_transformer"
    all_heads = [
        RTransformerModel,
        RTransformerForCausalLM,
        RTransformerForSequenceClassification,
        RTransformerForTokenClassification,
        RTransformerForImageClassification,
    ]
    variants = {
        "gru": {"rnn_type": "gru", "local_window": 3, "num_rnn_layers": 2},
        "lstm": {"rnn_type": "lstm", "local_window": 4, "official_layer_norm": False},
        "rnn": {"rnn_type": "rnn", "local_window": 2},
        "no_local_rnn": {"num_rnn_layers": 0},  # the studies' ablation without LocalRNN
    }
    max_seq_length = None
    seq_length = 10
    invalid_configs = [
        ({"rnn_type": "transformer"}, "rnn_type"),
        ({"local_window": 0}, "local_window"),
        ({"num_rnn_layers": -1}, "num_rnn_layers"),
        ({"num_rnn_layers": 1.5}, "num_rnn_layers"),
        ({"num_rnn_layers": True}, "num_rnn_layers"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"hidden_size": -2}, "hidden_size"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
        ({"layer_norm_eps": 0.0}, "layer_norm_eps"),
        ({"local_rnn_implementation": "cudnn"}, "local_rnn_implementation"),
        ({"local_rnn_segment_length": 0}, "local_rnn_segment_length"),
        ({"image_size": 0}, "image_size"),
        ({"vocab_size": 0}, "vocab_size"),
    ]

    def get_config(self, variant, head):
        overrides = dict(self.variants[variant])
        if head is RTransformerForImageClassification:
            overrides.update(vocab_size=None, image_size=4, num_channels=3)
        return tiny_config(**overrides)


# ---------------------------------------------------------------------- reference agreement
@pytest.mark.parametrize("implementation", ["projected", "unfold"])
@pytest.mark.parametrize("window", [1, 2, 5])
@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_local_rnn_matches_cell_loop_reference(rnn_type, window, implementation):
    """Both computations of LocalRNN equal a GRUCell/LSTMCell/RNNCell run per position over its zero-padded window."""
    torch.manual_seed(0)
    config = tiny_config(rnn_type=rnn_type, local_window=window, local_rnn_implementation=implementation)
    module = RTransformerLocalRNN(config)
    x = torch.randn(2, 9, config.hidden_size)
    fast = module(torch.cat([torch.zeros(2, window - 1, config.hidden_size), x], dim=1))
    reference = local_rnn_reference(x, make_cell(module.rnn, rnn_type), rnn_type, window)
    torch.testing.assert_close(fast, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_local_rnn_op_with_cached_context_equals_longer_sequence(rnn_type):
    """The op's left context is exactly the previous inputs: outputs for the last L positions of a sequence equal
    the op on (its M - 1 previous inputs, the L positions)."""
    torch.manual_seed(1)
    window, dim = 4, 8
    rnn = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}[rnn_type](dim, dim, batch_first=True)
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    x = torch.cat([torch.zeros(1, window - 1, dim), torch.randn(1, 10, dim)], dim=1)
    full = local_rnn(x, *weights, rnn_type=rnn_type, window=window)
    tail = local_rnn(x[:, -(window - 1 + 3) :], *weights, rnn_type=rnn_type, window=window)
    torch.testing.assert_close(tail, full[:, -3:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="rnn_type"):
        local_rnn(x, *weights, rnn_type="gru2", window=window)


PADDINGS = {
    "none": None,
    "left": [[0, 0, 0, 1, 1, 1, 1, 1, 1], [1] * 9],
    "right": [[1] * 9, [1, 1, 1, 1, 1, 0, 0, 0, 0]],
    "middle": [[1, 1, 0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1, 1, 1, 0]],
}


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", sorted(PADDINGS))
@pytest.mark.parametrize(
    "rnn_type,window,official", [("gru", 3, True), ("lstm", 2, False), ("rnn", 4, True), ("gru", 1, False)]
)
def test_model_matches_reference(rnn_type, window, official, padding, attn_implementation):
    """The whole base model equals the reference built from cells and dense attention, padding included (padded
    positions: zero LocalRNN inputs and masked keys)."""
    config = tiny_config(rnn_type=rnn_type, local_window=window, num_rnn_layers=2, official_layer_norm=official)
    config._attn_implementation = attn_implementation
    set_seed(0)
    model = RTransformerModel(config).eval()
    ids = torch.randint(3, 64, (2, 9))
    mask = None if PADDINGS[padding] is None else torch.tensor(PADDINGS[padding])
    with torch.no_grad():
        fast = model(ids, attention_mask=mask).last_hidden_state
        reference = model_reference(model, model.embed_tokens(ids), mask)
    real = torch.ones(2, 9, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(fast[real], reference[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_without_local_rnn_is_the_model_minus_its_local_rnns(padding):
    """`num_rnn_layers=0` (the ablation): no LocalRNN parameters; the blocks equal the reference with no LocalRNN
    sublayer, and the full model with the same other weights and its LocalRNN sublayers removed; the full model
    (with its LocalRNNs) gives different outputs."""
    set_seed(0)
    ablated = RTransformerModel(tiny_config(num_rnn_layers=0)).eval()
    full = RTransformerModel(tiny_config(num_rnn_layers=1)).eval()
    assert not any("rnn" in name for name, _ in ablated.named_parameters())
    missing, unexpected = full.load_state_dict(ablated.state_dict(), strict=False)
    assert missing and all(".rnn_layers." in name for name in missing) and not unexpected
    ids = torch.randint(3, 64, (2, 9))
    mask = None if PADDINGS[padding] is None else torch.tensor(PADDINGS[padding])
    real = torch.ones(2, 9, dtype=torch.bool) if mask is None else mask.bool()
    with torch.no_grad():
        got = ablated(ids, attention_mask=mask).last_hidden_state
        with_rnn = full(ids, attention_mask=mask).last_hidden_state
        reference = model_reference(ablated, ablated.embed_tokens(ids), mask)
        for block in full.layers:
            block.rnn_layers = torch.nn.ModuleList()
        without_rnn = full(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[real], reference[real], rtol=0, atol=1e-5)
    torch.testing.assert_close(got, without_rnn, rtol=0, atol=0)
    assert (got[real] - with_rnn[real]).abs().max() > 1e-2


@pytest.mark.parametrize("official", [True, False])
def test_layer_norms_match_reference(official):
    x = torch.randn(3, 5, 32) * 4 + 1
    weight, bias = torch.randn(32), torch.randn(32)
    model_norm = tiny_config(official_layer_norm=official, layer_norm_eps=1e-3)
    from hf_efficient.models.r_transformer.modeling_r_transformer import RTransformerLayerNorm

    norm = RTransformerLayerNorm(model_norm)
    with torch.no_grad():
        norm.weight.copy_(weight)
        norm.bias.copy_(bias)
        got = norm(x)
    torch.testing.assert_close(got, layer_norm_reference(x, weight, bias, 1e-3, official), rtol=0, atol=1e-5)
    if official:  # the official form is not the standard one (unbiased std, eps on the std)
        standard = torch.nn.functional.layer_norm(x, (32,), weight, bias, 1e-3)
        assert (got - standard).abs().max() > 1e-3
        torch.testing.assert_close(official_layer_norm(x, weight, bias, 1e-3), got)


# ---------------------------------------------------------------------- the two LocalRNN computations
@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_projected_and_unfold_agree_in_outputs_and_gradients(rnn_type):
    grads, outs = [], []
    ids = torch.randint(3, 64, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[0, :3] = 0
    for implementation in ("projected", "unfold"):
        set_seed(0)
        model = RTransformerForCausalLM(tiny_config(rnn_type=rnn_type, local_rnn_implementation=implementation))
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        outs.append(out.logits.detach())
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_implementation_is_projected_on_cpu(monkeypatch):
    config = tiny_config()
    module = RTransformerLocalRNN(config)
    calls = []
    monkeypatch.setattr(module.rnn, "forward", lambda *a, **k: calls.append(1))
    module(torch.randn(1, 2 + 5, config.hidden_size))
    assert calls == []  # the projected path never calls the fused nn.GRU


def test_weights_have_the_standard_rnn_layout():
    """The LocalRNN's weights are those of a one-layer batch-first nn.GRU / LSTM / RNN (names, shapes, init), held in a
    plain module (dynamo does not wrap nn.RNNBase), and calling it is that module's fused forward."""
    for rnn_type, module, gates in (("gru", torch.nn.GRU, 3), ("lstm", torch.nn.LSTM, 4), ("rnn", torch.nn.RNN, 1)):
        model = RTransformerModel(tiny_config(rnn_type=rnn_type))
        rnn = model.layers[0].rnn_layers[0].local_rnn.rnn
        assert isinstance(rnn, RTransformerRNNWeights) and not isinstance(rnn, torch.nn.RNNBase)
        fused = module(32, 32, batch_first=True)
        fused.load_state_dict(rnn.state_dict())  # same names and shapes
        windows = torch.randn(6, 5, 32, requires_grad=True)
        out, state = rnn(windows)
        expected, expected_state = fused(windows)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(state, expected_state, rtol=0, atol=0)
        out.sum().backward()
        assert rnn.weight_hh_l0.grad is not None and rnn.weight_hh_l0.grad.abs().sum() > 0
        names = {n for n in model.state_dict() if "local_rnn" in n and n.startswith("layers.0.rnn_layers.0")}
        assert names == {
            f"layers.0.rnn_layers.0.local_rnn.rnn.{p}"
            for p in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")
        }
        assert rnn.weight_ih_l0.shape == (gates * 32, 32)
        bound = 32**-0.5
        assert rnn.weight_hh_l0.abs().max() <= bound and rnn.weight_hh_l0.std() > bound / 4  # PyTorch's RNN init


# ---------------------------------------------------------------------- attention: eager vs SDPA, probabilities
@pytest.mark.parametrize("padded", [False, True])
def test_eager_and_sdpa_agree(padded):
    ids = torch.randint(3, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[0, :4] = 0
    outs = []
    for implementation in ("eager", "sdpa"):
        set_seed(0)
        model = RTransformerForCausalLM.from_pretrained(
            _saved(tiny_config()), attn_implementation=implementation
        ).eval()
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            outs.append(model(ids, attention_mask=mask).logits)
    real = mask.bool()
    torch.testing.assert_close(outs[0][real], outs[1][real], rtol=0, atol=1e-5)


_SAVED = {}


def _saved(config):
    """A saved tiny CausalLM folder (once per session), for loading with a chosen attn_implementation."""
    import tempfile

    if "folder" not in _SAVED:
        set_seed(0)
        folder = tempfile.mkdtemp(prefix="rt-")
        RTransformerForCausalLM(config).save_pretrained(folder)
        _SAVED["folder"] = folder
    return _SAVED["folder"]


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_output_attentions(attn_implementation):
    """Probabilities per block `(B, h, L, L)`: causal, padded keys get 0, rows sum to 1; with SDPA the call falls back
    to the eager path for the probabilities and gives the same logits."""
    set_seed(0)
    model = RTransformerForSequenceClassification(tiny_config()).eval()
    model.config._attn_implementation = attn_implementation
    ids = torch.randint(3, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_attentions=True)
        plain = model(ids, attention_mask=mask)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=1e-5)
    assert len(out.attentions) == 2
    for probs in out.attentions:
        assert probs.shape == (2, 2, 8, 8)
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 8))
        assert torch.equal(probs.triu(1), torch.zeros_like(probs))
        assert torch.all(probs[1, :, 3:, :3] == 0)


# ---------------------------------------------------------------------- decoding
@pytest.mark.parametrize("rnn_type,window", [("gru", 4), ("lstm", 4), ("rnn", 1)])
def test_chunked_prefill_and_steps_equal_full_forward(rnn_type, window):
    """Prefill a padded prefix, then a chunk of 3, then single tokens: every chunk's logits equal the full forward."""
    set_seed(0)
    model = RTransformerForCausalLM(tiny_config(rnn_type=rnn_type, local_window=window, num_rnn_layers=2)).eval()
    ids = torch.randint(3, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask, use_cache=False).logits
        cache = None
        for start, end in ((0, 5), (5, 8), (8, 9), (9, 10), (10, 12)):
            out = model(ids[:, start:end], attention_mask=mask[:, :end], cache=cache, use_cache=True)
            cache = out.cache
            real = mask[:, start:end].bool()
            torch.testing.assert_close(out.logits[real], full[:, start:end][real], rtol=0, atol=1e-5)
    assert isinstance(cache, RTransformerCache) and cache.get_seq_length() == 12
    states = cache.get_states(0)
    assert states["rnn_inputs_0"].shape == (2, window - 1, 32) and states["key"].shape == (2, 2, 12, 16)
    # Continuing without an attention mask reuses the stored one (sample 0's padding stays masked).
    with torch.no_grad():
        step = model(ids[:, :1], cache=cache).logits
        reference = model(
            torch.cat([ids, ids[:, :1]], 1), attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        ).logits[:, -1:]
    torch.testing.assert_close(step, reference, rtol=0, atol=1e-5)


def test_filled_foreign_cache_is_refused():
    from transformers import DynamicCache

    model = RTransformerForCausalLM(tiny_config()).eval()
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="RTransformerCache"):
        model(torch.randint(3, 64, (1, 2)), cache=cache)


def test_cache_of_another_batch_size_is_refused():
    model = RTransformerForCausalLM(tiny_config()).eval()
    with torch.no_grad():
        cache = model(torch.randint(3, 64, (1, 4)), use_cache=True).cache
        with pytest.raises(ValueError, match="batch of 1.*batch of\\s+2"):
            model(torch.randint(3, 64, (2, 1)), cache=cache)


def test_attention_mask_of_another_batch_size_is_refused():
    """A `(1, L)` mask with a batch of 2 used to apply row 0's padding to both rows silently."""
    model = RTransformerForCausalLM(tiny_config()).eval()
    mask = torch.ones(1, 6, dtype=torch.long)
    mask[0, :2] = 0
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 6\\), expected \\(2, 6\\)"):
        model(torch.randint(3, 64, (2, 6)), attention_mask=mask)
    with pytest.raises(ValueError, match="attention_mask has shape \\(3, 6\\), expected \\(2, 6\\)"):
        model.model(torch.randint(3, 64, (2, 6)), attention_mask=torch.ones(3, 6))


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_output_flags_default_to_the_config(flag):
    """As in transformers: a forward argument left None takes `config.output_hidden_states` / `output_attentions`."""
    set_seed(0)
    model = RTransformerForCausalLM(tiny_config(**{flag: True})).eval()
    field = flag.removeprefix("output_")
    with torch.no_grad():
        out = model(torch.randint(3, 64, (2, 5)))
        assert getattr(out, field) is not None and len(getattr(out, field)) >= model.config.num_hidden_layers
        assert getattr(model(torch.randint(3, 64, (2, 5)), **{flag: False}), field) is None
        assert getattr(model.model(torch.randint(3, 64, (2, 5))), field) is not None


# ---------------------------------------------------------------------- pixel sequences
def test_image_head_reads_row_major_pixel_sequence_and_last_position():
    set_seed(0)
    config = tiny_config(vocab_size=None, image_size=3, num_channels=2)
    model = RTransformerForImageClassification(config).eval()
    pixels = torch.randn(2, 2, 3, 3)
    sequence = torch.stack([pixels[:, :, r, c] for r in range(3) for c in range(3)], dim=1)  # (B, 9, C) row-major
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        hidden = model.model(inputs_embeds=model.model.patch_embed.proj(sequence)).last_hidden_state
        expected = model.classifier(hidden[:, -1])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="input_ids"):
        model.model(input_ids=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="image_size"):
        RTransformerForImageClassification(tiny_config())


def test_causal_lm_needs_a_vocabulary_and_wrong_mask_length_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        RTransformerForCausalLM(tiny_config(vocab_size=None, image_size=4))
    model = RTransformerModel(tiny_config())
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.ones(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5, dtype=torch.long))


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_float32(dtype):
    set_seed(0)
    model = RTransformerForCausalLM(tiny_config(num_rnn_layers=2)).eval()
    helpers.assert_half_precision_close(model, torch.randint(3, 64, (2, 12)), dtype, atol=0.1)


# ---------------------------------------------------------------------- presets
PRESETS = {
    "r-transformer-pixel-mnist": (
        RTransformerForImageClassification,
        dict(hidden_size=32, num_attention_heads=2, local_window=7, num_hidden_layers=8, num_rnn_layers=2),
        "gru",
    ),
    "r-transformer-ptb-char": (
        RTransformerForCausalLM,
        dict(hidden_size=512, num_attention_heads=8, local_window=7, num_hidden_layers=3, num_rnn_layers=1),
        "gru",
    ),
    "r-transformer-ptb-word": (
        RTransformerForCausalLM,
        dict(hidden_size=128, num_attention_heads=8, local_window=9, num_hidden_layers=3, num_rnn_layers=1),
        "lstm",
    ),
    "r-transformer-nottingham": (
        RTransformerModel,
        dict(hidden_size=160, num_attention_heads=4, local_window=6, num_hidden_layers=3, num_rnn_layers=1),
        "gru",
    ),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_load_with_the_papers_sizes(preset):
    folder = REPO / "model_cards" / preset
    config = AutoConfig.from_pretrained(folder)
    head, expected, rnn_type = PRESETS[preset]
    assert isinstance(config, RTransformerConfig) and config.rnn_type == rnn_type
    assert {key: getattr(config, key) for key in expected} == expected
    card = json.loads((folder / "card.json").read_text())
    assert card["head"] == head.__name__ and card["published"]
    assert "arXiv:1907.05572" in (folder / "README.md").read_text()
    with torch.device("meta"):
        model = head(config)
    assert type(model) is head
