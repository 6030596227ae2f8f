"""Combiner decoding (causal heads, with a cache): the state after a prefix (`combiner_prefill_state`), one new token
per sample (`combiner_step`), a chunk of `T` new tokens per sample (`combiner_chunk_step`) and the fixed-capacity
state a compiled / exported step needs (`combiner_static_state`). The parallel ops (training, prefill attention) are
in ops_combiner.py; this file builds on its span summaries and masked softmaxes.

One step attends each sample's new token to the summaries of the spans completed so far and to the tokens it attends
directly: O(s + L/s) entries (Fixed, Axial, Mixture) or 1 + log2 L (Logsparse) per step; it equals the full causal op
at that position. The state layout is described below, above `combiner_static_state`.

`combiner_chunk_step` is `T` calls of `combiner_step` at once, in one vectorised pass (no Python loop over the tokens;
Logsparse loops over its O(log L) dyadic levels only): the outputs equal the full causal op at the chunk's positions
and the returned state equals, tensor for tensor and buffer size for buffer size, the state those `T` steps leave (so
single steps and further chunks continue exactly).

How (per sample `b`, whose state has consumed `length[b]` tokens):

- The chunk's valid tokens are packed in order (a stable argsort of `~valid`): token `t` is the sample's
  `ordinal[b, t] = cumsum(valid)[b, t] - 1`-th new token, at global position `length[b] + ordinal`. A padding token
  (valid False) moves nothing; its output is finite junk.
- Fixed / Axial / Mixture build a *local* sequence that starts at the current segment / row (`_Local`): its filled
  slots (the state's ring, or the raw buffer for Mixture) then the packed chunk, laid out as `n` blocks of `s`
  (n <= T / s + 2). Packed token o sits at local position `length % s + o`. The local blocks give the direct part
  (logits formed block by block, then each token's row taken) and the summaries of the segments / rows the chunk
  completes; the state gives the summaries of the earlier ones (masked per sample). What a token reads along its
  column (Axial's abstractions, Mixture's own column and row spans) is read from the touched columns only
  (`_Columns`). One joint softmax per token over the same parts as the full op.
- Logsparse writes the chunk into its raw buffers, summarises per level the dyadic blocks that complete inside the
  chunk (a gather of their tokens), then every chunk token gathers its one span per level.

Cost per chunk: the steps' per-token reads, O(T (s + L/s)) entries for Fixed / Axial / Mixture (plus O(s^2) for the
partly filled first and last blocks), O(T log L) spans for Logsparse plus the tokens of the blocks that complete;
Mixture's new column summaries re-pool the past columns, O(L d), only when the chunk completes a row (a step pays
that at every completed row). Never a re-run of the op over the past.

Buffer sizes: the state's growing buffers are grown to exactly the capacity the `T` single steps reach (their
doubling rule replayed on the per-step sizes, `_capacity`), so the state has the same shapes as after single steps.
"""

import math
from collections.abc import Callable

import torch

from .ops_combiner import (
    COMBINER_TYPES,
    axial_row_abstractions,
    block_summaries,
    check_span_summary,
    check_use_spans,
    joint_softmax,
    lowest_where_not,
    masked_hidden_states,
    masked_softmax,
    num_logsparse_levels,
    pad_to_length,
    pool,
    running_span_summaries,
    zero_where_not,
)

# ----------------------------------------------------------------------------------------------------------------------
# The decoding state: after a prefix, and at a fixed capacity
# ----------------------------------------------------------------------------------------------------------------------
# A state is a dict of tensors with the batch on dim 0 (so a generic cache can reorder / expand / select it). Every
# sample has its own position `length[b]` (the number of real tokens it has seen): the model packs real tokens to
# the front, so a left-padded prompt starts its blocks at its first real token, exactly as the sample alone. Stored
# queries are already scaled by 1/sqrt(D). Buffers that grow (completed-span summaries, raw keys) double their
# capacity when full (a prefill state starts with that headroom: `_with_headroom`), and are written in place outside
# autograd, so a step copies O(L) data only at a doubling (amortised O(1) per step).
# A compiled / exported step holds them at their capacity for `max_length` tokens instead (`combiner_static_state`):
# fixed shapes, so one graph decodes every position.
#
#   fixed:     seg_q/k/v (B,H,s,.) ring of the current segment; span_k/v (B,H,N,.) summaries of its segments
#              (absent without span summaries, `use_spans=False`: the ring alone).
#   axial:     row_q/k/v (B,H,C,.) and row_x (B,C,d) ring of the current row; abs_k/v (B,H,R,C,.) abstractions.
#   logsparse: q/k/v (B,H,cap,.) every token (a span is summarised when it completes, from its raw tokens);
#              level{l}_k/v (B,H,n_l,.) summaries of the completed aligned blocks of size 2^l, l >= 1.
#   mixture:   q/k/v (B,H,cap,.) every token (own column, column spans); col_k/v (B,H,C,.) column spans above
#              the current row; left_k/v, right_k/v (B,H,R,C,.) row spans of completed rows.
#
# Per step: Fixed O(s + L/s), Axial O(C + R), Mixture O(C + R) attended entries; Logsparse 1 + log2 L. Summaries
# are computed once, when their span completes (amortised O(1) per span entry and step).


def combiner_static_state(
    state: dict[str, torch.Tensor], *, combiner_type: str, block_size: int, max_length: int
) -> dict[str, torch.Tensor]:
    """The state with every growing buffer at the capacity a sequence of `max_length` tokens needs (zero-padded; for
    Logsparse also the summary buffers of the levels no block has completed yet): steps up to `max_length` tokens
    then never grow a buffer, so the state keeps fixed shapes, what a compiled / exported decoding step needs.

    Capacities: Fixed `span_k/v` ceil(M / s) segments; Axial `abs_k/v` ceil(M / C) rows; Mixture `q/k/v`
    ceil(M / C) C tokens, `left/right_k/v` ceil(M / C) rows; Logsparse `q/k/v` M tokens, `level{l}_k/v` ceil(M / 2^l)
    blocks for l < ceil(log2(M + 1)). The state stays O(M d) (Fixed, Axial: O(M d / s) plus the ring) per layer.
    """
    state = dict(state)
    rows = -(-max_length // block_size)
    if combiner_type == "fixed":
        sizes = {name: rows for name in ("span_k", "span_v") if name in state}  # none without span summaries
    elif combiner_type == "axial":
        sizes = {"abs_k": rows, "abs_v": rows}
    elif combiner_type == "mixture":
        sizes = {name: rows * block_size for name in ("q", "k", "v")}
        sizes.update({f"{side}_{t}": rows for side in ("left", "right") for t in ("k", "v")})
    elif combiner_type == "logsparse":
        sizes = {name: max_length for name in ("q", "k", "v")}
        batch_size, num_heads = state["k"].shape[:2]
        for level in range(1, num_logsparse_levels(max_length + 1)):
            blocks = -(-max_length // 2**level)
            for t in ("k", "v"):
                sizes[f"level{level}_{t}"] = blocks
                if f"level{level}_{t}" not in state:
                    state[f"level{level}_{t}"] = state[t].new_zeros(batch_size, num_heads, 1, state[t].shape[-1])
    else:
        raise ValueError(f"Unknown combiner_type {combiner_type!r}; expected one of {COMBINER_TYPES}.")
    for name, size in sizes.items():
        # a prefill state's headroom past the capacity is cut: the shapes must not follow the prefix length
        current = state[name].shape[2]
        state[name] = pad_to_length(state[name], size, dim=2) if current < size else state[name][:, :, :size]
    return state


def combiner_prefill_state(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor,
    *,
    combiner_type: str,
    block_size: int,
    span_summary: str = "max",
    abstraction_key_fn: Callable | None = None,
    hidden_states: torch.Tensor | None = None,
    use_spans: bool = True,
) -> dict[str, torch.Tensor]:
    """The decoding state after a prefix (computed in one vectorised pass, no loop over positions).

    Args:
        q, k, v: `(B, H, T, .)` of the prefix, each sample's `lengths[b]` real tokens first (right padding).
        lengths: `(B,)` long, the number of real tokens of each sample.
        hidden_states: `(B, T, d)` (Axial: the layer input, needed for the abstraction keys of its current row).
        use_spans: False for the ablation without span summaries (Fixed only): the state keeps the ring alone.
    """
    check_span_summary(span_summary)
    check_use_spans(use_spans, combiner_type)
    batch_size, num_heads, total, _ = q.shape
    device = q.device
    q = q * q.shape[-1] ** -0.5
    lengths = lengths.to(device=device, dtype=torch.long)
    if combiner_type == "logsparse":
        real = torch.arange(total, device=device)[None] < lengths[:, None]
        state = {"q": q, "k": k, "v": v, "length": lengths}
        for level in range(1, num_logsparse_levels(total + 1)):
            size = 2**level
            num_blocks = -(-total // size)
            blocks = [pad_to_length(t, num_blocks * size).unflatten(2, (num_blocks, size)) for t in (q, k, v)]
            real_b = pad_to_length(real, num_blocks * size, dim=-1).view(batch_size, 1, num_blocks, size)
            state[f"level{level}_k"], state[f"level{level}_v"], _ = block_summaries(*blocks, real_b, span_summary)
        return _with_headroom(state, combiner_type, block_size)
    if combiner_type not in ("fixed", "axial", "mixture"):
        raise ValueError(f"Unknown combiner_type {combiner_type!r}; expected one of {COMBINER_TYPES}.")

    s = block_size
    padded = -(-total // s) * s
    n = padded // s
    q, k, v = (pad_to_length(t, padded) for t in (q, k, v))
    real = torch.arange(padded, device=device)[None] < lengths[:, None]
    qb, kb, vb = (t.unflatten(2, (n, s)) for t in (q, k, v))
    real_b = real.view(batch_size, 1, n, s)
    current = lengths // s  # the segment / row the next token falls into
    ring = (current * s)[:, None] + torch.arange(s, device=device)  # its positions
    ring = ring.clamp(max=padded - 1)  # slots not yet written are never read
    state = {"length": lengths}
    if combiner_type == "fixed":
        if use_spans:
            state["span_k"], state["span_v"], _ = block_summaries(qb, kb, vb, real_b, span_summary)
        state["seg_q"], state["seg_k"], state["seg_v"] = (_gather(t, ring) for t in (q, k, v))
        return _with_headroom(state, combiner_type, block_size)
    if combiner_type == "axial":
        if abstraction_key_fn is None:
            raise ValueError("combiner_type='axial' needs an `abstraction_key_fn` (the column abstraction keys).")
        if hidden_states is None:
            raise ValueError("combiner_type='axial' needs the layer's `hidden_states` to build its decoding state.")
        hidden = masked_hidden_states(hidden_states, real, padded)
        row_logits = qb @ kb.transpose(-1, -2)
        state["abs_v"], state["abs_k"] = axial_row_abstractions(
            qb, kb, vb, real_b, row_logits, abstraction_key_fn, hidden
        )
        state["row_q"], state["row_k"], state["row_v"] = (_gather(t, ring) for t in (q, k, v))
        state["row_x"] = hidden.gather(1, ring[..., None].expand(-1, -1, hidden.shape[-1]))
        return _with_headroom(state, combiner_type, block_size)
    # mixture
    state.update(q=q, k=k, v=v)
    for side, reverse in (("left", False), ("right", True)):
        key, value, _ = running_span_summaries(qb, kb, vb, real_b, span_summary, reverse=reverse)
        state[f"{side}_k"], state[f"{side}_v"] = key, value
    above = real_b & (torch.arange(n, device=device)[None, :] < current[:, None])[:, None, :, None]
    state["col_k"], state["col_v"] = _column_summaries(qb, kb, vb, above, span_summary)
    return _with_headroom(state, combiner_type, block_size)


def _with_headroom(state: dict[str, torch.Tensor], combiner_type: str, block_size: int) -> dict[str, torch.Tensor]:
    """The prefill state with every growing buffer already at the capacity its next append grows it to (`_grow`'s
    doubling): the copy happens here, inside the O(L d) prefill, instead of in the first decoding steps, where at
    a long prefix it cost more than the steps themselves."""
    # Raw per-token buffers (Logsparse, Mixture: Mixture's in whole rows) and completed-span summaries grow; the
    # rings (seg_*, row_*) and Mixture's column spans (col_*) have fixed sizes.
    raw_multiple = {"logsparse": 1, "mixture": block_size}.get(combiner_type)
    for name in list(state):
        if raw_multiple is not None and name in ("q", "k", "v"):
            state[name] = _grow(state[name], state[name].shape[2] + 1, multiple=raw_multiple)
        elif name.startswith(("span_", "abs_", "left_", "right_", "level")):
            state[name] = _grow(state[name], state[name].shape[2] + 1)
    return state


def _column_summaries(qb, kb, vb, real_b, span_summary):
    """Mixture: summary of each column over the rows where `real_b` `(B, 1, R, C)`: keys `(B, H, C, D)`, values."""
    span_query = pool(qb, real_b[..., None], dim=2, span_summary=span_summary)
    span_key = pool(kb, real_b[..., None], dim=2, span_summary=span_summary)
    logits = torch.einsum("bhcd,bhtcd->bhct", span_query, kb)
    weights = masked_softmax(logits, real_b.permute(0, 1, 3, 2)).to(vb.dtype)
    return span_key, torch.einsum("bhct,bhtcd->bhcd", weights, vb)


# ----------------------------------------------------------------------------------------------------------------------
# Buffer helpers
# ----------------------------------------------------------------------------------------------------------------------
def _grow(buffer: torch.Tensor, size: int, dim: int = 2, multiple: int = 1) -> torch.Tensor:
    """Make `buffer.shape[dim] >= size` (doubling, rounded up to `multiple`); new entries are zero."""
    current = buffer.shape[dim]
    if current >= size:
        return buffer
    target = max(size, 2 * current)
    target = -(-target // multiple) * multiple
    return pad_to_length(buffer, target, dim=dim)


def _write(buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, where: torch.Tensor, dim: int = 2):
    """`buffer[b, (h,) index[b]] = values[b]` for the samples where `where` (B,) is True; `dim` in {1, 2}.

    Every sample writes (the others their current entry back, at index 0): no data-dependent shape, so the same code
    runs in a graph. In place when autograd is off (`generate`, `torch.no_grad()`), so the cost is O(|values|), not
    O(|buffer|); while compiling / exporting out of place (a graph returns new states, its inputs stay unmutated).
    """
    index = torch.where(where, index, torch.zeros_like(index))  # another sample's index may be past the buffer
    batch = torch.arange(buffer.shape[0], device=buffer.device)
    if dim == 1:
        indices = (batch, index)
    else:
        heads = torch.arange(buffer.shape[1], device=buffer.device)
        indices = (batch[:, None], heads[None, :], index[:, None])
    keep = where.view(where.shape + (1,) * (values.ndim - 1))
    new = torch.where(keep, values.to(buffer.dtype), buffer[indices])
    # Out of place whenever autograd records: the buffer may be saved for another op's backward (a step's logits
    # read the span buffers its summaries then write), and an in-place write would corrupt that gradient.
    if torch.compiler.is_compiling() or torch.is_grad_enabled():
        return buffer.index_put(indices, new)
    return buffer.index_put_(indices, new)


def _if_any(done: torch.Tensor, update: Callable, buffers: tuple) -> tuple:
    """`update(*buffers)` (new buffers) when any sample is `done` (B,), else `buffers`: the summaries of the spans a
    step completes, computed once, when one does. Eager: a Python `if`. Compiling / exporting: a `torch.cond` branch
    (a graph cannot branch on data in Python; both branches are functional)."""
    if not torch.compiler.is_compiling():
        return tuple(update(*buffers)) if bool(done.any()) else tuple(buffers)
    return tuple(
        torch.cond(done.any(), lambda *t: tuple(update(*t)), lambda *t: tuple(x.clone() for x in t), tuple(buffers))
    )


# Below this many copied rows `torch.gather` (3 ops) beats the row copy of `index_select` (7 ops).
_ROW_GATHER_MIN_ROWS = 64


def _gather(buffer: torch.Tensor, index: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """`(B, H, N, ...)`, index `(B, K)` -> `(B, H, K, ...)`: per-sample entries along `dim`."""
    batch_size, num = index.shape
    lead = math.prod(buffer.shape[1:dim])
    if buffer.is_contiguous() and batch_size * lead * num >= _ROW_GATHER_MIN_ROWS:
        # Why: `gather` reads one index per element (the index expanded to the output's shape); an entry along `dim`
        # is a contiguous row of the trailing dims, so copying whole rows by flat row number is 3-10x faster on CPU
        # for the wide reads of a decoding step (own row / column, a batch of samples).
        size = buffer.shape[dim]
        rows = torch.arange(batch_size * lead, device=buffer.device).view(batch_size, lead, 1) * size
        flat = (rows + index[:, None, :]).reshape(-1)
        out = buffer.reshape(batch_size * lead * size, -1).index_select(0, flat)
        return out.view(batch_size, *buffer.shape[1:dim], num, *buffer.shape[dim + 1 :])
    shape = list(buffer.shape)
    shape[dim] = num
    view = [batch_size] + [1] * (buffer.ndim - 1)
    view[dim] = num
    return buffer.gather(dim, index.view(view).expand(shape))


def _step_softmax(parts, dtype):
    """Joint softmax of a step: parts of `(logits (B, H, n), allowed (B, n))`."""
    return joint_softmax([(logits, allowed[:, None, :]) for logits, allowed in parts], dtype)


def _all_real(batch_size: int, *shape: int, device=None) -> torch.Tensor:
    return torch.ones(batch_size, 1, *shape, dtype=torch.bool, device=device)


# ----------------------------------------------------------------------------------------------------------------------
# One new token per sample
# ----------------------------------------------------------------------------------------------------------------------
def combiner_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    combiner_type: str,
    block_size: int,
    span_summary: str = "max",
    valid: torch.Tensor | None = None,
    abstraction_key_fn: Callable | None = None,
    hidden_states: torch.Tensor | None = None,
    max_length: int | None = None,
    use_spans: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One causal decoding step: the new token of each sample (at position `state["length"][b]`) attends to the
    state, which it then joins.

    Args:
        q, k: `(B, H, D)`, v: `(B, H, Dv)` of the new token. hidden_states: `(B, d)` (Axial).
        state: from `combiner_prefill_state` or an earlier step (updated in place where possible, and returned).
        valid: `(B,)` bool; False marks a padding token: that sample's state is left unchanged.
        max_length: the longest sequence decoded. Needed while compiling / exporting: the state's buffers are then
            held at their capacity for `max_length` tokens (`combiner_static_state`) instead of growing with the data,
            and the summaries of completed spans are a `torch.cond` branch, so the step is one graph of fixed shapes
            for any position. Eager steps grow the buffers as needed and ignore it.
        use_spans: False for the ablation without span summaries (Fixed only: the own segment alone).

    Returns:
        `(B, H, Dv)` and the new state. The output equals the full causal op at that position.
    """
    check_span_summary(span_summary)
    check_use_spans(use_spans, combiner_type)
    batch_size = q.shape[0]
    q = q * q.shape[-1] ** -0.5
    valid = torch.ones(batch_size, dtype=torch.bool, device=q.device) if valid is None else valid.bool()
    if torch.compiler.is_compiling():
        if max_length is None:
            raise ValueError(
                "A compiled / exported Combiner decoding step needs `max_length` (its buffers have fixed capacities)."
            )
        state = combiner_static_state(state, combiner_type=combiner_type, block_size=block_size, max_length=max_length)
    state = dict(state)
    kernels = (_fixed_step, _logsparse_step, _axial_step, _mixture_step)
    out = _run_kernel(
        kernels,
        combiner_type,
        q,
        k,
        v,
        state,
        valid,
        block_size,
        span_summary,
        abstraction_key_fn,
        hidden_states,
        use_spans,
    )
    state["length"] = state["length"] + valid.long()
    return out, state


def _check_axial_inputs(
    combiner_type: str, abstraction_key_fn: Callable | None, hidden_states: torch.Tensor | None
) -> None:
    """Axial decoding builds the column abstraction keys of the rows it completes: it needs both."""
    if combiner_type == "axial" and (abstraction_key_fn is None or hidden_states is None):
        raise ValueError("combiner_type='axial' needs `abstraction_key_fn` and `hidden_states` to decode.")


def _run_kernel(
    kernels,
    combiner_type,
    q,
    k,
    v,
    state,
    extra,
    block_size,
    span_summary,
    abstraction_key_fn,
    hidden_states,
    use_spans=True,
):
    """The output of the Fixed, Logsparse, Axial or Mixture one of `kernels` (steps or chunks), each called with the
    arguments it reads and `extra` (a step: `valid (B,)`; a chunk: its `_Chunk`). Updates `state` in place.
    `use_spans=False` (Fixed only) drops the span summaries."""
    fixed, logsparse, axial, mixture = kernels
    if combiner_type == "fixed":
        return fixed(q, k, v, state, block_size, span_summary, extra, use_spans=use_spans)
    if combiner_type == "logsparse":
        return logsparse(q, k, v, state, span_summary, extra)
    if combiner_type == "axial":
        _check_axial_inputs(combiner_type, abstraction_key_fn, hidden_states)
        return axial(q, k, v, hidden_states, state, block_size, abstraction_key_fn, extra)
    if combiner_type == "mixture":
        return mixture(q, k, v, state, block_size, span_summary, extra)
    raise ValueError(f"Unknown combiner_type {combiner_type!r}; expected one of {COMBINER_TYPES}.")


def _fixed_step(q, k, v, state, s, span_summary, valid, use_spans=True):
    length = state["length"]
    slot, seg = length % s, length // s
    for name, t in (("seg_q", q), ("seg_k", k), ("seg_v", v)):
        state[name] = _write(state[name], slot, t, valid)
    arange_s = torch.arange(s, device=q.device)
    direct = torch.einsum("bhd,bhjd->bhj", q, state["seg_k"])  # own segment, slots <= current
    if not use_spans:  # the ablation without span summaries: the own segment only
        (p_direct,) = _step_softmax([(direct, arange_s[None] <= slot[:, None])], v.dtype)
        return torch.einsum("bhj,bhjd->bhd", p_direct, state["seg_v"])
    span_k, span_v = state["span_k"], state["span_v"]
    span = torch.einsum("bhd,bhnd->bhn", q, span_k)  # earlier segments
    p_direct, p_span = _step_softmax(
        [
            (direct, arange_s[None] <= slot[:, None]),
            (span, torch.arange(span_k.shape[2], device=q.device)[None] < seg[:, None]),
        ],
        v.dtype,
    )
    out = torch.einsum("bhj,bhjd->bhd", p_direct, state["seg_v"]) + torch.einsum("bhn,bhnd->bhd", p_span, span_v)

    done = valid & (slot == s - 1)  # the segment is complete: summarise it once

    def summarise(span_k, span_v):
        segment = [state[name][:, :, None] for name in ("seg_q", "seg_k", "seg_v")]
        key, value, _ = block_summaries(*segment, _all_real(q.shape[0], 1, s, device=q.device), span_summary)
        if not torch.compiler.is_compiling():  # a compiled step's buffers are at full capacity
            needed = int(seg.max()) + 1
            span_k, span_v = _grow(span_k, needed), _grow(span_v, needed)
        return _write(span_k, seg, key[:, :, 0], done), _write(span_v, seg, value[:, :, 0], done)

    state["span_k"], state["span_v"] = _if_any(done, summarise, (span_k, span_v))
    return out


def _logsparse_levels(state) -> int:
    """The levels a (static) Logsparse state holds summaries for, plus level 0 (the raw tokens)."""
    return 1 + max((int(name[5:-2]) for name in state if name.startswith("level") and name.endswith("_k")), default=0)


def _logsparse_step(q, k, v, state, span_summary, valid):
    length = state["length"]
    eager = not torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        buffer = _grow(state[name], int(length.max()) + 1) if eager else state[name]
        state[name] = _write(buffer, length, t, valid)

    # O(log L) levels, one span each. A compiled step reads every level of its static state (a level past the
    # position's bit length has no span: masked, the same result), so no loop count follows the data. The per-level
    # indices are computed for all levels at once and the spans scored in one product and one softmax (a step is
    # dispatch-bound at batch 1: ops, not FLOPs, are its cost).
    num_levels = int(length.max()).bit_length() if eager else _logsparse_levels(state)
    shifted = length[:, None] >> torch.arange(num_levels, device=q.device)  # (B, levels)
    has_span = (shifted & 1).bool()  # bit l of i set: the left sibling block exists
    buffers = [(state["k"], state["v"])]
    buffers += [(state[f"level{level}_k"], state[f"level{level}_v"]) for level in range(1, num_levels)]
    last = torch.tensor([key_buf.shape[2] - 1 for key_buf, _ in buffers], device=q.device, dtype=shifted.dtype)
    blocks = torch.minimum((shifted - 1).clamp(min=0), last)
    keys, values = [k[:, :, None]], [v[:, :, None]]  # {i}
    for level, (key_buf, value_buf) in enumerate(buffers):
        keys.append(_gather(key_buf, blocks[:, level : level + 1]))  # (B, H, 1, .)
        values.append(_gather(value_buf, blocks[:, level : level + 1]))
    keys, values = torch.cat(keys, dim=2), torch.cat(values, dim=2)  # (B, H, 1 + levels, .)
    allowed = torch.cat([torch.ones_like(has_span[:, :1]), has_span], dim=1)
    (probs,) = _step_softmax([((q[:, :, None] * keys).sum(-1), allowed)], v.dtype)
    out = (probs[..., None] * values).sum(2)

    end = length + 1
    num_levels = int(end.max()).bit_length() if eager else _logsparse_levels(state)
    sizes = 2 ** torch.arange(1, max(num_levels, 1), device=q.device)
    completed = valid[:, None] & (end[:, None] % sizes == 0)  # (B, levels - 1): a block of size 2^l just completed
    # Eager: only the levels where a block completes (one sync; on average about one level per step). Compiled:
    # every level, each behind a `torch.cond`.
    levels = (completed.any(0).nonzero()[:, 0] + 1).tolist() if eager else range(1, num_levels)
    for level in levels:
        size = 2**level
        done = completed[:, level - 1]
        index = end // size - 1

        def summarise(key_buf, value_buf, size=size, done=done, index=index):
            # The block's 2^l tokens of every sample (O(B 2^l)); the completing samples' summaries are written.
            positions = ((end - size).clamp(min=0)[:, None] + torch.arange(size, device=q.device)).clamp(
                max=state["k"].shape[2] - 1
            )
            blocks = [_gather(state[name], positions)[:, :, None] for name in ("q", "k", "v")]
            key, value, _ = block_summaries(*blocks, _all_real(q.shape[0], 1, size, device=q.device), span_summary)
            new = []
            for buffer, summary in ((key_buf, key), (value_buf, value)):
                if not torch.compiler.is_compiling():  # eager: created by the first completed block, grown as needed
                    if buffer is None:
                        buffer = summary.new_zeros(q.shape[0], summary.shape[1], 1, summary.shape[-1])
                    buffer = _grow(buffer, int(torch.where(done, index, 0).max()) + 1)
                new.append(_write(buffer, index, summary[:, :, 0], done))
            return new

        names = (f"level{level}_k", f"level{level}_v")
        buffers = tuple(state.get(name) for name in names)
        state[names[0]], state[names[1]] = summarise(*buffers) if eager else _if_any(done, summarise, buffers)
    return out


def _axial_step(q, k, v, x, state, cols, abstraction_key_fn, valid):
    length = state["length"]
    col, row = length % cols, length // cols
    for name, t in (("row_q", q), ("row_k", k), ("row_v", v)):
        state[name] = _write(state[name], col, t, valid)
    state["row_x"] = _write(state["row_x"], col, x, valid, dim=1)
    abs_k = _gather(state["abs_k"], col[:, None], dim=3)[:, :, :, 0]  # (B, H, R, D): abstractions of column c
    abs_v = _gather(state["abs_v"], col[:, None], dim=3)[:, :, :, 0]
    direct = torch.einsum("bhd,bhjd->bhj", q, state["row_k"])
    span = torch.einsum("bhd,bhrd->bhr", q, abs_k)
    p_direct, p_span = _step_softmax(
        [
            (direct, torch.arange(cols, device=q.device)[None] <= col[:, None]),
            (span, torch.arange(abs_k.shape[2], device=q.device)[None] < row[:, None]),
        ],
        v.dtype,
    )
    out = torch.einsum("bhj,bhjd->bhd", p_direct, state["row_v"]) + torch.einsum("bhr,bhrd->bhd", p_span, abs_v)

    done = valid & (col == cols - 1)  # the row is complete: build its C column abstractions once

    def summarise(abs_k, abs_v):
        qb, kb, vb = (state[name][:, :, None] for name in ("row_q", "row_k", "row_v"))
        real_b = _all_real(q.shape[0], 1, cols, device=q.device)
        value, key = axial_row_abstractions(
            qb, kb, vb, real_b, qb @ kb.transpose(-1, -2), abstraction_key_fn, state["row_x"]
        )
        new = []
        for buffer, summary in ((abs_k, key), (abs_v, value)):
            if not torch.compiler.is_compiling():
                buffer = _grow(buffer, int(row.max()) + 1)
            new.append(_write(buffer, row, summary[:, :, 0], done))
        return new

    state["abs_k"], state["abs_v"] = _if_any(done, summarise, (state["abs_k"], state["abs_v"]))
    return out


def _mixture_step(q, k, v, state, cols, span_summary, valid):
    length = state["length"]
    col, row = length % cols, length // cols
    eager = not torch.compiler.is_compiling()
    for name, t in (("q", q), ("k", k), ("v", v)):
        buffer = _grow(state[name], int(length.max()) + 1, multiple=cols) if eager else state[name]
        state[name] = _write(buffer, length, t, valid)
    device, arange_c = q.device, torch.arange(cols, device=q.device)
    num_rows = state["k"].shape[2] // cols

    row_pos = (row * cols)[:, None] + arange_c  # own row
    col_pos = torch.arange(num_rows, device=device)[None] * cols + col[:, None]  # own column
    left_rows = torch.arange(state["left_k"].shape[2], device=device)
    parts, values = [], []
    # own row and own column: one gather of both position sets (the step is dispatch-bound at batch 1)
    positions = torch.cat([row_pos, col_pos], dim=1)
    allowed = torch.cat([arange_c[None] <= col[:, None], col_pos < row_pos[:, :1]], dim=1)
    parts.append((torch.einsum("bhd,bhjd->bhj", q, _gather(state["k"], positions)), allowed))
    values.append(_gather(state["v"], positions))
    # column spans: every other column, rows above
    parts.append(
        (torch.einsum("bhd,bhmd->bhm", q, state["col_k"]), (arange_c[None] != col[:, None]) & (row > 0)[:, None])
    )
    values.append(state["col_v"])
    # row spans of the earlier rows, left and right of the own column
    earlier = left_rows[None] < row[:, None]
    for side, has in (("left", col > 0), ("right", col < cols - 1)):
        key = _gather(state[f"{side}_k"], col[:, None], dim=3)[:, :, :, 0]
        parts.append((torch.einsum("bhd,bhtd->bht", q, key), earlier & has[:, None]))
        values.append(_gather(state[f"{side}_v"], col[:, None], dim=3)[:, :, :, 0])
    probs = _step_softmax(parts, v.dtype)
    out = sum(torch.einsum("bhj,bhjd->bhd", p, value) for p, value in zip(probs, values))

    done = valid & (col == cols - 1)  # the row is complete: its row spans, and the column spans grow by a row

    def summarise(left_k, left_v, right_k, right_v, col_k, col_v):
        grid = [state[name].unflatten(2, (num_rows, cols)) for name in ("q", "k", "v")]  # (B, H, R, C, .)
        own = [_gather(t, row[:, None]) for t in grid]  # (B, H, 1, C, .)
        real_row = _all_real(q.shape[0], 1, cols, device=device)
        new = []
        for (key_buf, value_buf), reverse in (((left_k, left_v), False), ((right_k, right_v), True)):
            key, value, _ = running_span_summaries(*own, real_row, span_summary, reverse=reverse)
            for buffer, summary in ((key_buf, key), (value_buf, value)):
                if not torch.compiler.is_compiling():
                    buffer = _grow(buffer, int(row.max()) + 1)
                new.append(_write(buffer, row, summary[:, :, 0], done))
        above = (torch.arange(num_rows, device=device)[None] <= row[:, None])[:, None, :, None]
        key, value = _column_summaries(*grid, above.expand(-1, -1, -1, cols), span_summary)
        for buffer, summary in ((col_k, key), (col_v, value)):
            new.append(torch.where(done[:, None, None, None], summary.to(buffer.dtype), buffer))
        return new

    names = ("left_k", "left_v", "right_k", "right_v", "col_k", "col_v")
    for name, buffer in zip(names, _if_any(done, summarise, tuple(state[name] for name in names))):
        state[name] = buffer
    return out


# ----------------------------------------------------------------------------------------------------------------------
# A chunk of new tokens per sample
# ----------------------------------------------------------------------------------------------------------------------
def combiner_chunk_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: dict[str, torch.Tensor],
    *,
    combiner_type: str,
    block_size: int,
    span_summary: str = "max",
    valid: torch.Tensor | None = None,
    abstraction_key_fn: Callable | None = None,
    hidden_states: torch.Tensor | None = None,
    max_length: int | None = None,
    use_spans: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Causal decoding of a chunk of `T` tokens per sample against the state, which they then join.

    Args:
        q, k: `(B, H, T, D)`, v: `(B, H, T, Dv)` of the new tokens (q not yet scaled). hidden_states: `(B, T, d)`
            (Axial: the layer input, for the abstraction keys of rows that complete).
        state: from `combiner_prefill_state`, `combiner_step` or an earlier chunk (its buffers may be updated in place
            where no gradient is involved, as `combiner_step` does).
        valid: `(B, T)` bool; False marks a padding token, which leaves that sample's state unchanged.
        max_length: passed to `combiner_step` for a one-token chunk (needed to compile / export it). A chunk of
            T > 1 tokens sizes its work on the data (blocks completed, buffer capacities): eager only.
        use_spans: False for the ablation without span summaries (Fixed only: the own segment alone).

    Returns:
        `(B, H, T, Dv)` (equal to the full causal op at the valid tokens' positions) and the new state (equal to the
        state of `T` calls of `combiner_step`).
    """
    check_span_summary(span_summary)
    check_use_spans(use_spans, combiner_type)
    batch_size, _, num_new, head_dim = q.shape
    _check_axial_inputs(combiner_type, abstraction_key_fn, hidden_states)
    if num_new == 1:  # one token: the plain step
        out, state = combiner_step(
            q[:, :, 0],
            k[:, :, 0],
            v[:, :, 0],
            state,
            combiner_type=combiner_type,
            block_size=block_size,
            span_summary=span_summary,
            valid=None if valid is None else valid[:, 0],
            abstraction_key_fn=abstraction_key_fn,
            hidden_states=None if hidden_states is None else hidden_states[:, 0],
            max_length=max_length,
            use_spans=use_spans,
        )
        return out[:, :, None], state
    if torch.compiler.is_exporting():
        raise NotImplementedError(
            "torch.export of Combiner decoding takes one new token per call (`combiner_step`, fixed shapes); a chunk "
            f"of {num_new} tokens against a filled state sizes its work on the data and runs eagerly."
        )
    q = q * head_dim**-0.5
    if valid is None:
        valid = torch.ones(batch_size, num_new, dtype=torch.bool, device=q.device)
    chunk = _Chunk(valid.bool().to(q.device), state["length"])
    state = dict(state)
    kernels = (_fixed_chunk, _logsparse_chunk, _axial_chunk, _mixture_chunk)
    out = _run_kernel(
        kernels,
        combiner_type,
        q,
        k,
        v,
        state,
        chunk,
        block_size,
        span_summary,
        abstraction_key_fn,
        hidden_states,
        use_spans,
    )
    state["length"] = state["length"] + chunk.count
    return out, state


# ----------------------------------------------------------------------------------------------------------------------
# Chunk helpers
# ----------------------------------------------------------------------------------------------------------------------
class _Chunk:
    """Where each chunk token goes: `valid (B, T)`, `count (B,)` valid tokens, `order (B, T)` chunk indices of the
    valid tokens first (stable), `ordinal (B, T)` a valid token's rank among its sample's valid tokens (0 for a
    leading padding token), `before (B, T)` the sample's length when token t arrives (what step t sees)."""

    def __init__(self, valid: torch.Tensor, length: torch.Tensor):
        taken = valid.long().cumsum(1)
        self.valid = valid
        self.count = taken[:, -1]
        self.order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        self.ordinal = (taken - 1).clamp(min=0)
        self.before = length[:, None] + taken - valid.long()


def _capacity(capacity: int, needed: torch.Tensor, multiple: int = 1) -> int:
    """The size `_grow` leaves a buffer of `capacity` entries at when called with `needed[t]` (`(T,)`, 0: no call)
    at step t = 0, 1, ... in turn. Each growth at least doubles, so this loops O(log L) times, not T times."""
    while True:
        over = (needed > capacity).nonzero()
        if over.numel() == 0:
            return capacity
        target = max(int(needed[over[0, 0]]), 2 * capacity)
        capacity = -(-target // multiple) * multiple


def _grow_to(buffer: torch.Tensor, capacity: int, dim: int = 2) -> torch.Tensor:
    return pad_to_length(buffer, capacity, dim=dim) if buffer.shape[dim] < capacity else buffer


def _step_growth(events: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """`(T,)` size a step asks `_grow` for: `sizes (B, T)` maximised over the samples, 0 where no `events (B, T)`."""
    return torch.where(events.any(0), sizes.amax(0), torch.zeros_like(sizes[0]))


def _write_many(
    buffer: torch.Tensor, index: torch.Tensor, values: torch.Tensor, where: torch.Tensor, dim: int = 2
) -> torch.Tensor:
    """`buffer[b, (h,) index[b, j]] = values[b, (:,) j]` for every `(b, j)` where `where (B, K)`; `dim` in {1, 2}
    (`values` `(B, K, ...)` or `(B, H, K, ...)`). In place when autograd is off (`generate`)."""
    rows, cols = where.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return buffer
    at = index[rows, cols]
    if dim == 1:
        indices, new = (rows, at), values[rows, cols]
    else:
        heads = torch.arange(buffer.shape[1], device=buffer.device)
        indices, new = (rows[:, None], heads[None, :], at[:, None]), values[rows, :, cols]  # new: (P, H, ...)
    new = new.to(buffer.dtype)
    if torch.is_grad_enabled():  # autograd may have saved the buffer for a backward (see `_write`)
        return buffer.index_put(indices, new)
    return buffer.index_put_(indices, new)


class _Local:
    """Fixed / Axial / Mixture: the local sequence of a sample, from the start of its current segment / row (`size`
    positions per block) on: its filled slots, then its packed chunk tokens, laid out as `blocks` blocks of `size`.

    `start (B,)` filled slots of the current block, `end (B,)` = start + valid count, `first (B,)` the global index
    of local block 0, `completed (B,)` local blocks completed by the chunk. Packed token o sits at local position
    `query[b, o] = start[b] + o` (`(B, T)`, distinct and inside the layout even for padding tokens, whose results
    are junk), in block `block_of` and slot `slot` (its column, for Axial / Mixture)."""

    def __init__(self, length: torch.Tensor, chunk: _Chunk, size: int):
        num_new = chunk.valid.shape[1]
        self.size, self.start, self.first = size, length % size, length // size
        self.end = self.start + chunk.count
        self.completed = self.end // size
        self.blocks = -(-(int(self.start.max()) + num_new) // size)
        self.width = self.blocks * size
        self.query = self.start[:, None] + torch.arange(num_new, device=length.device)
        self.block_of, self.slot = self.query // size, self.query % size
        self.real = torch.arange(self.width, device=length.device)[None] < self.end[:, None]  # (B, W)

    def sequence(self, ring: torch.Tensor, new: torch.Tensor, chunk: "_Chunk", dim: int = 2) -> torch.Tensor:
        """The local sequence `(.., W, ..)` along `dim` of a state's ring (`size` slots) and the chunk's tokens."""
        return _gather(torch.cat([ring, _gather(new, chunk.order, dim=dim)], dim=dim), self.ring_source(), dim=dim)

    def ring_source(self) -> torch.Tensor:
        """`(B, W)` index of each local position into `cat([ring (size slots), packed chunk])`: p < start, the
        filled ring slot p; start <= p < end, the packed token p - start; end <= p < size, the ring's old slot p
        (so that the new ring keeps the slots no token overwrote); beyond, anything (never real)."""
        p = torch.arange(self.width, device=self.end.device)[None]
        start, end = self.start[:, None], self.end[:, None]
        return torch.where(p < start, p, torch.where(p < end, self.size + p - start, torch.where(p < self.size, p, 0)))

    def ring(self) -> torch.Tensor:
        """`(B, size)`: the local position whose token each ring slot holds after the chunk (the last one written to
        it): the slot's position in the current block if written, else in the block before (or the old slot)."""
        slot = torch.arange(self.size, device=self.end.device)[None]
        current = (self.end // self.size * self.size)[:, None]
        return torch.where(
            current + slot < self.end[:, None], current + slot, (current - self.size).clamp(min=0) + slot
        )

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """`(B, H, W, X)` -> `(B, H, T, X)`: the packed tokens' rows."""
        return _gather(x, self.query)

    def block_logits(self, qb: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Logits against per-block keys shared by the queries of a block (`qb (B, H, n, size, D)`, `keys
        (B, H, n, m, D)`), formed block by block (no per-token copy of the keys): `(B, H, T, m)`."""
        return self.rows((qb @ keys.transpose(-1, -2)).flatten(2, 3))

    def block_mix(self, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`p (B, H, T, m)` against per-block values `(B, H, n, m, Dv)` -> `(B, H, T, Dv)`: the weights are put
        back in the block layout (zero at other positions) for one batched product per block."""
        full = p.new_zeros(*p.shape[:2], self.width, p.shape[-1])
        full = full.scatter(2, self.query[:, None, :, None].expand(p.shape), p)
        return self.rows((full.unflatten(2, (self.blocks, self.size)) @ values).flatten(2, 3))


class _Columns:
    """Axial / Mixture: reads along the columns of a `(B, H, R, C, .)` grid, each packed token reading its own
    column (its local slot). Each column the chunk touches is copied once, column-major: all C of them, in order,
    when the chunk is at least a row long (tokens laid out by local row and column, as the local blocks), else the
    T columns `(start + o) % C` of each sample (token o in column slot o). Reading R rows thus costs
    `min(T, C) R D` copies and `T R D` products: the steps' per-token reads, never a copy of the whole grid for a
    short chunk."""

    def __init__(self, local: _Local):
        batch_size, num_new = local.query.shape
        device = local.query.device
        if num_new >= local.size:
            self.columns, self.k, self.i, self.position = None, local.size, local.blocks, local.query
        else:
            self.columns = (local.start[:, None] + torch.arange(num_new, device=device)) % local.size  # (B, K)
            self.k, self.i = num_new, 1
            self.position = torch.arange(num_new, device=device).expand(batch_size, num_new)

    def gather(self, grid: torch.Tensor) -> torch.Tensor:
        """`(B, H, R, C, .)` -> `(B, H, K, R, .)`: the touched columns, column-major."""
        if self.columns is None:
            return grid.transpose(2, 3).contiguous()
        batch_size, num_heads = grid.shape[:2]
        rows = torch.arange(batch_size, device=grid.device)[:, None, None]
        heads = torch.arange(num_heads, device=grid.device)[None, :, None]
        return grid.transpose(2, 3)[rows, heads, self.columns[:, None, :]]  # slices of R x D, not a per-entry gather

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T, X) -> (B, H, K, I, X)
        full = x.new_zeros(*x.shape[:2], self.i * self.k, x.shape[-1])
        full = full.scatter(2, self.position[:, None, :, None].expand(x.shape), x)
        return full.unflatten(2, (self.i, self.k)).transpose(2, 3)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, K, I, X) -> (B, H, T, X)
        return _gather(x.transpose(2, 3).flatten(2, 3), self.position)

    def logits(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """`q (B, H, T, D)` against its column's rows of `keys (B, H, K, R, D)` -> `(B, H, T, R)`."""
        return self._merge(self._split(q) @ keys.transpose(-1, -2))

    def mix(self, p: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """`p (B, H, T, R)` over its column's rows of `values (B, H, K, R, Dv)` -> `(B, H, T, Dv)`."""
        return self._merge(self._split(p) @ values)


def _completed_summaries(state, names, local: _Local, summaries, chunk: _Chunk):
    """Write the summaries `(B, H, n, ...)` of the local blocks completed by the chunk into the state's buffers
    `names` at global blocks `first + m`, grown as the steps grow them (to the largest current block + 1, at each
    step that completes a block of some sample)."""
    most = int(local.completed.max())
    if not most:
        return
    size, before = local.size, chunk.before
    done = chunk.valid & (before % size == size - 1)
    capacity = _capacity(state[names[0]].shape[2], _step_growth(done, before // size + 1))
    block = torch.arange(most, device=before.device)[None]
    where = block < local.completed[:, None]
    for name, summary in zip(names, summaries):
        state[name] = _write_many(
            _grow_to(state[name], capacity), local.first[:, None] + block, summary[:, :, :most], where
        )


# ----------------------------------------------------------------------------------------------------------------------
# Chunk: Combiner-Fixed
# ----------------------------------------------------------------------------------------------------------------------
def _fixed_chunk(q, k, v, state, s, span_summary, chunk, use_spans=True):
    """Own segment (causal) from the local blocks; spans: the state's earlier segments and the local segments the
    chunk completed before the token's own; one joint softmax per token. `use_spans=False`: the own segment only."""
    batch_size, device = q.shape[0], q.device
    local = _Local(state["length"], chunk, s)
    seq = [local.sequence(state[name], t, chunk) for name, t in (("seg_q", q), ("seg_k", k), ("seg_v", v))]
    qb, kb, vb = (t.unflatten(2, (local.blocks, s)) for t in seq)  # (B, H, n, s, .)
    own = torch.arange(s, device=device)[None, None] <= local.slot[..., None]  # causal: slots up to the token's
    if not use_spans:
        (p_direct,) = joint_softmax([(local.block_logits(qb, kb), own[:, None])], v.dtype)
        for name, t in zip(("seg_q", "seg_k", "seg_v"), seq):
            state[name] = _gather(t, local.ring())
        return _gather(local.block_mix(p_direct, vb), chunk.ordinal)
    real_b = local.real.view(batch_size, 1, local.blocks, s)
    local_k, local_v, _ = block_summaries(qb, kb, vb, real_b, span_summary)  # (B, H, n, .)
    span_k, span_v = state["span_k"], state["span_v"]
    queries = local.rows(seq[0])  # (B, H, T, D): the packed tokens
    earlier = torch.arange(span_k.shape[2], device=device)[None] < local.first[:, None]
    local_earlier = torch.arange(local.blocks, device=device)[None, None] < local.block_of[..., None]
    p_direct, p_prior, p_local = joint_softmax(
        [
            (local.block_logits(qb, kb), own[:, None]),
            (queries @ span_k.transpose(-1, -2), earlier[:, None, None]),
            (queries @ local_k.transpose(-1, -2), local_earlier[:, None]),
        ],
        v.dtype,
    )
    out = local.block_mix(p_direct, vb) + p_prior @ span_v + p_local @ local_v

    for name, t in zip(("seg_q", "seg_k", "seg_v"), seq):
        state[name] = _gather(t, local.ring())
    _completed_summaries(state, ("span_k", "span_v"), local, (local_k, local_v), chunk)
    return _gather(out, chunk.ordinal)


# ----------------------------------------------------------------------------------------------------------------------
# Chunk: Combiner-Axial
# ----------------------------------------------------------------------------------------------------------------------
def _axial_chunk(q, k, v, x, state, cols, abstraction_key_fn, chunk):
    """Own row (causal) from the local rows; spans: the abstractions of the token's column for the state's earlier
    rows and for the local rows the chunk completed before the token's own; one joint softmax per token."""
    batch_size, device = q.shape[0], q.device
    local = _Local(state["length"], chunk, cols)
    seq = [local.sequence(state[name], t, chunk) for name, t in (("row_q", q), ("row_k", k), ("row_v", v))]
    seq_x = local.sequence(state["row_x"], x, chunk, dim=1)
    qb, kb, vb = (t.unflatten(2, (local.blocks, cols)) for t in seq)  # (B, H, n, C, .)
    real_b = local.real.view(batch_size, 1, local.blocks, cols)
    row_logits = qb @ kb.transpose(-1, -2)
    # Abstractions of the local rows (used for those the chunk completes), zero hidden states at padded slots.
    local_v, local_k = axial_row_abstractions(
        qb, kb, vb, real_b, row_logits, abstraction_key_fn, zero_where_not(seq_x, local.real[..., None])
    )
    queries = local.rows(seq[0])
    columns = _Columns(local)
    abs_k, abs_v = state["abs_k"], state["abs_v"]  # (B, H, R, C, .)
    earlier = torch.arange(abs_k.shape[2], device=device)[None] < local.first[:, None]
    local_earlier = torch.arange(local.blocks, device=device)[None, None] < local.block_of[..., None]
    own = torch.arange(cols, device=device)[None, None] <= local.slot[..., None]
    p_direct, p_prior, p_local = joint_softmax(
        [
            (local.rows(row_logits.flatten(2, 3)), own[:, None]),
            (columns.logits(queries, columns.gather(abs_k)), earlier[:, None, None]),
            (columns.logits(queries, columns.gather(local_k)), local_earlier[:, None]),
        ],
        v.dtype,
    )
    out = (
        local.block_mix(p_direct, vb)
        + columns.mix(p_prior, columns.gather(abs_v))
        + columns.mix(p_local, columns.gather(local_v))
    )

    ring = local.ring()
    for name, t in zip(("row_q", "row_k", "row_v"), seq):
        state[name] = _gather(t, ring)
    state["row_x"] = _gather(seq_x, ring, dim=1)
    _completed_summaries(state, ("abs_k", "abs_v"), local, (local_k, local_v), chunk)
    return _gather(out, chunk.ordinal)


# ----------------------------------------------------------------------------------------------------------------------
# Chunk: Combiner-Logsparse
# ----------------------------------------------------------------------------------------------------------------------
def _logsparse_chunk(q, k, v, state, span_summary, chunk):
    length, before = state["length"], chunk.before
    batch_size, device = q.shape[0], q.device
    position = length[:, None] + chunk.ordinal  # (B, T) global position of each token
    # Raw tokens: every step grows the buffers to hold its token (valid or not), then writes the valid ones.
    capacity = _capacity(state["k"].shape[2], before.amax(0) + 1)
    for name, t in (("q", q), ("k", k), ("v", v)):
        state[name] = _write_many(_grow_to(state[name], capacity), position, t, chunk.valid)

    # Summaries of the dyadic blocks that complete inside the chunk, level by level (O(log L) levels): block j of
    # level l completes when the length reaches (j + 1) 2^l, for j in [length >> l, (length + n) >> l).
    new_end = length + chunk.count
    for level in range(1, int(new_end.max()).bit_length()):
        size = 2**level
        first = length // size
        completed = new_end // size - first
        most = int(completed.max())
        if not most:
            continue
        blocks = first[:, None] + torch.arange(most, device=device)  # (B, K)
        where = torch.arange(most, device=device)[None] < completed[:, None]
        tokens = (blocks[:, :, None] * size + torch.arange(size, device=device)).flatten(1).clamp(max=capacity - 1)
        qb, kb, vb = (_gather(state[name], tokens).unflatten(2, (most, size)) for name in ("q", "k", "v"))
        real = torch.ones(batch_size, 1, most, size, dtype=torch.bool, device=device)
        key, value, _ = block_summaries(qb, kb, vb, real, span_summary)
        done = chunk.valid & ((before + 1) % size == 0)  # the steps that complete a block of this level
        for name, summary in ((f"level{level}_k", key), (f"level{level}_v", value)):
            buffer = state.get(name)
            if buffer is None:  # created by the first completed block, as the steps do
                buffer = summary.new_zeros(batch_size, summary.shape[1], 1, summary.shape[-1])
            buffer = _grow_to(buffer, _capacity(buffer.shape[2], _step_growth(done, ((before + 1) // size) * done)))
            state[name] = _write_many(buffer, blocks, summary, where)

    # Each token: itself, and for every level l whose bit is set in its position, block (i >> l) - 1 of level l.
    parts = [((q * k).sum(-1, keepdim=True), torch.ones(batch_size, 1, 1, 1, dtype=torch.bool, device=device))]
    values = [v[:, :, :, None]]
    for level in range(int(position.max()).bit_length()):
        names = ("k", "v") if level == 0 else (f"level{level}_k", f"level{level}_v")
        if names[0] not in state:  # no block of this level completed: no token has this bit set
            continue
        key_buf, value_buf = (state[name] for name in names)
        has_span = ((position >> level) & 1).bool() & chunk.valid
        block = ((position >> level) - 1).clamp(min=0, max=key_buf.shape[2] - 1)
        key, value = _gather(key_buf, block), _gather(value_buf, block)  # (B, H, T, .)
        parts.append(((q * key).sum(-1, keepdim=True), has_span[:, None, :, None]))
        values.append(value[:, :, :, None])
    probs = joint_softmax(parts, v.dtype)
    return sum(p[..., None] * value for p, value in zip(probs, values)).sum(3)


# ----------------------------------------------------------------------------------------------------------------------
# Chunk: Combiner-Mixture
# ----------------------------------------------------------------------------------------------------------------------
def _column_spans(state, grid_q, column_major, local: _Local, qb, kb, span_summary):
    """The column summaries seen from each local row m: over the rows above it, `(B, H, n + 1, C, .)` keys and values
    (index m; the last index: above the row after the last local one). m = 0 is the state's. Rows completed by the
    chunk need new ones: their pooled query and key combine the pool over the rows before the chunk (one reduction
    of the past columns) with a running pool over the local rows, and their values attend to the whole column
    above: O(L d) per chunk, only when a row completes (a step pays it at every completed row). `column_major(i)`:
    the raw keys (i = 1) / values (i = 2) of the rows read, `(B, H, C, rows, .)`."""
    col_k, col_v = state["col_k"][:, :, None], state["col_v"][:, :, None]  # (B, H, 1, C, .)
    if not int(local.completed.max()):
        return col_k, col_v
    device, dtype = grid_q.device, grid_q.dtype
    keys, values = column_major(1), column_major(2)
    first, blocks = local.first, local.blocks
    past = int(first.max())
    before = (torch.arange(past, device=device)[None] < first[:, None])[:, None, :, None, None]  # (B, 1, P, 1, 1)
    pooled = []
    for past_t, local_t in ((grid_q[:, :, :past], qb), (keys[:, :, :, :past].transpose(2, 3), kb)):
        # The pool over the rows before the chunk, masked per sample (the ops' add / product masks); max: the lowest
        # value where no row (never picked over a local row's).
        if span_summary == "max":
            lowest = torch.finfo(dtype).min
            prior = lowest_where_not(past_t, before).amax(2, keepdim=True) if past else lowest
            pooled.append(
                torch.maximum(local_t.cummax(dim=2).values, torch.as_tensor(prior, dtype=dtype, device=device))
            )
        else:
            prior = zero_where_not(past_t, before).sum(2, keepdim=True) if past else 0.0
            total = local_t.cumsum(dim=2) + prior
            if span_summary == "mean":
                count = first[:, None] + torch.arange(1, blocks + 1, device=device)  # (B, n) rows pooled
                total = total / count.to(dtype)[:, None, :, None, None]
            pooled.append(total)
    pooled_q, pooled_k = pooled  # index m: the rows up to local row m, i.e. above local row m + 1
    last = first[:, None] + torch.arange(blocks, device=device)  # (B, n) the last row of each summary
    # Column-major products (B, H, C, n, rows): pooled query of (local row m, column c) against column c's keys.
    logits = pooled_q.transpose(2, 3) @ keys.transpose(-1, -2)
    inside = (torch.arange(keys.shape[3], device=device)[None, None] <= last[..., None])[:, None, None]
    weights = masked_softmax(logits, inside).to(values.dtype)
    summary_v = (weights @ values).transpose(2, 3)
    return torch.cat([col_k, pooled_k], dim=2), torch.cat([col_v, summary_v], dim=2)


def _mixture_chunk(q, k, v, state, cols, span_summary, chunk):
    """Own row prefix from the local rows; own column (rows above) from the raw columns; column spans of the token's
    row (the state's or, below a row the chunk completes, new ones); left / right row spans of the token's column
    for the state's rows and the local rows completed before the token's own; one joint softmax per token."""
    length, before = state["length"], chunk.before
    batch_size, device = q.shape[0], q.device
    # Raw tokens (own row, own column, column spans): written first, then read back.
    capacity = _capacity(state["k"].shape[2], before.amax(0) + 1, multiple=cols)
    position = length[:, None] + chunk.ordinal
    for name, t in (("q", q), ("k", k), ("v", v)):
        state[name] = _write_many(_grow_to(state[name], capacity), position, t, chunk.valid)
    grid = [state[name].unflatten(2, (capacity // cols, cols)) for name in ("q", "k", "v")]  # (B, H, R, C, .)

    local = _Local(length, chunk, cols)
    source = ((local.first * cols)[:, None] + torch.arange(local.width, device=device)).clamp(max=capacity - 1)
    seq = [_gather(state[name], source) for name in ("q", "k", "v")]
    qb, kb, vb = (t.unflatten(2, (local.blocks, cols)) for t in seq)  # (B, H, n, C, .)
    real_b = local.real.view(batch_size, 1, local.blocks, cols)
    queries = local.rows(seq[0])
    columns = _Columns(local)
    row = local.first[:, None] + local.block_of  # (B, T) global row of each token
    # Rows any part reads: those above a token (own column), those of the new column summaries.
    top = min(grid[1].shape[2], max(int(row.max()), int((local.first + local.completed).max())))
    major = {}

    def column_major(i):  # rows [0, top) of the raw keys (1) / values (2), column-major, copied once
        if i not in major:
            major[i] = grid[i][:, :, :top].transpose(2, 3).contiguous()
        return major[i]

    def own_column(i):  # the columns the tokens read
        return column_major(i) if columns.columns is None else columns.gather(grid[i][:, :, :top])

    col_k, col_v = _column_spans(state, grid[0], column_major, local, qb, kb, span_summary)
    local_spans = [running_span_summaries(qb, kb, vb, real_b, span_summary, reverse) for reverse in (False, True)]

    arange_c = torch.arange(cols, device=device)
    own_row = arange_c[None, None] <= local.slot[..., None]
    above = torch.arange(top, device=device)[None, None] < row[..., None]
    other_column = (arange_c[None, None] != local.slot[..., None]) & (row > 0)[..., None]
    parts = [
        (local.block_logits(qb, kb), own_row),
        (columns.logits(queries, own_column(1)), above),
        (local.block_logits(qb, col_k[:, :, : local.blocks]), other_column),
    ]
    local_earlier = torch.arange(local.blocks, device=device)[None, None] < local.block_of[..., None]
    for side, has in (("left", local.slot > 0), ("right", local.slot < cols - 1)):
        earlier = torch.arange(state[f"{side}_k"].shape[2], device=device)[None, None] < local.first[:, None, None]
        parts.append((columns.logits(queries, columns.gather(state[f"{side}_k"])), earlier & has[..., None]))
    for (local_k, _, _), has in zip(local_spans, (local.slot > 0, local.slot < cols - 1)):
        parts.append((columns.logits(queries, columns.gather(local_k)), local_earlier & has[..., None]))
    probs = joint_softmax([(logits, allowed[:, None]) for logits, allowed in parts], v.dtype)
    out = local.block_mix(probs[0], vb) + columns.mix(probs[1], own_column(2))
    out = out + local.block_mix(probs[2], col_v[:, :, : local.blocks])
    out = (
        out
        + columns.mix(probs[3], columns.gather(state["left_v"]))
        + columns.mix(probs[4], columns.gather(state["right_v"]))
    )
    for p, (_, local_v, _) in zip(probs[5:], local_spans):
        out = out + columns.mix(p, columns.gather(local_v))

    for side, (local_k, local_v, _) in zip(("left", "right"), local_spans):
        _completed_summaries(state, (f"{side}_k", f"{side}_v"), local, (local_k, local_v), chunk)
    if int(local.completed.max()):  # the column summaries over the rows above the new current row
        state["col_k"] = _gather(col_k, local.completed[:, None])[:, :, 0]
        state["col_v"] = _gather(col_v, local.completed[:, None])[:, :, 0]
    return _gather(out, chunk.ordinal)


__all__ = ["combiner_chunk_step"]
