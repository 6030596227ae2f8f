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

ARCHITECTURE_CARD = {
    "name": "R-Transformer (Wang et al. 2019)",
    "variants": "LocalRNN GRU / LSTM / RNN (`rnn_type`), window M, n LocalRNNs per block; always causal",
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
