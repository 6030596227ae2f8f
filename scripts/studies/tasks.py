"""What the studies share: the models (the benchmark's declarations in `model_cards/benchmarks/*.json`, through
`bench_lib.specs`, plus the studies' ablation and peer entries in the same format), the embedded data (the byte
corpus, the masked-LM windows, the recall probe with its curriculum, the digits as images and as pixel sequences)
and the training loop: `bench_lib.quality.train` (AdamW, linear warm-up then cosine decay, gradient clipping), the
benchmark's loop, for every arm of every study. Models whose inputs are not `input_ids` are wrapped (`Inputs`) so
that the same loop drives them.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from types import SimpleNamespace

import numpy as np
import torch
from bench_lib import quality, specs
from torch import nn

DEVICE = "cpu"


# ---------------------------------------------------------------------------------------------------------- models
def _entries() -> dict[str, dict]:
    entries, _ = specs.discover(include_baselines=True)
    table = {e["name"]: e for e in entries}
    extra = []
    fixed = table.get("combiner-fixed")
    if fixed is not None:
        ablation = copy.deepcopy(fixed)
        ablation.update(name="combiner-fixed-nospans", label="Combiner-Fixed without span summaries (local blocks)")
        ablation["variant"] = {**ablation["variant"], "use_span_summaries": False}
        extra.append(ablation)
    rt = table.get("r-transformer-gru-m7")
    if rt is not None:
        ablation = copy.deepcopy(rt)
        ablation.update(name="r-transformer-no-localrnn", label="R-Transformer without LocalRNN")
        ablation["variant"] = {**ablation["variant"], "num_rnn_layers": 0}
        extra.append(ablation)
    extra.append(BERT)
    for entry in extra:  # the benchmark's own entry wins a name clash
        table.setdefault(entry["name"], entry)
    return table


# transformers' BERT with SDPA: the Transformer encoder of the gMLP study (post-LN, learned positions, GELU FFN).
BERT = {
    "model_type": "bert",
    "name": "bert-sdpa",
    "label": "BERT (SDPA)",
    "baseline": True,
    "attn_implementation": "sdpa",
    "variant": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "type_vocab_size": 1},
    "quality": {
        "hidden_size": "{hidden_size}",
        "num_hidden_layers": "{num_hidden_layers}",
        "num_attention_heads": "{num_heads}",
        "intermediate_size": "{intermediate_size}",
    },
    "causal_head": None,
    "length_key": "max_position_embeddings",
}


@functools.cache
def entries() -> dict[str, dict]:
    return _entries()


def entry(name: str) -> dict:
    table = entries()
    if name not in table:
        raise ValueError(f"No benchmark entry named {name!r}; known: {', '.join(sorted(table))}.")
    return table[name]


@functools.cache
def causal_entries() -> list[str]:
    """Every causal LM variant of the package (the benchmark JSONs' entries with a causal head), then Llama-SDPA
    and transformers' Mamba2 (the benchmark's peer entries)."""
    ours = [e["name"] for e in specs.discover(include_baselines=False)[0] if e.get("causal_head")]
    return [*ours, "llama-sdpa", entry("mamba2")["name"]]


# Equal parameters: a Mamba2 block (norm + mixer, no FFN: about 6 d^2 at expand 2) is about half a Transformer block
# (12 d^2), so the studies give Mamba2 twice the layers, as the Mamba papers do.
DEPTH_FACTOR = {"mamba2": 2}
# Byte LMs of these sizes (d 64-128, 4 layers) first sit near 3.1-3.4 bits per byte (about what byte-pair statistics
# give: measured 3.13-3.49 for Llama, AFT, N-gram and Combiner after ~1k small steps) before they learn to use their
# context; a claim that compares the use of context is only judged once full attention is below this.
LM_PLATEAU_BPB = 2.9


def build(name: str, sizes: dict, length: int | None, head: str | None = None, level: str = "quality", **overrides):
    """The model of entry `name` at `sizes` (hidden_size, num_hidden_layers, num_heads, intermediate_size,
    vocab_size; at the `image` level image_size, patch_size, num_channels, num_labels instead of vocab_size) from
    the entry's `level` config, its length key set to `length`, under the torch seed set by the caller. Mamba2 gets
    `DEPTH_FACTOR` times the layers (about equal parameters)."""
    spec = entry(name)
    factor = DEPTH_FACTOR.get(spec["model_type"], 1)
    if factor != 1:
        sizes = {**sizes, "num_hidden_layers": factor * sizes["num_hidden_layers"]}
    config = specs.level_config(spec, level, {level: sizes}, length=length, **overrides)
    return specs.build_model(spec, config, head or spec.get("causal_head") or "AutoModelForMaskedLM")


def parameters(model) -> int:
    return specs.count_parameters(model)


class Inputs(nn.Module):
    """Presents a model to `bench_lib.quality.train`, which calls `model(input_ids=x, labels=y, use_cache=False)`:
    `x` is passed as `input_name` (e.g. `pixel_values`), with `attention_mask = x != pad_id` when `pad_id` is set."""

    def __init__(self, model: nn.Module, input_name: str = "input_ids", pad_id: int | None = None):
        super().__init__()
        self.model, self.input_name, self.pad_id = model, input_name, pad_id

    def forward(self, input_ids=None, labels=None, use_cache=None, **kwargs):
        kwargs[self.input_name] = input_ids
        if self.pad_id is not None:
            kwargs["attention_mask"] = (input_ids != self.pad_id).long()
        return self.model(labels=labels, **kwargs)


class LSTMLanguageModel(nn.Module):
    """A plain multi-layer LSTM byte LM (embedding, `nn.LSTM`, tied output layer): the R-Transformer paper's RNN
    baseline. Labels are shifted inside, as transformers' causal LMs do."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.lstm = nn.LSTM(hidden_size, hidden_size, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, input_ids, labels=None, use_cache=None):
        logits = self.head(self.lstm(self.embed(input_ids))[0])
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return SimpleNamespace(loss=loss, logits=logits)


class PixelSequenceClassifier(nn.Module):
    """A pixel-sequence classifier around a sequence backbone: each pixel's channels mapped to `d` by a linear layer
    (as R-Transformer's pixel embedding), the backbone (causal: a transformers base model called with
    `inputs_embeds`, or an `nn.LSTM`), a linear classifier on the last position (as R-Transformer's image head)."""

    def __init__(self, backbone: nn.Module, hidden_size: int, num_channels: int, num_labels: int):
        super().__init__()
        self.proj = nn.Linear(num_channels, hidden_size)
        self.backbone = backbone
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, pixel_values, labels=None, use_cache=None):
        x = self.proj(pixel_values.flatten(2).transpose(1, 2))  # (B, H W, d), row-major
        if isinstance(self.backbone, nn.LSTM):
            hidden = self.backbone(x)[0]
        else:
            hidden = self.backbone(inputs_embeds=x, use_cache=False).last_hidden_state
        logits = self.classifier(hidden[:, -1])
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels)
        return SimpleNamespace(loss=loss, logits=logits)


def lstm_width(target_parameters: int, layers: int, extra_per_width: int, constant: int = 0) -> int:
    """The LSTM width whose parameter count (`layers` LSTM layers + `extra_per_width * h` + `constant`) is closest to
    `target_parameters`: the equal-size LSTM of a comparison."""

    def count(h):
        return layers * (8 * h * h + 8 * h) + extra_per_width * h + constant

    return min(range(8, 4097), key=lambda h: abs(count(h) - target_parameters))


# ------------------------------------------------------------------------------------------------------ training
def fit(model, batches, steps: int, lr: float, log_every: int = 0, log=None) -> dict:
    """`bench_lib.quality.train`: the benchmark's training loop, the same for every arm."""
    return quality.train(model, batches, steps, lr, DEVICE, log_every=log_every, log=log or (lambda _: None))


def seconds_per_step(make_model, batches, lr: float, steps: int = 2, clock=time.perf_counter) -> float:
    """Time of one training step of a fresh model (one warm-up step, then the mean of `steps` timed ones). `clock`:
    wall time (the Pareto's calibration) or `time.process_time` (the estimates: this process's CPU time, which other
    work on a shared machine inflates less)."""
    model = make_model()
    fit(model, batches, 1, lr)
    start = clock()
    fit(model, batches, steps, lr)
    return (clock() - start) / steps


def estimate_seconds_per_step(make_model, batches, lr: float, steps: int = 2) -> float:
    """`seconds_per_step` on this process's CPU time: the estimate of a full-size run's cost without running it."""
    return seconds_per_step(make_model, batches, lr, steps, clock=time.process_time)


def tail_mean(values: list[float], fraction: float = 0.1) -> float:
    tail = values[-max(1, int(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def curve(losses: list[float], points: int = 50) -> list[float]:
    """The training loss averaged over `points` equal windows (for the plots)."""
    size = max(1, len(losses) // points)
    return [round(sum(losses[i : i + size]) / len(losses[i : i + size]), 4) for i in range(0, len(losses), size)]


# ---------------------------------------------------------------------------------------------------- byte corpus
@functools.cache
def corpus(context: int, train_bytes: int, validation_blocks: int):
    """`bench_lib.quality.corpus`: the embedded corpus's training ids and `validation_blocks` validation blocks."""
    return quality.corpus(context, train_bytes, validation_blocks)


def lm_run(model, setting: dict, seed: int) -> dict:
    """Train a causal LM on the byte corpus (`setting`: context, batch, steps, lr, train_bytes, validation_blocks) and
    evaluate its validation bits per byte."""
    train_ids, val_blocks = corpus(setting["context"], setting["train_bytes"], setting["validation_blocks"])
    batches = quality.lm_batches(train_ids, setting["context"], setting["batch"], seed)
    result = fit(model, batches, setting["steps"], setting["lr"])
    start = time.perf_counter()
    bpb = quality.evaluate_bpb(model, val_blocks, DEVICE)
    return {
        "validation_bpb": round(bpb, 5),
        "final_train_bpb": round(tail_mean(result["losses"]) / math.log(2), 5),
        "parameters": parameters(model),
        "tokens": setting["steps"] * setting["batch"] * setting["context"],
        "train_s": round(result["train_s"], 2),
        "eval_s": round(time.perf_counter() - start, 2),
        "loss_curve": curve(result["losses"]),
    }


def lm_estimate(make_model, setting: dict, probe_steps: int = 2) -> float:
    """Seconds of `lm_run` at full size: timed steps x steps, plus the validation pass (~1/3 of a step per token)."""
    train_ids, _ = corpus(setting["context"], min(setting["train_bytes"], 2_000_000), 1)
    batches = quality.lm_batches(train_ids, setting["context"], setting["batch"], 0)
    per_step = estimate_seconds_per_step(make_model, batches, setting["lr"], probe_steps)
    eval_tokens = setting["validation_blocks"] * setting["context"]
    return per_step * setting["steps"] + per_step / 3 * eval_tokens / (setting["batch"] * setting["context"])


# ------------------------------------------------------------------------------------------------------ masked LM
MASK_ID = 259  # ByT5's <extra_id_0>, the package's mask token (hf_efficient.data.default_tokenizer)


def mask_tokens(ids: torch.Tensor, generator: torch.Generator, probability: float = 0.15):
    """BERT's masking: `probability` of the positions are predicted; of those 80% become the mask token, 10% a
    random byte token, 10% stay. Returns `(inputs, labels)` (labels -100 where not predicted)."""
    chosen = torch.rand(ids.shape, generator=generator) < probability
    labels = ids.masked_fill(~chosen, -100)
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.masked_fill(chosen & (roll < 0.8), MASK_ID)
    random_tokens = torch.randint(3, 259, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
    return inputs, labels


def mlm_batches(train_ids, context: int, batch: int, seed: int):
    windows = quality.lm_batches(train_ids, context, batch, seed)
    generator = torch.Generator().manual_seed(10_000 + seed)

    def get(step):
        ids, _ = windows(step)
        return mask_tokens(ids, generator)

    return get


def mlm_evaluate(model, val_blocks, batch: int = 16) -> dict:
    """Masked-LM cross-entropy on the validation blocks with one fixed masking (seed 0, the same for every arm and
    seed): perplexity per masked byte and bits per masked byte."""
    generator = torch.Generator().manual_seed(0)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val_blocks), batch):
            inputs, labels = mask_tokens(torch.from_numpy(val_blocks[i : i + batch]), generator)
            logits = model(input_ids=inputs).logits.float()
            mask = labels != -100
            total += float(nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
            count += int(mask.sum())
    nats = total / count
    return {"validation_ppl": round(math.exp(nats), 5), "validation_bits": round(nats / math.log(2), 5)}


# --------------------------------------------------------------------------------------------- associative recall
# The probe's vocabulary (inside the 384 byte-token ids, so every text config works unchanged): one token per
# (key, value) pair, then the query keys, the answer values and the filler.
RECALL_KEYS, RECALL_VALUES = 16, 16
PAIR_BASE = 4
QUERY_BASE = PAIR_BASE + RECALL_KEYS * RECALL_VALUES
ANSWER_BASE = QUERY_BASE + RECALL_KEYS
FILLER_BASE = ANSWER_BASE + RECALL_VALUES
NUM_FILLER = 384 - FILLER_BASE
CHANCE = 1 / RECALL_VALUES


def recall_batch(generator: torch.Generator, batch: int, length: int, num_pairs: int):
    """The redesigned multi-query associative-recall probe: `(input_ids, labels)` of `batch` sequences of `length`.

    Layout: `P = num_pairs` pair tokens (each binds a key and a value: id `PAIR_BASE + key * 16 + value`, keys
    distinct), random filler up to `L/2`, then `L/2` query tokens (`QUERY_BASE + key`, keys drawn with replacement
    from the `P` stored ones). After each query the label is its value (`ANSWER_BASE + value`, aligned for
    transformers' internal shift), which never enters the input: every answer is retrieved from the pairs at the
    start, `L/2` to `L` positions back. One hop: the query matches a pair token, whose value is read out of it.
    (The benchmark's probe, `bench_lib.quality.recall_batch`, spreads each pair over two tokens, so retrieval takes
    an induction head, two hops, which Llama-SDPA did not form within the studies' budgets: it stayed at the
    "copy any value of the context" level, 1/P.) Without retrieval: chance 1/16, copying any stored value 1/P.
    """
    half = length // 2
    if half < num_pairs or not 1 <= num_pairs <= RECALL_KEYS:
        raise ValueError(
            f"recall: {num_pairs} pairs need 1 <= pairs <= {RECALL_KEYS} and a length >= {2 * num_pairs}, got {length}."
        )
    keys = torch.stack([torch.randperm(RECALL_KEYS, generator=generator)[:num_pairs] for _ in range(batch)])
    values = torch.randint(0, RECALL_VALUES, (batch, num_pairs), generator=generator)
    filler = torch.randint(0, NUM_FILLER, (batch, half - num_pairs), generator=generator) + FILLER_BASE
    chosen = torch.randint(0, num_pairs, (batch, length - half), generator=generator)
    queries, answers = keys.gather(1, chosen) + QUERY_BASE, values.gather(1, chosen) + ANSWER_BASE
    ids = torch.cat([PAIR_BASE + keys * RECALL_VALUES + values, filler, queries], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, half + 1 :] = answers[:, :-1]  # position half + i predicts the answer to query i
    return ids, labels


def recall_accuracy(model, length: int, num_pairs: int, batches: int, batch: int, seed: int) -> float:
    """Accuracy of the answers (argmax after each query) on sequences from their own stream (`seed + 10000`)."""
    generator = torch.Generator().manual_seed(seed + 10_000)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for _ in range(batches):
            ids, labels = recall_batch(generator, batch, length, num_pairs)
            predictions = model(input_ids=ids, use_cache=False).logits[:, :-1].argmax(-1)
            targets = labels[:, 1:]
            mask = targets != -100
            correct += int((predictions[mask] == targets[mask]).sum())
            total += int(mask.sum())
    return correct / max(1, total)


def curriculum_stage(step: int, steps: int, stages: list[list]) -> tuple[int, int | None]:
    """`(length, pairs)` at `step` of a curriculum `[[length, fraction of the steps(, pairs)], ...]` (the last stage
    runs to the end; `pairs` None: the setting's `num_pairs`)."""
    bound = 0.0
    for stage in stages:
        bound += stage[1] * steps
        if step < bound:
            break
    return int(stage[0]), (int(stage[2]) if len(stage) > 2 else None)


def recall_batches(setting: dict, seed: int):
    """Training batches of the probe with a curriculum over the length (and the number of pairs);
    `tokens_per_step` tokens at every stage."""
    generator = torch.Generator().manual_seed(seed)

    def get(step):
        length, pairs = curriculum_stage(step, setting["steps"], setting["curriculum"])
        batch = max(1, setting["tokens_per_step"] // length)
        return recall_batch(generator, batch, length, pairs or setting["num_pairs"])

    return get


def recall_run(model, setting: dict, seed: int) -> dict:
    result = fit(model, recall_batches(setting, seed), setting["steps"], setting["lr"])
    length, pairs = setting["length"], setting["num_pairs"]
    start = time.perf_counter()
    accuracy = recall_accuracy(model, length, pairs, setting["eval_batches"], setting["eval_batch"], seed)
    return {
        "accuracy": round(accuracy, 5),
        "chance": round(CHANCE, 5),
        "copy_baseline": round(1 / pairs, 5),
        "final_loss": round(tail_mean(result["losses"]), 5),
        "parameters": parameters(model),
        "train_s": round(result["train_s"], 2),
        "eval_s": round(time.perf_counter() - start, 2),
        "loss_curve": curve(result["losses"]),
    }


def recall_estimate(make_model, setting: dict) -> float:
    total = 0.0
    for stage in setting["curriculum"]:
        length, fraction = stage[0], stage[1]
        batch = max(1, setting["tokens_per_step"] // length)
        generator = torch.Generator().manual_seed(0)

        def batches(step, length=length, batch=batch, generator=generator):
            return recall_batch(generator, batch, length, setting["num_pairs"])

        total += estimate_seconds_per_step(make_model, batches, setting["lr"], 1) * fraction * setting["steps"]
    return total * 1.05  # + the evaluation batches


# ------------------------------------------------------------------------------------------------- digits images
@functools.cache
def digits(side: int) -> dict:
    """scikit-learn's 8 x 8 digits (the command's image-cls data, same stratified 80/20 split with random_state 0),
    intensities scaled to [0, 1] and upscaled bilinearly to `side x side`: `{"train": (x, y), "test": (x, y)}` with
    `x` `(N, 1, side, side)` float32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    if side != 8:
        images = nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(np.arange(len(images)), test_size=0.2, random_state=0, stratify=data.target)
    labels = torch.from_numpy(data.target.astype(np.int64))
    return {"train": (images[train_idx], labels[train_idx]), "test": (images[test_idx], labels[test_idx])}


def epoch_batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """Shuffled mini-batches, a new permutation every epoch, from `seed`: the same order for every arm."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []

    def get(step):
        while len(order) < (step + 1) * batch:
            order.extend(torch.randperm(len(x), generator=generator).tolist())
        index = order[step * batch : (step + 1) * batch]
        return x[index], y[index]

    return get


def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(input_ids=x[i : i + batch]).logits
            correct += int((logits.argmax(-1) == y[i : i + batch]).sum())
    return correct / len(x)


def classification_run(model, setting: dict, seed: int) -> dict:
    """Train an image / pixel-sequence classifier (wrapped by `Inputs`) on the digits and score the test split."""
    data = digits(setting["side"])
    x, y = data["train"]
    result = fit(model, epoch_batches(x, y, setting["batch"], seed), setting["steps"], setting["lr"])
    start = time.perf_counter()
    test_accuracy = accuracy(model, *data["test"])
    return {
        "test_accuracy": round(test_accuracy, 5),
        "train_accuracy": round(accuracy(model, x, y), 5),
        "final_loss": round(tail_mean(result["losses"]), 5),
        "parameters": parameters(model),
        "epochs": round(setting["steps"] * setting["batch"] / len(x), 2),
        "train_s": round(result["train_s"], 2),
        "eval_s": round(time.perf_counter() - start, 2),
        "loss_curve": curve(result["losses"]),
    }


def classification_estimate(make_model, setting: dict) -> float:
    x, y = digits(setting["side"])["train"]
    per_step = estimate_seconds_per_step(make_model, epoch_batches(x, y, setting["batch"], 0), setting["lr"])
    return per_step * setting["steps"] + per_step / 3 * 2 * len(x) / setting["batch"]
