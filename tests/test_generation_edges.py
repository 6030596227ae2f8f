"""Ecosystem edges of gMLP, AFT and Combiner (issue 14): assisted / prompt-lookup decoding, hidden states under
padding on the autograd graph, aMLP's attention implementations, the byte tokenizer's mask token."""

import pytest
import torch
from transformers import GenerationConfig, pipeline

import hf_efficient
from hf_efficient.data import default_tokenizer
from hf_efficient.models.aft import AFTForCausalLM
from hf_efficient.models.combiner import CombinerForCausalLM, CombinerModel
from hf_efficient.models.gmlp import GMLPCache, GMLPConfig, GMLPForMaskedLM
from hf_efficient.models.gmlp.modeling_gmlp import GMLPTinyAttention
from hf_efficient.models.gmlp.ops_gmlp import tiny_attention
from hf_efficient.models.ngram_transformer import NgramTransformerForCausalLM, NgramTransformerForConditionalGeneration
from hf_efficient.models.r_transformer import RTransformerForCausalLM
from tests.helpers import SMALL, causal_gmlp, sized_config


def prompt(batch_size=1, length=6, seed=3):
    generator = torch.Generator().manual_seed(seed)
    # A repeated pattern, so that prompt lookup finds matches and proposes (some rejected) drafts.
    ids = torch.randint(3, 64, (batch_size, length), generator=generator)
    return torch.cat([ids, ids, ids[:, :2]], dim=1)


# ---------------------------------------------------------------------- assisted and prompt-lookup decoding
@pytest.mark.parametrize("variant", [{}, {"tiny_attn_size": 8}], ids=["gmlp", "amlp"])
def test_gmlp_cache_crop_restores_an_earlier_state(variant):
    model = causal_gmlp(**variant)
    ids = prompt()
    with torch.no_grad():
        short = model(ids[:, :8], use_cache=True)
        long = model(ids, use_cache=True)
    assert long.cache.is_croppable
    long.cache.crop(-(ids.shape[1] - 8))
    assert long.cache.get_seq_length() == 8
    for layer_idx in range(model.config.num_hidden_layers):
        for name, tensor in short.cache.get_states(layer_idx).items():
            torch.testing.assert_close(long.cache.get_states(layer_idx)[name], tensor, rtol=0, atol=0)
    with torch.no_grad():
        continued = model(ids[:, 8:9], cache=long.cache).logits
        full = model(ids[:, :9]).logits[:, -1:]
    torch.testing.assert_close(continued, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [{}, {"tiny_attn_size": 8}], ids=["gmlp", "amlp"])
def test_gmlp_assisted_and_prompt_lookup_decoding_equal_greedy(variant):
    """Greedy assisted decoding is exact: the same tokens as plain greedy decoding, whichever drafts were rejected."""
    model = causal_gmlp(**variant)
    assistant = causal_gmlp(seed=5, layers=1, **variant)
    ids = prompt()
    common = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    greedy = model.generate(ids, **common)
    assert greedy.shape[1] == ids.shape[1] + 12
    assisted = model.generate(ids, assistant_model=assistant, **common)
    lookup = model.generate(ids, prompt_lookup_num_tokens=3, **common)
    torch.testing.assert_close(assisted, greedy, rtol=0, atol=0)
    torch.testing.assert_close(lookup, greedy, rtol=0, atol=0)
    assert isinstance(model(ids, use_cache=True).cache, GMLPCache)


ONE_LAYER = dict(num_hidden_layers=1, num_attention_heads=2)
COMBINER = dict(num_attention_heads=2, block_size=4, max_position_embeddings=48)


def _stateful_models():
    for aft_type in ("full", "local", "simple", "conv"):
        config = sized_config("aft", aft_type=aft_type, num_hidden_layers=1, max_position_embeddings=48)
        yield f"aft-{aft_type}", AFTForCausalLM, config
    for combiner_type in ("fixed", "logsparse", "axial", "mixture"):
        config = sized_config("combiner", COMBINER, combiner_type=combiner_type, num_hidden_layers=1)
        yield f"combiner-{combiner_type}", CombinerForCausalLM, config
    yield "r-transformer", RTransformerForCausalLM, sized_config("r_transformer", ONE_LAYER)
    yield "ngram-transformer", NgramTransformerForCausalLM, sized_config("ngram_transformer", ONE_LAYER, ngram_size=3)


@pytest.mark.parametrize("name, head, config", list(_stateful_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_stateful_models_refuse_assisted_decoding_clearly(name, head, config):
    """AFT's running sums, Combiner's span summaries, R-Transformer's LocalRNN windows and the N-gram rolling cache
    are not rolled back: the package's own error, the same on every transformers of the supported range (5.24
    raised its own "stateful models" error, 5.25 "Assisted decoding requires a cache")."""
    torch.manual_seed(0)
    model = head(config).eval()
    ids = prompt()
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **common).shape[1] == ids.shape[1] + 4  # plain decoding works
    message = f"{head.__name__} does not support assisted or prompt-lookup decoding"
    with pytest.raises(NotImplementedError, match=f"{message} \\(got `assistant_model`\\)"):
        model.generate(ids, assistant_model=head(config).eval(), **common)
    with pytest.raises(NotImplementedError, match=f"{message} \\(got `prompt_lookup_num_tokens`\\)"):
        model.generate(ids, prompt_lookup_num_tokens=3, **common)
    # Asked through a GenerationConfig instead of keyword arguments: the same error.
    generation_config = GenerationConfig(prompt_lookup_num_tokens=3, **common)
    with pytest.raises(NotImplementedError, match=message):
        model.generate(ids, generation_config=generation_config)


def test_ngram_seq2seq_refuses_assisted_decoding_clearly():
    config = sized_config(
        "ngram_transformer", ONE_LAYER, ngram_size=3, is_encoder_decoder=True, decoder_start_token_id=2
    )
    torch.manual_seed(0)
    model = NgramTransformerForConditionalGeneration(config).eval()
    ids = prompt()
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert model.generate(ids, **common).shape[1] <= 5  # plain decoding works (decoder start + 4)
    with pytest.raises(
        NotImplementedError, match="NgramTransformerForConditionalGeneration does not support assisted"
    ):
        model.generate(ids, prompt_lookup_num_tokens=3, **common)


# ---------------------------------------------------------------------- Combiner hidden states under padding
@pytest.mark.parametrize("combiner_type", ["fixed", "logsparse", "axial", "mixture"])
def test_combiner_hidden_states_under_padding_are_on_the_graph(combiner_type):
    config = sized_config("combiner", COMBINER, combiner_type=combiner_type, causal=False)
    torch.manual_seed(0)
    model = CombinerModel(config).eval()
    ids = torch.randint(3, 64, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, -3:] = 0  # right padding
    outputs = model(ids, attention_mask=mask, output_hidden_states=True)
    hidden = outputs.hidden_states
    assert len(hidden) == config.num_hidden_layers + 1
    for h in hidden:
        h.retain_grad()
    (outputs.last_hidden_state * mask[..., None]).sum().backward()
    for i, h in enumerate(hidden):
        assert h.grad is not None, f"hidden_states[{i}] is not on the graph of the outputs"
        # real positions of every layer influence the output
        assert h.grad[mask.bool()].abs().sum() > 0, i
    assert hidden[-1] is outputs.last_hidden_state
    # Each sample's hidden states equal its hidden states alone (the packed layout is invisible).
    with torch.no_grad():
        alone = model(ids[1:, :10], output_hidden_states=True).hidden_states
    for h, a in zip(hidden, alone):
        torch.testing.assert_close(h[1, :10], a[0], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- aMLP's tiny attention: eager and SDPA
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_queries", [None, 1, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_tiny_attention_eager_and_sdpa_agree_with_the_op(causal, num_queries, padded):
    config = GMLPConfig(vocab_size=64, hidden_size=32, intermediate_size=64, tiny_attn_size=8)
    torch.manual_seed(0)
    module = GMLPTinyAttention(config).eval()
    x = torch.randn(2, 7, 32)
    key_mask = None
    if padded:
        key_mask = torch.ones(2, 7, dtype=torch.long)
        key_mask[0, :3] = 0
    num_queries = num_queries or 7
    query, key, value = module.qkv(x).chunk(3, dim=-1)
    expected = module.out(tiny_attention(query[:, -num_queries:], key, value, causal=causal, key_mask=key_mask))
    outs = {}
    for implementation in ("eager", "sdpa"):
        config._attn_implementation = implementation
        with torch.no_grad():
            past = dict(past_key=key[:, : 7 - num_queries], past_value=value[:, : 7 - num_queries])
            outs[implementation], _, _ = module(
                x[:, -num_queries:], causal=causal, key_mask=key_mask, **(past if num_queries < 7 else {})
            )
        torch.testing.assert_close(outs[implementation], expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["gmlp", "aft", "combiner"])
def test_attn_implementation_is_accepted_everywhere(model_type, tmp_path):
    """`attn_implementation="eager" | "sdpa"`: aMLP dispatches its tiny attention on it (same outputs); the
    attention-free models accept it and ignore it."""
    config = sized_config(model_type, intermediate_size=64, num_hidden_layers=1, max_position_embeddings=32)
    if model_type == "gmlp":
        config.tiny_attn_size = 8
    if model_type == "combiner":
        config.num_attention_heads = 2
        config.block_size = 4
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    ids = torch.randint(3, 64, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    logits = {}
    for implementation in ("eager", "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        assert model.config._attn_implementation == implementation
        model.set_attn_implementation("eager" if implementation == "sdpa" else "sdpa")
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits["eager"][real], logits["sdpa"][real], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the byte tokenizer's mask token
def test_default_tokenizer_has_a_mask_token_for_fill_mask(tmp_path):
    tokenizer = default_tokenizer()
    assert tokenizer.mask_token == "<extra_id_0>" and tokenizer.mask_token_id == 259
    assert tokenizer("def f(x)").input_ids == [c + 3 for c in b"def f(x)"] + [tokenizer.eos_token_id]
    config = sized_config("gmlp", SMALL, vocab_size=len(tokenizer), max_position_embeddings=32)
    config.causal = False
    hf_efficient.save_pretrained_with_code(GMLPForMaskedLM(config), tmp_path)
    tokenizer.save_pretrained(tmp_path)
    fill_mask = pipeline("fill-mask", model=str(tmp_path), trust_remote_code=True)
    predictions = fill_mask(f"def f{tokenizer.mask_token}x):", top_k=3)
    assert len(predictions) == 3 and all("sequence" in p for p in predictions)
