"""Model resolution: what `--model` / a checkpoint names (a registered architecture, a preset, a checkpoint folder or
a Hub id), the checks that it fits the task, the config of a new model, and the model itself."""

import difflib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hf_efficient

from ..errors import TaskError, first_line
from .outputs import WEIGHT_FILES, has_weights, last_complete_checkpoint, staging_folder, weight_files
from .tasks import TASKS, Task, TaskData, task_of_architecture, task_of_auto

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # hf_efficient/ (the presets of a wheel: hf_efficient/model_cards)
REPO_ROOT = PACKAGE_ROOT.parent


def preset_folders() -> dict[str, Path]:
    """Presets: `model_cards/<name>/config.json` shipped in the package (an installed wheel), beside the package
    (a source checkout or editable install) and in the current folder; the first of a name wins."""
    presets = {}
    for root in (PACKAGE_ROOT / "model_cards", REPO_ROOT / "model_cards", Path.cwd() / "model_cards"):
        if root.is_dir():
            for config in sorted(root.glob("*/config.json")):
                presets.setdefault(config.parent.name, config.parent)
    return presets


@dataclass
class ModelSource:
    kind: str  # "architecture", "preset" or "checkpoint"
    name: str
    path: str | None  # folder or Hub id (preset, checkpoint)
    model_type: str
    config: object | None  # the loaded config (preset, checkpoint); None for an architecture
    task: str | None  # the task the source was made for, when it says
    trust_remote_code: bool = False  # only for model types hf-efficient does not register
    # A preset's own training defaults (its card's "training": `block_size` and `PRESET_TRAINING_KEYS`, checked
    # when the card is read), between the task's defaults and the flags: the main job's preset trains on 8 x 512.
    training: dict = field(default_factory=dict)


def resolve_model(name: str, trust_remote_code: bool = False) -> ModelSource:
    """`name` = a folder (preset or checkpoint), a registered architecture (`gmlp`), a preset name, or a Hub id."""
    from transformers import AutoConfig

    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise TaskError(f"model folder {name!r} has no config.json")
        if has_weights(folder):
            check_weight_files(folder)
            return _from_folder("checkpoint", name, str(folder), trust_remote_code)
        return _from_folder("preset", name, str(folder), trust_remote_code)
    if folder.exists():
        raise TaskError(f"model {name!r} is a file; pass a folder with config.json, an architecture or a preset")
    if name in hf_efficient.ARCHITECTURES:
        return ModelSource("architecture", name, None, name, None, None)
    presets = preset_folders()
    if name in presets:
        return _from_folder("preset", name, str(presets[name]), trust_remote_code)
    if name.count("/") == 1 and not name.startswith((".", "/")):  # a Hub id (cached, or online)
        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        except Exception as error:
            raise TaskError(f"cannot load model {name!r} from the Hub or its cache: {first_line(error)}") from error
        return ModelSource(
            "checkpoint", name, name, config.model_type, config, _task_of_config(config, None), trust_remote_code
        )
    raise TaskError(
        f"unknown model {name!r}: not a folder with config.json, a registered architecture "
        f"({', '.join(sorted(hf_efficient.ARCHITECTURES))}) or a preset ({', '.join(sorted(presets)) or 'none found'})"
    )


def _from_folder(kind: str, name: str, path: str, trust_remote_code: bool) -> ModelSource:
    from transformers import AutoConfig

    check_model_type(Path(path) / "config.json", trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as error:
        raise TaskError(f"cannot load the config of {name!r}: {first_line(error)}") from error
    card = Path(path) / "card.json"
    card_values = {}
    if card.is_file():
        try:
            card_values = json.loads(card.read_text())
        except json.JSONDecodeError:
            card_values = {}
    training = (card_values.get("training") or {}) if kind == "preset" else {}
    check_preset_training(name, card, training)
    display = Path(path).resolve().name if kind == "checkpoint" else name
    return ModelSource(
        kind,
        display,
        path,
        config.model_type,
        config,
        _task_of_config(config, card_values.get("task")),
        trust_remote_code,
        training,
    )


# The options a preset's card may default (`"training"`) besides `block_size`: the ones the tasks default too.
PRESET_TRAINING_KEYS = ("max_steps", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate")


def check_preset_training(name: str, card: Path, training) -> None:
    """A card's training defaults must be an object of `block_size` and `PRESET_TRAINING_KEYS`."""
    if not isinstance(training, dict):
        raise TaskError(f'{str(card)!r}: "training" must be an object of training defaults, got {training!r}')
    unknown = sorted(set(training) - {"block_size", *PRESET_TRAINING_KEYS})
    if unknown:
        raise TaskError(
            f"preset {name!r}: its card.json's training default(s) {', '.join(unknown)} cannot be set by a "
            f"preset (allowed: block_size, {', '.join(PRESET_TRAINING_KEYS)})"
        )


def check_model_type(config_file: Path, trust_remote_code: bool) -> None:
    """The `model_type` of a folder's config.json must be one transformers knows (hf-efficient's are registered), or
    a type whose code the folder ships (`auto_map`, with --trust-remote-code): else name it and the valid types."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        saved = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise TaskError(f"{str(config_file)!r} is not a valid JSON config: {first_line(error)}") from error
    model_type = saved.get("model_type") if isinstance(saved, dict) else None
    if model_type in CONFIG_MAPPING or (trust_remote_code and "AutoConfig" in (saved.get("auto_map") or {})):
        return
    ours = sorted(hf_efficient.ARCHITECTURES)
    close = difflib.get_close_matches(str(model_type), [*ours, *CONFIG_MAPPING.keys()], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TaskError(
        f"{str(config_file)!r} names model_type {model_type!r}, which is not registered{hint} (hf-efficient's "
        f"types: {', '.join(ours)}; any transformers model type also loads, and another type's shipped code with "
        "--trust-remote-code)"
    )


def check_weight_files(folder: Path) -> None:
    """Every safetensors file of the folder must be whole (a run killed while saving leaves a truncated one): the
    error names the file and, where the folder (or its `.partial` staging folder) has one, the last good
    checkpoint."""
    from safetensors import safe_open

    for path in weight_files(folder):
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
            problem = None if path.stat().st_size > 8 else "empty"
        except Exception as error:  # safetensors raises its own error type for a damaged header or a short file
            problem = first_line(error)
        if problem is not None:
            good = last_complete_checkpoint(folder)[0] or last_complete_checkpoint(staging_folder(folder))[0]
            advice = f"; the last good checkpoint is {str(good)!r}: pass it instead" if good else ""
            raise TaskError(f"the weights file {str(path)!r} is damaged or truncated ({problem}){advice}")


def _task_of_config(config, card_task: str | None) -> str | None:
    if card_task in TASKS:
        return card_task
    return next(filter(None, map(task_of_architecture, getattr(config, "architectures", None) or [])), None)


def check_task_head(source: ModelSource, task: Task) -> None:
    """The model must have a head for the task (a one-line error listing the tasks it has otherwise)."""
    import transformers

    if source.model_type in hf_efficient.ARCHITECTURES:
        mapping = hf_efficient.get_architecture(source.model_type).AUTO_MAPPING
        if task.auto_class not in mapping:
            tasks = ", ".join(sorted(filter(None, map(task_of_auto, mapping)))) or "none"
            raise TaskError(
                f"architecture {source.model_type!r} has no head for task {task.name!r} ({task.auto_class}); "
                f"its tasks: {tasks}"
            )
    elif source.config is not None:
        auto = getattr(transformers, task.auto_class)
        remote = task.auto_class in (getattr(source.config, "auto_map", None) or {})
        if not remote and type(source.config) not in auto._model_mapping:
            raise TaskError(f"model {source.name!r} ({source.model_type}) has no head for task {task.name!r}")
    if source.config is not None:
        task.check_config(source.config.to_dict(), source.name)


def announce_new_model(source: ModelSource, model_name: str) -> None:
    """`train --model FOLDER` on a folder without weights trains a new (randomly initialised) model from its
    config.json: say so in one line. A training output without weights (e.g. an unfinished run's `.partial` folder,
    whose weights are in its checkpoints) is an error naming the checkpoint to pass instead."""
    folder = Path(model_name).expanduser()
    if source.kind != "preset" or not folder.is_dir():
        return
    found, _ = last_complete_checkpoint(folder)
    if found is not None or (folder / "trainer_state.json").is_file():
        advice = f": pass --model {found} to fine-tune its last checkpoint" if found else ""
        raise TaskError(f"model folder {str(folder)!r} is a training run without final weights{advice}")
    print(
        f"hf-efficient: {str(folder)!r} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])}): training "
        "a new, randomly initialised model from its config",
        file=sys.stderr,
        flush=True,
    )


def parse_overrides(text: str | None) -> dict:
    """`"hidden_size=128,num_hidden_layers=4,hidden_act=gelu"` -> dict (values read as JSON when they parse)."""
    overrides = {}
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TaskError(f"--config-overrides item {item!r} is not key=value")
        try:
            overrides[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key.strip()] = {"None": None, "True": True, "False": False}.get(value.strip(), value.strip())
    return overrides


def config_values(source: ModelSource, task: Task, overrides: dict) -> tuple[type, dict]:
    """(config class, config values) of a new model before its data: the source's config, or the architecture's
    defaults with the task's `new_model` sizes; the task's `new_config` (not for a checkpoint). Overrides come last,
    in `build_config`; unknown override fields are an error here."""
    from transformers import PreTrainedConfig

    if source.config is not None:
        config_class, base = type(source.config), source.config.to_dict()
    else:
        config_class = hf_efficient.get_config_class(source.model_type)
        base = config_class().to_dict()
    unknown = sorted(set(overrides) - set(base) - set(PreTrainedConfig().to_dict()))
    if unknown:
        raise TaskError(
            f"unknown config field(s) {', '.join(unknown)} for {source.model_type!r}; fields: {', '.join(sorted(base))}"
        )
    values = dict(base)
    if source.kind == "architecture":
        values.update({k: v for k, v in task.new_model.items() if k in base})
    if source.kind != "checkpoint":
        values.update({k: v for k, v in task.new_config.items() if k in base})
    return config_class, values


def build_config(config_class: type, values: dict, data: TaskData, overrides: dict):
    """The config, built once: `values` + what the data sets (image size, labels) + the user's overrides, validated
    by the config class."""
    values = {**values, **data.config_updates}
    if data.label_names is not None:
        values["id2label"] = dict(enumerate(data.label_names))
        values["label2id"] = {name: i for i, name in enumerate(data.label_names)}
        values.pop("num_labels", None)
    values.update(overrides)
    values.pop("transformers_version", None)
    try:
        return config_class.from_dict(values)
    except (ValueError, TypeError) as error:
        raise TaskError(first_line(error)) from error


def create_model(task: Task, source: ModelSource, config, new_head: bool = False):
    """A new model from `config` (architecture, preset) or the checkpoint's weights (`new_head`: a new classifier)."""
    import transformers

    auto = getattr(transformers, task.auto_class)
    try:
        if source.kind == "checkpoint":
            # hf-efficient's own classes are registered: remote code is only for other model types.
            remote = source.trust_remote_code and source.model_type not in hf_efficient.ARCHITECTURES
            kwargs = {"config": config, "trust_remote_code": remote, "output_loading_info": True}
            if new_head:
                kwargs["ignore_mismatched_sizes"] = True
            model, info = auto.from_pretrained(source.path, **kwargs)
            check_loaded_weights(model, info, source, new_head)
            return model
        return auto.from_config(config)
    except TaskError:
        raise
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise TaskError(f"cannot build a {task.auto_class} from {source.name!r}: {first_line(error)}") from error


def check_loaded_weights(model, info: dict, source: ModelSource, new_head: bool) -> None:
    """A checkpoint's weights must fit the model its config builds: a missing, unexpected or resized weight is an
    error (a config.json of another model type loads with every weight missing and would give a random model).
    With `new_head` (a new classifier on a checkpoint), only weights outside the base model (the head's) may be
    missing, unexpected (the old head's) or resized."""
    prefix = f"{getattr(model, 'base_model_prefix', '') or 'model'}."
    problems = {
        "missing": sorted(info.get("missing_keys") or ()),
        "unexpected": sorted(info.get("unexpected_keys") or ()),
        "resized": sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys") or ()),
    }
    if new_head:
        problems = {kind: [k for k in keys if k.startswith(prefix)] for kind, keys in problems.items()}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if not problems:
        return
    shown = "; ".join(
        f"{len(keys)} {kind} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
        for kind, keys in problems.items()
    )
    raise TaskError(
        f"the weights of {source.path!r} do not fit the {type(model).__name__} its config.json (model_type "
        f"{source.model_type!r}) builds: {shown}; is config.json from another model?"
    )


def load_checkpoint(checkpoint_args, task_name: str | None = None, generating: bool = False):
    """(source, task, model, processing class) of a saved checkpoint. `generating`: the checkpoint's task if that
    task generates (`Task.default_prompt`: clm, seq2seq), else clm."""
    source = resolve_model(checkpoint_args.checkpoint, checkpoint_args.trust_remote_code)
    if source.kind != "checkpoint":
        raise TaskError(f"{checkpoint_args.checkpoint!r} has no weights (a preset?): train it first")
    if generating:
        own = TASKS.get(source.task or "")
        task_name = own.name if own is not None and own.default_prompt is not None else "clm"
    task_name = task_name or source.task
    if task_name is None:
        raise TaskError(f"cannot tell the task of {checkpoint_args.checkpoint!r}: pass --task")
    task = TASKS[task_name]
    check_task_head(source, task)
    check_causal(source, task)
    model = create_model(task, source, source.config)
    processing = task.load_processing(source.path, own=True, config=model.config.to_dict())
    return source, task, model, processing


def check_causal(source: ModelSource, task: Task) -> None:
    """A masked-LM (bidirectional) checkpoint cannot evaluate or generate as a causal LM: its weights were trained
    to see both sides, and a causal head would silently give a wrong model."""
    if task.name != "clm" or source.task == "clm":  # a saved causal-LM head is causal whatever the config says
        return
    causal = getattr(source.config, "causal", None)
    if source.task == "mlm" or (source.task is None and causal is False):
        head = (getattr(source.config, "architectures", None) or ["?"])[0]
        raise TaskError(
            f"{source.path!r} is a masked-LM / bidirectional checkpoint ({head}, causal={causal}): it cannot "
            "generate or be evaluated as a causal LM; evaluate it with --task mlm, or fine-tune it into a causal "
            "LM with `hf-efficient train --model <folder> --task clm`"
        )


def accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()
