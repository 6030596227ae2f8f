"""torch.export and torch.compile of gMLP, AFT and Combiner (issue 14).

A forward must not branch in Python on tensor values (`bool(mask.all())`, `int(positions.max())`): such reads are
skipped while compiling / exporting, and the graph keeps the general (masked) path. Every exported program is
compared with the eager model on a left-padded batch and on a batch without padding.
"""

import pytest
import torch
import torch._dynamo

from hf_efficient.models.aft import AFTConfig, AFTForCausalLM, AFTForSequenceClassification, ops_aft
from hf_efficient.models.combiner import CombinerConfig, CombinerForCausalLM, CombinerForSequenceClassification
from hf_efficient.models.gmlp import GMLPConfig, GMLPForCausalLM, GMLPForSequenceClassification

MAX_LEN = 64


def gmlp_config(**overrides):
    return GMLPConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        max_position_embeddings=MAX_LEN,
        num_labels=3,
        sgu_init_std=0.1,
        **overrides,
    )


def aft_config(**overrides):
    kwargs = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        max_position_embeddings=MAX_LEN,
        num_labels=3,
        num_heads=4,
        conv_kernel_size=3,
        local_window=3,
        position_bias_dim=8,
        position_bias_init_std=0.5,
    )
    return AFTConfig(**{**kwargs, **overrides})


def combiner_config(**overrides):
    return CombinerConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        block_size=4,
        max_position_embeddings=MAX_LEN,
        num_labels=3,
        **overrides,
    )


# name -> (config factory with overrides, causal LM head, classifier head, dynamic lengths)
# Dynamic lengths: (multiple, smallest count, traced count): the sequence length is `multiple * n`. The blocked ops
# lay positions out in blocks (AFT's prefix-scan chunks of 16 and window blocks, Combiner's segments), so a dynamic
# length is a whole number of blocks, at least two. None: the op's Python loop count follows the length (AFT-full's
# query tiles), so the length is static (one export per length). Combiner-logsparse exports with its level count
# fixed by max_position_embeddings (any length, no block multiple).
VARIANTS = {
    "gmlp": (lambda **kw: gmlp_config(**kw), GMLPForCausalLM, GMLPForSequenceClassification, (1, 2, 12)),
    "amlp": (
        lambda **kw: gmlp_config(tiny_attn_size=8, **kw),
        GMLPForCausalLM,
        GMLPForSequenceClassification,
        (1, 2, 12),
    ),
    "aft-full": (lambda **kw: aft_config(aft_type="full", **kw), AFTForCausalLM, AFTForSequenceClassification, None),
    "aft-full-matrix": (
        lambda **kw: aft_config(aft_type="full", position_bias_dim=None, **kw),
        AFTForCausalLM,
        AFTForSequenceClassification,
        None,
    ),
    "aft-local": (
        lambda **kw: aft_config(aft_type="local", **kw),
        AFTForCausalLM,
        AFTForSequenceClassification,
        (16, 2, 2),
    ),
    "aft-simple": (
        lambda **kw: aft_config(aft_type="simple", **kw),
        AFTForCausalLM,
        AFTForSequenceClassification,
        (16, 2, 2),
    ),
    "aft-conv": (
        lambda **kw: aft_config(aft_type="conv", **kw),
        AFTForCausalLM,
        AFTForSequenceClassification,
        (16, 2, 2),
    ),
    "combiner-fixed": (
        lambda **kw: combiner_config(combiner_type="fixed", **kw),
        CombinerForCausalLM,
        CombinerForSequenceClassification,
        (4, 2, 3),
    ),
    "combiner-logsparse": (
        lambda **kw: combiner_config(combiner_type="logsparse", **kw),
        CombinerForCausalLM,
        CombinerForSequenceClassification,
        (1, 2, 12),
    ),
    "combiner-axial": (
        lambda **kw: combiner_config(combiner_type="axial", **kw),
        CombinerForCausalLM,
        CombinerForSequenceClassification,
        (4, 2, 3),
    ),
    "combiner-mixture": (
        lambda **kw: combiner_config(combiner_type="mixture", **kw),
        CombinerForCausalLM,
        CombinerForSequenceClassification,
        (4, 3, 4),
    ),
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


@pytest.mark.parametrize("aft_type", ["simple", "local"])
def test_export_keeps_aft_exact_fallback(aft_type, monkeypatch):
    """The fallback is a `torch.cond` branch in the graph (not a Python `if` on data): an exported AFT matches eager
    on inputs where the fast path's certificate fails."""
    model = _large_key_model(aft_type, "causal_lm")
    inputs = make_inputs("causal_lm", 32)
    calls = []
    original = ops_aft._exact_entries
    monkeypatch.setattr(ops_aft, "_exact_entries", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        expected = model(**inputs).logits
    assert calls, "these inputs must exercise the exact fallback"
    monkeypatch.setattr(ops_aft, "_exact_entries", original)
    program = export(model, inputs)
    assert any("cond" in str(node.target) for node in program.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(expected).all()


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


def test_compiled_aft_training_step_breaks_only_at_the_fallback():
    """Without dynamo's `capture_dynamic_output_shape_ops`, AFT's exact fallback (`nonzero`, a data-dependent shape)
    cannot be in the graph: each AFT op call breaks the graph at the `if` on whether any entry needs it (an
    `.item()`), and nothing else breaks."""
    model = make_model("aft-simple", "causal_lm")
    inputs = make_inputs("causal_lm", 32)
    count, reasons = _graph_breaks(model, inputs, _labels("causal_lm", inputs))
    assert count > 0 and all("item()" in reason for reason in reasons), reasons


@pytest.mark.parametrize(
    "aft_type, kind", [("full", "causal_lm"), ("simple", "classifier"), ("local", "causal_lm"), ("conv", "classifier")]
)
def test_compiled_aft_training_step_has_no_graph_break(aft_type, kind, monkeypatch):
    """With `torch._dynamo.config.capture_dynamic_output_shape_ops = True` the fallback is a `torch.cond` branch and
    the training step has no graph break."""
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    model = make_model(f"aft-{aft_type}", kind)
    inputs = make_inputs(kind, 32)
    count, reasons = _graph_breaks(model, inputs, _labels(kind, inputs))
    assert count == 0, reasons


@pytest.mark.parametrize("aft_type", ["simple"])
def test_compiled_aft_step_gradients_equal_eager(aft_type, monkeypatch):
    """The `torch.cond` fallback is differentiated like the eager `if`: same loss and gradients, on inputs that take
    the fallback."""
    monkeypatch.setattr(torch._dynamo.config, "capture_dynamic_output_shape_ops", True)
    model = _large_key_model(aft_type, "causal_lm").train()
    inputs = make_inputs("causal_lm", 32)

    def step():
        return model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=inputs["input_ids"]
        ).loss

    def grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    loss_eager, grads_eager = grads(step)
    loss_compiled, grads_compiled = grads(torch.compile(step, backend="aot_eager", fullgraph=True))
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
    assert grads_compiled.keys() == grads_eager.keys()
    for name in grads_eager:
        torch.testing.assert_close(grads_compiled[name], grads_eager[name], rtol=1e-4, atol=1e-5, msg=name)
