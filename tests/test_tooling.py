"""The embedded data."""

import math
from pathlib import Path

import numpy as np
import pytest

from hf_efficient import data

REPO = Path(__file__).resolve().parents[1]


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
