"""Saving checkpoints that load with `trust_remote_code=True` where hf-efficient is not installed.

In the package, an architecture folder (`hf_efficient/models/<arch>/`) imports the code every architecture shares
from its one copy, `hf_efficient/models/shared/`, as `from ..shared.common import ...`. Remote code only follows
`from .x import y` to files of the checkpoint folder itself, so a saved checkpoint carries a flat bundle: the
architecture's own files with those imports rewritten to `from .common import ...`, plus the shared files it needs
(and those they import), byte for byte.
"""

import importlib
import os
import re
from pathlib import Path

from transformers import PreTrainedModel

from .models.shared.common import EfficientPreTrainedModel

MODELS_FOLDER = Path(__file__).resolve().parent / "models"
SHARED_FOLDER = MODELS_FOLDER / "shared"
# `from ..shared.common import x` (an architecture file) -> `from .common import x` (a flat checkpoint folder)
SHARED_IMPORT = re.compile(r"^(?P<indent>[ \t]*)from \.\.shared\.(?P<module>\w+) import", re.MULTILINE)
# `from .common import x` (a shared file importing another shared file, or a rewritten architecture file)
FLAT_IMPORT = re.compile(r"^[ \t]*from \.(?P<module>\w+) import", re.MULTILINE)


def architecture_folder(model: PreTrainedModel | type) -> Path:
    """The source folder of a model's architecture (`hf_efficient/models/<arch>/`)."""
    model_class = model if isinstance(model, type) else type(model)
    module = importlib.import_module(model_class.__module__)
    return Path(module.__file__).resolve().parent


def auto_map_for(model: PreTrainedModel) -> dict[str, str]:
    """`auto_map` entries for the config and every head of the model's architecture."""
    package = importlib.import_module(type(model).__module__.rsplit(".", 1)[0])
    config_class = type(model.config)
    auto_map = {"AutoConfig": f"{config_class.__module__.rsplit('.', 1)[-1]}.{config_class.__name__}"}
    for auto_name, model_class in package.AUTO_MAPPING.items():
        auto_map[auto_name] = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
    return auto_map


def flatten_imports(source: str) -> str:
    """An architecture file's text with its shared imports rewritten to the flat form remote code follows."""
    return SHARED_IMPORT.sub(lambda match: f"{match['indent']}from .{match['module']} import", source)


def bundle_files(folder: str | os.PathLike) -> dict[str, str]:
    """The flat, self-contained bundle of an architecture folder: file name -> text. Its own files (all but
    `__init__.py`) with shared imports flattened, and every shared file they reach (transitively), unchanged;
    shared files the architecture does not use stay out."""
    folder = Path(folder)
    bundle = {path.name: flatten_imports(path.read_text()) for path in sorted(folder.glob("*.py"))}
    bundle.pop("__init__.py", None)
    pending = [text for text in bundle.values()]
    while pending:
        for match in FLAT_IMPORT.finditer(pending.pop()):
            name = f"{match['module']}.py"
            if name not in bundle:
                if not (SHARED_FOLDER / name).is_file():
                    raise FileNotFoundError(
                        f"{folder.name} imports .{match['module']}, which is neither its own file "
                        f"nor a file of {SHARED_FOLDER}"
                    )
                bundle[name] = (SHARED_FOLDER / name).read_text()
                pending.append(bundle[name])
    return bundle


def has_code(model: PreTrainedModel) -> bool:
    """Whether the model is an hf-efficient architecture (whose source files a checkpoint can carry)."""
    return type(model).__module__.startswith("hf_efficient.models.")


def copy_code(model: PreTrainedModel, folder: str | os.PathLike) -> None:
    """Write the flat bundle of the model's architecture (`bundle_files`) into `folder`. With
    `model.config.auto_map = auto_map_for(model)` in the saved config, the folder loads with `trust_remote_code`."""
    for name, text in bundle_files(architecture_folder(model)).items():
        (Path(folder) / name).write_text(text)


def save_pretrained_with_code(model: PreTrainedModel, save_directory: str | os.PathLike, *args, **kwargs) -> Path:
    """`model.save_pretrained(save_directory)` plus the architecture's flat code bundle and an `auto_map` covering
    `AutoConfig`, `AutoModel` and every `AutoModelFor*` head, so that

        AutoModelForCausalLM.from_pretrained(save_directory, trust_remote_code=True)

    works on a machine with only `transformers` and `torch`. Extra arguments go to `save_pretrained`
    (e.g. `safe_serialization`, `push_to_hub`, `repo_id`)."""
    save_directory = Path(save_directory)
    save_directory.mkdir(parents=True, exist_ok=True)
    model.config.auto_map = auto_map_for(model)
    copy_code(model, save_directory)  # first, so a `push_to_hub=True` in kwargs uploads it with the weights
    model_class = type(model)
    # A class registered with `register_for_auto_class` would make transformers' own saver copy the package files
    # as they are (with `from ..shared` imports it cannot follow); the bundle above replaces that step.
    unset = object()
    registered = model_class.__dict__.get("_auto_class", unset)
    model_class._auto_class = None
    try:
        PreTrainedModel.save_pretrained(model, save_directory, *args, **kwargs)
    finally:
        if registered is unset:
            del model_class._auto_class
        else:
            model_class._auto_class = registered
    return save_directory


# `register_for_auto_class` + `save_pretrained` on a model of the package writes the same flat bundle (see
# `EfficientPreTrainedModel.save_with_code`; the shared code cannot import this module, which remote code lacks).
EfficientPreTrainedModel.save_with_code = save_pretrained_with_code
