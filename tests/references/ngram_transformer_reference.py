"""Naive reference for N-gram masked self-attention (Chelba et al., 2020), straight from the definition:

    allowed(i, j)  iff  0 <= i - j <= N - 1   (and key j is a real token)
    out_i = sum_{j allowed} softmax_j(q_i . k_j * scale) v_j

One query position at a time, with a Python loop over the allowed keys: obviously correct, O(L N) loop iterations.
"""

import math

import torch


def ngram_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    ngram_size: int | None,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """`query (B, H, Lq, D)`, `key / value (B, H, Lk, D)`, query t at key position `Lk - Lq + t`; `ngram_size=None`
    is full causal attention. Returns `(B, Lq, H, D)`; a query with no allowed key gets zeros."""
    batch, heads, q_len, dim = query.shape
    k_len = key.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = torch.zeros(batch, q_len, heads, dim, dtype=query.dtype)
    for b in range(batch):
        for t in range(q_len):
            i = k_len - q_len + t
            first = 0 if ngram_size is None else max(0, i - ngram_size + 1)
            keys = [j for j in range(first, i + 1) if key_mask is None or bool(key_mask[b, j])]
            if not keys:
                continue
            for h in range(heads):
                scores = torch.stack([query[b, h, t] @ key[b, h, j] * scale for j in keys])
                probs = torch.softmax(scores, dim=0)
                out[b, t, h] = sum(p * value[b, h, j] for p, j in zip(probs, keys))
    return out
