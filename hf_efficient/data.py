"""The data of the `hf-efficient` command: the embedded default data (no download anywhere) and the reader of a
local dataset that replaces it.

Text: the bytes of the running interpreter's standard-library source (`.py` files), split deterministically into
train / validation by a hash of each file's path, cut into fixed-length blocks of byte tokens. The tokeniser is
transformers' `ByT5Tokenizer` (one token per UTF-8 byte, id = byte + 3, no vocabulary file), so the mean loss in
nats per token divided by ln 2 is bits per byte.

Local data (`read_local_dataset`): any `datasets`-loadable path, a file or folder of json / jsonl / csv / tsv / text /
parquet files (`train.*`, `validation.*` / `test.*` give the splits), a folder saved with `save_to_disk`, or an
`imagefolder` tree (`<split>/<label>/<image>` or `<label>/<image>`). Without a validation split, a seeded share of
the training rows is held out.
"""

import hashlib
import importlib
import math
import sysconfig
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict
from transformers import ByT5Tokenizer

from .errors import MissingDependencyError, TaskError, first_line

BYTE_OFFSET = 3  # ByT5: ids 0, 1, 2 are <pad>, </s>, <unk>; byte b is id b + 3
FILE_SEPARATOR = b"\n\n"
SEQ_CLS_MODULES = ("asyncio", "email", "tkinter", "unittest")
# What the image task imports, and the requirement (setup.cfg's install_requires) that provides it.
IMAGE_REQUIREMENTS = {"PIL": "Pillow>=9.1", "sklearn": "scikit-learn>=1.3"}
TEXT_SUFFIXES = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".txt": "text",
    ".parquet": "parquet",
}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
VALIDATION_SPLIT_NAMES = ("validation", "valid", "val", "dev", "test")


def require(module: str, requirement: str, purpose: str):
    """`import module`, or a `MissingDependencyError` naming `purpose` and `pip install "<requirement>"`."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f'{purpose} needs "{requirement}" ({error}): install it with python3 -m pip install "{requirement}" '
            "(a dependency of the hf-efficient command: installing the package with its `cli` extra, "
            '`python3 -m pip install -e ".[cli]"`, installs it)'
        ) from error


def default_tokenizer() -> ByT5Tokenizer:
    """The byte-level tokeniser saved with every text checkpoint (complete on the Hub, needs no files).

    Its mask token is `<extra_id_0>` (id 259, already in the vocabulary: no id or tokenisation changes), so masked-LM
    checkpoints work with `pipeline("fill-mask")` and `DataCollatorForLanguageModeling`."""
    return ByT5Tokenizer(mask_token="<extra_id_0>")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """The standard library's `.py` files (third-party `site-packages` excluded), in a deterministic order."""
    root = root or stdlib_root()
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def split_of(relative_path: str, validation_percent: float = 5.0) -> str:
    """'validation' or 'train', from a hash of the path: stable across machines and runs."""
    bucket = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") % 10_000
    return "validation" if bucket < validation_percent * 100 else "train"


def stdlib_bytes(split: str, max_bytes: int | None = None, validation_percent: float = 5.0) -> bytes:
    """Concatenated bytes of one split's files (separated by a blank line), at most `max_bytes`."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    root = stdlib_root()
    chunks, total = [], 0
    for path in stdlib_source_files(root):
        if split_of(path.relative_to(root).as_posix(), validation_percent) != split:
            continue
        data = path.read_bytes() + FILE_SEPARATOR
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not chunks:
        raise ValueError(f"No standard-library source files found under {root} for split {split!r}.")
    blob = b"".join(chunks)
    return blob[:max_bytes] if max_bytes is not None else blob


def bytes_to_ids(blob: bytes) -> np.ndarray:
    """ByT5 token ids of raw bytes (identical to `ByT5Tokenizer` on the decoded text, without Python-level work)."""
    return np.frombuffer(blob, dtype=np.uint8).astype(np.int64) + BYTE_OFFSET


def blocks_dataset(ids: np.ndarray, block_size: int) -> Dataset:
    """Non-overlapping blocks of `block_size` tokens as a `datasets.Dataset` with `input_ids` and `labels`
    (causal LM: the model shifts labels internally)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}.")
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one block of {block_size}.")
    blocks = ids[: num_blocks * block_size].reshape(num_blocks, block_size)
    return Dataset.from_dict({"input_ids": blocks, "labels": blocks.copy()})


def stdlib_lm_dataset(
    block_size: int = 256,
    max_train_bytes: int | None = None,
    max_validation_bytes: int | None = None,
    validation_percent: float = 5.0,
) -> DatasetDict:
    """The default text corpus as a `DatasetDict` with `train` and `validation` splits of byte-token blocks."""
    return DatasetDict(
        train=blocks_dataset(bytes_to_ids(stdlib_bytes("train", max_train_bytes, validation_percent)), block_size),
        validation=blocks_dataset(
            bytes_to_ids(stdlib_bytes("validation", max_validation_bytes, validation_percent)), block_size
        ),
    )


def bits_per_byte(mean_loss_nats: float) -> float:
    """Mean cross-entropy per byte token (nats) -> bits per byte."""
    return mean_loss_nats / math.log(2)


# ---------------------------------------------------------------- the embedded data of the other tasks
def stdlib_classification_dataset(block_size: int = 128, max_blocks_per_class: int = 2000, validation_percent=20.0):
    """The embedded `seq-cls` task: blocks of source bytes labelled with their standard-library package."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    root = stdlib_root()
    rows = {"train": ([], []), "validation": ([], [])}
    for label, package in enumerate(SEQ_CLS_MODULES):
        per_split = {"train": [], "validation": []}
        for path in stdlib_source_files(root / package):
            relative = path.relative_to(root).as_posix()
            per_split[split_of(relative, validation_percent)].append(path.read_bytes())
        for split, chunks in per_split.items():
            ids = bytes_to_ids(b"\n".join(chunks))
            count = min(
                len(ids) // block_size, max_blocks_per_class if split == "train" else max_blocks_per_class // 4
            )
            rows[split][0].extend(ids[: count * block_size].reshape(count, block_size))
            rows[split][1].extend([label] * count)
    features = Features(
        {"input_ids": Sequence(Value("int64")), "label": ClassLabel(names=list(SEQ_CLS_MODULES))},
    )
    # Rows are grouped by class: shuffle once (fixed seed) so that any prefix (--max-*-samples) mixes the classes.
    return {
        split: Dataset.from_dict({"input_ids": np.stack(ids), "label": labels}, features=features)
        .shuffle(seed=0)
        .flatten_indices()
        for split, (ids, labels) in rows.items()
    }


def digits_dataset(validation_percent: float = 20.0, seed: int = 0):
    """scikit-learn's handwritten digits as 8 x 8 grey-scale PIL images (pixel 0..16 -> 0..255)."""
    require("PIL", IMAGE_REQUIREMENTS["PIL"], "the embedded digits (image-cls)")
    require("sklearn", IMAGE_REQUIREMENTS["sklearn"], "the embedded digits (image-cls)")
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, val_idx = train_test_split(
        np.arange(len(pixels)), test_size=validation_percent / 100, random_state=seed, stratify=digits.target
    )
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=[str(d) for d in range(10)])})

    def build(indices):
        images = [Image.fromarray(pixels[i], mode="L") for i in indices]
        return Dataset.from_dict({"image": images, "label": digits.target[indices].tolist()}, features=features)

    return build(train_idx), build(val_idx)


# ---------------------------------------------------------------------------------------------- local datasets
def read_local_dataset(path: str, dataset_format: str | None, validation_percent: float, seed: int, image=False):
    """A local `datasets`-loadable path as `(train, validation)`; raises `TaskError` naming the problem."""
    import datasets

    location = Path(path).expanduser()
    if not location.exists():
        raise TaskError(f"dataset path {path!r} does not exist")
    try:
        if location.is_dir() and ((location / "dataset_dict.json").exists() or (location / "state.json").exists()):
            loaded = datasets.load_from_disk(str(location))
        else:
            builder, data_files = _builder_and_files(location, dataset_format, image)
            kwargs = {"delimiter": "\t"} if builder == "csv" and _all_suffix(data_files, ".tsv") else {}
            if builder == "imagefolder":
                loaded = datasets.load_dataset(builder, data_dir=str(location), **kwargs)
            else:
                loaded = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    except TaskError:
        raise
    except Exception as error:  # datasets' errors are long chains: keep the first line of the root cause
        raise TaskError(f"could not read dataset {path!r}: {first_line(error)}") from error
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict(train=loaded)
    train_name = "train" if "train" in loaded else next(iter(loaded))
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in loaded), None)
    train = loaded[train_name]
    if len(train) == 0:
        raise TaskError(f"dataset {path!r} has no rows in its {train_name!r} split")
    if validation_name is None:
        if len(train) < 2:
            raise TaskError(f"dataset {path!r} has {len(train)} row: too few to hold out a validation split")
        test_size = max(1, round(len(train) * validation_percent / 100))
        split = train.train_test_split(test_size=test_size, seed=seed)
        return split["train"], split["test"]
    return train, loaded[validation_name]


def _builder_and_files(location: Path, dataset_format: str | None, image: bool):
    if location.is_file():
        builder = dataset_format or TEXT_SUFFIXES.get(location.suffix.lower())
        if builder is None:
            raise TaskError(
                f"cannot tell the format of dataset file {str(location)!r}; pass --dataset-format "
                f"({', '.join(sorted(set(TEXT_SUFFIXES.values())))})"
            )
        return builder, {"train": str(location)}
    files = [p for p in location.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if dataset_format == "imagefolder" or (
        dataset_format is None and image and any(p.suffix.lower() in IMAGE_SUFFIXES for p in files)
    ):
        return "imagefolder", None
    data = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
    if not data:
        kinds = "image files" if image else "json/jsonl/csv/tsv/txt/parquet files"
        raise TaskError(f"dataset folder {str(location)!r} holds no {kinds}")
    builder = dataset_format or TEXT_SUFFIXES[data[0].suffix.lower()]
    splits: dict[str, list[str]] = {}
    for p in sorted(data):
        stem = p.stem.split(".")[0].split("-")[0].lower()
        name = stem if stem in ("train", *VALIDATION_SPLIT_NAMES) else "train"
        splits.setdefault(name, []).append(str(p))
    return builder, splits


def _all_suffix(data_files, suffix: str) -> bool:
    files = [f for group in (data_files or {}).values() for f in ([group] if isinstance(group, str) else group)]
    return bool(files) and all(f.lower().endswith(suffix) for f in files)


def require_columns(splits, path: str, **columns: str) -> None:
    """`columns`: option name (`text_column`) -> column name; every split must have each column."""
    for split in splits:
        for option, name in columns.items():
            if name not in split.column_names:
                raise TaskError(
                    f"dataset {path!r} has no column {name!r} (columns: {', '.join(split.column_names)}); "
                    f"pass --{option.replace('_', '-')}"
                )
