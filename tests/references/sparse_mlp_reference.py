"""Naive Sparse-MLP references written from the equations (Lou et al. 2021; V-MoE, Riquelme et al. 2021, App. A).

Per-unit Python loops in float64: softmax, top-k by sorting, every chosen expert's MLP on that unit alone, the
capacity queue filled one pair at a time, the two auxiliary losses from their formulas (math.erf for the normal
CDF). Slow and obviously correct; the fast ops must agree to ~1e-5.
"""

import math

import torch


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(v: list[float]) -> list[float]:
    top = max(v)
    exps = [math.exp(x - top) for x in v]
    total = sum(exps)
    return [e / total for e in exps]


def _cv_squared(values: list[float]) -> float:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / len(values)
    return variance / mean**2


def _normal_cdf(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def expert_mlp_reference(x, up, up_bias, down, down_bias):
    """One expert on one unit: `W2 gelu(W1 x + b1) + b2`; `x` `(d,)`, `up` `(h, d)`, `down` `(d, h)`."""
    return down @ _gelu(up @ x + up_bias) + down_bias


def moe_reference(
    units,
    router_weight,
    up,
    up_bias,
    down,
    down_bias,
    top_k,
    noise=None,
    noise_std=0.0,
    capacity_factor=None,
    priority="importance",
):
    """MoE layer on `N` units `(N, d)` with router `(E, d)` and experts `up (E, h, d)`, `down (E, d, h)`.

    Returns `(output (N, d), aux, dropped)`: `aux = {"importance": L_imp, "load": L_load or None, "total": 0.5 L_imp
    + 0.5 L_load}`, `dropped` = set of (unit, expert) pairs that overflowed the capacity."""
    units = units.double()
    router_weight, up, up_bias, down, down_bias = (t.double() for t in (router_weight, up, up_bias, down, down_bias))
    num_units, num_experts = units.shape[0], router_weight.shape[0]

    logits, noisy_logits, probs, choices = [], [], [], []
    for n in range(num_units):
        clean = [float(router_weight[e] @ units[n]) for e in range(num_experts)]
        noisy = [clean[e] + (float(noise[n, e]) if noise is not None else 0.0) for e in range(num_experts)]
        gates = _softmax(noisy)
        ranked = sorted(range(num_experts), key=lambda e: (-gates[e], e))[:top_k]
        logits.append(clean)
        noisy_logits.append(noisy)
        probs.append(_softmax(clean))
        choices.append([(e, gates[e]) for e in ranked])

    # Capacity: fill each expert's queue rank by rank (all top-1 choices, then top-2...), units in priority order.
    dropped = set()
    if capacity_factor is not None:
        capacity = max(1, math.ceil(capacity_factor * num_units * top_k / num_experts))
        if priority == "importance":
            order = sorted(range(num_units), key=lambda n: (-choices[n][0][1], n))
        else:
            order = list(range(num_units))
        used = [0] * num_experts
        for rank in range(top_k):
            for n in order:
                expert = choices[n][rank][0]
                if used[expert] < capacity:
                    used[expert] += 1
                else:
                    dropped.add((n, expert))

    output = torch.zeros_like(units)
    for n in range(num_units):
        for expert, gate in choices[n]:
            if (n, expert) in dropped:
                continue
            output[n] += gate * expert_mlp_reference(
                units[n], up[expert], up_bias[expert], down[expert], down_bias[expert]
            )

    importance = [sum(probs[n][e] for n in range(num_units)) for e in range(num_experts)]
    aux = {"importance": _cv_squared(importance), "load": None}
    if noise is not None and noise_std > 0:
        load = []
        for e in range(num_experts):
            total = 0.0
            for n in range(num_units):
                threshold = sorted(noisy_logits[n], reverse=True)[top_k - 1]
                total += 1.0 - _normal_cdf((threshold - logits[n][e]) / noise_std)
            load.append(total / num_units)
        aux["load"] = _cv_squared(load)
    aux["total"] = 0.5 * aux["importance"] + (0.5 * aux["load"] if aux["load"] is not None else 0.0)
    return output, aux, dropped


def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def sparse_block_reference(x, block, eps, capacity_factor=None, priority="importance"):
    """One sparse block on one image `x` `(S, C)` (eval: no noise), from a `SparseMLPSparseBlock`'s parameters:
    re-represent-in, MoE_S over the C' channel rows, MoE_C over the S' patches, re-represent-out."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    x = x.double()
    h = x @ p["channels_in.weight"].T + p["channels_in.bias"]  # (S, C')
    h = (h.T @ p["patches_in.weight"].T + p["patches_in.bias"]).T  # (S', C')

    rows = _layer_norm(h, p["token_norm.weight"], p["token_norm.bias"], eps).T  # (C', S'): one unit per channel
    mixed, token_aux, _ = moe_reference(
        rows,
        p["token_moe.router.weight"],
        p["token_moe.experts.up_proj"],
        p["token_moe.experts.up_proj_bias"],
        p["token_moe.experts.down_proj"],
        p["token_moe.experts.down_proj_bias"],
        block.token_moe.top_k,
        capacity_factor=capacity_factor,
        priority=priority,
    )
    h = h + mixed.T

    patches = _layer_norm(h, p["channel_norm.weight"], p["channel_norm.bias"], eps)  # (S', C'): one unit per patch
    mixed, channel_aux, _ = moe_reference(
        patches,
        p["channel_moe.router.weight"],
        p["channel_moe.experts.up_proj"],
        p["channel_moe.experts.up_proj_bias"],
        p["channel_moe.experts.down_proj"],
        p["channel_moe.experts.down_proj_bias"],
        block.channel_moe.top_k,
        capacity_factor=capacity_factor,
        priority=priority,
    )
    h = h + mixed

    h = (h.T @ p["patches_out.weight"].T + p["patches_out.bias"]).T  # (S, C')
    return h @ p["channels_out.weight"].T + p["channels_out.bias"], token_aux, channel_aux
