"""The tasks of the `hf-efficient` command. A task is an object that owns everything specific to it: the Auto head
it trains, its training defaults, the config a new model takes for it, where its data comes from, how a batch is
collated and which metrics it reports. `TASKS` declares them; the command has no other per-task branches.

Default data is embedded (no download):

- `clm`, `mlm`: the standard-library byte corpus of `hf_efficient.data` (ByT5 byte tokens, blocks of `block_size`).
- `seq-cls`: *which standard-library package does a 128-byte block of source come from?* Four classes (`asyncio`,
  `email`, `tkinter`, `unittest`); files are split into train / validation by a hash of their path (20% validation),
  so validation blocks come from files never seen in training. Chance is 25%.
- `image-cls`: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 real 8 x 8
  grey-scale images, 10 classes), 20% held out (stratified, fixed seed). Images are fed as RGB (grey replicated),
  as transformers' image pipelines load them.
- `seq2seq`: *write numbers and dates out in English words* (`hf_efficient.seq2seq_data`): `"40,517"` -> `"forty
  thousand five hundred seventeen"`, `"1987-03-09"` -> `"March ninth, nineteen eighty-seven"`; 20,000 training
  pairs, 300 validation pairs with no source in common. As in translation the source carries the information and
  the target needs local reordering; evaluation generates (greedy, `Seq2SeqTrainer(predict_with_generate=True)`,
  at most a few tokens past the longest validation target) and reports corpus BLEU, chrF and exact match besides
  the loss. (`Seq2SeqTask.embedded` names the function; any function returning `(train, validation)` datasets
  with `source` and `target` columns can replace it.)

Any local `datasets`-loadable path replaces the default: a file or folder of json / jsonl / csv / tsv / text /
parquet files (`train.*`, `validation.*` / `test.*` give the splits), a folder saved with `save_to_disk`, or an
`imagefolder` tree (`<split>/<label>/<image>` or `<label>/<image>`). Without a validation split, a seeded
`--validation-split-percentage` of the training rows is held out.
"""

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import data as byte_data
from . import seq2seq_data

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


class TaskError(ValueError):
    """A problem with the user's input (model, task, data): the CLI prints its message as one line."""


def first_line(error: BaseException) -> str:
    """The first line of the root cause of an error (library errors are long chains), at most 300 characters."""
    root = error
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    text = str(root).strip() or type(root).__name__
    return text.splitlines()[0][:300]


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


# ------------------------------------------------------------------------------------------------- local datasets
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


def _require_columns(splits, path: str, **columns: str) -> None:
    """`columns`: option name (`text_column`) -> column name; every split must have each column."""
    for split in splits:
        for option, name in columns.items():
            if name not in split.column_names:
                raise TaskError(
                    f"dataset {path!r} has no column {name!r} (columns: {', '.join(split.column_names)}); "
                    f"pass --{option.replace('_', '-')}"
                )


def _limit(dataset, max_samples: int | None):
    if dataset is not None and max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset


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
    index = {name: i for i, name in enumerate(names)}

    def encode(batch):
        return {"label": [index[str(v)] for v in batch["label"]]}

    def encoded(split):
        # (explicit features: `datasets` otherwise keeps the column's string type and the ids stay strings)
        features = split.features.copy()
        features["label"] = ClassLabel(names=names)
        return split.map(encode, batched=True, features=features)

    return encoded(train), encoded(validation), names


def image_processor_for(image_size: int, num_channels: int):
    """A pure-PIL image processor (no torchvision needed) that resizes to the model's size and scales to [-1, 1]."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5] * num_channels,
        image_std=[0.5] * num_channels,
        do_convert_rgb=num_channels == 3,
    )


def processed_size(processor, channels: int = 3) -> tuple[int, int] | None:
    """(height, width) of the `pixel_values` an image processor makes of an image (a blank 8 x 8 one in the model's
    mode: RGB, or L for one channel); None when it cannot process one."""
    from PIL import Image

    try:
        image = Image.new("L" if channels == 1 else "RGB", (8, 8))
        pixels = processor(image, return_tensors="pt")["pixel_values"]
    except Exception:
        return None
    return tuple(int(n) for n in pixels.shape[-2:])


def is_byte_tokenizer(tokenizer) -> bool:
    return type(tokenizer).__name__.startswith("ByT5Tokenizer")


# ------------------------------------------------------------------------------------------------------------ tasks
@dataclass
class TaskData:
    """What a task needs from its data, ready for `Trainer`."""

    train: object | None  # datasets.Dataset (None when only evaluating)
    validation: object
    description: str
    processing: object  # the tokenizer or image processor saved with the model
    collator: Callable | None = None
    compute_metrics: Callable | None = None
    preprocess_logits_for_metrics: Callable | None = None
    label_names: list[str] | None = None
    byte_level: bool = False  # byte tokens: the loss gives bits per byte
    config_updates: dict = field(default_factory=dict)  # what a new model's config takes from the data
    # Set when `compute_metrics` scores generated text (Seq2SeqTrainer with predict_with_generate): the
    # `generation_max_length` evaluation generates up to, derived from the data.
    generation_max_length: int | None = None


@dataclass(frozen=True)
class Task:
    """A task of the command. Subclasses load the data; everything else is declared.

    `training`: `TrainingArguments` defaults of `train` for this task (a flag given on the command line wins).
    `new_model`: config values of a model built from an architecture name for this task, applied to the fields the
    architecture's config has (e.g. a tiny vision model for the 8 x 8 digits), before `--config-overrides`.
    `new_config`: config values every new model (architecture or preset, not a checkpoint) takes for this task,
    where its config has the field (`causal` for language modelling)."""

    name: str
    auto_class: str  # transformers Auto class that builds the head
    head_suffixes: tuple  # class-name suffixes of saved heads (`config.architectures`) that do this task
    pipeline_tag: str
    title: str
    default_data: str | None = None  # what the embedded data is (`list`, model cards)
    training: dict = field(default_factory=dict)
    default_model: str = "gmlp-main-job"  # `--model` when none is given: the main job's preset
    new_model: dict = field(default_factory=dict)
    new_config: dict = field(default_factory=dict)
    default_prompt: str | None = None  # tasks that generate: `generate`'s prompt when none is given (and the sample)
    generation: dict | None = None  # tasks that generate: the decoding settings saved in generation_config.json
    modality = "text"
    remove_unused_columns = True  # Trainer drops the columns the model's forward does not take
    trainer = "Trainer"  # the transformers Trainer class that trains and evaluates the task

    def check_config(self, config: dict, name: str) -> None:
        """A config (as a dict) the task cannot use is a one-line error."""
        if config.get("vocab_size", 0) is None:
            raise TaskError(f"model {name!r} has no token embeddings (vocab_size is None): it cannot do {self.name!r}")

    def load_processing(self, folder: str | None, own: bool, config: dict | None = None):
        """The tokenizer saved in `folder` (`own`: a checkpoint, which always has one), else the byte tokenizer."""
        from transformers import AutoTokenizer

        tokenizer = None
        if folder is not None and (own or Path(folder, "tokenizer_config.json").exists()):
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
            except Exception:
                tokenizer = None
        return tokenizer if tokenizer is not None else byte_data.default_tokenizer()

    def load_data(
        self,
        args,
        processing,
        config: dict,
        train=True,
        seed=42,
        sized_by_data=False,
        config_class=None,
        new_model=False,
    ) -> TaskData:
        """The task's data for a model whose config is `config` (a dict); `args`: the `DataArguments`;
        `sized_by_data`: the model is new and may take sizes from the data (`TaskData.config_updates`), and
        `config_class` (its config class, when known) tells how the config counts them; `new_model`: the model is
        built, not loaded from a checkpoint."""
        tokenizer = processing
        if config.get("max_position_embeddings"):
            tokenizer.model_max_length = config["max_position_embeddings"]  # lets pipelines truncate to it
        vocab = config.get("vocab_size")
        if vocab is not None and len(tokenizer) > vocab:
            raise TaskError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab}")
        block_size = context_length(config, args.block_size)
        if args.dataset is None and not is_byte_tokenizer(tokenizer):
            raise TaskError(f"the embedded {self.name} data is byte-level: use a model with a byte (ByT5) tokenizer")
        return self.load_text(args, tokenizer, block_size, train, seed)

    def load_text(self, args, tokenizer, block_size: int, train: bool, seed: int) -> TaskData:
        raise NotImplementedError(f"task {self.name!r} does not load text data")

    def local_splits(self, args, seed: int, **columns: str):
        """`(train, validation)` of `--dataset`, which must have the `columns` (option name -> column name)."""
        image = self.modality == "image"
        splits = read_local_dataset(args.dataset, args.dataset_format, args.validation_split_percentage, seed, image)
        _require_columns(splits, args.dataset, **columns)
        return splits

    def metrics_from_loss(self, metrics: dict, data: TaskData) -> dict:
        """Metrics computed from the mean evaluation loss (none for classification)."""
        return {}


def context_length(config: dict, requested: int | None, default: int = 256) -> int:
    """Tokens per example: `--block-size`, at most the model's context (`max_position_embeddings`)."""
    limit = config.get("max_position_embeddings")
    if requested is not None:
        if requested <= 0:
            raise TaskError(f"--block-size must be positive, got {requested}")
        if limit is not None and requested > limit:
            raise TaskError(f"--block-size {requested} exceeds the model's context (max_position_embeddings={limit})")
        return requested
    return min(default, limit) if limit else default


@dataclass(frozen=True)
class LanguageModelling(Task):
    """`clm` / `mlm`: blocks of `block_size` tokens: the embedded byte corpus, or a local dataset's text column
    tokenised, concatenated (with the tokenizer's eos between documents) and cut into blocks."""

    masked: bool = False

    def load_processing(self, folder, own, config=None):
        tokenizer = super().load_processing(folder, own)
        if self.masked and tokenizer.mask_token is None and "<extra_id_0>" in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"mask_token": "<extra_id_0>"})
        return tokenizer

    def load_text(self, args, tokenizer, block_size, train, seed):
        if args.dataset is None:

            def corpus(split, max_bytes):
                ids = byte_data.bytes_to_ids(byte_data.stdlib_bytes(split, max_bytes))
                return byte_data.blocks_dataset(ids, block_size)

            train_set = corpus("train", args.max_train_bytes) if train else None
            validation = corpus("validation", args.max_eval_bytes)
            description = f"{byte_data.__name__}: Python {_python_version()} standard-library source bytes"
        else:
            train_set, validation = self.local_splits(args, seed, text_column=args.text_column)
            train_set = _token_blocks(train_set, args, tokenizer, block_size) if train else None
            validation = _token_blocks(validation, args, tokenizer, block_size)
            description = f"local dataset {args.dataset} (column {args.text_column!r})"
        data = TaskData(
            _limit(train_set, getattr(args, "max_train_samples", None)),
            _limit(validation, args.max_eval_samples),
            description,
            tokenizer,
            byte_level=is_byte_tokenizer(tokenizer),
        )
        if not self.masked:
            return data

        from transformers import DataCollatorForLanguageModeling

        if tokenizer.mask_token_id is None:
            raise TaskError("masked language modelling needs a tokenizer with a mask token")
        data.train = data.train.remove_columns("labels") if data.train is not None else None
        data.validation = data.validation.remove_columns("labels")
        data.collator = DataCollatorForLanguageModeling(tokenizer, mlm=True, mlm_probability=args.mlm_probability)
        data.compute_metrics = masked_token_metrics
        data.preprocess_logits_for_metrics = argmax_logits
        return data

    def metrics_from_loss(self, metrics, data):
        # Bits per byte only for clm: every byte is predicted there (mlm predicts the masked 15%).
        return loss_metrics(metrics, "eval", data.byte_level and not self.masked)


def _token_blocks(split, args, tokenizer, block_size: int):
    from datasets import Dataset

    ids = tokenizer(list(split[args.text_column]), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = np.fromiter((t for doc in ids for t in (*doc, *eos)), dtype=np.int64)
    count = len(flat) // block_size
    if count == 0:
        raise TaskError(
            f"dataset {args.dataset!r} has {len(flat)} tokens in a split: fewer than one block of {block_size} "
            "(pass a smaller --block-size)"
        )
    array = flat[: count * block_size].reshape(count, block_size)
    return Dataset.from_dict({"input_ids": array, "labels": array.copy()})


def _python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class SequenceClassification(Task):
    def load_text(self, args, tokenizer, block_size, train, seed):
        from transformers import DataCollatorWithPadding

        if args.dataset is None:
            splits = byte_data.stdlib_classification_dataset(min(block_size, 128))
            train_set, validation = splits["train"], splits["validation"]
            label_names = train_set.features["label"].names
            description = (
                "standard-library package of a 128-byte source block (embedded; asyncio/email/tkinter/unittest)"
            )
        else:
            columns = dict(text_column=args.text_column, label_column=args.label_column)
            train_set, validation = self.local_splits(args, seed, **columns)
            train_set, validation, label_names = _encode_labels(train_set, validation, args.label_column)

            def tokenize(split):
                return split.map(
                    lambda batch: tokenizer(batch[args.text_column], truncation=True, max_length=block_size),
                    batched=True,
                    remove_columns=[c for c in split.column_names if c != "label"],
                )

            train_set, validation = tokenize(train_set), tokenize(validation)
            description = f"local dataset {args.dataset} (text {args.text_column!r}, label {args.label_column!r})"
        return TaskData(
            _limit(train_set, getattr(args, "max_train_samples", None)) if train else None,
            _limit(validation, args.max_eval_samples),
            description,
            tokenizer,
            collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=classification_metrics,
            label_names=label_names,
        )


@dataclass(frozen=True)
class Seq2SeqTask(Task):
    """`seq2seq`: (source, target) text pairs. `embedded()` returns the default `(train, validation)` datasets with
    `source` and `target` columns, and the first line of its docstring describes them: switching the default data
    is changing `embedded=` in the `TASKS` declaration.

    Trained and evaluated with `Seq2SeqTrainer`: with `predict_with_generate` (the task's default) evaluation
    generates greedily and reports corpus BLEU, chrF and exact match (`seq2seq_data.seq2seq_metrics`) as well as
    the loss; the generation length is the longest validation target plus a margin (`generation_length`)."""

    embedded: Callable = seq2seq_data.numbers_to_words_splits
    trainer = "Seq2SeqTrainer"

    def __post_init__(self):
        if self.default_data is None:
            object.__setattr__(self, "default_data", self.embedded.__doc__.strip().splitlines()[0])

    def load_text(self, args, tokenizer, block_size, train, seed):
        from transformers import DataCollatorForSeq2Seq

        if args.dataset is None:
            train_set, validation = self.embedded()
            source, target = "source", "target"
            description = self.default_data
        else:
            source, target = args.source_column, args.target_column
            train_set, validation = self.local_splits(args, seed, source_column=source, target_column=target)
            description = f"local dataset {args.dataset}"

        def tokenize(split):
            def encode(batch):
                encoded = tokenizer(batch[source], truncation=True, max_length=block_size)
                labels = tokenizer(text_target=batch[target], truncation=True, max_length=block_size)
                encoded["labels"] = labels["input_ids"]
                return encoded

            return split.map(encode, batched=True, remove_columns=split.column_names)

        train_set = tokenize(_limit(train_set, getattr(args, "max_train_samples", None))) if train else None
        validation = tokenize(_limit(validation, args.max_eval_samples))
        return TaskData(
            train_set,
            validation,
            description,
            tokenizer,
            collator=DataCollatorForSeq2Seq(tokenizer),
            compute_metrics=seq2seq_data.seq2seq_metrics(tokenizer),
            byte_level=is_byte_tokenizer(tokenizer),
            generation_max_length=generation_length(validation["labels"], block_size),
        )

    def metrics_from_loss(self, metrics, data):
        return loss_metrics(metrics, "eval", data.byte_level)


def generation_length(labels, block_size: int) -> int:
    """`max_length` of evaluation's `generate()` for an encoder-decoder (decoder tokens, the start token included):
    the longest target (its tokens with eos, plus the start token) and a margin of a quarter (at least 8 tokens) for
    a model that has not learned to stop yet, at most `block_size` + 1 (a target is cut to `block_size`)."""
    longest = max((len(ids) for ids in labels), default=1) + 1
    return min(longest + max(8, longest // 4), block_size + 1)


@dataclass(frozen=True)
class ImageClassification(Task):
    """Images converted to RGB (as transformers' image pipelines do), so a new model has 3 input channels even for
    grey-scale data such as the digits, and `pipeline("image-classification")` works on it. A model built from an
    architecture name takes its image size from the data, and a patch size giving at most `max_tokens` tokens."""

    max_tokens: int = 256
    modality = "image"
    remove_unused_columns = False  # the transform yields pixel_values from the image column

    def check_config(self, config, name):
        if config.get("image_size") is None:
            raise TaskError(f"model {name!r} is not a vision model (no image_size): it cannot do {self.name!r}")

    def load_processing(self, folder, own, config=None):
        """The image processor saved in `folder`, else one for the image size of `config` (None without one: a new
        model sized from the data gets one in `load_data`). A preset's processor (`own` False) serves only a config
        of the preset's image size: one changed by `--config-overrides` gets a processor for its own size."""
        from transformers import AutoImageProcessor

        byte_data.require("PIL", byte_data.IMAGE_REQUIREMENTS["PIL"], "the image-cls task")
        size = (config or {}).get("image_size")
        channels = (config or {}).get("num_channels") or 3
        if folder is not None and (Path(folder) / "preprocessor_config.json").is_file():
            try:
                processor = AutoImageProcessor.from_pretrained(folder)
            except Exception as error:
                raise TaskError(f"cannot load the image processor of {folder!r}: {first_line(error)}") from error
            if own or not size or processed_size(processor, channels) == (size, size):
                return processor
        if size:
            return image_processor_for(size, channels)
        return None

    def load_data(
        self, args, processing, config, train=True, seed=42, sized_by_data=False, config_class=None, new_model=False
    ):
        """`sized_by_data`: a new model whose image size, channels and patch size come from the data. Images of
        another size than the model's are an error for a new model (`new_model`: a preset's size must match the
        data), and resized by a checkpoint's own image processor where it brings them to the model's size."""
        from transformers import DefaultDataCollator

        if args.dataset is None:
            train_set, validation = byte_data.digits_dataset(seed=0)
            description = "scikit-learn handwritten digits (8x8 grey-scale, 10 classes; embedded)"
            source = "the digits"
        else:
            columns = dict(image_column=args.image_column, label_column=args.label_column)
            train_set, validation = self.local_splits(args, seed, **columns)
            if args.image_column != "image":
                train_set, validation = (d.rename_column(args.image_column, "image") for d in (train_set, validation))
            train_set, validation, _ = _encode_labels(train_set, validation, args.label_column)
            description = f"local image dataset {args.dataset}"
            source = f"dataset {args.dataset!r}"
        train_set = _limit(train_set, getattr(args, "max_train_samples", None))
        validation = _limit(validation, args.max_eval_samples)
        label_feature = train_set.features["label"]
        label_names = list(label_feature.names) if hasattr(label_feature, "names") else None
        if label_names is None:
            label_names = [str(i) for i in range(int(max(train_set["label"])) + 1)]

        size = _image_size(train_set, source)
        for split in (train_set, validation):
            _check_images(split, size, source)
        if sized_by_data:
            channels = 3
            updates = self.sized_config(config, size, channels, config_class)
        else:
            channels, updates = config.get("num_channels", 3), {}
            expected = config["image_size"]
            if size != expected:
                resized = None if new_model or processing is None else processed_size(processing, channels)
                if resized != (expected, expected):
                    raise TaskError(
                        f"{source} has {size}x{size} images, but the model expects {expected}x{expected} (its "
                        "config's image_size)"
                        + (f" and its image processor makes them {resized[1]}x{resized[0]}" if resized else "")
                    )
                print(
                    f"hf-efficient: {source} has {size}x{size} images: the model's image processor resizes them to "
                    f"{expected}x{expected} (its config's image_size)",
                    file=sys.stderr,
                )
        processor = processing or image_processor_for(size, channels)

        def transform(batch):
            out = processor([_as_mode(image, channels) for image in batch["image"]], return_tensors="pt")
            out["labels"] = batch["label"]
            return out

        train_set.set_transform(transform)
        validation.set_transform(transform)
        return TaskData(
            train_set if train else None,
            validation,
            description,
            processor,
            collator=DefaultDataCollator(),
            compute_metrics=classification_metrics,
            label_names=label_names,
            config_updates=updates,
        )

    def sized_config(self, config: dict, size: int, channels: int, config_class=None) -> dict:
        """Image size and channels from the data; where the config has them, the smallest patch size that gives
        at most `max_tokens` patches (unless set) and `max_position_embeddings` = the number of tokens: the
        patches plus the tokens the config adds to them (`extra_tokens`, e.g. a class token)."""
        updates = {"image_size": size, "num_channels": channels}
        tokens = size * size
        if "patch_size" in config:
            patch = config.get("patch_size") or next(
                (p for p in range(2, size + 1) if size % p == 0 and (size // p) ** 2 <= self.max_tokens), size
            )
            updates["patch_size"] = patch
            tokens = (size // patch) ** 2
        if "max_position_embeddings" in config:
            updates["max_position_embeddings"] = tokens + extra_tokens(config_class, {**config, **updates})
        return updates


def extra_tokens(config_class, values: dict) -> int:
    """Tokens a vision config adds to its patches, read from the config class without building (validating) it:
    a `num_extra_tokens` attribute, else 1 where a `uses_class_token` property is true (AFT's DeiT-style class
    token), else 0. Any architecture declaring either gets a model that fits its data, with no branch here."""
    if config_class is None:
        return 0
    probe = config_class.__new__(config_class)  # the values as attributes, so the class's properties can read them
    probe.__dict__.update(values)
    try:
        count = getattr(probe, "num_extra_tokens", None)
        if count is None:
            count = 1 if getattr(probe, "uses_class_token", False) is True else 0
        return int(count)
    except (AttributeError, TypeError, ValueError):
        return 0


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


# The tasks. Training defaults: optimizer steps, per-device batch size, peak learning rate.
TASKS = {
    task.name: task
    for task in (
        LanguageModelling(
            "clm",
            "AutoModelForCausalLM",
            ("ForCausalLM", "LMHeadModel"),
            "text-generation",
            "causal language modelling",
            "Python standard-library source bytes (embedded)",
            training=dict(max_steps=600, per_device_train_batch_size=32, learning_rate=3e-3),
            new_config={"causal": True},  # the causal head is causal anyway; the saved base model should match it
            default_prompt="def ",
            generation=dict(do_sample=True, temperature=0.8, top_k=0, top_p=0.95),
        ),
        LanguageModelling(
            "mlm",
            "AutoModelForMaskedLM",
            ("ForMaskedLM",),
            "fill-mask",
            "masked language modelling",
            "Python standard-library source bytes (embedded)",
            training=dict(max_steps=600, per_device_train_batch_size=32, learning_rate=3e-3),
            new_config={"causal": False},  # a masked token is predicted from both sides
            masked=True,
        ),
        SequenceClassification(
            "seq-cls",
            "AutoModelForSequenceClassification",
            ("ForSequenceClassification",),
            "text-classification",
            "sequence classification",
            "which standard-library package (asyncio, email, tkinter, unittest) a 128-byte block comes from (embedded)",
            training=dict(max_steps=300, per_device_train_batch_size=32, learning_rate=1e-3),
        ),
        ImageClassification(
            "image-cls",
            "AutoModelForImageClassification",
            ("ForImageClassification",),
            "image-classification",
            "image classification",
            "scikit-learn handwritten digits, 8x8 grey-scale (embedded)",
            training=dict(max_steps=300, per_device_train_batch_size=32, learning_rate=2e-3),
            default_model="gmlp",  # a new vision gMLP, sized from the images (below)
            # A tiny vision model for the 8 x 8 digits (no token embeddings); sizes the config does not have are
            # skipped, so one declaration serves every architecture.
            new_model=dict(
                patch_size=None,  # chosen from the image size (`ImageClassification.sized_config`)
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=4,
                token_mixing_dim=32,
                channel_mixing_dim=256,
                vocab_size=None,
            ),
        ),
        Seq2SeqTask(
            "seq2seq",
            "AutoModelForSeq2SeqLM",
            ("ForConditionalGeneration", "ForSeq2SeqLM"),
            "text2text-generation",
            "sequence-to-sequence generation",
            training=dict(
                max_steps=1000,
                per_device_train_batch_size=32,
                learning_rate=1e-3,
                predict_with_generate=True,  # evaluation generates: BLEU / chrF / exact match besides the loss
            ),
            # A small N-gram encoder-decoder (N = 4; 2 + 2 layers, d 128) that trains on a CPU.
            default_model="ngram-transformer-tiny-n4",
            new_config={"is_encoder_decoder": True},  # an architecture with both forms builds the encoder-decoder
            default_prompt="1987-03-09",
            generation=dict(do_sample=False, num_beams=1),  # greedy, as evaluation decodes
            embedded=seq2seq_data.numbers_to_words_splits,  # the default data: a function returning (train, validation)
        ),
    )
}


def task_of_architecture(class_name: str) -> str | None:
    """The task a saved head trains (`config.architectures[0]`), e.g. 'GMLPForCausalLM' -> 'clm'."""
    return next((t.name for t in TASKS.values() if class_name.endswith(t.head_suffixes)), None)


def task_of_auto(auto_name: str) -> str | None:
    """The task of an Auto class (a key of an architecture's `AUTO_MAPPING`), e.g. 'AutoModelForMaskedLM' -> 'mlm'."""
    return next((t.name for t in TASKS.values() if t.auto_class == auto_name), None)
