from .configuration_combiner import CombinerConfig
from .modeling_combiner import (
    CombinerCache,
    CombinerForCausalLM,
    CombinerForMaskedLM,
    CombinerForSequenceClassification,
    CombinerModel,
    CombinerPreTrainedModel,
)

# Auto class -> model class, used by `hf_efficient.register()` and by `save_pretrained_with_code` (auto_map).
AUTO_MAPPING = {
    "AutoModel": CombinerModel,
    "AutoModelForCausalLM": CombinerForCausalLM,
    "AutoModelForMaskedLM": CombinerForMaskedLM,
    "AutoModelForSequenceClassification": CombinerForSequenceClassification,
}

# What the README's architecture table says of this architecture (scripts/checks/make_model_cards.py writes the table).
ARCHITECTURE_CARD = {
    "name": "Combiner (Ren et al. 2021)",
    "variants": "fixed, logsparse, axial, mixture (causal and bidirectional)",
}

__all__ = [
    "AUTO_MAPPING",
    "CombinerCache",
    "CombinerConfig",
    "CombinerForCausalLM",
    "CombinerForMaskedLM",
    "CombinerForSequenceClassification",
    "CombinerModel",
    "CombinerPreTrainedModel",
]
