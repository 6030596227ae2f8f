"""Quality mode: a small reproducible leaderboard (validation bits per byte on the embedded corpus, same token
budget and about the same parameter count for every architecture, beside Llama SDPA) and a multi-query
associative-recall probe at several context lengths.

Every model trains with the same recipe (AdamW, linear warm-up then cosine decay, gradient clipping), the same
seed and the same batches; nothing is tuned per architecture.
"""

import functools
import math
import time

from . import measure, specs

# Associative recall vocabulary (inside the 384 byte-token ids, so every text config works unchanged).
KEY_BASE, NUM_KEYS = 4, 64
VALUE_BASE, NUM_VALUES = KEY_BASE + NUM_KEYS, 64
FILLER_BASE = VALUE_BASE + NUM_VALUES
NUM_FILLER = 384 - FILLER_BASE


def lr_at(step: int, total: int, peak: float, warmup_frac: float = 0.05, floor: float = 0.1) -> float:
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, batches, steps: int, lr: float, device: str, log_every: int = 0, log=print, loss_fn=None) -> dict:
    """Plain training loop; `batches(step)` returns `(input_ids, labels)` on the CPU."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr)
        ids, labels = batches(step)
        ids, labels = ids.to(device), labels.to(device)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log(f"      step {step + 1}/{steps} loss {sum(losses[-log_every:]) / log_every:.3f}")
    measure.synchronize(device)
    return {"train_s": time.perf_counter() - start, "losses": losses}


# ----------------------------------------------------------------------------------------------------------- corpus
def corpus(context: int, train_bytes: int, validation_blocks: int):
    import numpy as np

    from hf_efficient.data import bytes_to_ids, stdlib_bytes

    train_ids = bytes_to_ids(stdlib_bytes("train", train_bytes))
    val_ids = bytes_to_ids(stdlib_bytes("validation", validation_blocks * context))
    num_val = len(val_ids) // context
    if num_val < validation_blocks:
        raise ValueError(f"validation split has only {num_val} blocks of {context} bytes")
    return train_ids, np.ascontiguousarray(val_ids[: validation_blocks * context].reshape(validation_blocks, context))


def lm_batches(train_ids, context: int, batch: int, seed: int):
    """Deterministic random windows: the same for every architecture."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)

    def get(step):
        starts = rng.integers(0, len(train_ids) - context, size=batch)
        block = torch.from_numpy(np.stack([train_ids[s : s + context] for s in starts]))
        return block, block

    return get


def evaluate_bpb(model, val_blocks, device: str, batch: int = 4) -> float:
    """Mean next-byte cross-entropy over the validation blocks, in bits per byte."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(val_blocks), batch):
            ids = torch.from_numpy(val_blocks[i : i + batch]).to(device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += ids[:, 1:].numel()
    return total / count / math.log(2)


def leaderboard(entries, sizes, context, steps, batch, lr, train_bytes, validation_blocks, device, seed, log=print):
    import torch

    train_ids, val_blocks = corpus(context, train_bytes, validation_blocks)
    rows = []
    for entry in entries:
        record = {"name": entry["name"], "model_type": entry["model_type"], "label": entry["label"]}
        if not entry.get("causal_head"):
            rows.append({**record, "status": "skipped", "reason": "no causal LM head"})
            continue
        try:
            torch.manual_seed(seed)
            config = specs.level_config(entry, "quality", sizes, length=context)
            model = specs.build_model(entry, config, entry["causal_head"]).to(device)
            record.update(
                parameters=specs.count_parameters(model),
                non_embedding_parameters=specs.count_parameters(model, exclude_embeddings=True),
            )
            log(f"    leaderboard {entry['name']}: {record['parameters'] / 1e6:.2f}M parameters")
            result = train(
                model,
                lm_batches(train_ids, context, batch, seed),
                steps,
                lr,
                device,
                log_every=max(1, steps // 4),
                log=log,
            )
            start = time.perf_counter()
            bpb = evaluate_bpb(model, val_blocks, device)
            losses = result["losses"]
            tail = losses[-max(1, len(losses) // 10) :]
            record.update(
                status="ok",
                validation_bpb=round(bpb, 4),
                final_train_bpb=round(sum(tail) / len(tail) / math.log(2), 4),
                train_s=round(result["train_s"], 1),
                eval_s=round(time.perf_counter() - start, 1),
                tokens=steps * batch * context,
                tokens_per_s=round(steps * batch * context / result["train_s"], 1),
                loss_curve=[
                    round(sum(losses[i : i + 10]) / len(losses[i : i + 10]), 4) for i in range(0, len(losses), 10)
                ],
            )
        except Exception as error:
            record.update(measure.failure(error))
        rows.append(record)
        log(
            f"  leaderboard {entry['name']:18s} {record['status']:6s} "
            + measure.outcome(record, lambda r: f"val {r['validation_bpb']:.3f} bpb, {r['train_s']:.0f} s")
        )
    return rows


# ---------------------------------------------------------------------------------------------- associative recall
def recall_batch(generator, batch: int, length: int, num_pairs: int):
    """Multi-query associative recall with dense queries.

    Layout (length `L`): `k1 v1 ... kP vP`, random filler up to `L/2`, then `L/2` queries: keys drawn with
    replacement from the `P` stored ones. After each query the label is its value, but the value never enters the
    input (the next input token is the next query), so no answer can be copied from nearby: every one of the `L/2`
    answers must be retrieved from the pairs at the very start, at distances from about `L/2` to `L`. The labels are
    aligned for transformers' internal shift (`labels[t]` is predicted at position `t - 1`).
    """
    import torch

    half = length // 2
    if half < 2 * num_pairs or length < 4:
        raise ValueError(f"recall length {length} is too short for {num_pairs} pairs (needs >= {4 * num_pairs})")
    keys = torch.stack([torch.randperm(NUM_KEYS, generator=generator)[:num_pairs] for _ in range(batch)]) + KEY_BASE
    values = torch.randint(0, NUM_VALUES, (batch, num_pairs), generator=generator) + VALUE_BASE
    pairs = torch.stack([keys, values], dim=-1).flatten(1)
    filler = torch.randint(0, NUM_FILLER, (batch, half - 2 * num_pairs), generator=generator) + FILLER_BASE
    chosen = torch.randint(0, num_pairs, (batch, length - half), generator=generator)
    queries, answers = keys.gather(1, chosen), values.gather(1, chosen)
    ids = torch.cat([pairs, filler, queries], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, half + 1 :] = answers[:, :-1]  # position half + i predicts the answer to query i
    return ids, labels


def _recall_train_batch(generator, batch, length, num_pairs, step):
    return recall_batch(generator, batch, length, num_pairs)


def recall_accuracy(model, length, num_pairs, device, batches: int, batch: int, seed: int) -> float:
    import torch

    generator = torch.Generator().manual_seed(seed + 10_000)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for _ in range(batches):
            ids, labels = recall_batch(generator, batch, length, num_pairs)
            ids, labels = ids.to(device), labels.to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            predictions = logits[:, :-1].argmax(-1)
            targets = labels[:, 1:]
            mask = targets != -100
            correct += int((predictions[mask] == targets[mask]).sum())
            total += int(mask.sum())
    return correct / max(1, total)


def pairs_for(length: int, num_pairs: int) -> int:
    """`num_pairs`, or with 0 ("auto") one pair per 16 tokens (at most the 64 keys)."""
    return num_pairs if num_pairs > 0 else max(1, min(NUM_KEYS, length // 16))


def recall(entries, sizes, lengths, num_pairs, steps, tokens_per_step, lr, device, seed, eval_batches, log=print):
    import torch

    rows = []
    requested_pairs = num_pairs
    for length in lengths:
        batch = max(1, tokens_per_step // length)
        num_pairs = pairs_for(length, requested_pairs)
        for entry in entries:
            record = {
                "name": entry["name"],
                "model_type": entry["model_type"],
                "length": length,
                "num_pairs": num_pairs,
            }
            if not entry.get("causal_head"):
                rows.append({**record, "status": "skipped", "reason": "no causal LM head"})
                continue
            try:
                torch.manual_seed(seed)
                config = specs.level_config(entry, "quality", sizes, length=length, sizes_level="recall")
                model = specs.build_model(entry, config, entry["causal_head"]).to(device)
                generator = torch.Generator().manual_seed(seed)
                batches = functools.partial(_recall_train_batch, generator, batch, length, num_pairs)
                result = train(model, batches, steps, lr, device)
                accuracy = recall_accuracy(model, length, num_pairs, device, eval_batches, batch, seed)
                record.update(
                    status="ok",
                    accuracy=round(accuracy, 4),
                    chance=round(1 / NUM_VALUES, 4),
                    steps=steps,
                    batch=batch,
                    train_s=round(result["train_s"], 1),
                    final_loss=round(sum(result["losses"][-10:]) / len(result["losses"][-10:]), 4),
                )
            except Exception as error:
                record.update(measure.failure(error))
            rows.append(record)
            log(
                f"  recall L={length:5d} {entry['name']:18s} {record['status']:6s} "
                + measure.outcome(record, lambda r: f"accuracy {r['accuracy']:.3f} ({r['train_s']:.0f} s)")
            )
    return rows
