"""The embedded sequence-to-sequence task and its metrics (no download anywhere).

Task: *write numbers and dates out in English words.* As in translation, the source carries all the information
and the target is a different surface form that needs local reordering and insertion:

- numbers, 0 to 999,999, written in digits (with or without thousands separators):
  `"40,517"` -> `"forty thousand five hundred seventeen"` (teens read units first: `17` -> `seven|teen`; zeros
  vanish; `thousand` / `hundred` are inserted after their digits);
- ISO dates 1900-2099: `"1987-03-09"` -> `"March ninth, nineteen eighty-seven"` (the month moves to the front, the day
  becomes an ordinal, the year is read in pairs before 2000 and as a number after:
  `"2014-11-30"` -> `"November thirtieth, two thousand fourteen"`).

`numbers_to_words_dataset()` builds `train` / `validation` / `test` splits (`datasets.Dataset`, columns `source` and
`target`) in memory from a seed: deterministic, and the three splits share no source. `corpus_bleu` and
`corpus_chrf` are the standard corpus-level BLEU (BLEU-4, brevity penalty, mteval-13a tokenisation, exponential
smoothing of zero counts) and chrF (character 6-grams, beta = 2, whitespace removed), written from their
definitions and equal to sacrebleu's defaults (tests compare them when sacrebleu is installed).
`seq2seq_metrics(tokenizer)` turns them into a `compute_metrics` for `Seq2SeqTrainer(predict_with_generate=True)`.
"""

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()  # noqa: E501
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
MONTHS = "January February March April May June July August September October November December".split()
ORDINAL_WORDS = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


# ---------------------------------------------------------------------------------------------- the task
def _below_hundred(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[units]}" if units else "")


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{ONES[hundreds]} hundred"] if hundreds else []
    if rest:
        words.append(_below_hundred(rest))
    return " ".join(words)


def number_to_words(n: int) -> str:
    """English cardinal, 0 <= n < 1,000,000 (American style, no "and"): 40517 -> "forty thousand five hundred
    seventeen"."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_to_words: n must be in [0, 1000000), got {n}.")
    if n == 0:
        return "zero"
    thousands, rest = divmod(n, 1000)
    words = [f"{_below_thousand(thousands)} thousand"] if thousands else []
    if rest:
        words.append(_below_thousand(rest))
    return " ".join(words)


def ordinal_to_words(n: int) -> str:
    """1 -> "first", 22 -> "twenty-second", 30 -> "thirtieth" (1 <= n < 100)."""
    if not 1 <= n < 100:
        raise ValueError(f"ordinal_to_words: n must be in [1, 100), got {n}.")
    words = _below_hundred(n)
    head, _, last = words.rpartition("-")
    if last in ORDINAL_WORDS:
        last = ORDINAL_WORDS[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return f"{head}-{last}" if head else last


def year_to_words(year: int) -> str:
    """1900-1999 in pairs ("nineteen eighty-seven", "nineteen oh five", "nineteen hundred"); 2000-2099 as a number."""
    if not 1900 <= year <= 2099:
        raise ValueError(f"year_to_words: year must be in [1900, 2099], got {year}.")
    if year >= 2000:
        return number_to_words(year)
    rest = year - 1900
    if rest == 0:
        return "nineteen hundred"
    return "nineteen " + (f"oh {ONES[rest]}" if rest < 10 else _below_hundred(rest))


def date_to_words(year: int, month: int, day: int) -> str:
    """(1987, 3, 9) -> "March ninth, nineteen eighty-seven"."""
    return f"{MONTHS[month - 1]} {ordinal_to_words(day)}, {year_to_words(year)}"


def _sample_pair(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        year, month = rng.randint(1900, 2099), rng.randint(1, 12)
        day = rng.randint(1, DAYS_IN_MONTH[month - 1])
        return f"{year:04d}-{month:02d}-{day:02d}", date_to_words(year, month, day)
    # Log-uniform magnitudes: as many 2-digit as 6-digit numbers.
    digits = rng.randint(1, 6)
    n = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    source = f"{n:,}" if n >= 1000 and rng.random() < 0.5 else str(n)
    return source, number_to_words(n)


def numbers_to_words_pairs(count: int, seed: int = 0, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """`count` distinct (source, target) pairs drawn with `random.Random(seed)`, none of whose sources is in
    `exclude`."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    pairs = []
    while len(pairs) < count:
        source, target = _sample_pair(rng)
        if source not in seen:
            seen.add(source)
            pairs.append((source, target))
    return pairs


def numbers_to_words_dataset(
    train_size: int = 20_000, validation_size: int = 500, test_size: int = 500, seed: int = 0
):
    """The embedded seq2seq task as a `datasets.DatasetDict` with `train`, `validation` and `test` splits (columns
    `source`, `target`), built in memory: the same seed gives the same rows, and no source is in two splits."""
    from datasets import Dataset, DatasetDict

    for name, size in (("train_size", train_size), ("validation_size", validation_size), ("test_size", test_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"numbers_to_words_dataset: `{name}` must be a positive integer, got {size!r}.")
    # The evaluation splits are drawn first, from their own seeds, so they stay the same whatever the train size.
    splits, used = {}, set()
    for offset, (split, size) in enumerate((("test", test_size), ("validation", validation_size))):
        pairs = numbers_to_words_pairs(size, seed=1000 * seed + 101 + offset, exclude=used)
        used.update(source for source, _ in pairs)
        splits[split] = pairs
    splits["train"] = numbers_to_words_pairs(train_size, seed=1000 * seed, exclude=used)
    return DatasetDict(
        {
            split: Dataset.from_dict(
                {"source": [s for s, _ in splits[split]], "target": [t for _, t in splits[split]]}
            )
            for split in ("train", "validation", "test")
        }
    )


def numbers_to_words_splits(validation_size: int = 300):
    """numbers and ISO dates to English words, e.g. 1987-03-09 -> March ninth, nineteen eighty-seven (embedded)

    The `seq2seq` data of the `hf-efficient` command, as `(train, validation)`: the 20,000 training pairs of
    `numbers_to_words_dataset()` and the first `validation_size` of its validation pairs (evaluation generates every
    target, so it is kept to a few hundred rows); the `test` split is left for benchmarks."""
    splits = numbers_to_words_dataset()
    validation = splits["validation"]
    return splits["train"], validation.select(range(min(validation_size, len(validation))))


# ---------------------------------------------------------------------------------------------- metrics
_13A_RULES = (
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # punctuation and symbols
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period / comma unless preceded by a digit
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # ... unless followed by a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
)


def tokenize_13a(line: str) -> list[str]:
    """mteval-v13a tokenisation (WMT's standard for BLEU): split off punctuation, keep `1,000` / `3.5` together."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for pattern, replacement in _13A_RULES:
        line = pattern.sub(replacement, line)
    return line.split()


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _check_corpus(hypotheses, references, name):
    if isinstance(hypotheses, str) or isinstance(references, str):
        raise ValueError(f"{name}: pass lists of strings (one hypothesis and one reference per segment).")
    if len(hypotheses) != len(references):
        raise ValueError(f"{name}: {len(hypotheses)} hypotheses but {len(references)} references.")


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU (Papineni et al., 2002) in [0, 100], one reference per segment:

        BLEU = BP * exp(mean_n log p_n),   p_n = sum clipped n-gram matches / sum hypothesis n-grams (n = 1..4),
        BP = min(1, exp(1 - r / c))  (c, r: total hypothesis / reference lengths)

    on 13a tokens; a zero match count at order n is smoothed to 1 / (2^k total_n) (k-th such order: sacrebleu's
    default "exp" smoothing)."""
    _check_corpus(hypotheses, references, "corpus_bleu")
    matches, totals = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = tokenize_13a(hypothesis), tokenize_13a(reference)
        hyp_len, ref_len = hyp_len + len(hyp), ref_len + len(ref)
        for n in range(1, max_order + 1):
            hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    if not any(matches):
        return 0.0
    log_precisions, smooth = [], 1.0
    for n in range(max_order):
        if totals[n] == 0:
            log_precisions.append(-9_999_999_999.0)  # a hypothesis corpus shorter than n tokens
        elif matches[n] == 0:
            smooth *= 2
            log_precisions.append(math.log(100.0 / (smooth * totals[n])))
        else:
            log_precisions.append(math.log(100.0 * matches[n] / totals[n]))
    brevity = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    return brevity * math.exp(sum(log_precisions) / max_order)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str], order: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popovic, 2015) in [0, 100]: character n-gram (n = 1..6, whitespace removed) precision P_n and
    recall R_n from counts summed over the corpus, averaged over the orders both sides have, then
    F_beta = (1 + b^2) P R / (b^2 P + R)."""
    _check_corpus(hypotheses, references, "corpus_chrf")
    stats = np.zeros((order, 3))  # hypothesis n-grams, reference n-grams, matches
    for hypothesis, reference in zip(hypotheses, references):
        hyp, ref = "".join(hypothesis.split()), "".join(reference.split())
        for n in range(1, order + 1):
            hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
            stats[n - 1] += (
                sum(hyp_counts.values()) if ref_counts else 0,  # (sacrebleu: a reference too short counts nothing)
                sum(ref_counts.values()),
                sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items()),
            )
    present = (stats[:, 0] > 0) & (stats[:, 1] > 0)
    if not present.any():
        return 0.0
    precision = float((stats[present, 2] / stats[present, 0]).mean())
    recall = float((stats[present, 2] / stats[present, 1]).mean())
    if precision + recall == 0:
        return 0.0
    factor = beta**2
    return 100.0 * (1 + factor) * precision * recall / (factor * precision + recall)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of segments generated exactly (after stripping surrounding whitespace)."""
    _check_corpus(hypotheses, references, "exact_match")
    if not hypotheses:
        return 0.0
    return 100.0 * sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(hypotheses)


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`{"bleu", "chrf", "exact_match"}` of generated texts against references (all in [0, 100])."""
    return {
        "bleu": corpus_bleu(hypotheses, references),
        "chrf": corpus_chrf(hypotheses, references),
        "exact_match": exact_match(hypotheses, references),
    }


def seq2seq_metrics(tokenizer) -> Callable:
    """A `compute_metrics` for `Seq2SeqTrainer(..., args=Seq2SeqTrainingArguments(predict_with_generate=True))`:
    decodes the generated ids and the labels (-100 -> padding) with `tokenizer` and returns `text_metrics`."""

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


__all__ = [
    "corpus_bleu",
    "corpus_chrf",
    "date_to_words",
    "exact_match",
    "number_to_words",
    "numbers_to_words_dataset",
    "numbers_to_words_pairs",
    "numbers_to_words_splits",
    "ordinal_to_words",
    "seq2seq_metrics",
    "text_metrics",
    "tokenize_13a",
    "year_to_words",
]
