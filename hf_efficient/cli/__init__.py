"""The `hf-efficient` command (also `python -m hf_efficient`): list / train / evaluate / generate / publish.

    hf-efficient list
    hf-efficient train --output-dir out/main-job                     # the main job: AFT-conv byte LM, embedded corpus
    hf-efficient train --task image-cls --model gmlp --output-dir out/digits
    hf-efficient evaluate out/main-job
    hf-efficient generate out/main-job --prompt "def " --temperature 0.7
    hf-efficient train --task seq2seq --output-dir out/words           # N-gram encoder-decoder: numbers -> words
    hf-efficient generate out/words --prompt "1987-03-09"
    hf-efficient publish out/main-job --repo-id you/aft-conv-clm

The options of each command are typed argument dataclasses parsed with `transformers.HfArgumentParser`, as in
transformers' example scripts: every field is a flag, spelled `--field_name` or `--field-name` (no abbreviations;
an unknown flag is an error naming the closest one). `train` takes `ModelArguments`, `TrainDataArguments` and
`TrainArguments`, a `Seq2SeqTrainingArguments` subclass, so every `Seq2SeqTrainingArguments` field is a flag of its
own (the generation fields apply to the seq2seq task, which trains with `Seq2SeqTrainer`).

Every registered architecture (`hf_efficient.ARCHITECTURES`, each with its `AUTO_MAPPING` of heads) is available
without changes here. Errors the user can fix print one line, `hf-efficient: error: ...`, and exit non-zero;
`--debug` (anywhere on the line, or `HF_EFFICIENT_DEBUG=1`) shows the traceback instead; `--disable-tqdm` (anywhere
on the line too) silences every progress bar of the command.

The modules: `arguments` (the argument dataclasses), `parser` (the command line), `command` (`main`: dispatch and
one-line errors), one module per command (`train`, `evaluation`, `generate`, `publish`, `listing`), and what they
share: `models` (model resolution and checks), `outputs` (output and staging folders, checkpoints), `tasks` (the
task declarations), `metrics` (evaluate modules) and `model_card`.
"""

import sys

# What the command needs beyond the models (setup.cfg's `cli` extra), by import name.
COMMAND_PACKAGES = {"accelerate", "datasets", "evaluate", "numpy", "PIL", "sacrebleu", "sklearn"}
INSTALL_HINT = 'python3 -m pip install "hf-efficient[cli]"'

try:
    from . import command as _command
except ModuleNotFoundError as error:  # the models alone are installed: the command says what to install
    if (error.name or "").split(".")[0] not in COMMAND_PACKAGES:
        raise
    _command = None
    _MISSING = f"the command needs the `cli` extra ({error.name.split('.')[0]} is missing): {INSTALL_HINT}"


def run(argv: list[str], callbacks=()) -> int:
    """Run the command line `argv` (without the program name); errors propagate (see `main`)."""
    if _command is None:
        raise ModuleNotFoundError(_MISSING)
    return _command.run(argv, callbacks)


def main(argv=None) -> int:
    """The `hf-efficient` command (`argv`: its arguments, default `sys.argv[1:]`); returns the exit status. Without
    the `cli` extra: one line naming the pip command, exit status 1."""
    if _command is None:
        print(f"hf-efficient: error: {_MISSING}", file=sys.stderr)
        return 1
    return _command.main(argv)


__all__ = ["main", "run"]
