"""What the `hf-efficient` command does, as one pipeline per command:

    train:    resolve the model (architecture, preset or checkpoint) -> the task -> TrainArguments -> the task's data
              -> the config (built once) -> the model -> Trainer -> a Hub-ready folder (staged in <out>.partial)
    evaluate: load a checkpoint -> the task's validation data -> Trainer.evaluate
    generate: load a causal checkpoint -> generate()
    publish:  load a checkpoint -> (evaluate) -> a Hub-ready folder -> upload

The `run_*` functions take the argument dataclasses of `hf_efficient.cli` and raise `TaskError` for anything the
user can fix; the CLI turns that into a one-line message. Everything task-specific is in `hf_efficient.tasks`.
"""

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

import hf_efficient

from . import model_card
from .cli import DEFAULT_PROMPT, TrainArguments
from .hub import auto_map_for, copy_code, has_code
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
        kind = "checkpoint" if has_weights(folder) else "preset"
        return _from_folder(kind, name, str(folder), trust_remote_code)
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
            kwargs = {"config": config, "trust_remote_code": remote}
            if new_head:
                kwargs["ignore_mismatched_sizes"] = True
            return auto.from_pretrained(source.path, **kwargs)
        return auto.from_config(config)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise TaskError(f"cannot build a {task.auto_class} from {source.name!r}: {first_line(error)}") from error


def default_generation_config(model, tokenizer):
    from transformers import GenerationConfig

    limit = getattr(model.config, "max_position_embeddings", None) or 512
    return GenerationConfig(
        do_sample=True,
        temperature=0.8,
        top_k=0,
        top_p=0.95,
        max_new_tokens=min(200, max(1, limit - 16)),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(model.config, "bos_token_id", None),
    )


# ------------------------------------------------------------------------------------------------ run environment
def staging_folder(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + STAGING_SUFFIX)


def prepare_output(output_dir: str, overwrite: bool, resume: str | None) -> tuple[Path, Path, str | None]:
    """Check the output folder and its staging folder (`<out>.partial`, where a run writes until it is complete);
    returns (final, staging, the checkpoint to resume from)."""
    from transformers.trainer_utils import get_last_checkpoint

    final = Path(output_dir).expanduser().resolve()
    staging = staging_folder(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not overwrite:
        raise TaskError(f"output folder {str(final)!r} already exists; pass --overwrite-output-dir or another one")
    if resume == "last":
        resume = get_last_checkpoint(str(staging)) if staging.is_dir() else None
        if resume is None:
            raise TaskError(f"--resume-from-checkpoint: no checkpoint-* folder in {str(staging)!r} to resume from")
    elif resume is not None:
        if not (Path(resume) / "trainer_state.json").is_file():
            raise TaskError(f"--resume-from-checkpoint {resume!r} is not a Trainer checkpoint folder")
    elif staging.exists() and any(staging.iterdir()) and not overwrite:
        raise TaskError(
            f"{str(staging)!r} holds an unfinished run: pass --resume-from-checkpoint to continue it "
            "or --overwrite-output-dir to start over"
        )
    return final, staging, resume


def accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def training_arguments(values: dict, task: Task, staging: Path, resume: str | None) -> TrainArguments:
    """`TrainArguments` from the parsed flags, the task's defaults for those not given, and the staging folder."""
    values = dict(values, output_dir=str(staging), resume_from_checkpoint=resume)
    values.update({k: v for k, v in task.training.items() if values.get(k) is None})
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
    from transformers import Trainer, set_seed

    started = time.time()
    overrides = parse_overrides(model_args.config_overrides)
    model_name = model_args.model_name_or_path or TASKS[model_args.task or "clm"].default_model
    source = resolve_model(model_name, model_args.trust_remote_code)
    task = TASKS[model_args.task or source.task or "clm"]
    check_task_head(source, task)
    config_class, values = config_values(source, task, overrides)
    output_dir = training_values["output_dir"] or str(Path("out") / f"{Path(model_name).name or 'model'}-{task.name}")
    final, staging, resume = prepare_output(
        output_dir, training_values["overwrite_output_dir"], training_values["resume_from_checkpoint"]
    )
    args = training_arguments(training_values, task, staging, resume)

    sized_by_data = source.kind == "architecture"  # a new model may take its image size from the data
    draft = {**values, **overrides}
    with args.main_process_first(desc="data"):
        processing = task.load_processing(source.path, source.kind == "checkpoint", None if sized_by_data else draft)
        data = task.load_data(data_args, processing, draft, seed=args.seed, sized_by_data=sized_by_data)
    config = build_config(config_class, values, data, overrides)
    set_seed(args.seed)
    model = create_model(task, source, config, new_head=data.label_names is not None)
    if task.name == "clm" and hasattr(model, "generation_config"):
        model.generation_config = default_generation_config(model, data.processing)
    if args.should_save:
        if staging.exists() and resume is None:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)

    budget = TimeBudget(args.max_train_minutes) if args.max_train_minutes else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=data.collator,
        processing_class=data.processing,
        compute_metrics=data.compute_metrics,
        preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        callbacks=[*callbacks, *([budget.callback] if budget else [])],
    )
    main = trainer.is_world_process_zero()
    if main:
        print(
            f"hf-efficient: training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, {source.kind} {source.name!r}) for {task.name} on {data.description}; "
            f"{args.world_size} process(es) on {args.device.type}; writing {final}",
            flush=True,
        )
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_result.metrics)
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
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        staging.rename(final)
        _print_results(task.name, results, final)
    trainer.accelerator.wait_for_everyone()
    if main and task.name == "clm" and not args.no_sample:
        torch.manual_seed(args.seed)
        text = generate_text(unwrapped, data.processing, [DEFAULT_PROMPT], {})[0]
        print(f"hf-efficient: sample (prompt {DEFAULT_PROMPT!r}):\n" + text, flush=True)
    return final


def _print_results(task: str, results: dict, folder: Path) -> None:
    keys = [
        "train_loss",
        "eval_loss",
        "eval_bits_per_byte",
        "eval_perplexity",
        "eval_accuracy",
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
def load_checkpoint(checkpoint_args, task_name: str | None = None):
    """(source, task, model, processing class) of a saved checkpoint."""
    source = resolve_model(checkpoint_args.checkpoint, checkpoint_args.trust_remote_code)
    if source.kind != "checkpoint":
        raise TaskError(f"{checkpoint_args.checkpoint!r} has no weights (a preset?): train it first")
    task_name = task_name or source.task
    if task_name is None:
        raise TaskError(f"cannot tell the task of {checkpoint_args.checkpoint!r}: pass --task")
    task = TASKS[task_name]
    check_task_head(source, task)
    model = create_model(task, source, source.config)
    processing = task.load_processing(source.path, own=True, config=model.config.to_dict())
    return source, task, model, processing


def evaluate_checkpoint(task: Task, model, processing, data_args, eval_args) -> dict:
    from transformers import Trainer, TrainingArguments

    data = task.load_data(data_args, processing, model.config.to_dict(), train=False, seed=eval_args.seed)
    if data.label_names is not None and getattr(model.config, "id2label", None):
        if len(model.config.id2label) != len(data.label_names):
            raise TaskError(
                f"the model has {len(model.config.id2label)} labels but the dataset has {len(data.label_names)} "
                f"({', '.join(map(str, data.label_names[:10]))})"
            )
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=eval_args.per_device_eval_batch_size,
            report_to="none",
            use_cpu=not accelerator_available(),
            remove_unused_columns=task.remove_unused_columns,
            disable_tqdm=eval_args.disable_tqdm,
        )
        trainer = Trainer(
            model=model,
            args=args,
            eval_dataset=data.validation,
            data_collator=data.collator,
            processing_class=data.processing,
            compute_metrics=data.compute_metrics,
            preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        )
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
    """Prompts -> generated texts (prompt included), the checkpoint's generation config updated by `settings`."""
    import torch

    model.eval()
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    prompt_length = encoded["input_ids"].shape[1]
    if prompt_length == 0:
        raise TaskError("the prompt is empty: pass --prompt with at least one character")
    settings = {k: v for k, v in settings.items() if v is not None}
    new_tokens = settings.get("max_new_tokens") or model.generation_config.max_new_tokens or 100
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None:
        if prompt_length >= limit:
            raise TaskError(f"the prompt has {prompt_length} tokens: the model's context is {limit}")
        if prompt_length + new_tokens > limit:
            print(f"hf-efficient: generating {limit - prompt_length} tokens (context {limit})", file=sys.stderr)
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


def run_generate(checkpoint_args, generate_args) -> list[str]:
    from transformers import set_seed

    settings = generate_args.settings()
    _, _, model, tokenizer = load_checkpoint(checkpoint_args, "clm")
    set_seed(generate_args.seed)
    texts = generate_text(model, tokenizer, generate_args.prompt or [DEFAULT_PROMPT], settings)
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
    if not in_place and folder.exists() and any(folder.iterdir()) and not publish_args.overwrite_output_dir:
        raise TaskError(f"output folder {str(folder)!r} already exists; pass --overwrite-output-dir or another one")
    results = model_card.read_results(local) if local.is_dir() else {}
    if not any(key in results for key in model_card.METRIC_NAMES) and not publish_args.no_evaluate:
        print(f"hf-efficient: no measured metrics in {source.path}: evaluating on the task's validation data")
        results = {**results, **evaluate_checkpoint(task, model, processing, data_args, publish_args)}

    # Write everything into <folder>.partial first: the weights being replaced may be memory-mapped by `model`.
    staging = staging_folder(folder)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if task.name == "clm" and not (local / "generation_config.json").is_file():
        model.generation_config = default_generation_config(model, processing)
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
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
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
