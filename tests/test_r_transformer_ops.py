"""R-Transformer ops with hand-written backwards (issue 15): the LocalRNN autograd Function, one piece and by
segments, and the official LayerNorm's Function, against the loop references in outputs and gradients (float32 and
bfloat16, padding and cached left context included), plus what they keep for the backward."""

import json

import pytest
import torch
from transformers import set_seed

import hf_efficient.models.r_transformer.ops_r_transformer as ops
from hf_efficient.models.r_transformer import RTransformerConfig, RTransformerForCausalLM, RTransformerModel
from hf_efficient.models.r_transformer.ops_r_transformer import local_rnn, official_layer_norm
from tests.helpers import load_script, saved_for_backward
from tests.references.r_transformer_reference import (
    layer_norm_reference,
    local_rnn_reference,
    make_cell,
    model_reference,
)

RNN_MODULES = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}
# One piece (the steps kept from the forward) and by segments of 1 and 3 positions (the steps recomputed).
SEGMENTS = {"one-piece": 10**6, "segments-of-3": 3, "segments-of-1": 1}
MASK = [[1, 1, 0, 0, 1, 1, 1, 0, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1, 0]]


def _case(rnn_type, window, dim=8, length=10, dtype=torch.float32, seed=0):
    """An RNN module, a left context of M - 1 inputs (as cached decoding has) and a padded batch of L inputs."""
    torch.manual_seed(seed)
    rnn = RNN_MODULES[rnn_type](dim, dim, batch_first=True).to(dtype)
    with torch.no_grad():  # biases large enough that every gradient term matters
        for param in rnn.parameters():
            param.uniform_(-0.6, 0.6)
    context = torch.randn(2, window - 1, dim, dtype=dtype, requires_grad=True)
    x = torch.randn(2, length, dim, dtype=dtype, requires_grad=True)
    mask = torch.tensor(MASK)[:, :length]
    return rnn, context, x, mask


def _op_grads(rnn, rnn_type, window, context, x, mask, grad_out, segment):
    """The op on (context, padded x) and the gradients of <output, grad_out> w.r.t. context, x and the weights."""
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    inputs = torch.cat([context, x * mask[..., None].to(x.dtype)], dim=1)
    out = local_rnn(inputs, *params, rnn_type=rnn_type, window=window, segment=segment)
    return out, torch.autograd.grad((out * grad_out).sum(), [context, x, *params])


def _reference_grads(rnn, rnn_type, window, context, x, mask, grad_out):
    """The cell loop over (context, x) with x's padded positions as zero inputs, in float32, and its gradients."""
    cell = make_cell(rnn, rnn_type).float()
    context32 = context.detach().float().requires_grad_(True)
    x32 = x.detach().float().requires_grad_(True)
    full_mask = torch.cat([torch.ones(2, window - 1, dtype=mask.dtype), mask], dim=1)
    full = local_rnn_reference(torch.cat([context32, x32], dim=1), cell, rnn_type, window, full_mask)
    out = full[:, window - 1 :]
    params = [cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh]
    return out, torch.autograd.grad((out * grad_out.float()).sum(), [context32, x32, *params], allow_unused=True)


def _saved_by(fn):
    """`fn()`'s result and the tensors its autograd graph keeps for the backward."""
    with saved_for_backward() as saved:
        return fn(), saved


NAMES = ["context", "x", "weight_ih", "weight_hh", "bias_ih", "bias_hh"]


@pytest.mark.parametrize("segment", sorted(SEGMENTS))
@pytest.mark.parametrize("window", [1, 2, 4])
@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_local_rnn_outputs_and_gradients_match_cell_reference(rnn_type, window, segment):
    """float32: outputs and every gradient (left context, padded inputs, all four weights) equal the cell loop."""
    rnn, context, x, mask = _case(rnn_type, window)
    grad_out = torch.randn(2, x.shape[1], x.shape[2])
    out, grads = _op_grads(rnn, rnn_type, window, context, x, mask, grad_out, SEGMENTS[segment])
    ref_out, ref_grads = _reference_grads(rnn, rnn_type, window, context, x, mask, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5)
    for name, got, expected in zip(NAMES, grads, ref_grads):
        if window == 1 and name in ("context", "weight_hh"):  # no left context; W_hh only ever sees h = 0
            assert got.numel() == 0 if name == "context" else not got.abs().any(), name
            continue
        assert expected.abs().max() > 1e-3, name  # a gradient that exists
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=name)
    assert not grads[1][mask == 0].any()  # padded inputs are zero inputs: no gradient reaches them


@pytest.mark.parametrize("segment", sorted(SEGMENTS))
@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_local_rnn_bfloat16_outputs_and_gradients_close_to_reference(rnn_type, segment):
    """bfloat16 in, bfloat16 out: close to the float32 cell loop on the same (rounded) values, and finite."""
    window = 4
    rnn, context, x, mask = _case(rnn_type, window, dtype=torch.bfloat16)
    grad_out = torch.randn(2, x.shape[1], x.shape[2]).to(torch.bfloat16)
    out, grads = _op_grads(rnn, rnn_type, window, context, x, mask, grad_out, SEGMENTS[segment])
    ref_out, ref_grads = _reference_grads(rnn, rnn_type, window, context, x, mask, grad_out)
    assert out.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in grads)
    torch.testing.assert_close(out.float(), ref_out, rtol=0.02, atol=0.03)
    for name, got, expected in zip(NAMES, grads, ref_grads):
        assert torch.isfinite(got).all(), name
        scale = expected.abs().max()
        torch.testing.assert_close(got.float() / scale, expected / scale, rtol=0, atol=0.03, msg=name)


@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_local_rnn_segmented_keeps_only_inputs_and_one_piece_keeps_steps(rnn_type):
    """What the backward keeps: by segments, only the inputs and weights (no per-step tensor); in one piece, the
    steps' tensors (and no recomputation)."""
    window, dim, length = 4, 8, 10
    rnn, context, x, mask = _case(rnn_type, window, dim=dim, length=length)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    inputs = torch.cat([context, x], dim=1)
    kept = {}
    for name, segment in (("segmented", 3), ("one-piece", 10**6)):
        out, kept[name] = _saved_by(
            lambda segment=segment: local_rnn(inputs, *params, rnn_type=rnn_type, window=window, segment=segment)
        )
        assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_LocalRNNBackward"
    segmented = kept["segmented"]
    assert len(segmented) == 5 and segmented[0] is inputs and all(a is b for a, b in zip(segmented[1:], params))
    assert len(kept["one-piece"]) > 5 + window - 1  # the steps' tensors on top of inputs and weights


@pytest.mark.parametrize("segment", [10**6, 2])
def test_local_rnn_backward_twice_with_retain_graph(segment):
    rnn, context, x, mask = _case("gru", 3)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    out = local_rnn(torch.cat([context, x], 1), *params, rnn_type="gru", window=3, segment=segment)
    first = torch.autograd.grad(out.sum(), [x], retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), [x])[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_local_rnn_rejects_a_bad_segment():
    rnn, context, x, _ = _case("gru", 3)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match=f"segment must be a positive int, got {bad!r}"):
            local_rnn(torch.cat([context, x], 1), *params, rnn_type="gru", window=3, segment=bad)


def test_local_rnn_without_autograd_is_unchanged_by_segment():
    """No autograd (inference, decoding): one pass, the same numbers whatever the segment."""
    rnn, context, x, _ = _case("lstm", 3)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    with torch.no_grad():
        inputs = torch.cat([context, x], 1)
        one = local_rnn(inputs, *params, rnn_type="lstm", window=3, segment=10**6)
        seg = local_rnn(inputs, *params, rnn_type="lstm", window=3, segment=1)
    assert one.grad_fn is None
    torch.testing.assert_close(one, seg, rtol=0, atol=0)


# ---------------------------------------------------------------------- the official LayerNorm's Function
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_official_layer_norm_outputs_and_gradients_match_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 32) * 3 + 1).to(dtype)
    x[1, 2] = 0.75  # a constant row: std 0, the eps keeps it finite
    x.requires_grad_(True)
    weight = torch.randn(32, dtype=dtype, requires_grad=True)
    bias = torch.randn(32, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(3, 5, 32).to(dtype)
    out = official_layer_norm(x, weight, bias, 1e-3)
    grads = torch.autograd.grad((out * grad_out).sum(), [x, weight, bias])
    leaves = [t.detach().float().requires_grad_(True) for t in (x, weight, bias)]
    ref = layer_norm_reference(*leaves, 1e-3, official=True)
    ref_grads = torch.autograd.grad((ref * grad_out.float()).sum(), leaves)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert type(out.grad_fn).__name__ == "_OfficialLayerNormBackward"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.05)
    torch.testing.assert_close(out.float(), ref, **tol)
    # The constant row: std 0 has no derivative (the reference's sqrt backward gives nan there); the Function takes
    # the std's path as 0, so that row's input gradient is the centred g w / eps.
    assert torch.isnan(ref_grads[0][1, 2]).all() and torch.isfinite(grads[0]).all()
    row = grad_out[1, 2].float() * weight.detach().float() / 1e-3
    torch.testing.assert_close(grads[0][1, 2].float(), row - row.mean(), **tol)
    ref_grads[0][1, 2] = grads[0][1, 2].float()
    for name, got, expected in zip(["x", "weight", "bias"], grads, ref_grads):
        torch.testing.assert_close(got.float(), expected, **tol, msg=name)
    with torch.no_grad():  # inference takes the plain path: the same numbers
        torch.testing.assert_close(official_layer_norm(x, weight, bias, 1e-3), out.detach(), rtol=0, atol=0)


def test_official_layer_norm_keeps_input_and_row_statistics_only():
    x = torch.randn(4, 64, requires_grad=True)
    weight, bias = torch.ones(64, requires_grad=True), torch.zeros(64, requires_grad=True)
    saved = _saved_by(lambda: official_layer_norm(x, weight, bias, 1e-6))[1]
    assert sum(t.numel() for t in saved) == x.numel() + weight.numel() + 2 * x.shape[0]


# ---------------------------------------------------------------------- the whole model, segmented or not
def _tiny(rnn_type, **overrides):
    kwargs = dict(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24)
    kwargs.update(rnn_type=rnn_type, local_window=3, num_rnn_layers=2, hidden_dropout_prob=0.0)
    kwargs.update(attention_dropout=0.0, embedding_dropout=0.0, attn_implementation="eager")
    kwargs.update(overrides)
    return RTransformerConfig(**kwargs)


@pytest.mark.parametrize("segment", [10**6, 2])
@pytest.mark.parametrize("rnn_type,official", [("gru", True), ("lstm", False), ("rnn", True)])
def test_model_gradients_match_reference(rnn_type, official, segment):
    """Every parameter's gradient of the base model (padded batch) equals the loop reference model's, with the
    LocalRNN's steps kept (one piece) or recomputed in segments of 2 positions."""
    set_seed(0)
    model = RTransformerModel(_tiny(rnn_type, official_layer_norm=official, local_rnn_segment_length=segment))
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1, 1, 0]])
    real = mask[..., None].float()
    grad_out = torch.randn(2, 9, 16)
    out = model(ids, attention_mask=mask).last_hidden_state
    fast = torch.autograd.grad((out * grad_out * real).sum(), list(model.parameters()))
    embeds = model.embed_tokens(ids)
    ref = model_reference(model, embeds, mask)
    torch.testing.assert_close(out * real, ref * real, rtol=0, atol=1e-5)
    slow = torch.autograd.grad((ref * grad_out * real).sum(), list(model.parameters()), allow_unused=True)
    for (name, _), got, expected in zip(model.named_parameters(), fast, slow):
        expected = torch.zeros_like(got) if expected is None else expected
        # float32 round-off relative to the tensor's largest entry (the LayerNorms of the 0.02-std embeddings scale
        # their gradients up to ~1e2)
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got / scale, expected / scale, rtol=0, atol=1e-5, msg=name)


def test_segmented_training_equals_one_piece_with_gradient_checkpointing():
    """The causal LM's loss and gradients: one piece, by segments, and by segments under transformers' gradient
    checkpointing (an outer checkpoint around the Function) all agree."""
    ids = torch.randint(3, 64, (2, 11))
    results = []
    for segment, checkpointing in ((10**6, False), (3, False), (3, True), (10**6, True)):
        set_seed(0)
        model = RTransformerForCausalLM(_tiny("gru", attn_implementation="sdpa", local_rnn_segment_length=segment))
        assert model.model.layers[0].rnn_layers[0].local_rnn.segment_length == segment
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert model.model.layers[0].gradient_checkpointing
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(grad, results[0][1][name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- the measuring script
def test_bench_localrnn_segments_mode_reports_kept_bytes(capsys):
    """`scripts/benchmarks/bench_localrnn.py segments` at a small size: one JSON row per (length, rnn type); the
    segmented Function keeps far less than autograd through the steps, and less than the one-piece Function."""
    bench = load_script("scripts/benchmarks/bench_localrnn.py")
    argv = ["segments", "--lengths", "512", "--hidden-size", "64", "--window", "4", "--segment", "64"]
    bench.main([*argv, "--repeats", "1", "--rnn-types", "gru", "lstm"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [row["rnn_type"] for row in rows] == ["gru", "lstm"]
    for row in rows:
        assert row["segmented_kept_mb"] * 5 < row["autograd_kept_mb"], row
        assert row["segmented_kept_mb"] < row["one_piece_kept_mb"], row
        assert all(row[f"{way}_fwd_bwd_ms"] > 0 for way in ("autograd", "one_piece", "segmented"))


@pytest.mark.parametrize("segment_length,length", [(4, 11), (16, 11)])
def test_model_recomputes_steps_only_above_the_segment_length(monkeypatch, segment_length, length):
    """`config.local_rnn_segment_length` reaches the op: a longer sequence runs the steps without keeping them in
    the forward (one call per segment) and recomputes them per segment in the backward; a shorter one keeps them."""
    calls = []
    recurrence = ops._recurrence

    def recording(*args, keep, **kwargs):
        calls.append((torch.is_grad_enabled(), keep, kwargs["num_out"]))
        return recurrence(*args, keep=keep, **kwargs)

    monkeypatch.setattr(ops, "_recurrence", recording)
    model = RTransformerForCausalLM(_tiny("gru", num_rnn_layers=1, local_rnn_segment_length=segment_length))
    ids = torch.randint(3, 64, (1, length))
    loss = model(ids, labels=ids).loss
    forward, calls[:] = list(calls), []
    loss.backward()
    if length > segment_length:  # per layer: 3 segments (4 + 4 + 3) computed, then recomputed
        assert [keep for _, keep, _ in forward] == [False] * 6 and [n for *_, n in forward] == [4, 4, 3] * 2
        assert [keep for _, keep, _ in calls] == [True] * 6 and [n for *_, n in calls] == [4, 4, 3] * 2
    else:
        assert [(keep, n) for _, keep, n in forward] == [(True, length)] * 2 and not calls


@pytest.mark.parametrize("segment", [10**6, 3])
@pytest.mark.parametrize("rnn_type", ["gru", "lstm", "rnn"])
def test_ops_trace_without_graph_breaks_and_compiled_gradients_equal_eager(rnn_type, segment):
    """torch.compile traces the Functions (forward and hand-written backward) without graph breaks, and the traced
    graphs give the eager gradients."""
    torch._dynamo.reset()
    rnn, context, x, mask = _case(rnn_type, 3, length=7)
    params = [rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0]
    norm_weight = torch.randn(x.shape[-1], requires_grad=True)

    def loss(context, x):
        normed = official_layer_norm(x, norm_weight, params[2][: x.shape[-1]], 1e-6)
        out = local_rnn(torch.cat([context, normed], 1), *params, rnn_type=rnn_type, window=3, segment=segment)
        return (out * out).sum()

    explanation = torch._dynamo.explain(loss)(context, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    leaves = [context, x, norm_weight, *params]
    eager = torch.autograd.grad(loss(context, x), leaves)
    # aot_eager: the traced forward and backward graphs run eagerly (inductor's code generation takes minutes on CPU)
    compiled = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(context, x), leaves)
    for got, expected in zip(compiled, eager):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
