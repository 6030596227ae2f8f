"""Parsing the command line: one `HfArgumentParser` sub-command per command of `COMMANDS`, whose options are the
fields of the command's argument dataclasses (`arguments.py`)."""

import argparse
import dataclasses
import difflib
from dataclasses import dataclass

from transformers import HfArgumentParser, TrainingArguments

from ..errors import UsageError
from .arguments import (
    CheckpointArguments,
    DataArguments,
    EvaluateArguments,
    GenerateArguments,
    ListArguments,
    ModelArguments,
    PublishArguments,
    TrainArguments,
    TrainDataArguments,
)

PROG = "hf-efficient"


@dataclass(frozen=True)
class Command:
    """A sub-command: its one-line help, description, argument dataclasses and epilog."""

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
        "job: the preset aft-conv-main-job (a 0.78M-parameter causal AFT-conv byte LM, context 512) on the embedded "
        "corpus, 600 steps of 8 x 512 bytes, or with --max-train-minutes a schedule sized to the budget.",
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
