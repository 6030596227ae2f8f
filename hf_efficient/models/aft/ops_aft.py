"""Attention Free Transformer ops (Zhai et al., 2021, "An Attention Free Transformer", arXiv:2105.14103).

Pure tensor functions (torch only). Every AFT variant computes, per channel c, a position-biased softmax
over the key axis that averages the values, gated by sigmoid(Q):

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_tt') V_t' / sum_t' exp(K_t' + w_tt')        (elementwise in c)

with t' <= t in the causal form, padded keys left out, and

    AFT-full    w: any (L, L) matrix (the model passes u v^T or a learned L x L matrix)     `aft_full`
    AFT-local   w_tt' learned for |t - t'| < s, **0** (not -inf) outside the window          `aft_local`
    AFT-simple  w = 0                                                                       `aft_simple`
    AFT-conv    K has one channel per head; w_tt' = kernel[head, t' - t] inside the kernel,
                0 outside; the paper writes it as conv(e^K V, e^w - 1) + sum e^K V            `aft_conv1d`,
                                                                                            `aft_conv2d`

A query with no visible key (all of them padding) outputs 0.

Layouts. q, k, v are (B, L, d) for full/local/simple. AFT-conv has h heads: q, v are (B, L, d) with the
channels grouped head-major (head i owns channels [i*d/h, (i+1)*d/h)), k is (B, L, h). Internally all
variants share one layout: k (B, L, H, C), v (B, L, H, C, D), where H indexes the position bias (1 for
full/local/simple, h for conv), C the channels with their own key (d, or 1 for conv) and D the value
channels that share a key (1, or d/h for conv). Key padding masks are (B, L) with 1 = real, 0 = pad.
Computation runs in float32 (float64 if an input is float64) and returns q's dtype.

Numerics: one scheme for every variant
---------------------------------------
The exact stabiliser is m_tc = max_t' (K_t'c + w_tt'), the max over the **key axis** per query and channel.
Computing it exactly costs an O(L^2 d) elementwise pass that cannot use a matmul, so the fast paths sum
exp(K_t'c + w_tt' - r_tc) with a cheap reference r >= m (every term <= 1, nothing overflows) that keeps
the structure of the op: r = rowmax_t'(w_tt') + max_t'(K_t'c) turns the double sum into a matmul of
exp(w - rowmax) by exp(K - colmax) * V (full, and the blocked window of local/conv); a per-chunk running
max turns causal sums into cumsums (simple, and the out-of-window part of local/conv). r cancels between
numerator and denominator. A separable reference can sit far above m (the key that maximises K is not the
one that maximises w), and then every term can underflow. So each output is **certified**: with all terms
<= 1 and summed as positives, den >= tau = sqrt(finfo.tiny) (1e-19 in float32) guarantees that the largest
term is a normal number and everything that underflowed is below float precision relative to den. The few
entries that fail the certificate (a gap above ~43 between the separable and the exact max: never with
trained activations, often with the +/-200 inputs of the stability tests) are recomputed exactly, densely
(`_exact_entries`: explicit row of logits, exact max, softmax), in chunks of entries. The result is
exact and finite for any finite K and w in every dtype, and as fast as the structured op when nothing fails.

Graphs (`_finalize`). Which entries fail is data: eager runs a Python `if` and `nonzero`. Under `torch.compile`
the fallback is the custom op `_exact_fix` (output shaped like its input, eager `nonzero` inside, backward the
explicit softmax gradient `_exact_grads`, both in the same chunks of entries as eager), so the ops break no graph
under default dynamo settings. Under `torch.export` it is a `torch.cond` branch of plain aten ops. AFT-full's loop
over query tiles follows the length; exported with a dynamic length it becomes a `scan` over tiles of
`_GRAPH_TILE` queries (`_full_sums_graph`, memory still linear), the eager op keeping its streamed loop.

Decoding state (`AFTState`): running sums (max, num, den) of the keys folded so far, relative to exp(max),
plus a window of the last keys/values that the position bias still needs: none for AFT-simple (O(d) per
layer), n_w - 1 for AFT-local/conv (O(s d)), every past key for AFT-full (its w_tt' is arbitrary).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "AFTState",
    "aft_conv1d",
    "aft_conv1d_step",
    "aft_conv2d",
    "aft_empty_state",
    "aft_full",
    "aft_full_step",
    "aft_local",
    "aft_local_step",
    "aft_simple",
    "aft_simple_step",
    "local_window_offsets",
]

NEG_INF = float("-inf")
# Largest number of elements in one (entries, keys) block of the exact fallback.
_BLOCK_ELEMENTS = 1 << 22
# Largest (query block x keys) bias tile of AFT-full (forward and backward).
_TILE_ELEMENTS = 1 << 22
# Causal AFT-simple/local/conv1d longer than twice this (with autograd on) run in segments of this many positions,
# each recomputed in the backward (`_run_segments`): the op's saved activations are then one segment's, not the
# sequence's. Shorter calls run in one piece (no recomputation).
_SEGMENT = 2048


class AFTState(NamedTuple):
    """Causal decoding state of one AFT layer; every tensor has the batch on dim 0.

    `max` (B, G), `num` (B, d), `den` (B, G): running sums over the keys folded so far,
    num = sum exp(K - max) V and den = sum exp(K - max) (max = -inf, sums 0 when empty), with G = d
    (full/local/simple) or h (conv). `keys` (B, W, G), `values` (B, W, d), `valid` (B, W) bool: the keys
    the position bias still needs, oldest first: W = 0 (simple), n_w - 1 (local/conv), every past position
    (full, whose running sums stay empty).
    """

    max: torch.Tensor
    num: torch.Tensor
    den: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    valid: torch.Tensor


def aft_empty_state(
    batch_size: int,
    key_channels: int,
    value_channels: int,
    window_size: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> AFTState:
    """The state before the first token: empty sums and `window_size` invalid (zero) window slots."""
    return AFTState(
        max=torch.full((batch_size, key_channels), NEG_INF, dtype=dtype, device=device),
        num=torch.zeros(batch_size, value_channels, dtype=dtype, device=device),
        den=torch.zeros(batch_size, key_channels, dtype=dtype, device=device),
        keys=torch.zeros(batch_size, window_size, key_channels, dtype=dtype, device=device),
        values=torch.zeros(batch_size, window_size, value_channels, dtype=dtype, device=device),
        valid=torch.zeros(batch_size, window_size, dtype=torch.bool, device=device),
    )


def local_window_offsets(window: int, causal: bool) -> range:
    """Key offsets t' - t covered by an AFT-local window of size s, in band-column order.

    Causal: -(s-1) .. 0 (n_w = s columns); bidirectional: -(s-1) .. s-1 (n_w = 2s - 1 columns), i.e.
    band[t, j] = w[t, t + j - (s - 1)] in both forms.
    """
    return range(-(window - 1), 1 if causal else window)


# --------------------------------------------------------------------------------------------------------
# Shared helpers (internal layout: k (B, L, H, C), v (B, L, H, C, D), valid (B, L) bool)
# --------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors):
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tau(dtype):
    """Certificate threshold: a den of positive terms <= 1 that reaches it lost nothing to underflow."""
    return torch.finfo(dtype).tiny ** 0.5


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def _masked_amax(x, valid, dim, keepdim=False):
    return x.masked_fill(~valid, NEG_INF).amax(dim, keepdim=keepdim)


def _shifted_exp(x, ref, valid):
    """exp(x - ref) on valid entries (ref >= x there, so every value is <= 1), 0 elsewhere.

    Invalid entries and infinite references are replaced before the exp so that neither the forward nor
    the backward ever evaluates inf - inf.
    """
    ref = _finite_or_zero(ref)
    x = torch.where(valid, x, ref)
    return torch.where(valid, torch.exp(x - ref), torch.zeros((), dtype=x.dtype, device=x.device))


def _key_valid(key_padding_mask, batch_size, length, device):
    if key_padding_mask is None:
        return torch.ones(batch_size, length, dtype=torch.bool, device=device)
    if tuple(key_padding_mask.shape) != (batch_size, length):
        raise ValueError(
            f"key_padding_mask has shape {tuple(key_padding_mask.shape)}; expected (batch, keys) = "
            f"{(batch_size, length)}."
        )
    return key_padding_mask.to(device) != 0


def _check_qkv(q, k, v, key_channels=None):
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"q, k, v must be (batch, length, channels); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    if k.shape[:2] != v.shape[:2] or q.shape[0] != k.shape[0] or q.shape[-1] != v.shape[-1]:
        raise ValueError(f"Incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if key_channels is not None and k.shape[-1] != key_channels:
        raise ValueError(f"k has {k.shape[-1]} channels; expected {key_channels}.")


def _merge(parts):
    """Add partial sums given relative to different references.

    part = (ref (B, L, H, C), num (B, L, H, C, D), den (B, L, H, C)) stands for num * exp(ref) and
    den * exp(ref); ref = -inf marks an empty part. Returns the total relative to the largest reference,
    so each part is scaled by exp(ref - max ref) <= 1.
    """
    ref = parts[0][0]
    for part in parts[1:]:
        ref = torch.maximum(ref, part[0])
    num = den = 0
    for part_ref, part_num, part_den in parts:
        scale = torch.exp(torch.where(torch.isfinite(part_ref), part_ref - ref, NEG_INF))
        num = num + scale[..., None] * part_num
        den = den + scale * part_den
    return ref, num, den


class _Exact(NamedTuple):
    """What the exact fallback needs, as tensors and plain values (so that it can be the arguments of a custom op).

    k (B, Lk, H, C), v (B, Lk, H, C, D), valid (B, Lk) bool; `offset`: position of query 0 among the keys (causal);
    `extra`: () or (logit (B, H, C), value (B, H, C, D)), a folded prefix as one pseudo-key before every key;
    `kind` / `bias` / `params`: the position bias (see `_bias_rows`).
    """

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor
    causal: bool
    offset: int = 0
    extra: tuple = ()
    kind: str = "none"
    bias: tuple = ()
    params: tuple = ()


def _bias_gather(kind, bias, params, length, b, t, h):
    """The position bias rows of the gathering kinds as (index into bias[0], inside mask or None):
    rows = where(inside, bias[0][index], 0), (m, length) for query rows t of samples b, heads h."""
    if kind == "dense":  # bias = (w (Bw, Lq, Lk),)
        return (b if bias[0].shape[0] > 1 else torch.zeros_like(b), t), None
    if kind == "band":  # bias = (band (Bb, H, Lb, n_w),), params = (window,): band[b, h, t, j] at key t + j - (s - 1)
        band, window = bias[0], params[0]
        cols = torch.arange(length, device=band.device)[None, :] - t[:, None] + window - 1
        inside = (cols >= 0) & (cols < band.shape[-1])
        bb = b if band.shape[0] > 1 else torch.zeros_like(b)
        tb = t if band.shape[2] > 1 else torch.zeros_like(t)
        return (bb[:, None], h[:, None], tb[:, None], cols.clamp(0, band.shape[-1] - 1)), inside
    if kind == "grid":  # bias = (kernel (h, ks, ks),), params = (grid height, grid width), row-major grid
        kern, gw = bias[0], params[1]
        ks = kern.shape[-1]
        pad = ks // 2
        ky = torch.arange(length, device=kern.device) // gw
        kx = torch.arange(length, device=kern.device) % gw
        dy = ky[None, :] - (t // gw)[:, None] + pad
        dx = kx[None, :] - (t % gw)[:, None] + pad
        inside = (dy >= 0) & (dy < ks) & (dx >= 0) & (dx < ks)
        return (h[:, None], dy.clamp(0, ks - 1), dx.clamp(0, ks - 1)), inside
    raise ValueError(f"Unknown position bias kind {kind!r}.")


def _bias_rows(kind, bias, params, length):
    """bias_rows(b, t, h) -> (m, length): the position bias of query rows t (samples b, heads h) over every key.

    kind "none": 0 (AFT-simple); "factors": bias = (u (Bw, Lq, r), v (Bw, Lk, r)), w = u v^T; "dense", "band",
    "grid": gathered from bias[0] (`_bias_gather`).
    """
    if kind == "none":
        return lambda b, t, h: 0.0
    if kind == "factors":

        def rows(b, t, h):  # u[b, t] against every sample's keys, then sample b's block: no (m, Lk, r) gather
            u, v = bias
            bw = b if u.shape[0] > 1 else torch.zeros_like(b)
            every = torch.matmul(u[bw, t], v.reshape(-1, v.shape[-1]).T)  # (m, Bw * Lk)
            return every.view(len(b), v.shape[0], v.shape[1])[torch.arange(len(b), device=b.device), bw]

        return rows

    def rows(b, t, h):
        index, inside = _bias_gather(kind, bias, params, length, b, t, h)
        values = bias[0][index]
        return (
            values
            if inside is None
            else torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device))
        )

    return rows


def _bias_rows_backward(kind, bias, params, length, b, t, h, grad_rows, grads):
    """Accumulate into `grads` (one per bias tensor) the gradient of `_bias_rows` given d rows (m, length)."""
    if kind == "none":
        return
    if kind == "factors":
        u, v = bias
        bw = b if u.shape[0] > 1 else torch.zeros_like(b)
        spread = grad_rows.new_zeros(len(b), v.shape[0], v.shape[1])  # each row in its sample's block
        spread[torch.arange(len(b), device=b.device), bw] = grad_rows
        spread = spread.view(len(b), -1)  # (m, Bw * Lk)
        grads[0].index_put_((bw, t), torch.matmul(spread, v.reshape(-1, v.shape[-1])), accumulate=True)
        grads[1].add_(torch.matmul(spread.T, u[bw, t]).view_as(v))
        return
    index, inside = _bias_gather(kind, bias, params, length, b, t, h)
    grads[0].index_put_(index, grad_rows if inside is None else grad_rows * inside, accumulate=True)


def _exact_values(spec, idx):
    """Exact outputs (n, D) at the entries idx (n, 4) = (b, t, h, c) (`_exact_entries` with the spec's bias)."""
    rows = _bias_rows(spec.kind, spec.bias, spec.params, spec.k.shape[1])
    return _exact_entries(
        spec.k, spec.v, spec.valid, idx, rows, spec.causal, spec.offset, spec.extra or None, _bias_width(spec)
    )


def _bias_width(spec):
    """Bias rows formed per entry: Bw for factors (u[t] against every sample's keys), else 1."""
    return spec.bias[1].shape[0] if spec.kind == "factors" else 1


def _exact_rows_per_chunk(k, v, width=1):
    """Entries per chunk of the exact fallback: (entries, keys, max(D, width)) blocks of at most _BLOCK_ELEMENTS."""
    return max(1, _BLOCK_ELEMENTS // max(1, (k.shape[1] + 1) * max(v.shape[-1], width)))


def _repair(avg, redo, spec):
    """Eager fallback: avg with the entries where `redo` (B, L, H, C) holds recomputed exactly (`nonzero`)."""
    if bool(redo.any()):
        idx = redo.nonzero()
        avg = avg.index_put(tuple(idx.unbind(1)), _exact_values(spec, idx).to(avg.dtype))
    return avg


# The fallback inside a compiled graph: a custom op, opaque to dynamo (its output has the input's static shape), whose
# eager implementation is `_repair` (data-dependent `nonzero`, chunks of entries). So `torch.compile` under default
# settings traces the op with no graph break, and the fallback costs nothing when no entry needs it. Its backward is a
# second custom op that recomputes the repaired entries' softmax and applies its explicit gradient (`_exact_grads`),
# a chunk at a time. The namespace follows the module name, so a remote-code copy of this folder registers its own
# ops beside an installed hf_efficient.
_OPS_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{_OPS_NAMESPACE}::aft_exact_fix", mutates_args=())
def _exact_fix(
    avg: torch.Tensor,
    redo: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    extra: list[torch.Tensor],
    bias: list[torch.Tensor],
    kind: str,
    param0: int,
    param1: int,
    causal: bool,
    offset: int,
) -> torch.Tensor:
    spec = _Exact(k, v, valid, causal, offset, tuple(extra), kind, tuple(bias), (param0, param1))
    return _repair(avg.clone(), redo, spec)


@_exact_fix.register_fake
def _(avg, redo, k, v, valid, extra, bias, kind, param0, param1, causal, offset):
    return torch.empty_like(avg)


@torch.library.custom_op(f"{_OPS_NAMESPACE}::aft_exact_fix_backward", mutates_args=())
def _exact_fix_backward(
    grad: torch.Tensor,
    redo: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    extra: list[torch.Tensor],
    bias: list[torch.Tensor],
    kind: str,
    param0: int,
    param1: int,
    causal: bool,
    offset: int,
) -> list[torch.Tensor]:
    """Gradients of the repaired entries' exact values with respect to [k, v, *extra, *bias] (`_exact_grads`)."""
    spec = _Exact(k, v, valid, causal, offset, tuple(extra), kind, tuple(bias), (param0, param1))
    grads = [torch.zeros_like(x) for x in [k, v, *extra, *bias]]
    if bool(redo.any()):
        idx = redo.nonzero()
        _exact_grads(spec, idx, grad[tuple(idx.unbind(1))], grads)
    return grads


@_exact_fix_backward.register_fake
def _(grad, redo, k, v, valid, extra, bias, kind, param0, param1, causal, offset):
    return [torch.empty_like(x) for x in [k, v, *extra, *bias]]


def _exact_fix_setup_context(ctx, inputs, output):
    avg, redo, k, v, valid, extra, bias, *meta = inputs
    ctx.save_for_backward(redo, k, v, valid, *extra, *bias)
    ctx.n_extra = len(extra)
    ctx.meta = meta  # kind, param0, param1, causal, offset


def _exact_fix_backward_rule(ctx, grad):
    redo, k, v, valid, *rest = ctx.saved_tensors
    extra, bias = rest[: ctx.n_extra], rest[ctx.n_extra :]
    grads = _exact_fix_backward(grad, redo, k, v, valid, extra, bias, *ctx.meta)
    n = 2 + ctx.n_extra
    grad_avg = grad.masked_fill(redo[..., None], 0)  # repaired entries do not depend on the fast path's avg
    return grad_avg, None, grads[0], grads[1], None, grads[2:n], grads[n:], None, None, None, None, None


_exact_fix.register_autograd(_exact_fix_backward_rule, setup_context=_exact_fix_setup_context)


def _finalize(num, den, has_key, spec, magnitude=None):
    """num / den where the certificate holds, exact recomputation elsewhere, 0 for queries with no key.

    num (B, L, H, C, D), den (B, L, H, C) relative to a reference >= the exact max; has_key (B, L); `spec` (`_Exact`)
    the inputs of the exact fallback. `magnitude` (sum of |terms| of den, for a den with cancelling terms) adds a
    cancellation check. Eager: a Python `if` and `nonzero` (`_repair`). `torch.compile`: the custom op
    `_exact_fix` (no graph break under default settings). `torch.export`: a `torch.cond` branch (exported programs
    keep plain aten ops; the data-dependent `nonzero` is allowed there).
    """
    ok = den >= _tau(den.dtype)
    if magnitude is not None:
        ok = ok & (den * 64 >= magnitude)  # at most 6 bits lost to cancellation
    avg = num / torch.where(ok, den, torch.ones_like(den))[..., None]
    avg = torch.where(ok[..., None], avg, torch.zeros_like(avg))
    redo = ~ok & has_key[:, :, None, None]
    if torch.compiler.is_exporting():
        # No Python branch on data in a graph: the fallback is a `torch.cond` branch, run only when needed.
        # The branches work on the flattened avg: with a symbolic length, cond cannot always match the strides of the
        # two branches' 5-D outputs, while a 1-D tensor has stride 1.
        def fix(flat, redo):
            idx = redo.nonzero()
            b, t, h, c = idx.unbind(1)
            dv = flat.shape[0] // redo.numel()
            entry = ((b * redo.shape[1] + t) * redo.shape[2] + h) * redo.shape[3] + c
            at = entry[:, None] * dv + torch.arange(dv, device=flat.device)
            return flat.index_put((at,), _exact_values(spec, idx).to(flat.dtype))

        flat = torch.cond(redo.any(), fix, lambda flat, redo: flat.clone(), (avg.reshape(-1), redo))
        return flat.reshape(avg.shape)
    if torch.compiler.is_compiling():
        return _exact_fix(
            avg, redo, spec.k, spec.v, spec.valid, list(spec.extra), list(spec.bias), spec.kind,
            *(tuple(spec.params) + (0, 0))[:2], spec.causal, spec.offset,
        )  # fmt: skip
    return _repair(avg, redo, spec)


def _exact_logits(k, v, valid, chunk, bias_rows, causal, query_offset, extra):
    """Logits (m, Lk [+ 1]) with padded / future keys at -inf, and values (m, Lk [+ 1], D), of the entries chunk (m, 4)
    (the pseudo-key `extra` first)."""
    b, t, h, c = chunk.unbind(1)
    logits = k[b, :, h, c] + bias_rows(b, t, h)  # (m, Lk)
    allowed = valid[b]
    if causal:
        allowed = allowed & (torch.arange(k.shape[1], device=k.device)[None, :] <= (t + query_offset)[:, None])
    logits = logits.masked_fill(~allowed, NEG_INF)
    values = v[b, :, h, c]  # (m, Lk, D)
    if extra is not None:
        logits = torch.cat([extra[0][b, h, c][:, None], logits], 1)
        values = torch.cat([extra[1][b, h, c][:, None], values], 1)
    return logits, values


def _softmax_rows(logits):
    """softmax over the last axis with the exact row max; a row with every logit -inf gives 0 (no NaN)."""
    weights = torch.exp(logits - _finite_or_zero(logits.amax(-1, keepdim=True)).detach())
    den = weights.sum(-1, keepdim=True)
    return weights / torch.where(den > 0, den, torch.ones_like(den))


def _exact_entries(k, v, valid, idx, bias_rows, causal, query_offset=0, extra=None, width=1):
    """Exact, dense recomputation of selected outputs (the fallback of the certified fast paths).

    For each row (b, t, h, c) of idx (n, 4): sum_t' softmax_t'(K[b,t',h,c] + bias[t,t']) V[b,t',h,c,:],
    with the max over this row of logits (the exact key-axis max). bias_rows(b, t, h) -> (m, Lk) gives the
    position bias of query rows t of samples b (0 where the variant has none); `extra` = (logit (B, H, C),
    value (B, H, C, D)) is a pseudo-key before every key (a folded prefix state). Entries are processed
    in chunks so that the (m, Lk, max(D, width)) blocks stay small. Returns (n, D).
    """
    rows = _exact_rows_per_chunk(k, v, width)
    out = []
    # Chunks of entries, not positions (one chunk in a graph, where the number of entries is data-dependent).
    for chunk in (idx,) if torch.compiler.is_compiling() else idx.split(rows):
        logits, values = _exact_logits(k, v, valid, chunk, bias_rows, causal, query_offset, extra)
        out.append(torch.einsum("ml,mld->md", _softmax_rows(logits), values))
    return torch.cat(out)


def _exact_grads(spec, idx, grad, grads):
    """Backward of `_exact_values(spec, idx)` given d outputs grad (n, D), accumulated into grads (zeros like
    [k, v, *extra, *bias]); same chunks of entries as the forward.

    With p = softmax(l) over a row's logits l_j = K_j + bias_j (and the pseudo-key) and out = sum_j p_j V_j:
    dV_j = p_j g, dl_j = p_j (V_j - out) . g, and dl_j flows to K_j, to the bias entry it was read from and to the
    pseudo-key's logit.
    """
    k, v = spec.k, spec.v
    rows_fn = _bias_rows(spec.kind, spec.bias, spec.params, k.shape[1])
    extra = spec.extra or None
    n_extra = len(spec.extra)
    keys = torch.arange(k.shape[1], device=k.device)[None, :]
    rows = _exact_rows_per_chunk(k, v, _bias_width(spec))
    for chunk, g in zip(idx.split(rows), grad.split(rows)):
        logits, values = _exact_logits(k, v, spec.valid, chunk, rows_fn, spec.causal, spec.offset, extra)
        p = _softmax_rows(logits)
        g = g.to(values.dtype)
        out = torch.einsum("ml,mld->md", p, values)
        d_values = p[..., None] * g[:, None, :]  # (m, Lk [+ 1], D)
        d_logits = p * torch.einsum("mld,md->ml", values - out[:, None], g)  # 0 on masked keys (p = 0)
        b, t, h, c = chunk.unbind(1)
        if extra is not None:
            grads[2].index_put_((b, h, c), d_logits[:, 0], accumulate=True)
            grads[3].index_put_((b, h, c), d_values[:, 0], accumulate=True)
            d_logits, d_values = d_logits[:, 1:], d_values[:, 1:]
        at = (b[:, None], keys, h[:, None], c[:, None])
        grads[0].index_put_(at, d_logits, accumulate=True)
        grads[1].index_put_(at, d_values, accumulate=True)
        _bias_rows_backward(spec.kind, spec.bias, spec.params, k.shape[1], b, t, h, d_logits, grads[2 + n_extra :])


def _has_key(valid, causal, query_offset=0, num_queries=None, prefix_nonempty=None):
    """(B, Lq) bool: whether each query sees at least one valid key."""
    if causal:
        seen = valid.long().cumsum(1) > 0
        if num_queries is not None:
            seen = seen[:, query_offset : query_offset + num_queries]
        if prefix_nonempty is not None:
            seen = seen | prefix_nonempty[:, None]
        return seen
    any_key = valid.any(1, keepdim=True)
    return any_key.expand(-1, num_queries if num_queries is not None else valid.shape[1])


# --------------------------------------------------------------------------------------------------------
# Segments: a causal op as a chain of checkpointed segments with the decoding state carried between them
# --------------------------------------------------------------------------------------------------------


def _segment_length(segment_size, causal, length, *tensors):
    """The segment length to use (0: run in one piece): only causal ops longer than twice it, with autograd on."""
    segment = _SEGMENT if segment_size is None else segment_size
    if not isinstance(segment, int) or segment < 0:
        raise ValueError(f"segment_size must be a non-negative int (0 = one piece); got {segment_size!r}.")
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    return segment if (causal and needs_grad and segment > 0 and length > 2 * segment) else 0


def _run_segments(call, sliced, length, segment, initial_state, return_state):
    """Run a causal op over consecutive segments of positions, carrying its `AFTState` from one to the next.

    `call(*segment_tensors, state)` -> (Y, state) is the op itself on one segment (with `initial_state` /
    `return_state`, exact by the continuation tests); `sliced` lists (tensor or None, position dim). Each
    segment runs under non-reentrant `torch.utils.checkpoint`: the forward keeps only the segment's inputs
    (views) and its carried state (O(d + s d)), and the backward recomputes one segment at a time, so the
    op's activations stay O(segment d) instead of O(L d) (about one extra forward of the op in time). The
    loop is over segments of thousands of positions, not over positions.
    """

    def run(start, stop, *state):
        parts = [None if x is None else x.narrow(dim, start, stop - start) for x, dim in sliced]
        y, new_state = call(*parts, AFTState(*state) if state else None)
        return (y, *new_state)

    outputs, state = [], initial_state
    for start in range(0, length, segment):
        stop = min(start + segment, length)
        y, *state = torch.utils.checkpoint.checkpoint(
            run, start, stop, *(state or ()), use_reentrant=False, preserve_rng_state=False
        )
        outputs.append(y)
        state = AFTState(*state)
    y = torch.cat(outputs, 1)
    return (y, state) if return_state else y


# --------------------------------------------------------------------------------------------------------
# Running sums and the chunked prefix scan
# --------------------------------------------------------------------------------------------------------


class _Sums(NamedTuple):
    """Internal running sums: ref (B, H, C), num (B, H, C, D), den (B, H, C); value = sums * exp(ref)."""

    ref: torch.Tensor
    num: torch.Tensor
    den: torch.Tensor


def _fold(sums, k, v, valid):
    """Add keys k (B, T, H, C), v (B, T, H, C, D) (valid (B, T)) to running sums, with an exact new max."""
    mask = valid[:, :, None, None]
    ref = torch.maximum(sums.ref, _masked_amax(k, mask, 1)).detach()
    old = torch.exp(torch.where(torch.isfinite(sums.ref), sums.ref - ref, NEG_INF))
    e = _shifted_exp(k, ref[:, None], mask)
    num = old[..., None] * sums.num + (e[..., None] * v).sum(1)
    den = old * sums.den + e.sum(1)
    return _Sums(ref, num, den)


def _sums_as_key(sums):
    """A folded prefix as one pseudo-key: logit ref + log(den), value num / den (for the exact fallback)."""
    nonempty = sums.den > 0
    den = torch.where(nonempty, sums.den, torch.ones_like(sums.den))
    logit = torch.where(nonempty, sums.ref + torch.log(den), NEG_INF)
    return logit, sums.num / den[..., None]


def _auto_chunk(length):
    """Chunk of the prefix scan: about sqrt(L), so the (L/C)^2 chunk-carry matrix stays O(L)."""
    if isinstance(length, torch.SymInt):  # a dynamic length in an exported graph: one chunk size for every length
        return 16
    return max(16, 1 << math.ceil(math.log2(max(1.0, math.sqrt(length)))))


def _prefix_scan(k, v, valid, chunk_size=None, init=None):
    """Inclusive prefix sums sum_{t' <= p} exp(K_t' - ref_p) V_t' (and without V) at every position p.

    Layout: positions are split in chunks of C. Chunk j uses the reference R_j = running max of K up to
    the end of chunk j (>= the exact prefix max of every position in the chunk): inside the chunk a
    cumsum of exp(K - R_j) V, plus the carry of earlier chunks, sum_{i<j} exp(R_i - R_j) T_i (T_i the
    chunk totals, every factor <= 1), computed as one masked (L/C x L/C) matrix product instead of a
    sequential loop. `init` (_Sums) is a prefix folded before position 0. O(L d) time and memory for
    C ~ sqrt(L). Returns (ref, num, den) with shapes (B, L, H, C), (B, L, H, C, D), (B, L, H, C).
    """
    batch, length, heads, channels = k.shape
    dv = v.shape[-1]
    chunk = chunk_size or _auto_chunk(length)
    n = -(-length // chunk)
    pad = n * chunk - length
    if pad:
        k = F.pad(k, (0, 0, 0, 0, 0, pad))
        v = F.pad(v, (0, 0, 0, 0, 0, 0, 0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    k = k.reshape(batch, n, chunk, heads, channels)
    v = v.reshape(batch, n, chunk, heads, channels, dv)
    mask = valid.reshape(batch, n, chunk, 1, 1)

    ref = _masked_amax(k, mask, 2).cummax(1).values  # (B, n, H, C), non-decreasing over chunks
    if init is not None:
        ref = torch.maximum(ref, init.ref[:, None])
    ref = ref.detach()
    e = _shifted_exp(k, ref[:, :, None], mask)  # (B, n, C, H, C), every value <= 1
    den = e.cumsum(2)
    num = (e[..., None] * v).cumsum(2)

    # carry_j = sum_{i<j} exp(R_i - R_j) T_i : a strictly lower-triangular (n x n) matrix per (b, h, c)
    j = torch.arange(n, device=k.device)
    earlier = (j[None, :] < j[:, None])[None, :, :, None, None] & torch.isfinite(ref)[:, None]  # (B, j, i, H, C)
    decay = torch.exp(torch.where(earlier, ref[:, None] - ref[:, :, None], NEG_INF))
    # (an elementwise product and sum: a batched matmul with (b, h, c) as batch is much slower on CPU)
    carry_den = (decay * den[:, None, :, -1]).sum(2)
    carry_num = (decay[..., None] * num[:, None, :, -1]).sum(2)
    if init is not None:
        scale = torch.exp(torch.where(torch.isfinite(init.ref)[:, None], init.ref[:, None] - ref, NEG_INF))
        carry_den = carry_den + scale * init.den[:, None]
        carry_num = carry_num + scale[..., None] * init.num[:, None]
    den = den + carry_den[:, :, None]
    num = num + carry_num[:, :, None]
    ref = ref[:, :, None].expand(-1, -1, chunk, -1, -1)
    flat = (batch, n * chunk, heads, channels)
    return (
        ref.reshape(flat)[:, :length],
        num.reshape(*flat, dv)[:, :length],
        den.reshape(flat)[:, :length],
    )


def _shift(part, shift, fill):
    """part[t - shift] (shift > 0) or part[t + |shift|] (shift < 0) along the positions, `fill` outside."""
    length = part[0].shape[1]
    out = []
    for x, f in zip(part, fill):
        n = min(abs(shift), length)
        f = f.expand(x.shape[0], n, *x.shape[2:])
        kept = x[:, : length - n] if shift > 0 else x[:, n:]
        out.append(torch.cat([f, kept] if shift > 0 else [kept, f], 1))
    return tuple(out)


def _empty_part(batch, heads, channels, dv, dtype, device):
    return (
        torch.full((batch, 1, heads, channels), NEG_INF, dtype=dtype, device=device),
        torch.zeros(batch, 1, heads, channels, dv, dtype=dtype, device=device),
        torch.zeros(batch, 1, heads, channels, dtype=dtype, device=device),
    )


# --------------------------------------------------------------------------------------------------------
# AFT-full
# --------------------------------------------------------------------------------------------------------


def _bias_tile(w, start, stop, kend):
    """Rows [start, stop) x keys [0, kend) of the bias: a slice of a dense w, or u[rows] @ v[keys]^T."""
    if isinstance(w, tuple):
        u, vv = w
        return torch.matmul(u[:, start:stop], vv[:, :kend].transpose(1, 2))  # (Bw, cq, kend)
    return w[:, start:stop, :kend]


def _full_tile_weights(w, start, stop, kend, causal, offset):
    """exp(w_tile - rowmax) for queries [start, stop) over keys [0, kend) ((Bw, cq, kend), <= 1, 0 masked).

    The causal mask only touches the diagonal square (keys offset + start .. offset + stop - 1); the
    row reference is the max over each query's visible keys.
    """
    tile = _bias_tile(w, start, stop, kend)
    if causal:
        tile = tile.clone() if not isinstance(w, tuple) else tile
        lo = offset + start
        diag = torch.ones(stop - start, kend - lo, dtype=torch.bool, device=tile.device).triu(1)
        tile[..., lo:] = tile[..., lo:].masked_fill(diag, NEG_INF)
    alpha = _finite_or_zero(tile.amax(-1, keepdim=True))
    return torch.exp(tile - alpha)


class _AFTFullSums(torch.autograd.Function):
    """num, den (B, Lq, d) of AFT-full with the L x L bias streamed in query blocks, forward and backward.

    num = E @ (e * V), den = E @ e with E = exp(w - rowmax) (per query block, recomputed in the backward,
    flash-attention style) and e = exp(K - colmax) (masked keys 0). Saved: K, V, the bias (its factors
    u, v or the dense w the caller holds anyway) and the (B, 1, d) column reference; nothing of size L x L.
    Backward, per block: d(e V | e) += E^T [dnum | dden], dE = [dnum | dden] [e V | e]^T, dw = dE * E, and
    for the factors du += dw v, dv += dw^T u. The references rowmax / colmax are constants (the result does
    not depend on them), exactly as in the detached autograd form. A bias shared by the batch (Bw = 1)
    multiplies the batch and channels folded into one (Lk, B * 2d) operand: one large GEMM per block.
    """

    @staticmethod
    def _operand(x, shared):
        """(B, L, X) -> (1, L, B * X) when the bias is shared by the batch, else unchanged."""
        return x.transpose(0, 1).reshape(1, x.shape[1], -1) if shared else x

    @staticmethod
    def _unoperand(x, batch, shared):
        return x.reshape(x.shape[1], batch, -1).transpose(0, 1) if shared else x

    @staticmethod
    def forward(ctx, k, v, valid, causal, offset, chunk, w_dense, u, vv):
        w = (u, vv) if w_dense is None else w_dense
        batch, lk, d = k.shape
        lq = (u if w_dense is None else w_dense).shape[1]
        shared = (u if w_dense is None else w_dense).shape[0] == 1
        beta = _masked_amax(k, valid[..., None], 1, keepdim=True)
        e = _shifted_exp(k, beta, valid[..., None])  # (B, Lk, d)
        ev = _AFTFullSums._operand(torch.cat([e * v, e], -1), shared)  # (Bw, Lk, X)
        out = ev.new_empty(ev.shape[0], lq, ev.shape[-1])
        for start in range(0, lq, chunk):  # query blocks: one (cq, Lk) tile alive at a time
            stop = min(start + chunk, lq)
            kend = offset + stop if causal else lk
            weights = _full_tile_weights(w, start, stop, kend, causal, offset)
            out[:, start:stop] = torch.matmul(weights, ev[:, :kend])
        ctx.save_for_backward(k, v, valid, w_dense, u, vv, beta)
        ctx.causal, ctx.offset, ctx.chunk, ctx.shared = causal, offset, chunk, shared
        out = _AFTFullSums._unoperand(out, batch, shared)
        return out[..., :d], out[..., d:]

    @staticmethod
    def backward(ctx, dnum, dden):
        k, v, valid, w_dense, u, vv, beta = ctx.saved_tensors
        causal, offset, chunk, shared = ctx.causal, ctx.offset, ctx.chunk, ctx.shared
        w = (u, vv) if w_dense is None else w_dense
        batch, lk, d = k.shape
        lq = dnum.shape[1]
        e = _shifted_exp(k, beta, valid[..., None])
        ev = _AFTFullSums._operand(torch.cat([e * v, e], -1), shared)
        grad = _AFTFullSums._operand(torch.cat([dnum, dden], -1), shared)  # (Bw, Lq, X)
        dev = torch.zeros_like(ev)
        need_w = any(ctx.needs_input_grad[6:9])
        dw = torch.zeros_like(w_dense) if (w_dense is not None and need_w) else None
        du = torch.zeros_like(u) if (u is not None and need_w) else None
        dvv = torch.zeros_like(vv) if (vv is not None and need_w) else None
        for start in range(0, lq, chunk):
            stop = min(start + chunk, lq)
            kend = offset + stop if causal else lk
            weights = _full_tile_weights(w, start, stop, kend, causal, offset)  # (Bw, cq, kend)
            g = grad[:, start:stop]  # (Bw, cq, X)
            dev[:, :kend] += torch.matmul(weights.transpose(1, 2), g)
            if not need_w:
                continue
            d_tile = torch.matmul(g, ev[:, :kend].transpose(1, 2)).mul_(weights)  # dE * E = dw on the tile
            if dw is not None:
                dw[:, start:stop, :kend] = d_tile
            else:
                du[:, start:stop] += torch.matmul(d_tile, vv[:, :kend])
                dvv[:, :kend] += torch.matmul(d_tile.transpose(1, 2), u[:, start:stop])
        dev = _AFTFullSums._unoperand(dev, batch, shared)
        dev_v, de = dev[..., :d], dev[..., d:]
        dv = dev_v * e
        dk = (dev_v * v + de) * e
        return dk, dv, None, None, None, None, dw, du, dvv


# Query rows per tile of AFT-full's graph form (`_full_sums_graph`), used for a symbolic (exported dynamic) length.
_GRAPH_TILE = 16


def _full_sums_graph(k, v, valid, causal, offset, w_dense, u, vv):
    """num, den (B, Lq, d) as `_AFTFullSums.forward`, for a symbolic length (`torch.export` with a dynamic length).

    The eager loop over query tiles follows the length, so a graph would be specialised to one length; here the loop
    over tiles of `_GRAPH_TILE` query rows is a `scan` (one higher-order op for any number of tiles). Each step forms
    one (Bw, tile, Lk) bias tile, exp(tile - rowmax) (causal keys after the query at -inf), times
    [exp(K - colmax) * V, exp(K - colmax)]: memory O(Lk d + tile Lk), linear like the eager op; causal tiles multiply
    every key (masked) rather than the keys up to their last query. Tiles of `_GRAPH_TILE` rows when Lq is known to be
    a multiple of it (a Dim such as `16 * Dim(...)`), else of one row (any Lq, no guard on its remainder: a longer
    scan of the same products).
    """
    from torch._higher_order_ops.scan import scan

    batch, lk, d = k.shape
    rows = u if w_dense is None else w_dense  # (Bw, Lq, r | Lk)
    bw, lq = rows.shape[0], rows.shape[1]
    tile = _GRAPH_TILE if statically_known_true(lq % _GRAPH_TILE == 0) else 1
    n = lq // tile
    beta = _masked_amax(k, valid[..., None], 1, keepdim=True)
    e = _shifted_exp(k, beta, valid[..., None])
    ev = torch.cat([e * v, e], -1)  # (B, Lk, 2d)
    tiles = rows.reshape(bw, n, tile, rows.shape[-1]).transpose(0, 1)  # (n, Bw, tile, r | Lk)
    starts = torch.arange(n, device=k.device) * tile
    keys = torch.arange(lk, device=k.device)
    in_tile = torch.arange(tile, device=k.device)

    def step(carry, xs):
        rows, start = xs
        bias = torch.matmul(rows, vv.transpose(1, 2)) if w_dense is None else rows  # (Bw, tile, Lk)
        if causal:
            bias = bias.masked_fill(keys[None, :] > (offset + start + in_tile)[:, None], NEG_INF)
        weights = torch.exp(bias - _finite_or_zero(bias.amax(-1, keepdim=True)))
        return carry.clone(), torch.matmul(weights, ev)  # (B, tile, 2d)

    _, out = scan(step, torch.zeros((), dtype=k.dtype, device=k.device), (tiles, starts))  # (n, B, tile, 2d)
    out = out.transpose(0, 1).reshape(batch, lq, 2 * d)
    return out[..., :d], out[..., d:]


def aft_full(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor | Sequence[torch.Tensor],
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    initial_state: AFTState | None = None,
    return_state: bool = False,
    query_chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTState]:
    r"""AFT-full: Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_tt') V_t' / sum_t' exp(K_t' + w_tt').

    Shapes: q (B, Lq, d); k, v (B, Lk, d); w the position bias shared by all channels: a dense (Lq, Lk)
    matrix (or (B, Lq, Lk) per sample, for left-padded batches), or its factors `(u, v)` with
    w = u v^T, u (Lq, d') and v (Lk, d') (or (B, Lq, d'), (B, Lk, d')): the factorised form never
    materialises the L x L matrix, forward or backward. Lq < Lk (causal only) means the queries are the last
    Lq positions: query i sits at position Lk - Lq + i and sees keys t' <= Lk - Lq + i. With
    `initial_state` (an `AFTState` whose window holds the P past keys) the P past keys are prepended and w
    must cover P + Lk keys. Returns Y (B, Lq, d), and the new state if `return_state`.

    Cost O(Lq Lk d) time in matmuls, O(Lk d) memory plus one (query block x Lk) bias tile: no (B, L, L, d)
    tensor, and no L x L one with the factors. Layout (`_AFTFullSums`, flash-attention style): for a
    block of queries, exp(w - rowmax(w)) (cq x Lk, shared by batch and channels) times
    [exp(K - colmax(K)) * V, exp(K - colmax(K))] (B, Lk, 2d) gives numerator and denominator in one matmul;
    the backward recomputes each tile instead of saving it. The reference rowmax + colmax is certified per
    output and repaired exactly where needed (see the module docstring). Causal blocks only multiply by the
    keys up to their last query. In `torch.export` with a dynamic length (a symbolic Lq), the loop over query blocks
    is a `scan` over blocks of queries (`_full_sums_graph`: 16 when Lq is a known multiple of 16, else 1).
    """
    _check_qkv(q, k, v)
    if initial_state is not None:
        if not causal:
            raise ValueError("initial_state is only meaningful for causal=True.")
        past = initial_state.keys.shape[1]
        k = torch.cat([initial_state.keys.to(k.dtype), k], 1)
        v = torch.cat([initial_state.values.to(v.dtype), v], 1)
        pad_mask = torch.ones(q.shape[0], k.shape[1] - past, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            pad_mask = key_padding_mask.to(q.device) != 0
        key_padding_mask = torch.cat([initial_state.valid, pad_mask], 1)
    batch, lq, d = q.shape
    lk = k.shape[1]
    factored = isinstance(w, (tuple, list))
    if factored:
        if len(w) != 2:
            raise ValueError(f"w as factors must be a pair (u, v); got {len(w)} tensors.")
        wu, wv = w
        if (
            wu.dim() not in (2, 3)
            or wv.dim() != wu.dim()
            or wu.shape[-2] != lq
            or wv.shape[-2] != lk
            or wu.shape[-1] != wv.shape[-1]
            or (wu.dim() == 3 and (wu.shape[0] != batch or wv.shape[0] != batch))
        ):
            raise ValueError(
                f"w factors have shapes {tuple(wu.shape)}, {tuple(wv.shape)}; expected ([batch,] {lq}, r) and "
                f"([batch,] {lk}, r)."
            )
    elif tuple(w.shape[-2:]) != (lq, lk) or w.dim() not in (2, 3) or (w.dim() == 3 and w.shape[0] != batch):
        raise ValueError(f"w has shape {tuple(w.shape)}; expected ([batch,] queries, keys) = {(lq, lk)}.")
    if lk < lq or (lk > lq and not causal):
        raise ValueError(f"{lk} keys for {lq} queries: more keys than queries needs causal=True (a cached prefix).")
    dtype = _compute_dtype(q, k, v, *(w if factored else (w,)))
    kf, vf = k.to(dtype), v.to(dtype)
    if factored:
        wu, wv = (x.to(dtype) if x.dim() == 3 else x.to(dtype)[None] for x in w)
        w_dense = None
    else:
        wu = wv = None
        w_dense = w.to(dtype) if w.dim() == 3 else w.to(dtype)[None]
    valid = _key_valid(key_padding_mask, batch, lk, q.device)
    offset = lk - lq
    if torch.compiler.is_exporting() and isinstance(lq, torch.SymInt):  # a dynamic length: no loop over the tiles
        num, den = _full_sums_graph(kf, vf, valid, causal, offset, w_dense, wu, wv)
    else:
        chunk = query_chunk_size or max(64, min(lq, _TILE_ELEMENTS // max(lk, 1)))
        num, den = _AFTFullSums.apply(kf, vf, valid, causal, offset, chunk, w_dense, wu, wv)
    num = num.reshape(batch, lq, 1, d, 1)
    den = den.reshape(batch, lq, 1, d)

    k4, v5 = kf[:, :, None, :], vf[:, :, None, :, None]
    bias = ("factors", (wu, wv)) if factored else ("dense", (w_dense,))
    spec = _Exact(k4, v5, valid, causal, offset, (), *bias)
    avg = _finalize(num, den, _has_key(valid, causal, offset, lq), spec)
    y = (torch.sigmoid(q.to(dtype)) * avg.reshape(batch, lq, d)).to(q.dtype)
    if not return_state:
        return y
    if not causal:
        raise ValueError("return_state is only meaningful for causal=True.")
    empty = aft_empty_state(batch, d, d, 0, dtype=k.dtype, device=q.device)
    return y, empty._replace(keys=k, values=v, valid=valid)


def aft_full_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_row: torch.Tensor,
    state: AFTState,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AFTState]:
    """One causal AFT-full decoding step (position t = number of past keys P).

    q, k, v (B, d) for the new token; w_row (P + 1,) = w[t, :t + 1] (or (B, P + 1) per sample); `state` from `aft_empty_state(B, d, d)`
    or a previous step (its window holds every past key). valid (B,) marks a padding token (0).
    Exact: logits K_t' + w_tt' (B, P + 1, d) with the max over the key axis; O(P d) per token.
    Returns (Y (B, d), new state).
    """
    batch, d = q.shape
    new_valid = torch.ones(batch, dtype=torch.bool, device=q.device) if valid is None else valid.to(q.device) != 0
    keys = torch.cat([state.keys, k[:, None].to(state.keys.dtype)], 1)
    values = torch.cat([state.values, v[:, None].to(state.values.dtype)], 1)
    mask = torch.cat([state.valid, new_valid[:, None]], 1)
    if w_row.shape[-1] != keys.shape[1] or w_row.dim() not in (1, 2):
        raise ValueError(
            f"w_row has shape {tuple(w_row.shape)}; expected ({keys.shape[1]},) for position {keys.shape[1] - 1}."
        )
    dtype = _compute_dtype(q, k, v, w_row)
    logits = keys.to(dtype) + w_row.to(dtype).reshape(-1, keys.shape[1], 1)
    m = _masked_amax(logits, mask[..., None], 1, keepdim=True).detach()
    e = _shifted_exp(logits, m, mask[..., None])
    den = e.sum(1)
    avg = (e * values.to(dtype)).sum(1) / torch.where(den > 0, den, torch.ones_like(den))
    y = (torch.sigmoid(q.to(dtype)) * avg).to(q.dtype)
    return y, state._replace(keys=keys, values=values, valid=mask)


# --------------------------------------------------------------------------------------------------------
# AFT-simple
# --------------------------------------------------------------------------------------------------------


def _state_to_sums(state, heads, channels, dv, dtype):
    batch = state.max.shape[0]
    return _Sums(
        state.max.to(dtype).reshape(batch, heads, channels),
        state.num.to(dtype).reshape(batch, heads, channels, dv),
        state.den.to(dtype).reshape(batch, heads, channels),
    )


def _sums_to_state(sums, keys, values, valid):
    batch = sums.ref.shape[0]
    return AFTState(
        sums.ref.reshape(batch, -1), sums.num.reshape(batch, -1), sums.den.reshape(batch, -1), keys, values, valid
    )


def aft_simple(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    initial_state: AFTState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTState]:
    r"""AFT-simple: Y_t = sigmoid(Q_t) * sum_t' softmax_t'(K)_t' V_t' (w = 0; t' <= t when causal).

    Shapes: q, k, v (B, L, d); returns Y (B, L, d) (and the final `AFTState` if `return_state`).
    Bidirectional: one global softmax over the key axis per (batch, channel), O(L d); the max term gives
    den >= 1, so no certificate is needed. Causal: running (prefix) sums with a per-chunk running-max
    rescale (`_prefix_scan`), O(L d), certified and repaired exactly where the chunk's max sits far
    above a query's own prefix max. `initial_state` (causal) continues from earlier tokens.
    Training memory: a causal call longer than twice `segment_size` (default `_SEGMENT`; 0 = never) with autograd
    on runs as checkpointed segments (`_run_segments`), the same maths.
    """
    _check_qkv(q, k, v)
    batch, length, d = q.shape
    segment = _segment_length(segment_size, causal, length, q, k, v)
    if segment:

        def call(qs, ks, vs, mask, state):
            return aft_simple(
                qs, ks, vs, causal=True, key_padding_mask=mask, initial_state=state, return_state=True,
                chunk_size=chunk_size, segment_size=0,
            )  # fmt: skip

        sliced = [(q, 1), (k, 1), (v, 1), (key_padding_mask, 1)]
        return _run_segments(call, sliced, length, segment, initial_state, return_state)
    dtype = _compute_dtype(q, k, v)
    valid = _key_valid(key_padding_mask, batch, length, q.device)
    kf, vf = k.to(dtype)[:, :, None, :], v.to(dtype)[:, :, None, :, None]  # H = 1, C = d, D = 1
    gate = torch.sigmoid(q.to(dtype))
    if not causal:
        if initial_state is not None or return_state:
            raise ValueError("initial_state / return_state need causal=True.")
        mask = valid[:, :, None, None]
        e = _shifted_exp(kf, _masked_amax(kf, mask, 1, keepdim=True).detach(), mask)
        num, den = (e[..., None] * vf).sum(1), e.sum(1)
        avg = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
        return (gate * avg.reshape(batch, 1, d)).to(q.dtype)
    init = None if initial_state is None else _state_to_sums(initial_state, 1, d, 1, dtype)
    _, num, den = _prefix_scan(kf, vf, valid, chunk_size, init)
    extra = () if init is None else _sums_as_key(init)
    avg = _finalize(
        num,
        den,
        _has_key(valid, True, prefix_nonempty=None if init is None else init.den[:, 0, :].gt(0).any(-1)),
        _Exact(kf, vf, valid, True, 0, extra),
    )
    y = (gate * avg.reshape(batch, length, d)).to(q.dtype)
    if not return_state:
        return y
    if init is None:
        init = _state_to_sums(aft_empty_state(batch, d, d, dtype=dtype, device=q.device), 1, d, 1, dtype)
    sums = _fold(init, kf, vf, valid)
    empty = torch.zeros(batch, 0, d, dtype=dtype, device=q.device)
    return y, _sums_to_state(sums, empty, empty, torch.zeros(batch, 0, dtype=torch.bool, device=q.device))


def aft_simple_step(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: AFTState, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, AFTState]:
    """One causal AFT-simple decoding step: fold (K_t, V_t) into the running sums, read them out.

    q, k, v (B, d); state from `aft_empty_state(B, d, d)` or a previous step; valid (B,) marks padding.
    m' = max(m, K_t); num' = num e^{m - m'} + e^{K_t - m'} V_t; den' likewise; Y_t = sigmoid(Q_t) num'/den'.
    O(d) time and memory, independent of the prefix length. Returns (Y (B, d), new state).
    """
    batch, d = q.shape
    dtype = _compute_dtype(q, k, v)
    new_valid = torch.ones(batch, 1, dtype=torch.bool, device=q.device) if valid is None else (valid != 0)[:, None]
    sums = _fold(
        _state_to_sums(state, 1, d, 1, dtype),
        k.to(dtype)[:, None, None, :],
        v.to(dtype)[:, None, None, :, None],
        new_valid,
    )
    den = sums.den.reshape(batch, d)
    avg = sums.num.reshape(batch, d) / torch.where(den > 0, den, torch.ones_like(den))
    y = (torch.sigmoid(q.to(dtype)) * avg).to(q.dtype)
    return y, _sums_to_state(sums, state.keys, state.values, state.valid)


# --------------------------------------------------------------------------------------------------------
# AFT-local and 1-D AFT-conv: a banded bias (window part) plus global out-of-window sums
# --------------------------------------------------------------------------------------------------------


def _window_part(k, v, valid, band, window, causal):
    """Sums over the window t' - t in offsets(window, causal) of exp(K_t' + band[t, j]) [V_t'].

    band (Bb, H, Lb, n_w): Bb = 1 (shared) or B (per sample, e.g. left-padded batches), Lb = L (position
    dependent, AFT-local) or 1 (translation invariant, AFT-conv).
    Blocked layout: positions in blocks of bs >= s - 1, so the window of a query in block i lies in key
    blocks i-1, i (and i+1 bidirectional). For each neighbour delta, exp(bias - rowmax) (bs x bs, 0 outside
    the window) times [exp(K - blockmax) * V, exp(K - blockmax)] of key block i + delta is one batched
    matmul over the blocks; the 2-3 partial sums are merged with exp(blockmax - max over the neighbours).
    Tensors are laid out (block, position, batch, head, channel[, value]) so the matmuls need no copies.
    O(L s d) time, O(L s) + O(L d) memory. Returns (ref, num, den) relative to ref = rowmax + neighbour max.
    """
    batch, length, heads, channels = k.shape
    dv = v.shape[-1]
    n_w = band.shape[-1]
    bs = max(window, 8)
    n = -(-length // bs)
    pad = n * bs - length
    deltas = (-1, 0) if causal else (-1, 0, 1)
    kb = F.pad(k, (0, 0, 0, 0, 0, pad)).view(batch, n, bs, heads, channels).permute(1, 2, 0, 3, 4).contiguous()
    vb = F.pad(v, (0, 0, 0, 0, 0, 0, 0, pad)).view(batch, n, bs, heads, channels, dv).permute(1, 2, 0, 3, 4, 5)
    mask = F.pad(valid, (0, pad), value=False).view(batch, n, bs).permute(1, 2, 0)[..., None, None]
    beta = _masked_amax(kb, mask, 1).detach()  # (n, B, H, C): key-block reference
    e = _shifted_exp(kb, beta[:, None], mask)  # (n, bs, B, H, C), <= 1
    ev = torch.cat([e[..., None] * vb, e[..., None]], -1)  # (n, bs, B, H, C, D + 1): numerator | denominator

    # bias of query qi of block i against key kk of the strip of blocks i-1.. : offset o = kk - bs - qi,
    # band column j = o + s - 1; 0 (exp -> -inf) outside the window and for keys outside the sequence
    strip = len(deltas) * bs
    qi = torch.arange(bs, device=k.device)
    kk = torch.arange(strip, device=k.device)
    col = kk[None, :] - bs - qi[:, None] + window - 1  # (bs, strip)
    in_window = (col >= 0) & (col < n_w)
    bb, lb = band.shape[0], band.shape[2]
    if lb == 1:
        bias = band[:, :, :, None, :].expand(bb, heads, 1, bs, n_w)
        in_range = in_window
    else:
        bias = F.pad(band, (0, 0, 0, pad)).reshape(bb, heads, n, bs, n_w)
        key_pos = (torch.arange(n, device=k.device)[:, None] - 1) * bs + kk[None, :]  # (n, strip)
        in_range = in_window & ((key_pos >= 0) & (key_pos < length))[:, None, :]  # (n, bs, strip)
    bias = bias.gather(-1, col.clamp(0, n_w - 1).expand(bb, heads, bias.shape[2], bs, strip))
    bias = bias.masked_fill(~in_range, NEG_INF)  # nothing outside may exceed the row reference
    alpha = _finite_or_zero(bias.amax(-1)).detach()  # (Bb, H, n|1, bs) row reference
    e1 = torch.exp(bias - alpha[..., None])  # (Bb, H, n|1, bs, strip)

    # neighbour references: top_i = max over the key blocks i + delta (-inf outside the sequence)
    shifted = [F.pad(beta, (0, 0, 0, 0, 0, 0, max(-d, 0), max(d, 0)), value=NEG_INF)[max(d, 0) :][:n] for d in deltas]
    top = torch.stack(shifted).amax(0)  # (n, B, H, C)
    out = torch.zeros(n, bs, batch, heads, channels, dv + 1, dtype=ev.dtype, device=ev.device)
    for index, delta in enumerate(deltas):  # the 2-3 neighbour blocks, not positions
        lo, hi = max(0, -delta), min(n, n - delta)  # query blocks whose block i + delta exists
        if lo >= hi:
            continue
        e1_d = e1[..., index * bs : (index + 1) * bs]
        e1_d = e1_d[:, :, lo:hi] if e1_d.shape[2] > 1 else e1_d
        keys = ev[lo + delta : hi + delta]  # (m, bs, B, H, C, D + 1), contiguous
        if bb == 1 and heads == 1:  # shared bias, one head (AFT-local): a plain batched matmul
            part = torch.matmul(e1_d[0, 0], keys.view(hi - lo, bs, -1)).view_as(keys)
        else:
            part = torch.einsum("zhmqk,mkzhcd->mqzhcd", e1_d, keys)
        ref_d = shifted[index][lo:hi]
        scale = torch.exp(torch.where(torch.isfinite(ref_d), ref_d - top[lo:hi], NEG_INF))  # <= 1
        out[lo:hi] += scale[:, None, ..., None] * part
    ref = alpha.permute(2, 3, 0, 1)[..., None] + top[:, None]  # (n, bs, B, H, C)
    ref = ref.permute(2, 0, 1, 3, 4).reshape(batch, n * bs, heads, channels)[:, :length]
    out = out.permute(2, 0, 1, 3, 4, 5).reshape(batch, n * bs, heads, channels, dv + 1)[:, :length]
    return ref, out[..., :dv], out[..., dv]


def _banded(k, v, valid, band, window, causal, chunk_size, init):
    """Window part + out-of-window prefix (and suffix) sums, merged, certified. Returns avg (B, L, H, C, D)."""
    batch, length, heads, channels = k.shape
    dv = v.shape[-1]
    empty = _empty_part(batch, heads, channels, dv, k.dtype, k.device)
    parts = [_window_part(k, v, valid, band, window, causal)]
    # keys t' <= t - s: the prefix at t - s (the folded state `init` before position 0)
    fill = empty if init is None else (init.ref[:, None], init.num[:, None], init.den[:, None])
    parts.append(_shift(_prefix_scan(k, v, valid, chunk_size, init), window, fill))
    if not causal:
        # keys t' >= t + s: the suffix at t + s, a prefix scan of the reversed sequence
        rev = _prefix_scan(k.flip(1), v.flip(1), valid.flip(1), chunk_size)
        parts.append(_shift(tuple(x.flip(1) for x in rev), -window, empty))
    _, num, den = _merge(parts)
    extra = () if init is None else _sums_as_key(init)
    prefix_nonempty = None if init is None else (init.den > 0).flatten(1).any(-1)
    return _finalize(
        num,
        den,
        _has_key(valid, causal, prefix_nonempty=prefix_nonempty),
        _Exact(k, v, valid, causal, 0, extra, "band", (band,), (window,)),
    )


def _windowed(q, k4, v5, valid, band, window, n_w, causal, initial_state, return_state, chunk_size):
    """Shared driver of aft_local / aft_conv1d: optional state (window buffer + running sums), gating."""
    batch, length, d = q.shape
    heads, channels, dv = k4.shape[2], k4.shape[3], v5.shape[-1]
    dtype = k4.dtype
    if (initial_state is not None or return_state) and not causal:
        raise ValueError("initial_state / return_state need causal=True.")
    if initial_state is None and not return_state:
        avg = _banded(k4, v5, valid, band, window, causal, chunk_size, None)
        return (torch.sigmoid(q.to(dtype)) * avg.reshape(batch, length, d)).to(q.dtype)
    state = initial_state
    if state is None:
        state = aft_empty_state(batch, heads * channels, d, n_w - 1, dtype=dtype, device=q.device)
    if state.keys.shape[1] != n_w - 1:
        raise ValueError(f"initial_state holds {state.keys.shape[1]} window keys; this op needs {n_w - 1}.")
    # Run on [window buffer, new tokens]; the buffer's own outputs are discarded.
    nb = n_w - 1
    ext_k = torch.cat([state.keys.to(dtype).reshape(batch, nb, heads, channels), k4], 1)
    ext_v = torch.cat([state.values.to(dtype).reshape(batch, nb, heads, channels, dv), v5], 1)
    ext_valid = torch.cat([state.valid, valid], 1)
    if band.shape[2] > 1:
        band = F.pad(band, (0, 0, nb, 0))
    init = _state_to_sums(state, heads, channels, dv, dtype)
    avg = _banded(ext_k, ext_v, ext_valid, band, window, causal, chunk_size, init)[:, nb:]
    y = (torch.sigmoid(q.to(dtype)) * avg.reshape(batch, length, d)).to(q.dtype)
    if not return_state:
        return y
    # keys that leave the window: ext positions <= len(ext) - n_w; the last n_w - 1 stay in the buffer
    n_fold = ext_k.shape[1] - nb
    sums = _fold(init, ext_k[:, :n_fold], ext_v[:, :n_fold], ext_valid[:, :n_fold])
    new_state = _sums_to_state(
        sums,
        ext_k[:, n_fold:].reshape(batch, nb, heads * channels),
        ext_v[:, n_fold:].reshape(batch, nb, d),
        ext_valid[:, n_fold:],
    )
    return y, new_state


def aft_local(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_band: torch.Tensor,
    window: int,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    initial_state: AFTState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTState]:
    r"""AFT-local(s): AFT-full with w_tt' = 0 (not -inf) outside |t - t'| < s, so global context stays.

        Y_t = sigmoid(Q_t) * [sum_{t' out} e^{K_t'} V_t' + sum_{t' in} e^{K_t' + w_tt'} V_t']
                           / [sum_{t' out} e^{K_t'}     + sum_{t' in} e^{K_t' + w_tt'}]

    Shapes: q, k, v (B, L, d); w_band (L, n_w) or per sample (B, L, n_w), band[t, j] = w[t, t + j - (s - 1)] (see
    `local_window_offsets`: n_w = s causal, 2s - 1 bidirectional; columns whose key falls outside the
    sequence are ignored). Returns Y (B, L, d) (and the `AFTState` with the last s - 1 keys if
    `return_state`; `initial_state` continues a causal sequence, w_band then covers the new tokens only).

    Cost: the window part is a blocked band matmul, O(L s d) time and O(L s + L d) memory
    (`_window_part`); the out-of-window part is a prefix sum at t - s (and a suffix sum at t + s), O(L d)
    (`_prefix_scan`). Both are sums of positive terms, merged by their references and certified.
    Training memory: causal calls longer than twice `segment_size` run as checkpointed segments (see `aft_simple`).
    """
    _check_qkv(q, k, v)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int; got {window!r} (AFT-simple is window 0: use aft_simple).")
    batch, length, d = q.shape
    n_w = window if causal else 2 * window - 1
    if (
        tuple(w_band.shape[-2:]) != (length, n_w)
        or w_band.dim() not in (2, 3)
        or (w_band.dim() == 3 and w_band.shape[0] != batch)
    ):
        raise ValueError(f"w_band has shape {tuple(w_band.shape)}; expected ([batch,] length, n_w) = {(length, n_w)}.")
    segment = _segment_length(segment_size, causal, length, q, k, v, w_band)
    if segment:

        def call(qs, ks, vs, band, mask, state):
            return aft_local(
                qs, ks, vs, band, window, causal=True, key_padding_mask=mask, initial_state=state,
                return_state=True, chunk_size=chunk_size, segment_size=0,
            )  # fmt: skip

        sliced = [(q, 1), (k, 1), (v, 1), (w_band, w_band.dim() - 2), (key_padding_mask, 1)]
        return _run_segments(call, sliced, length, segment, initial_state, return_state)
    dtype = _compute_dtype(q, k, v, w_band)
    valid = _key_valid(key_padding_mask, batch, length, q.device)
    k4, v5 = k.to(dtype)[:, :, None, :], v.to(dtype)[:, :, None, :, None]
    return _windowed(
        q,
        k4,
        v5,
        valid,
        w_band.to(dtype).reshape(-1, 1, length, n_w),
        window,
        n_w,
        causal,
        initial_state,
        return_state,
        chunk_size,
    )


def aft_conv1d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    initial_state: AFTState | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    segment_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AFTState]:
    r"""1-D AFT-conv(h, k): per head a depthwise conv with kernel e^w - 1 added to the global sums,

        Y = sigmoid(Q) * (conv(e^K V, e^w - 1) + sum e^K V) / (conv(e^K, e^w - 1) + sum e^K)

    i.e. AFT-local with one key channel per head and a translation-invariant bias w_tt' = kernel[h, j].
    Shapes: q, v (B, L, d) (heads major: d = h * d/h); k (B, L, h); kernel (h, ks) (after the model's
    reparameterisation). Bidirectional: ks odd, column j is offset j - (ks - 1) / 2; causal: column j is
    offset j - (ks - 1) (the last column is the current token). Returns Y (B, L, d) (and the state).

    Computed as the positive decomposition window + outside (`aft_local`'s blocked band matmul with the
    (h, bs, strip) kernel block shared by all blocks), never as e^w - 1: a kernel far below 0 would cancel
    the global sum catastrophically. Same result, O(L ks d) time, O(L d) memory. Training memory: causal
    calls longer than twice `segment_size` run as checkpointed segments (see `aft_simple`).
    """
    _check_qkv(q, k, v)
    batch, length, d = q.shape
    heads = k.shape[-1]
    if kernel.dim() != 2 or kernel.shape[0] != heads:
        raise ValueError(
            f"kernel has shape {tuple(kernel.shape)}; expected (heads, kernel_size) with heads = {heads}."
        )
    if d % heads:
        raise ValueError(f"{d} value channels do not split into {heads} heads.")
    ks = kernel.shape[1]
    if not causal and ks % 2 == 0:
        raise ValueError(f"kernel_size {ks} must be odd for the bidirectional (centred) AFT-conv.")
    window = ks if causal else (ks + 1) // 2
    segment = _segment_length(segment_size, causal, length, q, k, v, kernel)
    if segment:

        def call(qs, ks_, vs, mask, state):
            return aft_conv1d(
                qs, ks_, vs, kernel, causal=True, key_padding_mask=mask, initial_state=state, return_state=True,
                chunk_size=chunk_size, segment_size=0,
            )  # fmt: skip

        sliced = [(q, 1), (k, 1), (v, 1), (key_padding_mask, 1)]
        return _run_segments(call, sliced, length, segment, initial_state, return_state)
    dtype = _compute_dtype(q, k, v, kernel)
    valid = _key_valid(key_padding_mask, batch, length, q.device)
    k4 = k.to(dtype)[..., None]  # (B, L, h, 1)
    v5 = v.to(dtype).reshape(batch, length, heads, 1, d // heads)
    band = kernel.to(dtype)[None, :, None, :]  # (1, h, 1, ks): shared, translation invariant
    return _windowed(q, k4, v5, valid, band, window, ks, causal, initial_state, return_state, chunk_size)


def _window_step(q, k4, v5, band_row, state, valid, heads, channels):
    """Shared decoding step of local/conv: window logits + running sums, then slide the window by one."""
    batch, d = q.shape
    dv = v5.shape[-1]
    dtype = k4.dtype
    new_valid = torch.ones(batch, 1, dtype=torch.bool, device=q.device) if valid is None else (valid != 0)[:, None]
    nb = state.keys.shape[1]
    if band_row.shape[-1] != nb + 1:
        raise ValueError(f"bias row has {band_row.shape[-1]} columns; the state holds a window of {nb + 1}.")
    win_k = torch.cat([state.keys.to(dtype).reshape(batch, nb, heads, channels), k4[:, None]], 1)  # (B, n_w, H, C)
    win_v = torch.cat([state.values.to(dtype).reshape(batch, nb, heads, channels, dv), v5[:, None]], 1)
    win_valid = torch.cat([state.valid, new_valid], 1)
    sums = _state_to_sums(state, heads, channels, dv, dtype)
    logits = win_k + band_row.to(dtype).transpose(1, 2)[..., None]  # band_row (Bb, H, n_w) -> (B, n_w, H, C)
    mask = win_valid[:, :, None, None]
    ref = torch.maximum(sums.ref, _masked_amax(logits, mask, 1)).detach()  # exact max: window + folded keys
    e = _shifted_exp(logits, ref[:, None], mask)
    old = torch.exp(torch.where(torch.isfinite(sums.ref), sums.ref - ref, NEG_INF))
    num = old[..., None] * sums.num + (e[..., None] * win_v).sum(1)
    den = old * sums.den + e.sum(1)
    avg = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    y = (torch.sigmoid(q.to(dtype)) * avg.reshape(batch, d)).to(q.dtype)
    # slide: the oldest window key leaves the window into the running sums (w = 0 from now on)
    sums = _fold(sums, win_k[:, :1], win_v[:, :1], win_valid[:, :1])
    new_state = _sums_to_state(
        sums, win_k[:, 1:].reshape(batch, nb, heads * channels), win_v[:, 1:].reshape(batch, nb, d), win_valid[:, 1:]
    )
    return y, new_state


def aft_local_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w_band_row: torch.Tensor,
    state: AFTState,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AFTState]:
    """One causal AFT-local decoding step at position t.

    q, k, v (B, d); w_band_row (s,) = w[t, t - s + 1 .. t] (or (B, s) per sample); state holds the last s - 1 keys/values and the
    running sums of the keys before them (`aft_empty_state(B, d, d, s - 1)` at the start). Exact key-axis
    max over the s window logits and the running max. O(s d) per token, independent of the prefix length.
    Returns (Y (B, d), new state).
    """
    batch, d = q.shape
    dtype = _compute_dtype(q, k, v, w_band_row)
    return _window_step(
        q,
        k.to(dtype)[:, None, :],
        v.to(dtype)[:, None, :, None],
        w_band_row.reshape(-1, 1, w_band_row.shape[-1]),
        state,
        valid,
        1,
        d,
    )


def aft_conv1d_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor,
    state: AFTState,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, AFTState]:
    """One causal 1-D AFT-conv decoding step: q, v (B, d), k (B, h), kernel (h, ks) (last column = current
    token); state holds the last ks - 1 keys/values (`aft_empty_state(B, h, d, ks - 1)` at the start).
    O(ks d) per token. Returns (Y (B, d), new state)."""
    batch, d = q.shape
    heads = k.shape[-1]
    dtype = _compute_dtype(q, k, v, kernel)
    return _window_step(
        q,
        k.to(dtype)[..., None],
        v.to(dtype).reshape(batch, heads, 1, d // heads),
        kernel[None],
        state,
        valid,
        heads,
        1,
    )


# --------------------------------------------------------------------------------------------------------
# 2-D AFT-conv (image patch grids, bidirectional)
# --------------------------------------------------------------------------------------------------------


def aft_conv2d(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel: torch.Tensor,
    grid_size: tuple[int, int],
    *,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""2-D AFT-conv(h, k) over a (H, W) patch grid (bidirectional), as in the paper:

        Y = sigmoid(Q) * (conv2d(e^K V, e^w - 1) + sum e^K V) / (conv2d(e^K, e^w - 1) + sum e^K)

    Shapes: q, v (B, H*W, d) (row-major grid, heads major channels), k (B, H*W, h), kernel (h, ks, ks) with
    ks odd; kernel[h, ks//2 + dy, ks//2 + dx] biases the key at offset (dy, dx) from the query. Returns
    Y (B, H*W, d).

    Layout: depthwise F.conv2d (groups = h * d/h) on exp(K - max K) * V and exp(K - max K), kernel
    exp(w - W) - exp(-W) with W = max(max w, 0) per head (= e^{-W} (e^w - 1), entries in (-1, 1]), plus the
    global sums scaled by e^{-W}. The kernel can be negative, so beside den >= tau the certificate also
    bounds cancellation (den >= |terms| / 64); failing entries are recomputed exactly.
    """
    _check_qkv(q, k, v)
    batch, length, d = q.shape
    heads = k.shape[-1]
    gh, gw = grid_size
    if gh * gw != length:
        raise ValueError(f"grid_size {tuple(grid_size)} has {gh * gw} cells; the sequence has {length}.")
    if kernel.dim() != 3 or kernel.shape[0] != heads or kernel.shape[1] != kernel.shape[2] or kernel.shape[1] % 2 == 0:
        raise ValueError(f"kernel has shape {tuple(kernel.shape)}; expected (heads={heads}, ks, ks) with ks odd.")
    if d % heads:
        raise ValueError(f"{d} value channels do not split into {heads} heads.")
    ks, dv = kernel.shape[1], d // heads
    dtype = _compute_dtype(q, k, v, kernel)
    valid = _key_valid(key_padding_mask, batch, length, q.device)
    kf = k.to(dtype)
    vf = v.to(dtype).reshape(batch, length, heads, dv)
    kern = kernel.to(dtype)
    mask = valid[..., None]
    e = _shifted_exp(kf, _masked_amax(kf, mask, 1, keepdim=True).detach(), mask)  # (B, L, h), <= 1
    ev = e[..., None] * vf  # (B, L, h, dv)
    top = kern.detach().flatten(1).amax(-1).clamp_min(0)  # W (h,)
    kappa = torch.exp(kern - top[:, None, None]) - torch.exp(-top)[:, None, None]  # e^{-W}(e^w - 1)
    pad = ks // 2

    def conv(x, weight, groups):  # x (B, L, groups) -> (B, L, groups)
        x = x.transpose(1, 2).reshape(batch, groups, gh, gw)
        return F.conv2d(x, weight[:, None], padding=pad, groups=groups).reshape(batch, groups, length).transpose(1, 2)

    glob = torch.exp(-top)  # e^{-W} (h,)
    num = glob[:, None] * ev.sum(1, keepdim=True) + conv(
        ev.reshape(batch, length, d), kappa.repeat_interleave(dv, 0), d
    ).reshape(batch, length, heads, dv)
    den = glob * e.sum(1, keepdim=True) + conv(e, kappa, heads)
    magnitude = glob * e.sum(1, keepdim=True) + conv(e, kappa.abs(), heads)

    k4, v5 = kf[..., None], vf[:, :, :, None, :]
    avg = _finalize(
        num[:, :, :, None],
        den[..., None],
        _has_key(valid, False),
        _Exact(k4, v5, valid, False, 0, (), "grid", (kern,), (gh, gw)),
        magnitude=magnitude[..., None],
    )
    return (torch.sigmoid(q.to(dtype)) * avg.reshape(batch, length, d)).to(q.dtype)
