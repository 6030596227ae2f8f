"""N-gram masked self-attention as pure tensor functions (Chelba, Chen, Bapna, Shazeer, 2020).

The decoder self-attention of an N-gram Transformer lets target position i attend to position j iff

    0 <= i - j <= N - 1                                   (the current token and the N - 1 before it)

so that  out_i = sum_{j = i-N+1}^{i} softmax_j(q_i . k_j * scale) v_j   over the real (unpadded) keys j.

`ngram_attention` computes it in O(L N): the sequence is cut into blocks of `block` positions (block >= N - 1),
and the queries of each block attend to the keys of their own block and of the previous one under a band mask. The
blocks are folded into the batch dimension, so one batched attention call (eager or SDPA, through transformers'
attention interface) does the work; the score tensor and the mask are `(B * L / block, H, block, 2 block)`, never
L x L. `ngram_size=None` is full causal attention (the baseline), computed densely, as is a call that returns the
attention map (`output_attentions` materialises it anyway).
"""

import math
from collections.abc import Callable

import torch

from ..shared.common import mask_if_padded

# attention_fn(query, key, value, mask, is_causal) -> (output (B, Lq, H, D), weights (B, H, Lq, Lk) or None), with
# query (B, H, Lq, D), key / value (B, H, Lk, D) and a boolean mask (B, 1, Lq, Lk) (True = attend) or None.
AttentionFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def default_block_size(ngram_size: int) -> int:
    """The smallest multiple of N that is at least 64: big enough for efficient batched matmuls at small N."""
    return ngram_size * -(-64 // ngram_size)


def ngram_band(query_positions: torch.Tensor, key_positions: torch.Tensor, ngram_size: int | None) -> torch.Tensor:
    """`allowed[i, j] = 0 <= q_i - k_j <= N - 1` (only `q_i >= k_j` when `ngram_size` is None): `(Lq, Lk)` bool."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    if ngram_size is not None:
        allowed &= distance <= ngram_size - 1
    return allowed


def ngram_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    ngram_size: int | None,
    attention_fn: AttentionFn,
    key_mask: torch.Tensor | None = None,
    block_size: int | None = None,
    implicit_causal: bool = False,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """N-gram masked (or, with `ngram_size=None`, full causal) self-attention.

    Args:
        query: `(B, H, Lq, D)`; query t sits at key position `Lk - Lq + t` (queries are the newest positions: a
            prefill has Lq = Lk, a cached decoding step has the cached window before it).
        key, value: `(B, H, Lk, D)`.
        ngram_size: N >= 1, or None for full causal attention.
        attention_fn: computes softmax attention for a boolean mask (see `AttentionFn`).
        key_mask: `(B, Lk)`, nonzero for real keys, or None. Padded keys are never attended; a padded query attends
            to itself only where nothing else is allowed (so every row is finite; its output is meaningless).
        block_size: block length of the blocked path, >= N - 1 (default `default_block_size(N)`).
        implicit_causal: full causal attention without padding may pass `mask=None, is_causal=True` (SDPA's
            efficient causal kernels).
        return_weights: also return the attention probabilities as a dense `(B, H, Lq, Lk)` tensor (zeros outside
            the band). The call then runs on the dense path (one `(Lq, Lk)` band mask): the map materialises
            Lq x Lk anyway, as any `output_attentions` does, and the probabilities returned are the very ones the
            output is computed from, so they sit on the autograd graph (`retain_grad()` on them gets a gradient).

    Returns:
        `(B, Lq, H, D)` outputs, and the weights or None.
    """
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    offset = k_len - q_len
    if offset < 0:
        raise ValueError(f"ngram_attention: {q_len} queries but only {k_len} keys (queries must be the newest keys).")
    if ngram_size is not None and block_size is None:
        block_size = default_block_size(ngram_size)
    if ngram_size is not None and block_size < max(ngram_size - 1, 1):
        raise ValueError(f"ngram_attention: block_size {block_size} must be >= ngram_size - 1 ({ngram_size - 1}).")
    valid = None if key_mask is None else key_mask.to(device=query.device).bool()

    if ngram_size is None or k_len <= block_size or return_weights:
        return _dense(query, key, value, ngram_size, attention_fn, valid, implicit_causal, return_weights)

    # Blocked path. Queries before `offset` do not exist: zero queries stand in for them and are dropped at the end.
    if offset:
        query = torch.cat([query.new_zeros(batch, heads, offset, dim), query], dim=2)
    length = k_len
    num_blocks = -(-length // block_size)
    padded = num_blocks * block_size
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=query.device)
    # Keys get one extra block of (invalid) zeros in front, so block b's window is padded blocks b and b + 1.
    query = torch.nn.functional.pad(query, (0, 0, 0, padded - length))
    key, value = (torch.nn.functional.pad(t, (0, 0, block_size, padded - length)) for t in (key, value))
    valid = torch.nn.functional.pad(valid, (block_size, padded - length), value=False)

    def windows(t: torch.Tensor) -> torch.Tensor:  # (B, H, P + blk, D) -> (B * nb, H, 2 blk, D)
        blocks = t.view(batch, heads, num_blocks + 1, block_size, dim)
        pairs = torch.cat([blocks[:, :, :-1], blocks[:, :, 1:]], dim=3)
        return pairs.transpose(1, 2).reshape(batch * num_blocks, heads, 2 * block_size, dim)

    q_blocks = query.view(batch, heads, num_blocks, block_size, dim).transpose(1, 2)
    q_blocks = q_blocks.reshape(batch * num_blocks, heads, block_size, dim)
    valid_blocks = valid.view(batch, num_blocks + 1, block_size)
    valid_windows = torch.cat([valid_blocks[:, :-1], valid_blocks[:, 1:]], dim=-1)  # (B, nb, 2 blk)
    # Query r of a block is at window position block + r: the band is the same for every block.
    rows = torch.arange(block_size, device=query.device) + block_size
    cols = torch.arange(2 * block_size, device=query.device)
    band = ngram_band(rows, cols, ngram_size)
    diagonal = rows[:, None] == cols[None, :]
    mask = (band & valid_windows[:, :, None, :]) | diagonal  # (B, nb, blk, 2 blk)
    mask = mask.reshape(batch * num_blocks, 1, block_size, 2 * block_size)

    out, _ = attention_fn(q_blocks, windows(key), windows(value), mask, False)
    return out.reshape(batch, padded, heads, dim)[:, offset:length], None


def _dense(query, key, value, ngram_size, attention_fn, valid, implicit_causal, return_weights):
    """Short sequences (Lk <= block) and full causal attention: one `(Lq, Lk)` mask."""
    q_len, k_len = query.shape[2], key.shape[2]
    if implicit_causal and ngram_size is None and valid is None and q_len == k_len and not return_weights:
        return attention_fn(query, key, value, None, q_len > 1)
    key_positions = torch.arange(k_len, device=query.device)
    query_positions = key_positions[k_len - q_len :]
    band = ngram_band(query_positions, key_positions, ngram_size)
    diagonal = query_positions[:, None] == key_positions[None, :]
    mask = band[None] if valid is None else (band[None] & valid[:, None, :]) | diagonal[None]
    out, weights = attention_fn(query, key, value, mask[:, None], False)
    return out, (weights if return_weights else None)


def padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """`(B, S)` 0/1 key mask -> `(B, 1, 1, S)` boolean attention mask (True = attend), or None without padding."""
    attention_mask = mask_if_padded(attention_mask)
    return None if attention_mask is None else attention_mask.bool()[:, None, None, :]


def sinusoidal_positions(position_ids: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Vaswani et al.'s position encoding: `[sin(p w_i), cos(p w_i)]`, `w_i = 10000^(-2i/d)`: `(B, L)` -> `(B, L, d)`."""
    half = dim // 2
    inv_freq = torch.exp(torch.arange(half, device=position_ids.device, dtype=torch.float32) * (-math.log(1e4) / half))
    angles = position_ids.float()[..., None] * inv_freq
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        encoding = torch.nn.functional.pad(encoding, (0, 1))
    return encoding.to(dtype)


__all__ = [
    "default_block_size",
    "ngram_attention",
    "ngram_band",
    "padding_mask",
    "sinusoidal_positions",
]
