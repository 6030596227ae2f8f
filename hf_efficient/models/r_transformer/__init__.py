from .configuration_r_transformer import RTransformerConfig
from .modeling_r_transformer import (
    RTransformerCache,
    RTransformerForCausalLM,
    RTransformerForImageClassification,
    RTransformerForSequenceClassification,
    RTransformerForTokenClassification,
    RTransformerModel,
    RTransformerPreTrainedModel,
)

# Auto class -> model class, used by `hf_efficient.register()` and by `save_pretrained_with_code` (auto_map).
AUTO_MAPPING = {
    "AutoModel": RTransformerModel,
    "AutoModelForCausalLM": RTransformerForCausalLM,
    "AutoModelForSequenceClassification": RTransformerForSequenceClassification,
    "AutoModelForTokenClassification": RTransformerForTokenClassification,
    "AutoModelForImageClassification": RTransformerForImageClassification,
}

__all__ = [
    "AUTO_MAPPING",
    "RTransformerCache",
    "RTransformerConfig",
    "RTransformerForCausalLM",
    "RTransformerForImageClassification",
    "RTransformerForSequenceClassification",
    "RTransformerForTokenClassification",
    "RTransformerModel",
    "RTransformerPreTrainedModel",
]
