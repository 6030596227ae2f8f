"""torch.export and torch.compile of gMLP, AFT and Combiner (issue 14).

A forward must not branch in Python on tensor values (`bool(mask.all())`, `int(positions.max())`): such reads are
skipped while compiling / exporting, and the graph keeps the general (masked) path. Every exported program is
compared with the eager model on a left-padded batch and on a batch without padding.
"""

from functools import partial

import pytest
import torch
import torch._dynamo

from hf_efficient.models.aft import AFTForCausalLM, AFTForSequenceClassification, ops_aft
from hf_efficient.models.combiner import CombinerForCausalLM, CombinerForSequenceClassification
from hf_efficient.models.combiner.decoding_combiner import combiner_static_state
from hf_efficient.models.combiner.ops_combiner import COMBINER_TYPES
from hf_efficient.models.gmlp import GMLPForCausalLM, GMLPForSequenceClassification
from hf_efficient.models.ngram_transformer import NgramTransformerForCausalLM
from hf_efficient.models.ngram_transformer.modeling_ngram_transformer import NgramTransformerCache
from hf_efficient.models.r_transformer import RTransformerForCausalLM
from tests.helpers import SMALL, assert_same_step, loss_and_grads, sized_config, tiny_config

MAX_LEN = 64
EXPORT = dict(SMALL, max_position_embeddings=MAX_LEN)
gmlp_config = partial(tiny_config, "gmlp", EXPORT)
aft_config = partial(tiny_config, "aft", EXPORT)
combiner_config = partial(tiny_config, "combiner", EXPORT)
GMLP = (GMLPForCausalLM, GMLPForSequenceClassification)
AFT = (AFTForCausalLM, AFTForSequenceClassification)
COMBINER = (CombinerForCausalLM, CombinerForSequenceClassification)


def _variant(factory, heads, dynamic, **settings):
    return partial(factory, **settings), *heads, dynamic


# name -> (config factory with overrides, causal LM head, classifier head, dynamic lengths)
# Dynamic lengths: (multiple, smallest count, traced count): the sequence length is `multiple * n`. The blocked ops
# lay positions out in blocks (AFT's prefix-scan chunks of 16 and window blocks, Combiner's segments), so a dynamic
# length is a whole number of blocks, at least two. AFT-full takes any length (its scanned query tiles are single
# rows unless the length is a known multiple of 16, see `test_export_aft_full_dynamic_length_...`). None: the op's Python loop
# count follows the length, so the length is static (one export per length). Combiner-logsparse exports with its
# level count fixed by max_position_embeddings (any length, no block multiple).
VARIANTS = {
    "gmlp": _variant(gmlp_config, GMLP, (1, 2, 12)),
    "amlp": _variant(gmlp_config, GMLP, (1, 2, 12), tiny_attn_size=8),
    "aft-full": _variant(aft_config, AFT, (1, 2, 21), aft_type="full"),
    "aft-full-matrix": _variant(aft_config, AFT, (1, 2, 21), aft_type="full", position_bias_dim=None),
    "aft-local": _variant(aft_config, AFT, (16, 2, 2), aft_type="local"),
    "aft-simple": _variant(aft_config, AFT, (16, 2, 2), aft_type="simple"),
    "aft-conv": _variant(aft_config, AFT, (16, 2, 2), aft_type="conv"),
    "combiner-fixed": _variant(combiner_config, COMBINER, (4, 2, 3), combiner_type="fixed"),
    "combiner-logsparse": _variant(combiner_config, COMBINER, (1, 2, 12), combiner_type="logsparse"),
    "combiner-axial": _variant(combiner_config, COMBINER, (4, 2, 3), combiner_type="axial"),
    "combiner-mixture": _variant(combiner_config, COMBINER, (4, 3, 4), combiner_type="mixture"),
}
DYNAMIC = [name for name, spec in VARIANTS.items() if spec[3] is not None]


def make_model(variant, kind, seed=0):
    factory, lm_head, cls_head, _ = VARIANTS[variant]
    causal = kind == "causal_lm"
    config = factory(causal=causal)
    config.problem_type = "single_label_classification"
    torch.manual_seed(seed)
    model = (lm_head if causal else cls_head)(config).eval()
    for module in model.modules():  # AFT-conv starts as AFT-simple (gamma = beta = 0): give it a real kernel
        if hasattr(module, "conv_gamma"):
            with torch.no_grad():
                module.conv_gamma.fill_(0.7)
                module.conv_beta.normal_()
    return model


def make_inputs(kind, length, seed=1, left_pad=3):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 64, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :left_pad] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "causal_lm":
        inputs["use_cache"] = False
    return inputs


def export(model, inputs, dynamic=None):
    shapes = None
    if dynamic is not None:
        shapes = {name: ({1: dynamic} if name != "use_cache" else None) for name in inputs}
    # A trace cached by an earlier export (a `torch.cond` branch of the same code, e.g. AFT's exact fallback) is
    # checked against this one's symbolic sizes and can leave a spurious guard on them: start from a clean cache.
    torch._dynamo.reset()
    return torch.export.export(model, (), dict(inputs), dynamic_shapes=shapes)


def assert_same_logits(program, model, inputs):
    with torch.no_grad():
        expected = model(**inputs).logits
        got = program.module()(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_export_static_length_equals_eager(variant, kind):
    model = make_model(variant, kind)
    inputs = make_inputs(kind, 12)
    program = export(model, inputs)
    assert_same_logits(program, model, inputs)  # left padding
    unpadded = make_inputs(kind, 12, seed=2, left_pad=0)
    assert_same_logits(program, model, unpadded)  # an all-ones mask runs the same graph


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
@pytest.mark.parametrize("variant", DYNAMIC)
def test_export_dynamic_length_equals_eager(variant, kind):
    multiple, smallest, traced = VARIANTS[variant][3]
    model = make_model(variant, kind)
    count = torch.export.Dim("blocks", min=smallest, max=MAX_LEN // multiple)
    program = export(model, make_inputs(kind, multiple * traced), dynamic=multiple * count if multiple > 1 else count)
    for n in sorted({smallest, MAX_LEN // multiple} - {traced}):
        assert_same_logits(program, model, make_inputs(kind, multiple * n, seed=n, left_pad=min(5, multiple * n - 1)))


def _large_key_model(aft_type, kind):
    """An AFT whose keys span a range far beyond exp's: the certified fast path must fall back to exact sums."""
    model = make_model(f"aft-{aft_type}", kind)
    with torch.no_grad():
        layer = model.model.layers[0].aft
        layer.k_proj.weight.mul_(400.0)
    return model


def _fallback_entries(monkeypatch):
    """A list that grows by the number of entries each call of AFT's exact fallback recomputes (forward)."""
    calls = []
    original = ops_aft._exact_entries
    monkeypatch.setattr(ops_aft, "_exact_entries", lambda *a, **k: calls.append(len(a[3])) or original(*a, **k))
    return calls


@pytest.mark.parametrize("aft_type", ["full", "simple", "local"])
def test_export_keeps_aft_exact_fallback(aft_type, monkeypatch):
    """The fallback is a `torch.cond` branch in the graph (not a Python `if` on data): an exported AFT matches eager
    on inputs where the fast path's certificate fails."""
    model = _large_key_model(aft_type, "causal_lm")
    inputs = make_inputs("causal_lm", 32)
    calls = _fallback_entries(monkeypatch)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert calls, "these inputs must exercise the exact fallback"
    monkeypatch.undo()  # export traces the original fallback
    program = export(model, inputs)
    assert any("cond" in str(node.target) for node in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(expected).all()


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
def test_export_aft_full_dynamic_length_padded_unpadded_and_fallback(kind, monkeypatch):
    """AFT-full exported once with a dynamic length (its query tiles are a `scan`, no loop that follows the length)
    equals eager at other lengths, on a left-padded batch, a batch without padding, and inputs that take the exact
    fallback (a `torch.cond` branch)."""
    count = torch.export.Dim("blocks", min=2, max=MAX_LEN // 16)
    for model in (make_model("aft-full", kind), _large_key_model("full", kind)):
        program = export(model, make_inputs(kind, 32), dynamic=16 * count)
        targets = [str(node.target) for node in program.graph.nodes]
        assert any("scan" in t for t in targets) and any("cond" in t for t in targets)
        for length in (48, 64):
            for left_pad in (0, 5):
                assert_same_logits(program, model, make_inputs(kind, length, seed=length, left_pad=left_pad))
    calls = _fallback_entries(monkeypatch)
    with torch.no_grad():
        model(**make_inputs(kind, 48, seed=48, left_pad=5))
    assert calls or kind == "classifier", "the large-key causal model must exercise the exact fallback"


# ---------------------------------------------------------------------- torch.compile of a training step
def _graph_breaks(model, inputs, labels):
    model.train()

    def step(ids, mask, labels):
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(inputs["input_ids"], inputs["attention_mask"], labels)
    return explanation.graph_break_count, [reason.reason.split("\n")[0] for reason in explanation.break_reasons]


def _labels(kind, inputs):
    return inputs["input_ids"] if kind == "causal_lm" else torch.tensor([0, 2])


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
@pytest.mark.parametrize(
    "variant", ["gmlp", "amlp", "combiner-fixed", "combiner-logsparse", "combiner-axial", "combiner-mixture"]
)
def test_compiled_training_step_has_no_graph_break(variant, kind):
    model = make_model(variant, kind)
    inputs = make_inputs(kind, 16)
    count, reasons = _graph_breaks(model, inputs, _labels(kind, inputs))
    assert count == 0, reasons


AFT_COMPILED = [(t, k) for t in ("full", "simple", "local", "conv") for k in ("causal_lm", "classifier")]


@pytest.mark.parametrize("aft_type, kind", AFT_COMPILED)
def test_compiled_aft_training_step_has_no_graph_break_by_default(aft_type, kind):
    """Default dynamo settings (`capture_dynamic_output_shape_ops` off): AFT's exact fallback is the custom op
    `ops_aft._exact_fix` (its eager `nonzero` stays inside the op), so the ops break no graph."""
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    model = make_model(f"aft-{aft_type}", kind)
    inputs = make_inputs(kind, 32)
    count, reasons = _graph_breaks(model, inputs, _labels(kind, inputs))
    assert count == 0, reasons


@pytest.mark.parametrize("aft_type, kind", AFT_COMPILED)
def test_compiled_aft_training_step_fullgraph_equals_eager_through_the_fallback(aft_type, kind, monkeypatch):
    """`torch.compile(step, fullgraph=True)` of a training step under default settings: same loss and gradients as
    eager on inputs with keys far beyond exp's range; the causal models take the exact fallback, forward and backward
    (the custom op's backward `_exact_grads`)."""
    assert not torch._dynamo.config.capture_dynamic_output_shape_ops
    model = _large_key_model(aft_type, kind).train()
    inputs = make_inputs(kind, 32)
    labels = _labels(kind, inputs)

    def step():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels).loss

    torch._dynamo.reset()
    eager = loss_and_grads(model, step)
    backward_entries = []
    original = ops_aft._exact_grads
    monkeypatch.setattr(
        ops_aft, "_exact_grads", lambda s, idx, *a: backward_entries.append(len(idx)) or original(s, idx, *a)
    )
    forward_entries = _fallback_entries(monkeypatch)
    compiled = loss_and_grads(model, torch.compile(step, backend="aot_eager", fullgraph=True))
    if kind == "causal_lm":
        assert forward_entries and backward_entries, "these inputs must take the exact fallback"
    assert_same_step(compiled, eager)


@pytest.mark.parametrize(
    "aft_type, kind", [("full", "causal_lm"), ("simple", "classifier"), ("local", "causal_lm"), ("conv", "classifier")]
)
def test_compiled_aft_training_step_has_no_graph_break(aft_type, kind):
    """With `torch._dynamo.config.capture_dynamic_output_shape_ops = True` as well (where the fallback used to be a
    `torch.cond` branch; now the same custom op as by default) the training step has no graph break."""
    # torch's own config patching (not `monkeypatch.setattr`, whose undo can `delattr` a config entry and hide it
    # from later tests in the same worker process)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        model = make_model(f"aft-{aft_type}", kind)
        inputs = make_inputs(kind, 32)
        count, reasons = _graph_breaks(model, inputs, _labels(kind, inputs))
    assert count == 0, reasons


@pytest.mark.parametrize("aft_type", ["simple"])
@torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)
def test_compiled_aft_step_gradients_equal_eager(aft_type):
    """With `capture_dynamic_output_shape_ops = True` the fallback is differentiated like the eager `if`: same loss and
    gradients, on inputs that take the fallback."""
    assert torch._dynamo.config.capture_dynamic_output_shape_ops
    model = _large_key_model(aft_type, "causal_lm").train()
    inputs = make_inputs("causal_lm", 32)

    def step():
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["input_ids"]
        ).loss

    torch._dynamo.reset()
    eager = loss_and_grads(model, step)
    assert_same_step(loss_and_grads(model, torch.compile(step, backend="aot_eager", fullgraph=True)), eager)


# ---------------------------------------------------------------------- torch.export of a decoding step
# A causal model's cache is rebuilt around plain tensors inside the exported function, so the program takes and
# returns the decoding state as tensors: `(input_ids (B, 1), attention_mask (B, P + 1), states) -> (logits, *new
# states)`, the mask over the past and the new token as in `generate()`. The mask's length also gives the number P of
# tokens the states hold (the cache's Python-int `get_seq_length()`, which positions and mask widths read): with a
# dynamic `Dim` on it one program decodes at every past length.
# Combiner's static buffers (and Logsparse's levels) follow max_position_embeddings: keep it small.
DECODE_MAX_LEN = 15
PROMPT = 7  # no other state dim is 7, so the dims of a growing state (one entry per past token) are found by size
DECODE_STEPS = 8  # up to DECODE_MAX_LEN tokens
DECODE_CONFIG = dict(num_attention_heads=2, max_position_embeddings=DECODE_MAX_LEN, num_labels=3)


class StateDecodeStep(torch.nn.Module):
    """One decoding step of a causal model whose cache is a `StateCache` subclass `cache_class` (named per-layer state
    tensors); `layout[i] = (layer, name)` of `states[i]`."""

    def __init__(self, model, layout, cache_class):
        super().__init__()
        self.model, self.layout, self.cache_class = model, layout, cache_class

    def forward(self, input_ids, attention_mask, states):
        cache = self.cache_class(self.model.config)
        for (layer, name), tensor in zip(self.layout, states):
            cache.update_states(layer, 0, **{name: tensor})
        for layer in cache.layers:
            layer.num_seen_tokens = attention_mask.shape[1] - input_ids.shape[1]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits
        return (logits, *(cache.get_states(layer)[name] for layer, name in self.layout))

    @staticmethod
    def flatten(cache):
        layout = [(i, name) for i, layer in enumerate(cache.layers) for name in layer.states]
        return layout, [cache.get_states(i)[name] for i, name in layout]


class NgramDecodeStep(torch.nn.Module):
    """One decoding step of the decoder-only N-gram transformer: its cache is the rolling window of the last N - 1
    keys / values per layer, `states = (*keys, *values)`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, states):
        cache = NgramTransformerCache(self.model.config)
        half = len(cache.layers)
        for layer, keys, values in zip(cache.layers, states[:half], states[half:]):
            layer.lazy_initialization(keys, values)
            layer.keys, layer.values = keys, values
            layer.cumulative_length = attention_mask.shape[1] - input_ids.shape[1]
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=True).logits
        return (logits, *(layer.keys for layer in cache.layers), *(layer.values for layer in cache.layers))

    @staticmethod
    def flatten(cache):
        return None, [layer.keys for layer in cache.layers] + [layer.values for layer in cache.layers]


def _variant_decoder(name):
    factory, lm_head, _, _ = VARIANTS[name]
    return lambda: lm_head(factory(causal=True, max_position_embeddings=DECODE_MAX_LEN))


def _r_transformer_decoder(rnn_type):
    settings = dict(local_window=3, num_rnn_layers=1, rnn_type=rnn_type)
    return RTransformerForCausalLM(sized_config("r_transformer", SMALL, DECODE_CONFIG, settings))


def _ngram_decoder():
    settings = dict(num_hidden_layers=2, ngram_size=3, is_encoder_decoder=False)
    return NgramTransformerForCausalLM(sized_config("ngram_transformer", SMALL, DECODE_CONFIG, settings))


# name -> (model factory, state kind): "static" fixed shapes at any past length (Combiner's buffers are held at
# their capacity for max_position_embeddings tokens, `combiner_static_state`; AFT-simple/local/conv's running sums
# and window; N-gram's rolling window), "growing" one entry per past token (AFT-full's keys, gMLP's gate inputs,
# aMLP's and R-Transformer's keys / values: a dynamic dim, the same `Dim` as the past length). The first ones are
# the causal LMs of `VARIANTS` at DECODE_MAX_LEN positions.
DECODERS = {
    **{f"combiner-{kind}": (_variant_decoder(f"combiner-{kind}"), "static") for kind in COMBINER_TYPES},
    **{f"aft-{kind}": (_variant_decoder(f"aft-{kind}"), "static") for kind in ("simple", "local", "conv")},
    **{name: (_variant_decoder(name), "growing") for name in ("aft-full", "aft-full-matrix", "gmlp", "amlp")},
    "r-transformer-gru": (lambda: _r_transformer_decoder("gru"), "growing"),
    "r-transformer-lstm": (lambda: _r_transformer_decoder("lstm"), "growing"),
    "ngram": (_ngram_decoder, "static"),
}


def _decoder(name):
    factory, kind = DECODERS[name]
    torch.manual_seed(0)
    model = factory().eval()
    for module in model.modules():  # AFT-conv: a real kernel (see make_model)
        if hasattr(module, "conv_gamma"):
            with torch.no_grad():
                module.conv_gamma.fill_(0.7)
                module.conv_beta.normal_()
    return model, kind


@pytest.mark.parametrize("name", list(DECODERS))
def test_exported_decode_step_equals_eager_decoding(name):
    """One decoding step with a filled cache, exported once (the past length a dynamic `Dim`), then run for
    DECODE_STEPS steps from a left-padded prompt feeding back its own states: the logits and states equal eager
    decoding (the same wrapper run eagerly) at every step, and the logits equal a full forward over the whole
    sequence. Combiner's steps cross segment / row / dyadic-block
    boundaries at different steps for the two samples (their lengths differ), taking the `torch.cond` branch that
    summarises a completed span for one sample only."""
    model, kind = _decoder(name)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 64, (2, PROMPT + DECODE_STEPS), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        cache = model(input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], use_cache=True).cache
    step = NgramDecodeStep(model) if name == "ngram" else None
    layout, states = (NgramDecodeStep if step else StateDecodeStep).flatten(cache)
    if name.startswith("combiner"):
        attn = model.model.layers[0].attn
        padded = [
            combiner_static_state(
                cache.get_states(i), combiner_type=attn.combiner_type, block_size=attn.block_size,
                max_length=DECODE_MAX_LEN,
            )
            for i in range(len(cache.layers))
        ]  # fmt: skip
        layout = [(i, key) for i, layer_state in enumerate(padded) for key in layer_state]
        states = [padded[i][key] for i, key in layout]
    step = step or StateDecodeStep(model, layout, type(cache))
    past = torch.export.Dim("past", min=2, max=DECODE_MAX_LEN - 1)
    growing = [{d: past for d in range(1, t.ndim) if t.shape[d] == PROMPT} or None for t in states]
    assert (kind == "growing") == any(growing), "a growing state has a dim of the past length, a static one none"
    torch._dynamo.reset()
    exported = torch.export.export(
        step,
        (ids[:, PROMPT : PROMPT + 1], mask[:, : PROMPT + 1].clone(), tuple(states)),  # a fresh mask (a slice's
        # row stride would be the full length: a guard on it)
        dynamic_shapes=(None, {1: past + 1}, tuple(growing)),
    )
    if name.startswith("combiner"):  # span summaries: a branch in the graph, not a Python `if` on this trace's data
        assert any("cond" in str(node.target) for node in exported.graph.nodes)
    program = exported.module()
    eager_states, program_states = list(states), [t.clone() for t in states]
    for t in range(PROMPT, PROMPT + DECODE_STEPS):
        token, seen = ids[:, t : t + 1], mask[:, : t + 1].clone()
        with torch.no_grad():
            expected = step(token, seen, tuple(eager_states))
            got = program(token, seen, tuple(program_states))
            full = model(input_ids=ids[:, : t + 1], attention_mask=mask[:, : t + 1], use_cache=False).logits
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(expected[0][:, -1], full[:, -1], rtol=1e-4, atol=1e-5)
        assert len(got) == len(expected) == len(states) + 1
        for new, reference in zip(got[1:], expected[1:]):
            torch.testing.assert_close(new, reference, rtol=1e-5, atol=1e-5)
        eager_states, program_states = list(expected[1:]), list(got[1:])
    if kind == "static":
        assert [t.shape for t in program_states] == [t.shape for t in states]


def test_export_refuses_combiner_chunk_against_a_filled_cache():
    """Several new tokens against a filled cache (the chunk path sizes its work on the data): a clear error, not a
    failure deep inside the trace."""
    model, _ = _decoder("combiner-fixed")
    ids = torch.randint(3, 64, (2, PROMPT + 2), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        cache = model(input_ids=ids[:, :PROMPT], use_cache=True).cache
    layout, states = StateDecodeStep.flatten(cache)
    torch._dynamo.reset()
    with pytest.raises(NotImplementedError, match="one new token per call"):
        step = StateDecodeStep(model, layout, type(cache))
        torch.export.export(step, (ids[:, PROMPT:], torch.ones_like(ids), tuple(states)))
