"""The command's metrics as `evaluate` metric modules shipped in this folder (`accuracy.py`, `exact_match.py`, and
`sacrebleu_corpus.py` with a `bleu` and a `chrf` configuration), loaded by their path with `evaluate.load`, so they need no network and no Hub cache; BLEU and
chrF are sacrebleu's. Here: the `compute_metrics` / `preprocess_logits_for_metrics` functions the tasks give
`Trainer`, built on them."""

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ...data import require

FOLDER = Path(__file__).resolve().parent
# metric name -> (module file in this folder, its configuration name)
MODULES = {
    "accuracy": ("accuracy", None),
    "bleu": ("sacrebleu_corpus", "bleu"),
    "chrf": ("sacrebleu_corpus", "chrf"),
    "exact_match": ("exact_match", None),
}
# What a metric module imports beyond the command's other dependencies, and the requirement that provides it.
REQUIREMENTS = {"bleu": ("sacrebleu", "sacrebleu>=2.3"), "chrf": ("sacrebleu", "sacrebleu>=2.3")}


@functools.cache
def load_metric(name: str):
    """The `evaluate` module `name` of this folder (one instance per process, kept in memory: no cache files)."""
    import evaluate

    if name not in MODULES:
        raise ValueError(f"unknown metric {name!r}; the command's metrics: {', '.join(MODULES)}")
    if name in REQUIREMENTS:
        module, requirement = REQUIREMENTS[name]
        require(module, requirement, f"the {name} metric")
    module, config_name = MODULES[name]
    return evaluate.load(str(FOLDER / f"{module}.py"), config_name, keep_in_memory=True)


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`{"bleu", "chrf", "exact_match"}` of generated texts against one reference each (all in [0, 100])."""
    for name, texts in (("hypotheses", hypotheses), ("references", references)):
        if isinstance(texts, str):  # (evaluate would read a string as one segment per character)
            raise ValueError(f"text_metrics: pass a list of {name} (one string per segment), not a string")
    scores = {}
    for name in ("bleu", "chrf", "exact_match"):
        scores.update(load_metric(name).compute(predictions=list(hypotheses), references=list(references)))
    return scores


def seq2seq_metrics(tokenizer) -> Callable:
    """A `compute_metrics` for `Seq2SeqTrainer(..., args=Seq2SeqTrainingArguments(predict_with_generate=True))`:
    decodes the generated ids and the labels (-100 -> padding) with `tokenizer` and returns `text_metrics`. The
    metric modules load here, so a missing sacrebleu is an error before training, not after it."""
    for name in ("bleu", "chrf", "exact_match"):
        load_metric(name)

    def compute_metrics(eval_prediction) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        hypotheses = tokenizer.batch_decode(predictions, skip_special_tokens=True)
        references = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return text_metrics(hypotheses, references)

    return compute_metrics


def argmax_logits(logits, labels):
    """`preprocess_logits_for_metrics`: keep only the predicted ids (not the full vocabulary of logits)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_metrics(eval_pred) -> dict:
    """Accuracy of the predicted classes (`eval_pred.predictions`: logits or class ids)."""
    predictions, labels = eval_pred.predictions, eval_pred.label_ids
    predictions = np.asarray(predictions[0] if isinstance(predictions, tuple) else predictions)
    if predictions.ndim > np.asarray(labels).ndim:
        predictions = predictions.argmax(axis=-1)
    references = np.asarray(labels).reshape(-1)
    return load_metric("accuracy").compute(predictions=predictions.reshape(-1), references=references)


def masked_token_metrics(eval_pred) -> dict:
    """Accuracy on the masked (labelled) positions only."""
    predictions, labels = np.asarray(eval_pred.predictions), np.asarray(eval_pred.label_ids)
    keep = labels != -100
    return load_metric("accuracy").compute(predictions=predictions[keep], references=labels[keep])
