"""Throughput mode: tokens per second of `generate()` after a prefix, per batch size, and the prefill time.

What is timed is what users run: one `model.generate(prefix, do_sample=False, max_new_tokens=N, min_new_tokens=N)`
per (model, prefix, batch), each in a fresh process, with the model's own cache (Llama: transformers' default
DynamicCache, and a StaticCache through `cache_implementation="static"`). A logits processor that only reads the
clock is called once per generated token, right after the forward that produced its logits, so one call splits into

- prefill: from the call to the first token's logits (generate's setup + the forward over the `B x prefix` tokens with
  the cache; the prefix is prefilled once per point),
- decode: the `N - 1` one-token steps after it (forward with the cache + greedy pick + generate's bookkeeping);
  decode tokens/s = `B (N - 1) / (t_N - t_1)`.

A short untimed `generate()` at the same batch first warms the process up. Models with a fixed length
(`fixed_length`: gMLP's n x n spatial matrix, learned position tables) are built with their length key set to
prefix + N, the longest sequence generated. Dropout plays no part (generate runs in eval mode); every row records the
config's rates anyway.
"""

import statistics
import time

from . import decode, measure, scaling, specs


def _clock_processor(device: str):
    from transformers import LogitsProcessor

    class StepClock(LogitsProcessor):
        """Records `time.perf_counter()` at every generated token (after its forward); leaves the scores alone."""

        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            measure.synchronize(device)
            self.times.append(time.perf_counter())
            return scores

    return StepClock()


def _generate_kwargs(model, entry: dict, ids, new_tokens: int) -> dict:
    import torch

    config = model.generation_config
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    pad = config.pad_token_id if config.pad_token_id is not None else (eos if eos is not None else 0)
    kwargs = dict(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad,
        return_dict_in_generate=True,
        **entry.get("generate", {}),
    )
    if scaling._accepts(model.forward, "attention_mask"):
        kwargs["attention_mask"] = torch.ones_like(ids)
    return kwargs


def throughput_point(
    entry: dict,
    prefix: int,
    batch: int,
    sizes: dict,
    device: str = "cpu",
    new_tokens: int = 16,
    threads: int | None = None,
    memory_cap: int | None = None,
    seed: int = 0,
) -> dict:
    """Worker (fresh process): build the small causal LM, warm up, then time one `generate()` of `new_tokens` tokens
    after a random (seeded) `batch x prefix` prompt."""
    import torch
    from transformers import LogitsProcessorList

    if threads:
        torch.set_num_threads(threads)
    if not device.startswith("cuda"):
        measure.cap_address_space(memory_cap)
    torch.manual_seed(seed)
    length = prefix + new_tokens
    config = specs.level_config(entry, "model", sizes, length=length)
    model = specs.build_model(entry, config, entry["causal_head"]).to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, prefix), generator=generator).to(device)
    kwargs = _generate_kwargs(model, entry, ids, new_tokens)
    warm = ids[:, : min(prefix, 8)]
    warm_kwargs = {**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
    if "attention_mask" in warm_kwargs:
        warm_kwargs["attention_mask"] = torch.ones_like(warm)
    with torch.no_grad():
        model.generate(warm, **warm_kwargs)
    clock = _clock_processor(device)
    memory = measure.PeakMemory(device)
    memory.start()
    try:
        with torch.no_grad():
            measure.synchronize(device)
            start = time.perf_counter()
            out = model.generate(ids, logits_processor=LogitsProcessorList([clock]), **kwargs)
            measure.synchronize(device)
            end = time.perf_counter()
        peak = memory.peak()
    finally:
        memory.stop()
    generated = out.sequences.shape[1] - prefix
    times = clock.times
    if generated != new_tokens or len(times) != new_tokens:
        return {
            "status": "error",
            "error": f"generate() returned {generated} new tokens ({len(times)} steps), expected {new_tokens}",
        }
    steps = [b - a for a, b in zip(times, times[1:])]
    prefill_s = times[0] - start
    decode_s = times[-1] - times[0]
    cache = decode._cache_of(out)
    cache_bytes = decode.tensor_bytes(cache) if cache is not None else None
    return {
        "status": "ok",
        "new_tokens": new_tokens,
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": round(batch * prefix / prefill_s, 1),
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": round(batch * len(steps) / decode_s, 2) if decode_s > 0 else None,
        "decode_ms_per_step": round(1000 * statistics.median(steps), 3) if steps else None,
        "step_ms": [round(1000 * t, 2) for t in steps],
        "generate_s": round(end - start, 4),
        "end_to_end_tokens_per_s": round(batch * generated / (end - start), 2),
        "cache_mb": round(cache_bytes / 2**20, 3) if cache_bytes is not None else None,
        "cache_type": type(cache).__name__ if cache is not None else None,
        "peak_memory_mb": round(peak / 2**20, 2),
        "memory_method": memory.method,
        "declared_length": config.get(entry.get("length_key")) if entry.get("length_key") else None,
        "parameters": specs.count_parameters(model),
        "threads": torch.get_num_threads(),
        **scaling.dropout_record(model),
    }


def throughput_entries(entries: list[dict]) -> list[dict]:
    """Every causal head of ours, Llama (dynamic and static cache) and the decoding peers."""
    return specs.with_generation_variants(decode.decoding_entries(entries))


def run(
    entries: list[dict],
    sizes: dict,
    prefixes: list[int],
    batches: list[int],
    device: str,
    new_tokens: int,
    budget: float,
    memory_cap: int | None,
    start_method: str,
    threads: int | None,
    log=print,
    seed: int = 0,
) -> list[dict]:
    """Every entry at every (prefix, batch), one fresh process per point, interleaved by (prefix, batch) so that the
    ratios at one point are measured side by side in time. After a point of an entry fails (timeout, out of memory,
    error), its points with as many or more tokens (batch and prefix both >=) are not run (recorded as skipped)."""
    points: list[dict] = []
    failed: dict[str, list[tuple[int, int, str]]] = {}
    for prefix in prefixes:
        for batch in batches:
            for entry in entries:
                record = {
                    "name": entry["name"],
                    "model_type": entry["model_type"],
                    "prefix": prefix,
                    "batch": batch,
                }
                after = next(
                    (f for f in failed.get(entry["name"], []) if prefix >= f[0] and batch >= f[1]),
                    None,
                )
                if after is not None:
                    record.update(
                        status="skipped", reason=f"not run: {after[2]} at prefix {after[0]}, batch {after[1]}"
                    )
                else:
                    kwargs = dict(
                        entry=entry, prefix=prefix, batch=batch, sizes=sizes, device=device, new_tokens=new_tokens,
                        threads=threads, memory_cap=memory_cap, seed=seed,
                    )  # fmt: skip
                    record.update(
                        measure.run_fresh(throughput_point, kwargs, timeout=budget, start_method=start_method)
                    )
                    if record["status"] != "ok":
                        failed.setdefault(entry["name"], []).append((prefix, batch, record["status"]))
                points.append(record)
                log(
                    f"  throughput {entry['name']:22s} prefix={prefix:6d} batch={batch:3d} {record['status']:7s} "
                    + measure.outcome(
                        record,
                        lambda r: (
                            f"decode {r['decode_tokens_per_s']:.1f} tok/s ({r['decode_ms_per_step']:.1f} ms/step), "
                            f"prefill {r['prefill_s']:.2f} s"
                            + (f", cache {r['cache_mb']:.1f} MB" if r.get("cache_mb") is not None else "")
                        ),
                    )
                )
    return points


def is_subquadratic(entry: dict) -> bool:
    """A variant whose claimed training time grows slower than L^2 (`expected_slope.time` < 2)."""
    return (entry.get("expected_slope") or {}).get("time", 2.0) < 2.0


def summarise(entries: list[dict], points: list[dict], prefixes: list[int], batches: list[int]) -> dict:
    """Ratios of decode tokens/s to Llama's (dynamic cache) at every point, and the target of issue 23: every
    sub-quadratic variant of ours ahead of Llama at the longest prefix, at every batch size."""
    reference = specs.REFERENCE
    ok = {(p["name"], p["prefix"], p["batch"]): p for p in points if p["status"] == "ok"}
    ratios = {}
    for p in points:
        ref = ok.get((reference, p["prefix"], p["batch"]))
        if p["status"] == "ok" and ref and ref["decode_tokens_per_s"] and p["decode_tokens_per_s"]:
            ratio = round(p["decode_tokens_per_s"] / ref["decode_tokens_per_s"], 3)
            ratios.setdefault(p["name"], {})[f"{p['prefix']}x{p['batch']}"] = ratio
    longest = max(prefixes)
    target = {
        "prefix": longest,
        "batches": list(batches),
        "rule": f"decode tokens/s above Llama (dynamic cache) at prefix {longest}, every batch",
        "subquadratic": [],
        "missing": [],
    }
    for entry in entries:
        if entry.get("baseline") or not is_subquadratic(entry):
            continue
        target["subquadratic"].append(entry["name"])
        behind = {}
        for batch in batches:
            ratio = ratios.get(entry["name"], {}).get(f"{longest}x{batch}")
            if ratio is None:
                point = next(
                    (p for p in points if (p["name"], p["prefix"], p["batch"]) == (entry["name"], longest, batch)),
                    None,
                )
                behind[str(batch)] = point["status"] if point else "not measured"
            elif ratio <= 1.0:
                behind[str(batch)] = ratio
        if behind:
            target["missing"].append({"name": entry["name"], "behind_at_batch": behind})
    return {"ratio_vs_reference": ratios, "reference": reference, "target": target}
