"""What every task of the command is: `Task` (declared fields, the data loading steps shared by the text tasks) and
`TaskData` (what a task's data gives `Trainer`), with the helpers the task modules share."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ... import data as byte_data
from ...errors import TaskError


def loss_metrics(metrics: dict, prefix: str = "eval", byte_level: bool = True) -> dict:
    """Perplexity and, for byte tokens, bits per byte (= loss in nats / ln 2) from a mean loss."""
    loss = metrics.get(f"{prefix}_loss")
    if loss is None:
        return {}
    extra = {f"{prefix}_perplexity": math.exp(min(loss, 50.0))}
    if byte_level:
        extra[f"{prefix}_bits_per_byte"] = byte_data.bits_per_byte(loss)
    return extra


def limit_rows(dataset, max_samples: int | None):
    """The first `max_samples` rows of `dataset` (all of them when None)."""
    if dataset is not None and max_samples is not None and max_samples < len(dataset):
        return dataset.select(range(max_samples))
    return dataset


def encode_labels(train, validation, column: str):
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


def is_byte_tokenizer(tokenizer) -> bool:
    return type(tokenizer).__name__.startswith("ByT5Tokenizer")


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
    default_model: str = "gmlp-main-job"  # `--model` when none is given (clm: the main job's preset)
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
        splits = byte_data.read_local_dataset(
            args.dataset, args.dataset_format, args.validation_split_percentage, seed, image
        )
        byte_data.require_columns(splits, args.dataset, **columns)
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
