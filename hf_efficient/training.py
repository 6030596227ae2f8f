"""What the `hf-efficient` command does: resolve a model (architecture, preset or checkpoint), build a task's data,
train / evaluate with the real `Trainer`, write a Hub-ready folder, generate, publish.

Each `run_*` function takes the parsed command-line options (an `argparse.Namespace`) and raises `TaskError` for
anything the user can fix; `hf_efficient.cli` turns that into a one-line message.
"""

import dataclasses
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
from .data import default_tokenizer
from .hub import architecture_folder, auto_map_for
from .tasks import TASKS, TaskData, TaskError, task_of_architecture

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STAGING_SUFFIX = ".partial"
# A new vision model built from an architecture name is tiny: the default images (digits) are 8 x 8.
IMAGE_MODEL_DEFAULTS = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 4}
MAX_IMAGE_TOKENS = 256
DEFAULT_PROMPT = "def "
# `train` without --model: a small gMLP that trains in minutes on 2 CPU cores (the main job's model, 0.7M parameters).
DEFAULT_MODEL = "gmlp"
DEFAULT_MODEL_OVERRIDES = {
    "hidden_size": 128,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "max_position_embeddings": 128,
}


# ----------------------------------------------------------------------------------------------- model resolution
def preset_folders() -> dict[str, Path]:
    """Presets: `model_cards/<name>/config.json` beside the package (a source checkout) and in the current folder."""
    presets = {}
    for root in (REPO_ROOT / "model_cards", Path.cwd() / "model_cards"):
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
            raise TaskError(f"cannot load model {name!r} from the Hub or its cache: {_short(error)}") from error
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
        raise TaskError(f"cannot load the config of {name!r}: {_short(error)}") from error
    card = Path(path) / "card.json"
    card_task = None
    if card.is_file():
        try:
            card_task = json.loads(card.read_text()).get("task")
        except json.JSONDecodeError:
            card_task = None
    display = Path(path).resolve().name if kind == "checkpoint" else name
    task = _task_of_config(config, card_task)
    return ModelSource(kind, display, path, config.model_type, config, task, trust_remote_code)


def _task_of_config(config, card_task: str | None) -> str | None:
    if card_task in TASKS:
        return card_task
    for architecture in getattr(config, "architectures", None) or []:
        task = task_of_architecture(architecture)
        if task:
            return task
    return None


def _short(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


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


def check_task_head(source: ModelSource, task: str) -> None:
    """The model must have a head for the task (a one-line error listing the heads it has otherwise)."""
    import transformers

    spec = TASKS[task]
    if source.model_type in hf_efficient.ARCHITECTURES:
        mapping = hf_efficient.get_architecture(source.model_type).AUTO_MAPPING
        if spec.auto_class not in mapping:
            heads = ", ".join(sorted(t for t in (_task_of_auto(a) for a in mapping) if t)) or "none"
            raise TaskError(
                f"architecture {source.model_type!r} has no head for task {task!r} ({spec.auto_class}); "
                f"its tasks: {heads}"
            )
    elif source.config is not None:
        auto = getattr(transformers, spec.auto_class)
        remote = spec.auto_class in (getattr(source.config, "auto_map", None) or {})
        if not remote and type(source.config) not in auto._model_mapping:
            raise TaskError(f"model {source.name!r} ({source.model_type}) has no head for task {task!r}")
    config = source.config
    if config is not None and spec.modality == "text" and getattr(config, "vocab_size", 0) is None:
        raise TaskError(f"model {source.name!r} has no token embeddings (vocab_size is None): it cannot do {task!r}")
    if config is not None and spec.modality == "image" and getattr(config, "image_size", None) is None:
        raise TaskError(f"model {source.name!r} is not a vision model (no image_size): it cannot do {task!r}")


def _task_of_auto(auto_name: str) -> str | None:
    return next((t.name for t in TASKS.values() if t.auto_class == auto_name), None)


def build_config(source: ModelSource, task: str, overrides: dict, data: TaskData | None):
    """The config of the model to train: the source's config (or the architecture's defaults) + the task's needs
    (labels, image size from the data) + the user's overrides, validated by the config class."""
    from transformers import PreTrainedConfig

    if source.config is not None:
        config_class = type(source.config)
        base = source.config.to_dict()
    else:
        config_class = hf_efficient.get_config_class(source.model_type)
        base = config_class().to_dict()
    known = set(base) | set(PreTrainedConfig().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TaskError(
            f"unknown config field(s) {', '.join(unknown)} for {source.model_type!r}; fields: {', '.join(sorted(base))}"
        )
    values = dict(base)
    if source.kind != "checkpoint" and task == "clm" and "causal" in base:
        values["causal"] = True  # the causal head is causal anyway; the saved base model should match it
    if source.kind == "architecture" and TASKS[task].modality == "image":
        values.update({k: v for k, v in IMAGE_MODEL_DEFAULTS.items() if k in base})
        if "vocab_size" in base:
            values["vocab_size"] = None  # no token embeddings in a vision model
    if data is not None and data.config_updates:
        size = data.config_updates["image_size"]
        values.update(data.config_updates)
        patch = overrides.get("patch_size") or next(
            (p for p in range(2, size + 1) if size % p == 0 and (size // p) ** 2 <= MAX_IMAGE_TOKENS), size
        )
        values["patch_size"] = patch
        if "max_position_embeddings" in base:
            values["max_position_embeddings"] = (size // patch) ** 2
    if data is not None and data.label_names is not None:
        values["id2label"] = {i: name for i, name in enumerate(data.label_names)}
        values["label2id"] = {name: i for i, name in enumerate(data.label_names)}
        values.pop("num_labels", None)
    values.update(overrides)
    values.pop("transformers_version", None)
    try:
        return config_class.from_dict(values)
    except (ValueError, TypeError) as error:
        raise TaskError(_short(error)) from error


def load_tokenizer(source: ModelSource, task: str):
    """The source's own tokenizer when it has one, else the byte tokenizer (with `<extra_id_0>` as mask for MLM)."""
    from transformers import AutoTokenizer

    tokenizer = None
    if source.path is not None and (
        source.kind == "checkpoint" or Path(source.path, "tokenizer_config.json").exists()
    ):
        try:
            tokenizer = AutoTokenizer.from_pretrained(source.path)
        except Exception:
            tokenizer = None
    if tokenizer is None:
        tokenizer = default_tokenizer()
    if task == "mlm" and tokenizer.mask_token is None and "<extra_id_0>" in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"mask_token": "<extra_id_0>"})
    return tokenizer


def load_image_processor(source: ModelSource):
    from transformers import AutoImageProcessor

    if source.path is not None and (Path(source.path) / "preprocessor_config.json").is_file():
        try:
            return AutoImageProcessor.from_pretrained(source.path)
        except Exception as error:
            raise TaskError(f"cannot load the image processor of {source.name!r}: {_short(error)}") from error
    return None


def context_length(config, requested: int | None, default: int = 256) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if requested is not None:
        if requested <= 0:
            raise TaskError(f"--block-size must be positive, got {requested}")
        if limit is not None and requested > limit:
            raise TaskError(f"--block-size {requested} exceeds the model's context (max_position_embeddings={limit})")
        return requested
    return min(default, limit) if limit else default


def load_task_data(task: str, options, source: ModelSource, config, train: bool = True) -> tuple[TaskData, object]:
    """The task's data and its processing class (tokenizer or image processor)."""
    from . import tasks

    spec = TASKS[task]
    if spec.modality == "image":
        processor = load_image_processor(source)
        model_image = None
        if config is not None:
            model_image = (config.image_size, getattr(config, "num_channels", 3))
        data = tasks.image_classification_data(options, model_image, processor)
        if processor is None:
            size = model_image or (data.config_updates["image_size"], data.config_updates["num_channels"])
            processor = tasks.image_processor_for(*size)
        return data, processor
    tokenizer = load_tokenizer(source, task)
    if getattr(config, "max_position_embeddings", None):
        tokenizer.model_max_length = config.max_position_embeddings  # lets pipelines truncate to the context
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    if vocab is not None and len(tokenizer) > vocab:
        raise TaskError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
    block_size = context_length(config, options.block_size)
    if task in ("clm", "mlm"):
        data = tasks.language_modelling_data(task, options, tokenizer, block_size, need_train=train)
    elif task == "seq-cls":
        data = tasks.sequence_classification_data(options, tokenizer, block_size)
    else:
        data = tasks.seq2seq_data(options, tokenizer, block_size)
    return data, tokenizer


def create_model(task: str, source: ModelSource, config, data: TaskData | None):
    """A new model from `config` (architecture, preset) or the checkpoint's weights (a new head where needed)."""
    import transformers

    auto = getattr(transformers, TASKS[task].auto_class)
    try:
        if source.kind == "checkpoint":
            # hf-efficient's own classes are registered: remote code is only for other model types.
            remote = source.trust_remote_code and source.model_type not in hf_efficient.ARCHITECTURES
            kwargs = {"config": config, "trust_remote_code": remote}
            if data is not None and data.label_names is not None:
                kwargs["ignore_mismatched_sizes"] = True
            return auto.from_pretrained(source.path, **kwargs)
        return auto.from_config(config)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise TaskError(f"cannot build a {TASKS[task].auto_class} from {source.name!r}: {_short(error)}") from error


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


# ------------------------------------------------------------------------------------------------ output folders
def attach_code(model, folder: Path) -> None:
    """Make a saved hf-efficient model load with `trust_remote_code=True`: its source files and an `auto_map`
    (what `hf_efficient.save_pretrained_with_code` adds, for a folder already written by `Trainer.save_model`)."""
    if not type(model).__module__.startswith("hf_efficient."):
        return  # a transformers-native model: nothing to add
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = auto_map_for(model)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.config.auto_map = config["auto_map"]
    for source in sorted(architecture_folder(model).glob("*.py")):
        if source.name != "__init__.py":
            shutil.copy(source, folder / source.name)


def staging_folder(output_dir: Path) -> Path:
    return output_dir.with_name(output_dir.name + STAGING_SUFFIX)


def prepare_output(options) -> tuple[Path, Path, str | bool | None]:
    """Check the output folder and its staging folder (`<out>.partial`, where a run writes until it is complete);
    returns (final, staging, resume_from_checkpoint)."""
    from transformers.trainer_utils import get_last_checkpoint

    final = Path(options.output_dir).expanduser().resolve()
    staging = staging_folder(final)
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and not options.overwrite_output_dir:
        raise TaskError(f"output folder {str(final)!r} already exists; pass --overwrite-output-dir or another one")
    resume = options.resume_from_checkpoint
    if resume == "last":
        last = get_last_checkpoint(str(staging)) if staging.is_dir() else None
        if last is None:
            raise TaskError(f"--resume-from-checkpoint: no checkpoint-* folder in {str(staging)!r} to resume from")
        resume = last
    elif resume is not None:
        if not (Path(resume) / "trainer_state.json").is_file():
            raise TaskError(f"--resume-from-checkpoint {resume!r} is not a Trainer checkpoint folder")
    elif staging.exists() and any(staging.iterdir()) and not options.overwrite_output_dir:
        raise TaskError(
            f"{str(staging)!r} holds an unfinished run: pass --resume-from-checkpoint to continue it "
            "or --overwrite-output-dir to start over"
        )
    return final, staging, resume


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def command_line() -> str:
    return shlex.join(["hf-efficient", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "hf-efficient"


def versions() -> str:
    import torch
    import transformers

    return (
        f"hf-efficient {hf_efficient.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def training_arguments(options, extra: dict, output_dir: Path, task: str):
    """`TrainingArguments` from the explicit flags, the task defaults and any other `--<field> value` given."""
    from transformers import TrainingArguments

    defaults = TASKS[task].defaults
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    values = dict(extra)
    values.update(
        output_dir=str(output_dir),
        max_steps=options.max_steps if options.max_steps is not None else defaults["max_steps"],
        num_train_epochs=options.num_train_epochs,
        per_device_train_batch_size=options.per_device_train_batch_size or defaults["per_device_train_batch_size"],
        per_device_eval_batch_size=options.per_device_eval_batch_size
        or options.per_device_train_batch_size
        or defaults["per_device_train_batch_size"],
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        learning_rate=options.learning_rate if options.learning_rate is not None else defaults["learning_rate"],
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup_steps,
        lr_scheduler_type=options.lr_scheduler_type,
        logging_steps=options.logging_steps,
        eval_strategy=options.eval_strategy,
        eval_steps=options.eval_steps,
        save_strategy=options.save_strategy,
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        seed=options.seed,
        bf16=options.bf16,
        fp16=options.fp16,
        report_to=options.report_to,
        disable_tqdm=options.disable_tqdm,
        remove_unused_columns=TASKS[task].modality != "image",
    )
    if options.gradient_checkpointing:
        values["activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"] = True
    if "use_cpu" not in extra and not accelerator_available():
        # Without it, `accelerate launch` on a CPU-only machine starts N processes that each train alone.
        values["use_cpu"] = True
    try:
        return TrainingArguments(**values)
    except (ValueError, TypeError) as error:
        raise TaskError(f"invalid training arguments: {_short(error)}") from error


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


def finite(metrics: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


# ------------------------------------------------------------------------------------------------------ commands
def run_train(options, extra_training_args: dict, callbacks=()) -> Path:
    """`hf-efficient train`: returns the finished output folder."""
    import torch
    from transformers import Trainer, set_seed

    started = time.time()
    overrides = parse_overrides(options.config_overrides)
    if options.model is None:
        options.model = DEFAULT_MODEL
        if not (options.task == "image-cls"):
            overrides = {**DEFAULT_MODEL_OVERRIDES, **overrides}
    source = resolve_model(options.model, options.trust_remote_code)
    task = options.task or source.task or "clm"
    check_task_head(source, task)
    if options.output_dir is None:
        options.output_dir = str(Path("out") / f"{Path(options.model).name or 'model'}-{task}")
    final, staging, resume = prepare_output(options)
    args = training_arguments(options, extra_training_args, staging, task)

    with args.main_process_first(desc="data"):
        preliminary = build_config(source, task, overrides, None) if source.config is None else source.config
        if TASKS[task].modality == "image" and source.config is None:
            preliminary = None  # a new vision model takes its image size from the data
        data, processing = load_task_data(task, options, source, preliminary)
    config = build_config(source, task, overrides, data)
    if TASKS[task].modality == "text":
        context_length(config, options.block_size)
    set_seed(args.seed)
    model = create_model(task, source, config, data)
    if task == "clm" and hasattr(model, "generation_config"):
        model.generation_config = default_generation_config(model, processing)
    if args.should_save:
        if staging.exists() and resume is None:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)

    budget = TimeBudget(options.max_train_minutes) if options.max_train_minutes else None
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=data.collator,
        processing_class=processing,
        compute_metrics=data.compute_metrics,
        preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        callbacks=[*callbacks, *([budget.callback] if budget else [])],
    )
    main = trainer.is_world_process_zero()
    if main:
        print(
            f"hf-efficient: training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, {source.kind} {source.name!r}) for {task} on {data.description}; "
            f"{args.world_size} process(es) on {args.device.type}; writing {final}",
            flush=True,
        )
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(train_result.metrics)
    eval_metrics = trainer.evaluate()
    eval_metrics.update(_loss_extras(task, eval_metrics, data.byte_level))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    results = {
        **metrics,
        **eval_metrics,
        "task": task,
        "model": options.model,
        "model_source": source.kind,
        "dataset": data.description,
        "dataset_path": options.dataset,
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
    trainer.save_model(str(staging))
    if main:
        attach_code(unwrapped, staging)
        trainer.save_state()
        results["wall_time_s"] = round(time.time() - started, 1)
        results = finite(results)
        for name, subset in (("train_results.json", metrics), ("eval_results.json", eval_metrics)):
            (staging / name).write_text(json.dumps(finite(subset), indent=2, sort_keys=True) + "\n")
        (staging / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(model_card.render(final.name, unwrapped.config, task, results))
        if final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        staging.rename(final)
        _print_results(task, results, final)
    trainer.accelerator.wait_for_everyone()
    if main and task == "clm" and not options.no_sample:
        torch.manual_seed(args.seed)
        text = generate_text(unwrapped, processing, [DEFAULT_PROMPT], {})[0]
        print("hf-efficient: sample (prompt 'def '):\n" + text, flush=True)
    return final


def _loss_extras(task: str, metrics: dict, byte_level: bool) -> dict:
    """Perplexity (language modelling) and bits per byte (clm, seq2seq: every target byte is predicted)."""
    from .tasks import loss_metrics

    if task not in ("clm", "mlm", "seq2seq"):
        return {}
    return loss_metrics(metrics, "eval", byte_level and task != "mlm")


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


def load_checkpoint(options, task: str | None = None):
    """(source, task, model, processing class) of a saved checkpoint."""
    source = resolve_model(options.checkpoint, options.trust_remote_code)
    if source.kind != "checkpoint":
        raise TaskError(f"{options.checkpoint!r} has no weights (a preset?): train it first")
    task = task or getattr(options, "task", None) or source.task
    if task is None:
        raise TaskError(f"cannot tell the task of {options.checkpoint!r}: pass --task")
    check_task_head(source, task)
    model = create_model(task, source, source.config, None)
    if TASKS[task].modality == "image":
        processing = load_image_processor(source) or _image_processor_of(model.config)
    else:
        processing = load_tokenizer(source, task)
    return source, task, model, processing


def _image_processor_of(config):
    from .tasks import image_processor_for

    return image_processor_for(config.image_size, getattr(config, "num_channels", 3))


def evaluate_checkpoint(source, task, model, processing, options) -> dict:
    from transformers import Trainer, TrainingArguments

    data, _ = load_task_data(task, options, source, model.config, train=False)
    if data.label_names is not None and getattr(model.config, "id2label", None):
        model_labels = [model.config.id2label[i] for i in sorted(model.config.id2label)]
        if len(model_labels) != len(data.label_names):
            raise TaskError(
                f"the model has {len(model_labels)} labels but the dataset has {len(data.label_names)} "
                f"({', '.join(map(str, data.label_names[:10]))})"
            )
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            per_device_eval_batch_size=options.per_device_eval_batch_size,
            report_to="none",
            use_cpu=not accelerator_available(),
            remove_unused_columns=TASKS[task].modality != "image",
            disable_tqdm=options.disable_tqdm,
        )
        trainer = Trainer(
            model=model,
            args=args,
            eval_dataset=data.validation,
            data_collator=data.collator,
            processing_class=processing,
            compute_metrics=data.compute_metrics,
            preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        )
        metrics = trainer.evaluate()
    metrics.update(_loss_extras(task, metrics, data.byte_level))
    metrics.update(task=task, dataset=data.description, dataset_path=options.dataset)
    return finite(metrics)


def run_evaluate(options) -> dict:
    source, task, model, processing = load_checkpoint(options)
    metrics = evaluate_checkpoint(source, task, model, processing, options)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    if options.output_file:
        Path(options.output_file).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
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
        raise TaskError(f"generation failed: {_short(error)}") from error
    return tokenizer.batch_decode(output, skip_special_tokens=True)


def run_generate(options) -> list[str]:
    from transformers import set_seed

    source, task, model, tokenizer = load_checkpoint(options, task="clm")
    set_seed(options.seed)
    settings = dict(
        max_new_tokens=options.max_new_tokens,
        do_sample=options.do_sample,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        num_beams=options.num_beams,
        repetition_penalty=options.repetition_penalty,
        num_return_sequences=options.num_return_sequences,
    )
    texts = generate_text(model, tokenizer, options.prompt or [DEFAULT_PROMPT], settings)
    for index, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {index + 1}")
        print(text)
    return texts


def run_publish(options) -> Path:
    """Make a checkpoint folder Hub-ready (in place, or into --output-dir) and upload it with --repo-id."""
    source, task, model, processing = load_checkpoint(options)
    local = Path(source.path).expanduser()
    if not local.is_dir() and not options.output_dir:
        raise TaskError(f"{options.checkpoint!r} is not a local folder: pass --output-dir")
    folder = Path(options.output_dir).expanduser().resolve() if options.output_dir else local.resolve()
    in_place = local.is_dir() and local.resolve() == folder
    if not in_place and folder.exists() and any(folder.iterdir()) and not options.overwrite_output_dir:
        raise TaskError(f"output folder {str(folder)!r} already exists; pass --overwrite-output-dir or another one")
    results = model_card.read_results(local) if local.is_dir() else {}
    if not any(key in results for key in model_card.METRIC_NAMES) and not options.no_evaluate:
        print(f"hf-efficient: no measured metrics in {source.path}: evaluating on the task's validation data")
        results = {**results, **evaluate_checkpoint(source, task, model, processing, options)}

    # Write everything into <folder>.partial first: the weights being replaced may be memory-mapped by `model`.
    staging = staging_folder(folder)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if task == "clm" and not (local / "generation_config.json").is_file():
        model.generation_config = default_generation_config(model, processing)
    if type(model).__module__.startswith("hf_efficient."):
        hf_efficient.save_pretrained_with_code(model, staging)
    else:
        model.save_pretrained(staging)
    processing.save_pretrained(staging)
    if results:
        (staging / "all_results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    readme = folder / "README.md" if in_place else None
    if readme is not None and readme.exists() and not model_card.is_generated(readme):
        pass  # a hand-written card is kept
    else:
        card = model_card.render(options.repo_id or folder.name, model.config, task, results)
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
    if options.repo_id:
        upload(folder, options)
    return folder


HUB_IGNORE = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.partial/**", "training_args.bin", ".cache/**"]


def upload(folder: Path, options) -> None:
    from huggingface_hub import HfApi

    api = HfApi(token=options.token)
    try:
        api.create_repo(options.repo_id, private=options.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=options.repo_id,
            repo_type="model",
            commit_message=options.commit_message,
            ignore_patterns=HUB_IGNORE,
        )
    except Exception as error:
        raise TaskError(
            f"upload to the Hub repo {options.repo_id!r} failed ({type(error).__name__}: {_short(error)}); "
            f"the Hub-ready folder {str(folder)!r} is complete and unchanged: rerun `hf-efficient publish "
            f"{folder} --repo-id {options.repo_id}` when the Hub is reachable"
        ) from error
    print(f"hf-efficient: uploaded {folder} to {getattr(info, 'commit_url', options.repo_id)}")


# --------------------------------------------------------------------------------------------------------- listing
def registry() -> dict:
    """Architectures (config class, summary, variants, heads -> tasks) and presets, for `hf-efficient list`."""
    architectures = {}
    for model_type, folder in sorted(hf_efficient.ARCHITECTURES.items()):
        try:
            module = hf_efficient.get_architecture(model_type)
            config_class = hf_efficient.get_config_class(model_type)
        except Exception as error:  # an architecture still being written must not break `list`
            architectures[model_type] = {"error": _short(error)}
            continue
        doc = " ".join((config_class.__doc__ or "").strip().split("\n\n")[0].split())
        heads = {auto: cls.__name__ for auto, cls in module.AUTO_MAPPING.items()}
        architectures[model_type] = {
            "folder": f"hf_efficient/models/{folder}",
            "config": config_class.__name__,
            "summary": doc,
            "variants": dict(getattr(module, "VARIANTS", {}) or {}),
            "heads": heads,
            "tasks": sorted(t for t in (_task_of_auto(a) for a in heads) if t),
        }
    presets = {}
    for name, path in preset_folders().items():
        entry = {"path": str(path)}
        try:
            config = json.loads((path / "config.json").read_text())
            entry["model_type"] = config.get("model_type")
            card = json.loads((path / "card.json").read_text()) if (path / "card.json").is_file() else {}
            entry["task"] = card.get("task")
            entry["head"] = card.get("head")
            entry["title"] = card.get("title")
        except (OSError, json.JSONDecodeError) as error:
            entry["error"] = _short(error)
        presets[name] = entry
    tasks = {
        name: {"auto_class": t.auto_class, "pipeline": t.pipeline_tag, "default_data": t.default_data}
        for name, t in TASKS.items()
    }
    return {"architectures": architectures, "presets": presets, "tasks": tasks}
