"""The R-Transformer's LocalRNN and LayerNorm as pure tensor functions (equations and shapes in the docstrings).

LocalRNN (Wang et al. 2019, Sec. 3.1): for every position t, an RNN started from a zero state reads the window
`x[t-M+1], ..., x[t]` (zero vectors left of the sequence start) and the window's last hidden state is the output:

    h_t = RNN(x[t-M+1 .. t]),   RNN = GRU | LSTM | tanh-RNN with PyTorch's gate equations and weight layout.

`local_rnn` computes the input projections `W_ih x + b_ih` once per position, then runs the M-step recurrence for
all B x L windows at once: step k of window t reads the projection of position t - M + 1 + k, which for all windows
together is one slice of the projected sequence. The only loop is over the M window steps (a small constant), never
over positions.

Training memory: autograd through the M steps would keep every step's gates, O(L M d) floats per layer. With
autograd on, `local_rnn` runs as one autograd Function (`_LocalRNN`) with a hand-written backward through the M steps
instead. A call of at most `segment` positions keeps its steps' tensors from the forward (no recomputation); a longer
one saves only its inputs and, in the backward, recomputes the steps of one segment of positions at a time, so the
live activations are O(segment M d) + O(L d) instead of O(L M d), for about one extra forward of the LocalRNN.
"""

import torch
import torch.nn.functional as F

# The LocalRNN cell types and their gate count G (weights `(G d, d)` in the `nn.GRU` / `nn.LSTM` / `nn.RNN` layout):
# the one statement of both; the configuration's `RNN_TYPES` and the converter read it.
GATES = {"gru": 3, "lstm": 4, "rnn": 1}
# Positions (per batch row) beyond which the LocalRNN's backward recomputes its steps segment by segment instead of
# keeping them from the forward. Shorter calls (the common 1k training contexts) pay no recomputation.
SEGMENT_POSITIONS = 1024


def _folded_input_bias(bias_ih: torch.Tensor, bias_hh: torch.Tensor, rnn_type: str, hidden_size: int):
    """`bias_ih` plus the hidden biases that add straight to the input projections (all but GRU's `b_hn`)."""
    if rnn_type == "gru":
        # b_hr and b_hz add straight to the input projections; b_hn sits inside r * (W_hn h + b_hn).
        return bias_ih + torch.cat([bias_hh[: 2 * hidden_size], bias_hh.new_zeros(hidden_size)])
    return bias_ih + bias_hh


def _recurrence(projected, weight_hh, bias_hh, *, rnn_type, window, num_out, keep):
    """The M window steps over all windows at once, from the input projections `projected` `(B, M - 1 + L, G d)`
    (folded biases included). Returns the last hidden states `(B, L, d)` and, when `keep`, per step the tensors the
    backward (`_recurrence_backward`) reads: GRU `(h, r|z, n, W_hn h + b_hn)`, LSTM `(h, i|f|g|o activated, c)`,
    RNN `(h,)`, with `h` the step's output state."""
    batch_size = projected.shape[0]
    hidden_size = weight_hh.shape[1]
    # One batched matmul with the accumulate fused in (baddbmm) per step: (B, L, d) x (d, G d), weight shared.
    weight_t = weight_hh.t().expand(batch_size, hidden_size, weight_hh.shape[0])
    hidden = cell = None
    saved = []
    # Without autograd recording (inference, and inside `_LocalRNN`), fresh step results are overwritten in place
    # (fewer allocations; the same numbers).
    in_place = not torch.is_grad_enabled()
    for step in range(window):
        step_in = projected[:, step : step + num_out]
        if rnn_type == "gru":
            in_rz, in_n = step_in[..., : 2 * hidden_size], step_in[..., 2 * hidden_size :]
            hh_n = bias_hh[2 * hidden_size :]
            if hidden is not None:
                in_rz = torch.baddbmm(in_rz, hidden, weight_t[..., : 2 * hidden_size])
                hh_n = torch.baddbmm(hh_n, hidden, weight_t[..., 2 * hidden_size :])
            # in_rz is a fresh matmul output after step 0 (a view of `projected` at step 0)
            in_place_rz = in_place and hidden is not None
            reset_update = in_rz.sigmoid_() if in_place_rz else torch.sigmoid(in_rz)
            reset, update = reset_update.chunk(2, dim=-1)
            new = torch.addcmul(in_n, reset, hh_n)
            new = new.tanh_() if in_place else torch.tanh(new)
            if hidden is None:
                hidden = new - update * new
            elif in_place and not keep:
                hidden = new.lerp_(hidden, update)
            else:
                hidden = torch.lerp(new, hidden, update)
            if keep:
                saved.append((hidden, reset_update, new, hh_n))
            continue
        gates = step_in if hidden is None else torch.baddbmm(step_in, hidden, weight_t)
        if rnn_type == "rnn":
            hidden = gates.tanh_() if in_place and hidden is not None else torch.tanh(gates)
            if keep:
                saved.append((hidden,))
            continue
        if in_place:  # the activated gates in one tensor (kept for the backward when `keep`)
            gates = gates if hidden is not None else gates.clone()  # step 0: `gates` is a view of `projected`
            gates[..., : 2 * hidden_size].sigmoid_()
            gates[..., 2 * hidden_size : 3 * hidden_size].tanh_()
            gates[..., 3 * hidden_size :].sigmoid_()
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
            new_cell = in_gate * candidate
            cell = new_cell if cell is None else new_cell.addcmul_(forget_gate, cell)
            hidden = torch.tanh(cell).mul_(out_gate)
            if keep:
                saved.append((hidden, gates, cell))
            continue
        in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
        if keep:  # the activated gates in one tensor, for the backward
            gates = torch.cat(
                [torch.sigmoid(gates[..., : 2 * hidden_size]), torch.tanh(candidate), torch.sigmoid(out_gate)], -1
            )
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
            new_cell = in_gate * candidate
            cell = new_cell if cell is None else torch.addcmul(new_cell, forget_gate, cell)
            hidden = out_gate * torch.tanh(cell)
            saved.append((hidden, gates, cell))
            continue
        new_cell = torch.sigmoid(in_gate) * torch.tanh(candidate)
        cell = new_cell if cell is None else torch.addcmul(new_cell, torch.sigmoid(forget_gate), cell)
        hidden = torch.sigmoid(out_gate) * torch.tanh(cell)
    return hidden, saved


def _recurrence_backward(saved, grad_hidden, weight_hh, *, rnn_type, num_out, grad_projected, grad_weight_hh):
    """Backward of `_recurrence` from its kept tensors `saved` and `grad_hidden` `(B, L, d)` (the loss gradient of
    the last states). Accumulates into `grad_projected` `(B, M - 1 + L, G d)` and `grad_weight_hh` `(G d, d)`
    (float32) and returns the gradient of GRU's `b_hn` `(d,)` (float32; None for LSTM / RNN).

    Per step k, from the last to the first, with g = dL/dh_k and h_{k-1} the previous state (0 at k = 0):
      GRU   h = n + z (h_{k-1} - n):  dn = g (1 - z), dz = g (h_{k-1} - n), da_n = dn (1 - n^2),
            da_r = da_n (W_hn h_{k-1} + b_hn) r (1 - r), da_z = dz z (1 - z), d(W_hn h + b_hn) = da_n r,
            dh_{k-1} = g z + [da_r, da_z, da_n r] W_hh.
      LSTM  h = o tanh(c), c = f c_{k-1} + i g~:  dc += g o (1 - tanh(c)^2), do = g tanh(c), di = dc g~, df =
            dc c_{k-1}, dg~ = dc i, dc_{k-1} = dc f; pre-activation gradients through sigmoid / tanh;
            dh_{k-1} = da W_hh.
      RNN   h = tanh(a):  da = g (1 - h^2), dh_{k-1} = da W_hh.
    The pre-activation gradients da add into `grad_projected[:, k : k + L]` (step k's slice), and `da^T h_{k-1}`
    into `grad_weight_hh`.
    """
    hidden_size = weight_hh.shape[1]
    grad_b_hn = grad_hidden.new_zeros(hidden_size, dtype=torch.float32) if rnn_type == "gru" else None
    grad_cell = grad_hh = None
    for step in range(len(saved) - 1, -1, -1):
        prev = saved[step - 1][0] if step > 0 else None
        if rnn_type == "gru":
            _, reset_update, new, hh_n = saved[step]
            reset, update = reset_update.chunk(2, dim=-1)
            # One buffer for [da_r, da_z, d(W_hn h + b_hn)], reused by every step and filled through in-place ops on
            # its slices (no `out=` into non-contiguous views, which torch.compile does not trace).
            if grad_hh is None:
                grad_hh = reset_update.new_empty(*reset_update.shape[:-1], 3 * hidden_size)
            grad_rz, grad_hh_n = grad_hh[..., : 2 * hidden_size], grad_hh[..., 2 * hidden_size :]
            grad_a_n = torch.addcmul(grad_hidden, grad_hidden, update, value=-1)  # dn = g (1 - z)
            grad_a_n.addcmul_(grad_a_n, new * new, value=-1)  # da_n = dn (1 - n^2)
            grad_rz[..., :hidden_size].copy_(grad_a_n).mul_(hh_n)  # dr
            if prev is None:
                grad_rz[..., hidden_size:].copy_(grad_hidden).mul_(new).neg_()  # dz = g (0 - n)
            else:
                grad_rz[..., hidden_size:].copy_(prev).sub_(new).mul_(grad_hidden)  # dz = g (h_prev - n)
            grad_rz.mul_(reset_update)  # times sigmoid' = s (1 - s), in place
            grad_rz.addcmul_(grad_rz, reset_update, value=-1)
            grad_hh_n.copy_(grad_a_n).mul_(reset)
            grad_b_hn += grad_hh_n.sum(dim=(0, 1), dtype=torch.float32)
            grad_step = grad_projected[:, step : step + num_out]
            grad_step[..., : 2 * hidden_size] += grad_rz
            grad_step[..., 2 * hidden_size :] += grad_a_n
            if prev is None:
                break
            grad_hidden = (grad_hh @ weight_hh).addcmul_(grad_hidden, update)
        elif rnn_type == "rnn":
            hidden = saved[step][0]
            grad_hh = grad_gates = (hidden * hidden).neg_().add_(1).mul_(grad_hidden)  # g (1 - h^2)
            grad_projected[:, step : step + num_out] += grad_gates
            if prev is None:
                break
            grad_hidden = grad_hh @ weight_hh
        else:
            _, gates, cell = saved[step]
            in_gate, forget_gate, candidate, out_gate = gates.chunk(4, dim=-1)
            if grad_hh is None:  # one buffer for the gates' pre-activation gradients [di, df, dg~, do], reused
                grad_hh = gates.new_empty(gates.shape)
            grad_in, grad_forget, grad_candidate, grad_out = grad_hh.chunk(4, dim=-1)
            tanh_cell = torch.tanh(cell)
            grad_out.copy_(grad_hidden).mul_(tanh_cell)  # do = g tanh(c)
            # dc = g o (1 - tanh(c)^2) + the carried dc, in place on the fresh tanh(c)
            grad_c = tanh_cell.mul_(tanh_cell).neg_().add_(1).mul_(out_gate).mul_(grad_hidden)
            if grad_cell is not None:
                grad_c += grad_cell
            grad_in.copy_(grad_c).mul_(candidate)  # di = dc g~
            if step > 0:
                grad_forget.copy_(grad_c).mul_(saved[step - 1][2])  # df = dc c_{k-1}
            else:
                grad_forget.zero_()  # c_{-1} = 0
            grad_candidate.copy_(grad_c).mul_(in_gate)  # dg~ = dc i
            # through the activations: sigmoid' = s (1 - s) for i, f, o; tanh' = 1 - t^2 for g~
            sig_if, grad_if = gates[..., : 2 * hidden_size], grad_hh[..., : 2 * hidden_size]
            grad_if.mul_(sig_if)
            grad_if.addcmul_(grad_if, sig_if, value=-1)
            grad_candidate.addcmul_(grad_candidate, candidate * candidate, value=-1)
            grad_out.mul_(out_gate)
            grad_out.addcmul_(grad_out, out_gate, value=-1)
            grad_projected[:, step : step + num_out] += grad_hh
            if prev is None:
                break
            grad_cell = grad_c.mul_(forget_gate)  # dc_{k-1} = dc f
            grad_hidden = grad_hh @ weight_hh
        grad_weight_hh.addmm_(
            grad_hh.reshape(-1, grad_hh.shape[-1]).t().float(), prev.reshape(-1, hidden_size).float()
        )
    return grad_b_hn


class _LocalRNN(torch.autograd.Function):
    """`local_rnn` with autograd: a hand-written backward through the M steps (`_recurrence_backward`). Calls of at
    most `segment` positions keep the steps' tensors from the forward; longer ones keep only the inputs and
    recompute the steps of one segment of positions at a time in the backward (the outputs are the same either
    way: the forward runs the same `_recurrence` per segment)."""

    @staticmethod
    def forward(ctx, inputs, weight_ih, weight_hh, bias_ih, bias_hh, rnn_type, window, segment):
        num_out = inputs.shape[1] - (window - 1)
        hidden_size = weight_hh.shape[1]
        bias_in = _folded_input_bias(bias_ih, bias_hh, rnn_type, hidden_size)
        if isinstance(num_out, torch.SymInt):
            # A symbolic length (torch.export / compile with a dynamic length): one piece, so that the graph does not
            # specialise on the length (a Python loop over segments would); the steps are kept.
            one_piece, bounds = True, [(0, num_out)]
        else:
            one_piece = num_out <= segment
            bounds = [(start, min(start + segment, num_out)) for start in range(0, num_out, segment)]
        outputs = []
        saved = None
        for start, stop in bounds:
            projected = F.linear(inputs[:, start : stop + window - 1], weight_ih, bias_in)
            hidden, saved = _recurrence(
                projected, weight_hh, bias_hh, rnn_type=rnn_type, window=window, num_out=stop - start, keep=one_piece
            )
            outputs.append(hidden)
        # The kept steps go through save_for_backward too, so that an outer checkpoint can drop and recompute them.
        ctx.config = (rnn_type, window, segment, len(saved[0]) if one_piece else 0)
        steps = [tensor for step in saved for tensor in step] if one_piece else []
        ctx.save_for_backward(inputs, weight_ih, weight_hh, bias_ih, bias_hh, *steps)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        inputs, weight_ih, weight_hh, bias_ih, bias_hh, *steps = ctx.saved_tensors
        rnn_type, window, segment, per_step = ctx.config
        kept = [tuple(steps[i : i + per_step]) for i in range(0, len(steps), per_step)] if per_step else None
        num_out = grad_output.shape[1]
        hidden_size = weight_hh.shape[1]
        bias_in = _folded_input_bias(bias_ih, bias_hh, rnn_type, hidden_size)
        grad_inputs = torch.zeros_like(inputs)
        grad_weight_ih = torch.zeros(weight_ih.shape, dtype=torch.float32, device=inputs.device)
        grad_weight_hh = torch.zeros(weight_hh.shape, dtype=torch.float32, device=inputs.device)
        grad_bias_in = torch.zeros(bias_ih.shape, dtype=torch.float32, device=inputs.device)
        grad_b_hn = None
        for start in range(0, num_out, segment):
            stop = min(start + segment, num_out)
            segment_inputs = inputs[:, start : stop + window - 1]
            saved, kept = kept, None
            if saved is None:  # recompute this segment's steps
                projected = F.linear(segment_inputs, weight_ih, bias_in)
                saved = _recurrence(
                    projected, weight_hh, bias_hh, rnn_type=rnn_type, window=window, num_out=stop - start, keep=True
                )[1]
                del projected
            grad_projected = inputs.new_zeros(segment_inputs.shape[:2] + (weight_ih.shape[0],))
            segment_b_hn = _recurrence_backward(
                saved,
                grad_output[:, start:stop],
                weight_hh,
                rnn_type=rnn_type,
                num_out=stop - start,
                grad_projected=grad_projected,
                grad_weight_hh=grad_weight_hh,
            )
            del saved
            grad_b_hn = segment_b_hn if grad_b_hn is None else grad_b_hn + segment_b_hn
            grad_inputs[:, start : stop + window - 1] += grad_projected @ weight_ih
            flat = grad_projected.reshape(-1, grad_projected.shape[-1])
            grad_weight_ih.addmm_(flat.t().float(), segment_inputs.reshape(-1, inputs.shape[-1]).float())
            grad_bias_in += flat.sum(0, dtype=torch.float32)
        if rnn_type == "gru":
            grad_bias_hh = torch.cat([grad_bias_in[: 2 * hidden_size], grad_b_hn])
        else:
            grad_bias_hh = grad_bias_in
        return (
            grad_inputs,
            grad_weight_ih.to(weight_ih.dtype),
            grad_weight_hh.to(weight_hh.dtype),
            grad_bias_in.to(bias_ih.dtype),
            grad_bias_hh.to(bias_hh.dtype),
            None,
            None,
            None,
        )


def local_rnn(
    inputs: torch.Tensor,
    weight_ih: torch.Tensor,
    weight_hh: torch.Tensor,
    bias_ih: torch.Tensor,
    bias_hh: torch.Tensor,
    *,
    rnn_type: str,
    window: int,
    segment: int | None = None,
) -> torch.Tensor:
    """LocalRNN over windows of `window` = M positions, input projections computed once per position.

    Args:
        inputs: `(B, M - 1 + L, d_in)`: the M - 1 inputs before the first output position (zeros at the sequence
            start, the cached inputs when decoding), then the L positions to compute.
        weight_ih: `(G d, d_in)`, weight_hh: `(G d, d)`, bias_ih / bias_hh: `(G d,)`, with G = 3 (GRU, gates r, z, n),
            4 (LSTM, gates i, f, g, o) or 1 (RNN), as `nn.GRU` / `nn.LSTM` / `nn.RNN`'s `*_l0` parameters.
        segment: with autograd on, a call of more than `segment` positions (default `SEGMENT_POSITIONS`) recomputes
            its steps in the backward, `segment` positions at a time (training memory O(segment M d) instead of
            O(L M d)); same outputs and gradients.

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
    segment = SEGMENT_POSITIONS if segment is None else segment
    if not isinstance(segment, int) or isinstance(segment, bool) or segment < 1:
        raise ValueError(f"local_rnn: segment must be a positive int, got {segment!r}.")
    tensors = (inputs, weight_ih, weight_hh, bias_ih, bias_hh)
    if num_out > 0 and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LocalRNN.apply(*tensors, rnn_type, window, segment)
    hidden_size = weight_hh.shape[1]
    projected = F.linear(inputs, weight_ih, _folded_input_bias(bias_ih, bias_hh, rnn_type, hidden_size))
    return _recurrence(projected, weight_hh, bias_hh, rnn_type=rnn_type, window=window, num_out=num_out, keep=False)[0]


class _OfficialLayerNorm(torch.autograd.Function):
    """`official_layer_norm` with a hand-written backward that keeps the input and the per-row mean and std (two
    floats per row) instead of autograd's float32 intermediates (the centred input, its scaled copy, ...).

    With c = x - mean, s = sqrt(sum c^2 / (d - 1)), D = s + eps and g = dL/dy * w:
        dL/dw = sum_rows dL/dy * c / D,   dL/db = sum_rows dL/dy,
        dc = g / D - (sum g c) / D^2 * c / ((d - 1) s),   dL/dx = dc - mean(dc)
    (the second term of dc is the path through s; it is 0 where s = 0, i.e. where c = 0)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        output, mean, std = _official_layer_norm(x, weight, bias, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, weight, mean, std)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        x, weight, mean, std = ctx.saved_tensors
        dim = x.shape[-1]
        denom = std + ctx.eps
        centred = x.float() - mean
        grad_output = grad_output.float()
        grad_norm = grad_output * weight.float()
        grad_weight = (grad_output * centred / denom).reshape(-1, dim).sum(0)
        grad_bias = grad_output.reshape(-1, dim).sum(0)
        through_std = (grad_norm * centred).sum(-1, keepdim=True) / (denom * denom * (dim - 1) * std)
        through_std = torch.where(std > 0, through_std, 0.0)
        grad_centred = grad_norm.div_(denom).sub_(centred.mul_(through_std))
        grad_x = grad_centred - grad_centred.mean(-1, keepdim=True)
        return grad_x.to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(weight.dtype), None


def official_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The official R-Transformer LayerNorm: `weight * (x - mean) / (std + eps) + bias` over the last dim, with the
    *unbiased* std (divides by d - 1) and `eps` added to the std. Computed in float32, returned in `x`'s dtype; with
    autograd on, through `_OfficialLayerNorm` (keeps the input and two floats per row)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return _OfficialLayerNorm.apply(x, weight, bias, eps)
    return _official_layer_norm(x, weight, bias, eps)[0]


def _official_layer_norm(x, weight, bias, eps):
    """The official LayerNorm's output (in `x`'s dtype) and its float32 per-row mean and unbiased std.

    The std is the two-pass `sqrt(sum (x - mean)^2 / (d - 1))` on the centred rows, which are needed anyway
    (`Tensor.std` over the last dim measured about 20x slower than these elementwise passes on CPU)."""
    x32 = x.float()
    mean = x32.mean(-1, keepdim=True)
    centred = x32 - mean
    std = centred.square().sum(-1, keepdim=True).div_(x.shape[-1] - 1).sqrt_()
    return torch.addcmul(bias.float(), centred.div_(std + eps), weight.float()).to(x.dtype), mean, std
