"""The fast ops of Combiner (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost",
NeurIPS 2021): pure functions on tensors, no modules and no parameters of their own.

Every head of every variant attends to *every* allowed position, directly or through a span abstraction:

    A(x_i) = sum_{j in Omega0(i)} p(j | i) v_j + sum_r p(Omega_r | i) v_{Omega_r}

    logits:      direct  q_i . k_j / sqrt(d)           span  q_i . k_{Omega_r} / sqrt(d)
    span key:    k_Omega = pool_{j in Omega} k_j       (pool = max (paper default), mean or sum)
    span value:  v_Omega = sum_{j in Omega} softmax_j(q_Omega . k_j / sqrt(d)) v_j,   q_Omega = pool_{j in Omega} q_j

with **one** softmax over the concatenation [direct logits, span logits] and no log|Omega| correction. The
implied attention matrix is `p(j|i) = p_direct(j|i) + sum_{r: j in Omega_r} p(Omega_r|i) * p(j|Omega_r)`: a proper
distribution over every allowed key, never zero on one (the full-attention property).

Shapes: `q, k` are `(B, H, L, D)`, `v` is `(B, H, L, Dv)`; `key_mask` is `(B, L)` with 1 for real positions and
0 for padding. `1/sqrt(D)` is applied once, to `q`, before anything else (pooling commutes with it).

Conventions shared by the four variants (the papers leave them open; tests pin them down):

- **Padding.** Lengths that are not a multiple of the block size are padded internally to `Lp` and masked. A padded
  position is excluded from every direct softmax, every pooled summary (queries and keys) and every within-span
  softmax; a span without a real position gets no weight. Outputs at padded query positions are finite but
  unspecified. (The model packs each sample's real tokens to the front, so blocks are aligned on the first real
  token and a left-padded sample equals the sample alone.)
- **Bidirectional form.** The spans exclude the directly attended region: no position is counted twice. (The
  official TF code puts the own segment / own row among the spans as well; we do not.)
- **Numerics.** Logits are computed in the input dtype, the softmaxes in float32 (at least) with max subtraction,
  and masked entries are filled with the dtype's most negative value rather than -inf, so no row ever produces NaN.
- **Cost.** No `L x L` tensor is ever built: segments/rows are reshaped into blocks and the direct and span logits
  of a block are concatenated for one softmax. Memory is O(L (s + L/s)) for Fixed, Axial and Mixture (O(L sqrt L)
  at `s ~ sqrt L`) and O(L log L) for Logsparse. There is no Python loop over positions or segments; Logsparse loops
  over its ceil(log2 L) levels, which is O(log L) iterations of vectorised work.

Decoding with a cache is in decoding_combiner.py (`combiner_prefill_state`, `combiner_step`, `combiner_chunk_step`):
one new token per sample against the summaries of completed spans, O(s + L/s) (Fixed, Axial, Mixture) or O(log L)
spans (Logsparse) per step. It reuses the public helpers here (span summaries, masked softmaxes, padding).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

COMBINER_TYPES = ("fixed", "logsparse", "axial", "mixture")
# With autograd on, a sequence longer than twice this many positions runs its per-query work in recomputed segments
# of about this many positions (`_by_segments`): the saved activations are then one segment's logits, not the
# sequence's. Shorter sequences run in one piece (no recomputation: the short-context speed is kept).
SEGMENT_POSITIONS = 2048
SPAN_SUMMARIES = ("max", "mean", "sum")


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers: masks, padding, pooling, softmax
# ----------------------------------------------------------------------------------------------------------------------
def check_span_summary(span_summary: str) -> None:
    """Raise a ValueError naming the choices unless `span_summary` is one of `SPAN_SUMMARIES`."""
    if span_summary not in SPAN_SUMMARIES:
        raise ValueError(f"Unknown span_summary {span_summary!r}; expected one of {SPAN_SUMMARIES}.")


def check_use_spans(use_spans: bool, combiner_type: str) -> None:
    """The ablation without span summaries (`use_spans=False`) is defined for Combiner-Fixed only: a ValueError
    otherwise (Axial without its row abstractions is the same block-local attention; Logsparse would keep only the
    position itself)."""
    if not isinstance(use_spans, bool):
        raise ValueError(f"use_spans must be a bool, got {use_spans!r}.")
    if not use_spans and combiner_type != "fixed":
        raise ValueError(
            f"use_spans=False (no span summaries) is defined for combiner_type='fixed' only, got {combiner_type!r} "
            "(Axial without its abstractions is the same block-local attention as Fixed without spans)."
        )


def _real_mask(key_mask: torch.Tensor | None, batch_size: int, length: int, device) -> torch.Tensor:
    """`(B, L)` bool, True for real positions."""
    if key_mask is None:
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    if key_mask.shape != (batch_size, length):
        raise ValueError(f"key_mask must have shape {(batch_size, length)}, got {tuple(key_mask.shape)}.")
    return key_mask.bool()


def pad_to_length(x: torch.Tensor, target: int, dim: int = -2, static: bool = False) -> torch.Tensor:
    """Zero-pad `x` (any shape, `x.shape[dim] <= target`) along `dim` to length `target`: `x`'s shape with
    `target` at `dim`.

    `static`: `target` is a fixed size and `x`'s length may be symbolic (`torch.export` with a dynamic length): pad
    with `target` zeros and cut back to `target`, so that no tensor has the symbolic size `target - L` (which would
    guard on it being 0 or 1)."""
    if static:
        shape = list(x.shape)
        shape[dim] = target
        return torch.cat([x, x.new_zeros(shape)], dim=dim).narrow(dim, 0, target)
    missing = target - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`allowed` (bool) as a float tensor: 0 where True, the most negative finite value of `dtype` where False.

    Added to finite values it has the effect of `masked_fill(~allowed, min)`: `x + min` rounds to exactly `min` for
    any |x| < 2^103 (float32 / bfloat16), and `x + 0` is `x`. On CPU a `masked_fill` or `where` whose bool mask is
    broadcast (over heads, over the feature dim) runs ~30x slower than a broadcast add, which made the masks a large
    share of the Combiner ops' time; the mask itself is small (no head dim), so converting it is cheap.
    """
    return (allowed.to(dtype) - 1) * -torch.finfo(dtype).min  # out of place: `.to` may return `allowed` itself


def lowest_where_not(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`x` (any shape) with the entries where `keep` (bool, broadcastable to `x`) is False at the most negative
    finite value, `x`'s shape: for max pooling, never picked over a kept entry, and finite, so that an empty span can
    be zeroed by a multiplication."""
    if x.dtype == torch.float16:  # `x + min` can overflow to -inf in float16 (its spacing at the max is 32)
        return x.masked_fill(~keep, torch.finfo(x.dtype).min)
    return x + _additive_mask(keep, x.dtype)


def zero_where_not(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`x` (any shape) with the entries where `keep` (bool, broadcastable to `x`) is False set to 0, for finite `x`,
    `x`'s shape: a multiplication by the mask (exact: `x * 1 = x`, `x * 0 = +-0`), not a broadcast `masked_fill` (see
    `_additive_mask`)."""
    return x * keep.to(x.dtype)


def masked_softmax(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Masked softmax over the last dim, in float32 (or wider) with max subtraction, returned in `logits.dtype`:
    `logits (..., n)` -> `(..., n)`. `allowed`: bool, broadcastable to `logits` (pass it unexpanded: it is converted at
    its own size).

    Masked entries get the most negative finite value instead of -inf (`_additive_mask`): a row with at least one
    allowed entry gives them exactly 0, and a row with none (a padded query, an empty span) gives finite junk
    instead of NaN (callers give such rows no weight).
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    wide = logits.to(compute_dtype) + _additive_mask(allowed, compute_dtype)
    return torch.softmax(wide, dim=-1).to(logits.dtype)


def joint_softmax(parts: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> list[torch.Tensor]:
    """One softmax over the concatenation of several logit blocks (direct and span logits) along the last dim.

    Each part is `(logits (B, H, ..., n_i), allowed)`; logits of all parts share their leading dims, and each mask
    (bool) broadcasts to `(B, 1, ..., n_i)` (masks never depend on the head). Returns the probabilities split back
    into the parts, `(B, H, ..., n_i)` each, in `dtype`.
    """
    logits = torch.cat([part for part, _ in parts], dim=-1)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    # The masks never depend on the head: converted at their own size, concatenated with a head dim of 1 and
    # broadcast by the add.
    bias = torch.cat(
        [_additive_mask(mask, compute_dtype).expand(part.shape[0], 1, *part.shape[2:]) for part, mask in parts], dim=-1
    )
    # In place: `wide` is fresh (from the cat or the upcast), and neither's backward reads its output.
    wide = logits.to(compute_dtype).add_(bias)
    probs = torch.softmax(wide, dim=-1).to(dtype)
    return list(probs.split([part.shape[-1] for part, _ in parts], dim=-1))


def _segment_rows(segment_size: int | None, length: int, row_size: int, *tensors: torch.Tensor) -> int:
    """Rows (blocks of `row_size` positions) per recomputed segment; 0 = run in one piece (no autograd needed, or
    `length`, the unpadded sequence length, is at most twice the segment)."""
    positions = SEGMENT_POSITIONS if segment_size is None else segment_size
    if not isinstance(positions, int) or positions < 0:
        raise ValueError(f"segment_size must be a non-negative int (0 = one piece), got {segment_size!r}.")
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if not needs_grad or positions == 0 or length <= 2 * positions:
        return 0
    return max(1, positions // row_size)


def _recomputed(fn: Callable, enabled, *tensors: torch.Tensor):
    """`fn(*tensors)`, under non-reentrant checkpoint when `enabled`: for the O(L d) summaries of the segmented ops,
    whose internals (pooling indices, within-span softmaxes, layout copies) are cheaper to recompute than to keep."""
    if not enabled:
        return fn(*tensors)
    return torch.utils.checkpoint.checkpoint(fn, *tensors, use_reentrant=False, preserve_rng_state=False)


def _by_segments(fn: Callable, rows: int, per_segment: int, *tensors: torch.Tensor, reads=None) -> torch.Tensor:
    """`fn(r0, r1, *pieces)` -> the output of rows `[r0, r1)` (stacked along dim 2), over all `rows`.

    `reads(r0, r1)` gives, per tensor, the slice `(dim, start, stop)` rows `[r0, r1)` read, or None for the whole
    tensor; `fn` gets those pieces (None: every tensor whole, `fn` slices itself). `per_segment = 0`: one call, on
    the whole tensors (the pieces of rows `[0, rows)`). Otherwise one call per segment of rows, recomputed in the
    backward (`_recomputed_segments`): the forward keeps only the inputs, and the backward recomputes one segment's
    logits and softmax at a time. Same maths, about one extra forward of the per-query work in time. The loop is
    over segments of thousands of positions, not over positions.
    """
    if not per_segment:
        return fn(0, rows, *tensors)
    bounds = [(r0, min(r0 + per_segment, rows)) for r0 in range(0, rows, per_segment)]
    specs = [reads(r0, r1) if reads is not None else [None] * len(tensors) for r0, r1 in bounds]
    return _recomputed_segments(fn, bounds, specs, 2, *tensors)


def _piece(t: torch.Tensor, read) -> torch.Tensor:
    """The slice `read = (dim, start, stop)` of `t` (a view), or all of `t` for None."""
    return t if read is None else t.narrow(read[0], read[1], read[2] - read[1])


class _RecomputedSegments(torch.autograd.Function):
    """`out[r0:r1] = fn(r0, r1, *pieces)` along `out_dim` for every segment, keeping only the inputs: the backward
    recomputes one segment at a time and adds its pieces' gradients in place into full-size gradient buffers.

    `reads[i]` gives, per input, the slice `(dim, start, stop)` segment `i` reads, or None (the whole tensor). What
    the forward allocates is the output buffer; what the backward allocates is one gradient buffer per input: no
    per-segment output pieces, concatenations or gradient pieces outlive their segment. (Under
    `torch.utils.checkpoint` they do, interleaved with the segments' temporaries, and the process heap keeps the
    holes: about 200 MB of resident memory per layer of Combiner-Mixture at 16k, beyond its live tensors.)
    Gradient buffers are made when first needed; a segment that reads a whole input gives the buffer itself.
    """

    @staticmethod
    def forward(ctx, fn, bounds, reads, out_dim, *tensors):
        out = None
        for (r0, r1), read in zip(bounds, reads):
            piece = fn(r0, r1, *(_piece(t, sl) for t, sl in zip(tensors, read)))
            if out is None:
                shape = list(piece.shape)
                shape[out_dim] = bounds[-1][1]
                out = piece.new_empty(shape)
            out.narrow(out_dim, r0, r1 - r0).copy_(piece)
            del piece
        ctx.fn, ctx.bounds, ctx.reads, ctx.out_dim = fn, bounds, reads, out_dim
        # The backward's recomputation runs under the forward's autocast state (as torch.utils.checkpoint does):
        # under torch.autocast the segments are recomputed in the same dtypes they ran in.
        device_type = tensors[0].device.type
        ctx.autocast = dict(
            device_type=device_type,
            dtype=torch.get_autocast_dtype(device_type),
            enabled=torch.is_autocast_enabled(device_type),
        )
        ctx.save_for_backward(*tensors)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward: a clear error, not a silently wrong result
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors
        wanted = ctx.needs_input_grad[4:]
        grads = [None] * len(tensors)  # allocated on first use (or adopted, see below)
        taken = {grad_out.untyped_storage().data_ptr()}
        # Last segment first: a causal segment reads a prefix of some inputs, and the last one reads all of it, so
        # its gradient can become the buffer itself instead of being added into a zero-filled one.
        for (r0, r1), read in reversed(list(zip(ctx.bounds, ctx.reads))):
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                pieces = [_piece(t, sl).detach().requires_grad_(need) for t, sl, need in zip(tensors, read, wanted)]
                out = ctx.fn(r0, r1, *pieces)
            leaves = [p for p, need in zip(pieces, wanted) if need]
            piece_grads = list(
                torch.autograd.grad(out, leaves, grad_out.narrow(ctx.out_dim, r0, r1 - r0), allow_unused=True)
            )
            del out, pieces, leaves
            for j, (t, sl, need) in enumerate(zip(tensors, read, wanted)):
                if not need:
                    continue
                piece_grad = piece_grads.pop(0)  # dropped once added: one segment's gradients alive at a time
                if piece_grad is None:
                    continue
                whole = sl is None or (sl[1] == 0 and sl[2] == t.shape[sl[0]])
                storage = piece_grad.untyped_storage().data_ptr()
                if grads[j] is None and whole and storage not in taken and 0 not in piece_grad.stride():
                    grads[j] = piece_grad
                    taken.add(storage)
                    continue
                if grads[j] is None:
                    grads[j] = torch.zeros_like(t)
                _piece(grads[j], sl).add_(piece_grad)
                del piece_grad
        return None, None, None, None, *grads


def _recomputed_segments(fn: Callable, bounds, reads, out_dim: int, *tensors: torch.Tensor) -> torch.Tensor:
    """`fn(r0, r1, *pieces)` for every `(r0, r1)` in `bounds`, concatenated along `out_dim`, recomputed in the
    backward; `reads[i]` is segment i's slice spec per input (see `_RecomputedSegments`).

    Eager runs `_RecomputedSegments`. While compiling, each segment runs under non-reentrant `torch.utils.checkpoint`
    instead (which the compiler traces; a Function holding a Python callable is not traceable), on the same slices.
    """
    if not torch.compiler.is_compiling():
        return _RecomputedSegments.apply(fn, bounds, reads, out_dim, *tensors)
    outputs = [
        torch.utils.checkpoint.checkpoint(
            fn,
            r0,
            r1,
            *(_piece(t, sl) for t, sl in zip(tensors, read)),
            use_reentrant=False,
            preserve_rng_state=False,
        )
        for (r0, r1), read in zip(bounds, reads)
    ]
    return torch.cat(outputs, dim=out_dim)


def _split_segments(fn: Callable, rows: int, per_segment: int, *tensors: torch.Tensor) -> torch.Tensor:
    """`_by_segments` for inputs that each segment reads along dim 2 only: `fn(r0, r1, *pieces)` gets the rows
    `[r0, r1)` of every tensor, and its gradients go straight into one gradient buffer per input."""
    return _by_segments(fn, rows, per_segment, *tensors, reads=lambda r0, r1: [(2, r0, r1)] * len(tensors))


def pool(x: torch.Tensor, real: torch.Tensor, dim: int, span_summary: str) -> torch.Tensor:
    """Pool `x` over `dim` using only the entries where `real` (broadcastable bool) is True.

    max: elementwise max; mean: average; sum: sum. A span with no real entry pools to 0 (callers give it no weight).
    """
    if real.dim() != x.dim():
        real = real.expand_as(x)
    if span_summary == "max":
        pooled = lowest_where_not(x, real).amax(dim=dim)
        return zero_where_not(pooled, real.any(dim=dim))  # the mask's own size (no head / feature dims)
    total = zero_where_not(x, real).sum(dim=dim)
    if span_summary == "sum":
        return total
    return total / real.expand_as(x).sum(dim=dim).clamp(min=1).to(x.dtype)


def _doubling_scan(x: torch.Tensor, dim: int, op: Callable, reverse: bool) -> torch.Tensor:
    """Inclusive running `op` (torch.maximum / torch.minimum) along `dim` (from the end when `reverse`), by
    ceil(log2 n) vectorised doubling steps (Hillis-Steele) between two buffers: the same values as `cummax` /
    `cummin`, which scan element by element and are several times slower on CPU. Returns a fresh tensor."""
    n = x.shape[dim]
    buffers = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(2 if n > 2 else 1)]
    step, source = 1, x
    while step < n:
        target = buffers[0] if source is not buffers[0] else buffers[-1]
        if reverse:
            target.narrow(dim, n - step, step).copy_(source.narrow(dim, n - step, step))
            op(
                source.narrow(dim, 0, n - step),
                source.narrow(dim, step, n - step),
                out=target.narrow(dim, 0, n - step),
            )
        else:
            target.narrow(dim, 0, step).copy_(source.narrow(dim, 0, step))
            op(
                source.narrow(dim, step, n - step),
                source.narrow(dim, 0, n - step),
                out=target.narrow(dim, step, n - step),
            )
        source = target
        step *= 2
    return source if source is not x else x.clone()


class _ExclusiveRunningMax(torch.autograd.Function):
    """Exclusive running max of `x` over the entries where `real`, 0 where `nonempty` is False: the `max` branch of
    `cumulative_pool`, with `cummax`'s exact values and gradients (the whole gradient of an output entry goes to the
    last maximal entry of its span in scan order, as `cummax` picks it) but computed by doubling steps. Kept for the
    backward: the argmax indices only (int64, as `cummax` keeps them)."""

    @staticmethod
    def forward(ctx, x, real, nonempty, dim: int, reverse: bool):
        n = x.shape[dim]
        # Masked entries at the most negative finite value (not -inf): a span with no real entry gets no weight
        # (`nonempty`), and the mask is applied by a multiplication below, which -inf would turn into NaN.
        masked = lowest_where_not(x, real)
        running = _doubling_scan(masked, dim, torch.maximum, reverse)  # inclusive
        out = torch.zeros_like(running)
        if reverse:
            out.narrow(dim, 0, n - 1).copy_(running.narrow(dim, 1, n - 1))
        else:
            out.narrow(dim, 1, n - 1).copy_(running.narrow(dim, 0, n - 1))
        out.mul_(nonempty.to(out.dtype))
        if ctx.needs_input_grad[0]:
            # Argmax of the inclusive running max at each entry: the last (first, scanning from the end) entry that
            # reaches the running max, i.e. cummax's index (ties go to the entry scanned last).
            # Small integers (uint8 up to 255 entries): the candidate positions are a product, not a `where`.
            index_dtype = torch.uint8 if n <= 255 else torch.int32
            position = torch.arange(n, device=x.device, dtype=index_dtype).view(n, *([1] * (x.dim() - dim - 1)))
            reaches = torch.eq(masked, running)
            reaches = reaches.view(index_dtype) if index_dtype == torch.uint8 else reaches.to(index_dtype)
            if reverse:
                index = _doubling_scan(n - reaches * (n - position), dim, torch.minimum, True)
            else:
                index = _doubling_scan(reaches * position, dim, torch.maximum, False)
            ctx.save_for_backward(index, nonempty)  # uint8 / int32, not cummax's int64
        ctx.dim, ctx.reverse, ctx.n = dim, reverse, n
        return out

    @staticmethod
    def backward(ctx, grad):
        index, nonempty = ctx.saved_tensors
        index = index.long()
        dim, n = ctx.dim, ctx.n
        grad = grad * nonempty.to(grad.dtype)
        grad_x = torch.zeros(index.shape, dtype=grad.dtype, device=grad.device)
        if ctx.reverse:  # output entry t reads the running max at t + 1
            grad_x.scatter_add_(dim, index.narrow(dim, 1, n - 1), grad.narrow(dim, 0, n - 1))
        else:
            grad_x.scatter_add_(dim, index.narrow(dim, 0, n - 1), grad.narrow(dim, 1, n - 1))
        return grad_x, None, None, None, None


def cumulative_pool(
    x: torch.Tensor, real: torch.Tensor, dim: int, span_summary: str, reverse: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """*Exclusive* running pool along `dim`: entry `t` pools the real entries strictly before `t` (strictly after it
    with `reverse=True`). `real` is a bool mask broadcastable to `x` with the full size along `dim`. Returns the pooled
    tensor and a bool tensor (shaped like `real`) saying whether that span holds a real entry.

    This is the summary of the spans "column above the current row" and "row left / right of the current column"
    of Combiner-Mixture: O(size of x), no quadratic work. (The official TF code's `approx_cummax` is a cumsum; this
    is a real running max for `max`, as in the official JAX code.)

    Eagerly, `max` runs `_ExclusiveRunningMax` (doubling steps, no flips; cummax's values and gradients); while
    compiling or exporting, the plain cummax form below (same maths), which traces with a symbolic length.
    """
    dim = dim % x.dim()
    length = x.shape[dim]
    if span_summary == "max" and length > 1 and not torch.compiler.is_compiling():
        with torch.no_grad():
            inclusive = real.to(torch.int32).cumsum(dim)
            if reverse:  # real entries strictly after t: total - inclusive count up to t
                nonempty = inclusive.narrow(dim, length - 1, 1) > inclusive
            else:  # strictly before t
                nonempty = inclusive > real
        return _ExclusiveRunningMax.apply(x, real, nonempty, dim, reverse), nonempty
    if reverse:
        x, real = x.flip(dim), real.flip(dim)

    def shift(t: torch.Tensor, fill) -> torch.Tensor:
        # Exclusive: move everything one step along `dim`, the first entry becoming the empty span.
        first = torch.full_like(t.narrow(dim, 0, 1), fill)
        return torch.cat([first, t.narrow(dim, 0, length - 1)], dim=dim)

    count = shift(real.long().cumsum(dim), 0)
    if span_summary == "max":
        running = x.masked_fill(~real, float("-inf")).cummax(dim=dim).values
        pooled = shift(running, float("-inf"))
        pooled = torch.where(count > 0, pooled, torch.zeros_like(pooled))
    else:
        pooled = shift(zero_where_not(x, real).cumsum(dim), 0.0)
        if span_summary == "mean":
            pooled = pooled / count.clamp(min=1).to(x.dtype)
    nonempty = count > 0
    if reverse:
        pooled, nonempty = pooled.flip(dim), nonempty.flip(dim)
    return pooled, nonempty


def block_summaries(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor, span_summary: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Abstractions of spans laid out as blocks along dim -2: `q, k` `(..., n, s, D)`, `v` `(..., n, s, Dv)`,
    `real` `(..., n, s)` bool (broadcastable over heads).

    Returns `k_Omega (..., n, D)`, `v_Omega (..., n, Dv)` and `nonempty (..., n)`:
    `k_Omega = pool(k)`, `v_Omega = softmax_j(pool(q) . k_j) v_j` over the real `j` of each block (`q` pre-scaled).
    """
    real_e = real[..., None]
    span_query = pool(q, real_e, dim=-2, span_summary=span_summary)
    span_key = pool(k, real_e, dim=-2, span_summary=span_summary)
    inner = (k @ span_query[..., None])[..., 0]  # (..., n, s): batched (s, D) @ (D, 1), no layout copy
    weights = masked_softmax(inner, real).to(v.dtype)
    span_value = (weights[..., None, :] @ v)[..., 0, :]
    return span_key, span_value, real.any(dim=-1)


def _prepare(q, k, v, key_mask, block_size: int | None):
    """Scale q once, build the real mask and pad q, k, v, mask to a multiple of `block_size`."""
    batch_size, _, length, head_dim = q.shape
    if k.shape[:3] != q.shape[:3] or k.shape[-1] != head_dim or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be (B, H, L, D) alike, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    real = _real_mask(key_mask, batch_size, length, q.device)
    q = q * head_dim**-0.5
    if block_size is None:
        return q, k, v, real, length
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}.")
    padded = -(-length // block_size) * block_size
    q, k, v = (pad_to_length(t, padded) for t in (q, k, v))
    real = pad_to_length(real, padded, dim=-1)
    return q, k, v, real, padded


# ----------------------------------------------------------------------------------------------------------------------
# Combiner-Fixed
# ----------------------------------------------------------------------------------------------------------------------
def fixed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    block_size: int,
    key_mask: torch.Tensor | None = None,
    span_summary: str = "max",
    segment_size: int | None = None,
    use_spans: bool = True,
) -> torch.Tensor:
    r"""Combiner-Fixed: segments of `s = block_size` positions.

    For `i` in segment `n`:
        Omega0(i) = segment n (its causal prefix `j <= i` when causal)
        spans     = every other segment m != n (strictly earlier ones, m < n, when causal)

    Blocked layout: `(B, H, L, D) -> (B, H, N, s, D)` with `N = Lp / s`. Per segment the direct logits are
    `(N, s, s)` and the span logits `(N, s, N)`; they are concatenated to `(B, H, N, s, s + N)` for one softmax.
    `use_spans=False` is the ablation without span summaries (`CombinerConfig.use_span_summaries`): `Omega0` only,
    i.e. block-local attention within each segment (no summary is computed).
    Cost O(L (s + N)) time and memory. With autograd on and `L > 2 segment_size` (default `SEGMENT_POSITIONS`), the
    logits are formed segment by segment of queries and recomputed in the backward (`_by_segments`): the saved
    activations are then O(L) (the span summaries) plus one segment's logits.

    Returns `(B, H, L, Dv)`.
    """
    check_span_summary(span_summary)
    batch_size, num_heads, length, _ = q.shape
    q, k, v, real, padded = _prepare(q, k, v, key_mask, block_size)
    s, n = block_size, padded // block_size
    qb, kb, vb = (t.unflatten(2, (n, s)) for t in (q, k, v))  # (B, H, N, s, .)
    real_b = real.view(batch_size, 1, n, s)

    per_segment = _segment_rows(segment_size, length, s, q, k, v)
    summaries = ()
    if use_spans:
        span_key, span_value, nonempty = _recomputed(
            lambda qb, kb, vb: block_summaries(qb, kb, vb, real_b, span_summary), per_segment, qb, kb, vb
        )  # (B, H, N, .), (B, 1, N)
        summaries = (span_key, span_value)
    seg = torch.arange(n, device=q.device)
    causal_ok = torch.ones(s, s, dtype=torch.bool, device=q.device).tril() if causal else None

    def segments(n0, n1, qc, kc, vc, *summaries):  # qc, kc, vc: segments [n0, n1)
        direct = qc @ kc.transpose(-1, -2)  # (B, H, n, s, s)
        direct_ok = real_b[:, :, n0:n1, None, :]  # key j is real
        if causal:
            direct_ok = direct_ok & causal_ok
        if not summaries:  # the ablation: the own segment only
            (p_direct,) = joint_softmax([(direct, direct_ok)], vc.dtype)
            return p_direct @ vc
        span_key, span_value = summaries
        span_logits = torch.einsum("bhnid,bhmd->bhnim", qc, span_key)  # (B, H, n, s, N)
        own = seg[n0:n1, None]
        other = seg[None, :] < own if causal else seg[None, :] != own  # [own n, span m]
        span_ok = other[:, None, :] & nonempty[:, :, None, None, :]  # (B, 1, n, 1, N)
        p_direct, p_span = joint_softmax([(direct, direct_ok), (span_logits, span_ok)], vc.dtype)
        return p_direct @ vc + torch.einsum("bhnim,bhmd->bhnid", p_span, span_value)

    # its segments' q, k, v; all summaries
    reads = lambda n0, n1: [(2, n0, n1)] * 3 + [None] * len(summaries)  # noqa: E731
    out = _by_segments(segments, n, per_segment, qb, kb, vb, *summaries, reads=reads)
    return out.flatten(2, 3)[:, :, :length]


# ----------------------------------------------------------------------------------------------------------------------
# Combiner-Logsparse
# ----------------------------------------------------------------------------------------------------------------------
def num_logsparse_levels(length: int) -> int:
    """ceil(log2 L): the number of dyadic span sizes 1, 2, 4, ... a sequence of length L needs."""
    return max(0, (length - 1).bit_length())


# Below this block size the per-block products of Logsparse run as broadcast multiply + sum (one vectorised kernel,
# and a cheap backward); from it on as batched matmuls (no (P, D) temporary). Thousands of tiny matmuls (blocks of
# 2, 4, 8 positions) are slower than the elementwise form, forward and above all backward.
_SMALL_BLOCK = 32


def _block_dots(x: torch.Tensor, y: torch.Tensor, elementwise: bool = True) -> torch.Tensor:
    """`x (..., n, s, D)`, `y (..., n, D)` -> `(..., n, s)`: each row of a block dotted with its block's vector.
    `elementwise=False`: matmuls at every block size (no temporary the size of `x`)."""
    if elementwise and x.shape[-2] < _SMALL_BLOCK:
        return (x * y[..., None, :]).sum(-1)
    return (x @ y[..., None])[..., 0]


def _block_mix(w: torch.Tensor, x: torch.Tensor, elementwise: bool = True) -> torch.Tensor:
    """`w (..., n, s)`, `x (..., n, s, Dv)` -> `(..., n, Dv)`: the `w`-weighted sum of each block's rows."""
    if elementwise and x.shape[-2] < _SMALL_BLOCK:
        return (w[..., None] * x).sum(-2)
    return (w[..., None, :] @ x)[..., 0, :]


def _pair_pool(t: torch.Tensor, span_summary: str) -> torch.Tensor:
    """Pool adjacent pairs along dim 2 (`(B, H, 2n, D)` -> `(B, H, n, D)`): max, or sum (mean divides later)."""
    pairs = t.unflatten(2, (t.shape[2] // 2, 2))
    if span_summary == "max":
        return torch.maximum(pairs[:, :, :, 0], pairs[:, :, :, 1])
    return pairs[:, :, :, 0] + pairs[:, :, :, 1]


def _logsparse_counts(real: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Real positions per aligned block of every level: `(B, 1, P / 2^l)` for l = 0 .. levels - 1."""
    counts = [real[:, None].to(torch.int32)]
    for _ in range(1, levels):
        counts.append(_pair_pool(counts[-1][..., None], "sum")[..., 0])
    return counts


def _logsparse_summaries(
    q, k, v, real, levels: int, span_summary: str, elementwise: bool = True
) -> tuple[torch.Tensor, ...]:
    """Keys and values of the aligned blocks of every level (level 0: the tokens themselves), pooled pairwise from
    the level below: `(*keys (B, H, P / 2^l, D), *values (B, H, P / 2^l, Dv))`. O(P) entries in all.
    `elementwise=False` (long, segmented sequences): matmul block products only, no `(B, H, P, D)` temporaries."""
    batch_size = q.shape[0]
    padded = q.shape[2]
    span_keys, span_values = [k], [v]  # level 0: a single token's abstraction is the token itself
    # One contiguous copy of k and v shared by every level. The model's k, v are (B, L, H, D) projections viewed as
    # (B, H, L, D): their block views are not matmul-compatible, and each level's product would otherwise copy (and,
    # under autograd, keep) a whole (B, H, P, D) tensor: ~levels copies in all (~400 MB per layer at 16k).
    k, v = k.contiguous(), v.contiguous()
    counts = _logsparse_counts(real, levels)
    if levels > 1:
        real_e = real[:, None, :, None]
        if span_summary == "max":  # padded tokens at the most negative finite value, so that pairs never pick them
            pooled_q, pooled_k = lowest_where_not(q, real_e), lowest_where_not(k, real_e)
        else:
            pooled_q, pooled_k = zero_where_not(q, real_e), zero_where_not(k, real_e)
    for level in range(1, levels):
        size = 2**level
        num_blocks = padded // size
        pooled_q, pooled_k = _pair_pool(pooled_q, span_summary), _pair_pool(pooled_k, span_summary)
        count = counts[level][..., None]  # (B, 1, n, 1)
        if span_summary == "max":
            nonempty = count > 0
            span_query, span_key = zero_where_not(pooled_q, nonempty), zero_where_not(pooled_k, nonempty)
        elif span_summary == "mean":
            divisor = count.clamp(min=1).to(q.dtype)
            span_query, span_key = pooled_q / divisor, pooled_k / divisor
        else:
            span_query, span_key = pooled_q, pooled_k
        kb, vb = k.unflatten(2, (num_blocks, size)), v.unflatten(2, (num_blocks, size))
        inner = _block_dots(kb, span_query, elementwise)  # pooled query vs its own block's keys (B, H, n, size)
        block_real = real.view(batch_size, 1, num_blocks, size)
        weights = masked_softmax(inner, block_real).to(v.dtype)
        span_keys.append(span_key)
        span_values.append(_block_mix(weights, vb, elementwise))
    return (*span_keys, *span_values)


def logsparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_mask: torch.Tensor | None = None,
    span_summary: str = "max",
    segment_size: int | None = None,
    num_levels: int | None = None,
) -> torch.Tensor:
    r"""Combiner-Logsparse: dyadic spans.

    At level `l = 0 .. ceil(log2 L) - 1` the sequence is cut into aligned blocks of size `2^l`; position `i` lies in
    block `b = i >> l`, whose sibling is block `b xor 1`. For each `i`:
        Omega0(i) = {i}
        spans     = the sibling block at every level (causal: only the levels where the sibling is on the left,
                    i.e. bit l of i is 1)
    The causal spans are the binary decomposition of the prefix `[0, i)` into at most log2 L aligned blocks; the
    bidirectional ones partition `[0, Lp) \ {i}` (the highest differing bit of i and j names j's only span). Level 0
    spans are single tokens (their abstraction is the token itself).

    Blocked layout: the sequence is padded once to `P = 2^levels` (< 2L), so every level is a free view
    `(B, H, P / 2^l, 2^l, .)`. Pooled keys / queries of level l are pooled from level l - 1 (pairs of blocks), the
    sibling of block n is block `n xor 1` (a flip of the pair axis, no gather), and each level contributes one span
    logit per position: the joint softmax is over `(B, H, P, 1 + levels)`. Time and memory O(L log L); the loops
    are over the O(log L) levels only. With autograd on and `L > 2 segment_size`, the per-position logits and the
    weighted span values are formed by aligned power-of-two segments of positions and recomputed in the backward
    (`_by_segments`); the block summaries (O(L) in all) are kept.

    `num_levels` (default `ceil(log2 L)`) fixes the number of levels, e.g. from the longest length a model takes:
    the levels past `ceil(log2 L)` have no allowed span (causal: every sibling lies to the right; bidirectional:
    every sibling is padding), so the result is the same, and the shapes inside no longer follow `L` (what
    `torch.export` with a dynamic length needs; the model passes it while compiling / exporting).

    Returns `(B, H, L, Dv)`.
    """
    check_span_summary(span_summary)
    batch_size, num_heads, length, _ = q.shape
    q, k, v, real, _ = _prepare(q, k, v, key_mask, None)
    if num_levels is None:
        levels = num_logsparse_levels(length)
    else:
        if not isinstance(num_levels, int) or num_levels < 0:
            raise ValueError(f"num_levels must be a non-negative int, got {num_levels!r}.")
        torch._check(length <= 2**num_levels, lambda: f"num_levels={num_levels} covers {2**num_levels} positions")
        levels = num_levels
    padded = 2**levels
    q, k, v = (pad_to_length(t, padded, static=num_levels is not None) for t in (q, k, v))
    real = pad_to_length(real, padded, dim=-1, static=num_levels is not None)
    real_e = real[:, None, :, None]  # (B, 1, P, 1)

    # Block summaries of every level: keys (B, H, P / 2^l, D), values (B, H, P / 2^l, Dv), nonempty (B, 1, P / 2^l).
    span_real = [count > 0 for count in _logsparse_counts(real, levels)]
    per_segment = _segment_rows(segment_size, length, 1, q, k, v)
    summaries = _recomputed(
        lambda q, k, v: _logsparse_summaries(q, k, v, real, levels, span_summary, not per_segment),
        per_segment,
        q,
        k,
        v,
    )
    span_keys, span_values = summaries[:levels], summaries[levels:]

    def whole_pairs(size, width):  # a level whose sibling pairs lie inside segments of `width` positions
        return 2 * size <= width

    def segment(p0, p1, qc, kc, vc, *summaries):
        # qc, kc, vc: positions [p0, p1); a level's summaries: its blocks [p0 / 2^l, p1 / 2^l) when whole sibling
        # pairs lie inside the segment, else all of them (a handful: only the top levels)
        keys, values = summaries[:levels], summaries[levels:]
        width = p1 - p0
        logits = [(qc * kc).sum(-1, keepdim=True)]  # (B, H, c, 1): the direct part, i itself
        allowed = [real_e[:, :, p0:p1]]
        merges = []
        for level in range(levels):
            size = 2**level
            if whole_pairs(size, width):  # whole sibling pairs inside the segment: flip the pair axis
                n0, n1 = p0 // size, p1 // size
                sibling_key, sibling_value, sibling_ok = (
                    t.unflatten(2, ((n1 - n0) // 2, 2)).flip(3).flatten(2, 3)
                    for t in (keys[level], values[level], span_real[level][:, :, n0:n1])
                )  # (B, H, n, .), (B, 1, n)
                if causal:  # only a left sibling: odd blocks
                    sibling_ok = sibling_ok & (torch.arange(n0, n1, device=q.device) % 2 == 1)
                level_logits = _block_dots(qc.unflatten(2, (n1 - n0, size)), sibling_key).reshape(*qc.shape[:3], 1)
                ok = sibling_ok[..., None].expand(batch_size, 1, n1 - n0, size).reshape(batch_size, 1, width, 1)
                merges.append((n1 - n0, size, sibling_value[:, :, :, None, :]))
            else:  # the segment lies inside one block of this level: one sibling for all its positions
                sibling = (p0 // size) ^ 1
                sibling_key = keys[level][:, :, sibling : sibling + 1]  # (B, H, 1, D)
                sibling_value = values[level][:, :, sibling : sibling + 1]
                ok = span_real[level][:, :, sibling : sibling + 1, None].expand(batch_size, 1, width, 1)
                if causal and sibling > p0 // size:
                    ok = torch.zeros_like(ok)
                level_logits = qc @ sibling_key.transpose(-1, -2)  # (B, H, c, 1)
                merges.append((1, width, sibling_value[:, :, :, None, :]))
            logits.append(level_logits)
            allowed.append(ok)
        probs = joint_softmax(list(zip(logits, allowed)), vc.dtype)
        out = probs[0] * vc
        for (n, size, value), p in zip(merges, probs[1:]):  # out += p * value, blockwise, no temporary
            blocked = (batch_size, num_heads, n, size)
            out = torch.addcmul(out.view(*blocked, -1), p.view(*blocked, 1), value).view(out.shape)
        return out

    if per_segment:
        per_segment = 1 << (per_segment.bit_length() - 1)  # a power of two: segments aligned to every level

    def reads(p0, p1):
        levels_read = [
            (2, p0 >> level, p1 >> level) if whole_pairs(2**level, p1 - p0) else None for level in range(levels)
        ]
        return [(2, p0, p1)] * 3 + levels_read * 2

    out = _by_segments(segment, padded, per_segment, q, k, v, *span_keys, *span_values, reads=reads)
    if num_levels is not None:  # a fresh tensor: a slice (a view) of the static buffer would guard on L == P
        return out.index_select(2, torch.arange(length, device=out.device))
    return out[:, :, :length]


# ----------------------------------------------------------------------------------------------------------------------
# Combiner-Axial (row-major)
# ----------------------------------------------------------------------------------------------------------------------
def axial_abstraction_keys(
    row_output: torch.Tensor,
    hidden_states: torch.Tensor,
    out_weight: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    key_weight: torch.Tensor,
    *,
    norm_eps: float,
) -> torch.Tensor:
    r"""Keys of Combiner-Axial's column abstractions: `k_(r,c) = W_k LayerNorm(x_(r,c) + W_o a_(r,c))`.

    This is the `abstraction_key_fn` the module passes to the Axial op, with its parameters bound.

    Args:
        row_output: `(B, H, n, Dv)`, `a_(r,c)`: the attention of the query at (r, c) over its whole row r.
        hidden_states: `(B, n, d)`, `x`: the attention layer's input at the same positions (the ops pass zeros at
            padded positions, so the pad content never matters).
        out_weight: `(d, H * Dv)`, `W_o`. norm_weight, norm_bias: `(d,)`. key_weight: `(H * D, d)`, `W_k`.

    Returns:
        `(B, H, n, D)`.
    """
    num_heads = row_output.shape[1]
    merged = row_output.transpose(1, 2).flatten(2)  # (B, n, H * Dv)
    y = F.linear(merged.to(out_weight.dtype), out_weight) + hidden_states.to(out_weight.dtype)
    y = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, norm_eps)
    keys = F.linear(y, key_weight)  # (B, n, H * D)
    return keys.unflatten(-1, (num_heads, -1)).transpose(1, 2).to(row_output.dtype)


def masked_hidden_states(hidden_states: torch.Tensor | None, real: torch.Tensor, padded: int) -> torch.Tensor | None:
    """`(B, L, d)` -> `(B, Lp, d)` with `Lp = padded`, zero where `real` `(B, Lp)` is False (None stays None)."""
    if hidden_states is None:
        return None
    hidden_states = pad_to_length(hidden_states, padded, dim=1)
    return zero_where_not(hidden_states, real[..., None])


def axial_row_abstractions(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    real_b: torch.Tensor,
    row_logits: torch.Tensor | None,
    abstraction_key_fn: Callable,
    hidden_states: torch.Tensor | None,
    per_segment: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and keys of the column abstractions of every row: `(B, H, R, C, Dv)`, `(B, H, R, C, D)`, from the
    row-major grid `qb, kb (B, H, R, C, D)`, `vb (B, H, R, C, Dv)` with `real_b (B, 1, R, C)` and the layer input
    `hidden_states (B, R C, d)` (zero at padded slots; None if the key function needs none).

    The abstraction (r, c) summarises the whole row r for queries in column c: its value is the attention of the
    query at (r, c) over row r (no causal mask: an abstracted row lies entirely before the queries that use it). A
    padded slot (r, c) uses a zero query, i.e. the plain mean of row r's real values, so that row r stays reachable
    from column c whatever the padding. `row_logits` `(B, H, R, C, C)` = `qb @ kb^T` when the caller has them;
    None forms them segment by segment of rows (`per_segment` rows, recomputed in the backward; 0 = one piece).
    `abstraction_key_fn(row_output (B, H, R C, Dv), hidden_states) -> (B, H, R C, D)` (`axial_abstraction_keys`).
    """
    batch_size, num_heads, rows, cols, _ = qb.shape

    def row_attention(r0, r1, qc, kc, vc):  # rows [r0, r1)
        logits = qc @ kc.transpose(-1, -2) if row_logits is None else row_logits
        real_rows = real_b[:, :, r0:r1]
        abs_logits = zero_where_not(logits, real_rows[..., None])  # zero query at padded slots
        weights = masked_softmax(abs_logits, real_rows[:, :, :, None, :]).to(vc.dtype)
        return weights @ vc  # (B, H, r, C, Dv)

    per_segment = 0 if row_logits is not None else per_segment
    row_output = _by_segments(row_attention, rows, per_segment, qb, kb, vb, reads=lambda r0, r1: [(2, r0, r1)] * 3)
    # Segmented (long sequences): the key function's internals (its projections' and LayerNorm's inputs, O(L d) each)
    # are recomputed in the backward rather than kept.
    keys = _recomputed(
        lambda row_output, *hidden: abstraction_key_fn(row_output, hidden[0] if hidden else None),
        per_segment,
        row_output.flatten(2, 3),
        *(() if hidden_states is None else (hidden_states,)),
    )
    expected = (batch_size, num_heads, rows * cols, qb.shape[-1])
    if tuple(keys.shape) != expected:
        raise ValueError(f"abstraction_key_fn must return {expected}, got {tuple(keys.shape)}.")
    return row_output, keys.unflatten(2, (rows, cols))


def axial_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    block_size: int,
    abstraction_key_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    hidden_states: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    segment_size: int | None = None,
) -> torch.Tensor:
    r"""Combiner-Axial (row-major): view the sequence as `R` rows of `C = block_size` columns, position
    `i = r * C + c`.

    For `i = (r, c)`:
        Omega0(i) = row r (its causal prefix, columns `<= c`, when causal)
        spans     = every other row t != r (earlier rows t < r when causal), one span per row, seen through the
                    abstraction of row t *for column c*: value `a_(t,c)` = attention of `q_(t,c)` over row t, key
                    `abstraction_key_fn(a)_(t,c)` (the paper: a projection of LayerNorm(x + W_o a), see
                    `axial_abstraction_keys`; its parameters live in the module).

    Blocked layout `(B, H, R, C, .)`: direct logits `(R, C, C)`, span logits `(R, C, R)` (query (r, c) against
    abstractions (t, c)), one softmax over `(B, H, R, C, C + R)`. Cost O(L (C + R)). With autograd on and
    `L > 2 segment_size`, the row attention of the abstractions and the joint logits are formed segment by segment
    of rows and recomputed in the backward (`_by_segments`); the abstractions (O(L d)) are kept.

    Args:
        abstraction_key_fn: `(row_output (B, H, Lp, Dv), hidden_states (B, Lp, d) or None) -> keys (B, H, Lp, D)`,
            e.g. `axial_abstraction_keys` with the module's parameters bound (`Lp` = L padded to a multiple of C).
        hidden_states: `(B, L, d)`, the layer input `x` the keys are computed from; zero-padded to `Lp` and zeroed
            at padded positions before the call.

    Returns `(B, H, L, Dv)`.
    """
    batch_size, num_heads, length, _ = q.shape
    q, k, v, real, padded = _prepare(q, k, v, key_mask, block_size)
    cols, rows = block_size, padded // block_size
    qb, kb, vb = (t.unflatten(2, (rows, cols)) for t in (q, k, v))
    real_b = real.view(batch_size, 1, rows, cols)
    per_segment = _segment_rows(segment_size, length, cols, q, k, v)

    if per_segment:
        hidden = masked_hidden_states(hidden_states, real, padded)
        abs_value, abs_key = axial_row_abstractions(qb, kb, vb, real_b, None, abstraction_key_fn, hidden, per_segment)
        row_logits = None
    else:  # one piece: the row logits serve the abstractions and the direct part
        row_logits = qb @ kb.transpose(-1, -2)  # (B, H, R, C, C)
        hidden = masked_hidden_states(hidden_states, real, padded)
        abs_value, abs_key = axial_row_abstractions(qb, kb, vb, real_b, row_logits, abstraction_key_fn, hidden)

    causal_ok = torch.ones(cols, cols, dtype=torch.bool, device=q.device).tril() if causal else None
    row = torch.arange(rows, device=q.device)
    row_real = real_b.any(-1)[:, :, None, None, :]  # (B, 1, 1, 1, R)
    # The span part runs along the columns: plain batched matmuls on column-major copies (B, H, C, R, .) of the
    # queries and abstractions, made once, instead of einsums permuting their operands at every use.
    # (Segmented: each segment transposes its own rows of q, nothing more kept for the backward.)
    qt = None if per_segment else qb.transpose(2, 3).contiguous()
    abs_key_t, abs_value_t = (t.transpose(2, 3).contiguous() for t in (abs_key, abs_value))

    def segment(r0, r1, qc, kc, vc, abs_key_t, abs_value_t):  # qc, kc, vc: rows [r0, r1)
        direct = qc @ kc.transpose(-1, -2) if row_logits is None else row_logits
        direct_ok = real_b[:, :, r0:r1, None, :]
        if causal:
            direct_ok = direct_ok & causal_ok
        qct = qc.transpose(2, 3) if per_segment else qt  # (B, H, C, r, D)
        span_logits = (qct @ abs_key_t.transpose(-1, -2)).transpose(2, 3)  # (B, H, r, C, R)
        own = row[r0:r1, None]
        other = row[None, :] < own if causal else row[None, :] != own  # [own r, span t]
        span_ok = other[:, None, :] & row_real
        p_direct, p_span = joint_softmax([(direct, direct_ok), (span_logits, span_ok)], vc.dtype)
        return p_direct @ vc + (p_span.transpose(2, 3) @ abs_value_t).transpose(2, 3)

    reads = lambda r0, r1: [(2, r0, r1)] * 3 + [None, None]  # noqa: E731  (its rows of q, k, v; all abstractions)
    out = _by_segments(segment, rows, per_segment, qb, kb, vb, abs_key_t, abs_value_t, reads=reads)
    return out.flatten(2, 3)[:, :, :length]


# ----------------------------------------------------------------------------------------------------------------------
# Combiner-Mixture
# ----------------------------------------------------------------------------------------------------------------------
def running_span_summaries(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vb: torch.Tensor,
    real_b: torch.Tensor,
    span_summary: str,
    reverse: bool,
    per_segment: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summaries of the spans "strictly before (after, if reverse) each entry along its line" of a `(B, H, N, n, .)`
    grid of N lines of n entries (the rows of the row-major grid: row spans; the columns of the column-major grid:
    column spans), `qb, kb (B, H, N, n, D)`, `vb (B, H, N, n, Dv)`, `real_b (B, 1, N, n)`: keys `(B, H, N, n, D)`,
    values `(B, H, N, n, Dv)`, nonempty `(B, 1, N, n)`.

    The value of the span ending at entry e is the softmax over the span's real keys of `q_pool(e) . k`; the logits
    against every entry of the line are `(B, H, N, n, n)`, i.e. O(L sqrt L), formed `per_segment` lines at a time
    and recomputed in the backward (`_split_segments`; 0 = one piece). A line's running pool needs that line only,
    so each segment pools its own queries (recomputed in the backward, never kept); the keys are pooled once (their
    running-max indices are not kept either).
    """
    real_e = real_b[..., None]
    line = qb.shape[3]
    idx = torch.arange(line, device=qb.device)
    inside = idx[None, :] > idx[:, None] if reverse else idx[None, :] < idx[:, None]  # [entry e, member j]

    def pooled_keys(l0, l1, kb):  # kb: lines [l0, l1)
        return cumulative_pool(kb, real_e[:, :, l0:l1], 3, span_summary, reverse)[0]

    # Segmented: by segments of lines too (a running pool needs its own line only), so that the pool's temporaries
    # (masked copy, running max and its indices, shift) are one segment's, and none is kept for the backward.
    span_key = _split_segments(pooled_keys, qb.shape[2], per_segment, kb)
    with torch.no_grad():
        _, nonempty = cumulative_pool(real_e, real_e, 3, "sum", reverse)  # (B, 1, N, n, 1): a real entry in the span

    def values(l0, l1, qb, kb, vb):  # lines [l0, l1)
        span_query, _ = cumulative_pool(qb, real_e[:, :, l0:l1], 3, span_summary, reverse)
        logits = span_query @ kb.transpose(-1, -2)  # (B, H, l, n, n): entry e vs member j
        ok = inside & real_b[:, :, l0:l1, None, :]
        weights = masked_softmax(logits, ok).to(vb.dtype)
        return weights @ vb

    value = _split_segments(values, qb.shape[2], per_segment, qb, kb, vb)
    return span_key, value, nonempty[..., 0]


def mixture_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    block_size: int,
    key_mask: torch.Tensor | None = None,
    span_summary: str = "max",
    segment_size: int | None = None,
) -> torch.Tensor:
    r"""Combiner-Mixture on the `R x C` grid of Axial (`C = block_size`, `i = (r, c)`).

    Causal, for `i = (r, c)`:
        Omega0(i) = own-row prefix {(r, m): m <= c}  and  own column above {(t, c): t < r}
        spans     = column spans  {(t, m): t < r} for every column m != c                       (C - 1 spans)
                    row spans     {(t, m): m < c} and {(t, m): m > c} for every earlier row t < r (2 r spans)
    Bidirectional: Omega0 = the whole own row and own column; column spans above *and* below row r for every
    m != c; left and right row spans for every row t != r.

    This is the official mixture: a *mixture of two partitions* of the non-direct positions (by column and by row),
    so each non-direct position lies in exactly one column span and one row span, and its weight is the sum of the
    two paths; direct positions are in no span. All spans' abstractions are pooled keys / pooled-query attention
    values, computed with running (exclusive) pools along the rows or columns.

    Logits: row direct `(R, C, C)`, column direct `(R, C, R)`, column spans `(R, C, C)` (x2 bidirectional), row
    spans `(R, C, R)` x2; one softmax over their concatenation. Cost O(L (C + R)). Everything that runs along a
    column (own column, column spans, row spans seen from a column) is a plain batched matmul on a column-major copy
    of the grid (`(B, H, C, R, .)`, made once) instead of an einsum that permutes its operands at every use. With
    autograd on and `L > 2 segment_size`, the span values and the joint logits are formed segment by segment and
    recomputed in the backward (`_recomputed_segments`): kept are the span keys and values (O(L d)); the pooled span
    queries are recomputed inside each segment of lines (a running pool along a line needs that line only).

    Returns `(B, H, L, Dv)`.
    """
    check_span_summary(span_summary)
    batch_size, num_heads, length, _ = q.shape
    q, k, v, real, padded = _prepare(q, k, v, key_mask, block_size)
    cols, rows = block_size, padded // block_size
    per_segment = _segment_rows(segment_size, length, cols, q, k, v)
    if not per_segment:
        # One piece: contiguous copies made once. The model's q, k, v are (B, L, H, D) projections viewed as
        # (B, H, L, D), whose grid views cannot be batched by a matmul: each product would copy its operands again.
        q, k, v = (t.contiguous() for t in (q, k, v))
    qb, kb, vb = (t.unflatten(2, (rows, cols)) for t in (q, k, v))  # row-major grid (B, H, R, C, .)
    real_b = real.view(batch_size, 1, rows, cols)
    real_t = real_b.transpose(2, 3)  # (B, 1, C, R)
    # Column-major grid (B, H, C, R, .): one piece, contiguous copies made once; segmented (long sequences), views
    # of q, k, v, so that nothing more is kept for the backward (each segment's products copy what they read).
    qt, kt, vt = (t.transpose(2, 3) if per_segment else t.transpose(2, 3).contiguous() for t in (qb, kb, vb))
    columns_per_segment = max(1, per_segment * cols // rows) if per_segment else 0
    row_idx = torch.arange(rows, device=q.device)
    col_idx = torch.arange(cols, device=q.device)
    other_row = row_idx[None, :] < row_idx[:, None] if causal else row_idx[None, :] != row_idx[:, None]  # [own r, t]
    other_col = col_idx[None, :] != col_idx[:, None]  # [own c, span column m]
    row_causal = col_idx[None, :] <= col_idx[:, None]
    column_real = real_t[:, :, None, :, :]  # (B, 1, 1, C, R)

    # Column spans: column m, rows above r (below r when reverse); one per m != c. Computed along the columns of the
    # column-major grid: keys / values (B, H, C, R, .), nonempty (B, 1, C, R).
    column_spans = [
        running_span_summaries(qt, kt, vt, real_t, span_summary, reverse, columns_per_segment)
        for reverse in ((False, True) if not causal else (False,))
    ]
    # Row spans: row t != r (t < r when causal), columns left of c (right of c when reverse): (B, H, R, C, .).
    row_spans = [
        running_span_summaries(qb, kb, vb, real_b, span_summary, reverse, per_segment) for reverse in (False, True)
    ]
    num_col = len(column_spans)
    nonempty_col = [nonempty.transpose(2, 3) for _, _, nonempty in column_spans]  # (B, 1, R, C) at (r, m)
    nonempty_row = [nonempty.transpose(2, 3)[:, :, None] for _, _, nonempty in row_spans]  # (B, 1, 1, C, R) at (t, c)

    # Inputs of the joint softmax, column-major (B, H, C, R, .): the column spans' summaries (read by a segment at its
    # own rows) and the column group: the own column and the row spans' summaries, read at every row above the
    # segment when causal, at every row otherwise. Segmented, the row spans' summaries are made contiguous once (their
    # prefixes are then read by the products in place; the row-major summaries are released), the own column is read
    # from k and v themselves, and each segment gets the prefix it reads as a view (`_recomputed_segments`).
    col_summaries = [t for key, value, _ in column_spans for t in (key, value)]
    column_group = [kt, vt, *(t.transpose(2, 3) for key, value, _ in row_spans for t in (key, value))]
    del column_spans, row_spans
    if per_segment:  # the row spans' summaries; the own column is read from k, v themselves (below)
        column_group = [t.contiguous() for t in column_group[2:]]

    def segment(r0, r1, qc, kc, vc, qct, *rest):
        # qc, kc, vc: rows [r0, r1) of the row-major grid; qct and the column spans' summaries (rest[:2 num_col]):
        # those rows of the column-major grid; then the column group (rest[2 num_col:]), rows [0, top).
        width = (batch_size, 1, r1 - r0, cols)  # masks: (B, 1, r, C, .), the same for every head
        # Row group (keys of query row r, row-major): the own row and the column spans (r, m). Column group (keys of
        # query column c, column-major): the own column and the row spans (t, c). One softmax over both groups.
        col_rows = [t.transpose(2, 3) for t in rest[: 2 * num_col]]  # (B, H, r, C, .) row-major views
        group = rest[2 * num_col :]
        row_keys = torch.cat([kc, *col_rows[0::2]], dim=3)
        row_values = torch.cat([vc, *col_rows[1::2]], dim=3)
        # Causal: only the rows above the segment's last one are allowed in the column group (the rest would be
        # masked to exactly 0), so a segment reads rows [0, r1) only.
        top = group[0].shape[3]
        own_other_row = other_row[r0:r1, None, :top]  # (r, 1, top)
        row_ok = real_b[:, :, r0:r1, None, :]
        row_masks = [(row_ok & row_causal if causal else row_ok).expand(*width, cols)]  # own row (prefix)
        row_masks += [(other_col & nonempty[:, :, r0:r1, None, :]).expand(*width, cols) for nonempty in nonempty_col]
        col_masks = [(own_other_row & column_real[..., :top]).expand(*width, top)]  # own column, other rows
        col_masks += [(own_other_row & nonempty[..., :top]).expand(*width, top) for nonempty in nonempty_row]
        row_part = (qc @ row_keys.transpose(-1, -2), torch.cat(row_masks, dim=-1))  # (B, H, r, C, C (1 + spans))
        if not per_segment:  # one batched matmul per group (the column group concatenated once)
            col_keys, col_values = (torch.cat(group[i::2], dim=3) for i in (0, 1))
            col_part = ((qct @ col_keys.transpose(-1, -2)).transpose(2, 3), torch.cat(col_masks, dim=-1))
            p_row, p_col = joint_softmax([row_part, col_part], vc.dtype)
            return p_row @ row_values + (p_col.transpose(2, 3) @ col_values).transpose(2, 3)
        # Segmented: one product per member of the column group, on its contiguous prefix in place.
        col_parts = [
            ((qct @ key.transpose(-1, -2)).transpose(2, 3), mask) for key, mask in zip(group[0::2], col_masks)
        ]
        p_row, *p_cols = joint_softmax([row_part, *col_parts], vc.dtype)
        out = p_row @ row_values
        for p_col, value in zip(p_cols, group[1::2]):
            out = out + (p_col.transpose(2, 3) @ value).transpose(2, 3)
        return out

    if not per_segment:
        out = segment(0, rows, qb, kb, vb, qt, *col_summaries, *column_group)
    else:
        # Each segment reads its rows of the row-major inputs (dim 2) and of the column-major ones (dim 3), and the
        # column group's prefix of rows [0, r1) when causal (all of it otherwise); its gradients are added into one
        # buffer per input (no full-size gradient per input and segment).

        def reads(r0, r1):
            top = (2, 0, r1) if causal else None  # the rows above the segment's last one (causal), or all
            group_top = (3, 0, r1) if causal else None
            return [(2, r0, r1), top, top] + [(3, r0, r1)] * len(col_summaries) + [group_top] * len(column_group)

        def segment_of_pieces(r0, r1, qc, k_top, v_top, *rest):
            # k_top, v_top: the rows a segment's own column reads (rows [0, r1) when causal, all otherwise), which
            # hold its own rows too; q's column-major rows are its row-major rows transposed. One input (and one
            # gradient buffer) per tensor, no column-major copy of k and v kept.
            col_sums, group = rest[: len(col_summaries)], rest[len(col_summaries) :]
            own_column = (k_top.transpose(2, 3), v_top.transpose(2, 3))
            kc, vc = k_top[:, :, r0:r1], v_top[:, :, r0:r1]
            return segment(r0, r1, qc, kc, vc, qc.transpose(2, 3), *col_sums, *own_column, *group)

        out = _by_segments(
            segment_of_pieces, rows, per_segment, qb, kb, vb, *col_summaries, *column_group, reads=reads
        )
    return out.flatten(2, 3)[:, :, :length]


# ----------------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------------
def combiner_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    combiner_type: str,
    causal: bool,
    block_size: int,
    key_mask: torch.Tensor | None = None,
    span_summary: str = "max",
    abstraction_key_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
    hidden_states: torch.Tensor | None = None,
    segment_size: int | None = None,
    num_levels: int | None = None,
    use_spans: bool = True,
) -> torch.Tensor:
    """Run the Combiner variant `combiner_type` on `(B, H, L, D)` q, k and `(B, H, L, Dv)` v; see each op.

    `segment_size` (positions; default `SEGMENT_POSITIONS`, 0 = never): with autograd on, sequences longer than twice it
    form their logits segment by segment, recomputed in the backward (same maths, activations of one segment).
    `num_levels` (Logsparse only): a fixed number of dyadic levels (see `logsparse_attention`).
    `use_spans=False` (Fixed only): the ablation without span summaries, block-local attention (`fixed_attention`).
    """
    check_use_spans(use_spans, combiner_type)
    seg = dict(segment_size=segment_size)
    if combiner_type == "fixed":
        return fixed_attention(
            q,
            k,
            v,
            causal=causal,
            block_size=block_size,
            key_mask=key_mask,
            span_summary=span_summary,
            use_spans=use_spans,
            **seg,
        )
    if combiner_type == "logsparse":
        return logsparse_attention(
            q, k, v, causal=causal, key_mask=key_mask, span_summary=span_summary, num_levels=num_levels, **seg
        )
    if combiner_type == "axial":
        if abstraction_key_fn is None:
            raise ValueError("combiner_type='axial' needs an `abstraction_key_fn` (the column abstraction keys).")
        return axial_attention(
            q,
            k,
            v,
            causal=causal,
            block_size=block_size,
            key_mask=key_mask,
            abstraction_key_fn=abstraction_key_fn,
            hidden_states=hidden_states,
            **seg,
        )
    if combiner_type == "mixture":
        return mixture_attention(
            q, k, v, causal=causal, block_size=block_size, key_mask=key_mask, span_summary=span_summary, **seg
        )
    raise ValueError(f"Unknown combiner_type {combiner_type!r}; expected one of {COMBINER_TYPES}.")


__all__ = [
    "COMBINER_TYPES",
    "SPAN_SUMMARIES",
    "axial_abstraction_keys",
    "axial_attention",
    "axial_row_abstractions",
    "block_summaries",
    "check_span_summary",
    "check_use_spans",
    "combiner_attention",
    "cumulative_pool",
    "fixed_attention",
    "joint_softmax",
    "logsparse_attention",
    "lowest_where_not",
    "masked_hidden_states",
    "masked_softmax",
    "mixture_attention",
    "num_logsparse_levels",
    "pad_to_length",
    "pool",
    "running_span_summaries",
    "zero_where_not",
]
