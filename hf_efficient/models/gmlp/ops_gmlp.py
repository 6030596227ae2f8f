"""The fast ops of gMLP / aMLP: pure functions on tensors (no modules, no parameters of their own).

Both ops treat the *queries* as the last `Lq` of `T` positions whose inputs are given, so one function serves a
full forward (`Lq == T`) and cached decoding (the `T - Lq` earlier positions come from the cache).
"""

import math

import torch
import torch.nn.functional as F


def spatial_gating_projection(
    gate: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    causal: bool,
    num_queries: int | None = None,
    positions: torch.LongTensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""The spatial projection of the SGU, along the sequence axis.

    `out[b, i, c] = sum_j W[p_i, p_j] * keep[b, i, j] * gate[b, j, c] + bias[p_i]`

    with `p` the position ids, `keep[b, i, j] = key_mask[b, j] and (j <= i if causal)`; the queries `i` are the last
    `num_queries` of the `T` positions.

    Args:
        gate: `(B, T, C)` normalised gate inputs `v` of every position the queries may see.
        weight: `(N, N)` spatial weight `W` (`N` = max_position_embeddings), laid out as timm's `nn.Linear(N, N)`:
            `out[m] = sum_n W[m, n] v[n]`.
        bias: `(N,)` spatial bias `b`.
        causal: mask `j > i` (equivalently: use the lower triangle of `W`).
        num_queries: `Lq`, the number of trailing positions to compute (default: all `T`).
        positions: `(B or 1, T)` position ids `p`. `None` means `0 .. T-1` for every row, which takes the fast path
            (one `(Lq, T)` slice of `W` shared by the batch). Left-padded batches pass `cumsum(mask) - 1` here so each
            sample's real tokens see the same weights as the sample alone.
        key_mask: `(B, T)` with 1 for real positions and 0 for padding; padded positions contribute nothing.

    Returns:
        `(B, Lq, C)`.
    """
    batch_size, total_len, _ = gate.shape
    num_queries = total_len if num_queries is None else num_queries
    if key_mask is not None:
        # masked_fill rather than a multiply: a NaN/inf in a padded slot must not leak through 0 * x.
        gate = gate.masked_fill(~key_mask.bool()[..., None], 0.0)

    if positions is None:
        w = weight[total_len - num_queries : total_len, :total_len]
        if causal:
            # Query i (row) sits at absolute position T - Lq + i and may see keys j <= T - Lq + i.
            w = torch.tril(w, diagonal=total_len - num_queries)
        return torch.matmul(w.to(gate.dtype), gate) + bias[total_len - num_queries : total_len, None].to(gate.dtype)

    positions = positions.expand(batch_size, total_len)
    query_pos = positions[:, total_len - num_queries :]
    # (B, Lq, T) gather of W: each sample has its own positions (left padding). This is O(Lq T) like the op itself.
    w = weight[query_pos[:, :, None], positions[:, None, :]]
    if causal:
        w = torch.tril(w, diagonal=total_len - num_queries)
    return torch.bmm(w.to(gate.dtype), gate) + bias[query_pos][..., None].to(gate.dtype)


def tiny_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    causal: bool,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""aMLP's single-head attention: `softmax(q k^T / sqrt(d_attn)) v`.

    Args:
        query: `(B, Lq, d_attn)`, the last `Lq` of the `T` positions.
        key, value: `(B, T, d_attn)` and `(B, T, d_v)`.
        causal: query `i` (at position `T - Lq + i`) sees keys `j <= T - Lq + i`.
        key_mask: `(B, T)`, 1 for real keys, 0 for padding.

    Returns:
        `(B, Lq, d_v)`.
    """
    num_queries, total_len = query.shape[1], key.shape[1]
    if key_mask is None and (not causal or num_queries == total_len):
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal)

    allowed = torch.ones(num_queries, total_len, dtype=torch.bool, device=query.device)
    if causal:
        allowed = torch.tril(allowed, diagonal=total_len - num_queries)
    allowed = allowed[None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
        # A padded query may have no real key at all (left padding + causal), and a fully masked softmax row is NaN.
        # Such rows (and only those) attend to their own position instead; their outputs are padding anyway.
        own = torch.zeros(num_queries, total_len, dtype=torch.bool, device=query.device)
        own[torch.arange(num_queries), torch.arange(total_len - num_queries, total_len)] = True
        allowed = allowed | (own[None] & ~allowed.any(dim=-1, keepdim=True))
    return F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=1.0 / math.sqrt(query.shape[-1]))
