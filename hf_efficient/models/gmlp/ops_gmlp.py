"""The fast ops of gMLP / aMLP: pure functions on tensors (no modules, no parameters of their own).

Both ops treat the *queries* as the last `Lq` of `T` positions whose inputs are given, so one function serves a
full forward (`Lq == T`) and cached decoding (the `T - Lq` earlier positions come from the cache).
"""

import math

import torch
import torch.nn.functional as F

# Query rows per block of the causal spatial projection (`_CausalSpatialProjection`).
CAUSAL_BLOCK = 256


class _CausalSpatialProjection(torch.autograd.Function):
    """`tril(W[:T, :T]) @ gate` without the masked upper triangle: blocked lower-triangular products.

    Query block `[a, b)` needs keys `< a` (a plain product with `W[a:b, :a]`, no mask) and the diagonal block
    `tril(W[a:b, a:b])`: half the FLOPs of the dense product, and no masked `T x T` copy of `W`, forward or backward.
    The batch is folded into the columns (`(T, B * C)`), so each block is one GEMM. Saved: `W` (the parameter) and the
    gate. Backward, per block: `dgate[:b] += W[a:b, :b]^T g`, `dW[a:b, :a] = g gate[:a]^T`, and the lower triangle of
    `g gate[a:b]^T` on the diagonal block; the upper triangle of `dW` stays 0 (as the masked product's).
    """

    @staticmethod
    def forward(ctx, weight, gate, block):
        batch, length, channels = gate.shape
        cols = gate.transpose(0, 1).reshape(length, batch * channels)  # (T, B * C)
        out = torch.empty_like(cols)
        for a in range(0, length, block):  # blocks of query rows
            b = min(a + block, length)
            diag = torch.tril(weight[a:b, a:b].to(gate.dtype))
            torch.matmul(diag, cols[a:b], out=out[a:b])
            if a:
                out[a:b].addmm_(weight[a:b, :a].to(gate.dtype), cols[:a])
        ctx.save_for_backward(weight, cols)
        ctx.block, ctx.shape = block, (batch, length, channels)
        return out.view(length, batch, channels).transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        weight, cols = ctx.saved_tensors
        batch, length, channels = ctx.shape
        g_cols = grad.transpose(0, 1).reshape(length, batch * channels).to(cols.dtype)
        d_cols = torch.zeros_like(cols) if ctx.needs_input_grad[1] else None
        d_weight = torch.zeros_like(weight) if ctx.needs_input_grad[0] else None
        for a in range(0, length, ctx.block):
            b = min(a + ctx.block, length)
            g = g_cols[a:b]
            if d_cols is not None:
                d_cols[a:b].addmm_(torch.tril(weight[a:b, a:b].to(g.dtype)).T, g)
                if a:
                    d_cols[:a].addmm_(weight[a:b, :a].to(g.dtype).T, g)
            if d_weight is not None:
                d_weight[a:b, a:b] = torch.tril(g @ cols[a:b].T)
                if a:
                    d_weight[a:b, :a] = g @ cols[:a].T
        d_gate = None if d_cols is None else d_cols.view(length, batch, channels).transpose(0, 1)
        return d_weight, d_gate, None


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
        causal: mask `j > i` (equivalently: use the lower triangle of `W`). A full causal forward (no positions,
            `Lq == T`) multiplies only the lower triangle, in blocks of `CAUSAL_BLOCK` rows (`_CausalSpatialProjection`).
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

    if positions is None and causal and num_queries == total_len:
        # Full causal forward: blocked lower-triangular products, the masked upper triangle is never multiplied.
        return _CausalSpatialProjection.apply(weight, gate, CAUSAL_BLOCK) + bias[:total_len, None].to(gate.dtype)

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
