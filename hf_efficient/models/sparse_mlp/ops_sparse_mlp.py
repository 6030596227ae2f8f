"""Sparse-MLP routing ops: router, top-k, expert capacity, auxiliary losses, and the padded-batched experts forward.

Pure functions on tensors (no modules), each with its equation and shapes. Notation: `N` routed units (rows of a
`(N, d)` matrix), `E` experts, `k` experts per unit. The tests compare every function with the per-unit loops of
`tests/references/sparse_mlp_reference.py`.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


class Routing(NamedTuple):
    """The result of routing `N` units to `E` experts."""

    probs: torch.Tensor  # (N, E) float32 softmax(W x) without noise: the importance loss reads these
    top_k_index: torch.LongTensor  # (N, k) chosen experts, best first
    top_k_weights: torch.Tensor  # (N, k) their gate values (noisy softmax in training), not renormalised
    keep: torch.Tensor | None  # (N, k) bool: pair kept within the experts' capacity (None: no capacity, all kept)
    aux_loss: torch.Tensor  # () 0.5 * L_importance + 0.5 * L_load (the load term only when there is noise)


def cv_squared(values: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation `Var(v) / mean(v)^2` (population variance) of a `(E,)` vector."""
    mean = values.mean()
    return ((values - mean) ** 2).mean() / mean.pow(2).clamp(min=torch.finfo(values.dtype).tiny)


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """`L_importance = CV(Imp)^2` with `Imp_e = sum_x softmax(W_g x)_e`; `probs`: `(N, E)` (V-MoE App. A)."""
    return cv_squared(probs.sum(dim=0))


def load_loss(logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, top_k: int) -> torch.Tensor:
    """V-MoE's smooth load estimator: `L_load = CV(load)^2`, `load_e = mean_x p_e(x)` with

        p_e(x) = P(l_e(x) + eps' >= t_k(x)) = 1 - Phi((t_k(x) - l_e(x)) / sigma),

    `l(x) = W_g x` the noise-free logits `(N, E)`, `t_k(x)` the k-th largest entry of the noisy logits `(N, E)` and
    `Phi` the standard normal CDF: the probability that expert `e` would be among the top-k of `x` if the noise were
    drawn again. Differentiable in `l` (the hard count of routed units is not)."""
    threshold = noisy_logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
    prob_selected = torch.special.ndtr((logits - threshold) / noise_std)  # 1 - Phi(z) = Phi(-z)
    return cv_squared(prob_selected.mean(dim=0))


def expert_capacity(num_units: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """`ceil(capacity_factor * N * k / E)`: the most (unit, expert) pairs one expert takes."""
    return max(1, math.ceil(capacity_factor * num_units * top_k / num_experts))


def capacity_keep_mask(
    top_k_index: torch.LongTensor, top_k_weights: torch.Tensor, num_experts: int, capacity: int, priority: str
) -> torch.Tensor:
    """Which (unit, choice) pairs fit in their expert's capacity: `(N, k)` bool.

    Pairs are admitted in V-MoE's order until an expert is full: all top-1 choices first, then all top-2 choices, and
    so on; within one choice rank, units in priority order: `"importance"` = descending top-1 gate value (Batch
    Priority Routing; ties by unit index), `"position"` = unit index. Vectorised: the position of each pair in its
    expert's queue is a cumulative count over the `k * N` pairs laid out in that order."""
    num_units, top_k = top_k_index.shape
    if priority == "importance":
        order = torch.sort(top_k_weights[:, 0].detach(), descending=True, stable=True).indices  # (N,)
    elif priority == "position":
        order = torch.arange(num_units, device=top_k_index.device)
    else:
        raise ValueError(f"capacity priority must be 'importance' or 'position', got {priority!r}.")
    queue = top_k_index[order].transpose(0, 1).reshape(-1)  # (k * N,) rank-major, units in priority order
    one_hot = F.one_hot(queue, num_experts)  # (k * N, E)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1)  # 1-based place of each pair in its expert's queue
    keep_in_order = (position <= capacity).view(top_k, num_units).transpose(0, 1)  # (N, k), rows in priority order
    keep = torch.empty_like(keep_in_order)
    keep[order] = keep_in_order
    return keep


def route(
    logits: torch.Tensor,
    top_k: int,
    noise: torch.Tensor | None = None,
    noise_std: float = 0.0,
    capacity_factor: float | None = None,
    priority: str = "importance",
) -> Routing:
    """`g(x) = TopK(softmax(W_g x + eps))` for `N` units; `logits = W_g x`: `(N, E)`; `noise = eps` `(N, E)` or None.

    Softmax and losses run in float32 whatever the logits' dtype (max subtraction inside `softmax`)."""
    num_experts = logits.shape[-1]
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    noisy_logits = logits + noise.float() if noise is not None else logits
    gates = noisy_logits.softmax(dim=-1) if noise is not None else probs
    top_k_weights, top_k_index = gates.topk(top_k, dim=-1)
    aux_loss = 0.5 * importance_loss(probs)
    if noise is not None and noise_std > 0:
        aux_loss = aux_loss + 0.5 * load_loss(logits, noisy_logits, noise_std, top_k)
    keep = None
    if capacity_factor is not None:
        capacity = expert_capacity(logits.shape[0], num_experts, top_k, capacity_factor)
        keep = capacity_keep_mask(top_k_index, top_k_weights, num_experts, capacity, priority)
    return Routing(probs, top_k_index, top_k_weights, keep, aux_loss)


def padded_experts_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.LongTensor,
    top_k_weights: torch.Tensor,
    up_proj: torch.Tensor,
    up_proj_bias: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_bias: torch.Tensor,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """`y_n = sum_j w_nj * (W2_e act(W1_e x_n + b1_e) + b2_e)` with `e = top_k_index[n, j]`, `w = top_k_weights`.

    GShard / V-MoE dispatch as dense batched matmuls (no loop over experts or units): the `S = N * k` (unit, expert)
    pairs are sorted by expert into a zero-padded `(E, M, d)` buffer (`M` = the most pairs any expert got), each
    expert runs as one slice of a `bmm`, and the outputs are gathered back, weighted and summed over the `k` choices.
    Every expert's weights enter the graph (an expert with no unit gets a zero gradient), so DDP never sees an
    unused parameter. Shapes: `hidden_states` `(N, d)`, `up_proj` `(E, h, d)`, `up_proj_bias` `(E, h)`, `down_proj`
    `(E, d, h)`, `down_proj_bias` `(E, d)`."""
    num_units, top_k = top_k_index.shape
    num_experts = up_proj.shape[0]
    expert_ids = top_k_index.reshape(-1)  # (S,)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    counts = torch.bincount(sorted_ids, minlength=num_experts)  # (E,)
    starts = counts.cumsum(0) - counts
    slot = torch.arange(sorted_ids.shape[0], device=sorted_ids.device) - starts[sorted_ids]  # place in its expert
    max_count = int(counts.max()) if sorted_ids.numel() else 0
    buffer = hidden_states.new_zeros(num_experts, max_count, hidden_states.shape[-1])
    buffer = buffer.index_put((sorted_ids, slot), hidden_states[perm // top_k])
    hidden = act_fn(torch.baddbmm(up_proj_bias.unsqueeze(1), buffer, up_proj.transpose(1, 2)))  # (E, M, h)
    out = torch.baddbmm(down_proj_bias.unsqueeze(1), hidden, down_proj.transpose(1, 2))  # (E, M, d)
    pair_out = out.new_empty(sorted_ids.shape[0], out.shape[-1])
    pair_out[perm] = out[sorted_ids, slot]  # back to (unit, choice) order
    weighted = pair_out * top_k_weights.reshape(-1, 1).to(pair_out.dtype)
    return weighted.view(num_units, top_k, -1).sum(dim=1).to(hidden_states.dtype)


__all__ = [
    "Routing",
    "capacity_keep_mask",
    "cv_squared",
    "expert_capacity",
    "importance_loss",
    "load_loss",
    "padded_experts_forward",
    "route",
]
