"""AFT ops (hf_efficient/models/aft/ops_aft.py) against the dense references of tests/references/aft_reference.py."""

import pytest
import torch

from hf_efficient.models.aft import ops_aft
from tests.helpers import LargestTensor
from tests.references.aft_reference import (
    aft_reference,
    conv1d_bias,
    conv2d_bias,
    local_bias,
    per_head_to_channels,
)

B, L, D, HEADS = 2, 13, 6, 3
GRID = (4, 5)

# (name, window or kernel size, causal): every variant causal and bidirectional, except the 2-D AFT-conv
# which is bidirectional only (image grids; causal text uses conv1d)
SIZES = [
    ("full", None),
    ("simple", None),
    ("local", 1),
    ("local", 3),
    ("local", 20),  # window longer than the sequence
    ("conv1d", 3),
    ("conv1d", 5),
    ("conv2d", 3),
    ("conv2d", 9),  # kernel larger than the grid
]
VARIANTS = [(n, s, c) for n, s in SIZES for c in (False, True) if not (n == "conv2d" and c)]
IDS = [f"{n}{'-' + str(s) if s else ''}-{'causal' if c else 'bidirectional'}" for n, s, c in VARIANTS]


def _padding_mask(batch, length):
    mask = torch.ones(batch, length)
    mask[0, :3] = 0  # left padding
    if batch > 1:
        mask[1, -4:] = 0  # right padding
    return mask


def _uniform(shape, scale, generator):
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * scale


class Case:
    """Random inputs of one variant plus the fast op and the dense reference on them."""

    def __init__(self, name, size, causal, *, scale=None, dtype=torch.float32, masked=True, seed=0):
        self.name, self.size, self.causal = name, size, causal
        g = torch.Generator().manual_seed(seed)
        length = GRID[0] * GRID[1] if name == "conv2d" else L
        self.length = length
        randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        big = (lambda *shape: _uniform(shape, scale, g)) if scale else randn
        key_channels = HEADS if name.startswith("conv") else D
        self.q, self.v = randn(B, length, D), randn(B, length, D)
        self.k = big(B, length, key_channels)
        if name == "full":
            self.param = big(length, length)
        elif name == "local":
            self.param = big(length, size if causal else 2 * size - 1)
        elif name == "conv1d":
            self.param = big(HEADS, size)
        elif name == "conv2d":
            self.param = big(HEADS, size, size)
        else:
            self.param = None
        self.mask = _padding_mask(B, length) if masked else None
        # inputs in the tested dtype (rounded); the reference sees exactly these values
        cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
        self.q, self.k, self.v, self.param = map(cast, (self.q, self.k, self.v, self.param))

    def tensors(self):
        return [x for x in (self.q, self.k, self.v, self.param) if x is not None]

    def fast(self, q, k, v, param, **kw):
        opts = dict(key_padding_mask=self.mask)
        if self.name == "full":
            return ops_aft.aft_full(q, k, v, param, causal=self.causal, query_chunk_size=4, **opts, **kw)
        if self.name == "simple":
            return ops_aft.aft_simple(q, k, v, causal=self.causal, chunk_size=4, **opts, **kw)
        if self.name == "local":
            return ops_aft.aft_local(q, k, v, param, self.size, causal=self.causal, chunk_size=4, **opts, **kw)
        if self.name == "conv1d":
            return ops_aft.aft_conv1d(q, k, v, param, causal=self.causal, chunk_size=4, **opts, **kw)
        return ops_aft.aft_conv2d(q, k, v, param, GRID, **opts, **kw)

    def reference(self, q, k, v, param):
        causal = self.causal and self.name != "conv2d"
        if self.name == "full":
            return aft_reference(q, k, v, param, causal, self.mask)
        if self.name == "simple":
            return aft_reference(q, k, v, torch.zeros(self.length, self.length), causal, self.mask)
        if self.name == "local":
            return aft_reference(q, k, v, local_bias(param, self.size, causal), causal, self.mask)
        if self.name == "conv1d":
            w_heads = conv1d_bias(param, self.length, causal)
        else:
            w_heads = conv2d_bias(param, GRID)
        k_channels, w = per_head_to_channels(k, w_heads, D)
        return aft_reference(q, k_channels, v, w, causal, self.mask)


@pytest.mark.parametrize("masked", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("name,size,causal", VARIANTS, ids=IDS)
def test_matches_reference_float32(name, size, causal, masked):
    case = Case(name, size, causal, masked=masked)
    y = case.fast(*_args(case, case.tensors()))
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), case.reference(*_args(case, case.tensors())), atol=1e-5, rtol=1e-5)


def _args(case, tensors):
    return tensors if case.param is not None else [*tensors, None]


@pytest.mark.parametrize("scale", [None, 200.0], ids=["normal", "logits200"])
@pytest.mark.parametrize("name,size,causal", VARIANTS, ids=IDS)
def test_gradients_match_reference(name, size, causal, scale):
    case = Case(name, size, causal, scale=scale, seed=1)
    leaves = [x.clone().requires_grad_() for x in case.tensors()]
    leaves64 = [x.detach().double().requires_grad_() for x in case.tensors()]
    grad_out = torch.randn(B, case.length, D, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad((case.fast(*_args(case, leaves)) * grad_out).sum(), leaves)
    grads64 = torch.autograd.grad((case.reference(*_args(case, leaves64)) * grad_out.double()).sum(), leaves64)
    for got, want in zip(grads, grads64):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)], ids=["fp32", "bf16", "fp16"]
)
@pytest.mark.parametrize("name,size,causal", VARIANTS, ids=IDS)
def test_stable_with_logits_far_above_88(name, size, causal, dtype, atol):
    """K and w uniform in [-200, 200] (exp overflows float32 above 88): finite, equal to float64 maths."""
    case = Case(name, size, causal, scale=200.0, dtype=dtype, seed=3)
    y = case.fast(*_args(case, case.tensors()))
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), case.reference(*_args(case, case.tensors())), atol=atol, rtol=atol)


def test_large_positive_offset_float16():
    """Keys around 300 in float16 (exp(300) is far beyond float16 and float32): exact softmax."""
    case = Case("local", 3, True, dtype=torch.float16, seed=4)
    k = (case.k.double() + 300).half()
    y = case.fast(case.q, k, case.v, case.param)
    torch.testing.assert_close(y.double(), case.reference(case.q, k, case.v, case.param), atol=2e-3, rtol=2e-3)


def test_exact_fallback_repairs_separable_reference(monkeypatch):
    """A case where no reference rowmax(w) + colmax(K) keeps the matmul's terms representable.

    Channel 0 peaks at key 0, channel 1 at key 1; query 0's bias favours key 0 and query 1's key 1 (by 200),
    so (query 0, channel 1) has all its terms near exp(-200) relative to the separable reference: the fast
    path underflows to 0/0 and the certified fallback must produce the exact value.
    """
    calls = []
    original = ops_aft._exact_entries
    monkeypatch.setattr(ops_aft, "_exact_entries", lambda *a, **kw: calls.append(a[3]) or original(*a, **kw))
    k = torch.tensor([[[0.0, -200.0], [-200.0, 0.0]]])
    v = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    q = torch.zeros(1, 2, 2)
    w = torch.tensor([[0.0, -200.0], [-200.0, 0.0]])
    y = ops_aft.aft_full(q, k, v, w)
    torch.testing.assert_close(y.double(), aft_reference(q, k, v, w), atol=1e-6, rtol=1e-6)
    assert calls and sum(len(c) for c in calls) == 2  # exactly the two off-diagonal entries were repaired
    assert torch.isfinite(y).all()


def test_query_without_visible_key_outputs_zero():
    q, k, v = torch.randn(1, 4, 2), torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    mask = torch.tensor([[0, 0, 1, 1]])
    for y in (
        ops_aft.aft_simple(q, k, v, causal=True, key_padding_mask=mask),
        ops_aft.aft_full(q, k, v, torch.randn(4, 4), causal=True, key_padding_mask=mask),
        ops_aft.aft_local(q, k, v, torch.randn(4, 2), 2, causal=True, key_padding_mask=mask),
    ):
        assert torch.equal(y[0, :2], torch.zeros(2, 2))
        assert (y[0, 2:] != 0).all()
    all_pad = torch.zeros(1, 4)
    assert torch.equal(ops_aft.aft_simple(q, k, v, key_padding_mask=all_pad), torch.zeros(1, 4, 2))


@pytest.mark.parametrize("scale", [None, 200.0], ids=["normal", "logits200"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", ["full", "local"])
def test_per_sample_bias_matches_reference(name, causal, scale):
    """(B, ...) biases, one per sample (what a left-padded batch with absolute position biases needs)."""
    g = torch.Generator().manual_seed(7)
    case = Case(name, 3, causal, scale=scale, seed=8)
    n_w = L if name == "full" else (3 if causal else 5)
    param = case.param[None] + (_uniform((B, L, n_w), scale or 1.0, g)).float()
    y = case.fast(case.q, case.k, case.v, param)
    for b in range(B):
        case_b = Case(name, 3, causal, scale=scale, seed=8)
        case_b.mask = case.mask[b : b + 1]
        want = case_b.reference(case.q[b : b + 1], case.k[b : b + 1], case.v[b : b + 1], param[b])
        torch.testing.assert_close(y[b : b + 1].double(), want, atol=1e-5, rtol=1e-5)


def test_per_sample_bias_rows_in_decode_steps():
    case = Case("local", 3, True, seed=9)
    g = torch.Generator().manual_seed(10)
    band = case.param[None] + torch.randn(B, L, 3, generator=g)
    full = ops_aft.aft_local(case.q, case.k, case.v, band, 3, causal=True, key_padding_mask=case.mask)
    state = ops_aft.aft_empty_state(B, D, D, 2)
    for t in range(L):
        y, state = ops_aft.aft_local_step(case.q[:, t], case.k[:, t], case.v[:, t], band[:, t], state, case.mask[:, t])
        torch.testing.assert_close(y, full[:, t], atol=1e-5, rtol=1e-5)
    w = torch.randn(B, L, L, generator=g)
    full = ops_aft.aft_full(case.q, case.k, case.v, w, causal=True, key_padding_mask=case.mask)
    state = ops_aft.aft_empty_state(B, D, D)
    for t in range(L):
        y, state = ops_aft.aft_full_step(
            case.q[:, t], case.k[:, t], case.v[:, t], w[:, t, : t + 1], state, case.mask[:, t]
        )
        torch.testing.assert_close(y, full[:, t], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Memory: no (B, L, L, d) tensor
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name,size", [("full", None), ("simple", None), ("local", 4), ("conv1d", 5)])
def test_no_batch_length_length_channels_tensor(name, size, causal):
    """Forward and backward at L = 128, d = 16 never allocate anything near B * L * L * d elements."""
    batch, length, d = 2, 128, 16
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(batch, length, d, generator=g), torch.randn(batch, length, d, generator=g)
    k = torch.randn(batch, length, (4 if name == "conv1d" else d), generator=g)
    param = {
        "full": lambda: torch.randn(length, length, generator=g),
        "simple": lambda: None,
        "local": lambda: torch.randn(length, 4 if causal else 7, generator=g),
        "conv1d": lambda: torch.randn(4, 5, generator=g),
    }[name]()
    leaves = [x.requires_grad_() for x in (q, k, v, param) if x is not None]
    with LargestTensor() as mode:
        if name == "full":
            y = ops_aft.aft_full(q, k, v, param, causal=causal)
        elif name == "simple":
            y = ops_aft.aft_simple(q, k, v, causal=causal)
        elif name == "local":
            y = ops_aft.aft_local(q, k, v, param, 4, causal=causal)
        else:
            y = ops_aft.aft_conv1d(q, k, v, param, causal=causal)
        torch.autograd.grad(y.square().sum(), leaves)
    assert mode.numel > 0
    # AFT-full: its (L, L) bias block; windowed ops: 3 key strips x [num, den] of (B, L, d)
    limit = length * length if name == "full" else 6 * batch * length * d
    assert mode.numel <= limit < batch * length * length * d // 8


# ---------------------------------------------------------------------------------------------------------
# Decoding: step functions and state continuation reproduce the full causal op
# ---------------------------------------------------------------------------------------------------------

DECODE = [("full", None), ("simple", None), ("local", 1), ("local", 3), ("conv1d", 1), ("conv1d", 4)]
DECODE_IDS = [f"{n}-{s}" if s else n for n, s in DECODE]


def _decode_mask():
    mask = _padding_mask(B, L)
    mask[1, 5] = 0  # a padding token in the middle of the sequence
    return mask


def _empty_state(case):
    key_channels = HEADS if case.name == "conv1d" else D
    window = {"full": 0, "simple": 0, "local": (case.size or 1) - 1, "conv1d": (case.size or 1) - 1}[case.name]
    return ops_aft.aft_empty_state(B, key_channels, D, window)


def _step(case, t, state, valid):
    q, k, v, param = case.q[:, t], case.k[:, t], case.v[:, t], case.param
    if case.name == "full":
        return ops_aft.aft_full_step(q, k, v, param[t, : t + 1], state, valid)
    if case.name == "simple":
        return ops_aft.aft_simple_step(q, k, v, state, valid)
    if case.name == "local":
        return ops_aft.aft_local_step(q, k, v, param[t], state, valid)
    return ops_aft.aft_conv1d_step(q, k, v, param, state, valid)


@pytest.mark.parametrize("scale", [None, 200.0], ids=["normal", "logits200"])
@pytest.mark.parametrize("name,size", DECODE, ids=DECODE_IDS)
def test_decode_steps_reproduce_full_causal_op(name, size, scale):
    case = Case(name, size, True, scale=scale, seed=5)
    case.mask = _decode_mask()
    full = case.fast(*_args(case, case.tensors()))
    state = _empty_state(case)
    for t in range(L):
        y, state = _step(case, t, state, case.mask[:, t])
        torch.testing.assert_close(y, full[:, t], atol=1e-5, rtol=1e-5)
    # the state stays bounded: simple O(d), local/conv O(s d), full grows with the prefix
    expected_window = {"full": L, "simple": 0}.get(name, (size or 1) - 1)
    assert state.keys.shape[1] == expected_window
    assert state.max.shape == (B, HEADS if name == "conv1d" else D)


@pytest.mark.parametrize("split", [1, 2, 7], ids=lambda s: f"prefill{s}")
@pytest.mark.parametrize("name,size", DECODE, ids=DECODE_IDS)
def test_prefill_then_continue_matches_full(name, size, split):
    """return_state on a prefix, then (a) initial_state on the rest in one call, (b) token-by-token steps."""
    case = Case(name, size, True, scale=None, seed=6)
    case.mask = _decode_mask()
    full = case.fast(*_args(case, case.tensors()))
    head, tail = slice(0, split), slice(split, L)

    def call(part, **kw):
        q, k, v = case.q[:, part], case.k[:, part], case.v[:, part]
        mask = case.mask[:, part]
        if name == "full":
            cols = slice(0, part.stop) if part.start else part
            return ops_aft.aft_full(q, k, v, case.param[part, cols], causal=True, key_padding_mask=mask, **kw)
        if name == "simple":
            return ops_aft.aft_simple(q, k, v, causal=True, key_padding_mask=mask, chunk_size=4, **kw)
        if name == "local":
            return ops_aft.aft_local(
                q, k, v, case.param[part], size, causal=True, key_padding_mask=mask, chunk_size=4, **kw
            )
        return ops_aft.aft_conv1d(q, k, v, case.param, causal=True, key_padding_mask=mask, chunk_size=4, **kw)

    y_head, state = call(head, return_state=True)
    torch.testing.assert_close(y_head, full[:, head], atol=1e-5, rtol=1e-5)
    y_tail, end_state = call(tail, initial_state=state, return_state=True)
    torch.testing.assert_close(y_tail, full[:, tail], atol=1e-5, rtol=1e-5)
    for t in range(split, L):
        y, state = _step(case, t, state, case.mask[:, t])
        torch.testing.assert_close(y, full[:, t], atol=1e-5, rtol=1e-5)
    # the one-call continuation and the steps end in the same state
    for a, b in zip(end_state, state):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(torch.nan_to_num(a, neginf=-1e30), torch.nan_to_num(b, neginf=-1e30))


def test_simple_state_is_independent_of_prefix_length():
    state = ops_aft.aft_empty_state(1, D, D)
    sizes = set()
    for _ in range(50):
        x = torch.randn(1, D)
        _, state = ops_aft.aft_simple_step(x, x, x, state)
        sizes.add(tuple(t.numel() for t in state))
    assert len(sizes) == 1


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_the_value():
    q = torch.randn(1, 5, 6)
    with pytest.raises(ValueError, match="window must be a positive int; got 0"):
        ops_aft.aft_local(q, q, q, torch.zeros(5, 1), 0)
    with pytest.raises(ValueError, match=r"w_band has shape \(5, 3\)"):
        ops_aft.aft_local(q, q, q, torch.zeros(5, 3), 3)
    with pytest.raises(ValueError, match=r"w has shape \(4, 4\)"):
        ops_aft.aft_full(q, q, q, torch.zeros(4, 4))
    with pytest.raises(ValueError, match="kernel_size 4 must be odd"):
        ops_aft.aft_conv1d(q, torch.randn(1, 5, 3), q, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"grid_size \(2, 2\) has 4 cells"):
        ops_aft.aft_conv2d(q, torch.randn(1, 5, 3), q, torch.zeros(3, 3, 3), (2, 2))
    with pytest.raises(ValueError, match=r"key_padding_mask has shape \(1, 4\)"):
        ops_aft.aft_simple(q, q, q, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="need causal=True"):
        ops_aft.aft_simple(q, q, q, return_state=True)


# ---------------------------------------------------------------------------------------------------------
# AFT-full with the factorised bias w = u v^T: streamed tiles (forward and backward), never L x L
# ---------------------------------------------------------------------------------------------------------


def _gradients_match(y, want, leaves, leaves64, dtype, seed):
    """Under a random output gradient, the gradient of every input equals the float64 reference's (bf16: rounded
    once to bf16 at the end), in the inputs' dtype and finite."""
    grad_out = torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad((y.float() * grad_out).sum(), leaves)
    grads64 = torch.autograd.grad((want * grad_out.double()).sum(), leaves64)
    for got, ref in zip(grads, grads64):
        assert got.dtype == dtype and torch.isfinite(got).all()
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-4)
        else:
            torch.testing.assert_close(got.double(), ref, atol=3e-2, rtol=2e-2)


def _factor_case(causal, scale, dtype, seed, per_sample=False, rank=3):
    case = Case("full", None, causal, scale=scale, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    lead = (B,) if per_sample else ()
    # u v^T of magnitude ~scale: entries of u, v ~ sqrt(scale / rank)
    amp = ((scale or 1.0) / rank) ** 0.5
    u = _uniform((*lead, L, rank), amp, g).to(dtype)
    v = _uniform((*lead, L, rank), amp, g).to(dtype)
    return case, u, v


@pytest.mark.parametrize("per_sample", [False, True], ids=["shared", "per-sample"])
@pytest.mark.parametrize(
    "dtype,scale,atol",
    [(torch.float32, None, 1e-5), (torch.float32, 200.0, 1e-5), (torch.bfloat16, None, 1e-5)],
    ids=["fp32", "fp32-logits200", "bf16"],
)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_full_factorised_bias_forward_and_gradients(causal, dtype, scale, atol, per_sample):
    """aft_full(q, k, v, (u, v)) equals the dense reference on w = u v^T (padding included), outputs and the
    gradients of q, k, v, u and v, with query blocks of 4 (several tiles, the diagonal one partly masked)."""
    case, u, wv = _factor_case(causal, scale, dtype, seed=11, per_sample=per_sample)
    leaves = [x.clone().requires_grad_() for x in (case.q, case.k, case.v, u, wv)]
    leaves64 = [x.detach().double().requires_grad_() for x in (case.q, case.k, case.v, u, wv)]
    y = ops_aft.aft_full(
        *leaves[:3], (leaves[3], leaves[4]), causal=causal, key_padding_mask=case.mask, query_chunk_size=4
    )
    assert y.dtype == dtype
    w64 = leaves64[3] @ leaves64[4].transpose(-1, -2)
    if per_sample:
        want = torch.cat(
            [
                aft_reference(*(x[b : b + 1] for x in leaves64[:3]), w64[b], causal, case.mask[b : b + 1])
                for b in range(B)
            ]
        )
    else:
        want = aft_reference(*leaves64[:3], w64, causal, case.mask)
    # bf16: the op computes in float32 from the bf16 inputs; only the output rounding differs
    torch.testing.assert_close(y.double(), want, atol=atol if dtype == torch.float32 else 1e-2, rtol=1e-2)
    _gradients_match(y, want, leaves, leaves64, dtype, seed=12)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_full_dense_and_factorised_bias_agree(causal):
    case, u, wv = _factor_case(causal, None, torch.float32, seed=13)
    dense = ops_aft.aft_full(case.q, case.k, case.v, u @ wv.T, causal=causal, key_padding_mask=case.mask)
    factored = ops_aft.aft_full(case.q, case.k, case.v, (u, wv), causal=causal, key_padding_mask=case.mask)
    torch.testing.assert_close(factored, dense, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_full_factorised_never_forms_length_squared_tensor(causal):
    """Forward and backward with factors at L = 128 and query blocks of 16: the largest tensor is one
    (16 x 128) tile or an O(L d) operand, far below the L x L matrix."""
    batch, length, d, rank = 2, 128, 16, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, length, d, generator=g) for _ in range(3))
    u, wv = torch.randn(length, rank, generator=g), torch.randn(length, rank, generator=g)
    leaves = [x.requires_grad_() for x in (q, k, v, u, wv)]
    with LargestTensor() as mode:
        y = ops_aft.aft_full(q, k, v, (u, wv), causal=causal, query_chunk_size=16)
        grads = torch.autograd.grad(y.square().sum(), leaves)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert 0 < mode.numel <= max(16 * length, batch * length * 2 * d) < length * length


def test_full_factorised_prefill_then_continue():
    """return_state, then initial_state with factors covering the past keys too: equals the one-call op."""
    case, u, wv = _factor_case(True, None, torch.float32, seed=14)
    case.mask = _decode_mask()
    full = ops_aft.aft_full(case.q, case.k, case.v, (u, wv), causal=True, key_padding_mask=case.mask)
    y_head, state = ops_aft.aft_full(
        case.q[:, :5], case.k[:, :5], case.v[:, :5], (u[:5], wv[:5]), causal=True,
        key_padding_mask=case.mask[:, :5], return_state=True,
    )  # fmt: skip
    y_tail = ops_aft.aft_full(
        case.q[:, 5:], case.k[:, 5:], case.v[:, 5:], (u[5:], wv), causal=True,
        key_padding_mask=case.mask[:, 5:], initial_state=state,
    )  # fmt: skip
    torch.testing.assert_close(torch.cat([y_head, y_tail], 1), full, atol=1e-5, rtol=1e-5)


def test_full_factorised_bad_shapes_raise():
    q = torch.randn(1, 5, 6)
    with pytest.raises(ValueError, match=r"w factors have shapes \(5, 2\), \(4, 2\)"):
        ops_aft.aft_full(q, q, q, (torch.zeros(5, 2), torch.zeros(4, 2)))
    with pytest.raises(ValueError, match="a pair"):
        ops_aft.aft_full(q, q, q, (torch.zeros(5, 2),))


# ---------------------------------------------------------------------------------------------------------
# Checkpointed segments (training memory of the causal simple/local/conv1d ops): the same maths
# ---------------------------------------------------------------------------------------------------------

SEGMENTED = [("simple", None), ("local", 3), ("local", 6), ("conv1d", 5)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [None, 200.0], ids=["normal", "logits200"])
@pytest.mark.parametrize("name,size", SEGMENTED, ids=[f"{n}-{s}" if s else n for n, s in SEGMENTED])
def test_segmented_causal_ops_match_reference(name, size, scale, dtype):
    """segment_size=4 on L = 13 (segments 4, 4, 4, 1; left/right padding): outputs and gradients of every input
    equal the dense reference's, and equal the one-piece op's."""
    case = Case(name, size, True, scale=scale, dtype=dtype, seed=21)
    leaves = [x.clone().requires_grad_() for x in case.tensors()]
    leaves64 = [x.detach().double().requires_grad_() for x in case.tensors()]
    y = case.fast(*_args(case, leaves), segment_size=4)
    assert y.dtype == dtype and torch.isfinite(y).all()
    want = case.reference(*_args(case, leaves64))
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y.double(), want, atol=tol, rtol=tol)
    _gradients_match(y, want, leaves, leaves64, dtype, seed=22)
    one_piece = case.fast(*_args(case, leaves), segment_size=0)
    torch.testing.assert_close(y, one_piece, atol=1e-6 if dtype == torch.float32 else 1e-2, rtol=1e-5)


@pytest.mark.parametrize("name,size", SEGMENTED, ids=[f"{n}-{s}" if s else n for n, s in SEGMENTED])
def test_segmented_ops_keep_state_continuation(name, size):
    """return_state / initial_state through segmented calls: prefix (segmented) + rest (segmented) == one call."""
    case = Case(name, size, True, seed=23)
    leaves = [x.clone().requires_grad_() for x in case.tensors()]
    q, k, v = leaves[:3]
    param = leaves[3] if len(leaves) > 3 else None
    full = case.fast(*_args(case, leaves), segment_size=0)

    def call(part, **kw):
        opts = dict(causal=True, key_padding_mask=case.mask[:, part], chunk_size=4, segment_size=3, **kw)
        if name == "simple":
            return ops_aft.aft_simple(q[:, part], k[:, part], v[:, part], **opts)
        if name == "local":
            return ops_aft.aft_local(q[:, part], k[:, part], v[:, part], param[part], size, **opts)
        return ops_aft.aft_conv1d(q[:, part], k[:, part], v[:, part], param, **opts)

    y_head, state = call(slice(0, 8), return_state=True)
    y_tail = call(slice(8, L), initial_state=state)
    torch.testing.assert_close(torch.cat([y_head, y_tail], 1), full, atol=1e-5, rtol=1e-5)


def test_segments_only_with_autograd():
    """No grad needed: the one-piece op runs (no checkpoint); a bad segment_size is a ValueError."""
    q = torch.randn(1, 9, 4)
    assert ops_aft._segment_length(4, True, 9, q) == 0
    assert ops_aft._segment_length(4, True, 9, q.requires_grad_()) == 4
    assert ops_aft._segment_length(4, False, 9, q) == 0
    assert ops_aft._segment_length(16, True, 9, q) == 0
    with pytest.raises(ValueError, match="segment_size must be a non-negative int .* got -1"):
        ops_aft.aft_simple(q, q, q, causal=True, segment_size=-1)
