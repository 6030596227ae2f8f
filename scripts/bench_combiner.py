"""Combiner benchmark: forward+backward time and peak memory vs length beside transformers' Llama of the same size
with `attn_implementation="sdpa"`, fitted log-log slopes, the crossover length, and the decode cost per step at a
1k vs an 8k prefix.

    python scripts/bench_combiner.py            # full run: lengths 1k..16k, ~15 min on 2 CPU cores
    python scripts/bench_combiner.py --quick    # smoke run: lengths 256..2k, ~2 min
    python scripts/bench_combiner.py --device cuda

Every (model, length) point runs in a fresh process, so its peak memory is its own: on CPU the peak resident-set
growth during the measured steps (the kernel's high-water mark, reset after the model and inputs exist), on CUDA
`torch.cuda.max_memory_allocated()` above the level before the steps. Time is the best of up to `--repeats`
forward+backward passes (batch 1, causal LM loss) after one warm-up pass (the median is kept in the JSON too; the
best run is the least disturbed one on a shared machine). Results go to `--out` (default
`benchmarks/combiner/results.json`) and as markdown tables to the same path with `.md`.

Both models have the same width, depth, heads and FFN size and a causal LM head over the same vocabulary;
Combiner's block size is `round(sqrt(L))` (the paper's s ~ sqrt(L)) unless `--block-size` is given.
"""

import argparse
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMBINER_TYPES = ("fixed", "logsparse", "axial", "mixture")


# ----------------------------------------------------------------------------------------------------------------------
# measurement primitives
# ----------------------------------------------------------------------------------------------------------------------
def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above the level at `start()`: CUDA allocator peak, or CPU peak RSS (VmHWM reset, else 2 ms
    sampling)."""

    def __init__(self, device: str):
        self.device = device

    def start(self):
        import torch

        self.thread = None
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.method = "torch.cuda.max_memory_allocated delta"
            return
        self.base = _rss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "peak RSS delta (VmHWM reset), fresh process"
            return
        except OSError:
            pass
        self.method = "peak RSS delta (2 ms sampling), fresh process"
        self.sampled, self.stop_event = self.base, threading.Event()

        def sample():
            while not self.stop_event.is_set():
                self.sampled = max(self.sampled, _rss())
                time.sleep(0.002)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()

    def peak(self) -> int:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self.base)
        if self.thread is not None:
            self.stop_event.set()
            self.thread.join()
            return max(0, max(self.sampled, _rss()) - self.base)
        return max(0, (_hwm() or _rss()) - self.base)


def _sync(device):
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _run_in_fresh_process(target, kwargs, timeout):
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def wrapper():
        try:
            result = target(**kwargs)
        except Exception as error:  # reported, not raised: the table shows which point failed and why
            text = f"{type(error).__name__}: {str(error)[:300]}"
            result = {"status": "oom" if "memory" in text.lower() else "error", "error": text}
        child.send(result)
        child.close()

    process = ctx.Process(target=wrapper, daemon=True)
    start = time.perf_counter()
    process.start()
    child.close()
    result = parent.recv() if parent.poll(timeout) else None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    if result is None:
        result = {
            "status": "timeout" if time.perf_counter() - start >= timeout * 0.99 else "error",
            "error": f"no result (exit code {process.exitcode})",
        }
    return result


# ----------------------------------------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------------------------------------
def build_model(name: str, length: int, sizes: dict, block_size: int | None):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_efficient  # noqa: F401
    from hf_efficient.models.combiner import CombinerConfig, CombinerForCausalLM

    torch.manual_seed(0)
    if name == "llama-sdpa":
        config = LlamaConfig(
            vocab_size=sizes["vocab_size"],
            hidden_size=sizes["hidden_size"],
            num_hidden_layers=sizes["num_hidden_layers"],
            num_attention_heads=sizes["num_heads"],
            num_key_value_heads=sizes["num_heads"],
            intermediate_size=sizes["intermediate_size"],
            max_position_embeddings=length,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM._from_config(config, attn_implementation="sdpa")
    config = CombinerConfig(
        vocab_size=sizes["vocab_size"],
        hidden_size=sizes["hidden_size"],
        num_hidden_layers=sizes["num_hidden_layers"],
        num_attention_heads=sizes["num_heads"],
        intermediate_size=sizes["intermediate_size"],
        max_position_embeddings=length,
        combiner_type=name,
        block_size=block_size,
    )
    return CombinerForCausalLM(config)


def _exact_cpu_memory_accounting() -> None:
    """Make glibc return every freed block of 128 KiB or more to the OS (a fixed mmap threshold, no dynamic raise),
    so the resident set follows the live tensors and its peak is the step's real peak."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def train_point(name, length, sizes, block_size, device, repeats, time_target, threads):
    import torch

    torch.set_num_threads(threads)
    if device == "cpu":
        _exact_cpu_memory_accounting()
    model = build_model(name, length, sizes, block_size).to(device).train()
    ids = torch.randint(3, sizes["vocab_size"], (1, length), device=device)

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    # Warm up once (allocator, kernels), free the gradients, then measure.
    start = time.perf_counter()
    step()
    _sync(device)
    warm = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    memory = PeakMemory(device)
    memory.start()
    times = []
    for _ in range(max(1, min(repeats, int(time_target // max(warm, 1e-9))))):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {
        "status": "ok",
        "time_s": min(times),  # best of N: the least disturbed run on a shared machine
        "median_time_s": statistics.median(times),
        "times_s": times,
        "warmup_s": warm,
        "peak_memory_bytes": memory.peak(),
        "memory_method": memory.method,
        "block_size": getattr(model.config, "block_size", None),
    }


def decode_point(name, prefixes, steps, sizes, block_size, device, threads):
    """Per-token decode cost after each prefix: prefill with a cache, then `steps` single-token forwards."""
    import torch

    torch.set_num_threads(threads)
    model = build_model(name, max(prefixes) + steps, sizes, block_size).to(device).eval()
    out = {"status": "ok", "block_size": getattr(model.config, "block_size", None), "prefixes": {}}
    for prefix in prefixes:
        ids = torch.randint(3, sizes["vocab_size"], (1, prefix + steps), device=device)
        with torch.no_grad():
            result = model(input_ids=ids[:, :prefix], use_cache=True)
            cache = getattr(result, "cache", None) or getattr(result, "past_key_values", None)
            times = []
            for t in range(prefix, prefix + steps):
                start = time.perf_counter()
                if name == "llama-sdpa":
                    result = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                    cache = result.past_key_values
                else:
                    result = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
                    cache = result.cache
                _sync(device)
                times.append(time.perf_counter() - start)
        state_bytes = None
        if name != "llama-sdpa":
            state_bytes = sum(t.numel() * t.element_size() for t in cache.get_states(0).values())
        entries = [attended_entries(name, t, model.config) for t in range(prefix, prefix + steps)]
        out["prefixes"][str(prefix)] = {
            "median_ms": 1000 * statistics.median(times),
            "mean_ms": 1000 * statistics.fmean(times),
            "attended_per_step": round(statistics.fmean(entries)),
            "state_bytes_layer0": state_bytes,
        }
    return out


def attention_decode_point(name, prefixes, steps, sizes, block_size, device, threads):
    """The attention op alone, per new token: Combiner's `combiner_step` against its state after the prefix, or
    SDPA of one query against a KV cache of the prefix (appending the new key/value as a DynamicCache does)."""
    import functools

    import torch
    import torch.nn.functional as F

    from hf_efficient.models.combiner.ops_combiner import (
        axial_abstraction_keys,
        combiner_prefill_state,
        combiner_step,
    )

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    heads, width = sizes["num_heads"], sizes["hidden_size"]
    dim = width // heads
    out = {"status": "ok", "prefixes": {}}
    for prefix in prefixes:
        s = block_size or max(1, round(math.sqrt(max(prefixes) + steps)))
        q, k, v = (torch.randn(1, heads, prefix + steps, dim, device=device) for _ in range(3))
        x = torch.randn(1, prefix + steps, width, device=device)
        options = dict(combiner_type=name, block_size=s)
        if name == "axial":
            weights = [torch.randn(width, width, device=device) * width**-0.5 for _ in range(2)]
            options["abstraction_key_fn"] = functools.partial(
                axial_abstraction_keys,
                out_weight=weights[0],
                norm_weight=torch.ones(width, device=device),
                norm_bias=torch.zeros(width, device=device),
                key_weight=weights[1],
                norm_eps=1e-6,
            )
        times = []
        with torch.no_grad():
            if name == "llama-sdpa":
                keys, values = k[:, :, :prefix], v[:, :, :prefix]
            else:
                state = combiner_prefill_state(
                    q[:, :, :prefix],
                    k[:, :, :prefix],
                    v[:, :, :prefix],
                    torch.tensor([prefix], device=device),
                    hidden_states=x[:, :prefix],
                    **options,
                )
            for t in range(prefix, prefix + steps):
                start = time.perf_counter()
                if name == "llama-sdpa":
                    keys = torch.cat([keys, k[:, :, t : t + 1]], dim=2)
                    values = torch.cat([values, v[:, :, t : t + 1]], dim=2)
                    F.scaled_dot_product_attention(q[:, :, t : t + 1], keys, values)
                else:
                    _, state = combiner_step(
                        q[:, :, t], k[:, :, t], v[:, :, t], state, hidden_states=x[:, t], **options
                    )
                _sync(device)
                times.append(time.perf_counter() - start)
        out["prefixes"][str(prefix)] = {"median_ms": 1000 * statistics.median(times), "block_size": s}
    return out


def attended_entries(name: str, prefix: int, config) -> int:
    """Keys / abstractions a new token attends to per head and layer (the per-step cost, up to constants)."""
    s = getattr(config, "block_size", None)
    if name == "llama-sdpa":
        return prefix + 1
    if name == "logsparse":
        return 1 + bin(prefix).count("1")
    rows = prefix // s
    if name == "fixed":
        return prefix % s + 1 + rows
    if name == "axial":
        return prefix % s + 1 + rows
    return (prefix % s + 1) + rows + (s - 1) + 2 * rows  # mixture: row prefix, column, column spans, row spans


# ----------------------------------------------------------------------------------------------------------------------
# analysis
# ----------------------------------------------------------------------------------------------------------------------
def loglog_slope(lengths, values):
    points = [(math.log(n), math.log(v)) for n, v in zip(lengths, values) if v and v > 0]
    if len(points) < 2:
        return None
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    num = sum((x - mean_x) * (y - mean_y) for x, y in points)
    den = sum((x - mean_x) ** 2 for x, _ in points)
    return num / den


def crossover(lengths, ours, baseline):
    """The length from which `ours` is faster at every longer measured length (log-log interpolated between the
    bracketing points), or None."""
    pairs = [(n, a, b) for n, a, b in zip(lengths, ours, baseline) if a and b]
    if not pairs or pairs[-1][1] >= pairs[-1][2]:
        return None
    index = len(pairs) - 1
    while index > 0 and pairs[index - 1][1] < pairs[index - 1][2]:
        index -= 1
    if index == 0:
        return {"length": pairs[0][0], "note": f"faster already at the shortest measured length {pairs[0][0]}"}
    (n0, a0, b0), (n1, a1, b1) = pairs[index - 1], pairs[index]
    r0, r1 = math.log(a0 / b0), math.log(a1 / b1)  # ratio crosses 0 between n0 and n1
    x = math.log(n0) + (math.log(n1) - math.log(n0)) * r0 / (r0 - r1)
    return {"length": round(math.exp(x)), "note": f"between {n0} and {n1}"}


def machine(threads: int) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    cores = os.cpu_count()
    return f"CPU {model or platform.machine()} ({cores} cores, shared), {threads} torch thread(s), torch {torch.__version__}"


def markdown(results: dict) -> str:
    lengths, names, sizes = results["lengths"], results["models"], results["sizes"]
    lines = [
        f"Machine: {results['machine']}. Batch 1, forward+backward of a causal LM (d={sizes['hidden_size']}, "
        f"{sizes['num_hidden_layers']} layers, {sizes['num_heads']} heads, FFN {sizes['intermediate_size']}, vocab "
        f"{sizes['vocab_size']}); Combiner block size {results.get('block_size_rule', 'round(sqrt(L))')}. "
        f"Memory: {results.get('memory_method', '')}, glibc mmap threshold fixed at 128 KiB so freed "
        "blocks leave the resident set.",
        "",
    ]
    for title, key, scale, unit, slope_key in (
        ("Time per forward+backward", "time_s", 1.0, "s", "time"),
        ("Peak memory of forward+backward", "peak_memory_bytes", 2**20, "MiB", "memory"),
    ):
        lines += [
            f"**{title}**",
            "",
            "| model | " + " | ".join(f"L={n}" for n in lengths) + " | slope (all) | slope (last 3) |",
            "|---|" + "---|" * (len(lengths) + 2),
        ]
        for name in names:
            cells = []
            for n in lengths:
                point = results["train"][name][str(n)]
                ok = point.get("status") == "ok"
                cells.append(f"{point[key] / scale:.2f} {unit}" if ok else point.get("status", "-"))
            slopes = [results["slopes"][name][slope_key], results["slopes"][name][f"{slope_key}_long"]]
            slope_cells = " | ".join(f"{x:.2f}" if x is not None else "-" for x in slopes)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {slope_cells} |")
        lines.append("")
    lines += ["**Crossover** (Combiner faster than Llama-SDPA from this length on; from the best-of-N times):", ""]
    for name, value in results["crossover"].items():
        found = f"~{value['length']} ({value['note']})" if value else "not within the measured lengths"
        lines.append(f"- {name}: {found}")
    if results.get("decode"):
        prefixes = results["decode_prefixes"]
        lines += [
            "",
            f"**Decode cost per new token** (median of {results['decode_steps']} single-token steps after the prefix; "
            "entries = keys or abstractions a new token attends to, per head and layer)",
            "",
            "| model | " + " | ".join(f"prefix {p}" for p in prefixes) + " | time ratio |",
            "|---|" + "---|" * (len(prefixes) + 1),
        ]
        for name, point in results["decode"].items():
            if point.get("status") != "ok":
                lines.append(f"| {name} | {point.get('status')}: {point.get('error', '')} |")
                continue
            per = [point["prefixes"][str(p)] for p in prefixes]
            cells = [f"{x['median_ms']:.2f} ms ({x['attended_per_step']} entries)" for x in per]
            lines.append(
                f"| {name} | " + " | ".join(cells) + f" | {per[-1]['median_ms'] / per[0]['median_ms']:.2f}x |"
            )
    if results.get("attention_decode"):
        prefixes = results["decode_prefixes"]
        lines += [
            "",
            "**Attention op alone, per new token** (one layer: `combiner_step` against the state after the prefix, "
            "or SDPA of one query against the prefix's KV cache plus the cache append)",
            "",
            "| model | " + " | ".join(f"prefix {p}" for p in prefixes) + " | time ratio |",
            "|---|" + "---|" * (len(prefixes) + 1),
        ]
        for name, point in results["attention_decode"].items():
            if point.get("status") != "ok":
                lines.append(f"| {name} | {point.get('status')}: {point.get('error', '')} |")
                continue
            per = [point["prefixes"][str(p)]["median_ms"] for p in prefixes]
            cells = [f"{x:.3f} ms" for x in per]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {per[-1] / per[0]:.2f}x |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short lengths and prefixes (smoke run)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--types", nargs="+", default=list(COMBINER_TYPES), choices=COMBINER_TYPES)
    parser.add_argument("--block-size", type=int, default=None, help="default: round(sqrt(L))")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--time-target", type=float, default=15.0, help="seconds of timed repeats per point")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per point before it is killed")
    parser.add_argument("--decode-prefixes", type=int, nargs="+", default=None)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--no-decode", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: 1 on CPU: on a shared machine OpenMP barriers stall multi-threaded runs)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "combiner" / "results.json")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else (os.cpu_count() or 1)

    lengths = args.lengths or ([256, 512, 1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384])
    prefixes = args.decode_prefixes or ([256, 1024] if args.quick else [1024, 8192])
    sizes = dict(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_heads=args.heads,
        intermediate_size=args.ffn,
        vocab_size=args.vocab,
    )
    names = ["llama-sdpa", *args.types]
    results = {
        "machine": machine(args.threads),
        "device": args.device,
        "block_size_rule": args.block_size or "round(sqrt(L))",
        "sizes": sizes,
        "lengths": lengths,
        "models": names,
        "train": {name: {} for name in names},
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    started = time.perf_counter()
    for length in lengths:
        for name in names:
            point = _run_in_fresh_process(
                train_point,
                dict(
                    name=name,
                    length=length,
                    sizes=sizes,
                    block_size=args.block_size,
                    device=args.device,
                    repeats=args.repeats,
                    time_target=args.time_target,
                    threads=args.threads,
                ),
                args.timeout,
            )
            results["train"][name][str(length)] = point
            results.setdefault("memory_method", point.get("memory_method"))
            shown = (
                f"{point['time_s']:.2f} s, {point['peak_memory_bytes'] / 2**20:.0f} MiB"
                if point.get("status") == "ok"
                else f"{point.get('status')}: {point.get('error')}"
            )
            print(f"[{time.perf_counter() - started:6.0f} s] train {name:>10} L={length:>6}: {shown}", flush=True)

    results["slopes"], results["crossover"] = {}, {}
    for name in names:
        points = [results["train"][name][str(n)] for n in lengths]
        ok = [(n, p) for n, p in zip(lengths, points) if p.get("status") == "ok"]
        long = ok[-3:]  # the long-length regime, where the attention term dominates
        results["slopes"][name] = {
            "time": loglog_slope([n for n, _ in ok], [p["time_s"] for _, p in ok]),
            "memory": loglog_slope([n for n, _ in ok], [p["peak_memory_bytes"] for _, p in ok]),
            "fitted_over": [n for n, _ in ok],
            "time_long": loglog_slope([n for n, _ in long], [p["time_s"] for _, p in long]),
            "memory_long": loglog_slope([n for n, _ in long], [p["peak_memory_bytes"] for _, p in long]),
            "long_fitted_over": [n for n, _ in long],
        }
    baseline = [results["train"]["llama-sdpa"][str(n)].get("time_s") for n in lengths]
    for name in args.types:
        ours = [results["train"][name][str(n)].get("time_s") for n in lengths]
        results["crossover"][name] = crossover(lengths, ours, baseline)

    if not args.no_decode:
        results["decode_prefixes"], results["decode_steps"], results["decode"] = prefixes, args.decode_steps, {}
        for name in names:
            point = _run_in_fresh_process(
                decode_point,
                dict(
                    name=name,
                    prefixes=prefixes,
                    steps=args.decode_steps,
                    sizes=sizes,
                    block_size=args.block_size,
                    device=args.device,
                    threads=args.threads,
                ),
                args.timeout * 2,
            )
            results["decode"][name] = point
            shown = (
                ", ".join(f"prefix {p}: {v['median_ms']:.2f} ms" for p, v in point["prefixes"].items())
                if point.get("status") == "ok"
                else f"{point.get('status')}: {point.get('error')}"
            )
            print(f"[{time.perf_counter() - started:6.0f} s] decode {name:>10}: {shown}", flush=True)

        results["attention_decode"] = {}
        for name in names:
            point = _run_in_fresh_process(
                attention_decode_point,
                dict(
                    name=name,
                    prefixes=prefixes,
                    steps=4 * args.decode_steps,
                    sizes=sizes,
                    block_size=args.block_size,
                    device=args.device,
                    threads=args.threads,
                ),
                args.timeout,
            )
            results["attention_decode"][name] = point
            shown = (
                ", ".join(f"prefix {p}: {v['median_ms']:.3f} ms" for p, v in point["prefixes"].items())
                if point.get("status") == "ok"
                else f"{point.get('status')}: {point.get('error')}"
            )
            print(f"[{time.perf_counter() - started:6.0f} s] attention-only decode {name:>10}: {shown}", flush=True)

    results["total_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} in {results['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
