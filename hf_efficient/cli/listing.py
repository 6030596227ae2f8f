"""`hf-efficient list`: the registered architectures with their heads and tasks, the presets and the tasks."""

import json

import hf_efficient

from ..errors import first_line
from .models import preset_folders
from .tasks import TASKS, task_of_auto


def print_listing(as_json: bool) -> None:
    """Print `registry()`, as JSON or as text."""
    info = registry()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print("Architectures (hf_efficient.ARCHITECTURES):")
    for model_type, entry in info["architectures"].items():
        if "error" in entry:
            print(f"  {model_type}: not loadable ({entry['error']})")
            continue
        print(f"  {model_type}: {entry['name']}  [{entry['config']}, {entry['folder']}]")
        if entry["summary"]:
            print(f"    {entry['summary']}")
        print(f"    variants: {entry['variants'] or '(not declared)'}")
        print(f"    heads: {', '.join(entry['heads'].values())}")
        print(f"    tasks: {', '.join(entry['tasks']) or 'none'}")
        print(f"    presets: {', '.join(entry['presets']) or 'none'}")
    print("Presets (model_cards/<name>/config.json; any such folder path also works):")
    if not info["presets"]:
        print("  none found")
    for name, entry in info["presets"].items():
        detail = entry.get("error") or f"{entry.get('model_type')}, {entry.get('task') or '?'}: {entry.get('title')}"
        print(f"  {name}  ({detail})")
    print("Tasks:")
    for name, entry in info["tasks"].items():
        print(
            f"  {name}  [{entry['auto_class']}, Hub pipeline_tag {entry['pipeline']}]  default model: "
            f"{entry['default_model']}; default data: {entry['default_data']}"
        )


def registry() -> dict:
    """Architectures (name, config class, summary, variants, heads -> tasks, presets), presets and tasks, for
    `hf-efficient list`. An architecture's name and variants are those of its card (`ARCHITECTURE_CARD` in its
    folder's `__init__.py`, which the architecture table of the README and the documentation shows too)."""
    folders = preset_folders()
    preset_types = {name: _preset_model_type(path) for name, path in folders.items()}
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
        card = getattr(module, "ARCHITECTURE_CARD", None) or {}
        architectures[model_type] = {
            "name": card.get("name") or model_type,
            "folder": f"hf_efficient/models/{folder}",
            "config": config_class.__name__,
            "summary": doc,
            "variants": card.get("variants") or "",
            "heads": heads,
            "tasks": sorted(filter(None, map(task_of_auto, heads))),
            "presets": sorted(name for name, preset_type in preset_types.items() if preset_type == model_type),
        }
    presets = {}
    for name, path in folders.items():
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


def _preset_model_type(path) -> str | None:
    """The `model_type` of a preset folder's config.json (None when it cannot be read)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None
