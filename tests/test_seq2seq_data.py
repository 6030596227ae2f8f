"""The embedded seq2seq task (numbers and dates to English words) and the command's metrics of generated text: the
evaluate modules of `hf_efficient.cli.metrics` (corpus BLEU and chrF by sacrebleu, exact match), loaded offline from
the package's files."""

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import evaluate
import numpy as np
import pytest
import sacrebleu
from transformers import ByT5Tokenizer, EvalPrediction

from hf_efficient.cli.metrics import FOLDER, MODULES, load_metric, seq2seq_metrics, text_metrics
from hf_efficient.seq2seq_data import (
    date_to_words,
    number_to_words,
    numbers_to_words_dataset,
    numbers_to_words_pairs,
    ordinal_to_words,
    source_split,
    year_to_words,
)


def bleu(hypotheses, references):
    return text_metrics(hypotheses, references)["bleu"]


def chrf(hypotheses, references):
    return text_metrics(hypotheses, references)["chrf"]


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
    with pytest.raises(ValueError, match="test_size"):
        numbers_to_words_dataset(test_size=True)


def test_each_source_lives_in_one_split_and_training_sees_one_digit_numbers():
    """The split of a row is `source_split(source, seed)` (a keyed hash of the source: disjoint splits whatever
    their sizes); about 80% of the source space is training data, and the ten one-digit numbers are no longer all
    held out (the evaluation splits used to be drawn first and took all of them)."""
    for seed in (0, 1):
        data = numbers_to_words_dataset(train_size=3000, validation_size=200, test_size=200, seed=seed)
        for split in data:
            assert {source_split(source, seed) for source in data[split]["source"]} == {split}
        one_digit = {split: {s for s in data[split]["source"] if len(s) == 1} for split in data}
        # 3000 draws include every training one-digit number (1 in 12 draws is a one-digit number)
        assert one_digit["train"] == {str(n) for n in range(10) if source_split(str(n), seed) == "train"}
        assert len(one_digit["train"]) >= 7 and not one_digit["train"] & (one_digit["test"] | one_digit["validation"])
    shares = [source_split(str(n)) for n in range(10_000)]
    assert 0.07 < shares.count("test") / 10_000 < 0.13 and 0.07 < shares.count("validation") / 10_000 < 0.13
    assert source_split("7", 0) != source_split("7", 4) or source_split("2", 0) != source_split("2", 4)  # keyed
    pairs = numbers_to_words_pairs(50, seed=5, split="test")
    assert len({s for s, _ in pairs}) == 50 and all(source_split(s) == "test" for s, _ in pairs)
    with pytest.raises(ValueError, match="split"):
        numbers_to_words_pairs(5, split="dev")


def test_metric_modules_are_evaluate_modules_loaded_from_the_package_files():
    for name, (module, config_name) in MODULES.items():
        metric = load_metric(name)
        assert isinstance(metric, evaluate.EvaluationModule) and metric.name == module
        assert metric.config_name == (config_name or "default")
        # evaluate imported it from its copy of the package's file (not from the Hub or a cache of it)
        assert type(metric).__module__.startswith(f"evaluate_modules.metrics.{module}.")
        assert Path(sys.modules[type(metric).__module__].__file__).read_text() == (FOLDER / f"{module}.py").read_text()
    assert load_metric("bleu") is load_metric("bleu")  # loaded once per process
    with pytest.raises(ValueError, match="unknown metric 'rouge'"):
        load_metric("rouge")


def test_metric_modules_load_offline_with_an_empty_cache(tmp_path):
    """In a fresh process with no Hugging Face cache and no network: the Hub's `bleu` cannot load, the package's can."""
    code = (
        "import evaluate\n"
        "from hf_efficient.cli.metrics import text_metrics\n"
        "try:\n    evaluate.load('bleu')\nexcept Exception as error:\n    print('hub:', type(error).__name__)\n"
        "print(text_metrics(['a b c d e'], ['a b c d f']))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("hub: ") and "'exact_match': 0.0" in lines[1], result.stdout
    assert (tmp_path / "hf" / "modules" / "evaluate_modules" / "metrics" / "sacrebleu_corpus").is_dir()


def test_bleu_by_hand():
    assert bleu(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert bleu(["x y z w"], ["a b c d"]) == 0.0
    # hyp "a b c d e" vs ref "a b c d f": p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2, BP = 1
    expected = 100 * math.exp((math.log(4 / 5) + math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2)) / 4)
    assert bleu(["a b c d e"], ["a b c d f"]) == pytest.approx(expected)
    # a short hypothesis pays the brevity penalty exp(1 - r/c): all precisions 1, c = 4, r = 8
    assert bleu(["a b c d"], ["a b c d e f g h"]) == pytest.approx(100 * math.exp(1 - 8 / 4))
    # clipping: "the the the the" vs "the cat": p1 = 1/4, no bigram matches -> exp smoothing 1/(2 * 3), ...
    p = [1 / 4, 1 / (2 * 3), 1 / (4 * 2), 1 / (8 * 1)]
    assert bleu(["the the the the"], ["the cat"]) == pytest.approx(100 * math.exp(sum(map(math.log, p)) / 4))
    # mteval-13a tokens: the comma is split off, "1,000.5" stays one token
    assert bleu(["March ninth , nineteen"], ["March ninth, nineteen"]) == pytest.approx(100.0)
    assert bleu(["1,000.5 a b c"], ["1,000.5 a b c"]) == pytest.approx(100.0)
    assert bleu(["1,000.6 a b c"], ["1,000.5 a b c"]) < 100.0
    with pytest.raises(ValueError, match=r"number of predictions \(2\) and references \(1\)"):
        bleu(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="not a string"):
        bleu("a b", ["a b"])


def test_chrf_and_exact_match_by_hand():
    assert chrf(["abc"], ["abc"]) == pytest.approx(100.0)
    assert chrf(["xyz"], ["abc"]) == 0.0
    # "ab" vs "abc" (order 6): n=1: P=2/2 R=2/3; n=2: P=1/1 R=1/2; n=3: hyp has none -> only orders 1, 2 count
    precision, recall = (1 + 1) / 2, (2 / 3 + 1 / 2) / 2
    assert chrf(["ab"], ["abc"]) == pytest.approx(100 * 5 * precision * recall / (4 * precision + recall))
    assert chrf(["a b"], ["ab"]) == pytest.approx(100.0)  # whitespace is ignored
    assert text_metrics([" one ", "two"], ["one", "three"])["exact_match"] == 50.0
    assert text_metrics([], []) == {"bleu": 0.0, "chrf": 0.0, "exact_match": 0.0}


def test_metrics_equal_sacrebleu():
    """The modules give sacrebleu's corpus_bleu / corpus_chrf (defaults) called directly: on a small example with a
    known value (BLEU 66.874..., as computed by hand in test_bleu_by_hand) and on noisy corpora."""
    assert sacrebleu.corpus_bleu(["a b c d e"], [["a b c d f"]]).score == pytest.approx(66.87403049764218)
    assert bleu(["a b c d e"], ["a b c d f"]) == sacrebleu.corpus_bleu(["a b c d e"], [["a b c d f"]]).score
    references = numbers_to_words_dataset(10, 200, 10, seed=1)["validation"]["target"]
    rng = random.Random(0)
    for _ in range(5):
        hypotheses = [
            " ".join(w for w in r.split() if rng.random() < 0.8) + rng.choice(["", " one", ", x-1", " (a)"])
            for r in references
        ]
        hypotheses[0] = "a"
        scores = text_metrics(hypotheses, references)
        assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, [references]).score
        assert scores["chrf"] == sacrebleu.corpus_chrf(hypotheses, [references]).score
        assert 0 < scores["chrf"] < 100 and 0 < scores["bleu"] < 100


def test_seq2seq_metrics_decode_generated_ids_and_labels():
    tokenizer = ByT5Tokenizer()
    references = ["forty-two", "March ninth, nineteen eighty-seven"]
    labels = tokenizer(text_target=references, padding=True)["input_ids"]
    labels = np.array([[t if t != tokenizer.pad_token_id else -100 for t in row] for row in labels])
    predictions = np.array(tokenizer(["forty-two", "March ninth, nineteen eighty-six"], padding=True)["input_ids"])
    metrics = seq2seq_metrics(tokenizer)(EvalPrediction(predictions=predictions, label_ids=labels))
    assert set(metrics) == {"bleu", "chrf", "exact_match"}
    assert metrics["exact_match"] == 50.0
    assert metrics["bleu"] == pytest.approx(bleu(["forty-two", "March ninth, nineteen eighty-six"], references))
    assert 50 < metrics["chrf"] < 100
