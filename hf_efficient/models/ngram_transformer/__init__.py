from .configuration_ngram_transformer import NgramTransformerConfig
from .modeling_ngram_transformer import (
    NgramTransformerCache,
    NgramTransformerForCausalLM,
    NgramTransformerForConditionalGeneration,
    NgramTransformerModel,
    NgramTransformerPreTrainedModel,
    NgramWindowLayer,
)

# Auto class -> model class, used by `hf_efficient.register()` and by `save_pretrained_with_code` (auto_map).
AUTO_MAPPING = {
    "AutoModel": NgramTransformerModel,
    "AutoModelForCausalLM": NgramTransformerForCausalLM,
    "AutoModelForSeq2SeqLM": NgramTransformerForConditionalGeneration,
}

# The README's architecture row (scripts/checks/make_model_cards.py).
ARCHITECTURE_CARD = {
    "name": "N-gram masked self-attention (Chelba et al. 2020)",
    "variants": "encoder-decoder and decoder-only; `ngram_size` N (None = full causal baseline)",
}

__all__ = [
    "AUTO_MAPPING",
    "NgramTransformerCache",
    "NgramTransformerConfig",
    "NgramTransformerForCausalLM",
    "NgramTransformerForConditionalGeneration",
    "NgramTransformerModel",
    "NgramTransformerPreTrainedModel",
    "NgramWindowLayer",
]
