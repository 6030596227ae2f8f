"""Running a command: parse the line, silence progress bars if asked, dispatch to the command's `run_*` function,
and turn every error into one line (`main`)."""

import contextlib
import os
import sys

from ..errors import MissingDependencyError, TaskError, UsageError
from .evaluation import run_evaluate
from .generate import run_generate
from .listing import print_listing
from .parser import PROG, parse, wants_quiet
from .publish import run_publish
from .train import run_train

# The commands other than `list` (which prints) and `train` (which also takes Trainer callbacks).
RUNNERS = {"evaluate": run_evaluate, "generate": run_generate, "publish": run_publish}


class progress_bars_disabled:  # lower case: a context manager, used as a function
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


def run(argv: list[str], callbacks=()) -> int:
    """Parse and run one command (errors propagate; `main` turns them into one line)."""
    command, arguments = parse(argv)
    if command == "list":
        print_listing(arguments[0].json)
        return 0

    with progress_bars_disabled() if wants_quiet(arguments) else contextlib.nullcontext():
        if command == "train":
            run_train(*arguments, callbacks=callbacks)
        else:
            RUNNERS[command](*arguments)
    return 0


def _one_line(text) -> str:
    return " ".join(str(text).split()) or "unknown error"


def main(argv=None) -> int:
    """The `hf-efficient` command (`argv`: its arguments, default `sys.argv[1:]`); returns the exit status."""
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
