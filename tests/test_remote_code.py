"""The flat code bundle a checkpoint carries for `trust_remote_code` (hf_efficient.hub)."""

import re
import textwrap
from pathlib import Path

import pytest
import torch
from transformers.dynamic_module_utils import get_imports

import hf_efficient
from hf_efficient import hub
from tests.model_tester import run_without_package

MODELS = Path(hf_efficient.__file__).resolve().parent / "models"
SHARED = MODELS / "shared"
ARCH_FOLDERS = sorted(MODELS / name for name in hf_efficient.ARCHITECTURES.values())
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE)  # the pattern transformers follows


def test_no_shared_file_is_copied_into_an_architecture_folder():
    shared_names = {path.name for path in SHARED.glob("*.py")} - {"__init__.py"}
    for folder in ARCH_FOLDERS:
        assert not shared_names & {path.name for path in folder.glob("*.py")}, folder


@pytest.mark.parametrize("folder", ARCH_FOLDERS, ids=lambda folder: folder.name)
def test_bundle_is_the_package_source_flattened_and_self_contained(folder, tmp_path):
    bundle = hub.bundle_files(folder)
    for name, text in bundle.items():
        # transformers refuses remote code that imports a package the machine lacks, even inside a function
        (tmp_path / name).write_text(text)
        assert "hf_efficient" not in get_imports(tmp_path / name), name
    own = {path.name for path in folder.glob("*.py")} - {"__init__.py"}
    assert own <= set(bundle)
    for name, text in bundle.items():
        if name in own:
            # the architecture's own file: the package's text with only the shared imports rewritten
            source = (folder / name).read_text()
            assert text == re.sub(r"^(\s*)from \.\.shared\.", r"\1from .", source, flags=re.MULTILINE)
        else:
            # a shared file: byte for byte what the package has
            assert text == (SHARED / name).read_text(), name
        assert not re.search(r"^\s*from \.\.", text, re.MULTILINE), name  # no import reaches outside the folder
        for module in RELATIVE_IMPORT.findall(text):
            assert f"{module}.py" in bundle, (name, module)  # every relative import resolves inside the folder
    # only what the architecture reaches travels: a shared file nobody imports is left out
    reached = {f"{module}.py" for text in bundle.values() for module in RELATIVE_IMPORT.findall(text)}
    assert set(bundle) - own == reached - own


def test_bundles_carry_only_what_each_architecture_uses():
    assert "blocked_attention.py" in hub.bundle_files(MODELS / "r_transformer")
    assert "blocked_attention.py" not in hub.bundle_files(MODELS / "gmlp")
    assert "state_cache.py" not in hub.bundle_files(MODELS / "sparse_mlp")  # a Mixer does not decode
    assert {"common.py", "heads.py", "state_cache.py", "config_checks.py"} <= set(hub.bundle_files(MODELS / "aft"))


def test_bundle_refuses_an_import_it_cannot_resolve(tmp_path):
    (tmp_path / "modeling_foo.py").write_text("from ..shared.no_such_module import thing\n")
    with pytest.raises(FileNotFoundError, match="no_such_module"):
        hub.bundle_files(tmp_path)


def test_register_for_auto_class_save_loads_and_resaves_without_package(tmp_path):
    """transformers' own route (`register_for_auto_class` + `save_pretrained`) writes the flat bundle too, and a model
    loaded from it re-saves through transformers' saver into a folder that loads again."""
    config = hf_efficient.GMLPConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        max_position_embeddings=16,
        causal=True,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model_class = hf_efficient.GMLPForCausalLM
    model = model_class(config).eval()
    model_class.register_for_auto_class("AutoModelForCausalLM")
    try:
        model.save_pretrained(tmp_path / "saved")
    finally:
        del model_class._auto_class
    saved = {path.name: path.read_text() for path in (tmp_path / "saved").glob("*.py")}
    assert saved == hub.bundle_files(hub.architecture_folder(model))
    input_ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        expected = model(input_ids).logits
    torch.save(input_ids, tmp_path / "input_ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_efficient"] = None  # any `import hf_efficient` now fails
        import torch
        from transformers import AutoModelForCausalLM
        root = {str(tmp_path)!r}
        model = AutoModelForCausalLM.from_pretrained(root + "/saved", trust_remote_code=True).eval()
        model.save_pretrained(root + "/resaved")  # transformers' saver: the classes came from remote code
        again = AutoModelForCausalLM.from_pretrained(root + "/resaved", trust_remote_code=True).eval()
        input_ids = torch.load(root + "/input_ids.pt")
        with torch.no_grad():
            torch.save((model(input_ids).logits, again(input_ids).logits), root + "/out.pt")
        print("REMOTE-OK")
        """
    )
    run_without_package(script, tmp_path)
    first, again = torch.load(tmp_path / "out.pt")
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    torch.testing.assert_close(again, expected, rtol=0, atol=0)
