"""The embedded data, the copies checker and saving with code."""

import importlib.util
import inspect
import math
from pathlib import Path

import numpy as np
import pytest

from hf_efficient import data
from hf_efficient.models.gmlp import modeling_gmlp

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("check_copies", REPO / "scripts" / "check_copies.py")
check_copies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_copies)


def test_split_is_deterministic_and_disjoint():
    root = data.stdlib_root()
    files = [p.relative_to(root).as_posix() for p in data.stdlib_source_files()]
    assert len(files) > 100
    splits = [data.split_of(f) for f in files]
    assert splits == [data.split_of(f) for f in files]
    share = splits.count("validation") / len(splits)
    assert 0.01 < share < 0.15, share


def test_byte_ids_equal_byt5_tokenizer():
    blob = data.stdlib_bytes("validation", max_bytes=5000)
    text = blob.decode("utf-8", errors="ignore")
    blob = text.encode("utf-8")
    ids = data.bytes_to_ids(blob).tolist()
    assert ids == data.default_tokenizer()(text, add_special_tokens=False)["input_ids"]


def test_lm_dataset_blocks_and_bits_per_byte():
    dataset = data.stdlib_lm_dataset(block_size=64, max_train_bytes=10_000, max_validation_bytes=2_000)
    assert set(dataset) == {"train", "validation"}
    row = dataset["train"][0]
    assert len(row["input_ids"]) == 64 and row["input_ids"] == row["labels"]
    assert len(dataset["train"]) == 10_000 // 64
    assert np.max(dataset["train"]["input_ids"]) < 256 + data.BYTE_OFFSET
    assert data.bits_per_byte(math.log(2) * 3) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="split"):
        data.stdlib_bytes("test")


def test_check_copies_detects_and_fixes_drift(tmp_path):
    source = inspect.getsource(modeling_gmlp.GMLPSpatialGatingUnit).replace("GMLP", "Foo")
    target = tmp_path / "modeling_foo.py"
    marker = "# Copied from hf_efficient.models.gmlp.modeling_gmlp.GMLPSpatialGatingUnit with GMLP->Foo\n"
    target.write_text(marker + source)
    assert check_copies.check_file(target, fix=False) == []
    target.write_text(marker + source.replace("return u * gate, v", "return u + gate, v"))
    problems = check_copies.check_file(target, fix=False)
    assert len(problems) == 1 and "FooSpatialGatingUnit" in problems[0]
    check_copies.check_file(target, fix=True)
    assert check_copies.check_file(target, fix=False) == []
    assert "return u * gate, v" in target.read_text()


def test_check_copies_detects_and_fixes_a_drifted_whole_file_copy(tmp_path):
    models = tmp_path / "models"
    (models / "shared").mkdir(parents=True)
    (models / "foo").mkdir()
    master = (REPO / "hf_efficient" / "models" / "shared" / "common.py").read_text()
    (models / "shared" / "common.py").write_text(master)
    (models / "foo" / "common.py").write_text(master)
    assert check_copies.check_whole_files(False, models) == (1, [])
    (models / "foo" / "common.py").write_text(master.replace("def mean_pool", "def average_pool"))
    count, problems = check_copies.check_whole_files(False, models)
    assert count == 1 and len(problems) == 1 and "foo/common.py" in problems[0]
    check_copies.check_whole_files(True, models)
    assert (models / "foo" / "common.py").read_text() == master


def test_repository_copies_are_in_sync():
    assert check_copies.main([]) == 0
