"""Naive references for the R-Transformer, written straight from the paper's definitions (loops, dense, obviously
correct): LocalRNN as one `nn.GRUCell` / `nn.LSTMCell` / `nn.RNNCell` run per position over its zero-padded window,
attention as a dense masked softmax per query, and the whole model from its parameters."""

import math

import torch
from torch import nn

CELLS = {"gru": nn.GRUCell, "lstm": nn.LSTMCell, "rnn": nn.RNNCell}


def make_cell(rnn: nn.Module, rnn_type: str, share: bool = False) -> nn.Module:
    """A cell with the same weights as the one-layer RNN module `rnn` (PyTorch's layouts agree): copies, or with
    `share` the very parameters (gradients then reach `rnn`'s)."""
    cell = CELLS[rnn_type](rnn.input_size, rnn.hidden_size).to(rnn.weight_ih_l0.dtype)
    if share:
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            setattr(cell, name, getattr(rnn, f"{name}_l0"))
        return cell
    with torch.no_grad():
        cell.weight_ih.copy_(rnn.weight_ih_l0)
        cell.weight_hh.copy_(rnn.weight_hh_l0)
        cell.bias_ih.copy_(rnn.bias_ih_l0)
        cell.bias_hh.copy_(rnn.bias_hh_l0)
    return cell


def local_rnn_reference(x, cell, rnn_type, window, token_mask=None):
    """h_t = last state of the cell run from zero over x[t-M+1], ..., x[t]; positions before 0 and padded positions
    (token_mask 0) are zero vectors. x: (B, L, d) -> (B, L, d)."""
    batch, length, dim = x.shape
    out = torch.zeros(batch, length, cell.hidden_size, dtype=x.dtype)
    for b in range(batch):
        for t in range(length):
            hidden = torch.zeros(1, cell.hidden_size, dtype=x.dtype)
            state = torch.zeros(1, cell.hidden_size, dtype=x.dtype)
            for s in range(t - window + 1, t + 1):
                real = s >= 0 and (token_mask is None or bool(token_mask[b, s]))
                step = x[b, s][None] if real else torch.zeros(1, dim, dtype=x.dtype)
                if rnn_type == "lstm":
                    hidden, state = cell(step, (hidden, state))
                else:
                    hidden = cell(step, hidden)
            out[b, t] = hidden[0]
    return out


def attention_reference(query, key, value, key_mask=None):
    """Causal multi-head attention per query: softmax_j(q_i . k_j / sqrt(d_h)) v_j over j <= i with key_mask[j] = 1
    (a query with no allowed key attends to itself). query/key/value: (B, h, L, d_h) -> (B, h, L, d_h)."""
    batch, heads, length, head_dim = query.shape
    out = torch.zeros_like(query)
    for b in range(batch):
        for i in range(length):
            allowed = [j for j in range(i + 1) if key_mask is None or bool(key_mask[b, j])] or [i]
            for h in range(heads):
                scores = torch.stack([query[b, h, i] @ key[b, h, j] / math.sqrt(head_dim) for j in allowed])
                probs = torch.softmax(scores, dim=0)
                out[b, h, i] = sum(p * value[b, h, j] for p, j in zip(probs, allowed))
    return out


def layer_norm_reference(x, weight, bias, eps, official):
    """Official: w (x - mean) / (unbiased std + eps) + b; standard: w (x - mean) / sqrt(biased var + eps) + b."""
    dim = x.shape[-1]
    mean = x.sum(-1, keepdim=True) / dim
    centred = x - mean
    if official:
        return weight * centred / ((centred.pow(2).sum(-1, keepdim=True) / (dim - 1)).sqrt() + eps) + bias
    return weight * centred / (centred.pow(2).sum(-1, keepdim=True) / dim + eps).sqrt() + bias


def model_reference(model, hidden_states, attention_mask=None):
    """The base model's blocks (eval mode) from its parameters: hidden_states (B, L, d) embeddings -> (B, L, d).
    Differentiable in every parameter of `model` (the cells share the LocalRNN's parameters)."""
    config = model.config
    heads = config.num_attention_heads

    def norm(module, x):
        return layer_norm_reference(x, module.weight, module.bias, config.layer_norm_eps, config.official_layer_norm)

    x = hidden_states
    batch, length, dim = x.shape
    for block in model.layers:
        for layer in block.rnn_layers:
            cell = make_cell(layer.local_rnn.rnn, config.rnn_type, share=True)
            x = x + local_rnn_reference(
                norm(layer.norm, x), cell, config.rnn_type, config.local_window, attention_mask
            )
        attn = block.attention
        y = norm(block.attention_norm, x)

        def split(t):
            return t.view(batch, length, heads, dim // heads).transpose(1, 2)

        q, k, v = split(attn.q_proj(y)), split(attn.k_proj(y)), split(attn.v_proj(y))
        attended = attention_reference(q, k, v, attention_mask).transpose(1, 2).reshape(batch, length, dim)
        x = x + attn.o_proj(attended)
        y = norm(block.ffn_norm, x)
        x = x + block.ffn.fc2(torch.relu(block.ffn.fc1(y)))
    return x
