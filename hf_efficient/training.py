"""What the `hf-efficient` command does, as one pipeline per command:

    train:    resolve the model (architecture, preset or checkpoint) -> the task -> TrainArguments -> the task's data
              -> the config (built once) -> the model -> the task's Trainer (Seq2SeqTrainer for seq2seq) -> a
              Hub-ready folder (staged in <out>.partial)
    evaluate: load a checkpoint -> the task's validation data -> Trainer.evaluate (seq2seq: generating)
    generate: load a causal LM or seq2seq checkpoint -> generate()
    publish:  load a checkpoint -> (evaluate) -> a Hub-ready folder -> upload

The `run_*` functions take the argument dataclasses of `hf_efficient.cli` and raise `TaskError` for anything the
user can fix; the CLI turns that into a one-line message. Everything task-specific is in `hf_efficient.tasks`.
"""

import copy
import difflib
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import PrinterCallback

import hf_efficient

from . import model_card
from .cli import DEFAULT_MAX_NEW_TOKENS, TrainArguments
from .hub import auto_map_for, copy_code, has_code
from .models.shared.heads import sequence_length_limit
from .tasks import TASKS, Task, TaskData, TaskError, first_line, task_of_architecture, task_of_auto

PACKAGE_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_ROOT.parent
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STAGING_SUFFIX = ".partial"


# ----------------------------------------------------------------------------------------------- model resolution
def preset_folders() -> dict[str, Path]:
    """Presets: `model_cards/<name>/config.json` shipped in the package (an installed wheel), beside the package
    (a source checkout or editable install) and in the current folder; the first of a name wins."""
    presets = {}
    for root in (PACKAGE_ROOT / "model_cards", REPO_ROOT / "model_cards", Path.cwd() / "model_cards"):
        if root.is_dir():
            for config in sorted(root.glob("*/config.json")):
                presets.setdefault(config.parent.name, config.parent)
    return presets


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES) or any(folder.glob("model-*.safetensors"))


@dataclass
class ModelSource:
    kind: str  # "architecture", "preset" or "checkpoint"
    name: str
    path: str | None  # folder or Hub id (preset, checkpoint)
    model_type: str
    config: object | None  # the loaded config (preset, checkpoint); None for an architecture
    task: str | None  # the task the source was made for, when it says
    trust_remote_code: bool = False  # only for model types hf-efficient does not register


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
    card_task = None
    if card.is_file():
        try:
            card_task = json.loads(card.read_text()).get("task")
        except json.JSONDecodeError:
            card_task = None
    display = Path(path).resolve().name if kind == "checkpoint" else name
    return ModelSource(
        kind, display, path, config.model_type, config, _task_of_config(config, card_task), trust_remote_code
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


def weight_files(folder: Path) -> list[Path]:
    names = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    return names + sorted(folder.glob("model-*.safetensors"))


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


def default_generation_config(model, tokenizer, task: Task | None = None):
    """The decoding settings saved with a checkpoint of a task that generates (`Task.generation`: sampling for clm,
    the default `task`, greedy for seq2seq) and the special tokens. No length (`max_new_tokens` / `max_length`): a saved length would win
    over a caller's `max_length` in transformers; `hf-efficient generate` has its own default
    (`cli.DEFAULT_MAX_NEW_TOKENS`, capped by the model's position limit)."""
    from transformers import GenerationConfig

    tokens = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(model.config, "bos_token_id", None),
    )
    if getattr(model.config, "is_encoder_decoder", False):
        tokens["decoder_start_token_id"] = getattr(model.config, "decoder_start_token_id", None)
    return GenerationConfig(**(task or TASKS["clm"]).generation, **tokens)


# ------------------------------------------------------------------------------------------------ run environment
def staging_folder(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + STAGING_SUFFIX)


# What a run writes into its output folder (top-level names; `fnmatch` patterns). With --overwrite-output-dir, an
# existing folder is replaced only if everything in it is one of these (an earlier run's output): anything else is the
# user's and is never deleted (the run refuses the folder instead).
RUN_OUTPUT_PATTERNS = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.jinja",
    "all_results.json",
    "train_results.json",
    "eval_results.json",
    "trainer_state.json",
    "training_args.bin",
    "checkpoint-*",
    "runs",
)


def _code_file_names() -> set[str]:
    """The source files a checkpoint carries for trust_remote_code (those of every registered architecture)."""
    return {path.name for path in (PACKAGE_ROOT / "models").glob("*/*.py") if path.name != "__init__.py"}


def is_run_output(path: Path) -> bool:
    """Whether `path` (an entry of an output folder) is something an hf-efficient run writes there."""
    import fnmatch

    if path.name == "README.md":
        return model_card.is_generated(path)  # a hand-written README is the user's
    if path.name in _code_file_names():
        return path.is_file()
    return any(fnmatch.fnmatch(path.name, pattern) for pattern in RUN_OUTPUT_PATTERNS)


def foreign_entries(folder: Path) -> list[str]:
    """The entries of `folder` that no run wrote (the user's files)."""
    return sorted(p.name for p in folder.iterdir() if not is_run_output(p))


def checkpoint_problem(folder: Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (None: it is complete). The Trainer writes
    trainer_state.json last, so a run killed while saving leaves it missing, empty or cut short."""
    state = folder / "trainer_state.json"
    if not state.is_file():
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:4]) or "nothing"
        return f"no trainer_state.json (it holds {present}): killed while saving"
    try:
        steps = json.loads(state.read_text()).get("global_step")
    except (OSError, json.JSONDecodeError, AttributeError):
        return (
            f"trainer_state.json is {'empty' if state.stat().st_size == 0 else 'not valid JSON'}: killed while saving"
        )
    if not isinstance(steps, int):
        return "trainer_state.json has no global_step"
    if not has_weights(folder):
        return "no model weights"
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            try:
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            except Exception as error:
                return f"{path.name} is damaged ({first_line(error)})"
    return None


def last_complete_checkpoint(folder: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest complete `checkpoint-N` of `folder`, [(newer incomplete checkpoint, why)])."""
    import re

    if not folder.is_dir():
        return None, []
    numbered = []
    for path in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if match and path.is_dir():
            numbered.append((int(match.group(1)), path))
    skipped = []
    for _, path in sorted(numbered, reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def check_output_location(final: Path) -> None:
    """The run writes into `<final>.partial` beside `final` and renames it into place at the end: check, before any
    training, that this rename can happen (a writable parent folder on the same file system, not a mount point)."""
    if final == Path(final.anchor):
        raise TaskError(f"--output-dir {str(final)!r} is a file-system root: pass a folder inside it")
    if os.path.ismount(final):
        raise TaskError(
            f"--output-dir {str(final)!r} is a mount point: the run writes into {str(staging_folder(final))!r} and "
            "renames it into place at the end, which a mount point cannot take; pass a folder inside it"
        )
    parent = final.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise TaskError(f"cannot create --output-dir {str(final)!r}: {str(parent)!r} is not a folder")
    try:  # a real probe: permissions, read-only file systems and root all answer truthfully
        probe = Path(tempfile.mkdtemp(prefix=".hf-efficient-probe-", dir=parent))
        moved = probe.with_name(probe.name + "-renamed")
        probe.rename(moved)
        moved.rmdir()
    except OSError as error:
        raise TaskError(
            f"cannot write the output folder {str(final)!r}: its parent {str(parent)!r} does not allow creating and "
            f"renaming folders ({first_line(error)}); pass another --output-dir"
        ) from error


def prepare_output(
    output_dir: str, overwrite: bool, resume: str | None, dataset: str | None = None, staging_ok: bool = False
) -> tuple[Path, Path, str | None]:
    """Check the output folder and its staging folder (`<out>.partial`, where a run writes until it is complete);
    returns (final, staging, the checkpoint to resume from). Nothing is deleted here. `staging_ok`: a leftover
    staging folder is no unfinished training run (publish)."""
    final = Path(output_dir).expanduser().resolve()
    staging = staging_folder(final)
    check_output_location(final)
    if final.exists() and not final.is_dir():
        raise TaskError(f"--output-dir {str(final)!r} is a file: pass a folder")
    if final.is_dir() and any(final.iterdir()):
        if not overwrite:
            raise TaskError(f"output folder {str(final)!r} already exists; pass --overwrite-output-dir or another one")
        foreign = foreign_entries(final)
        inside = [p for p in (Path.cwd(), Path(dataset).expanduser().resolve() if dataset else None) if p]
        inside = [p for p in inside if p == final or final in p.parents]
        if inside:
            foreign = sorted({*foreign, *(str(p) for p in inside)})
        if foreign:
            shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
            raise TaskError(
                f"--overwrite-output-dir replaces only an earlier run's output, but {str(final)!r} also holds files "
                f"the command did not write ({shown}); they are never deleted: pass another --output-dir, or move "
                "them out"
            )
    if resume == "last":
        found, skipped = last_complete_checkpoint(staging)
        for path, why in skipped:
            print(f"hf-efficient: skipping the incomplete checkpoint {path.name} ({why})", file=sys.stderr)
        if found is None:
            where = f"; incomplete: {', '.join(p.name for p, _ in skipped)}" if skipped else ""
            raise TaskError(
                f"--resume-from-checkpoint: no complete checkpoint-* folder in {str(staging)!r} to resume from{where}"
            )
        print(f"hf-efficient: resuming from {found}", file=sys.stderr)
        resume = str(found)
    elif resume is not None:
        folder = Path(resume).expanduser()
        problem = checkpoint_problem(folder) if folder.is_dir() else "not a folder"
        if problem is not None:
            good = last_complete_checkpoint(folder.parent)[0] if folder.parent.is_dir() else None
            advice = f"; the last complete one is {str(good)!r}" if good and good != folder else ""
            raise TaskError(
                f"--resume-from-checkpoint {resume!r} is not a complete Trainer checkpoint ({problem}){advice}"
            )
    elif staging.exists() and any(staging.iterdir()) and not overwrite and not staging_ok:
        raise TaskError(
            f"{str(staging)!r} holds an unfinished run: pass --resume-from-checkpoint to continue it "
            "or --overwrite-output-dir to start over"
        )
    return final, staging, resume


def remove_incomplete_checkpoints(staging: Path, resume: str | None) -> None:
    """Before resuming: the run's own half-written checkpoints newer than the one it resumes from are removed (the
    Trainer would otherwise rotate complete ones away in their favour, or save into them)."""
    if resume is None or Path(resume).parent.resolve() != staging.resolve():
        return
    for path, why in last_complete_checkpoint(staging)[1]:
        print(f"hf-efficient: removing the incomplete checkpoint {path} ({why})", file=sys.stderr)
        shutil.rmtree(path)


def install_output(staging: Path, final: Path) -> None:
    """Move the finished run into place. A new folder is one rename. An existing one (--overwrite-output-dir) loses
    only an earlier run's output (`is_run_output`); anything else in it stays."""
    if final.is_dir():
        for item in final.iterdir():
            if is_run_output(item):
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
    cwd = Path.cwd().resolve()
    if final.is_dir() and not any(final.iterdir()) and cwd != final and final not in cwd.parents:
        final.rmdir()
    if not final.exists():
        staging.rename(final)
        return
    for item in staging.iterdir():  # user files appeared during the run: replace only the run's entries
        target = final / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def training_arguments(values: dict, task: Task, staging: Path, resume: str | None) -> TrainArguments:
    """`TrainArguments` from the parsed flags, the task's defaults for those not given, and the staging folder."""
    values = dict(values, output_dir=str(staging), resume_from_checkpoint=resume)
    values.update({k: v for k, v in task.training.items() if values.get(k) is None})
    if values.get("predict_with_generate") is None:
        values["predict_with_generate"] = False
    if values["per_device_eval_batch_size"] is None:
        values["per_device_eval_batch_size"] = values["per_device_train_batch_size"]
    values["remove_unused_columns"] = task.remove_unused_columns
    if values.pop("gradient_checkpointing"):  # (its current name; the old one warns)
        values["activation_checkpointing"] = True
    if values["use_cpu"] is None:
        # Without it, `accelerate launch` on a CPU-only machine starts N processes that each train alone.
        values["use_cpu"] = not accelerator_available()
    try:
        return TrainArguments(**values)
    except (ValueError, TypeError) as error:
        raise TaskError(f"invalid training arguments: {first_line(error)}") from error


class TimeBudget:
    """`--max-train-minutes`: stop training (cleanly: evaluation and saving still run) once the budget is spent.
    Rank 0's clock decides, broadcast to every process, so that all of them stop at the same step."""

    def __init__(self, minutes: float):
        from transformers import TrainerCallback

        budget = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.started = time.time()

            def on_step_end(self, args, state, control, **kwargs):
                if budget.over():
                    budget.stopped_at = state.global_step
                    control.should_training_stop = True

        self.seconds = minutes * 60
        self.started = time.time()
        self.stopped_at = None
        self.callback = Callback()

    def over(self) -> bool:
        import torch

        flag = torch.tensor([float(time.time() - self.started > self.seconds)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(flag, src=0)
        return bool(flag.item())


class LogAtSave(TrainerCallback):
    """Log the training loss at every checkpoint step, so that a checkpoint's log history covers every step up to
    it and a resumed run can report the loss of the whole run (`whole_run_loss`)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True


def checkpoint_step(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def checkpoint_finished(checkpoint: str) -> bool:
    """Whether a checkpoint was written at the last step of its run (its `max_steps`)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return 0 < int(state.get("max_steps") or 0) <= int(state["global_step"])


def whole_run_loss(state, resumed_from: int, resumed_loss: float | None) -> dict:
    """`train_loss` of a resumed run over the whole run: the checkpoint's logged losses (each the mean over the
    steps since the previous log) up to the step it resumed from, plus the resumed part's mean loss."""
    steps = state.global_step - resumed_from
    total, covered, previous = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and entry.get("step", 0) <= resumed_from:
            total += entry["loss"] * (entry["step"] - previous)
            previous = covered = entry["step"]
    if steps > 0 and resumed_loss is not None:
        total += resumed_loss * steps
        covered += steps
    values = {"resumed_from_step": resumed_from, "train_loss_resumed_part": resumed_loss}
    if covered:
        values["train_loss"] = total / covered
        values["train_loss_steps"] = covered  # the steps the loss covers (all of them, unless logs are missing)
    return values


def command_line() -> str:
    return shlex.join(["hf-efficient", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "hf-efficient"


def versions() -> str:
    import torch
    import transformers

    return (
        f"hf-efficient {hf_efficient.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def finite(metrics: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def _write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(finite(values), indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------- train
def run_train(model_args, data_args, training_values: dict, callbacks=()) -> Path:
    """`hf-efficient train` (`training_values`: the parsed `TrainArguments` fields): returns the finished folder."""
    import torch
    import transformers
    from transformers import set_seed

    started = time.time()
    overrides = parse_overrides(model_args.config_overrides)
    model_name = model_args.model_name_or_path or TASKS[model_args.task or "clm"].default_model
    source = resolve_model(model_name, model_args.trust_remote_code)
    task = TASKS[model_args.task or source.task or "clm"]
    check_task_head(source, task)
    announce_new_model(source, model_name)
    config_class, values = config_values(source, task, overrides)
    output_dir = training_values["output_dir"] or str(Path("out") / f"{Path(model_name).name or 'model'}-{task.name}")
    final, staging, resume = prepare_output(
        output_dir,
        training_values["overwrite_output_dir"],
        training_values["resume_from_checkpoint"],
        data_args.dataset,
    )
    args = training_arguments(training_values, task, staging, resume)

    sized_by_data = source.kind == "architecture"  # a new model may take its image size from the data
    draft = {**values, **overrides}
    with args.main_process_first(desc="data"):
        processing = task.load_processing(source.path, source.kind == "checkpoint", None if sized_by_data else draft)
        data = task.load_data(
            data_args,
            processing,
            draft,
            seed=args.seed,
            sized_by_data=sized_by_data,
            config_class=config_class,
            new_model=source.kind != "checkpoint",
        )
    config = build_config(config_class, values, data, overrides)
    compute_metrics = data.compute_metrics
    if data.generation_max_length is not None:  # the metrics score generated text
        if not args.predict_with_generate:
            compute_metrics = None  # --predict-with-generate false: the loss only
        elif args.generation_max_length is None:
            args.generation_max_length = data.generation_max_length
    set_seed(args.seed)
    model = create_model(task, source, config, new_head=data.label_names is not None or source.task != task.name)
    generation_config = None
    if task.generation is not None and hasattr(model, "generation_config"):
        generation_config = default_generation_config(model, data.processing, task)
        model.generation_config = copy.deepcopy(generation_config)
    if args.should_save:
        if staging.exists() and resume is None:
            shutil.rmtree(staging)  # an unfinished earlier run (--overwrite-output-dir): the run's own folder
        remove_incomplete_checkpoints(staging, resume)
        staging.mkdir(parents=True, exist_ok=True)

    budget = TimeBudget(args.max_train_minutes) if args.max_train_minutes else None
    trainer = getattr(transformers, task.trainer)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=data.collator,
        processing_class=data.processing,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        callbacks=[*callbacks, LogAtSave(), *([budget.callback] if budget else [])],
    )
    main = trainer.is_world_process_zero()
    if main:
        print(
            f"hf-efficient: training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, {source.kind} {source.name!r}) for {task.name} on {data.description}; "
            f"{args.world_size} process(es) on {args.device.type}; writing {final}",
            flush=True,
        )
    if resume is not None and checkpoint_finished(resume):
        # Killed after its last checkpoint (during the final evaluation or save): the Trainer would run one step
        # past max_steps, so load the checkpoint's weights and state, and evaluate and save as usual.
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        metrics = {}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    if resume is not None:
        metrics.update(whole_run_loss(trainer.state, checkpoint_step(resume), metrics.get("train_loss")))
    eval_metrics = trainer.evaluate()
    eval_metrics.update(task.metrics_from_loss(eval_metrics, data))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    results = {
        **metrics,
        **eval_metrics,
        "task": task.name,
        "model": model_name,
        "model_source": source.kind,
        "dataset": data.description,
        "dataset_path": data_args.dataset,
        "global_step": trainer.state.global_step,
        "max_steps": args.max_steps,
        "stopped_by_time_budget": bool(budget and budget.stopped_at is not None),
        "world_size": args.world_size,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "command": command_line(),
        "versions": versions(),
    }
    if has_code(unwrapped):  # config.json gets an auto_map, the folder the code: it loads with trust_remote_code
        unwrapped.config.auto_map = auto_map_for(unwrapped)
    if generation_config is not None:  # (Seq2SeqTrainer's evaluation fills in every default, `max_length` included)
        unwrapped.generation_config = generation_config
    trainer.save_model(str(staging))
    if main:
        if has_code(unwrapped):
            copy_code(unwrapped, staging)
        trainer.save_state()
        results["wall_time_s"] = round(time.time() - started, 1)
        results = finite(results)
        _write_json(staging / "train_results.json", metrics)
        _write_json(staging / "eval_results.json", eval_metrics)
        _write_json(staging / "all_results.json", results)
        (staging / "README.md").write_text(model_card.render(final.name, unwrapped.config, task.name, results))
        install_output(staging, final)
        _print_results(task.name, results, final)
    trainer.accelerator.wait_for_everyone()
    if main and task.default_prompt is not None and not args.no_sample:
        torch.manual_seed(args.seed)
        text = generate_text(unwrapped, data.processing, [task.default_prompt], {})[0]
        print(f"hf-efficient: sample (prompt {task.default_prompt!r}):\n" + text, flush=True)
    return final


def _print_results(task: str, results: dict, folder: Path) -> None:
    keys = [
        "train_loss",
        "eval_loss",
        "eval_bits_per_byte",
        "eval_perplexity",
        "eval_accuracy",
        "eval_bleu",
        "eval_chrf",
        "eval_exact_match",
        "global_step",
        "stopped_by_time_budget",
        "world_size",
        "train_runtime",
        "wall_time_s",
    ]
    shown = ", ".join(f"{k}={_fmt(results[k])}" for k in keys if k in results)
    print(f"hf-efficient: {task} finished: {shown}", flush=True)
    print(f"hf-efficient: saved a Hub-ready folder: {folder} (metrics in {folder / 'all_results.json'})", flush=True)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------------ evaluate, generate
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


def evaluate_checkpoint(task: Task, model, processing, data_args, eval_args) -> dict:
    """The task's metrics of a checkpoint on the validation data, with the task's Trainer; where the task scores
    generated text (seq2seq), evaluation generates (greedy, up to the data's `generation_max_length`)."""
    import transformers
    from transformers import Seq2SeqTrainingArguments

    data = task.load_data(data_args, processing, model.config.to_dict(), train=False, seed=eval_args.seed)
    if data.label_names is not None and getattr(model.config, "id2label", None):
        if len(model.config.id2label) != len(data.label_names):
            raise TaskError(
                f"the model has {len(model.config.id2label)} labels but the dataset has {len(data.label_names)} "
                f"({', '.join(map(str, data.label_names[:10]))})"
            )
    with tempfile.TemporaryDirectory() as scratch:
        args = Seq2SeqTrainingArguments(  # (TrainingArguments and the generation fields, read by Seq2SeqTrainer)
            output_dir=scratch,
            per_device_eval_batch_size=eval_args.per_device_eval_batch_size,
            report_to="none",
            use_cpu=not accelerator_available(),
            remove_unused_columns=task.remove_unused_columns,
            disable_tqdm=eval_args.disable_tqdm,
            predict_with_generate=data.generation_max_length is not None,
            generation_max_length=data.generation_max_length,
        )
        trainer = getattr(transformers, task.trainer)(
            model=model,
            args=args,
            eval_dataset=data.validation,
            data_collator=data.collator,
            processing_class=data.processing,
            compute_metrics=data.compute_metrics,
            preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        )
        trainer.remove_callback(PrinterCallback)  # (--disable-tqdm) the metrics are printed once, as JSON
        metrics = trainer.evaluate()
    metrics.update(task.metrics_from_loss(metrics, data))
    metrics.update(task=task.name, dataset=data.description, dataset_path=data_args.dataset)
    return finite(metrics)


def run_evaluate(checkpoint_args, data_args, eval_args) -> dict:
    _, task, model, processing = load_checkpoint(checkpoint_args, eval_args.task)
    metrics = evaluate_checkpoint(task, model, processing, data_args, eval_args)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    if eval_args.output_file:
        Path(eval_args.output_file).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def generate_text(model, tokenizer, prompts: list[str], settings: dict) -> list[str]:
    """Prompts -> generated texts, the checkpoint's generation config updated by `settings`. A causal LM continues
    the prompt (left-padded, no special tokens; the text includes the prompt); an encoder-decoder reads each prompt
    as its source, encoded as in training (with eos), and the text is the decoder's output alone."""
    import torch

    model.eval()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=encoder_decoder)
    prompt_length = encoded["input_ids"].shape[1]
    if prompt_length == 0 or not all(prompts):
        raise TaskError("the prompt is empty: pass --prompt with at least one character")
    settings = {k: v for k, v in settings.items() if v is not None}
    new_tokens = settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    if new_tokens <= 0:
        raise TaskError(f"--max-new-tokens must be positive, got {new_tokens}")
    limit = position_limit(model.config)
    if limit is not None and encoder_decoder:  # the source fills the encoder; the decoder starts with one token
        if prompt_length > limit:
            raise TaskError(
                f"the prompt has {prompt_length} tokens: the model's encoder takes at most {limit} "
                "(max_position_embeddings); shorten the prompt"
            )
        if new_tokens > limit - 1:
            print(
                f"hf-efficient: generating at most {limit - 1} tokens, not {new_tokens}: the model's decoder takes "
                f"{limit} (max_position_embeddings), its start token included",
                file=sys.stderr,
            )
            new_tokens = limit - 1
    elif limit is not None:
        if prompt_length >= limit:
            raise TaskError(
                f"the prompt has {prompt_length} tokens: the model's context is {limit} tokens "
                f"(max_position_embeddings), so there is no room to generate; shorten the prompt"
            )
        if prompt_length + new_tokens > limit:
            print(
                f"hf-efficient: generating {limit - prompt_length} tokens, not {new_tokens}: the model's context is "
                f"{limit} (max_position_embeddings) and the prompt has {prompt_length}",
                file=sys.stderr,
            )
            new_tokens = limit - prompt_length
    settings["max_new_tokens"] = new_tokens
    if settings.get("num_beams", 1) > 1 and "do_sample" not in settings:
        settings["do_sample"] = False
    if settings.get("do_sample") is False:
        settings.update(temperature=None, top_k=None, top_p=None)
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        with torch.no_grad():
            output = model.generate(**encoded.to(model.device), **settings)
    except ValueError as error:
        raise TaskError(f"generation failed: {first_line(error)}") from error
    return tokenizer.batch_decode(output, skip_special_tokens=True)


# The longest sequence a model takes: the same rule the models' own `generate()` stops at (heads.py).
position_limit = sequence_length_limit


def run_generate(checkpoint_args, generate_args) -> list[str]:
    """`hf-efficient generate`: a causal LM's continuations, or a seq2seq checkpoint's outputs, of the prompts."""
    from transformers import set_seed

    settings = generate_args.settings()
    _, task, model, tokenizer = load_checkpoint(checkpoint_args, generating=True)
    set_seed(generate_args.seed)
    texts = generate_text(model, tokenizer, generate_args.prompt or [task.default_prompt], settings)
    for index, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {index + 1}")
        print(text)
    return texts


# --------------------------------------------------------------------------------------------------------- publish
HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.partial/**", "training_args.bin", ".cache/**"]


def run_publish(checkpoint_args, data_args, publish_args) -> Path:
    """Make a checkpoint folder Hub-ready (in place, or into --output-dir) and upload it with --repo-id."""
    source, task, model, processing = load_checkpoint(checkpoint_args, publish_args.task)
    local = Path(source.path).expanduser()
    if not local.is_dir() and not publish_args.output_dir:
        raise TaskError(f"{checkpoint_args.checkpoint!r} is not a local folder: pass --output-dir")
    folder = Path(publish_args.output_dir).expanduser().resolve() if publish_args.output_dir else local.resolve()
    in_place = local.is_dir() and local.resolve() == folder
    if not in_place:  # the same rules as `train`: checked first, and never deleting the user's files
        prepare_output(str(folder), publish_args.overwrite_output_dir, None, data_args.dataset, staging_ok=True)
    results = model_card.read_results(local) if local.is_dir() else {}
    if not any(key in results for key in model_card.METRIC_NAMES) and not publish_args.no_evaluate:
        print(f"hf-efficient: no measured metrics in {source.path}: evaluating on the task's validation data")
        results = {**results, **evaluate_checkpoint(task, model, processing, data_args, publish_args)}

    # Write everything into <folder>.partial first: the weights being replaced may be memory-mapped by `model`.
    staging = staging_folder(folder)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if task.generation is not None and not (local / "generation_config.json").is_file():
        model.generation_config = default_generation_config(model, processing, task)
    if has_code(model):
        hf_efficient.save_pretrained_with_code(model, staging)
    else:
        model.save_pretrained(staging)
    processing.save_pretrained(staging)
    if results:
        _write_json(staging / "all_results.json", results)
    readme = folder / "README.md" if in_place else None
    if readme is None or not readme.exists() or model_card.is_generated(readme):  # a hand-written card is kept
        card = model_card.render(publish_args.repo_id or folder.name, model.config, task.name, results)
        (staging / "README.md").write_text(card)
    if in_place:
        for stale in ("pytorch_model.bin", "pytorch_model.bin.index.json"):
            if (folder / stale).exists():
                (folder / stale).unlink()
        for item in staging.iterdir():
            os.replace(item, folder / item.name)
        staging.rmdir()
    else:
        install_output(staging, folder)
    print(f"hf-efficient: Hub-ready folder: {folder}")
    if publish_args.repo_id:
        upload(folder, publish_args)
    return folder


def upload(folder: Path, publish_args) -> None:
    from huggingface_hub import HfApi

    repo_id = publish_args.repo_id
    api = HfApi(token=publish_args.token)
    try:
        api.create_repo(repo_id, private=publish_args.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=publish_args.commit_message,
            ignore_patterns=HUB_IGNORE,
        )
    except Exception as error:
        raise TaskError(
            f"upload to the Hub repo {repo_id!r} failed ({type(error).__name__}: {first_line(error)}); "
            f"the Hub-ready folder {str(folder)!r} is complete and unchanged: rerun `hf-efficient publish "
            f"{folder} --repo-id {repo_id}` when the Hub is reachable"
        ) from error
    print(f"hf-efficient: uploaded {folder} to {getattr(info, 'commit_url', repo_id)}")


# --------------------------------------------------------------------------------------------------------- listing
def registry() -> dict:
    """Architectures (config class, summary, variants, heads -> tasks), presets and tasks, for `hf-efficient list`."""
    architectures = {}
    for model_type, folder in sorted(hf_efficient.ARCHITECTURES.items()):
        try:
            module = hf_efficient.get_architecture(model_type)
            config_class = hf_efficient.get_config_class(model_type)
        except Exception as error:  # an architecture still being written must not break `list`
            architectures[model_type] = {"error": first_line(error)}
            continue
        doc = " ".join((config_class.__doc__ or "").strip().split("\n\n")[0].split())
        heads = {auto: cls.__name__ for auto, cls in module.AUTO_MAPPING.items()}
        architectures[model_type] = {
            "folder": f"hf_efficient/models/{folder}",
            "config": config_class.__name__,
            "summary": doc,
            "variants": dict(getattr(module, "VARIANTS", {}) or {}),
            "heads": heads,
            "tasks": sorted(filter(None, map(task_of_auto, heads))),
        }
    presets = {}
    for name, path in preset_folders().items():
        entry = {"path": str(path)}
        try:
            config = json.loads((path / "config.json").read_text())
            card = json.loads((path / "card.json").read_text()) if (path / "card.json").is_file() else {}
            entry.update(model_type=config.get("model_type"), task=card.get("task"), head=card.get("head"))
            entry["title"] = card.get("title")
        except (OSError, json.JSONDecodeError) as error:
            entry["error"] = first_line(error)
        presets[name] = entry
    tasks = {
        name: {
            "auto_class": t.auto_class,
            "pipeline": t.pipeline_tag,
            "default_model": t.default_model,
            "default_data": t.default_data,
        }
        for name, t in TASKS.items()
    }
    return {"architectures": architectures, "presets": presets, "tasks": tasks}
