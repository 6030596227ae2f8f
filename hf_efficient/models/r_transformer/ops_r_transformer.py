"""The R-Transformer's LocalRNN and LayerNorm as pure tensor functions (equations and shapes in the docstrings).

LocalRNN (Wang et al. 2019, Sec. 3.1): for every position t, an RNN started from a zero state reads the window
`x[t-M+1], ..., x[t]` (zero vectors left of the sequence start) and the window's last hidden state is the output:

    h_t = RNN(x[t-M+1 .. t]),   RNN = GRU | LSTM | tanh-RNN with PyTorch's gate equations and weight layout.

`local_rnn` computes the input projections `W_ih x + b_ih` once per position, then runs the M-step recurrence for
all B x L windows at once: step k of window t reads the projection of position t - M + 1 + k, which for all windows
together is one slice of the projected sequence. The only loop is over the M window steps (a small constant), never
over positions.
"""

import torch
import torch.nn.functional as F

GATES = {"gru": 3, "lstm": 4, "rnn": 1}


def local_rnn(
    inputs: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    *,
    rnn_type: str,
    window: int,
) -> torch.Tensor:
    """LocalRNN over windows of `window` = M positions, input projections computed once per position.

    Args:
        inputs: `(B, M - 1 + L, d_in)`: the M - 1 inputs before the first output position (zeros at the sequence
            start, the cached inputs when decoding), then the L positions to compute.
        weight_ih: `(G d, d_in)`, weight_hh: `(G d, d)`, bias_ih / bias_hh: `(G d,)`, with G = 3 (GRU, gates r, z, n),
            4 (LSTM, gates i, f, g, o) or 1 (RNN), as `nn.GRU` / `nn.LSTM` / `nn.RNN`'s `*_l0` parameters.

    Returns:
        `(B, L, d)`: for each of the L positions, the last hidden state of the RNN run over its window from zero.

    With `P = W_ih x + b_ih` (computed once, `(B, M - 1 + L, G d)`) the windows' step-k input projections are
    `P[:, k : k + L]`, and each step is (GRU, as `nn.GRU`):

        r, z = sigmoid(P_r + W_hr h + b_hr), sigmoid(P_z + W_hz h + b_hz)
        n = tanh(P_n + r * (W_hn h + b_hn));   h = (1 - z) * n + z * h

    LSTM: `i, f, g, o = sigmoid, sigmoid, tanh, sigmoid(P + W_hh h + b_hh)`, `c = f c + i g`, `h = o tanh(c)`.
    RNN: `h = tanh(P + W_hh h + b_hh)`. At step 0, h = c = 0, so `W_hh h` is skipped. The biases of `W_hh` that add
    straight to the projections (all but GRU's b_hn) are folded into `P`.
    """
    if rnn_type not in GATES:
        raise ValueError(f"local_rnn: unknown rnn_type {rnn_type!r}; expected one of {tuple(GATES)}.")
    num_out = inputs.shape[1] - (window - 1)
    if num_out < 0:
        raise ValueError(f"local_rnn: inputs have {inputs.shape[1]} positions, fewer than window - 1 = {window - 1}.")
    batch_size, _, dim = inputs.shape
    hidden_size = weight_hh.shape[1]
    if rnn_type == "gru":
        # b_hr and b_hz add straight to the input projections; b_hn sits inside r * (W_hn h + b_hn).
        bias_in = bias_ih + torch.cat([bias_hh[: 2 * hidden_size], bias_hh.new_zeros(hidden_size)])
    else:
        bias_in = bias_ih + bias_hh
    projected = F.linear(inputs, weight_ih, bias_in)  # once per position: (B, M - 1 + L, G d)
    # One batched matmul with the accumulate fused in (baddbmm) per step: (B, L, d) x (d, G d), weight shared.
    weight_t = weight_hh.t().expand(batch_size, hidden_size, weight_hh.shape[0])
    hidden = cell = None
    for step in range(window):
        step_in = projected[:, step : step + num_out]
        if rnn_type == "gru":
            in_rz, in_n = step_in[..., : 2 * hidden_size], step_in[..., 2 * hidden_size :]
            hh_n = bias_hh[2 * hidden_size :]
            if hidden is not None:
                in_rz = torch.baddbmm(in_rz, hidden, weight_t[..., : 2 * hidden_size])
                hh_n = torch.baddbmm(hh_n, hidden, weight_t[..., 2 * hidden_size :])
            reset, update = torch.sigmoid(in_rz).chunk(2, dim=-1)
            new = torch.tanh(torch.addcmul(in_n, reset, hh_n))
            hidden = new - update * new if hidden is None else torch.lerp(new, hidden, update)
        else:
            gates = step_in if hidden is None else torch.baddbmm(step_in, hidden, weight_t)
            if rnn_type == "rnn":
                hidden = torch.tanh(gates)
                continue
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
            new_cell = torch.sigmoid(in_gate) * torch.tanh(candidate)
            cell = new_cell if cell is None else torch.addcmul(new_cell, torch.sigmoid(forget_gate), cell)
            hidden = torch.sigmoid(out_gate) * torch.tanh(cell)
    return hidden


def official_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The official R-Transformer LayerNorm: `weight * (x - mean) / (std + eps) + bias` over the last dim, with the
    *unbiased* std (divides by d - 1) and `eps` added to the std. Computed in float32, returned in `x`'s dtype."""
    dtype = x.dtype
    x = x.float()
    mean = x.mean(-1, keepdim=True)
    std = x.std(-1, keepdim=True)
    return (weight.float() * (x - mean) / (std + eps) + bias.float()).to(dtype)
