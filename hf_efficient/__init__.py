"""hf-efficient: efficient sequence architectures as first-class Hugging Face `transformers` models.

Importing the package registers every architecture with `AutoConfig`, `AutoModel` and each `AutoModelFor*`
(idempotent: importing or calling `register()` twice is fine).
"""

import importlib
import types

import transformers

# The one place the version is written: setup.cfg reads it (`version = attr: hf_efficient.__version__`).
__version__ = "0.1.0"

# model_type -> subpackage of hf_efficient.models. Each subpackage exports `<Arch>Config` and `AUTO_MAPPING`.
ARCHITECTURES = {
    "gmlp": "gmlp",
    "aft": "aft",
    "combiner": "combiner",
    "ngram_transformer": "ngram_transformer",
    "r_transformer": "r_transformer",
    "sparse_mlp": "sparse_mlp",
}


def get_architecture(model_type: str) -> types.ModuleType:
    """The subpackage (module) of a registered architecture, e.g. `get_architecture("gmlp").GMLPConfig`."""
    if model_type not in ARCHITECTURES:
        raise ValueError(f"Unknown architecture {model_type!r}; registered: {', '.join(sorted(ARCHITECTURES))}.")
    return importlib.import_module(f"hf_efficient.models.{ARCHITECTURES[model_type]}")


def get_config_class(model_type: str) -> type[transformers.PreTrainedConfig]:
    """The configuration class of a registered architecture, e.g. `get_config_class("gmlp") is GMLPConfig`."""
    module = get_architecture(model_type)
    return next(
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and issubclass(obj, transformers.PreTrainedConfig) and obj.model_type == model_type
    )


def register() -> None:
    """Register every architecture with the transformers Auto classes (safe to call repeatedly)."""
    for model_type in ARCHITECTURES:
        module = get_architecture(model_type)
        config_class = get_config_class(model_type)
        transformers.AutoConfig.register(model_type, config_class, exist_ok=True)
        for auto_name, model_class in module.AUTO_MAPPING.items():
            getattr(transformers, auto_name).register(config_class, model_class, exist_ok=True)


register()

from .hub import save_pretrained_with_code  # noqa: E402

__all__ = ["ARCHITECTURES", "get_architecture", "get_config_class", "register", "save_pretrained_with_code"]

# The public classes of every architecture (`from hf_efficient import GMLPConfig, AFTForCausalLM, CombinerCache`), as
# `from transformers import LlamaForCausalLM`: each folder's `__all__` (configs, models, caches), so a new
# architecture needs no line here. `register()` above has imported the folders already: this costs nothing more.
for _model_type in ARCHITECTURES:
    _module = get_architecture(_model_type)
    for _name in _module.__all__:
        if _name != "AUTO_MAPPING":
            globals()[_name] = getattr(_module, _name)
            __all__.append(_name)
del _model_type, _module, _name
