"""Attention Free Transformer (Zhai et al., 2021): model_type `aft`."""

from .configuration_aft import AFTConfig
from .modeling_aft import (
    AFTCache,
    AFTForCausalLM,
    AFTForImageClassification,
    AFTForMaskedLM,
    AFTForSequenceClassification,
    AFTModel,
    AFTPreTrainedModel,
)

# Auto class -> model class, used by `hf_efficient.register()` and by `save_pretrained_with_code` (auto_map).
AUTO_MAPPING = {
    "AutoModel": AFTModel,
    "AutoModelForCausalLM": AFTForCausalLM,
    "AutoModelForMaskedLM": AFTForMaskedLM,
    "AutoModelForSequenceClassification": AFTForSequenceClassification,
    "AutoModelForImageClassification": AFTForImageClassification,
}

# What the README's architecture table says of this architecture (scripts/checks/make_model_cards.py writes the table).
ARCHITECTURE_CARD = {
    "name": "Attention Free Transformer (Zhai et al. 2021)",
    "variants": "full, local, simple, conv (causal and bidirectional)",
}

__all__ = [
    "AUTO_MAPPING",
    "AFTCache",
    "AFTConfig",
    "AFTForCausalLM",
    "AFTForImageClassification",
    "AFTForMaskedLM",
    "AFTForSequenceClassification",
    "AFTModel",
    "AFTPreTrainedModel",
]
