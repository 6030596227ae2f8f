"""Decoding mode: per-token latency and cache size after a prefix, for every causal head beside Llama's KV cache.

Levels: `model` (the small causal LM: embeddings, every layer, the LM head) and `mixer` (the decode cost of the
token mixer alone: a one-layer base model fed `inputs_embeds`, its FFN replaced by zeros, so that what is timed is
the mixer's projections, its cached mixing op, norms and residuals; Llama's is one SDPA attention layer with its
KV cache). A block with no separable FFN (gMLP) has no mixer level.
"""

import statistics
import time

from . import measure, scaling, specs


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from a cache object (its layers' attributes, dicts, lists)."""
    import torch

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.dtype, tuple(obj.shape))
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "layers") and isinstance(obj.layers, (list, tuple)):
        return sum(tensor_bytes(layer, seen) for layer in obj.layers)
    if hasattr(obj, "__dict__") and not isinstance(obj, type):
        return sum(tensor_bytes(v, seen) for k, v in vars(obj).items() if not k.startswith("__"))
    return 0


def _cache_of(output):
    return _named_cache(output)[1]


def _named_cache(output) -> tuple[str, object]:
    """`(keyword, cache)`: the decoding state a forward returned and the keyword that hands it back to the next forward
    (`cache`; RWKV's is `state`); `("cache", None)` when there is none."""
    for name, keyword in (("cache", "cache"), ("past_key_values", "cache"), ("state", "state")):
        value = getattr(output, name, None)
        if value is not None:
            return keyword, value
    return "cache", None


def decode_point(
    entry: dict, prefix: int, sizes: dict, device: str, steps: int, warmup: int, budget: float, level: str = "model"
) -> dict:
    """Prefill `prefix` tokens, then time `steps` one-token forwards with the cache (median per token)."""
    import torch

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    total = prefix + steps + warmup
    if level == "mixer":
        config = specs.level_config(entry, "block", sizes, length=total + 1)
        model = specs.build_model(entry, config, "AutoModel")
        scaling.to_mixer(model, entry)
        model = model.to(device).eval()
        embeds = torch.randn(1, total, model.config.hidden_size, generator=generator).to(device)

        def inputs(start, stop):
            return {"inputs_embeds": embeds[:, start:stop]}

    else:
        config = specs.level_config(entry, "model", sizes, length=total + 1)
        model = specs.build_model(entry, config, entry["causal_head"]).to(device).eval()
        ids = torch.randint(3, config.get("vocab_size", 384), (1, total), generator=generator).to(device)

        def inputs(start, stop):
            return {"input_ids": ids[:, start:stop]}

    with torch.no_grad():
        start = time.perf_counter()
        out = model(**inputs(0, prefix), use_cache=True)
        measure.synchronize(device)
        prefill_s = time.perf_counter() - start
        keyword, cache = _named_cache(out)
        if cache is None:
            return {"status": "error", "error": "the model returned no cache"}
        cache_bytes = tensor_bytes(cache)
        times = []
        deadline = time.perf_counter() + budget
        for i in range(warmup + steps):
            token = inputs(prefix + i, prefix + i + 1)
            t = measure.time_call(lambda token=token: model(**token, **{keyword: cache}, use_cache=True), device)
            if i >= warmup:
                times.append(t)
            if time.perf_counter() > deadline and len(times) >= 1:
                break
        final_cache_mb = tensor_bytes(cache) / 2**20
    return {
        "status": "ok",
        "ms_per_token": round(1000 * statistics.median(times), 3),
        "ms_per_token_all": [round(1000 * t, 3) for t in times],
        "prefill_s": round(prefill_s, 3),
        "cache_mb": round(cache_bytes / 2**20, 3),
        "cache_bytes": cache_bytes,
        "cache_mb_after_steps": round(final_cache_mb, 3),
        "cache_type": type(cache).__name__,
        **scaling.dropout_record(model),
    }


def decoding_entries(entries: list[dict]) -> list[dict]:
    """The entries a decoding mode runs: every causal head of ours, and the baselines marked `decoding` (Llama, the
    sub-quadratic peers)."""
    return [e for e in entries if e.get("causal_head") and (not e.get("baseline") or e.get("decoding"))]


def run(entries, sizes, prefixes, device, steps, warmup, budget, levels=("model",), log=print) -> list[dict]:
    """Interleaved by prefix length; a series stops at its first failure or when one point exceeds the budget."""
    points, stopped = [], set()
    causal = decoding_entries(entries)
    series = [(entry, level) for level in levels for entry in causal]
    for prefix in prefixes:
        for entry, level in series:
            key = (entry["name"], level)
            if key in stopped:
                continue
            record = {"name": entry["name"], "model_type": entry["model_type"], "level": level, "prefix": prefix}
            if skipped := scaling.skipped_level(entry, level):
                record.update(skipped)
                points.append(record)
                stopped.add(key)
                continue
            start = time.perf_counter()
            try:
                record.update(decode_point(entry, prefix, sizes, device, steps, warmup, budget, level))
            except Exception as error:
                record.update(measure.failure(error))
            record["wall_s"] = round(time.perf_counter() - start, 2)
            if record["status"] == "ok" and record["wall_s"] > budget:
                record["note"] = "over budget: the series stops here"
                stopped.add(key)
            if record["status"] != "ok":
                stopped.add(key)
            points.append(record)
            log(
                f"  decode {level:5s} {entry['name']:18s} prefix={prefix:6d} {record['status']:6s} "
                + measure.outcome(record, lambda r: f"{r['ms_per_token']:.2f} ms/token, cache {r['cache_mb']:.2f} MB")
            )
    return points
