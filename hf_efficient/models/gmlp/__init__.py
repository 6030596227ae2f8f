from .configuration_gmlp import GMLPConfig
from .modeling_gmlp import (
    GMLPCache,
    GMLPForCausalLM,
    GMLPForImageClassification,
    GMLPForMaskedLM,
    GMLPForSequenceClassification,
    GMLPForTokenClassification,
    GMLPModel,
    GMLPPreTrainedModel,
)

# Auto class -> model class, used by `hf_efficient.register()` and by `save_pretrained_with_code` (auto_map).
AUTO_MAPPING = {
    "AutoModel": GMLPModel,
    "AutoModelForCausalLM": GMLPForCausalLM,
    "AutoModelForMaskedLM": GMLPForMaskedLM,
    "AutoModelForSequenceClassification": GMLPForSequenceClassification,
    "AutoModelForTokenClassification": GMLPForTokenClassification,
    "AutoModelForImageClassification": GMLPForImageClassification,
}

# What the README's architecture table says of this architecture (scripts/checks/make_model_cards.py writes the table).
ARCHITECTURE_CARD = {"name": "gMLP / aMLP (Liu et al. 2021)", "variants": "gMLP; aMLP (`tiny_attn_size`)"}

__all__ = [
    "AUTO_MAPPING",
    "GMLPCache",
    "GMLPConfig",
    "GMLPForCausalLM",
    "GMLPForImageClassification",
    "GMLPForMaskedLM",
    "GMLPForSequenceClassification",
    "GMLPForTokenClassification",
    "GMLPModel",
    "GMLPPreTrainedModel",
]
