"""The embedded seq2seq task (numbers and dates to English words) and its corpus BLEU / chrF."""

import math
import random

import numpy as np
import pytest
from transformers import ByT5Tokenizer, EvalPrediction

from hf_efficient.seq2seq_data import (
    corpus_bleu,
    corpus_chrf,
    date_to_words,
    exact_match,
    number_to_words,
    numbers_to_words_dataset,
    ordinal_to_words,
    seq2seq_metrics,
    tokenize_13a,
    year_to_words,
)


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (13, "thirteen"),
        (40, "forty"),
        (99, "ninety-nine"),
        (100, "one hundred"),
        (101, "one hundred one"),
        (1000, "one thousand"),
        (40517, "forty thousand five hundred seventeen"),
        (999_999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
        (700_010, "seven hundred thousand ten"),
    ],
)
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_ordinals_years_dates():
    assert [ordinal_to_words(n) for n in (1, 2, 3, 5, 9, 12, 20, 21, 30, 31)] == [
        "first", "second", "third", "fifth", "ninth", "twelfth", "twentieth", "twenty-first", "thirtieth",
        "thirty-first",
    ]  # fmt: skip
    assert year_to_words(1987) == "nineteen eighty-seven"
    assert year_to_words(1905) == "nineteen oh five"
    assert year_to_words(1900) == "nineteen hundred"
    assert year_to_words(2014) == "two thousand fourteen"
    assert date_to_words(1987, 3, 9) == "March ninth, nineteen eighty-seven"
    for bad in (lambda: number_to_words(1_000_000), lambda: year_to_words(1899), lambda: ordinal_to_words(0)):
        with pytest.raises(ValueError):
            bad()


def test_dataset_is_deterministic_disjoint_and_consistent():
    first = numbers_to_words_dataset(train_size=300, validation_size=50, test_size=50, seed=3)
    second = numbers_to_words_dataset(train_size=300, validation_size=50, test_size=50, seed=3)
    assert set(first) == {"train", "validation", "test"}
    for split in first:
        assert first[split]["source"] == second[split]["source"] and first[split]["target"] == second[split]["target"]
    sources = {split: set(first[split]["source"]) for split in first}
    assert len(sources["train"]) == 300 and len(sources["validation"]) == 50
    assert not sources["train"] & sources["validation"] and not sources["train"] & sources["test"]
    assert not sources["validation"] & sources["test"]
    # evaluation splits do not depend on the training size; another seed gives other rows
    bigger = numbers_to_words_dataset(train_size=600, validation_size=50, test_size=50, seed=3)
    assert bigger["test"]["source"] == first["test"]["source"]
    assert numbers_to_words_dataset(300, 50, 50, seed=4)["train"]["source"] != first["train"]["source"]
    # every row is right: dates and numbers (with or without separators) round-trip through the writers
    for source, target in zip(first["train"]["source"], first["train"]["target"]):
        if len(source) == 10 and source[4] == "-":
            assert target == date_to_words(*map(int, source.split("-")))
        else:
            assert target == number_to_words(int(source.replace(",", "")))
    kinds = ["-" in s for s in first["train"]["source"]]
    assert 0.35 < np.mean(kinds) < 0.65  # about half dates
    with pytest.raises(ValueError, match="train_size"):
        numbers_to_words_dataset(train_size=0)


def test_tokenize_13a():
    assert tokenize_13a("March ninth, nineteen eighty-seven") == ["March", "ninth", ",", "nineteen", "eighty-seven"]
    assert tokenize_13a("1,000.5 (a) x-1 3-4") == ["1,000.5", "(", "a", ")", "x-1", "3", "-", "4"]


def test_bleu_by_hand():
    assert corpus_bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert corpus_bleu(["x y z w"], ["a b c d"]) == 0.0
    # hyp "a b c d e" vs ref "a b c d f": p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, BP = 1
    expected = 100 * math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert corpus_bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)
    # a short hypothesis pays the brevity penalty exp(1 - r/c): all precisions 1, c = 4, r = 8
    assert corpus_bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(1 - 8 / 4))
    # clipping: "the the the the" vs "the cat": p1 = 1/4, no bigram matches -> exp smoothing 1/(2 * 3), ...
    p = [1 / 4, 1 / (2 * 3), 1 / (4 * 2), 1 / (8 * 1)]
    assert corpus_bleu(["the the the the"], ["the cat"]) == pytest.approx(100 * math.exp(sum(map(math.log, p)) / 4))
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        corpus_bleu(["a", "b"], ["a"])


def test_chrf_by_hand():
    assert corpus_chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert corpus_chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc" (order 6): n=1: P=2/2 R=2/3; n=2: P=1/1 R=1/2; n=3: hyp has none -> only orders 1, 2 count
    precision, recall = (1 + 1) / 2, (2 / 3 + 1 / 2) / 2
    assert corpus_chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * precision * recall / (4 * precision + recall))
    assert corpus_chrf(["a b"], ["ab"]) == pytest.approx(100.0)  # whitespace is ignored
    assert exact_match([" one ", "two"], ["one", "three"]) == 50.0


def test_metrics_equal_sacrebleu():
    """Cross-check against the reference implementation (sacrebleu's corpus_bleu / corpus_chrf defaults)."""
    sacrebleu = pytest.importorskip("sacrebleu")
    references = numbers_to_words_dataset(10, 200, 10, seed=1)["validation"]["target"]
    rng = random.Random(0)
    for _ in range(5):
        hypotheses = [
            " ".join(w for w in r.split() if rng.random() < 0.8) + rng.choice(["", " one", ", x-1", " (a)"])
            for r in references
        ]
        hypotheses[0] = "a"
        assert corpus_bleu(hypotheses, references) == pytest.approx(
            sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=1e-9
        )
        assert corpus_chrf(hypotheses, references) == pytest.approx(
            sacrebleu.corpus_chrf(hypotheses, [references]).score, abs=1e-9
        )


def test_seq2seq_metrics_decode_generated_ids_and_labels():
    tokenizer = ByT5Tokenizer()
    references = ["forty-two", "March ninth, nineteen eighty-seven"]
    labels = tokenizer(text_target=references, padding=True)["input_ids"]
    labels = np.array([[t if t != tokenizer.pad_token_id else -100 for t in row] for row in labels])
    predictions = np.array(tokenizer(["forty-two", "March ninth, nineteen eighty-six"], padding=True)["input_ids"])
    metrics = seq2seq_metrics(tokenizer)(EvalPrediction(predictions=predictions, label_ids=labels))
    assert set(metrics) == {"bleu", "chrf", "exact_match"}
    assert metrics["exact_match"] == 50.0
    assert metrics["bleu"] == pytest.approx(corpus_bleu(["forty-two", "March ninth, nineteen eighty-six"], references))
    assert 50 < metrics["chrf"] < 100
