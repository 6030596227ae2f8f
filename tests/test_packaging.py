"""Packaging: the metadata in setup.cfg (one version, one Python floor, the dependency split, the package list, the
license, the pre-commit ruff), the models without the command's dependencies, and a plain (non-editable) install
that finds every preset: build a wheel, install it into a fresh virtual environment and run the installed
`hf-efficient` from outside the repository."""

import ast
import configparser
import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import hf_efficient

REPO = Path(__file__).resolve().parents[1]
# What a build reads (setup.cfg's package_dir / package_data put model_cards/ into the wheel as
# hf_efficient/model_cards; MANIFEST.in adds the license and changelog to the sdist).
BUILD_INPUTS = (
    "setup.cfg",
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "LICENSE",
    "CHANGELOG.md",
    "hf_efficient",
    "model_cards",
)
SETUP_CFG = configparser.ConfigParser()
SETUP_CFG.read(REPO / "setup.cfg")
# The command's dependencies (the `cli` extra): the models must import and run without any of them.
COMMAND_ONLY_MODULES = ("datasets", "evaluate", "accelerate", "sacrebleu", "PIL", "sklearn")


def cfg_list(section: str, option: str) -> list[str]:
    """A multi-line setup.cfg value as its lines (comments and blank lines dropped)."""
    lines = (line.split("#")[0].strip() for line in SETUP_CFG[section][option].splitlines())
    return [line for line in lines if line]


def requirements(section: str, option: str) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, cfg_list(section, option))}


def preset_files() -> list[str]:
    """Every file under model_cards/, relative to it (what the wheel must carry as hf_efficient/model_cards/)."""
    root = REPO / "model_cards"
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    )


# ------------------------------------------------------------------------------------------------------- metadata
def test_one_version_the_installed_distribution_reads_from_the_package():
    assert SETUP_CFG["metadata"]["version"].strip() == "attr: hf_efficient.__version__"
    assert importlib.metadata.version("hf-efficient") == hf_efficient.__version__
    assert not (REPO / "setup.py").exists(), "metadata lives in setup.cfg only"


def test_packages_listed_in_setup_cfg_are_the_package_folders():
    """setup.cfg lists its packages (one of them, the presets, is mapped from the top-level model_cards/ folder, which
    `find:` cannot express): every folder of the package with an __init__.py must be listed, or the wheel lacks it."""
    listed = set(cfg_list("options", "packages"))
    folders = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "hf_efficient").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert folders - listed == set(), f"add to setup.cfg [options] packages: {sorted(folders - listed)}"
    assert listed - folders == {"hf_efficient.model_cards"}, sorted(listed - folders)
    package_dir = dict(line.replace(" ", "").split("=") for line in cfg_list("options", "package_dir"))
    assert package_dir == {"hf_efficient.model_cards": "model_cards"}
    assert cfg_list("options.package_data", "hf_efficient.model_cards") == ["**/*"]
    assert not (REPO / "hf_efficient" / "model_cards").exists()  # the presets stay at the top of the repository


def test_python_floor_agrees_everywhere():
    floor = SpecifierSet(SETUP_CFG["options"]["python_requires"])
    (minimum,) = [Version(s.version) for s in floor if s.operator == ">="]
    assert Version(f"{sys.version_info.major}.{sys.version_info.minor}") in floor
    ruff = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]
    assert ruff["target-version"] == f"py{minimum.major}{minimum.minor}"
    versions = re.findall(r"Programming Language :: Python :: (3\.\d+)$", SETUP_CFG["metadata"]["classifiers"], re.M)
    assert versions and min(map(Version, versions)) == minimum, versions
    assert f"Python {minimum}" in (REPO / "README.md").read_text()


def test_license_file_is_the_declared_apache_license():
    assert SETUP_CFG["metadata"]["license_expression"].strip() == "Apache-2.0"
    assert cfg_list("metadata", "license_files") == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in text


def test_pre_commit_ruff_is_the_dev_extras_ruff():
    """The hook's pinned rev is the lowest ruff the `dev` extra allows (what CI's `ruff check` / `ruff format
    --check` may run), so a commit hook and CI lint and format alike."""
    config = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    (repo,) = [r for r in config["repos"] if r["repo"].endswith("astral-sh/ruff-pre-commit")]
    assert {hook["id"] for hook in repo["hooks"]} >= {"ruff-check", "ruff-format"}
    ruff = requirements("options.extras_require", "dev")["ruff"]
    (lowest,) = [s.version for s in ruff.specifier if s.operator == ">="]
    assert repo["rev"] == f"v{lowest}", (repo["rev"], str(ruff))


def third_party_imports(paths) -> dict[str, set[str]]:
    """Top-level third-party modules imported by the files (anywhere in them: lazy imports too) -> files."""
    found = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "hf_efficient":
                    found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def test_dependency_split_declares_what_each_layer_imports():
    """install_requires covers what `import hf_efficient` and the models import; the `cli` extra adds what the
    application layer (the `hf-efficient` command) imports; `dev` installs `cli` (the README's test command)."""
    core = requirements("options", "install_requires")
    cli = requirements("options.extras_require", "cli")
    package = REPO / "hf_efficient"
    model_files = [*(package / "models").rglob("*.py"), package / "__init__.py", package / "hub.py"]
    application_files = [p for p in package.rglob("*.py") if p not in model_files]
    distributions = importlib.metadata.packages_distributions()
    for files, declared in ((model_files, set(core)), (application_files, set(core) | set(cli))):
        for module, where in third_party_imports(files).items():
            names = {canonicalize_name(d) for d in distributions.get(module, [module])}
            assert names & declared, f"{module} (imported by {sorted(where)}) is not declared: {sorted(declared)}"
    assert not {canonicalize_name(m) for m in ("datasets", "evaluate", "accelerate", "Pillow", "scikit-learn")} & set(
        core
    )
    assert "accelerate" in cli  # transformers' Trainer needs it
    dev = [r for r in map(Requirement, cfg_list("options.extras_require", "dev")) if r.name == "hf-efficient"]
    assert [r.extras for r in dev] == [{"cli", "docs"}]
    assert {"bench", "timm"} <= set(SETUP_CFG["options.extras_require"])


MODELS_WITHOUT_COMMAND_DEPENDENCIES = """
import sys

BLOCKED = {blocked!r}
assert not any(name.split(".")[0] in BLOCKED for name in sys.modules)
# Python's own marker of a module that cannot be imported: `import X` / `import X.sub` raise ModuleNotFoundError and
# importlib.util.find_spec("X") returns None, as for a package that is not installed (transformers' availability
# checks call find_spec; a meta-path finder raising there would crash them, unlike a real absence).
for name in BLOCKED:
    sys.modules[name] = None

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification
from transformers import AutoModelForSeq2SeqLM

import hf_efficient

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2)
CONFIGS = {{
    "gmlp": dict(TEXT, max_position_embeddings=16),
    "aft": dict(TEXT, num_heads=4, max_position_embeddings=16, position_bias_dim=8),
    "combiner": dict(TEXT, num_attention_heads=2, block_size=4, max_position_embeddings=48),
    "ngram_transformer": dict(TEXT, num_encoder_layers=2, num_attention_heads=2, ngram_size=3, attention_block_size=4),
    "r_transformer": dict(TEXT, num_attention_heads=2, local_window=3, num_rnn_layers=1),
    "sparse_mlp": dict(
        image_size=8, patch_size=2, hidden_size=16, token_mixing_dim=16, channel_mixing_dim=32, num_hidden_layers=3,
        num_sparse_layers=2, num_token_experts=4, num_channel_experts=4, num_labels=3,
    ),
}}
assert set(CONFIGS) == set(hf_efficient.ARCHITECTURES), sorted(hf_efficient.ARCHITECTURES)
torch.manual_seed(0)
ids = torch.randint(4, 64, (2, 8))
with torch.no_grad():
    for model_type, kwargs in CONFIGS.items():
        config = AutoConfig.for_model(model_type, **kwargs)
        if model_type == "sparse_mlp":
            pixels = torch.randn(2, 3, 8, 8)
            assert AutoModel.from_config(config)(pixel_values=pixels).last_hidden_state.shape[0] == 2
            assert AutoModelForImageClassification.from_config(config)(pixel_values=pixels).logits.shape == (2, 3)
        else:
            assert AutoModel.from_config(config)(input_ids=ids).last_hidden_state.shape[:2] == (2, 8)
            model = AutoModelForCausalLM.from_config(config).eval()
            assert model(input_ids=ids).logits.shape == (2, 8, 64)
            mask = torch.ones_like(ids)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
            assert out.shape == (2, 11), out.shape
        if model_type == "ngram_transformer":
            config = AutoConfig.for_model(
                model_type, **kwargs, is_encoder_decoder=True, pad_token_id=0, decoder_start_token_id=1
            )
            logits = AutoModelForSeq2SeqLM.from_config(config)(input_ids=ids, decoder_input_ids=ids[:, :4]).logits
            assert logits.shape == (2, 4, 64)
        print(model_type, "ok")
assert all(sys.modules[name] is None for name in BLOCKED)
print("MODELS OK")
"""


def test_models_work_without_the_command_dependencies(tmp_path):
    """`pip install hf-efficient` without the `cli` extra: `import hf_efficient` and every architecture (Auto
    classes, forward, cached generation, the seq2seq head) run with none of the command's dependencies importable."""
    code = MODELS_WITHOUT_COMMAND_DEPENDENCIES.format(blocked=COMMAND_ONLY_MODULES)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path
    )
    assert result.returncode == 0 and "MODELS OK" in result.stdout, result.stderr[-3000:]


def test_command_without_its_extra_names_the_pip_command(tmp_path):
    """Without the `cli` extra, `hf-efficient` (any subcommand) ends in one line naming the extra, no traceback."""
    code = (
        f"import sys\nfor name in {COMMAND_ONLY_MODULES!r}:\n    sys.modules[name] = None\n"
        "from hf_efficient.cli import main\nsys.exit(main(['list']))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=ENV, cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-efficient: error: the command needs the `cli` extra ("), lines
    assert lines[0].endswith('is missing): python3 -m pip install "hf-efficient[cli]"'), lines


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
    # The wheel itself carries every preset file, the license and the one version.
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = archive.read(metadata).decode()
    missing = [f for f in preset_files() if f"hf_efficient/model_cards/{f}" not in names]
    assert not missing and len(preset_files()) > 50, missing
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"\nVersion: {hf_efficient.__version__}\n" in metadata
    assert 'Requires-Dist: datasets>=4.0; extra == "cli"' in metadata

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
