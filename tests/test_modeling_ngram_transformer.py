"""N-gram Transformer: the generic tester for the decoder-only heads, the blocked op against the dense reference,
the receptive-field property, the rolling cache, and the encoder-decoder head (save / load, remote code, generate,
Seq2SeqTrainer, padding, pipeline) tested here directly."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    ByT5Tokenizer,
    DataCollatorForSeq2Seq,
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)

import hf_efficient
from hf_efficient.models.ngram_transformer import (
    NgramTransformerCache,
    NgramTransformerConfig,
    NgramTransformerForCausalLM,
    NgramTransformerForConditionalGeneration,
    NgramTransformerModel,
)
from hf_efficient.models.ngram_transformer.modeling_ngram_transformer import eager_attention_forward
from hf_efficient.models.ngram_transformer.ops_ngram_transformer import ngram_attention
from tests import helpers
from tests.model_tester import AttentionTests, GenericModelTests, WindowedAttentionTests
from tests.references.ngram_transformer_reference import ngram_attention_reference

REPO = Path(__file__).resolve().parents[1]
VOCAB = helpers.TINY["ngram_transformer"]["vocab_size"]


def tiny_config(**overrides) -> NgramTransformerConfig:
    return helpers.tiny_config("ngram_transformer", **overrides)


def seq2seq_config(**overrides) -> NgramTransformerConfig:
    return tiny_config(is_encoder_decoder=True, **overrides)


class TestNgramTransformer(WindowedAttentionTests, AttentionTests, GenericModelTests):
    model_type = "ngram_transformer"
    all_heads = [NgramTransformerModel, NgramTransformerForCausalLM]
    variants = {
        "ngram3": {"ngram_size": 3},
        "ngram1_learned": {"ngram_size": 1, "position_embedding_type": "learned", "max_position_embeddings": 64},
        "full": {"ngram_size": None},
    }
    seq_length = 13  # not a multiple of the block size (4): the blocked path pads internally
    invalid_configs = [
        ({"ngram_size": 0}, "ngram_size"),
        ({"ngram_size": -2}, "ngram_size"),
        ({"ngram_size": 2.5}, "ngram_size"),
        ({"ngram_size": 8, "attention_block_size": 3}, "attention_block_size"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"position_embedding_type": "rotary"}, "'rotary'"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
        ({"num_encoder_layers": 0}, "num_encoder_layers"),
        ({"vocab_size": -1}, "vocab_size"),
    ]

    def get_config(self, variant, head):
        return tiny_config(**self.variants[variant])

    def attention_window(self, variant, config):
        return config.ngram_size  # None: the full-attention baseline has no window


# ---------------------------------------------------------------------------------------------- op vs reference
def _eager(query, key, value, mask, is_causal):
    return eager_attention_forward(
        torch.nn.Module(), query, key, value, mask, scaling=query.shape[-1] ** -0.5, is_causal=is_causal
    )


def _sdpa(query, key, value, mask, is_causal):
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=is_causal)
    return out.transpose(1, 2), None


def _key_mask(kind: str, batch: int, length: int) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.ones(batch, length, dtype=torch.long)
    if kind == "right":
        mask[0, length - 5 :] = 0
    elif kind == "left":
        mask[1, :6] = 0
    elif kind == "holes":
        mask[0, 3] = mask[0, 9] = mask[1, 0] = mask[1, 14] = 0
    return mask


def _real_rows(mask, q_len):
    """Queries that are real tokens (the reference leaves padded queries at zero)."""
    return torch.ones(2, q_len, dtype=torch.bool) if mask is None else mask[:, -q_len:].bool()


@pytest.mark.parametrize("ngram_size", [1, 2, 3, 7, 40, None])
@pytest.mark.parametrize("padding", ["none", "right", "left", "holes"])
@pytest.mark.parametrize("attention_fn", [_eager, _sdpa], ids=["eager", "sdpa"])
def test_op_matches_dense_reference_forward_and_gradient(ngram_size, padding, attention_fn):
    """Blocked op (L = 21 > block) vs the loop reference, forward and input gradients, float32."""
    torch.manual_seed(0)
    batch, heads, length, dim = 2, 2, 21, 8
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=torch.float64).float().requires_grad_() for _ in "qkv")
    mask = _key_mask(padding, batch, length)
    block = None if ngram_size is None else max(ngram_size - 1, 1) + 2
    out, _ = ngram_attention(
        q, k, v, ngram_size=ngram_size, attention_fn=attention_fn, key_mask=mask, block_size=block
    )
    expected = ngram_attention_reference(q, k, v, ngram_size, key_mask=mask)
    real = _real_rows(mask, length)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], expected[real], rtol=0, atol=1e-5)
    weights = torch.randn_like(out) * real[:, :, None, None]
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    expected_grads = torch.autograd.grad((expected * weights).sum(), (q, k, v))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block_size", [2, 3, 4, 8, 64])
def test_op_every_block_size_and_cached_window(block_size):
    """Any block >= N - 1 gives the same result (N = 3); queries fewer than keys (a cached window before them)."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 19, 4) for _ in "qkv")
    mask = _key_mask("left", 2, 19)
    for q_len in (19, 6, 1):
        out, _ = ngram_attention(
            q[:, :, -q_len:], k, v, ngram_size=3, attention_fn=_eager, key_mask=mask, block_size=block_size
        )
        expected = ngram_attention_reference(q[:, :, -q_len:], k, v, 3, key_mask=mask)
        real = _real_rows(mask, q_len)
        torch.testing.assert_close(out[real], expected[real], rtol=0, atol=1e-5)


def test_blocked_path_never_builds_length_squared_masks():
    """At L = 256, N = 4, block 8: every mask / score tensor handed to attention is (B * L / 8, 1, 8, 16)."""
    seen = []

    def recording(query, key, value, mask, is_causal):
        seen.append((tuple(query.shape), tuple(key.shape), None if mask is None else tuple(mask.shape)))
        return _eager(query, key, value, mask, is_causal)

    q, k, v = (torch.randn(2, 2, 256, 4) for _ in "qkv")
    ngram_attention(q, k, v, ngram_size=4, attention_fn=recording, key_mask=torch.ones(2, 256), block_size=8)
    assert seen == [((64, 2, 8, 4), (64, 2, 16, 4), (64, 1, 8, 16))]


def test_attention_weights_are_banded_and_equal_the_reference_probabilities():
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 11, 4) for _ in "qkv")
    _, weights = ngram_attention(q, k, v, ngram_size=3, attention_fn=_eager, block_size=4, return_weights=True)
    assert weights.shape == (1, 2, 11, 11)
    i, j = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    outside = ((i - j) < 0) | ((i - j) > 2)
    assert torch.all(weights[..., outside] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(1, 2, 11))
    scores = (q @ k.transpose(-1, -2)) / 2.0
    dense = torch.softmax(scores.masked_fill(outside, float("-inf")), dim=-1)
    torch.testing.assert_close(weights, dense, rtol=0, atol=1e-6)


def test_output_attentions_are_on_the_autograd_graph():
    """Past the block size (L 13 > block 4) the maps used to be a dense copy scattered from the block weights, off
    the path to the logits: `retain_grad()` on them got None. They are now the probabilities the output is computed
    from (with the same logits as without `output_attentions`), and a gradient through them reaches the inputs."""
    set_seed(0)
    model = NgramTransformerForCausalLM(tiny_config(_attn_implementation="eager")).eval()
    ids = torch.randint(3, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    out = model(inputs_embeds=embeds, attention_mask=mask, output_attentions=True)
    with torch.no_grad():
        plain = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=1e-5)
    assert len(out.attentions) == 2 and all(a.requires_grad and a.shape == (2, 2, 13, 13) for a in out.attentions)
    for attention in out.attentions:
        attention.retain_grad()
    (out.logits * torch.randn_like(out.logits)).sum().backward(retain_graph=True)
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in out.attentions)
    weights = torch.randn_like(out.attentions[1])
    (grad,) = torch.autograd.grad((out.attentions[1] * weights).sum(), embeds)
    assert grad.abs().sum() > 0


def test_decoder_self_attention_module_matches_reference():
    """The decoder layer's attention module = o_proj(reference(q_proj x, k_proj x, v_proj x)) with padding."""
    model = NgramTransformerForCausalLM(tiny_config(ngram_size=3)).eval()
    attn = model.model.decoder.layers[0].self_attn
    x = torch.randn(2, 13, 32)
    mask = _key_mask("left", 2, 13)
    with torch.no_grad():
        got, _ = attn(x, key_mask=mask)
        q, k, v = (p(x).view(2, 13, 2, 16).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        expected = attn.o_proj(ngram_attention_reference(q, k, v, 3, key_mask=mask).reshape(2, 13, 32))
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- receptive field
def _changed_at(ids: torch.Tensor, position: int) -> torch.Tensor:
    changed = ids.clone()
    changed[:, position] = 3 + (changed[:, position] - 3 + 17) % (VOCAB - 3)
    return changed


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("ngram_size", [2, 4])
@pytest.mark.parametrize("seq2seq", [False, True], ids=["decoder-only", "encoder-decoder"])
def test_receptive_field_is_exactly_k_times_n_minus_1(layers, ngram_size, seq2seq):
    """In a decoder of k layers, target logit i never depends on a token more than k(N-1) back, and does depend on
    the token exactly k(N-1) back."""
    # Larger init: with the default 0.02 a token k(N-1) back moves the logits by only ~1e-5 through k layers.
    config = (seq2seq_config if seq2seq else tiny_config)(
        num_hidden_layers=layers, ngram_size=ngram_size, initializer_range=0.2
    )
    set_seed(0)
    model = (NgramTransformerForConditionalGeneration if seq2seq else NgramTransformerForCausalLM)(config).eval()
    length, reach = 20, layers * (ngram_size - 1)
    ids = torch.randint(3, VOCAB, (2, length))
    source = torch.randint(3, VOCAB, (2, 7))

    def logits(target):
        with torch.no_grad():
            if seq2seq:
                return model(input_ids=source, decoder_input_ids=target).logits
            return model(target).logits

    base = logits(ids)
    for i in (reach + 2, length - 1):
        far = logits(_changed_at(ids, i - reach - 1))
        torch.testing.assert_close(far[:, i], base[:, i], rtol=0, atol=0)
        near = logits(_changed_at(ids, i - reach))
        assert (near[:, i] - base[:, i]).abs().max() > 1e-4, (i, reach)


# ---------------------------------------------------------------------------------------------- rolling cache
@pytest.mark.parametrize("ngram_size", [1, 2, 4])
def test_cache_keeps_exactly_the_last_n_minus_1_keys(ngram_size):
    model = NgramTransformerForCausalLM(tiny_config(ngram_size=ngram_size)).eval()
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.cache
        assert isinstance(cache, NgramTransformerCache) and cache.get_seq_length() == 11
        for _ in range(5):
            for layer in cache.layers:
                assert layer.keys.shape[2] == ngram_size - 1 and layer.values.shape[2] == ngram_size - 1
            k_proj = model.model.decoder.layers[0].self_attn.k_proj
            out = model(ids[:, :1], cache=cache, use_cache=True)
        assert cache.get_seq_length() == 16
        # the rolling window holds the keys of the newest N - 1 tokens
        full = model(torch.cat([ids, ids[:, :1].repeat(1, 5)], dim=1), output_hidden_states=True)
        normed = model.model.decoder.layers[0].self_attn_norm(full.hidden_states[0])
        keys = k_proj(normed).view(2, 16, 2, 16).transpose(1, 2)
        if ngram_size > 1:
            torch.testing.assert_close(cache.layers[0].keys, keys[:, :, 16 - (ngram_size - 1) :], rtol=0, atol=1e-5)
    full_model = NgramTransformerForCausalLM(tiny_config(ngram_size=None)).eval()
    with torch.no_grad():
        assert full_model(ids, use_cache=True).cache.layers[0].keys.shape[2] == 11  # the baseline grows


def test_multi_token_continuation_with_padding_equals_full_forward():
    model = NgramTransformerForCausalLM(tiny_config(ngram_size=3)).eval()
    ids = torch.randint(3, VOCAB, (2, 17))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :3] = 0  # left padding of sample 1
    with torch.no_grad():
        first = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        second = model(ids[:, 6:], attention_mask=mask, cache=first.cache, use_cache=True)
        full = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(second.logits, full[:, 6:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("ngram_size", [2, 3, None])
def test_eager_and_sdpa_agree(ngram_size):
    outputs = []
    for implementation in ("eager", "sdpa"):
        config = seq2seq_config(ngram_size=ngram_size)
        config._attn_implementation = implementation
        set_seed(0)
        model = NgramTransformerForConditionalGeneration(config).eval()
        assert model.config._attn_implementation == implementation
        source = torch.randint(3, VOCAB, (2, 9))
        mask = torch.ones_like(source)
        mask[0, 6:] = 0
        with torch.no_grad():
            outputs.append(model(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :7] + 1).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


def test_output_attentions_shapes_and_band():
    model = NgramTransformerForConditionalGeneration(seq2seq_config(ngram_size=3)).eval()
    source, target = torch.randint(3, VOCAB, (2, 9)), torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        out = model(input_ids=source, decoder_input_ids=target, output_attentions=True, output_hidden_states=True)
    assert len(out.decoder_attentions) == 2 and out.decoder_attentions[0].shape == (2, 2, 11, 11)
    assert out.cross_attentions[0].shape == (2, 2, 11, 9) and out.encoder_attentions[0].shape == (2, 2, 9, 9)
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 3
    i, j = torch.meshgrid(torch.arange(11), torch.arange(11), indexing="ij")
    assert torch.all(out.decoder_attentions[1][..., ((i - j) < 0) | ((i - j) > 2)] == 0)


def test_learned_positions_too_long_raises():
    model = NgramTransformerForCausalLM(tiny_config(position_embedding_type="learned", max_position_embeddings=16))
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(torch.randint(3, VOCAB, (1, 17)))


def test_negative_or_misshapen_position_ids_are_refused():
    """A negative position used to index the learned table from its end (or fail inside nn.Embedding)."""
    model = NgramTransformerForCausalLM(tiny_config(position_embedding_type="learned", max_position_embeddings=16))
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(ValueError, match="`position_ids` holds the position -1: positions start at 0"):
        model(ids, position_ids=torch.tensor([[-1, 0, 1, 2]]))
    with pytest.raises(ValueError, match="`position_ids` must have shape \\(2, 4\\) or \\(1, 4\\).*got \\(4,\\)"):
        model(ids, position_ids=torch.arange(4))
    sinusoidal = NgramTransformerForCausalLM(tiny_config()).eval()  # no table, but positions count from 0
    with pytest.raises(ValueError, match="`position_ids` holds the position -2: positions start at 0"):
        sinusoidal(ids, position_ids=torch.tensor([[-2, -1, 0, 1]]))


def test_attention_mask_of_another_batch_size_is_refused():
    model = NgramTransformerForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 6\\), expected \\(2, 6\\)"):
        model(torch.randint(3, VOCAB, (2, 6)), attention_mask=torch.ones(1, 6, dtype=torch.long))
    seq2seq = _seq2seq_model()
    source, _ = _source()
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 9\\), expected \\(2, 9\\)"):
        seq2seq(input_ids=source, attention_mask=torch.ones(1, 9), decoder_input_ids=source[:, :4])


@pytest.mark.parametrize("seq2seq", [False, True], ids=["decoder_only", "seq2seq"])
def test_filled_foreign_cache_is_refused_and_an_empty_one_replaced(seq2seq):
    """A filled DynamicCache used to be continued silently (its full-length keys, not the rolling window)."""
    model = _seq2seq_model() if seq2seq else NgramTransformerForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, VOCAB, (2, 4))
    inputs = {"input_ids": ids, "decoder_input_ids": ids[:, :1]} if seq2seq else {"input_ids": ids[:, :1]}
    foreign = DynamicCache()
    foreign.update(torch.zeros(2, 2, 3, 16), torch.zeros(2, 2, 3, 16), 0)
    if seq2seq:
        foreign = EncoderDecoderCache(foreign, DynamicCache())
    with pytest.raises(ValueError, match="continuing decoding needs .*NgramTransformerCache.*got a filled"):
        model(**inputs, cache=foreign)
    empty = EncoderDecoderCache(DynamicCache(), DynamicCache()) if seq2seq else DynamicCache()
    with torch.no_grad():
        cache = model(**inputs, cache=empty, use_cache=True).cache
    own = cache.self_attention_cache if seq2seq else cache
    assert isinstance(own, NgramTransformerCache) and own.get_seq_length() == 1


@pytest.mark.parametrize("seq2seq", [False, True], ids=["decoder_only", "seq2seq"])
def test_cache_of_another_batch_size_is_refused(seq2seq):
    model = _seq2seq_model() if seq2seq else NgramTransformerForCausalLM(tiny_config()).eval()
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        if seq2seq:
            cache = model(input_ids=ids[:1], decoder_input_ids=ids[:1, :3], use_cache=True).cache
            step = {"input_ids": ids, "decoder_input_ids": ids[:, :1]}
        else:
            cache = model(ids[:1], use_cache=True).cache
            step = {"input_ids": ids[:, :1]}
        with pytest.raises(
            ValueError, match="cache holds the state of a batch of 1, but the inputs have a batch of 2"
        ):
            model(**step, cache=cache)


def test_heads_reject_the_other_form():
    with pytest.raises(ValueError, match="is_encoder_decoder"):
        NgramTransformerForCausalLM(seq2seq_config())
    with pytest.raises(ValueError, match="is_encoder_decoder"):
        NgramTransformerForConditionalGeneration(tiny_config())


# ---------------------------------------------------------------------------------------------- encoder-decoder
def _seq2seq_model(seed=0, **overrides):
    set_seed(seed)
    model = NgramTransformerForConditionalGeneration(seq2seq_config(**overrides)).eval()
    model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def _source(batch=2, length=9, seed=1):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, length - 3 :] = 0  # sample 0 is right-padded
    ids[0, length - 3 :] = 0
    return ids, mask


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_output_flags_default_to_the_config_in_every_stack(flag):
    """As in transformers: an argument left None takes the config's value, in the heads and in the encoder and
    decoder stacks called alone (as `generate()` calls the encoder)."""
    model = _seq2seq_model(**{flag: True})
    source, mask = _source()
    field = flag.removeprefix("output_")
    with torch.no_grad():
        out = model(input_ids=source, attention_mask=mask, decoder_input_ids=source[:, :4])
        encoded = model.get_encoder()(input_ids=source, attention_mask=mask)
        decoded = model.model.decoder(input_ids=source[:, :4], encoder_hidden_states=encoded.last_hidden_state)
        off = model.get_encoder()(input_ids=source, attention_mask=mask, **{flag: False})
    assert getattr(out, f"decoder_{field}") is not None and getattr(out, f"encoder_{field}") is not None
    assert getattr(encoded, field) is not None and getattr(decoded, field) is not None
    assert getattr(off, field) is None


def test_encoder_outputs_of_another_batch_or_width_are_refused():
    """`encoder_outputs` of batch 1 used to be broadcast against a decoder batch of 2."""
    model = _seq2seq_model()
    source, mask = _source()
    target = source[:, :4]
    with torch.no_grad():
        single = model.get_encoder()(input_ids=source[:1], attention_mask=mask[:1])
        pattern = "`encoder_outputs` must be .* \\(batch, source_length, hidden_size\\) = \\(2, S >= 1, 32\\)"
        with pytest.raises(ValueError, match=pattern + ".*got \\(1, 9, 32\\)"):
            model(encoder_outputs=single, decoder_input_ids=target)
        with pytest.raises(ValueError, match=pattern + ".*got \\(2, 9, 16\\)"):
            model(encoder_outputs=(torch.randn(2, 9, 16),), decoder_input_ids=target)
        with pytest.raises(ValueError, match="`encoder_outputs` must be the encoder's output"):
            model(encoder_outputs=torch.randn(2, 9, 32), decoder_input_ids=target)
        with pytest.raises(ValueError, match="`encoder_hidden_states` must be .*got \\(1, 9, 32\\)"):
            model.model.decoder(input_ids=target, encoder_hidden_states=single.last_hidden_state)


def test_labels_are_checked_and_named():
    """1-D labels used to fail with an IndexError inside shift_tokens_right, and an out-of-vocabulary label was
    blamed on the decoder's `input_ids` (it had been shifted into them)."""
    model = _seq2seq_model()
    source, _ = _source()
    labels = source[:, :5].clone()
    with pytest.raises(ValueError, match="`labels` must have shape \\(batch, target_length\\).*got \\(5,\\)"):
        model(input_ids=source, labels=labels[0])
    labels[1, 2] = VOCAB
    with pytest.raises(
        ValueError, match=f"`labels` holds the id {VOCAB}, outside the vocabulary \\[0, {VOCAB - 1}\\]"
    ):
        model(input_ids=source, labels=labels)
    with pytest.raises(ValueError, match=f"`labels` holds the id {VOCAB}"):
        model(input_ids=source, decoder_input_ids=source[:, :5], labels=labels)
    with pytest.raises(ValueError, match="`labels` must have shape .* = \\(2, 4\\), got \\(2, 5\\)"):
        model(input_ids=source, decoder_input_ids=source[:, :4], labels=source[:, :5])
    labels[1, 2] = -100  # ignored positions are fine
    assert torch.isfinite(model(input_ids=source, labels=labels).loss)
    # A non-contiguous slice as labels (the loss used to fail flattening it with `.view`).
    sliced = model(input_ids=source, decoder_input_ids=source[:, :4], labels=source[:, :4]).loss
    torch.testing.assert_close(
        sliced, model(input_ids=source, decoder_input_ids=source[:, :4], labels=source[:, :4].clone()).loss
    )


@pytest.mark.parametrize("field", ["pad_token_id", "decoder_start_token_id"])
def test_shifting_labels_needs_pad_and_decoder_start_ids(field):
    model = _seq2seq_model(**{field: None})
    source, _ = _source()
    with pytest.raises(ValueError, match=f"needs `config.{field}`, but it is None"):
        model(input_ids=source, labels=source[:, :4])
    assert model(input_ids=source, decoder_input_ids=source[:, :4], labels=source[:, :4]).loss is not None
    with pytest.raises(ValueError, match=f"`{field}` must be None or a token id in \\[0, {VOCAB - 1}\\]"):
        seq2seq_config(**{field: VOCAB})


def test_seq2seq_loss_is_token_cross_entropy_on_shifted_labels():
    model = _seq2seq_model()
    source, mask = _source()
    labels = torch.randint(3, VOCAB, (2, 8))
    labels[1, 6:] = -100
    out = model(input_ids=source, attention_mask=mask, labels=labels)
    decoder_input_ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), labels[:, :-1].clamp(min=0)], dim=1)
    manual = model(input_ids=source, attention_mask=mask, decoder_input_ids=decoder_input_ids).logits
    expected = torch.nn.functional.cross_entropy(manual.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("ngram_size", [3, None])
def test_seq2seq_generate_with_and_without_cache(ngram_size):
    model = _seq2seq_model(ngram_size=ngram_size)
    source, mask = _source()
    common = {"attention_mask": mask, "max_new_tokens": 12, "min_new_tokens": 12}
    greedy = model.generate(source, do_sample=False, **common)
    assert greedy.shape == (2, 13)
    assert torch.equal(greedy, model.generate(source, do_sample=False, use_cache=False, **common))
    beams = model.generate(source, num_beams=3, num_return_sequences=2, do_sample=False, **common)
    beams_no_cache = model.generate(
        source, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=False, **common
    )
    assert beams.shape == (4, 13) and torch.equal(beams, beams_no_cache)
    samples = []
    for _ in range(2):
        set_seed(7)
        samples.append(model.generate(source, do_sample=True, top_k=0, **common))
    assert torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("ngram_size", [1, 3, None])
def test_seq2seq_cached_logits_equal_full_forward_every_step(ngram_size):
    model = _seq2seq_model(ngram_size=ngram_size)
    source, mask = _source()
    new = 14
    out = helpers.generate_exactly(model, source, mask, new, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        full = model(input_ids=source, attention_mask=mask, decoder_input_ids=out.sequences, use_cache=False).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, step], rtol=0, atol=1e-4, msg=f"step {step}")
    if ngram_size is not None:
        self_cache = out.cache.self_attention_cache
        assert all(layer.keys.shape[2] == ngram_size - 1 for layer in self_cache.layers)
        assert all(layer.keys.shape[2] == 9 for layer in out.cache.cross_attention_cache.layers)


def test_seq2seq_padding_leaves_real_outputs_unchanged():
    """Source padding (left or right, any content) and target right padding never change real tokens' logits."""
    model = _seq2seq_model()
    source = torch.randint(3, VOCAB, (1, 6))
    target = torch.randint(3, VOCAB, (1, 7))
    with torch.no_grad():
        alone = model(input_ids=source, decoder_input_ids=target).logits
        for left in (False, True):
            junk = torch.randint(3, VOCAB, (1, 4))
            padded = torch.cat([junk, source], 1) if left else torch.cat([source, junk], 1)
            mask = torch.ones_like(padded)
            if left:
                mask[:, :4] = 0
            else:
                mask[:, 6:] = 0
            target_padded = torch.cat([target, junk[:, :3]], 1)
            target_mask = torch.cat([torch.ones(1, 7), torch.zeros(1, 3)], 1).long()
            got = model(
                input_ids=padded,
                attention_mask=mask,
                decoder_input_ids=target_padded,
                decoder_attention_mask=target_mask,
            ).logits
            torch.testing.assert_close(got[:, :7], alone, rtol=0, atol=1e-5)


def test_seq2seq_save_load_auto_class_and_generation_config(tmp_path):
    model = _seq2seq_model()
    source, mask = _source()
    with torch.no_grad():
        expected = model(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    GenerationConfig.from_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is NgramTransformerForConditionalGeneration
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        got = loaded(input_ids=source, attention_mask=mask, decoder_input_ids=source).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    base = NgramTransformerModel.from_pretrained(tmp_path)
    for name, param in base.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], param), name


def test_seq2seq_remote_code_without_package(tmp_path):
    model = _seq2seq_model()
    source, mask = _source()
    folder = tmp_path / "ckpt"
    hf_efficient.save_pretrained_with_code(model, folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"} <= set(auto_map)
    torch.save({"input_ids": source, "attention_mask": mask}, folder / "inputs.pt")
    expected = model.generate(source, attention_mask=mask, max_new_tokens=8, num_beams=2, do_sample=False)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_efficient"] = None
        import torch, transformers
        model = transformers.AutoModelForSeq2SeqLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert not type(model).__module__.startswith("hf_efficient"), type(model).__module__
        inputs = torch.load({str(folder / "inputs.pt")!r})
        out = model.generate(**inputs, max_new_tokens=8, num_beams=2, do_sample=False)
        torch.save(out, {str(folder / "remote.pt")!r})
        print("REMOTE-OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]
    assert torch.equal(torch.load(folder / "remote.pt"), expected)


def test_seq2seq_trainer_lowers_loss_and_saved_folder_generates_text(tmp_path):
    """Seq2SeqTrainer learns to reverse short byte strings; the saved folder (model + byte tokenizer) loads with the
    Auto classes and turns text into text. (transformers 5 removed the `text2text-generation` pipeline: this is
    what it did: tokenize, `generate`, decode.)"""
    tokenizer = ByT5Tokenizer()
    config = seq2seq_config(vocab_size=len(tokenizer), ngram_size=3, hidden_size=48, num_attention_heads=2)
    set_seed(0)
    model = NgramTransformerForConditionalGeneration(config)
    words = ["abc", "hello", "xyz", "tree", "moon", "stars", "data", "code"]
    rows = [{"source": w, "target": w[::-1]} for w in words]
    dataset = Dataset.from_list(rows).map(
        lambda b: {**tokenizer(b["source"]), "labels": tokenizer(text_target=b["target"])["input_ids"]},
        batched=True,
        remove_columns=["source", "target"],
    )
    collator = DataCollatorForSeq2Seq(tokenizer, model=model)

    def mean_loss():
        model.eval()
        with torch.no_grad():
            return float(model(**collator([dataset[i] for i in range(len(dataset))])).loss)

    before = mean_loss()
    args = Seq2SeqTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    Seq2SeqTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator).train()
    after = mean_loss()
    assert after < 0.7 * before, (before, after)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "ckpt").eval()
    encoded = loaded_tokenizer(["hello", "moon"], return_tensors="pt", padding=True)
    generated = loaded.generate(**encoded, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, model.eval().generate(**encoded, max_new_tokens=8, do_sample=False))
    texts = loaded_tokenizer.batch_decode(generated, skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_seq2seq_gradient_checkpointing_same_gradients(use_reentrant):
    """Both checkpoint kinds; the reentrant one used to fail ("backward through the graph a second time"): the
    decoder passed `encoder_hidden_states` to its checkpointed layers by keyword."""
    grads = []
    for checkpointing in (False, True):
        model = _seq2seq_model().train()
        if checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        source, mask = _source()
        model(input_ids=source, attention_mask=mask, labels=source).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_seq2seq_low_precision_finite(dtype):
    model = _seq2seq_model().to(dtype).train()
    source, mask = _source()
    out = model(input_ids=source, attention_mask=mask, labels=source)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- presets
PRESETS = sorted(p.parent.name for p in (REPO / "model_cards").glob("ngram-*/config.json"))


def test_presets_exist():
    assert {
        "ngram-transformer-base-n4",
        "ngram-transformer-base-n8",
        "ngram-transformer-big-n4",
        "ngram-transformer-big-n8",
        "ngram-lm-small-n8",
    } <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_have_the_papers_sizes_and_cite_its_finding(preset):
    """Loading, building and card completeness are tests/test_presets.py's; here the paper's Transformer sizes."""
    folder = REPO / "model_cards" / preset
    config = AutoConfig.from_pretrained(folder)
    if "base" in preset:
        assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (512, 2048, 8)
    if "big" in preset:
        assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (1024, 4096, 16)
    assert "loses very little" in (folder / "README.md").read_text().lower()
