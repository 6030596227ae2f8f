"""The tasks of the `hf-efficient` command: which Auto head a task trains, where its data comes from, how a batch
is collated and which metrics it reports.

Default data is embedded (no download):

- `clm`, `mlm`: the standard-library byte corpus of `hf_efficient.data` (ByT5 byte tokens, blocks of `block_size`).
- `seq-cls`: *which standard-library package does a 128-byte block of source come from?* Four classes (`asyncio`,
  `email`, `tkinter`, `unittest`); files are split into train / validation by a hash of their path (20% validation),
  so validation blocks come from files never seen in training. Chance is 25%.
- `image-cls`: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 real 8 x 8
  grey-scale images, 10 classes), 20% held out (stratified, fixed seed). Images are fed as RGB (grey replicated),
  as transformers' image pipelines load them.
- `seq2seq`: *continue a line of Python*: source = a line of standard-library source (at most 96 bytes), target =
  the next non-empty line. (For encoder-decoder checkpoints; no hf-efficient architecture has that head yet.)

Any local `datasets`-loadable path replaces the default: a file or folder of json / jsonl / csv / tsv / text /
parquet files (`train.*`, `validation.*` / `test.*` give the splits), a folder saved with `save_to_disk`, or an
`imagefolder` tree (`<split>/<label>/<image>` or `<label>/<image>`). Without a validation split, a seeded
`--validation-split-percentage` of the training rows is held out.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data as byte_data

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
SEQ_CLS_MODULES = ("asyncio", "email", "tkinter", "unittest")


class TaskError(ValueError):
    """A problem with the user's input (model, task, data): the CLI prints its message as one line."""


@dataclass(frozen=True)
class Task:
    name: str
    auto_class: str  # transformers Auto class that builds the head
    head_suffix: str  # suffix of the head class name, e.g. "ForCausalLM"
    pipeline_tag: str
    modality: str  # "text" or "image"
    title: str
    default_data: str
    # Training defaults of the `train` command for this task (any of them can be overridden on the command line).
    defaults: dict = field(default_factory=dict)


TASKS = {
    task.name: task
    for task in (
        Task(
            "clm",
            "AutoModelForCausalLM",
            "ForCausalLM",
            "text-generation",
            "text",
            "causal language modelling",
            "Python standard-library source bytes (embedded)",
            dict(max_steps=600, per_device_train_batch_size=32, learning_rate=3e-3),
        ),
        Task(
            "mlm",
            "AutoModelForMaskedLM",
            "ForMaskedLM",
            "fill-mask",
            "text",
            "masked language modelling",
            "Python standard-library source bytes (embedded)",
            dict(max_steps=600, per_device_train_batch_size=32, learning_rate=3e-3),
        ),
        Task(
            "seq-cls",
            "AutoModelForSequenceClassification",
            "ForSequenceClassification",
            "text-classification",
            "text",
            "sequence classification",
            "which standard-library package (asyncio, email, tkinter, unittest) a 128-byte block comes from (embedded)",
            dict(max_steps=300, per_device_train_batch_size=32, learning_rate=1e-3),
        ),
        Task(
            "image-cls",
            "AutoModelForImageClassification",
            "ForImageClassification",
            "image-classification",
            "image",
            "image classification",
            "scikit-learn handwritten digits, 8x8 grey-scale (embedded)",
            dict(max_steps=300, per_device_train_batch_size=32, learning_rate=2e-3),
        ),
        Task(
            "seq2seq",
            "AutoModelForSeq2SeqLM",
            "ForConditionalGeneration",
            "text2text-generation",
            "text",
            "sequence-to-sequence generation",
            "continue a line of Python standard-library source (embedded)",
            dict(max_steps=300, per_device_train_batch_size=16, learning_rate=1e-3),
        ),
    )
}

HEAD_SUFFIXES = {
    "ForCausalLM": "clm",
    "LMHeadModel": "clm",
    "ForMaskedLM": "mlm",
    "ForSequenceClassification": "seq-cls",
    "ForImageClassification": "image-cls",
    "ForConditionalGeneration": "seq2seq",
    "ForSeq2SeqLM": "seq2seq",
}


def task_of_architecture(class_name: str) -> str | None:
    """The task a saved head trains (`config.architectures[0]`), e.g. 'GMLPForCausalLM' -> 'clm'."""
    for suffix, task in HEAD_SUFFIXES.items():
        if class_name.endswith(suffix):
            return task
    return None


# --------------------------------------------------------------------------------------------------------- metrics
def accuracy_metric():
    """`evaluate`'s accuracy metric. `evaluate.load("accuracy")` reads its module from the Hub (or the local cache);
    without either, the same definition (fraction of predictions equal to the references) runs as an
    `evaluate.Metric` defined here."""
    import datasets
    import evaluate

    try:
        return evaluate.load("accuracy")
    except Exception:  # no network and no cached module: fall back to the same metric, defined locally
        pass

    class Accuracy(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="Accuracy: the fraction of predictions equal to the references.",
                citation="",
                inputs_description="predictions, references: lists of integer labels",
                features=datasets.Features(
                    {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
                ),
            )

        def _compute(self, predictions, references):
            predictions, references = np.asarray(predictions), np.asarray(references)
            return {"accuracy": float((predictions == references).mean()) if len(references) else 0.0}

    return Accuracy(experiment_id="hf-efficient")


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics`: keep only the predicted ids (not the full vocabulary of logits)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_metrics(eval_pred) -> dict:
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
    if predictions.ndim > np.asarray(labels).ndim:
        predictions = predictions.argmax(axis=-1)
    return accuracy_metric().compute(predictions=predictions.reshape(-1), references=np.asarray(labels).reshape(-1))


def masked_token_metrics(eval_pred) -> dict:
    """Accuracy on the masked (labelled) positions only."""
    predictions, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    keep = labels != -100
    return accuracy_metric().compute(predictions=predictions[keep], references=labels[keep])


def loss_metrics(metrics: dict, prefix: str = "eval", byte_level: bool = True) -> dict:
    """Perplexity and, for byte tokens, bits per byte (= loss in nats / ln 2) from a mean loss."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is None:
        return {}
    extra = {f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
    if byte_level:
        extra[f"{prefix}_bits_per_byte"] = byte_data.bits_per_byte(loss)
    return extra


# ------------------------------------------------------------------------------------------------------------- data
@dataclass
class TaskData:
    """What a task needs from its data, ready for `Trainer`."""

    train: object | None  # datasets.Dataset
    validation: object
    description: str
    collator: Callable | None = None
    compute_metrics: Callable | None = None
    preprocess_logits_for_metrics: Callable | None = None
    label_names: list[str] | None = None
    byte_level: bool = False
    # Values a new model's config takes from the data (image size, channels).
    config_updates: dict = field(default_factory=dict)


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
        raise TaskError(f"could not read dataset {path!r}: {_first_line(error)}") from error
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


def _first_line(error: BaseException) -> str:
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(root).strip() or type(root).__name__
    return text.splitlines()[0][:300]


def _column(dataset, name: str, option: str, path: str):
    if name not in dataset.column_names:
        raise TaskError(
            f"dataset {path!r} has no column {name!r} (columns: {', '.join(dataset.column_names)}); pass {option}"
        )


def _limit(dataset, max_samples: int | None):
    if max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset


# -- text: causal and masked language modelling
def is_byte_tokenizer(tokenizer) -> bool:
    return type(tokenizer).__name__.startswith("ByT5Tokenizer")


def language_modelling_data(task: str, options, tokenizer, block_size: int, need_train: bool = True) -> TaskData:
    """Blocks of `block_size` tokens: the embedded byte corpus, or a local dataset's text column tokenised,
    concatenated (with the tokenizer's eos between documents) and cut into blocks."""
    from datasets import Dataset

    if options.dataset is None:
        if not is_byte_tokenizer(tokenizer):
            raise TaskError("the embedded text corpus is byte-level: use a model with a byte (ByT5) tokenizer")

        def corpus(split, max_bytes):
            return byte_data.blocks_dataset(
                byte_data.bytes_to_ids(byte_data.stdlib_bytes(split, max_bytes)), block_size
            )

        train = corpus("train", options.max_train_bytes) if need_train else None
        validation = corpus("validation", options.max_eval_bytes)
        description = f"{byte_data.__name__}: Python {_python_version()} standard-library source bytes"
        byte_level = True
    else:
        train, validation = read_local_dataset(
            options.dataset, options.dataset_format, options.validation_split_percentage, options.seed
        )
        _column(train, options.text_column, "--text-column", options.dataset)

        def blocks(split):
            ids = tokenizer(list(split[options.text_column]), add_special_tokens=False)["input_ids"]
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            flat = np.fromiter((t for doc in ids for t in (*doc, *eos)), dtype=np.int64)
            count = len(flat) // block_size
            if count == 0:
                raise TaskError(
                    f"dataset {options.dataset!r} has {len(flat)} tokens in a split: fewer than one block of "
                    f"{block_size} (pass a smaller --block-size)"
                )
            array = flat[: count * block_size].reshape(count, block_size)
            return Dataset.from_dict({"input_ids": array, "labels": array.copy()})

        train, validation = blocks(train), blocks(validation)
        description = f"local dataset {options.dataset} (column {options.text_column!r})"
        byte_level = is_byte_tokenizer(tokenizer)
    train = _limit(train, options.max_train_samples) if train is not None else None
    validation = _limit(validation, options.max_eval_samples)
    if task == "clm":
        return TaskData(train, validation, description, byte_level=byte_level)

    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token_id is None:
        raise TaskError("masked language modelling needs a tokenizer with a mask token")
    train = train.remove_columns("labels") if train is not None else None
    validation = validation.remove_columns("labels")
    return TaskData(
        train,
        validation,
        description,
        collator=DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=options.mlm_probability),
        compute_metrics=masked_token_metrics,
        preprocess_logits_for_metrics=argmax_logits,
        byte_level=byte_level,
    )


def _python_version() -> str:
    import sys

    return f"{sys.version_info.major}.{sys.version_info.minor}"


# -- text: sequence classification
def stdlib_classification_dataset(block_size: int = 128, max_blocks_per_class: int = 2000, validation_percent=20.0):
    """The embedded `seq-cls` task: blocks of source bytes labelled with their standard-library package."""
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    root = byte_data.stdlib_root()
    rows = {"train": ([], []), "validation": ([], [])}
    for label, package in enumerate(SEQ_CLS_MODULES):
        per_split = {"train": [], "validation": []}
        for path in byte_data.stdlib_source_files(root / package):
            relative = path.relative_to(root).as_posix()
            per_split[byte_data.split_of(relative, validation_percent)].append(path.read_bytes())
        for split, chunks in per_split.items():
            ids = byte_data.bytes_to_ids(b"\n".join(chunks))
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


def sequence_classification_data(options, tokenizer, block_size: int) -> TaskData:
    from transformers import DataCollatorWithPadding

    if options.dataset is None:
        if not is_byte_tokenizer(tokenizer):
            raise TaskError("the embedded classification task is byte-level: use a model with a byte tokenizer")
        splits = stdlib_classification_dataset(min(block_size, 128))
        train, validation = splits["train"], splits["validation"]
        label_names = train.features["label"].names
        description = "standard-library package of a 128-byte source block (embedded; asyncio/email/tkinter/unittest)"
    else:
        train, validation = read_local_dataset(
            options.dataset, options.dataset_format, options.validation_split_percentage, options.seed
        )
        for split in (train, validation):
            _column(split, options.text_column, "--text-column", options.dataset)
            _column(split, options.label_column, "--label-column", options.dataset)
        train, validation, label_names = _encode_labels(train, validation, options.label_column)

        def tokenize(batch):
            return tokenizer(batch[options.text_column], truncation=True, max_length=block_size)

        keep = {"label"}
        train = train.map(tokenize, batched=True, remove_columns=[c for c in train.column_names if c not in keep])
        validation = validation.map(
            tokenize, batched=True, remove_columns=[c for c in validation.column_names if c not in keep]
        )
        description = f"local dataset {options.dataset} (text {options.text_column!r}, label {options.label_column!r})"
    return TaskData(
        _limit(train, options.max_train_samples),
        _limit(validation, options.max_eval_samples),
        description,
        collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics,
        label_names=label_names,
    )


def _encode_labels(train, validation, column: str):
    """Rename the label column to `label` and make it integer class ids; returns the class names."""
    from datasets import ClassLabel

    if column != "label":
        train, validation = (
            d.remove_columns([c for c in ("label",) if c in d.column_names]).rename_column(column, "label")
            for d in (train, validation)
        )
    feature = train.features["label"]
    if isinstance(feature, ClassLabel):
        return train, validation, list(feature.names)
    names = sorted({str(v) for v in train["label"]} | {str(v) for v in validation["label"]})
    if len(names) < 2:
        raise TaskError(f"label column {column!r} has {len(names)} distinct value: a classifier needs at least 2")
    index = {name: i for name, i in zip(names, range(len(names)))}

    def encode(batch):
        return {"label": [index[str(v)] for v in batch["label"]]}

    return train.map(encode, batched=True), validation.map(encode, batched=True), names


# -- images
def digits_dataset(validation_percent: float = 20.0, seed: int = 0):
    """scikit-learn's handwritten digits as 8 x 8 grey-scale PIL images (pixel 0..16 -> 0..255)."""
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


def image_processor_for(image_size: int, num_channels: int):
    """A pure-PIL image processor (no torchvision needed) that resizes to the model's size and scales to [-1, 1]."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
        do_convert_rgb=num_channels == 3,
    )


def image_classification_data(options, model_image: tuple[int, int] | None, processor=None) -> TaskData:
    """`model_image` = the model's `(image_size, num_channels)`, or `None` for a new model sized from the data.

    Images are converted to RGB (as transformers' image pipelines do), so a new model has 3 input channels even
    for grey-scale data such as the digits, and `pipeline("image-classification")` works on it."""
    from transformers import DefaultDataCollator

    if options.dataset is None:
        train, validation = digits_dataset(seed=0)
        description = "scikit-learn handwritten digits (8x8 grey-scale, 10 classes; embedded)"
        source = "the digits"
    else:
        train, validation = read_local_dataset(
            options.dataset, options.dataset_format, options.validation_split_percentage, options.seed, image=True
        )
        for split in (train, validation):
            _column(split, options.image_column, "--image-column", options.dataset)
            _column(split, options.label_column, "--label-column", options.dataset)
        if options.image_column != "image":
            train, validation = (d.rename_column(options.image_column, "image") for d in (train, validation))
        train, validation, _ = _encode_labels(train, validation, options.label_column)
        description = f"local image dataset {options.dataset}"
        source = f"dataset {options.dataset!r}"
    train = _limit(train, options.max_train_samples)
    validation = _limit(validation, options.max_eval_samples)
    label_names = list(train.features["label"].names) if hasattr(train.features["label"], "names") else None
    if label_names is None:
        label_names = [str(i) for i in range(int(max(train["label"])) + 1)]

    size = _image_size(train, source)
    for split in (train, validation):
        _check_images(split, size, source)
    updates, channels = {}, 3
    if model_image is None:
        updates = {"image_size": size, "num_channels": channels}
    else:
        channels = model_image[1]
        if size != model_image[0]:
            raise TaskError(
                f"{source} has {size}x{size} images, but the model expects {model_image[0]}x{model_image[0]} "
                "(its config's image_size)"
            )
    processor = processor or image_processor_for(size, channels)

    def transform(batch):
        out = processor([_as_mode(image, channels) for image in batch["image"]], return_tensors="pt")
        out["labels"] = batch["label"]
        return out

    train.set_transform(transform)
    validation.set_transform(transform)
    return TaskData(
        train,
        validation,
        description,
        collator=DefaultDataCollator(),
        compute_metrics=classification_metrics,
        label_names=label_names,
        config_updates=updates,
    )


def _as_mode(image, channels: int):
    if channels == 1 and image.mode != "L":
        return image.convert("L")
    if channels == 3 and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _image_size(dataset, source: str) -> int:
    width, height = dataset[0]["image"].size
    if width != height:
        raise TaskError(f"{source} has {width}x{height} images: square images are needed (image_size)")
    return width


def _check_images(dataset, size: int, source: str, limit: int = 2000) -> None:
    """Every image (the first `limit` of each split) must have the same size."""
    column = dataset.select(range(min(len(dataset), limit)))["image"]
    for index, image in enumerate(column):
        if image.size != (size, size):
            raise TaskError(
                f"{source}: image {index} is {image.size[0]}x{image.size[1]}, but the others are {size}x{size}"
            )


# -- sequence to sequence
def stdlib_next_line_dataset(max_pairs: int = 20_000, max_length: int = 96):
    """The embedded `seq2seq` task: (a line of standard-library source, the next non-empty line)."""
    from datasets import Dataset

    out = {}
    for split in ("train", "validation"):
        text = byte_data.stdlib_bytes(split, max_bytes=4_000_000 if split == "train" else 400_000)
        lines = [line.strip() for line in text.decode("utf-8", errors="ignore").splitlines() if line.strip()]
        pairs = [(a[:max_length], b[:max_length]) for a, b in zip(lines, lines[1:])]
        pairs = pairs[: max_pairs if split == "train" else max_pairs // 10]
        out[split] = Dataset.from_dict({"source": [a for a, _ in pairs], "target": [b for _, b in pairs]})
    return out["train"], out["validation"]


def seq2seq_data(options, tokenizer, max_length: int) -> TaskData:
    from transformers import DataCollatorForSeq2Seq

    if options.dataset is None:
        train, validation = stdlib_next_line_dataset()
        description = "next line of Python standard-library source (embedded)"
    else:
        train, validation = read_local_dataset(
            options.dataset, options.dataset_format, options.validation_split_percentage, options.seed
        )
        for split in (train, validation):
            _column(split, options.source_column, "--source-column", options.dataset)
            _column(split, options.target_column, "--target-column", options.dataset)
        description = f"local dataset {options.dataset}"

    def tokenize(batch):
        source = options.source_column if options.dataset else "source"
        target = options.target_column if options.dataset else "target"
        encoded = tokenizer(batch[source], truncation=True, max_length=max_length)
        encoded["labels"] = tokenizer(text_target=batch[target], truncation=True, max_length=max_length)["input_ids"]
        return encoded

    train = _limit(train, options.max_train_samples)
    validation = _limit(validation, options.max_eval_samples)
    train = train.map(tokenize, batched=True, remove_columns=train.column_names)
    validation = validation.map(tokenize, batched=True, remove_columns=validation.column_names)
    return TaskData(
        train,
        validation,
        description,
        collator=DataCollatorForSeq2Seq(tokenizer),
        byte_level=is_byte_tokenizer(tokenizer),
    )
