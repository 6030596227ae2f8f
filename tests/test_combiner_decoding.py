"""Combiner chunked decoding (`combiner_chunk_step`): continuing a filled state with several tokens per sample at
once equals the full causal op at every valid position, and leaves the same state as one `combiner_step` per token."""

import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import set_seed

import hf_efficient
from hf_efficient.models.combiner import CombinerForCausalLM
from hf_efficient.models.combiner.decoding_combiner import combiner_chunk_step, combiner_prefill_state, combiner_step
from hf_efficient.models.combiner.ops_combiner import COMBINER_TYPES, combiner_attention
from tests import helpers
from tests.model_tester import run_without_package
from tests.test_combiner_ops import BLOCK, DIM, HEADS, axial_keys

BATCH = 3
PREFIX_LENGTHS = [5, 9, 1]  # per-sample prompt lengths (real tokens first), in a prompt tensor of 9 positions


def chunk_plan():
    """Chunk sizes and validity: single tokens, small chunks, chunks crossing several segments / rows / dyadic
    levels, padding in the middle, and a chunk in which sample 2 has no valid token at all."""
    plan = []
    for size, holes in (
        (1, {}),
        (3, {1: [1]}),
        (2 * BLOCK + 3, {0: [2, 7], 2: [0, 5, 6]}),
        (1, {1: [0]}),
        (4, {2: "all"}),
        (3 * BLOCK + 5, {1: [3, 4, 5, 12]}),
        (2, {}),
        (17, {0: [16]}),
    ):
        valid = torch.ones(BATCH, size, dtype=torch.bool)
        for sample, where in holes.items():
            valid[sample, slice(None) if where == "all" else where] = False
        plan.append(valid)
    return plan


class Stream:
    """Every sample's token stream (q, k, v and Axial's x at each of its positions), the full causal op over it, and
    the chunks cut from it (padding tokens get unrelated random junk)."""

    def __init__(self, variant, span_summary, plans, seed=11):
        generator = torch.Generator().manual_seed(seed)
        total = max(PREFIX_LENGTHS) + sum(plan.shape[1] for plan in plans)
        self.q, self.k, self.v = (torch.randn(BATCH, HEADS, total, DIM, generator=generator) for _ in range(3))
        self.kwargs = dict(combiner_type=variant, block_size=BLOCK, span_summary=span_summary)
        self.hidden = None
        if variant == "axial":
            self.kwargs["abstraction_key_fn"], _ = axial_keys(total)
            self.hidden = torch.randn(BATCH, total, HEADS * DIM, generator=generator)
        self.full = combiner_attention(self.q, self.k, self.v, causal=True, hidden_states=self.hidden, **self.kwargs)
        self.generator = generator

    def prefill(self):
        prefix = max(PREFIX_LENGTHS)
        return combiner_prefill_state(
            self.q[:, :, :prefix],
            self.k[:, :, :prefix],
            self.v[:, :, :prefix],
            torch.tensor(PREFIX_LENGTHS),
            hidden_states=None if self.hidden is None else self.hidden[:, :prefix],
            **self.kwargs,
        )

    def chunk(self, position, valid):
        """The chunk's tensors `(B, H, T, .)`, `(B, T, d)` and its tokens' positions `(B, T)` (-1 for padding)."""
        at = position[:, None] + valid.long().cumsum(1) - 1
        at = torch.where(valid, at, torch.full_like(at, -1))
        rows = torch.arange(BATCH)[:, None]
        safe = at.clamp(min=0)
        tensors = []
        for t in (self.q, self.k, self.v):
            taken = t[rows, :, safe].transpose(1, 2)  # (B, H, T, D)
            junk = torch.randn(taken.shape, generator=self.generator)
            tensors.append(torch.where(valid[:, None, :, None], taken, junk))
        hidden = None
        if self.hidden is not None:
            junk = torch.randn(self.hidden[rows, safe].shape, generator=self.generator)
            hidden = torch.where(valid[..., None], self.hidden[rows, safe], junk)
        return (*tensors, hidden), at


def assert_states_equal(got, expected):
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape, (name, got[name].shape, expected[name].shape)
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-5, msg=name)


def run_chunks(stream, plans, state, position, check_state=True):
    """Continue `state` with every chunk of `plans` at once, checking each chunk's outputs against the full op and
    (check_state) the state against one `combiner_step` per token from the same start."""
    rows = torch.arange(BATCH)[:, None]
    for valid in plans:
        (q, k, v, hidden), at = stream.chunk(position, valid)
        stepped = {name: t.clone() for name, t in state.items()}  # the steps update their state in place
        out, state = combiner_chunk_step(q, k, v, state, valid=valid, hidden_states=hidden, **stream.kwargs)
        assert out.shape == (BATCH, HEADS, valid.shape[1], DIM) and torch.isfinite(out).all()
        expected = stream.full[rows, :, at.clamp(min=0)].transpose(1, 2)  # (B, H, T, D)
        mask = valid[:, None, :, None].expand_as(out)
        torch.testing.assert_close(out[mask], expected[mask], rtol=0, atol=1e-5)
        if check_state:
            for t in range(valid.shape[1]):
                _, stepped = combiner_step(
                    q[:, :, t],
                    k[:, :, t],
                    v[:, :, t],
                    stepped,
                    valid=valid[:, t],
                    hidden_states=None if hidden is None else hidden[:, t],
                    **stream.kwargs,
                )
            assert_states_equal(state, stepped)
        position = position + valid.long().sum(1)
        assert state["length"].tolist() == position.tolist()
    return state, position


@pytest.mark.parametrize("variant", COMBINER_TYPES)
@pytest.mark.parametrize("span_summary", ["max", "mean"])
def test_chunks_equal_full_causal_op_and_single_steps(variant, span_summary):
    plans = chunk_plan()
    stream = Stream(variant, span_summary, plans)
    with torch.no_grad():
        run_chunks(stream, plans, stream.prefill(), torch.tensor(PREFIX_LENGTHS))


@pytest.mark.parametrize("variant", COMBINER_TYPES)
def test_chunk_then_single_steps_equal_full_causal_op(variant):
    """A long chunk, then single `combiner_step`s from its state: every output equals the full op."""
    plans = [torch.ones(BATCH, 2 * BLOCK + 3, dtype=torch.bool)]
    plans[0][1, 4] = False
    stream = Stream(variant, "max", plans + [torch.ones(BATCH, 9, dtype=torch.bool)], seed=5)
    rows = torch.arange(BATCH)
    with torch.no_grad():
        state, position = run_chunks(stream, plans, stream.prefill(), torch.tensor(PREFIX_LENGTHS), False)
        for _ in range(9):
            out, state = combiner_step(
                stream.q[rows, :, position],
                stream.k[rows, :, position],
                stream.v[rows, :, position],
                state,
                hidden_states=None if stream.hidden is None else stream.hidden[rows, position],
                **stream.kwargs,
            )
            torch.testing.assert_close(out, stream.full[rows, :, position], rtol=0, atol=1e-5)
            position = position + 1


@pytest.mark.parametrize("variant", COMBINER_TYPES)
def test_chunk_with_gradients_matches_no_grad(variant):
    """The chunk also runs under autograd (buffers written out of place) with the same outputs, and gradients flow."""
    plans = [torch.ones(BATCH, 2 * BLOCK + 3, dtype=torch.bool)]
    stream = Stream(variant, "mean", plans, seed=2)
    (q, k, v, hidden), _ = stream.chunk(torch.tensor(PREFIX_LENGTHS), plans[0])
    with torch.no_grad():
        expected, _ = combiner_chunk_step(
            q, k, v, stream.prefill(), valid=plans[0], hidden_states=hidden, **stream.kwargs
        )
    q = q.clone().requires_grad_()
    out, _ = combiner_chunk_step(q, k, v, stream.prefill(), valid=plans[0], hidden_states=hidden, **stream.kwargs)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("variant", COMBINER_TYPES)
def test_chunk_has_no_loop_over_tokens(variant):
    """The number of kernels a chunk runs does not grow with its length (a loop over positions would make a 64-token
    chunk run ~8x the kernels of an 8-token one)."""
    length, block = 256, 16
    q, k, v = (torch.randn(1, 2, length + 64, 8) for _ in range(3))
    extra = {"abstraction_key_fn": lambda a, x: torch.tanh(a)} if variant == "axial" else {}
    hidden = torch.randn(1, length + 64, 8)
    counts = {}
    for size in (8, 64):
        state = combiner_prefill_state(
            q[:, :, :length],
            k[:, :, :length],
            v[:, :, :length],
            torch.tensor([length - 3]),  # the chunk starts inside a segment / row
            combiner_type=variant,
            block_size=block,
            hidden_states=hidden[:, :length],
            **extra,
        )
        new = slice(length, length + size)
        with torch.no_grad(), OpCount() as probe:
            combiner_chunk_step(
                q[:, :, new],
                k[:, :, new],
                v[:, :, new],
                state,
                combiner_type=variant,
                block_size=block,
                hidden_states=hidden[:, new],
                **extra,
            )
        counts[size] = probe.count
    assert counts[64] < 1.5 * counts[8], counts


# ---------------------------------------------------------------------- the model
def tiny_config(combiner_type):
    return helpers.tiny_config("combiner", combiner_type=combiner_type, max_position_embeddings=64)


@pytest.mark.parametrize("combiner_type", COMBINER_TYPES)
def test_model_chunked_continuation_equals_full_forward(combiner_type):
    """A left-padded prompt, then chunks of 5, 1, 11 and 7 tokens through `CombinerForCausalLM` (padding in the
    middle of some, one chunk all padding for sample 1): the logits of every real token equal one full forward."""
    set_seed(0)
    model = CombinerForCausalLM(tiny_config(combiner_type)).eval()
    sizes = [6, 5, 1, 11, 7]
    ids = torch.randint(3, 64, (2, sum(sizes)))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding of the prompt
    mask[1, 8] = 0  # padding inside chunks
    mask[0, 13:16] = 0
    mask[1, 12] = 0  # sample 1's single-token chunk is padding
    mask[1, 20] = 0
    mask[0, 28] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache, start = None, 0
        for size in sizes:
            stop = start + size
            out = model(ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache, use_cache=True)
            keep = mask[:, start:stop].bool()
            torch.testing.assert_close(out.logits[keep], full[:, start:stop][keep], rtol=0, atol=1e-4)
            cache, start = out.cache, stop
    assert cache.get_seq_length() == ids.shape[1]


def test_remote_code_checkpoint_continues_with_chunks(tmp_path):
    """A checkpoint saved with its code carries `decoding_combiner.py`: loaded with trust_remote_code where
    hf_efficient cannot be imported, a chunked continuation gives the in-package model's logits."""
    set_seed(0)
    model = CombinerForCausalLM(tiny_config("mixture")).eval()
    folder = hf_efficient.save_pretrained_with_code(model, tmp_path / "model")
    assert (folder / "decoding_combiner.py").is_file()
    ids = torch.randint(3, 64, (2, 19))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        first = model(ids[:, :6], use_cache=True)
        expected = model(ids[:, 6:], cache=first.cache, use_cache=True).logits
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_efficient"] = None  # any `import hf_efficient` now fails
        import torch, transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("hf_efficient"), type(model).__module__
        ids = torch.load({str(tmp_path / "ids.pt")!r})
        with torch.no_grad():
            first = model(ids[:, :6], use_cache=True)
            logits = model(ids[:, 6:], cache=first.cache, use_cache=True).logits
        torch.save(logits, {str(tmp_path / "remote.pt")!r})
        print("REMOTE-OK")
        """
    )
    run_without_package(script, tmp_path)
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected, rtol=0, atol=0)
