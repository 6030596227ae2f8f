"""Softmax attention with dropout, computed over query blocks so training never holds the `L x L` probabilities.

`torch.nn.functional.scaled_dot_product_attention` on CPU has no fused kernel for `dropout_p > 0`: it falls back to
its math path, which materialises the scores, the probabilities and the dropout mask of every query against every
key (`O(L^2)` memory, kept for the backward). `blocked_attention_forward` is a drop-in entry of transformers'
attention interface that runs in the style of memory-efficient / flash attention instead: the forward walks over
blocks of queries, keeps only q, k, v, the output, the per-row log-sum-exp and one integer seed, and the backward
recomputes each block's probabilities and regenerates its dropout mask from that seed. `attention_interface` picks it
where it helps (sdpa, dropout > 0, CPU tensors) and transformers' own entry everywhere else.

The one copy in the package; a checkpoint saved with its code carries it as a file of its own folder
(`hf_efficient.hub.bundle_files`).
"""

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .common import eager_attention_forward

# Elements of one block's `(B, h, rows, keys)` float32 scores: a few MiB, so a block's elementwise passes stay in
# cache and the working memory is `O(L x block)`, independent of L^2.
BLOCK_ELEMENTS = 1 << 21
# The dropout mask is drawn as 16-bit integers (four per 64-bit draw of the generator, the cheapest random bits on
# CPU): an element is dropped when its integer is below `round(p * 2^16)`. The probability used (for the drop and
# for the `1 / (1 - p)` rescaling, so the output stays unbiased) is that rounded value, within 2^-17 of `p`.
_DROP_LEVELS = 1 << 16
_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct blocks of one call get unrelated generator seeds


def _dropout_threshold(dropout: float) -> tuple[int, float]:
    """The int16 threshold below which an element is dropped, and the keep scale `1 / (1 - p_rounded)`."""
    levels = min(max(round(dropout * _DROP_LEVELS), 0), _DROP_LEVELS - 1)
    return levels - _DROP_LEVELS // 2, _DROP_LEVELS / (_DROP_LEVELS - levels)


def _drop_mask(shape: torch.Size, seed: int, block: int, threshold: int, device: torch.device) -> torch.Tensor:
    """Boolean `shape` mask, True = dropped, a pure function of `(seed, block)` (so the backward redraws it)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + block * _SEED_MIX) % (1 << 63))
    numel = shape.numel()
    bits = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    bits.random_(-(1 << 63), None, generator=generator)
    return (bits.view(torch.int16)[:numel] < threshold).view(shape)


class _Plan:
    """How the queries are cut into blocks and which keys / mask each block sees."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, is_causal: bool):
        batch, heads, self.q_len, _ = query.shape
        self.k_len = key.shape[2]
        self.offset = self.k_len - self.q_len  # query i sits at position offset + i
        self.mask = None
        if mask is not None:
            self.mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
        # A causal call without a mask only looks at keys up to the block's last query (no mask tensor at all), as
        # long as no query row is entirely masked; otherwise the causal mask is built block by block.
        self.causal = is_causal and mask is None
        self.skip_keys = self.causal and self.offset >= 0
        self.rows = max(1, min(self.q_len, BLOCK_ELEMENTS // max(1, batch * heads * self.k_len)))
        self.fill = torch.finfo(query.dtype).min  # what the eager path fills masked scores with

    def blocks(self):
        for index, start in enumerate(range(0, self.q_len, self.rows)):
            yield index, start, min(start + self.rows, self.q_len)

    def keys(self, end: int) -> int:
        return min(self.k_len, end + self.offset) if self.skip_keys else self.k_len

    def scores(self, q_blk, k_all, start, end, keys) -> torch.Tensor:
        """`(B, h, rows, keys)` masked scores of one block (`q_blk` already scaled), in the dtype of `q_blk` (float32
        or float64)."""
        scores = torch.matmul(q_blk, k_all[:, :, :keys].transpose(2, 3))
        if self.causal:
            first = max(0, start + self.offset) if self.skip_keys else 0
            if first < keys:  # only the diagonal part of the block needs the triangle
                rows = torch.arange(start + self.offset, end + self.offset, device=scores.device)[:, None]
                cols = torch.arange(first, keys, device=scores.device)[None, :]
                scores[..., first:keys].masked_fill_(cols > rows, self.fill)
        elif self.mask is not None:
            mask = self.mask
            mask = mask[:, :, start:end] if mask.shape[2] != 1 else mask
            if mask.dtype == torch.bool:
                scores.masked_fill_(~mask, self.fill)
            else:
                scores.add_(mask)
        return scores


def _softmax_stats(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """In place: `scores` -> `exp(scores - rowmax)`; returns the row sums (1 where a row is all -inf, whose
    probabilities are then 0), the log-sum-exp (0 for such rows, so the backward's `exp(s - lse)` is 0 too) and the
    row maxima (0 for such rows)."""
    row_max = scores.amax(dim=-1, keepdim=True)
    safe_max = torch.where(torch.isneginf(row_max), 0.0, row_max)
    scores.sub_(safe_max).exp_()
    total = scores.sum(dim=-1, keepdim=True)
    empty = total == 0
    total = torch.where(empty, 1.0, total)
    lse = torch.where(empty, 0.0, safe_max + total.log())
    return total, lse, safe_max


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, query, key, value, mask, scaling, dropout, is_causal, seed):
        plan = _Plan(query, key, mask, is_causal)
        acc = torch.promote_types(query.dtype, torch.float32)
        # the scaling is folded into q (an `(L, d_h)` pass instead of one over every block's scores)
        q32, k32, v32 = query.to(acc) * scaling, key.to(acc), value.to(acc)
        out = query.new_zeros(query.shape[:3] + value.shape[3:], dtype=acc)
        lse = query.new_zeros(query.shape[:3] + (1,), dtype=acc)
        row_maxes, totals = torch.zeros_like(lse), torch.ones_like(lse)
        # Rows whose every key is masked by a boolean / causal mask (all scores = the fill): their output is the
        # values' mean, as eager, and like eager's masked_fill no gradient reaches their scores.
        dead = torch.zeros(query.shape[:3] + (1,), dtype=torch.bool, device=query.device)
        fills = plan.causal or (plan.mask is not None and plan.mask.dtype == torch.bool)
        threshold, keep_scale = _dropout_threshold(dropout) if dropout > 0 else (None, 1.0)
        for index, start, end in plan.blocks():
            keys = plan.keys(end)
            if keys <= 0:
                continue
            probs = plan.scores(q32[:, :, start:end], k32, start, end, keys)
            total, lse[:, :, start:end], row_maxes[:, :, start:end] = _softmax_stats(probs)
            totals[:, :, start:end] = total
            if fills:
                dead[:, :, start:end] = row_maxes[:, :, start:end] == plan.fill
            if threshold is not None:
                probs.masked_fill_(_drop_mask(probs.shape, seed, index, threshold, probs.device), 0.0)
            out[:, :, start:end] = torch.matmul(probs, v32[:, :, :keys]).mul_(keep_scale / total)
        out = out.to(query.dtype)
        any_dead = fills and bool(dead.any())
        # Where a row's maximum is huge (masked by a fill or an additive finfo.min), `lse = max + log(total)` rounds
        # away `log(total)`: the backward then uses `exp(s - max) / total` (one more pass) instead of `exp(s - lse)`.
        stats = torch.cat([row_maxes, totals], dim=-1) if bool((row_maxes.abs() > 1e4).any()) else None
        ctx.save_for_backward(query, key, value, out, lse, mask, dead if any_dead else None, stats)
        ctx.config = (scaling, dropout, is_causal, seed)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, lse, mask, dead, stats = ctx.saved_tensors
        scaling, dropout, is_causal, seed = ctx.config
        plan = _Plan(query, key, mask, is_causal)
        acc = torch.promote_types(query.dtype, torch.float32)
        q32, k32, v32 = query.to(acc) * scaling, key.to(acc), value.to(acc)
        grad32 = grad_out.to(acc)
        # D_i = sum_j P~_ij dP~_ij = dO_i . O_i: the softmax backward's row term, without the probabilities.
        delta = (grad32 * out.to(acc)).sum(dim=-1, keepdim=True)
        grad_q = torch.zeros_like(q32)
        grad_k = torch.zeros_like(k32)
        grad_v = torch.zeros_like(v32)
        threshold, keep_scale = _dropout_threshold(dropout) if dropout > 0 else (None, 1.0)
        # The dropout's 1 / (1 - p) is folded into the incoming gradient (an `(L, d_h)` pass): dL/dP = M * s * dL/dP~
        # = M * (s dO) v^T, and dL/dv = (M * P)^T (s dO).
        grad_scaled = grad32 * keep_scale if threshold is not None else grad32
        for index, start, end in plan.blocks():
            keys = plan.keys(end)
            if keys <= 0:
                continue
            q_blk, g_blk = q32[:, :, start:end], grad_scaled[:, :, start:end]
            probs = plan.scores(q_blk, k32, start, end, keys)
            if stats is None:
                probs.sub_(lse[:, :, start:end]).exp_()
            else:
                probs.sub_(stats[:, :, start:end, :1]).exp_().div_(stats[:, :, start:end, 1:])
            grad_probs = torch.matmul(g_blk, v32[:, :, :keys].transpose(2, 3))  # dL/dP (with s)
            if threshold is not None:
                dropped = _drop_mask(probs.shape, seed, index, threshold, probs.device)
                grad_probs.masked_fill_(dropped, 0.0)
            grad_scores = grad_probs.sub_(delta[:, :, start:end]).mul_(probs)
            if dead is not None:
                grad_scores.masked_fill_(dead[:, :, start:end], 0.0)
            if threshold is not None:
                probs.masked_fill_(dropped, 0.0)  # M * P, in place: P itself is no longer needed
            grad_v[:, :, :keys] += torch.matmul(probs.transpose(2, 3), g_blk)
            grad_q[:, :, start:end] = torch.matmul(grad_scores, k32[:, :, :keys])
            grad_k[:, :, :keys] += torch.matmul(grad_scores.transpose(2, 3), q_blk)
        # scores = (q * scaling) k^T: dL/dq = scaling * dS k; dL/dk = dS^T (q * scaling), already scaled via q_blk
        grad_q.mul_(scaling)
        return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), None, None, None, None, None


def blocked_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`softmax(q k^T * scaling + mask)` with dropout on the probabilities, times v, in `O(L x block)` memory.

    The contract of `eager_attention_forward`: q `(B, h, Lq, d_h)`, k / v `(B, h, T, d_h)`; `attention_mask` boolean
    (True = attend) or additive, broadcastable to `(B, h, Lq, T)`, or None with `is_causal` (query i at position
    T - Lq + i). Returns `(B, Lq, h, d_h)` and None (the probabilities are never formed). Masked scores get the
    eager path's `finfo(dtype).min`, so a row with every key masked averages the values as eager does; a row whose
    additive mask is all -inf gives 0 (eager: NaN). Softmax and products run in float32 (float64 for float64 inputs).
    Dropout is applied when `dropout > 0` (callers pass 0 outside training), with a mask drawn from one integer of
    the global RNG: `torch.manual_seed` makes it reproducible. q, k and v share B and h (no GQA broadcast). A mask
    that requires grad (a learned additive bias) goes through the eager path, which backpropagates into it.
    """
    if attention_mask is not None and attention_mask.requires_grad and torch.is_grad_enabled():
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout, is_causal)
    seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64)) if dropout > 0 else 0
    output = _BlockedAttention.apply(query, key, value, attention_mask, scaling, float(dropout), is_causal, seed)
    return output.transpose(1, 2).contiguous(), None


def _blocked_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`blocked_attention_forward` with the argument conventions of transformers' sdpa entry: `scaling` None is
    `d_h ** -0.5`, and `is_causal` None reads `module.is_causal` (applied when there is no mask and more than one
    query, as sdpa does)."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    is_causal = bool(is_causal) and attention_mask is None and query.shape[2] > 1
    return blocked_attention_forward(module, query, key, value, attention_mask, scaling, dropout, is_causal)


def attention_interface(implementation: str, query: torch.Tensor, dropout: float) -> Callable:
    """The attention function for `config._attn_implementation`, given the call's query and dropout.

    sdpa with dropout > 0 on CPU (training) -> `blocked_attention_forward` (SDPA's CPU math path would hold the
    `L x L` probabilities and dropout mask). Everything else is transformers' registered entry (eager stays eager;
    sdpa without dropout, or on CUDA where SDPA's fused kernels handle dropout, stays sdpa). Compiled, exported and
    traced graphs keep sdpa: the blocked function is a Python loop with its own generator."""
    traced = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
    if implementation == "sdpa" and dropout > 0 and query.device.type == "cpu" and not traced:
        return _blocked_sdpa_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
