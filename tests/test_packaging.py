"""A plain (non-editable) install finds every preset: build a wheel, install it into a fresh virtual environment and
run the installed `hf-efficient` from outside the repository."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a build reads (setup.py copies model_cards/ into the wheel as hf_efficient/model_cards).
BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", "hf_efficient", "model_cards")


# PYTHONPATH could put the checkout's package first: the installed one must be the one tested.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def share_site_packages(python: Path) -> None:
    """Let the venv of `python` import what this interpreter has installed, whatever this interpreter is.

    `venv --system-site-packages` would share the *base* interpreter's site-packages, which is not this one's when
    the tests run inside a virtual environment (there it has no transformers). Instead a `.pth` file lists this
    interpreter's site-packages folders as plain paths, after the venv's own: the `.pth` files inside them (an
    editable install's import hook among them) are not processed, so the checkout cannot stand in for the wheel."""
    shared = [path for path in site.getsitepackages() if Path(path).is_dir()]
    venv_site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(venv_site) / "_outer_site_packages.pth").write_text("".join(f"{path}\n" for path in shared))


@pytest.mark.slow
def test_wheel_install_lists_every_preset_and_trains_one(tmp_path):
    # Build from a copy, so the checkout gets no build/ or egg-info folders.
    source = tmp_path / "src"
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(path, source / name)
    # No build isolation: setuptools and wheel are already here (the build needs no download).
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            tmp_path / "dist",
            source,
        ]
    )
    (wheel,) = (tmp_path / "dist").glob("hf_efficient-*.whl")

    # torch, transformers, ... come from the site-packages of the interpreter running the tests; hf-efficient
    # itself from the wheel (--ignore-installed: a copy installed here, e.g. editable, must not stand in for it).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv])
    python, command = venv / "bin" / "python", venv / "bin" / "hf-efficient"
    share_site_packages(python)
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--ignore-installed", wheel])

    outside = tmp_path / "elsewhere"  # not the repository, and no model_cards/ in the current folder
    outside.mkdir()
    location = run([python, "-c", "import hf_efficient; print(hf_efficient.__file__)"], cwd=outside).stdout.strip()
    assert Path(location).is_relative_to(venv), location

    listing = json.loads(run([command, "list", "--json"], cwd=outside).stdout)
    expected = {p.parent.name for p in (REPO / "model_cards").glob("*/config.json")}
    assert "gmlp-main-job" in expected and "gmlp-small-clm-256" in expected
    assert set(listing["presets"]) == expected
    for name, entry in listing["presets"].items():
        assert Path(entry["path"]).is_relative_to(venv), (name, entry["path"])
        assert "error" not in entry and entry["model_type"], (name, entry)

    # The installed preset folders carry their tokenizer / image processor, loadable with the Auto classes.
    check = (
        "import sys; from transformers import AutoImageProcessor, AutoTokenizer; "
        "AutoTokenizer.from_pretrained(sys.argv[1]); AutoImageProcessor.from_pretrained(sys.argv[2]); print('LOADED')"
    )
    text, vision = listing["presets"]["gmlp-small-clm-256"]["path"], listing["presets"]["gmlp-s16-224"]["path"]
    assert "LOADED" in run([python, "-c", check, text, vision], cwd=outside).stdout

    # A preset by name trains (one tiny step) from the installed package.
    argv = [command, "train", "--model", "gmlp-small-clm-256", "--max-steps", "1", "--block-size", "32"]
    argv += ["--per-device-train-batch-size", "2", "--max-train-bytes", "20000", "--max-eval-bytes", "2000"]
    argv += ["--max-eval-samples", "2", "--disable-tqdm", "--no-sample", "--save-strategy", "no", "--output-dir", "o"]
    run(argv, cwd=outside)
    results = json.loads((outside / "o" / "all_results.json").read_text())
    assert results["model"] == "gmlp-small-clm-256" and results["model_source"] == "preset"
    assert results["global_step"] == 1 and results["num_parameters"] > 4_000_000
