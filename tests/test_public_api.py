"""The package's public API: `from hf_efficient import GMLPForCausalLM, AFTCache, ...` for every registered
architecture, as `from transformers import LlamaForCausalLM`; the shared files are real whole-file copies."""

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache

import hf_efficient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model_type", sorted(hf_efficient.ARCHITECTURES))
def test_every_config_model_and_cache_class_is_exported(model_type):
    package = hf_efficient.get_architecture(model_type)
    public = {name for name in package.__all__ if name != "AUTO_MAPPING"}
    modules = [
        importlib.import_module(f"{package.__name__}.{kind}_{model_type}") for kind in ("configuration", "modeling")
    ]
    classes = {
        name
        for module in modules
        for name, obj in vars(module).items()
        if inspect.isclass(obj)
        and obj.__module__ == module.__name__  # defined there (not the shared files' base classes)
        and issubclass(obj, (PreTrainedConfig, PreTrainedModel, Cache))
        and not name.startswith("_")
    }
    assert classes <= public, f"{model_type}: not in __all__: {sorted(classes - public)}"
    for name in public:
        assert getattr(hf_efficient, name) is getattr(package, name), name
        assert name in hf_efficient.__all__, name
    assert hf_efficient.get_config_class(model_type).__name__ in public
    for model_class in package.AUTO_MAPPING.values():
        assert model_class.__name__ in public


def test_import_in_a_fresh_interpreter():
    code = "from hf_efficient import GMLPConfig, GMLPForCausalLM, AFTForMaskedLM, CombinerModel, AFTCache; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]
