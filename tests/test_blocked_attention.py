"""`blocked_attention_forward`: attention with dropout over query blocks (no `L x L` tensors kept for backward).

The naive references are `eager_attention_forward` (dropout 0, outputs and gradients), the same eager formula with
the blocked function's own dropout mask laid out densely (dropout > 0), and transformers' sdpa entry for the
sdpa-convention wrapper.
"""

import pytest
import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_efficient.models.shared import blocked_attention as ba
from hf_efficient.models.shared.blocked_attention import attention_interface, blocked_attention_forward
from hf_efficient.models.shared.common import eager_attention_forward
from tests.helpers import saved_for_backward


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, so every test crosses many block boundaries (and a ragged last block)."""
    monkeypatch.setattr(ba, "BLOCK_ELEMENTS", 2 * 3 * 3 * 19)


def _module(training: bool = False) -> nn.Module:
    module = nn.Module()
    module.train(training)
    return module


def _qkv(batch, heads, q_len, k_len, dim=8, dtype=torch.float32, seed=0, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, heads, q_len, dim), (batch, heads, k_len, dim), (batch, heads, k_len, dim))
    return [(torch.randn(s, generator=generator, dtype=torch.float64) * scale).to(dtype) for s in shapes]


def _masks(batch, heads, q_len, k_len):
    generator = torch.Generator().manual_seed(1)
    allowed = torch.rand(batch, 1, q_len, k_len, generator=generator) > 0.4
    allowed[0, 0, min(2, q_len - 1)] = False  # a row with every key masked
    padding = torch.ones(batch, 1, 1, k_len, dtype=torch.bool)
    padding[-1, ..., :3] = False  # left padding of the last sequence
    additive = torch.zeros(batch, heads, q_len, k_len).masked_fill(~allowed, torch.finfo(torch.float32).min)
    additive = additive + torch.randn(batch, heads, q_len, k_len, generator=generator)
    return {
        "none": (None, False),
        "causal": (None, True),
        "boolean": (allowed, False),
        "boolean_2d": (allowed[0, 0], False),  # broadcast from (Lq, T)
        "additive": (additive, False),
        "key_padding": (padding, False),
    }


CASES = [(2, 3, 13, 13), (2, 3, 7, 19), (1, 2, 1, 11), (2, 2, 17, 17)]  # Lq != T: queries after a cache


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", ["none", "causal", "boolean", "boolean_2d", "additive", "key_padding"])
def test_matches_eager_without_dropout(small_blocks, shape, mask_kind):
    batch, heads, q_len, k_len = shape
    mask, is_causal = _masks(batch, heads, q_len, k_len)[mask_kind]
    tensors = _qkv(batch, heads, q_len, k_len)
    grad_out = torch.randn(batch, q_len, heads, 8, generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (blocked_attention_forward, eager_attention_forward):
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        out, _ = fn(_module(), q, k, v, mask, 0.3, dropout=0.0, is_causal=is_causal)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)


def test_fully_masked_rows_match_eager_and_minus_inf_rows_give_zero(small_blocks):
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, 5, 9))
    allowed = torch.ones(1, 1, 5, 9, dtype=torch.bool)
    allowed[..., 1, :] = False
    out, _ = blocked_attention_forward(_module(), q, k, v, allowed, 0.5)
    torch.testing.assert_close(out[:, 1], v.mean(dim=2))  # eager's finfo.min fill: the values' mean
    additive = torch.zeros(1, 1, 5, 9).masked_fill(~allowed, float("-inf"))
    out, _ = blocked_attention_forward(_module(), q, k, v, additive, 0.5, dropout=0.2)
    assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (out, *grads))


def test_causal_rows_before_any_key_match_eager(small_blocks):
    """More queries than keys under `is_causal`: the first rows see no key (eager averages the values)."""
    tensors = _qkv(1, 2, 9, 4)
    results = []
    for fn in (blocked_attention_forward, eager_attention_forward):
        q, k, v = (t.clone().requires_grad_() for t in tensors)
        out, _ = fn(_module(), q, k, v, None, 0.4, is_causal=True)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _dense_dropout_reference(q, k, v, scaling, p, seed, is_causal):
    """Eager attention with the dropout mask the blocked function draws, laid out as one `(B, h, Lq, T)` mask."""
    plan = ba._Plan(q, k, None, is_causal)
    dropped = torch.zeros(q.shape[:3] + k.shape[2:3], dtype=torch.bool)
    threshold, keep_scale = ba._dropout_threshold(p)
    for index, start, end in plan.blocks():
        keys = plan.keys(end)
        shape = torch.Size(q.shape[:2] + (end - start, keys))
        dropped[:, :, start:end, :keys] = ba._drop_mask(shape, seed, index, threshold, q.device)
    scores = q @ k.transpose(2, 3) * scaling
    if is_causal:
        causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    probs = scores.softmax(dim=-1).masked_fill(dropped, 0.0) * keep_scale
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_matches_dense_reference_with_the_same_mask(small_blocks, is_causal):
    tensors = _qkv(2, 3, 11, 14, dtype=torch.float64)
    seed = 1234
    results = []
    q, k, v = (t.clone().requires_grad_() for t in tensors)
    out = ba._BlockedAttention.apply(q, k, v, None, 0.3, 0.25, is_causal, seed).transpose(1, 2)
    results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    q, k, v = (t.clone().requires_grad_() for t in tensors)
    out = _dense_dropout_reference(q, k, v, 0.3, 0.25, seed, is_causal)
    results.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_dropout_is_deterministic_under_a_fixed_seed(small_blocks):
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 10, 10))
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        out, _ = blocked_attention_forward(_module(True), q, k, v, None, 0.3, dropout=0.5, is_causal=True)
        runs.append((out, *torch.autograd.grad(out.sum(), (q, k, v))))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not torch.equal(runs[0][0], runs[2][0])
    no_dropout, _ = blocked_attention_forward(_module(True), q, k, v, None, 0.3, is_causal=True)
    assert not torch.allclose(runs[0][0], no_dropout)


@pytest.mark.parametrize("mask_kind", ["causal", "boolean", "additive"])
def test_dropout_gradcheck(small_blocks, mask_kind):
    """float64 gradcheck with a fixed seed: the backward must regenerate the forward's dropout mask."""
    batch, heads, q_len, k_len = 1, 2, 5, 7
    mask, is_causal = _masks(batch, heads, q_len, k_len)[mask_kind]
    if mask is not None and mask.dtype != torch.bool:
        # finfo.min absorbs every score of a fully masked row (a flat function, whose numerical gradient is 0 where
        # eager's analytical one is not): a finite -2e4 keeps the rows differentiable and still takes the path for
        # rows whose maximum is huge
        mask = torch.where(mask < -1e30, -2e4, mask).double()
    q, k, v = (t.requires_grad_() for t in _qkv(batch, heads, q_len, k_len, dim=4, dtype=torch.float64))

    def fn(q, k, v):
        return ba._BlockedAttention.apply(q, k, v, mask, 0.5, 0.3, is_causal, 99)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_in_expectation():
    """Over many seeds the mean output approaches the no-dropout output, and the dropped probability mass is ~p."""
    p = 0.3
    q, k, v = _qkv(1, 2, 6, 8)
    exact, _ = blocked_attention_forward(_module(), q, k, v, None, 0.5, is_causal=True)
    torch.manual_seed(0)
    runs = 2000
    mean = sum(blocked_attention_forward(_module(True), q, k, v, None, 0.5, p, True)[0] for _ in range(runs)) / runs
    # per element std of one run <= |v|max * sqrt(p / (1 - p)) ~ 3 * 0.65; of the mean / sqrt(2000) ~ 0.045
    assert (mean - exact).abs().max() < 0.15
    assert (mean - exact).abs().mean() < 0.03
    # with v = 1 every row's output is (kept mass) / (1 - p): its mean over rows and heads is 1 - dropped fraction
    torch.manual_seed(1)
    q, k, _ = _qkv(1, 4, 256, 256)
    ones = torch.ones(1, 4, 256, 8)
    out, _ = blocked_attention_forward(_module(True), q, k, ones, None, 0.5, p)
    dropped = 1 - (out[..., 0] * (1 - p)).mean()
    assert abs(dropped.item() - p) < 0.01  # std of the estimate ~ 0.001 here (1024 rows x 256 keys)


def test_dropout_probability_rounding():
    threshold, scale = ba._dropout_threshold(0.1)
    levels = threshold + (1 << 15)
    assert abs(levels / (1 << 16) - 0.1) <= 2**-17
    assert scale == pytest.approx(1 / (1 - levels / (1 << 16)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_stable(small_blocks, dtype):
    """Large scores (softmax max subtraction), low precision inputs: finite, and close to a float32 reference."""
    tensors = _qkv(2, 2, 12, 12, dtype=dtype, scale=6.0)
    mask, _ = _masks(2, 2, 12, 12)["boolean"]
    q, k, v = (t.clone().requires_grad_() for t in tensors)
    out, _ = blocked_attention_forward(_module(), q, k, v, mask, 0.35)
    grads = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    q32, k32, v32 = (t.float().requires_grad_() for t in tensors)
    want, _ = eager_attention_forward(_module(), q32, k32, v32, mask, 0.35)
    want_grads = torch.autograd.grad(want.sum(), (q32, k32, v32))
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
    for got, ref in zip(grads, want_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.float(), ref, atol=0.1 * ref.abs().max().item(), rtol=0.05)
    torch.manual_seed(0)
    out, _ = blocked_attention_forward(_module(True), q, k, v, mask, 0.35, dropout=0.1)
    assert all(torch.isfinite(t).all() for t in (out, *torch.autograd.grad(out.float().sum(), (q, k, v))))


def _saved_bytes(fn, length: int) -> int:
    q, k, v = (t.requires_grad_() for t in _qkv(1, 2, length, length, dim=16))
    torch.manual_seed(0)
    with saved_for_backward() as saved:
        out, _ = fn(_module(True), q, k, v, None, 0.25, dropout=0.1, is_causal=True)
    out.sum().backward()
    return sum(tensor.numel() * tensor.element_size() for tensor in saved)


def test_memory_saved_for_backward_grows_linearly():
    ratio = _saved_bytes(blocked_attention_forward, 1024) / _saved_bytes(blocked_attention_forward, 512)
    assert 1.8 < ratio < 2.2
    # the naive path keeps the L x L probabilities and mask: the measure can tell the two apart
    eager_ratio = _saved_bytes(eager_attention_forward, 1024) / _saved_bytes(eager_attention_forward, 512)
    assert eager_ratio > 3.5


def test_sdpa_convention_wrapper_matches_sdpa():
    """`is_causal` None reads `module.is_causal`, `scaling` None is d ** -0.5, as transformers' sdpa entry."""
    module = _module()
    module.is_causal = True
    q, k, v = _qkv(2, 2, 9, 9)
    want, _ = sdpa_attention_forward(module, q, k, v, None)
    got, _ = ba._blocked_sdpa_forward(module, q, k, v, None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    mask, _ = _masks(2, 2, 9, 9)["key_padding"]
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.2)
    got, _ = ba._blocked_sdpa_forward(module, q, k, v, mask, scaling=0.2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_attention_interface_selection():
    cpu = torch.zeros(1, 1, 2, 4)
    meta = torch.empty(1, 1, 2, 4, device="meta")  # stands for CUDA: any non-CPU device keeps sdpa
    assert attention_interface("sdpa", cpu, 0.1) is ba._blocked_sdpa_forward
    assert attention_interface("sdpa", cpu, 0.0) is sdpa_attention_forward
    assert attention_interface("sdpa", meta, 0.1) is sdpa_attention_forward
    assert attention_interface("eager", cpu, 0.1) is eager_attention_forward


def test_learned_additive_mask_gets_its_gradient():
    q, k, v = _qkv(1, 2, 5, 5)
    bias = torch.randn(1, 2, 5, 5, requires_grad=True)
    out, _ = blocked_attention_forward(_module(), q, k, v, bias, 0.5)
    (grad,) = torch.autograd.grad(out.sum(), bias)
    bias2 = bias.detach().clone().requires_grad_()
    want, _ = eager_attention_forward(_module(), q, k, v, bias2, 0.5)
    torch.testing.assert_close(grad, torch.autograd.grad(want.sum(), bias2)[0])


def test_r_transformer_trains_through_the_blocked_attention(monkeypatch):
    from hf_efficient.models.r_transformer import RTransformerConfig, RTransformerForCausalLM
    from hf_efficient.models.shared import blocked_attention as copy

    calls = []
    original = copy.blocked_attention_forward

    def spy(*args, **kwargs):
        calls.append(args[-1] if len(args) > 7 else kwargs.get("is_causal"))
        return original(*args, **kwargs)

    monkeypatch.setattr(copy, "blocked_attention_forward", spy)
    config = RTransformerConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, attn_implementation="sdpa"
    )
    model = RTransformerForCausalLM(config)
    input_ids = torch.randint(2, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(2):
        torch.manual_seed(3)
        model.train()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        losses.append(loss.detach())
    assert calls == [True, True, True, True]  # 2 layers x 2 steps, causal through sdpa's `module.is_causal`
    assert torch.equal(losses[0], losses[1]) and torch.isfinite(losses[0])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    model.eval()  # no dropout: sdpa as before
    model(input_ids=input_ids)
    config._attn_implementation = "eager"  # eager stays eager, dropout included
    RTransformerForCausalLM(config).train()(input_ids=input_ids)
    assert len(calls) == 4
