"""Packaging metadata is in setup.cfg. This file adds one build step: the presets.

`model_cards/` (presets: `<name>/config.json`, `card.json`, `README.md`; benchmark declarations) stays at the top
of the repository, where the README and the scripts refer to it; a wheel (`pip install .`) ships a copy of the whole
folder inside the package, as `hf_efficient/model_cards/`, where `hf_efficient.training.preset_folders()` finds it.
Every file under `model_cards/` is copied, so a new preset folder needs no packaging edit. (An editable install
reads the top-level folder itself.)
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

MODEL_CARDS = Path(__file__).resolve().parent / "model_cards"


class BuildPyWithModelCards(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "hf_efficient" / "model_cards"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(MODEL_CARDS, target, ignore=shutil.ignore_patterns("__pycache__", ".*"))

    def get_outputs(self, include_bytecode=True):
        target = Path(self.build_lib) / "hf_efficient" / "model_cards"
        cards = [str(target / p.relative_to(MODEL_CARDS)) for p in sorted(MODEL_CARDS.rglob("*")) if p.is_file()]
        return super().get_outputs(include_bytecode) + cards


setup(cmdclass={"build_py": BuildPyWithModelCards})
