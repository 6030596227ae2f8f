"""The embedded sequence-to-sequence task (no download anywhere).

Task: *write numbers and dates out in English words.* As in translation, the source carries all the information
and the target is a different surface form that needs local reordering and insertion:

- numbers, 0 to 999,999, written in digits (with or without thousands separators):
  `"40,517"` -> `"forty thousand five hundred seventeen"` (teens read units first: `17` -> `seven|teen`; zeros
  vanish; `thousand` / `hundred` are inserted after their digits);
- ISO dates 1900-2099: `"1987-03-09"` -> `"March ninth, nineteen eighty-seven"` (the month moves to the front, the day
  becomes an ordinal, the year is read in pairs before 2000 and as a number after:
  `"2014-11-30"` -> `"November thirtieth, two thousand fourteen"`).

`numbers_to_words_dataset()` builds `train` / `validation` / `test` splits (`datasets.Dataset`, columns `source` and
`target`) in memory from a seed: deterministic, and the three splits share no source. Which split a source belongs to
is a keyed hash of the source itself (`source_split`: 10% test, 10% validation, 80% train), so every kind and magnitude
of source, one-digit numbers included, is mostly seen in training, and the splits are disjoint whatever their sizes.
The command scores generated text with corpus BLEU, chrF and exact match: `hf_efficient.cli.metrics` (evaluate
modules; BLEU and chrF by sacrebleu).
"""

import hashlib
import random

ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
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
SPLITS = ("train", "validation", "test")
EVAL_PERCENT = 10  # the share of the source space held out for test, and again for validation


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


def source_split(source: str, key: int = 0) -> str:
    """The split (`"train"`, `"validation"` or `"test"`) that `source` belongs to: a keyed hash (BLAKE2b of
    `key` and the source text) into 100 buckets, `EVAL_PERCENT` for test, as many for validation, the rest for train.
    A function of the source alone, so splits drawn with it share no source whatever their sizes, and about 80% of
    every small class of sources (the ten one-digit numbers, the 90 two-digit ones) is training data."""
    digest = hashlib.blake2b(f"{key}\x00{source}".encode(), digest_size=8).digest()
    bucket = int.from_bytes(digest, "big") % 100
    if bucket < EVAL_PERCENT:
        return "test"
    return "validation" if bucket < 2 * EVAL_PERCENT else "train"


def numbers_to_words_pairs(
    count: int, seed: int = 0, exclude: set[str] | None = None, split: str | None = None, split_key: int = 0
) -> list[tuple[str, str]]:
    """`count` distinct (source, target) pairs drawn with `random.Random(seed)`, none of whose sources is in
    `exclude`; with `split`, only sources with `source_split(source, split_key) == split`."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"numbers_to_words_pairs: `split` must be one of {SPLITS} or None, got {split!r}.")
    rng = random.Random(seed)
    seen = set(exclude or ())
    pairs = []
    while len(pairs) < count:
        source, target = _sample_pair(rng)
        if source in seen or (split is not None and source_split(source, split_key) != split):
            continue
        seen.add(source)
        pairs.append((source, target))
    return pairs


def numbers_to_words_dataset(
    train_size: int = 20_000, validation_size: int = 500, test_size: int = 500, seed: int = 0
):
    """The embedded seq2seq task as a `datasets.DatasetDict` with `train`, `validation` and `test` splits (columns
    `source`, `target`), built in memory: the same seed gives the same rows, and no source is in two splits.

    Each split draws only the sources `source_split(source, seed)` assigns to it (about 10% / 10% / 80% of the source
    space for test / validation / train), each from its own random stream: the splits are disjoint by construction,
    each stays the same whatever the other sizes, and training sees every kind of source (one-digit numbers
    included; before, the evaluation splits were drawn first and took all ten of them)."""
    from datasets import Dataset, DatasetDict

    for name, size in (("train_size", train_size), ("validation_size", validation_size), ("test_size", test_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"numbers_to_words_dataset: `{name}` must be a positive integer, got {size!r}.")
    sizes = {"train": train_size, "validation": validation_size, "test": test_size}
    streams = {"train": 1000 * seed, "test": 1000 * seed + 101, "validation": 1000 * seed + 102}
    splits = {
        split: numbers_to_words_pairs(sizes[split], seed=streams[split], split=split, split_key=seed)
        for split in SPLITS
    }
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


__all__ = [
    "date_to_words",
    "number_to_words",
    "numbers_to_words_dataset",
    "numbers_to_words_pairs",
    "numbers_to_words_splits",
    "ordinal_to_words",
    "source_split",
    "year_to_words",
]
