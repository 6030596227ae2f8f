from .configuration_sparse_mlp import SparseMLPConfig
from .modeling_sparse_mlp import (
    SparseMLPExperts,
    SparseMLPForImageClassification,
    SparseMLPImageClassifierOutput,
    SparseMLPModel,
    SparseMLPModelOutput,
    SparseMLPPreTrainedModel,
)

# Auto class -> model class, used by `hf_efficient.register()` and by `save_pretrained_with_code` (auto_map).
AUTO_MAPPING = {
    "AutoModel": SparseMLPModel,
    "AutoModelForImageClassification": SparseMLPForImageClassification,
}

__all__ = [
    "AUTO_MAPPING",
    "SparseMLPConfig",
    "SparseMLPExperts",
    "SparseMLPForImageClassification",
    "SparseMLPImageClassifierOutput",
    "SparseMLPModel",
    "SparseMLPModelOutput",
    "SparseMLPPreTrainedModel",
]
