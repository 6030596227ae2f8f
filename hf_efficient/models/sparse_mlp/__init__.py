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

ARCHITECTURE_CARD = {
    "name": "Sparse-MLP (Lou et al. 2021)",
    "variants": "MLP-Mixer (`num_sparse_layers=0`); token- and channel-mixing MoE blocks; experts eager / batched_mm / "
    "grouped_mm",
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
