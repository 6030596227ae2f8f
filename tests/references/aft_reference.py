"""Naive references for the Attention Free Transformer ops, straight from the paper's equations.

    Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_tt') V_t' / sum_t' exp(K_t' + w_tt')

computed densely in float64: the explicit (B, Lq, Lk, d) tensor of weights exp(K_t' + w_tt') (no max
subtraction: float64 exp is finite for |K + w| < 709, which every test respects), boolean masks for
causality and padding, and the (Lq, Lk) bias of each variant built with plain Python loops over (t, t').
A query with no visible key outputs 0 (the ops' convention).
"""

import torch


def aft_reference(q, k, v, w, causal=False, key_padding_mask=None):
    """q (B, Lq, d); k, v (B, Lk, d); w (Lq, Lk) or (Lq, Lk, d) (per-channel bias). Lq < Lk (causal):
    the queries are the last Lq positions. Returns float64 (B, Lq, d)."""
    q, k, v, w = (x.double() for x in (q, k, v, w))
    batch, lq, d = q.shape
    lk = k.shape[1]
    if w.dim() == 2:
        w = w[..., None]
    allowed = torch.ones(batch, lq, lk, dtype=torch.bool)
    if key_padding_mask is not None:
        allowed &= key_padding_mask.bool()[:, None, :]
    if causal:
        offset = lk - lq
        for t in range(lq):
            for tk in range(lk):
                if tk > t + offset:
                    allowed[:, t, tk] = False
    weights = torch.exp(k[:, None, :, :] + w[None]) * allowed[..., None]  # (B, Lq, Lk, d)
    num = (weights * v[:, None, :, :]).sum(2)
    den = weights.sum(2)
    avg = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
    return torch.sigmoid(q) * avg


def local_bias(w_band, window, causal):
    """Dense AFT-local bias: w[t, t'] = w_band[t, t' - t + s - 1] where |t - t'| < s (t' <= t causal), else 0."""
    length = w_band.shape[0]
    w = torch.zeros(length, length, dtype=torch.float64)
    for t in range(length):
        for tk in range(length):
            inside = abs(t - tk) < window and (tk <= t or not causal)
            if inside:
                w[t, tk] = w_band[t, tk - t + window - 1].double()
    return w


def conv1d_bias(kernel, length, causal):
    """Dense per-head AFT-conv bias (h, L, L): kernel[h, j] at offset t' - t = j - (ks - 1) (causal) or
    j - (ks - 1) / 2 (bidirectional), 0 elsewhere."""
    heads, ks = kernel.shape
    center = ks - 1 if causal else (ks - 1) // 2
    w = torch.zeros(heads, length, length, dtype=torch.float64)
    for t in range(length):
        for tk in range(length):
            j = tk - t + center
            if 0 <= j < ks:
                w[:, t, tk] = kernel[:, j].double()
    return w


def conv2d_bias(kernel, grid_size):
    """Dense per-head 2-D AFT-conv bias (h, L, L) on a row-major (H, W) grid: kernel[h, r + dy, r + dx]
    for key offset (dy, dx) with |dy|, |dx| <= r = ks // 2, 0 elsewhere."""
    heads, ks, _ = kernel.shape
    gh, gw = grid_size
    r = ks // 2
    w = torch.zeros(heads, gh * gw, gh * gw, dtype=torch.float64)
    for t in range(gh * gw):
        for tk in range(gh * gw):
            dy, dx = tk // gw - t // gw, tk % gw - t % gw
            if abs(dy) <= r and abs(dx) <= r:
                w[:, t, tk] = kernel[:, r + dy, r + dx].double()
    return w


def per_head_to_channels(k, w_heads, value_channels):
    """AFT-conv keys (B, L, h) and per-head biases (h, L, L) expanded to the value channels (heads major):
    returns k (B, L, d) and w (L, L, d) for `aft_reference`."""
    heads = k.shape[-1]
    dv = value_channels // heads
    return k.repeat_interleave(dv, -1), w_heads.repeat_interleave(dv, 0).permute(1, 2, 0)
