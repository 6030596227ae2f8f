"""Where a run writes: the output folder and its staging folder (`<out>.partial`, renamed into place only when the
run is complete), what counts as a run's own output (the only files `--overwrite-output-dir` replaces), and the
Trainer checkpoints a run resumes from (complete ones only)."""

import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import TaskError, first_line
from . import model_card

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STAGING_SUFFIX = ".partial"


def has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in WEIGHT_FILES) or any(folder.glob("model-*.safetensors"))


def weight_files(folder: Path) -> list[Path]:
    names = [folder / name for name in WEIGHT_FILES if (folder / name).is_file()]
    return names + sorted(folder.glob("model-*.safetensors"))


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
    models = Path(__file__).resolve().parents[1] / "models"  # hf_efficient/models
    return {path.name for path in models.glob("*/*.py") if path.name != "__init__.py"}


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


def finite(metrics: dict) -> dict:
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in metrics.items()}


def write_json(path: Path, values: dict) -> None:
    path.write_text(json.dumps(finite(values), indent=2, sort_keys=True) + "\n")
