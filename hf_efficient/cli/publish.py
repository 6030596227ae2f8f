"""`hf-efficient publish`: make a checkpoint folder Hub-ready (weights, config with auto_map, code, processor,
generation config, model card with measured metrics) and upload it."""

import os
import shutil
from pathlib import Path

import hf_efficient

from ..errors import TaskError, first_line
from ..hub import has_code
from . import model_card
from .evaluation import evaluate_checkpoint
from .generate import default_generation_config
from .models import load_checkpoint
from .outputs import install_output, prepare_output, staging_folder, write_json

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
        write_json(staging / "all_results.json", results)
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
