"""Combiner ops: agreement with the dense reference, the full-attention property, no double counting, numerics,
sub-quadratic memory and input validation."""

import functools
import itertools

import pytest
import torch

from hf_efficient.models.combiner.decoding_combiner import combiner_prefill_state, combiner_step
from hf_efficient.models.combiner.ops_combiner import (
    COMBINER_TYPES,
    axial_abstraction_keys,
    combiner_attention,
    cumulative_pool,
)
from tests.helpers import LargestTensor, saved_for_backward
from tests.references.combiner_reference import (
    allowed_pairs,
    combiner_reference,
    combiner_sets,
    implied_attention,
)

BATCH, HEADS, DIM = 2, 2, 4
BLOCK = 4


def make_qkv(length, seed=0, dim=DIM, value_dim=DIM, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(BATCH, HEADS, length, dim, generator=generator) * scale for _ in range(2))
    v = torch.randn(BATCH, HEADS, length, value_dim, generator=generator)
    return q, k, v


def make_mask(length, kind):
    """None, right padding, left padding, or holes (an arbitrary key padding mask)."""
    if kind == "none":
        return None
    mask = torch.ones(BATCH, length, dtype=torch.long)
    if kind == "right":
        mask[0, length - 3 :] = 0
        mask[1, length - 6 :] = 0
    elif kind == "left":
        mask[0, :2] = 0
        mask[1, :5] = 0
    elif kind == "holes":
        mask[0, [1, 6, 7]] = 0
        mask[1, :3] = 0
        mask[1, length - 2 :] = 0
    return mask


def axial_keys(length, value_dim=DIM, seed=3):
    """The paper's abstraction keys `W_k LN(x + W_o a)` with random weights (what the module passes in), and x."""
    generator = torch.Generator().manual_seed(seed)
    width = HEADS * DIM
    key_fn = functools.partial(
        axial_abstraction_keys,
        out_weight=torch.randn(width, HEADS * value_dim, generator=generator) * 0.5,
        norm_weight=1 + 0.1 * torch.randn(width, generator=generator),
        norm_bias=0.1 * torch.randn(width, generator=generator),
        key_weight=torch.randn(width, width, generator=generator) * 0.5,
        norm_eps=1e-5,
    )
    return key_fn, torch.randn(BATCH, length, width, generator=generator)


def kwargs_for(variant, causal, length, mask, span_summary="max", block_size=BLOCK, value_dim=DIM):
    kwargs = dict(
        combiner_type=variant, causal=causal, block_size=block_size, key_mask=mask, span_summary=span_summary
    )
    if variant == "axial":
        kwargs["abstraction_key_fn"], kwargs["hidden_states"] = axial_keys(length, value_dim)
    return kwargs


def real_rows(mask, length):
    return torch.ones(BATCH, length, dtype=torch.bool) if mask is None else mask.bool()


# ---------------------------------------------------------------------- agreement with the dense reference
@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length, mask_kind", [(16, "none"), (13, "none"), (13, "right"), (14, "left"), (15, "holes")])
def test_fast_op_matches_reference(variant, causal, length, mask_kind):
    q, k, v = make_qkv(length)
    mask = make_mask(length, mask_kind)
    kwargs = kwargs_for(variant, causal, length, mask)
    fast = combiner_attention(q, k, v, **kwargs)
    reference = combiner_reference(q, k, v, **kwargs)
    assert fast.shape == v.shape and fast.dtype == torch.float32
    assert torch.isfinite(fast).all()
    rows = real_rows(mask, length)[:, None, :, None].expand_as(reference)
    torch.testing.assert_close(fast.double()[rows], reference[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["fixed", "logsparse", "mixture"])
@pytest.mark.parametrize("span_summary", ["mean", "sum"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_span_summaries_match_reference(variant, span_summary, causal):
    length = 14
    q, k, v = make_qkv(length, seed=1)
    mask = make_mask(length, "holes")
    kwargs = kwargs_for(variant, causal, length, mask, span_summary=span_summary)
    fast = combiner_attention(q, k, v, **kwargs)
    reference = combiner_reference(q, k, v, **kwargs)
    rows = real_rows(mask, length)[:, None, :, None].expand_as(reference)
    torch.testing.assert_close(fast.double()[rows], reference[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("length, block_size", [(5, 8), (7, 1), (1, 4), (9, 3)])
def test_odd_block_sizes_and_lengths(variant, length, block_size):
    """Block larger than the sequence, block 1, a single token, a non power of two block."""
    q, k, v = make_qkv(length, seed=2)
    for causal in (True, False):
        kwargs = kwargs_for(variant, causal, length, None, block_size=block_size)
        torch.testing.assert_close(
            combiner_attention(q, k, v, **kwargs).double(), combiner_reference(q, k, v, **kwargs), rtol=0, atol=1e-5
        )


def test_float64_agrees_to_round_off():
    q, k, v = (t.double() for t in make_qkv(13, seed=4))
    mask = make_mask(13, "right")
    for variant, causal in itertools.product(COMBINER_TYPES, (True, False)):
        kwargs = kwargs_for(variant, causal, 13, mask)
        if variant == "axial":
            kwargs["abstraction_key_fn"] = lambda a, x: torch.tanh(a)  # a float64-friendly key map
        fast = combiner_attention(q, k, v, **kwargs)
        reference = combiner_reference(q, k, v, **kwargs)
        rows = real_rows(mask, 13)[:, None, :, None].expand_as(reference)
        torch.testing.assert_close(fast[rows], reference[rows], rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- full attention, no double counting
def fast_implied_matrix(variant, causal, length, mask, seed=5):
    """The fast op's own implied matrix: feed one-hot values (v = I), so out[i] = row i of the attention matrix."""
    q, k, _ = make_qkv(length, seed=seed)
    eye = torch.eye(length).expand(BATCH, HEADS, length, length)
    kwargs = kwargs_for(variant, causal, length, mask, value_dim=length)
    if variant == "axial":
        # keys from a fixed map of the row outputs (here: rows of attention probabilities, width L)
        proj = torch.randn(length, DIM, generator=torch.Generator().manual_seed(9))
        kwargs["abstraction_key_fn"] = lambda a, x: torch.tanh(a @ proj.to(a.dtype)) * 3
    return combiner_attention(q, k, eye, **kwargs), q, k, eye, kwargs


@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("mask_kind", ["none", "right", "holes"])
def test_full_attention_property(variant, causal, mask_kind):
    """Every allowed (i, j) pair gets non-zero weight, nothing else gets any, and each real row sums to 1."""
    length = 15
    mask = make_mask(length, mask_kind)
    fast, q, k, eye, kwargs = fast_implied_matrix(variant, causal, length, mask)
    reference = implied_attention(q, k, eye, **kwargs)
    allowed = allowed_pairs(length, causal, mask, BATCH)[:, None].expand_as(reference)
    rows = real_rows(mask, length)[:, None, :, None].expand_as(reference)
    for matrix in (reference, fast.double()):
        assert (matrix[allowed] > 1e-12).all(), "some allowed pair has no weight"
        assert (matrix[rows & ~allowed].abs() < 1e-12).all(), "weight on a future or padded key"
        row_sums = matrix.sum(-1)[real_rows(mask, length)[:, None, :].expand(BATCH, HEADS, length)]
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums), rtol=0, atol=1e-6)
    torch.testing.assert_close(fast.double()[rows], reference[rows], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length", [12, 13])
def test_no_position_counted_twice(variant, causal, length):
    """The spans exclude Omega0 and do not overlap: each allowed key is covered exactly once (direct or one span).
    Mixture is a mixture of two partitions: a non-direct key lies in exactly one column span and one row span."""
    for i, (direct, spans) in enumerate(combiner_sets(variant, causal, length, BLOCK)):
        allowed = {j for j in range(length) if j <= i or not causal}
        direct = [j for j in direct if j < length]
        assert i in direct and len(set(direct)) == len(direct)
        span_cover = [j for span in spans for j in span["positions"] if j < length]
        assert set(direct) | set(span_cover) == allowed, i
        assert not set(direct) & set(span_cover), f"query {i}: a span overlaps the direct set"
        multiplicity = 2 if variant == "mixture" else 1
        for j in allowed - set(direct):
            assert span_cover.count(j) == multiplicity, (i, j)


def test_bidirectional_differs_from_double_counting():
    """Putting the own segment among the spans (the official TF bidirectional code) changes the result: our form
    is not that one, and the own segment is attended only directly."""
    length = 12
    q, k, v = make_qkv(length, seed=6)
    ours = implied_attention(q, k, v, combiner_type="fixed", causal=False, block_size=BLOCK)
    fast = combiner_attention(q, k, v, combiner_type="fixed", causal=False, block_size=BLOCK)
    torch.testing.assert_close(fast.double(), ours @ v.double(), rtol=0, atol=1e-5)
    # the own segment's keys get exactly their direct softmax share: recompute that share by hand for query 0
    scale = DIM**-0.5
    logits_direct = (q[0, 0, 0] @ k[0, 0, :BLOCK].T) * scale
    span_keys = k[0, 0].view(3, BLOCK, DIM).max(dim=1).values
    logits_spans = (q[0, 0, 0] @ span_keys[1:].T) * scale  # segments 1 and 2 only
    share = torch.cat([logits_direct, logits_spans]).softmax(-1)[:BLOCK]
    torch.testing.assert_close(ours[0, 0, 0, :BLOCK].float(), share, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- numerics
@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_stable_and_accurate(variant, dtype):
    length = 16
    mask = make_mask(length, "right")
    rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
    for causal, scale in itertools.product((True, False), (40.0, 2.0)):
        q, k, v = make_qkv(length, seed=7, scale=scale)  # scale 40: logits of order 1e3, far beyond exp's range
        kwargs = kwargs_for(variant, causal, length, mask)
        if variant == "axial":
            kwargs["abstraction_key_fn"] = lambda a, x, scale=scale: a * scale
        reference = combiner_attention(q, k, v, **kwargs)
        low = combiner_attention(q.to(dtype), k.to(dtype), v.to(dtype), **kwargs)
        assert low.dtype == dtype and torch.isfinite(low).all()
        # a convex combination of the values, whatever the logits
        assert (low.float().abs()[rows] <= v.abs().amax() * 1.01).all()
        if scale == 2.0:  # moderate logits: close to float32 (half-precision rounding of q, k, v and logits)
            assert (low.float() - reference)[rows].abs().max() < (0.05 if dtype == torch.float16 else 0.2)


@pytest.mark.parametrize("variant", COMBINER_TYPES)
def test_gradcheck(variant):
    length = 7
    q, k, v = (t[:1, :1].double().requires_grad_() for t in make_qkv(length, seed=8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    for causal in (True, False):
        extra = {"abstraction_key_fn": lambda a, x: torch.tanh(a)} if variant == "axial" else {}

        def fn(q, k, v, causal=causal, extra=extra):
            return combiner_attention(
                q,
                k,
                v,
                combiner_type=variant,
                causal=causal,
                block_size=3,
                key_mask=mask,
                span_summary="mean",
                **extra,
            )[:, :, :6]

        assert torch.autograd.gradcheck(fn, (q, k, v))


def test_running_pool_is_exclusive_and_masked():
    x = torch.tensor([[3.0, -1.0, 5.0, 2.0]])
    real = torch.tensor([[True, True, False, True]])
    pooled, nonempty = cumulative_pool(x, real, dim=1, span_summary="max")
    assert pooled.tolist() == [[0.0, 3.0, 3.0, 3.0]] and nonempty.tolist() == [[False, True, True, True]]
    pooled, _ = cumulative_pool(x, real, dim=1, span_summary="max", reverse=True)
    assert pooled.tolist() == [[2.0, 2.0, 2.0, 0.0]]
    pooled, _ = cumulative_pool(x, real, dim=1, span_summary="mean")
    assert pooled.tolist() == [[0.0, 3.0, 1.0, 1.0]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("length", [2, 3, 7, 16, 300])  # 300: int32 indices (uint8 up to 255)
def test_running_max_equals_cummax_form(dtype, reverse, length, monkeypatch):
    """The eager running max (doubling steps, custom backward) against the cummax form used while compiling:
    the same values, nonempty flags and gradients (ties included: integer-valued inputs; masked and empty spans)."""
    gen = torch.Generator().manual_seed(length)
    x = torch.randint(-3, 4, (2, 3, length, 5), generator=gen).to(dtype)  # many ties
    real = torch.rand(2, 1, length, 1, generator=gen) > 0.3
    real[0, 0, :, 0] = False  # a line with no real entry
    # Integer gradients: their sums are exact in any order (the two forms accumulate in different orders).
    grad = torch.randint(-4, 5, (2, 3, length, 5), generator=gen).to(dtype)

    def run():
        leaf = x.clone().requires_grad_(True)
        pooled, nonempty = cumulative_pool(leaf, real, dim=2, span_summary="max", reverse=reverse)
        pooled.backward(grad)
        return pooled, nonempty, leaf.grad

    eager = run()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    traced_form = run()
    for a, b in zip(eager, traced_form):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ---------------------------------------------------------------------- sub-quadratic for real
@pytest.mark.parametrize("variant", COMBINER_TYPES)
def test_never_builds_an_l_by_l_tensor(variant):
    """Forward and backward at L = 2048, block 32 (64 rows): every tensor is O(L (s + L/s)) (O(L log L) for
    Logsparse), far below the L^2 = 4.2M entries of dense attention."""
    length, block, dim = 2048, 32, 4
    q, k, v = (torch.randn(1, 1, length, dim, requires_grad=True) for _ in range(3))
    extra = {"abstraction_key_fn": lambda a, x: torch.tanh(a)} if variant == "axial" else {}
    mask = torch.ones(1, length, dtype=torch.long)
    mask[0, -5:] = 0
    with LargestTensor() as probe:
        out = combiner_attention(q, k, v, combiner_type=variant, causal=True, block_size=block, key_mask=mask, **extra)
        out.sum().backward()
    if variant == "logsparse":
        levels = 11
        assert probe.numel <= length * max(dim, levels + 1), probe.numel
    else:
        # Mixture's joint logits are the largest: (R, C, 2C + 3R) entries
        assert probe.numel <= 3 * length * (block + length // block), probe.numel
    assert probe.numel <= length * length / 8


# ---------------------------------------------------------------------- bad input
def test_bad_input_raises_naming_the_value():
    q, k, v = make_qkv(8)
    with pytest.raises(ValueError, match="'dense'"):
        combiner_attention(q, k, v, combiner_type="dense", causal=True, block_size=4)
    with pytest.raises(ValueError, match="'median'"):
        combiner_attention(q, k, v, combiner_type="fixed", causal=True, block_size=4, span_summary="median")
    with pytest.raises(ValueError, match="block_size.*0"):
        combiner_attention(q, k, v, combiner_type="fixed", causal=True, block_size=0)
    with pytest.raises(ValueError, match="abstraction_key_fn"):
        combiner_attention(q, k, v, combiner_type="axial", causal=True, block_size=4)
    with pytest.raises(ValueError, match=r"key_mask must have shape \(2, 8\)"):
        combiner_attention(q, k, v, combiner_type="mixture", causal=True, block_size=4, key_mask=torch.ones(2, 7))


# ---------------------------------------------------------------------- decoding steps
@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("span_summary", ["max", "mean"])
def test_prefill_state_and_steps_equal_full_causal_op(variant, span_summary):
    """Per-sample prefixes of different lengths (packed to the front), then one token per step, one sample idling
    on a padding step: every step's output equals the causal op over the whole sequence at that position."""
    batch, total = 3, 23
    generator = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(batch, HEADS, total, DIM, generator=generator) for _ in range(3))
    kwargs = dict(combiner_type=variant, block_size=BLOCK, span_summary=span_summary)
    hidden = None
    if variant == "axial":
        key_fn, _ = axial_keys(total)
        hidden = torch.randn(batch, total, HEADS * DIM, generator=generator)
        kwargs["abstraction_key_fn"] = key_fn
    full = combiner_attention(q, k, v, causal=True, hidden_states=hidden, **kwargs)
    lengths = torch.tensor([5, 9, 1])
    prefix = 9
    state = combiner_prefill_state(
        q[:, :, :prefix],
        k[:, :, :prefix],
        v[:, :, :prefix],
        lengths,
        hidden_states=None if hidden is None else hidden[:, :prefix],
        **kwargs,
    )
    position = lengths.clone()
    rows = torch.arange(batch)
    with torch.no_grad():
        for step in range(14):
            valid = torch.ones(batch, dtype=torch.bool)
            if step == 3:
                valid[1] = False  # a padding token: sample 1 must not move
            at = position
            out, state = combiner_step(
                q[rows, :, at],
                k[rows, :, at],
                v[rows, :, at],
                state,
                valid=valid,
                hidden_states=None if hidden is None else hidden[rows, at],
                **kwargs,
            )
            torch.testing.assert_close(out[valid], full[rows, :, at][valid], rtol=0, atol=1e-5)
            position = position + valid.long()
    assert state["length"].tolist() == position.tolist()


def test_step_cost_does_not_grow_with_the_prefix():
    """Fixed decoding attends to s + L/s entries: the span-summary buffer holds O(L/s) entries, not L (L/s filled,
    the same again of headroom for the next appends: the doubling a step would do, done inside the prefill)."""
    q, k, v = (torch.randn(1, 1, 256, DIM) for _ in range(3))
    state = combiner_prefill_state(q, k, v, torch.tensor([256]), combiner_type="fixed", block_size=16)
    assert state["span_k"].shape[2] == 2 * 16 and state["seg_k"].shape[2] == 16
    state = combiner_prefill_state(
        q,
        k,
        v,
        torch.tensor([256]),
        combiner_type="axial",
        block_size=16,
        abstraction_key_fn=lambda a, x: a,
        hidden_states=torch.randn(1, 256, DIM),
    )
    assert state["abs_k"].shape[2:4] == (2 * 16, 16) and state["row_k"].shape[2] == 16


# ---------------------------------------------------------------------- checkpointed segments (training memory)
def _segmented_matches_reference(q, k, v, kwargs, rows, grad_out, segment_size):
    """The op in segments of `segment_size` (autograd on) against the float64 dense reference: the outputs on the
    real rows and the gradients of q, k, v (finite). Returns the op's leaves and output."""
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    fast = combiner_attention(*leaves, **kwargs, segment_size=segment_size)
    reference = combiner_reference(*leaves64, **kwargs)
    torch.testing.assert_close(fast.double()[rows], reference[rows], rtol=0, atol=1e-5)
    grads = torch.autograd.grad((fast * grad_out).sum(), leaves)
    grads64 = torch.autograd.grad((reference * grad_out.double()).sum(), leaves64)
    for got, want in zip(grads, grads64):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)
    return leaves, fast


@pytest.mark.parametrize("segment_size", [3, 4])
@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length, mask_kind", [(16, "none"), (15, "holes"), (14, "left")])
def test_segmented_op_matches_reference_with_gradients(variant, causal, length, mask_kind, segment_size):
    """With autograd on and L > segment_size the logits are formed segment by segment under checkpoint: outputs and
    the gradients of q, k, v equal the dense reference's (float64), and the one-piece op's."""
    q, k, v = make_qkv(length, seed=11)
    mask = make_mask(length, mask_kind)
    kwargs = kwargs_for(variant, causal, length, mask)
    rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
    grad_out = torch.randn(BATCH, HEADS, length, DIM, generator=torch.Generator().manual_seed(12)) * rows
    leaves, fast = _segmented_matches_reference(q, k, v, kwargs, rows, grad_out, segment_size)
    one_piece = combiner_attention(*leaves, **kwargs, segment_size=0)
    torch.testing.assert_close(fast[rows], one_piece[rows], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("variant", COMBINER_TYPES)
def test_segmented_op_bfloat16_matches_one_piece(variant):
    """bfloat16, causal, padded: the segmented op equals the one-piece op (outputs and gradients) up to bf16
    rounding, and both stay finite with logits of order 1e3."""
    length = 16
    mask = make_mask(length, "right")
    rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
    for scale in (1.0, 40.0):
        q, k, v = (t.to(torch.bfloat16) for t in make_qkv(length, seed=13, scale=scale))
        kwargs = kwargs_for(variant, True, length, mask)
        if variant == "axial":
            kwargs["abstraction_key_fn"] = lambda a, x: a * 2.0
        results = []
        for segment_size in (4, 0):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = combiner_attention(*leaves, **kwargs, segment_size=segment_size)
            grads = torch.autograd.grad((out.float() * rows).sum(), leaves)
            assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
            assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
            results.append((out, grads))
        (out, grads), (out0, grads0) = results
        torch.testing.assert_close(out[rows].float(), out0[rows].float(), rtol=2e-2, atol=2e-2)
        for g, g0 in zip(grads, grads0):
            torch.testing.assert_close(g.float(), g0.float(), rtol=5e-2, atol=5e-2)


def test_segments_only_with_autograd_and_bad_size():
    from hf_efficient.models.combiner.ops_combiner import _segment_rows

    q, k, v = make_qkv(16)
    assert _segment_rows(4, 16, 4, q) == 0  # no autograd: one piece
    assert _segment_rows(4, 8, 4, q.clone().requires_grad_()) == 0  # at most twice the segment: one piece
    assert _segment_rows(4, 9, 4, q.clone().requires_grad_()) == 1
    assert _segment_rows(0, 9, 4, q.clone().requires_grad_()) == 0
    with pytest.raises(ValueError, match="segment_size must be a non-negative int .* got -2"):
        combiner_attention(q.requires_grad_(), k, v, combiner_type="fixed", causal=True, block_size=4, segment_size=-2)


# ---------------------------------------------------------------------- issue 15 / 14 paths
@pytest.mark.parametrize("small_block", [32, 1], ids=["elementwise-small-blocks", "matmul-every-block"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("span_summary", ["max", "mean"])
def test_logsparse_block_product_forms_match_reference(small_block, causal, span_summary, monkeypatch):
    """Logsparse forms its per-block products elementwise below `_SMALL_BLOCK` positions and as batched matmuls from
    it on; both forms (forced here at small sizes), one piece and segmented, equal the dense reference in outputs
    and gradients (float64 reference, left padding and holes)."""
    from hf_efficient.models.combiner import ops_combiner

    monkeypatch.setattr(ops_combiner, "_SMALL_BLOCK", small_block)
    length = 15
    q, k, v = make_qkv(length, seed=21)
    mask = make_mask(length, "holes")
    kwargs = kwargs_for("logsparse", causal, length, mask, span_summary=span_summary)
    rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
    grad_out = torch.randn(BATCH, HEADS, length, DIM, generator=torch.Generator().manual_seed(22)) * rows
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    reference = combiner_reference(*leaves64, **kwargs)
    grads64 = torch.autograd.grad((reference * grad_out.double()).sum(), leaves64)
    for segment_size in (0, 4):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        fast = combiner_attention(*leaves, **kwargs, segment_size=segment_size)
        torch.testing.assert_close(fast.double()[rows], reference[rows], rtol=0, atol=1e-5)
        for got, want in zip(torch.autograd.grad((fast * grad_out).sum(), leaves), grads64):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logsparse_fixed_level_count_equals_default(causal, dtype):
    """`num_levels` beyond ceil(log2 L) (what the model passes while compiling / exporting, from its position
    table) adds only levels with no allowed span: outputs and gradients equal the default level count, padded or
    not; too few levels is an error naming the value."""
    for length, mask_kind in ((13, "right"), (14, "left"), (16, "none")):
        q, k, v = (t.to(dtype) for t in make_qkv(length, seed=23))
        mask = make_mask(length, mask_kind)
        rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
        results = []
        for num_levels in (None, 6):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = combiner_attention(
                *leaves, combiner_type="logsparse", causal=causal, block_size=4, key_mask=mask, num_levels=num_levels
            )
            grads = torch.autograd.grad((out.float() * rows).sum(), leaves)
            assert out.shape == v.shape and out.dtype == dtype
            results.append((out, grads))
        (out, grads), (fixed, fixed_grads) = results
        tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(fixed[rows].float(), out[rows].float(), **tol)
        for got, want in zip(fixed_grads, grads):
            torch.testing.assert_close(got.float(), want.float(), **tol)
    with pytest.raises(ValueError, match="num_levels must be a non-negative int, got -1"):
        combiner_attention(q, k, v, combiner_type="logsparse", causal=True, block_size=4, num_levels=-1)
    with pytest.raises(RuntimeError, match="num_levels=3 covers 8 positions"):
        combiner_attention(q, k, v, combiner_type="logsparse", causal=True, block_size=4, num_levels=3)


@pytest.mark.parametrize("variant", ["mixture", "axial"])
@pytest.mark.parametrize("segment_size", [5, 8])
def test_segmented_rectangular_grid_matches_reference(variant, segment_size):
    """Mixture / Axial on a grid with more rows than columns (block 3, 22 positions -> 8 x 3, bidirectional, holes):
    the column-major products and the column-wise segments of the span summaries equal the dense reference,
    outputs and gradients."""
    length = 22
    q, k, v = make_qkv(length, seed=24)
    mask = torch.ones(BATCH, length, dtype=torch.long)
    mask[0, [2, 9, 10]] = 0
    mask[1, length - 4 :] = 0
    rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
    grad_out = torch.randn(BATCH, HEADS, length, DIM, generator=torch.Generator().manual_seed(25)) * rows
    for causal in (True, False):
        kwargs = kwargs_for(variant, causal, length, mask, block_size=3)
        _segmented_matches_reference(q, k, v, kwargs, rows, grad_out, segment_size)


# ---------------------------------------------------------------------- recomputed segments (issue 15, memory)
def _segment_fn(r0, r1, rows_piece, prefix, whole, unused, frozen):
    """A segment reading its rows of one input, a prefix [0, r1) of another, all of a third (and not the fourth):
    nonlinear in each, so that every gradient path is exercised."""
    head = (rows_piece * prefix.sum(2, keepdim=True).tanh()).sin()
    return head + whole.mean(2, keepdim=True) * frozen[:, :, r0:r1]


@pytest.mark.parametrize("adopt", [True, False], ids=["last-segment-reads-all", "partial-reads-only"])
def test_recomputed_segments_match_plain_autograd(adopt):
    """`_RecomputedSegments` (eager) equals the same segments run under plain autograd, outputs and the gradient of
    every input, with row slices, causal prefixes, whole inputs, an unused input and one that needs no gradient; it
    keeps only its inputs (no activation saved beyond them)."""
    from hf_efficient.models.combiner.ops_combiner import _recomputed_segments, _RecomputedSegments

    generator = torch.Generator().manual_seed(5)
    rows_in, prefix_in, whole_in, unused_in = (
        torch.randn(2, 3, 10, 4, generator=generator, dtype=torch.float64).requires_grad_() for _ in range(4)
    )
    frozen = torch.randn(2, 3, 10, 4, generator=generator, dtype=torch.float64)
    bounds = [(0, 4), (4, 7), (7, 10)] if adopt else [(0, 4), (4, 7)]
    reads = [[(2, r0, r1), (2, 0, r1), None, (2, r0, r1), None] for r0, r1 in bounds]
    tensors = (rows_in, prefix_in, whole_in, unused_in, frozen)
    with saved_for_backward() as saved:
        fast = _recomputed_segments(_segment_fn, bounds, reads, 2, *tensors)
    assert fast.grad_fn.__class__.__name__ == _RecomputedSegments.__name__ + "Backward"
    assert {t.data_ptr() for t in saved} <= {t.data_ptr() for t in tensors}
    plain = torch.cat(
        [
            _segment_fn(r0, r1, rows_in[:, :, r0:r1], prefix_in[:, :, :r1], whole_in, unused_in, frozen)
            for r0, r1 in bounds
        ],
        dim=2,
    )
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    grad_out = torch.randn(plain.shape, generator=generator, dtype=torch.float64)
    want = torch.autograd.grad(plain, (rows_in, prefix_in, whole_in, unused_in), grad_out, allow_unused=True)
    got = torch.autograd.grad(fast, (rows_in, prefix_in, whole_in, unused_in), grad_out, allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros_like(rows_in) if w is None else w
        g = torch.zeros_like(rows_in) if g is None else g
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
    torch.autograd.gradcheck(
        lambda a, b, c: _recomputed_segments(_segment_fn, bounds, reads, 2, a, b, c, unused_in.detach(), frozen),
        (rows_in, prefix_in, whole_in),
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_segmented_mixture_compiles_to_the_eager_result(causal):
    """While compiling, the segments run under `torch.utils.checkpoint` instead of the eager Function (which holds a
    Python callable): the compiled segmented Mixture op (full graph) equals eager, outputs and gradients."""
    length = 16
    mask = make_mask(length, "right")
    q, k, v = make_qkv(length, seed=21)
    kwargs = kwargs_for("mixture", causal, length, mask)

    def op(q, k, v):
        return combiner_attention(q, k, v, **kwargs, segment_size=3)

    results = []
    for fn in (op, torch.compile(op, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        results.append((out, torch.autograd.grad(out.square().sum(), leaves)))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for g, w in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_recomputed_segments_recompute_under_the_forward_autocast_state():
    """Under `torch.autocast`, the backward recomputes each segment in the dtypes its forward ran in (as
    torch.utils.checkpoint does), so the gradients are those of the computation that produced the output."""
    from hf_efficient.models.combiner.ops_combiner import _recomputed_segments

    seen = []

    def fn(r0, r1, a, b):
        product = a @ b.transpose(-1, -2)  # autocast: bfloat16
        seen.append((torch.is_autocast_enabled("cpu"), product.dtype))
        return product.float().softmax(-1) @ b.float()

    a, b = (torch.randn(1, 2, 8, 4).requires_grad_() for _ in range(2))
    bounds = [(0, 4), (4, 8)]
    reads = [[(2, r0, r1), None] for r0, r1 in bounds]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _recomputed_segments(fn, bounds, reads, 2, a, b)
    forward_calls = list(seen)
    out.sum().backward()
    assert forward_calls == [(True, torch.bfloat16)] * 2
    assert seen[2:] == [(True, torch.bfloat16)] * 2  # the recomputation, outside the autocast block
    assert a.grad is not None and torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# ---------------------------------------------------------------------- masks as additive biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_additive_masks_equal_masked_fill(dtype):
    """The ops apply masks by adding `_additive_mask` (0 / the most negative finite value) and by multiplying, not by
    broadcast `masked_fill` (much slower on CPU): the same softmax (masked entries exactly 0, an all-masked row
    finite), the same max pool (an empty span 0), and the caller's mask untouched."""
    from hf_efficient.models.combiner import ops_combiner

    generator = torch.Generator().manual_seed(3)
    logits = (torch.randn(2, 3, 5, 7, generator=generator) * 30).to(dtype)  # large logits: x + min must stay min
    allowed = torch.rand(2, 1, 5, 7, generator=generator) > 0.5
    allowed[0, 0, 1] = False  # a row with no allowed entry
    allowed[1, 0, 2] = True
    compute = torch.promote_types(dtype, torch.float32)
    expected = torch.softmax(logits.to(compute).masked_fill(~allowed, torch.finfo(compute).min), dim=-1).to(dtype)
    got = ops_combiner.masked_softmax(logits, allowed)
    assert torch.equal(got, expected)
    assert torch.isfinite(got).all()
    masked_in_live_rows = ~allowed & allowed.any(-1, keepdim=True)
    assert (got[masked_in_live_rows.expand_as(got)] == 0).all()

    # negative values: in float16, x + min would overflow to -inf (and an empty span's 0 * -inf to NaN)
    x = (-100 * torch.rand(2, 3, 5, 7, 4, generator=generator) - 20).to(dtype)
    real = allowed[..., None]
    pooled = ops_combiner.pool(x, real, dim=3, span_summary="max")
    reference = x.masked_fill(~real, float("-inf")).amax(dim=3)
    reference = torch.where(real.any(dim=3), reference, torch.zeros_like(reference))
    assert torch.equal(pooled, reference)

    float_mask = allowed.to(dtype)
    before = float_mask.clone()
    ops_combiner._additive_mask(float_mask, dtype)
    assert torch.equal(float_mask, before)


# ---------------------------------------------------------------------- the ablation without span summaries
def block_local_reference(q, k, v, block_size, causal, key_mask):
    """Dense attention where position i sees j only in its own segment of `block_size` (and j <= i when causal),
    float64: the Fixed op without span summaries."""
    length = q.shape[2]
    position = torch.arange(length)
    allowed = (position[:, None] // block_size) == (position[None, :] // block_size)
    if causal:
        allowed = allowed & (position[None, :] <= position[:, None])
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights @ v.double()


@pytest.mark.parametrize("segment_size", [0, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("length, mask_kind", [(16, "none"), (15, "holes"), (14, "left")])
def test_fixed_without_spans_is_block_local_attention(causal, length, mask_kind, segment_size):
    """`use_spans=False` (CombinerConfig.use_span_summaries=False): outputs and gradients equal dense attention
    restricted to the own segment, in one piece and by recomputed segments; with the spans the op differs."""
    q, k, v = (t.requires_grad_() for t in make_qkv(length, seed=5))
    mask = make_mask(length, mask_kind)
    kwargs = dict(combiner_type="fixed", causal=causal, block_size=BLOCK, key_mask=mask)
    rows = real_rows(mask, length)[:, None, :, None].expand(BATCH, HEADS, length, DIM)
    got = combiner_attention(q, k, v, use_spans=False, segment_size=segment_size, **kwargs)
    want = block_local_reference(q, k, v, BLOCK, causal, mask)
    torch.testing.assert_close(got[rows].double(), want[rows], rtol=1e-5, atol=1e-6)
    grad_out = torch.randn(got.shape, generator=torch.Generator().manual_seed(2)) * rows
    grads = torch.autograd.grad((got * grad_out).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((want * grad_out.double()).sum(), (q, k, v))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-5)
    with_spans = combiner_attention(q, k, v, **kwargs)
    assert (with_spans - got)[rows].abs().max() > 1e-2


def test_fixed_without_spans_decoding_equals_the_op():
    """Prefill + single steps without span summaries equal the causal op at every position; the state keeps no
    summary buffer; the other Combiner types refuse `use_spans=False`."""
    batch, total = 2, 19
    generator = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(batch, HEADS, total, DIM, generator=generator) for _ in range(3))
    kwargs = dict(combiner_type="fixed", block_size=BLOCK, use_spans=False)
    full = combiner_attention(q, k, v, causal=True, **kwargs)
    lengths = torch.tensor([6, 3])
    state = combiner_prefill_state(q[:, :, :6], k[:, :, :6], v[:, :, :6], lengths, **kwargs)
    assert "span_k" not in state and "span_v" not in state
    rows = torch.arange(batch)
    position = lengths.clone()
    with torch.no_grad():
        for _ in range(12):
            out, state = combiner_step(
                q[rows, :, position], k[rows, :, position], v[rows, :, position], state, **kwargs
            )
            torch.testing.assert_close(out, full[rows, :, position], rtol=0, atol=1e-5)
            position = position + 1
    assert "span_k" not in state
    for variant in ("logsparse", "axial", "mixture"):
        with pytest.raises(ValueError, match="use_spans=False.*'fixed' only"):
            combiner_attention(q, k, v, combiner_type=variant, causal=True, block_size=BLOCK, use_spans=False)
    with pytest.raises(ValueError, match="use_spans must be a bool"):
        combiner_attention(q, k, v, combiner_type="fixed", causal=True, block_size=BLOCK, use_spans=1)
