"""The text tasks: language modelling (`clm`, `mlm`), sequence classification (`seq-cls`) and sequence-to-sequence
generation (`seq2seq`)."""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ... import data as byte_data
from ... import seq2seq_data
from ...errors import TaskError
from ..metrics import argmax_logits, classification_metrics, masked_token_metrics, seq2seq_metrics
from .base import Task, TaskData, encode_labels, is_byte_tokenizer, limit_rows, loss_metrics


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
            limit_rows(train_set, getattr(args, "max_train_samples", None)),
            limit_rows(validation, args.max_eval_samples),
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
            train_set, validation, label_names = encode_labels(train_set, validation, args.label_column)

            def tokenize(split):
                return split.map(
                    lambda batch: tokenizer(batch[args.text_column], truncation=True, max_length=block_size),
                    batched=True,
                    remove_columns=[c for c in split.column_names if c != "label"],
                )

            train_set, validation = tokenize(train_set), tokenize(validation)
            description = f"local dataset {args.dataset} (text {args.text_column!r}, label {args.label_column!r})"
        return TaskData(
            limit_rows(train_set, getattr(args, "max_train_samples", None)) if train else None,
            limit_rows(validation, args.max_eval_samples),
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
    generates greedily and reports corpus BLEU, chrF and exact match (`metrics.seq2seq_metrics`) as well as
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

        train_set = tokenize(limit_rows(train_set, getattr(args, "max_train_samples", None))) if train else None
        validation = tokenize(limit_rows(validation, args.max_eval_samples))
        return TaskData(
            train_set,
            validation,
            description,
            tokenizer,
            collator=DataCollatorForSeq2Seq(tokenizer),
            compute_metrics=seq2seq_metrics(tokenizer),
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
