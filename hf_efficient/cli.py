"""The `hf-efficient` command (also `python -m hf_efficient`): list / train / evaluate / generate / publish.

    hf-efficient list
    hf-efficient train --output-dir out/gmlp-clm                     # the main job: gMLP byte LM, embedded corpus
    hf-efficient train --task image-cls --model gmlp --output-dir out/digits
    hf-efficient evaluate out/gmlp-clm
    hf-efficient generate out/gmlp-clm --prompt "def " --temperature 0.7
    hf-efficient train --task seq2seq --output-dir out/words           # N-gram encoder-decoder: numbers -> words
    hf-efficient generate out/words --prompt "1987-03-09"
    hf-efficient publish out/gmlp-clm --repo-id you/gmlp-clm

The options of each command are typed argument dataclasses parsed with `transformers.HfArgumentParser`, as in
transformers' example scripts: every field is a flag, spelled `--field_name` or `--field-name` (no abbreviations;
an unknown flag is an error naming the closest one). `train` takes `ModelArguments`, `TrainDataArguments` and
`TrainArguments`, a `Seq2SeqTrainingArguments` subclass, so every `Seq2SeqTrainingArguments` field is a flag of its
own (the generation fields apply to the seq2seq task, which trains with `Seq2SeqTrainer`).

Every registered architecture (`hf_efficient.ARCHITECTURES`, each with its `AUTO_MAPPING` of heads) is available
without changes here. Errors the user can fix print one line, `hf-efficient: error: ...`, and exit non-zero;
`--debug` (anywhere on the line, or `HF_EFFICIENT_DEBUG=1`) shows the traceback instead; `--disable-tqdm` (anywhere
on the line too) silences every progress bar of the command.
"""

import argparse
import contextlib
import dataclasses
import difflib
import json
import os
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from .data import MissingDependencyError
from .tasks import TASKS, TaskError

PROG = "hf-efficient"
DEFAULT_PROMPT = TASKS["clm"].default_prompt  # `generate`'s prompt for a causal LM (each task declares its own)
DEFAULT_MAX_NEW_TOKENS = 200  # `generate`'s default length (never saved in a checkpoint's generation config)


class UsageError(Exception):
    """A command-line syntax error."""


def _option(help: str, **kwargs):
    """A dataclass field that is a command-line option (`kwargs`: `default`, or argparse settings)."""
    default = kwargs.pop("default", None)
    return field(default=default, metadata={"help": help, **kwargs})


# ---------------------------------------------------------------------------------------------- argument classes
@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str | None = _option(
        "a registered architecture (with its config class defaults and the task's sizes for a new model), a preset "
        "name or folder (model_cards/<preset>), a checkpoint folder, or a Hub id. Default: the task's "
        "`default_model` (the main job's preset gmlp-main-job: a 0.7M-parameter gMLP; for image-cls a tiny vision "
        "gMLP sized from the images; for seq2seq the N-gram encoder-decoder preset ngram-transformer-tiny-n4)",
        aliases=["--model"],
    )
    task: str | None = _option("default: the checkpoint's or preset's task, else clm", choices=sorted(TASKS))
    config_overrides: str | None = _option(
        "config fields to change, e.g. hidden_size=128,num_hidden_layers=4,tiny_attn_size=64", metavar="K=V,..."
    )
    trust_remote_code: bool = _option(
        "allow model code shipped with a checkpoint of a type hf-efficient does not register", default=False
    )


@dataclass
class DataArguments:
    _argument_group_name = "data (default: the task's embedded data set, no download)"

    dataset: str | None = _option(
        "a local datasets-loadable file or folder: json/jsonl/csv/tsv/txt/parquet files (train.* and "
        "validation.*/test.* give splits), a save_to_disk folder, or an imagefolder tree",
        metavar="PATH",
    )
    dataset_format: str | None = _option(
        "override the guess", choices=["json", "csv", "text", "parquet", "imagefolder"]
    )
    text_column: str = _option("text column (clm, mlm, seq-cls)", default="text")
    label_column: str = _option("label column (seq-cls, image-cls)", default="label")
    image_column: str = _option("image column (image-cls)", default="image")
    source_column: str = _option("input column (seq2seq)", default="source")
    target_column: str = _option("output column (seq2seq)", default="target")
    validation_split_percentage: float = _option(
        "share of the training rows held out when the dataset has no validation split", default=5.0
    )
    block_size: int | None = _option("tokens per example (default: min(256, the model's context))")
    max_eval_bytes: int = _option("bytes of the embedded validation corpus", default=65_536)
    max_eval_samples: int | None = _option("keep only the first N validation examples")
    mlm_probability: float = _option("masked share of tokens (mlm)", default=0.15)


@dataclass
class TrainDataArguments(DataArguments):
    max_train_bytes: int = _option("bytes of the embedded training corpus to read", default=8_000_000)
    max_train_samples: int | None = _option("keep only the first N training examples")


@dataclass
class TrainArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` (`TrainingArguments` plus the generation fields of `Seq2SeqTrainer`) with the
    command's defaults. The fields left `None` take the task's defaults (`Task.training`); it is built once, when the
    task and the staging folder are known."""

    _argument_group_name = "training (TrainingArguments: every field is a flag)"

    output_dir: str | None = _option("the Hub-ready folder to write (default: out/<model>-<task>)")
    overwrite_output_dir: bool = _option("replace an existing output folder", default=False)
    max_steps: int | None = _option("optimizer steps (default: the task's; <= 0: epochs)")
    per_device_train_batch_size: int | None = _option("default: the task's")
    per_device_eval_batch_size: int | None = _option("default: the training batch size")
    learning_rate: float | None = _option("peak learning rate (default: the task's)")
    warmup_steps: float = _option("steps, or a fraction of them if < 1", default=0.1)
    lr_scheduler_type: SchedulerType | str = _option("the learning-rate schedule", default="cosine")
    logging_steps: float = _option("log every N steps", default=25)
    eval_strategy: IntervalStrategy | str = _option("the final evaluation always runs", default="no")
    save_strategy: SaveStrategy | str = _option("when to write checkpoints", default="steps")
    save_total_limit: int | None = _option("checkpoints kept", default=2)
    disable_tqdm: bool | None = _option("no progress bars", nargs="?", const=True)
    resume_from_checkpoint: str | None = _option(
        "resume an interrupted run: from its last checkpoint in <output-dir>.partial, or from CHECKPOINT",
        nargs="?",
        const="last",
        metavar="CHECKPOINT",
    )
    use_cpu: bool | None = _option("train on the CPU (default: when no accelerator is found)", nargs="?", const=True)
    max_train_minutes: float | None = _option(
        "stop training after this many minutes (then evaluate and save as usual; all_results.json records it)"
    )
    predict_with_generate: bool | None = _option(
        "seq2seq: evaluation generates and reports BLEU, chrF and exact match besides the loss (default: the task's: "
        "true)",
        nargs="?",
        const=True,
    )
    generation_max_length: int | None = _option(
        "seq2seq: max_length of evaluation's generate() (default: the longest validation target plus a margin)"
    )
    no_sample: bool = _option("clm, seq2seq: do not print a generated sample at the end", default=False)


@dataclass
class CheckpointArguments:
    checkpoint: str = field(default=None, init=False, metadata={"positional": True, "help": "folder or Hub id"})
    trust_remote_code: bool = _option(
        ModelArguments.__dataclass_fields__["trust_remote_code"].metadata["help"], default=False
    )


@dataclass
class EvaluationArguments:
    task: str | None = _option("default: from the checkpoint's head", choices=sorted(TASKS))
    per_device_eval_batch_size: int = _option("evaluation batch size", default=32)
    disable_tqdm: bool | None = _option("no progress bars", nargs="?", const=True)
    seed: int = _option("seed of the held-out split of a dataset without one", default=42)


@dataclass
class EvaluateArguments(EvaluationArguments):
    output_file: str | None = _option("also write the metrics here", metavar="JSON")


@dataclass
class PublishArguments(EvaluationArguments):
    output_dir: str | None = _option("write the Hub-ready folder here instead of in place")
    overwrite_output_dir: bool = _option("replace an existing --output-dir", default=False)
    repo_id: str | None = _option("upload to this Hub model repo", metavar="OWNER/NAME")
    private: bool = _option("create the repo private", default=False)
    token: str | None = _option("Hub token (default: HF_TOKEN or the cached login)")
    commit_message: str = _option("the Hub commit message", default="Upload hf-efficient model")
    no_evaluate: bool = _option("do not evaluate a folder that has no metrics", default=False)


@dataclass
class GenerateArguments:
    prompt: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"prompt text (repeat for a batch; default: the task's, {DEFAULT_PROMPT!r} for clm)",
            "action": "extend",
        },
    )
    max_new_tokens: int | None = _option(
        f"tokens to add (default {DEFAULT_MAX_NEW_TOKENS}; capped by the model's position limit with a one-line note)"
    )
    do_sample: bool | None = _option("sample", nargs="?", const=True)
    greedy: bool = _option("greedy / beam search decoding (not with --do-sample)", default=False)
    temperature: float | None = _option("sampling temperature")
    top_k: int | None = _option("sample from the k most likely tokens")
    top_p: float | None = _option("nucleus sampling")
    num_beams: int | None = _option("beam search")
    repetition_penalty: float | None = _option("penalise repeated tokens")
    num_return_sequences: int | None = _option("samples per prompt")
    seed: int = _option("sampling seed", default=0)
    disable_tqdm: bool | None = _option("no progress bars", nargs="?", const=True)

    def settings(self) -> dict:
        """The `generate()` options given (None: from the checkpoint's generation config)."""
        if self.greedy and self.do_sample:
            raise UsageError("generate: --greedy and --do-sample exclude each other")
        names = ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")
        settings = {name: getattr(self, name) for name in (*names, "num_return_sequences")}
        settings["do_sample"] = False if self.greedy else self.do_sample
        return settings


@dataclass
class ListArguments:
    json: bool = _option("print JSON", default=False)


@dataclass(frozen=True)
class Command:
    help: str
    description: str
    arguments: tuple  # argument dataclasses, parsed in this order
    epilog: str | None = None


COMMANDS = {
    "list": Command(
        "registered architectures, variants, heads, presets and tasks",
        "The registered architectures (hf_efficient.ARCHITECTURES) with their heads and tasks, the presets "
        "(model_cards/<name>) and the tasks with their default data.",
        (ListArguments,),
    ),
    "train": Command(
        "pretrain or fine-tune a model on a task with the transformers Trainer",
        "Pretrain or fine-tune any registered architecture, preset or checkpoint with the transformers Trainer, "
        "evaluate it, and save a Hub-ready folder (safetensors, config, tokenizer or image processor, generation "
        "config, model card with the measured metrics, model code for trust_remote_code). The run writes into "
        "<output-dir>.partial and renames it to <output-dir> only when complete. With no options it is the main "
        "job: the preset gmlp-main-job (a 0.7M-parameter causal gMLP byte LM), 600 steps on the embedded corpus.",
        (ModelArguments, TrainDataArguments, TrainArguments),
        epilog="Every other TrainingArguments field is a flag too: --field_name VALUE (e.g. --optim adamw_torch, "
        "--fsdp 'full_shard auto_wrap', --deepspeed ds.json, --torch_compile), as in transformers' example scripts. "
        "Multi-process: `accelerate launch --multi_gpu --num_processes N -m hf_efficient train ...`.",
    ),
    "evaluate": Command(
        "evaluate a saved checkpoint on a dataset",
        "Evaluate a checkpoint (folder or Hub id) on its task's validation data (the embedded default or "
        "--dataset): loss, bits per byte / perplexity (text), accuracy (classification), BLEU / chrF / exact match "
        "of greedy generations (seq2seq). Prints JSON.",
        (CheckpointArguments, DataArguments, EvaluateArguments),
    ),
    "generate": Command(
        "generate text from a causal LM or seq2seq checkpoint",
        "Sample text from a causal LM checkpoint (the prompt continued), or generate a seq2seq checkpoint's output "
        "for each prompt (e.g. --prompt 1987-03-09 for the embedded numbers-to-words task). Options left out come "
        "from its generation_config.json (a causal LM samples; a seq2seq model decodes greedily).",
        (CheckpointArguments, GenerateArguments),
    ),
    "publish": Command(
        "make a checkpoint folder Hub-ready and upload it",
        "Write safetensors weights, config (with auto_map), the model code, tokenizer or image processor, "
        "generation config and a model card with YAML metadata and the measured metrics (evaluating first if the "
        "folder has none); then, with --repo-id, create the repo and upload the folder. If the upload fails, the "
        "folder stays complete.",
        (CheckpointArguments, DataArguments, PublishArguments),
    ),
}


# -------------------------------------------------------------------------------------------------------- parsing
class CommandParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are `UsageError`s (one line), with positional fields
    (`metadata={"positional": True}`, `init=False`) and no abbreviated flags."""

    def __init__(self, dataclass_types=(), **kwargs):
        super().__init__(dataclass_types, allow_abbrev=False, **kwargs)
        for dtype in self.dataclass_types:
            for item in dataclasses.fields(dtype):
                if item.metadata.get("positional"):
                    self.add_argument(item.name, help=item.metadata.get("help"))

    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def unknown(self, arguments: list[str]) -> UsageError:
        """The error for arguments no option takes, naming the closest valid flag."""
        flag = next((a.split("=", 1)[0] for a in arguments if a.startswith("-")), None)
        close = difflib.get_close_matches(flag, list(self._option_string_actions), n=1) if flag else []
        hint = f"; did you mean {close[0]}?" if close else ""
        return UsageError(f"unrecognized arguments: {' '.join(arguments)}{hint} (see `{self.prog} --help`)")


def build_parser() -> CommandParser:
    parser = CommandParser(
        prog=PROG,
        description="Train, evaluate, sample and publish hf-efficient models with the transformers Trainer.",
        epilog="Run `hf-efficient <command> --help` for a command's options.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser, required=True)
    for name, command in COMMANDS.items():
        positional = "CHECKPOINT " if CheckpointArguments in command.arguments else ""
        commands.add_parser(
            name,
            usage=f"{PROG} {name} {positional}[options]  (every option: see below)",
            dataclass_types=command.arguments,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
        )
    return parser


def parse(argv: list[str]) -> tuple[str, list]:
    """`argv` -> (command, one value per argument class of the command: a dataclass instance, or for
    `TrainArguments` the dict of its parsed fields, built into `TrainArguments` by the run)."""
    argv = [a for a in argv if a != "--debug"]  # --debug is read anywhere on the line (see `main`)
    argv = _normalise_flags(argv)
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(argv)
    command = COMMANDS[namespace.command]
    if unknown:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        raise subparsers.choices[namespace.command].unknown(unknown)
    values = vars(namespace)
    parsed = []
    for dtype in command.arguments:
        fields = dataclasses.fields(dtype)
        given = {f.name: values[f.name] for f in fields if f.init}
        if issubclass(dtype, TrainingArguments):
            parsed.append(given)  # TrainingArguments sets up the device when built: the run builds it once
            continue
        instance = dtype(**given)
        for item in fields:
            if item.metadata.get("positional"):
                setattr(instance, item.name, values[item.name])
        parsed.append(instance)
    return namespace.command, parsed


QUIET_FLAGS = ("--disable-tqdm", "--disable_tqdm")
# Boolean flags that take an optional value (`--flag`, `--flag false`): bare, they must not swallow the next word.
OPTIONAL_BOOL_FLAGS = (
    *QUIET_FLAGS,
    "--use-cpu",
    "--use_cpu",
    "--do-sample",
    "--do_sample",
    "--predict-with-generate",
    "--predict_with_generate",
)
BOOL_WORDS = {"yes", "no", "true", "false", "t", "f", "y", "n", "1", "0"}


def _normalise_flags(argv: list[str]) -> list[str]:
    """`--disable-tqdm` is read in any position: given before the command name, it moves after it (`list` has no
    progress bars and ignores it); a bare optional-value boolean flag followed by a word that is not a boolean (a
    checkpoint folder) is read as `--flag=true`."""
    argv = [
        f"{a}=true"
        if a in OPTIONAL_BOOL_FLAGS and (i + 1 == len(argv) or argv[i + 1].lower() not in BOOL_WORDS)
        else a
        for i, a in enumerate(argv)
    ]
    command_index = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if command_index is None:
        return argv
    before = [a for a in argv[:command_index] if a in QUIET_FLAGS or a.split("=", 1)[0] in QUIET_FLAGS]
    if not before:
        return argv
    rest = [a for a in argv[:command_index] if a not in before]
    command = argv[command_index]
    moved = [] if command == "list" else before
    return [*rest, command, *moved, *argv[command_index + 1 :]]


def wants_quiet(arguments: list) -> bool:
    """Whether the parsed command asked for no progress bars (`--disable-tqdm`, in any of its argument classes)."""
    for value in arguments:
        flag = value.get("disable_tqdm") if isinstance(value, dict) else getattr(value, "disable_tqdm", None)
        if flag:
            return True
    return False


class progress_bars_disabled:  # noqa: N801 (a context manager, used as a function)
    """Silence every progress bar of the libraries the command runs (datasets' map/filter/split bars,
    transformers' weight loading/saving bars, huggingface_hub's, evaluate's), restoring their state afterwards;
    the Trainer's own bars follow `TrainingArguments.disable_tqdm`."""

    def __enter__(self):
        import datasets
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as hf_logging

        self.state = (
            hf_logging.is_progress_bar_enabled(),
            datasets.is_progress_bar_enabled(),
            hub_utils.are_progress_bars_disabled(),
        )
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()
        hub_utils.disable_progress_bars()
        self.evaluate_on = None
        try:
            from evaluate.utils import logging as evaluate_logging

            self.evaluate_on = evaluate_logging.is_progress_bar_enabled()
            evaluate_logging.disable_progress_bar()
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        import datasets
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as hf_logging

        transformers_on, datasets_on, hub_off = self.state
        if transformers_on:
            hf_logging.enable_progress_bar()
        if datasets_on:
            datasets.enable_progress_bars()
        if not hub_off:
            hub_utils.enable_progress_bars()
        if self.evaluate_on:
            from evaluate.utils import logging as evaluate_logging

            evaluate_logging.enable_progress_bar()
        return False


# -------------------------------------------------------------------------------------------------------- listing
def print_listing(as_json: bool) -> None:
    from .training import registry

    info = registry()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print("Architectures (hf_efficient.ARCHITECTURES):")
    for model_type, entry in info["architectures"].items():
        if "error" in entry:
            print(f"  {model_type}: not loadable ({entry['error']})")
            continue
        print(f"  {model_type}  [{entry['config']}, {entry['folder']}]")
        if entry["summary"]:
            print(f"    {entry['summary']}")
        variants = ", ".join(f"{name} ({json.dumps(cfg)})" for name, cfg in entry["variants"].items())
        print(f"    variants: {variants or 'set through config fields (--config-overrides), see the presets'}")
        print(f"    heads: {', '.join(entry['heads'].values())}")
        print(f"    tasks: {', '.join(entry['tasks']) or 'none'}")
    print("Presets (model_cards/<name>/config.json; any such folder path also works):")
    if not info["presets"]:
        print("  none found")
    for name, entry in info["presets"].items():
        detail = entry.get("error") or f"{entry.get('model_type')}, {entry.get('task') or '?'}: {entry.get('title')}"
        print(f"  {name}  ({detail})")
    print("Tasks:")
    for name, entry in info["tasks"].items():
        print(
            f"  {name}  [{entry['auto_class']}, pipeline {entry['pipeline']}]  default model: "
            f"{entry['default_model']}; default data: {entry['default_data']}"
        )


# ----------------------------------------------------------------------------------------------------------- main
def run(argv: list[str], callbacks=()) -> int:
    """Parse and run one command (errors propagate; `main` turns them into one line)."""
    command, arguments = parse(argv)
    if command == "list":
        print_listing(arguments[0].json)
        return 0

    from . import training

    with progress_bars_disabled() if wants_quiet(arguments) else contextlib.nullcontext():
        if command == "train":
            training.run_train(*arguments, callbacks=callbacks)
        else:
            getattr(training, f"run_{command}")(*arguments)
    return 0


def _one_line(text) -> str:
    return " ".join(str(text).split()) or "unknown error"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("HF_EFFICIENT_DEBUG", "") not in ("", "0")
    try:
        return run(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (TaskError, MissingDependencyError) as error:  # bad input, or a package to install (named with pip)
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # anything else still ends in one line; --debug shows where it came from
        if debug:
            raise
        print(
            f"{PROG}: error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
