"""Saving checkpoints that load with `trust_remote_code=True` where hf-efficient is not installed."""

import importlib
import os
import shutil
from pathlib import Path

from transformers import PreTrainedModel


def architecture_folder(model: PreTrainedModel) -> Path:
    """The self-contained source folder of a model's architecture (`hf_efficient/models/<arch>/`)."""
    module = importlib.import_module(type(model).__module__)
    return Path(module.__file__).resolve().parent


def auto_map_for(model: PreTrainedModel) -> dict[str, str]:
    """`auto_map` entries for the config and every head of the model's architecture."""
    package = importlib.import_module(type(model).__module__.rsplit(".", 1)[0])
    config_class = type(model.config)
    auto_map = {"AutoConfig": f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}"}
    for auto_name, model_class in package.AUTO_MAPPING.items():
        auto_map[auto_name] = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
    return auto_map


def save_pretrained_with_code(model: PreTrainedModel, save_directory: str | os.PathLike, **kwargs) -> Path:
    """`model.save_pretrained(save_directory)` plus the architecture's source files and an `auto_map` covering
    `AutoConfig`, `AutoModel` and every `AutoModelFor*` head, so that

        AutoModelForCausalLM.from_pretrained(save_directory, trust_remote_code=True)

    works on a machine with only `transformers` and `torch`. Extra `kwargs` go to `save_pretrained`
    (e.g. `safe_serialization`, `push_to_hub`, `repo_id`)."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = auto_map_for(model)
    copy_code(model, save_directory)  # first, so a `push_to_hub=True` in kwargs uploads it with the weights
    model.save_pretrained(save_directory, **kwargs)
    return save_directory


def has_code(model: PreTrainedModel) -> bool:
    """Whether the model is an hf-efficient architecture (whose source files a checkpoint can carry)."""
    return type(model).__module__.startswith("hf_efficient.models.")


def copy_code(model: PreTrainedModel, folder: str | os.PathLike) -> None:
    """Copy the source files of the model's architecture folder (all but `__init__.py`) into `folder`. With
    `model.config.auto_map = auto_map_for(model)` in the saved config, the folder loads with `trust_remote_code`."""
    for source in sorted(architecture_folder(model).glob("*.py")):
        if source.name != "__init__.py":
            shutil.copy(source, Path(folder) / source.name)
