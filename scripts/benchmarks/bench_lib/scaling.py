"""Scaling mode: forward+backward time and peak memory vs sequence length, one fresh process per point."""

import math
import time

from . import measure, specs


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def strip_ffn(model, path: str) -> None:
    """Replace the FFN submodule at `path` (in the base model) by a module returning zeros: what remains of the
    block is the token mixer, its norms and residuals."""
    import torch

    class Zero(torch.nn.Module):
        def forward(self, hidden_states, *args, **kwargs):
            return torch.zeros_like(hidden_states)

    root = getattr(model, "base_model", model)
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, Zero())


def has_mixer_level(entry: dict) -> bool:
    """Whether the FFN part can be removed from a block (gMLP's block is one gated MLP: it cannot), or the block has
    no FFN at all (`mixer_is_block`: Mamba's block is norm + mixer + residual)."""
    if entry.get("mixer_is_block"):
        return True
    path = entry.get("ffn_module")
    return bool(path) and path.count(".") >= 2


def to_mixer(model, entry: dict) -> None:
    """The token-mixer level of a block model: its FFN replaced by zeros (nothing to remove when the block has none)."""
    if not entry.get("mixer_is_block"):
        strip_ffn(model, entry["ffn_module"])


def dropout_record(model) -> dict:
    """What a result row records of the dropout it ran with (the config's dropout fields and the module mode), and
    the machine's load average when the point ended."""
    import os

    record = {"dropout": specs.dropout_of(model.config), "training": bool(model.training)}
    try:
        record["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return record


def skipped_level(entry: dict, level: str) -> dict | None:
    """A point's status and reason when `level` does not apply to the entry (the token-mixer level of a block
    without a separable FFN), else None."""
    if level in entry.get("skip_levels", {}):
        return {"status": "skipped", "reason": entry["skip_levels"][level]}
    if level == "mixer" and not has_mixer_level(entry):
        return {"status": "skipped", "reason": "no separable FFN (the block is one unit)"}
    return None


def make_step(model, level: str, batch: int, length: int, device: str, seed: int = 0):
    """A closure running one forward + backward of `model` on random inputs of `batch x length`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    config = model.config
    extra = {"use_cache": False} if _accepts(model.forward, "use_cache") else {}
    if level in ("block", "mixer"):
        embeds = torch.randn(batch, length, config.hidden_size, generator=generator).to(device).requires_grad_(True)

        def step():
            out = model(inputs_embeds=embeds, **extra)
            hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
            hidden.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
            embeds.grad = None

    else:
        ids = torch.randint(3, config.vocab_size, (batch, length), generator=generator).to(device)

        def step():
            out = model(input_ids=ids, labels=ids, **extra)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

    return step


def scaling_point(
    entry: dict,
    level: str,
    length: int,
    sizes: dict,
    device: str = "cpu",
    batch: int = 1,
    repeats: int = 3,
    time_target: float = 20.0,
    threads: int | None = None,
    memory_cap: int | None = None,
    seed: int = 0,
    mmap_threshold_kb: int = 0,
    compile_model: bool = False,
    backend: str = "inductor",
    statistic: str = "median",
) -> dict:
    """Worker (fresh process): build one model, measure fwd+bwd time (median) and peak memory at `length`.

    With `compile_model`, the model is compiled in place first (`model.compile(backend=backend)`, otherwise
    torch.compile's defaults) and the first, compiling step is timed apart (`compile_s`)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if not device.startswith("cuda"):
        measure.cap_address_space(memory_cap)
        pinned = measure.pin_mmap_threshold(mmap_threshold_kb)
    else:
        pinned = False
    torch.manual_seed(seed)
    build_start = time.perf_counter()
    config_level = "block" if level == "mixer" else level
    config = specs.level_config(entry, config_level, sizes, length=length)
    model = specs.build_model(entry, config, specs.model_head(entry, config_level))
    if level == "mixer":
        to_mixer(model, entry)
    model = model.to(device)
    model.train()
    step = make_step(model, level, batch, length, device, seed)
    build_s = time.perf_counter() - build_start
    compiled = {}
    if compile_model:
        compiled = _compile(model, step, device, backend)
    memory = measure.PeakMemory(device)
    memory.start()
    try:
        timing = measure.timed_repeats(step, device, repeats, time_target, statistic=statistic)
        peak = memory.peak()
    finally:
        memory.stop()
    return {
        "status": "ok",
        **compiled,
        **timing,
        "peak_memory_mb": round(peak / 2**20, 2),
        "memory_method": memory.method + (f", glibc mmap threshold {mmap_threshold_kb} KiB" if pinned else ""),
        "parameters": specs.count_parameters(model),
        "build_s": round(build_s, 3),
        "threads": torch.get_num_threads(),
        **dropout_record(model),
    }


def _compile(model, step, device: str, backend: str = "inductor") -> dict:
    """Compile `model` in place and run the first (compiling) step; returns its time and dynamo's graph breaks."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model.compile(backend=backend)
    compile_s = measure.time_call(step, device)
    breaks = counters["graph_break"]
    return {
        "compile_s": round(compile_s, 2),
        "graph_breaks": sum(breaks.values()),
        "graph_break_reasons": sorted({reason.split("\n")[0][:160] for reason in breaks})[:5],
    }


def compile_run(
    entries: list[dict],
    sizes: dict,
    lengths: list[int],
    device: str,
    budget: float,
    repeats: int,
    time_target: float,
    batch: int,
    memory_cap: int | None,
    start_method: str,
    threads: int | None,
    log=print,
    backend: str = "inductor",
) -> list[dict]:
    """Eager vs `model.compile()` training steps (forward + backward of the small LM) per entry and length, each in a
    fresh process, eager and compiled one after the other. A compiled point's time limit is `budget` plus ten
    minutes for the compilation (inductor builds C++ on a CPU)."""
    points = []
    for length in lengths:
        for entry in entries:
            for mode in ("eager", "compiled"):
                record = {"name": entry["name"], "model_type": entry["model_type"], "length": length, "mode": mode}
                kwargs = dict(
                    entry=entry, level="model", length=length, sizes=sizes, device=device, batch=batch,
                    repeats=repeats, time_target=time_target, threads=threads, memory_cap=memory_cap,
                    compile_model=mode == "compiled", backend=backend,
                )  # fmt: skip
                timeout = budget + (600 if mode == "compiled" else 0)
                record.update(measure.run_fresh(scaling_point, kwargs, timeout=timeout, start_method=start_method))
                points.append(record)
                log(
                    f"  compile {entry['name']:18s} L={length:6d} {mode:8s} {record['status']:7s} "
                    + measure.outcome(
                        record,
                        lambda r: (
                            f"{r['time_s']:.3f} s  {r['peak_memory_mb']:.0f} MB"
                            + (
                                f"  (compile {r['compile_s']:.0f} s, {r['graph_breaks']} graph breaks)"
                                if r["mode"] == "compiled"
                                else ""
                            )
                        ),
                    )
                )
    return points


def fit_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of log(value) against log(length)."""
    points = [(x, y) for x, y in points if x > 0 and y and y > 0]
    if len(points) < 2:
        return None
    xs = [math.log(x) for x, _ in points]
    ys = [math.log(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def run(
    entries: list[dict],
    sizes: dict,
    lengths: list[int],
    levels: list[str],
    device: str,
    budget: float,
    repeats: int,
    time_target: float,
    batch: int,
    memory_cap: int | None,
    start_method: str,
    threads: int | None,
    log=print,
    mmap_threshold_kb: int = 0,
    statistic: str = "median",
) -> list[dict]:
    """Every (entry, level) series over `lengths`, interleaved by length so that the ratios at one length are
    measured side by side in time. A series stops at its first timeout / OOM / error (recorded)."""
    series = [(entry, level) for level in levels for entry in entries]
    stopped: dict[tuple, str] = {}
    points: list[dict] = []
    for length in lengths:
        for entry, level in series:
            key = (entry["name"], level)
            if key in stopped:
                continue
            record = {"name": entry["name"], "model_type": entry["model_type"], "level": level, "length": length}
            if skipped := skipped_level(entry, level):
                record.update(skipped)
                points.append(record)
                stopped[key] = "skipped"
                continue
            previous = [p for p in points if (p["name"], p["level"]) == key and p["status"] == "ok"]
            predicted = None
            if len(previous) >= 2:
                (l1, t1), (l2, t2) = [(p["length"], p["time_s"]) for p in previous[-2:]]
                slope = max(1.0, math.log(t2 / t1) / math.log(l2 / l1)) if t1 > 0 and t2 > 0 else 2.0
                predicted = t2 * (length / l2) ** slope
            if predicted is not None and predicted > 2 * budget:
                record.update(
                    status="timeout",
                    predicted=True,
                    error=f"predicted {predicted:.0f} s for one step (> 2x the {budget:.0f} s budget): not run",
                )
            else:
                kwargs = dict(
                    entry=entry,
                    level=level,
                    length=length,
                    sizes=sizes,
                    device=device,
                    batch=batch,
                    repeats=repeats,
                    time_target=min(time_target, budget * 0.4),
                    threads=threads,
                    memory_cap=memory_cap,
                    mmap_threshold_kb=mmap_threshold_kb,
                    statistic=statistic,
                )
                record.update(measure.run_fresh(scaling_point, kwargs, timeout=budget, start_method=start_method))
            points.append(record)
            if record["status"] != "ok":
                stopped[key] = record["status"]
            log(
                f"  scaling {level:5s} {entry['name']:18s} L={length:6d} {record['status']:7s} "
                + measure.outcome(record, lambda r: f"{r['time_s']:.3f} s  {r['peak_memory_mb']:.0f} MB")
            )
    return points


def crossover(pairs: list[tuple[int, float, float]]) -> dict | None:
    """From `(length, ours, reference)` triples: the length from which ours is lower at every longer measured length
    (log-log interpolated between the bracketing lengths), or None when ours is not lower at the longest one."""
    pairs = sorted((n, a, b) for n, a, b in pairs if a and b and a > 0 and b > 0)
    if not pairs or pairs[-1][1] >= pairs[-1][2]:
        return None
    index = len(pairs) - 1
    while index > 0 and pairs[index - 1][1] < pairs[index - 1][2]:
        index -= 1
    if index == 0:
        return {"length": pairs[0][0], "note": f"lower already at the shortest measured length {pairs[0][0]}"}
    (n0, a0, b0), (n1, a1, b1) = pairs[index - 1], pairs[index]
    r0, r1 = math.log(a0 / b0), math.log(a1 / b1)  # the log ratio crosses 0 between n0 and n1
    x = math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1)
    return {"length": round(math.exp(x)), "note": f"between {n0} and {n1}"}


def reference_of(reference: str | dict, level: str) -> str:
    """The reference series at `level` (`reference` is one name, or a dict level -> name)."""
    return reference.get(level, specs.REFERENCE) if isinstance(reference, dict) else reference


def summarise(
    entries: list[dict], points: list[dict], levels: list[str], min_fit_length: int, reference=specs.REFERENCE
) -> list[dict]:
    """Per series: fitted log-log slopes (long lengths and last pair), expected slopes, ratios vs the reference
    and the crossover lengths (from which the series is faster / smaller than the reference)."""
    ok = {(p["name"], p["level"], p["length"]): p for p in points if p["status"] == "ok"}
    rows = []
    for level in levels:
        ref_name = reference_of(reference, level)
        for entry in entries:
            series = [p for p in points if p["name"] == entry["name"] and p["level"] == level]
            if not series or all(p["status"] == "skipped" for p in series):
                continue
            good = [p for p in series if p["status"] == "ok"]
            fit = [p for p in good if p["length"] >= min_fit_length]
            if len(fit) < 2:
                fit = good[-3:]
            row = {
                "name": entry["name"],
                "label": entry["label"],
                "model_type": entry["model_type"],
                "level": level,
                "complexity": entry.get("complexity"),
                "expected_slope": entry.get("expected_slope", {}),
                "max_ok_length": good[-1]["length"] if good else None,
                "stopped": next(
                    (
                        {"length": p["length"], "status": p["status"], "reason": p.get("error")}
                        for p in series
                        if p["status"] != "ok"
                    ),
                    None,
                ),
                "fit_lengths": [p["length"] for p in fit],
            }
            if "dropout" in entry:
                row["dropout"] = entry["dropout"]
                row["dropout_zero_of"] = entry.get("dropout_zero_of")
                row["dropout_zeroed"] = entry.get("dropout_zeroed")
            for metric, field in (("time", "time_s"), ("memory", "peak_memory_mb")):
                row[f"{metric}_slope"] = _round(fit_slope([(p["length"], p[field]) for p in fit]))
                row[f"{metric}_slope_last_pair"] = _round(fit_slope([(p["length"], p[field]) for p in good[-2:]]))
            ratios, pairs = {}, {"time": [], "memory": []}
            for p in good:
                ref = ok.get((ref_name, level, p["length"]))
                if ref is None:
                    continue
                pairs["time"].append((p["length"], p["time_s"], ref["time_s"]))
                pairs["memory"].append((p["length"], p["peak_memory_mb"], ref["peak_memory_mb"]))
                ratios[str(p["length"])] = {
                    "time": _round(p["time_s"] / ref["time_s"], 3) if ref["time_s"] else None,
                    "memory": _round(p["peak_memory_mb"] / ref["peak_memory_mb"], 3)
                    if ref["peak_memory_mb"]
                    else None,
                }
            row["ratio_vs_reference"] = ratios
            row["reference"] = ref_name
            if entry["name"] != ref_name:
                row["crossover_time"] = crossover(pairs["time"])
                row["crossover_memory"] = crossover(pairs["memory"])
            rows.append(row)
    return rows


def _round(value, digits: int = 2):
    return None if value is None else round(value, digits)
