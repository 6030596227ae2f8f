"""Naive references for gMLP/aMLP, written straight from the paper's equations (loops, dense, obviously correct)."""

import math

import torch


def sgu_projection_reference(gate, weight, bias, *, causal, num_queries=None, positions=None, key_mask=None):
    """out[b, i] = sum_j W[p_i, p_j] * keep(b, i, j) * gate[b, j] + bias[p_i], queries = last Lq positions."""
    batch, total, channels = gate.shape
    num_queries = total if num_queries is None else num_queries
    if positions is None:
        positions = torch.arange(total)[None].expand(batch, total)
    positions = positions.expand(batch, total)
    out = torch.zeros(batch, num_queries, channels, dtype=torch.float64)
    for b in range(batch):
        for qi in range(num_queries):
            i = total - num_queries + qi
            acc = torch.zeros(channels, dtype=torch.float64) + float(bias[positions[b, i]])
            for j in range(total):
                if causal and j > i:
                    continue
                if key_mask is not None and not key_mask[b, j]:
                    continue
                acc += float(weight[positions[b, i], positions[b, j]]) * gate[b, j].double()
            out[b, qi] = acc
    return out


def sgu_projection_dense_reference(gate, weight, bias, *, causal, key_mask=None):
    """The same projection as one dense, differentiable float64 product (positions 0 .. T-1, all T queries):
    out = (W[:T, :T] * keep) @ gate + bias[:T], keep[b, i, j] = key_mask[b, j] and (j <= i if causal)."""
    total = gate.shape[1]
    keep = torch.ones(gate.shape[0], total, total, dtype=torch.bool)
    if causal:
        keep &= torch.ones(total, total, dtype=torch.bool).tril()
    if key_mask is not None:
        keep &= key_mask.bool()[:, None, :]
    w = weight[:total, :total].double() * keep
    return w @ gate.double() + bias[:total, None].double()


def tiny_attention_reference(query, key, value, *, causal, key_mask=None):
    """softmax_j(q_i . k_j / sqrt(d)) v_j over allowed j (causal: j <= i; key_mask: real keys)."""
    batch, num_queries, dim = query.shape
    total = key.shape[1]
    out = torch.zeros(batch, num_queries, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for qi in range(num_queries):
            i = total - num_queries + qi
            allowed = [
                j for j in range(total) if (not causal or j <= i) and (key_mask is None or bool(key_mask[b, j]))
            ]
            if not allowed:  # a query with no real key: the softmax is undefined
                out[b, qi] = float("nan")
                continue
            scores = torch.stack([query[b, qi].double() @ key[b, j].double() / math.sqrt(dim) for j in allowed])
            probs = torch.softmax(scores, dim=0)
            out[b, qi] = sum(p * value[b, j].double() for p, j in zip(probs, allowed))
    return out
