"""AFT ops inside graphs (issue 14): `torch.compile` under default settings and AFT-full's dynamic-length graph form.

Compiled: the exact fallback of the certified fast paths is the custom op `ops_aft._exact_fix` (its eager
implementation runs `nonzero` on the entries that need it; its backward `_exact_grads` is the explicit softmax
gradient). A compiled op with `fullgraph=True` (any graph break raises) must equal the float64 dense reference, outputs
and gradients, on inputs that take the fallback (logits uniform in +/-200), in float32 and bfloat16.

Exported with a dynamic length: AFT-full's loop over query tiles becomes a `scan` (`ops_aft._full_sums_graph`); it
must give the streamed op's numerator and denominator.
"""

import textwrap

import pytest
import torch
import torch._dynamo

from hf_efficient.models.aft import ops_aft
from tests.model_tester import run_without_package
from tests.references.aft_reference import aft_reference
from tests.test_aft_ops import B, Case, D, L

# (name, window or kernel size, causal, bias form): every bias kind of the fallback (none, dense, factors, band, grid)
COMPILED = [
    ("full", None, True, "dense"),
    ("full", None, False, "dense"),
    ("full", None, True, "factors"),
    ("full", None, False, "factors-per-sample"),
    ("simple", None, True, None),
    ("local", 3, True, None),
    ("local", 3, False, None),
    ("conv1d", 3, True, None),
    ("conv1d", 3, False, None),
    ("conv2d", 3, False, None),
]
COMPILED_IDS = [
    f"{n}{'-' + str(s) if s else ''}-{'causal' if c else 'bidirectional'}{'-' + f if f else ''}"
    for n, s, c, f in COMPILED
]


def _factors(case, per_sample, rank=3):
    g = torch.Generator().manual_seed(21)
    lead = (B,) if per_sample else ()
    amp = (200.0 / rank) ** 0.5  # u v^T of magnitude ~200: the separable reference fails often
    u, v = ((torch.rand(*lead, L, rank, generator=g) * 2 - 1) * amp for _ in range(2))
    return u.to(case.q.dtype), v.to(case.q.dtype)


def _count_fallback(monkeypatch):
    """Counts the entries recomputed by the exact fallback, forward (`_exact_entries`) and backward (`_exact_grads`)."""
    calls = {"forward": 0, "backward": 0}
    entries, grads = ops_aft._exact_entries, ops_aft._exact_grads

    def counted_entries(*a, **kw):
        calls["forward"] += len(a[3])
        return entries(*a, **kw)

    def counted_grads(spec, idx, *a, **kw):
        calls["backward"] += len(idx)
        return grads(spec, idx, *a, **kw)

    monkeypatch.setattr(ops_aft, "_exact_entries", counted_entries)
    monkeypatch.setattr(ops_aft, "_exact_grads", counted_grads)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,size,causal,bias", COMPILED, ids=COMPILED_IDS)
def test_compiled_op_fullgraph_matches_reference_through_the_fallback(name, size, causal, bias, dtype, monkeypatch):
    case = Case(name, size, causal, scale=200.0, dtype=dtype, seed=7)
    tensors = case.tensors()
    if bias is not None and bias.startswith("factors"):
        tensors = [*tensors[:3], *_factors(case, bias.endswith("per-sample"))]

    def op(q, k, v, *param):
        if name == "full" and len(param) == 2:
            param = (tuple(param),)
        return case.fast(q, k, v, *(param or (None,)))

    leaves = [x.clone().requires_grad_() for x in tensors]
    leaves64 = [x.detach().double().requires_grad_() for x in tensors]
    calls = _count_fallback(monkeypatch)
    torch._dynamo.reset()
    y = torch.compile(op, backend="aot_eager", fullgraph=True)(*leaves)
    grad_out = torch.randn(B, case.length, D, generator=torch.Generator().manual_seed(8))
    grads = torch.autograd.grad((y.float() * grad_out).sum(), leaves)
    assert calls["forward"] > 0 and calls["backward"] > 0, "these inputs must take the exact fallback"

    if bias is not None and bias.startswith("factors"):
        w64 = leaves64[3] @ leaves64[4].transpose(-1, -2)
        want = torch.cat(
            [
                aft_reference(
                    *(x[b : b + 1] for x in leaves64[:3]),
                    w64[b] if w64.dim() == 3 else w64,
                    causal,
                    case.mask[b : b + 1],
                )  # fmt: skip
                for b in range(B)
            ]
        )
    else:
        want = case.reference(*leaves64) if len(leaves64) == 4 else case.reference(*leaves64, None)
    grads64 = torch.autograd.grad((want * grad_out.double()).sum(), leaves64)
    assert y.dtype == dtype and torch.isfinite(y).all()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y.double(), want, **tol)
    for got, ref in zip(grads, grads64):
        assert got.dtype == dtype and torch.isfinite(got).all()
        # gradients of inputs uniform in +/-200: compared relative to their largest entry
        scale = ref.abs().max().clamp_min(1.0)
        if dtype == torch.float32:
            torch.testing.assert_close(got.double() / scale, ref / scale, atol=2e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(got.double() / scale, ref / scale, atol=3e-2, rtol=3e-2)


def test_compiled_continuation_from_a_state_matches_eager(monkeypatch):
    """AFT-simple continued from a folded prefix (`initial_state`: the fallback's pseudo-key): compiled with
    fullgraph, the same outputs and gradients as eager, the state's tensors included."""
    case = Case("simple", None, True, scale=200.0, seed=9)
    split = 5
    with torch.no_grad():
        _, state = ops_aft.aft_simple(
            case.q[:, :split], case.k[:, :split], case.v[:, :split], causal=True,
            key_padding_mask=case.mask[:, :split], return_state=True,
        )  # fmt: skip
    tail = [x[:, split:].clone() for x in (case.q, case.k, case.v)]

    def op(q, k, v, state_max, state_num, state_den):
        state_in = state._replace(max=state_max, num=state_num, den=state_den)
        return ops_aft.aft_simple(
            q, k, v, causal=True, key_padding_mask=case.mask[:, split:], initial_state=state_in, chunk_size=4
        )

    inputs = [*tail, state.max, state.num, state.den]
    results = []
    calls = _count_fallback(monkeypatch)
    for fn in (op, torch.compile(op, backend="aot_eager", fullgraph=True)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        y = fn(*leaves)
        grads = torch.autograd.grad(y.square().sum(), leaves)
        results.append((y, grads))
    assert calls["backward"] > 0
    (y_eager, g_eager), (y_compiled, g_compiled) = results
    torch.testing.assert_close(y_compiled, y_eager, atol=1e-6, rtol=1e-6)
    for got, want in zip(g_compiled, g_eager):
        torch.testing.assert_close(torch.nan_to_num(got), torch.nan_to_num(want), atol=1e-5, rtol=1e-5)
    full = case.reference(case.q.double(), case.k.double(), case.v.double(), None)
    torch.testing.assert_close(y_compiled.double(), full[:, split:], atol=1e-5, rtol=1e-5)


def test_eager_op_does_not_call_the_custom_op(monkeypatch):
    """Eager keeps its Python `if` and `nonzero` (no custom-op dispatch): the custom op runs only in a graph."""
    calls = []
    monkeypatch.setattr(ops_aft, "_exact_fix", lambda *a, **kw: calls.append(1))
    case = Case("simple", None, True, scale=200.0, seed=7)
    y = case.fast(case.q, case.k, case.v, None)
    assert not calls and torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------------
# AFT-full's graph form for a symbolic length
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", ["dense", "factors", "factors-per-sample"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_full_graph_form_equals_streamed_sums(causal, bias):
    """`_full_sums_graph` (a `scan` over query tiles of 16) gives the numerator and denominator of the streamed
    `_AFTFullSums` (padded keys included), and through the op the dense reference."""
    batch, length, d, rank = 2, 48, 5, 4
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(batch, length, d, generator=g) * 3, torch.randn(batch, length, d, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[0, :7] = False
    lead = (batch,) if bias == "factors-per-sample" else (1,)
    u, vv = torch.randn(*lead, length, rank, generator=g), torch.randn(*lead, length, rank, generator=g)
    w_dense = torch.matmul(u, vv.transpose(1, 2)) if bias == "dense" else None
    factors = (None, None) if bias == "dense" else (u, vv)
    graph = ops_aft._full_sums_graph(k, v, valid, causal, 0, w_dense, *factors)
    streamed = ops_aft._AFTFullSums.apply(k, v, valid, causal, 0, 16, w_dense, *factors)
    for got, want in zip(graph, streamed):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    w64 = torch.matmul(u, vv.transpose(1, 2)).double()
    q = torch.zeros(batch, length, d)
    num, den = graph
    avg = num / den.clamp_min(1e-30)
    for b in range(batch):  # sigmoid(0) = 1/2: the reference's output is avg / 2
        want = aft_reference(q[b : b + 1], k[b : b + 1], v[b : b + 1], w64[b if bias == "factors-per-sample" else 0],
                             causal, valid[b : b + 1])  # fmt: skip
        rows = valid[b].cumsum(0) > 0 if causal else torch.ones(length, dtype=torch.bool)
        torch.testing.assert_close((avg[b : b + 1] / 2).double()[:, rows], want[:, rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dense", [False, True], ids=["factors", "dense"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_full_graph_form_any_length(causal, dense):
    """A length that is not a multiple of 16 (40 queries after 3 cached keys): the scan runs over single-row tiles
    (no tile of 16 fits, and a symbolic length could not guard on its remainder), with the sums of the streamed op."""
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(2, 43, 3, generator=g) * 3, torch.randn(2, 43, 3, generator=g)
    valid = torch.ones(2, 43, dtype=torch.bool)
    valid[1, :4] = False
    u, vv = torch.randn(1, 40, 4, generator=g), torch.randn(1, 43, 4, generator=g)
    w_dense = torch.matmul(u, vv.transpose(1, 2)) if dense else None
    factors = (None, None) if dense else (u, vv)
    graph = ops_aft._full_sums_graph(k, v, valid, causal, 3 if causal else 0, w_dense, *factors)
    streamed = ops_aft._AFTFullSums.apply(k, v, valid, causal, 3 if causal else 0, 16, w_dense, *factors)
    for got, want in zip(graph, streamed):
        assert got.shape == (2, 40, 3)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Remote code: the folder's copy registers its own custom ops
# ---------------------------------------------------------------------------------------------------------


def test_remote_code_copy_compiles_with_its_own_fallback_op(tmp_path):
    """A checkpoint saved with its code, loaded with trust_remote_code where hf_efficient cannot be imported: its
    ops_aft registers the fallback ops under its own namespace, and `torch.compile(fullgraph=True)` of a training
    step through the fallback gives eager's loss and gradients."""
    import hf_efficient
    from hf_efficient.models.aft import AFTConfig, AFTForCausalLM

    config = AFTConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, max_position_embeddings=32,
        aft_type="full", position_bias_dim=8, position_bias_init_std=0.5,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AFTForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].aft.k_proj.weight.mul_(400.0)  # keys far beyond exp's range: the fallback runs
    hf_efficient.save_pretrained_with_code(model, tmp_path / "model")
    torch.save(
        {"input_ids": torch.randint(3, 64, (2, 32), generator=torch.Generator().manual_seed(1))}, tmp_path / "x"
    )
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_efficient"] = None  # any `import hf_efficient` now fails
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True)
        ops = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".ops_aft"]
        assert ops._OPS_NAMESPACE != "hf_efficient_models_aft_ops_aft", ops._OPS_NAMESPACE
        calls = []
        original = ops._exact_grads
        ops._exact_grads = lambda spec, idx, *a: calls.append(len(idx)) or original(spec, idx, *a)
        ids = torch.load({str(tmp_path / "x")!r})["input_ids"]
        model.train()

        def step():
            return model(input_ids=ids, labels=ids).loss

        def grads(fn):
            model.zero_grad()
            loss = fn()
            loss.backward()
            return loss.detach(), [p.grad.clone() for p in model.parameters()]

        loss_eager, grads_eager = grads(step)
        loss_compiled, grads_compiled = grads(torch.compile(step, backend="aot_eager", fullgraph=True))
        assert calls, "the compiled backward must run the remote copy's fallback"
        torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads_compiled, grads_eager):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        print("REMOTE-COMPILE-OK")
        """
    )
    run_without_package(script, tmp_path, marker="REMOTE-COMPILE-OK")


class _FullOp(torch.nn.Module):
    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v, u, w, mask):
        return ops_aft.aft_full(q, k, v, (u, w), causal=self.causal, key_padding_mask=mask)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_exported_full_op_with_dynamic_length_matches_reference(causal, dtype):
    """`aft_full` with factors exported once with a dynamic length (16 * n): at other lengths, with padding, the
    program equals the eager op and the dense reference, in float32 and bfloat16."""

    def inputs(length, seed):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, length, D, generator=g) for _ in range(3))
        u, w = (torch.randn(length, 3, generator=g) for _ in range(2))
        mask = torch.ones(B, length)
        mask[0, :5] = 0
        return tuple(x.to(dtype) for x in (q, k * 4, v, u, w)) + (mask,)

    n = torch.export.Dim("n", min=2, max=8)
    length = 16 * n
    shapes = ({1: length}, {1: length}, {1: length}, {0: length}, {0: length}, {1: length})
    program = torch.export.export(_FullOp(causal), inputs(32, 0), dynamic_shapes=shapes)
    assert any("scan" in str(node.target) for node in program.graph.nodes)
    for size in (48, 128):
        args = inputs(size, size)
        got = program.module()(*args)
        torch.testing.assert_close(got, _FullOp(causal)(*args), rtol=1e-5, atol=1e-5)
        q, k, v, u, w, mask = (x.double() for x in args)
        want = aft_reference(q, k, v, u @ w.T, causal, mask)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
