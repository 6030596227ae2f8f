"""Combiner: the generic tester for every head and every combiner_type, plus module-level reference agreement,
decoding (cost and exactness), padding and presets."""

from pathlib import Path

import pytest
import torch
from transformers import set_seed

from hf_efficient.models.combiner import (
    CombinerConfig,
    CombinerForCausalLM,
    CombinerForMaskedLM,
    CombinerForSequenceClassification,
    CombinerModel,
)
from tests import helpers
from tests.model_tester import GenericModelTests
from tests.references.combiner_reference import combiner_reference

REPO = Path(__file__).resolve().parents[1]
MAX_LEN = helpers.TINY["combiner"]["max_position_embeddings"]
COMBINER_TYPES = ("fixed", "logsparse", "axial", "mixture")


def tiny_config(combiner_type="fixed", **overrides) -> CombinerConfig:
    return helpers.tiny_config("combiner", combiner_type=combiner_type, **overrides)


class TestCombiner(GenericModelTests):
    model_type = "combiner"
    all_heads = [CombinerModel, CombinerForCausalLM, CombinerForMaskedLM, CombinerForSequenceClassification]
    variants = {
        **{name: {"combiner_type": name} for name in COMBINER_TYPES},
        # the studies' ablation: Combiner-Fixed without span summaries (block-local attention)
        "fixed-no-spans": {"combiner_type": "fixed", "use_span_summaries": False},
    }
    max_seq_length = MAX_LEN
    seq_length = 13  # not a multiple of the block size: internal padding is always exercised
    invalid_configs = [
        ({"combiner_type": "dense"}, "'dense'"),
        ({"span_summary": "median"}, "'median'"),
        ({"use_span_summaries": 1}, "use_span_summaries"),
        ({"use_span_summaries": False, "combiner_type": "axial"}, "combiner_type='fixed' only"),
        ({"block_size": 0}, "block_size"),
        ({"hidden_size": 30, "num_attention_heads": 4}, "num_attention_heads"),
        ({"max_position_embeddings": -1}, "max_position_embeddings"),
        ({"classifier_pooling": "cls"}, "'cls'"),
        ({"hidden_dropout_prob": 1.0}, "hidden_dropout_prob"),
    ]

    def get_config(self, variant, head):
        return tiny_config(**self.variants[variant])

    def not_applicable(self, test_name, params):
        if test_name == "test_causality" and params.get("variant") == "fixed-no-spans":
            head = params.get("text_head")
            if head is not None and not self.is_causal(head):
                # block-local attention: the first position never sees the last segment (the bidirectional op
                # against its dense reference: test_combiner_ops.test_fixed_without_spans_is_block_local_attention)
                return "bidirectional block-local attention: the last token is outside the first segment"
        return super().not_applicable(test_name, params)


# ---------------------------------------------------------------------- the module against the dense reference
@pytest.mark.parametrize("combiner_type", COMBINER_TYPES)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_module_matches_reference(combiner_type, causal):
    """CombinerAttention = o_proj(reference(q_proj x, k_proj x, v_proj x)), Axial keys from the module's parameters."""
    config = tiny_config(combiner_type)
    set_seed(0)
    attn = CombinerModel(config).layers[0].attn.eval()
    x = torch.randn(2, 11, config.hidden_size)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        got = attn(x, causal=causal, key_mask=mask)
        q, k, v = (p(x).view(2, 11, 2, 16).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        reference = combiner_reference(
            q,
            k,
            v,
            combiner_type=combiner_type,
            causal=causal,
            block_size=4,
            key_mask=mask,
            abstraction_key_fn=attn.abstraction_key_fn(),
            hidden_states=x,
        )
        expected = attn.o_proj(reference.float().transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1, :8], expected[1, :8], rtol=0, atol=1e-5)


def test_axial_has_its_extra_parameters_and_they_matter():
    config = tiny_config("axial")
    model = CombinerForCausalLM(config).eval()
    names = {n for n, _ in model.named_parameters()}
    for part in ("axial_out_proj.weight", "axial_norm.weight", "axial_key_proj.weight"):
        assert f"model.layers.0.attn.{part}" in names
    assert not any("axial" in n for n, _ in CombinerForCausalLM(tiny_config("fixed")).named_parameters())
    ids = torch.randint(3, 64, (1, 13))
    before = model(ids).logits
    with torch.no_grad():
        model.model.layers[0].attn.axial_key_proj.weight.mul_(3.0)
    after = model(ids).logits
    assert torch.allclose(before[:, :4], after[:, :4], atol=1e-6)  # first row: no abstraction is visible yet
    assert not torch.allclose(before[:, 4:], after[:, 4:])


# ---------------------------------------------------------------------- decoding
@pytest.mark.parametrize("combiner_type", COMBINER_TYPES)
def test_long_decode_equals_full_forward_at_every_step(combiner_type):
    """Left-padded prompts of different lengths, 20 greedy steps across several segments / rows / dyadic levels:
    the cached logits equal a full forward pass at every step."""
    config = tiny_config(combiner_type)
    set_seed(0)
    model = CombinerForCausalLM(config).eval()
    model.generation_config.pad_token_id = config.pad_token_id
    ids = torch.randint(3, 64, (2, 7))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0  # sample 0 has 3 real tokens, sample 1 has 7
    new = 20
    out = helpers.generate_exactly(model, ids, mask, new, output_logits=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = model(out.sequences, attention_mask=full_mask, use_cache=False).logits
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits, full[:, ids.shape[1] + step - 1], rtol=0, atol=1e-4, msg=f"step {step}")


@pytest.mark.parametrize("combiner_type", COMBINER_TYPES)
def test_multi_token_continuation_equals_full_forward(combiner_type):
    """Continuing a filled cache with several tokens at once (with a padding token among them)."""
    config = tiny_config(combiner_type)
    model = CombinerForCausalLM(config).eval()
    ids = torch.randint(3, 64, (2, 17))
    with torch.no_grad():
        first = model(ids[:, :6], use_cache=True)
        chunk_mask = torch.ones(2, 17, dtype=torch.long)
        chunk_mask[1, 9] = 0  # a padding token in the middle of sample 1's continuation
        second = model(ids[:, 6:], attention_mask=chunk_mask, cache=first.cache, use_cache=True)
        full = model(ids, attention_mask=chunk_mask).logits
    torch.testing.assert_close(second.logits[0], full[0, 6:], rtol=0, atol=1e-4)
    keep = chunk_mask[1, 6:].bool()
    torch.testing.assert_close(second.logits[1][keep], full[1, 6:][keep], rtol=0, atol=1e-4)
    assert second.cache.get_seq_length() == 17


def test_decoding_state_is_sub_linear():
    """After a 40-token prompt, each layer of a Fixed / Axial model keeps s + L/s-sized states (no per-token
    keys; the L/s summaries with as many again of headroom for the next appends), and a Logsparse step attends to
    1 + log2 L entries."""
    prompt = torch.randint(3, 64, (1, 40))
    for combiner_type, expected in (
        ("fixed", {"seg_k": 4, "span_k": 2 * 10}),
        ("axial", {"row_k": 4, "abs_k": 2 * 10}),
    ):
        model = CombinerForCausalLM(tiny_config(combiner_type)).eval()
        with torch.no_grad():
            states = model(prompt, use_cache=True).cache.get_states(1)
        for name, size in expected.items():
            assert states[name].shape[2] == size, (combiner_type, name, states[name].shape)
        assert all(t.shape[2] < 40 for t in states.values() if t.ndim > 2)
    model = CombinerForCausalLM(tiny_config("logsparse")).eval()
    with torch.no_grad():
        states = model(prompt, use_cache=True).cache.get_states(0)
    assert {name for name in states if name.startswith("level")} == {
        f"level{lv}_{kv}" for lv in range(1, 6) for kv in "kv"
    }


def test_cache_rejected_for_bidirectional_model():
    config = tiny_config("fixed")
    cache = CombinerForCausalLM(config).eval()(torch.randint(3, 64, (1, 4)), use_cache=True).cache
    with pytest.raises(ValueError, match="causal"):
        CombinerModel(config, causal=False)(torch.randint(3, 64, (1, 1)), cache=cache)


def test_attention_mask_length_mismatch_is_named():
    model = CombinerForCausalLM(tiny_config()).eval()
    with pytest.raises(ValueError, match="attention_mask has shape \\(1, 3\\)"):
        model(torch.randint(3, 64, (1, 5)), attention_mask=torch.ones(1, 3))


# ---------------------------------------------------------------------- padding, pooling, the full-attention property
@pytest.mark.parametrize("combiner_type", COMBINER_TYPES)
def test_bidirectional_padding_in_the_middle_equals_the_sample_alone(combiner_type):
    """Real tokens are packed before the blocks are formed: holes anywhere in the mask leave the real outputs as
    the sample alone (padding content irrelevant)."""
    model = CombinerForMaskedLM(tiny_config(combiner_type)).eval()
    ids = torch.randint(3, 64, (1, 10))
    holes = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0]])
    padded = torch.randint(3, 64, (1, 14))
    padded[holes.bool()] = ids[0]
    with torch.no_grad():
        alone = model(ids).logits
        got = model(padded, attention_mask=holes).logits
    torch.testing.assert_close(got[holes.bool()], alone[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("combiner_type", COMBINER_TYPES)
def test_every_token_reaches_every_later_token(combiner_type):
    """Full attention at the model level: with one block (no stacking), changing any earlier token changes the
    last position's output, for causal models; and any token at all for bidirectional ones."""
    for head, positions in ((CombinerForCausalLM, range(23)), (CombinerForMaskedLM, range(24))):
        model = head(tiny_config(combiner_type, num_hidden_layers=1, max_position_embeddings=32)).eval()
        ids = torch.randint(3, 64, (1, 24))
        with torch.no_grad():
            base = model(ids).logits[0, -1 if head is CombinerForCausalLM else 0]
            for j in positions:
                changed = ids.clone()
                changed[0, j] = 3 + (changed[0, j] - 3 + 17) % 61
                out = model(changed).logits[0, -1 if head is CombinerForCausalLM else 0]
                assert not torch.allclose(out, base, atol=1e-7), (head.__name__, j)


def test_last_token_pooling_for_a_causal_classifier():
    config = tiny_config("fixed", causal=True, classifier_pooling="last")
    model = CombinerForSequenceClassification(config).eval()
    ids = torch.randint(3, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        alone = model(ids[:1, :6]).logits
        # a causal classifier reading the last real token ignores anything after it
        changed = ids.clone()
        changed[0, 7] = 5
        torch.testing.assert_close(model(changed, attention_mask=mask).logits, batched, rtol=0, atol=0)
    torch.testing.assert_close(batched[0], alone[0], rtol=0, atol=1e-5)


def test_default_block_size_is_about_sqrt_of_max_length():
    assert CombinerConfig(max_position_embeddings=2048).block_size == 45
    assert CombinerConfig(max_position_embeddings=1024).block_size == 32
    assert CombinerConfig(max_position_embeddings=2048, block_size=128).block_size == 128


# ---------------------------------------------------------------------- presets
PRESETS = sorted(p.parent.name for p in (REPO / "model_cards").glob("combiner-*/config.json"))


def test_presets_exist():
    assert {"combiner-fixed-lm-2k", "combiner-axial-lm-2k", "combiner-axial-8k"} <= set(PRESETS)
    assert any("lra" in name for name in PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_cards_carry_the_papers_figures(preset):
    card = (REPO / "model_cards" / preset / "README.md").read_text()
    for figure in ("17.26", "17.70", "16.49", "2.77", "3.42", "58.34"):  # the paper's figures
        assert figure in card, (preset, figure)
