"""Benchmark of the Attention Free Transformer: speed and memory against softmax attention, and decoding cost.

Measured, never asserted (see tests/ for correctness):

1. Training, one token mixer (Q/K/V/output projections + the mixing op), forward + backward, causal, batch 1,
   width 256, at several sequence lengths: AFT-full (factorised bias, d' = 64), AFT-local (s = 32), AFT-simple,
   AFT-conv (8 heads, kernel 15), beside a same-width causal softmax-attention block
   (`scaled_dot_product_attention(is_causal=True)`, 4 heads of 64).
2. Training, whole language models of the same size (2 layers, d = 256, FFN 1024): `AFTForCausalLM` of each
   variant beside transformers' `LlamaForCausalLM` (SwiGLU FFN 688 ~ the same parameters) with
   `attn_implementation="sdpa"`.
3. Decoding: per-token latency of one cached step after a prefix of 256 and of 8192 tokens, and the cache size
   (AFT-simple/local/conv must not grow with the prefix; AFT-full and Llama's KV cache do).
4. Peers: the PyPI package `aft-pytorch` (bidirectional only) against our bidirectional ops, same width and input.

Every point runs in a fresh forked worker: peak memory is the worker's resident-set high-water mark over the
measured step minus its size before the step (reset through /proc/self/clear_refs; on CUDA
`torch.cuda.max_memory_allocated`). Time is the median of the timed steps after one untimed step. A point that
fails (out of memory, time limit) ends its series: longer inputs are skipped with the reason recorded.

    python scripts/bench_aft.py            # full run, about 10-15 minutes on one CPU core
    python scripts/bench_aft.py --quick    # smoke run (short sequences), under a minute

Writes `benchmarks/aft/results.json` and `benchmarks/aft/results.md` (the table that goes into the README).
"""

import argparse
import json
import multiprocessing as mp
import platform
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WIDTH = 256
FFN = 1024
LAYERS = 2
ATTN_HEADS = 4
CONV_HEADS = 8
CONV_KERNEL = 15
LOCAL_WINDOW = 32
BIAS_DIM = 64
VOCAB = 384


# ----------------------------------------------------------------------------------------------- models
def aft_config(aft_type, length, **overrides):
    from hf_efficient.models.aft import AFTConfig

    return AFTConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        aft_type=aft_type,
        local_window=LOCAL_WINDOW,
        position_bias_dim=BIAS_DIM,
        num_heads=CONV_HEADS,
        conv_kernel_size=CONV_KERNEL,
        max_position_embeddings=max(length, 16),
        **overrides,
    )


def build_mixer(name, length, causal):
    """(module, forward(module, x)) of one token mixer of width WIDTH."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    if name.startswith("aft-pytorch-"):
        import aft_pytorch

        kind = name.removeprefix("aft-pytorch-")
        if kind == "local":
            module = aft_pytorch.AFTLocal(length, WIDTH, WIDTH, s=LOCAL_WINDOW)
        else:
            module = {"full": aft_pytorch.AFTFull, "simple": aft_pytorch.AFTSimple}[kind](length, WIDTH, WIDTH)
        return module, lambda m, x: m(x)
    if name == "sdpa-block":

        class AttentionBlock(nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
                self.out = nn.Linear(WIDTH, WIDTH)

            def forward(self, x):
                b, n, _ = x.shape
                q, k, v = self.qkv(x).view(b, n, 3, ATTN_HEADS, WIDTH // ATTN_HEADS).permute(2, 0, 3, 1, 4)
                y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                return self.out(y.transpose(1, 2).reshape(b, n, WIDTH))

        return AttentionBlock(), lambda m, x: m(x)
    from hf_efficient.models.aft.modeling_aft import AFTLayer

    layer = AFTLayer(aft_config(name.removeprefix("aft-"), length))
    with torch.no_grad():
        for param in layer.parameters():  # the paper's small position-bias init; conv kernel gamma = 0.5
            param.normal_(0, 0.02 if param.dim() > 1 else 0.5)
    zero = torch.zeros(1, dtype=torch.long)
    return layer, lambda m, x: m(x, causal=causal, start=zero.to(x.device))[0]


def build_lm(name, length):
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name == "llama-sdpa":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=WIDTH,
            intermediate_size=688,
            num_hidden_layers=LAYERS,
            num_attention_heads=ATTN_HEADS,
            num_key_value_heads=ATTN_HEADS,
            max_position_embeddings=max(length, 16),
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        assert model.config._attn_implementation == "sdpa"
        return model
    from hf_efficient.models.aft import AFTForCausalLM

    return AFTForCausalLM(aft_config(name.removeprefix("aft-").removesuffix("-lm"), length))


# ----------------------------------------------------------------------------------------------- memory
def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


class PeakMemory:
    """Peak extra memory of a block of work (CPU: resident-set high-water mark; CUDA: allocator peak)."""

    def __init__(self, device):
        self.device = device
        self.peak = None

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.before = _status_bytes("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.before
        else:
            self.peak = _status_bytes("VmHWM") - self.before
        return False


# ----------------------------------------------------------------------------------------------- workers
def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _cap_memory(cap_gb, device):
    if device != "cpu" or not cap_gb:
        return
    size = _status_bytes("VmSize") or 0
    limit = size + int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def train_point(spec):
    """Forward + backward of a mixer or a whole LM: median time of the timed steps, peak memory of one step."""
    import torch

    torch.manual_seed(0)
    device, length = spec["device"], spec["length"]
    causal = spec.get("causal", True)
    if spec["mode"] == "lm":
        model = build_lm(spec["name"], length).to(device).train()
        ids = torch.randint(3, VOCAB, (1, length), device=device)

        def step():
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    else:
        model, forward = build_mixer(spec["name"], length, causal)
        model = model.to(device).train()
        x = torch.randn(1, length, WIDTH, device=device, requires_grad=True)

        def step():
            forward(model, x).square().mean().backward()

    _cap_memory(spec["cap_gb"], device)
    with PeakMemory(device) as memory:  # the first (untimed) step
        step()
        _sync(device)
    times = []
    for _ in range(spec["repeats"]):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"time_ms": 1e3 * statistics.median(times), "peak_mb": memory.peak / 2**20}


def _tensor_bytes(cache):
    import torch

    total, seen = 0, set()
    layers = getattr(cache, "layers", [])
    for layer in layers:
        tensors = list(getattr(layer, "states", {}).values())
        tensors += [t for t in vars(layer).values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def decode_point(spec):
    """Prefill `length` tokens, then the median latency of one cached single-token step."""
    import torch

    torch.manual_seed(0)
    device, prefix, steps = spec["device"], spec["length"], spec["steps"]
    model = build_lm(spec["name"], prefix + steps + 8).to(device).eval()
    ids = torch.randint(3, VOCAB, (1, prefix + steps + 2), device=device)
    _cap_memory(spec["cap_gb"], device)
    times = []
    with torch.no_grad():
        out = model(input_ids=ids[:, :prefix], use_cache=True)
        cache = out.cache
        for i in range(steps + 2):
            start = time.perf_counter()
            out = model(input_ids=ids[:, prefix + i : prefix + i + 1], cache=cache, use_cache=True)
            _sync(device)
            times.append(time.perf_counter() - start)
            cache = out.cache
    return {"time_ms": 1e3 * statistics.median(times[2:]), "cache_mb": _tensor_bytes(cache) / 2**20}


def _worker(spec, queue):
    try:
        import torch

        torch.set_num_threads(spec["threads"])
        result = (decode_point if spec["mode"] == "decode" else train_point)(spec)
        queue.put({"ok": True, **result})
    except BaseException as error:  # report every failure (OOM included) to the parent
        text = f"{type(error).__name__}: {error}"
        oom = isinstance(error, MemoryError) or "allocate" in text.lower() or "out of memory" in text.lower()
        queue.put({"ok": False, "error": "out of memory" if oom else text.splitlines()[0][:200]})
        if not oom:
            traceback.print_exc()


def run_point(context, spec, timeout):
    queue = context.Queue()
    process = context.Process(target=_worker, args=(spec, queue))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join()
        return {"ok": False, "error": f"time limit ({timeout} s)"}
    if queue.empty():
        return {"ok": False, "error": f"worker died (exit code {process.exitcode})"}
    return queue.get()


# ----------------------------------------------------------------------------------------------- plan
def plan(quick):
    long = [256, 1024] if quick else [1024, 4096, 16384]
    full = [256, 1024] if quick else [1024, 4096]  # AFT-full: an (L, L) bias per layer
    prefixes = [64, 512] if quick else [256, 8192]
    series = []
    for name in ("aft-full", "aft-local", "aft-simple", "aft-conv", "sdpa-block"):
        series.append(("mixer", name, full if name == "aft-full" else long, True))
    for name in ("aft-full-lm", "aft-local-lm", "aft-simple-lm", "aft-conv-lm", "llama-sdpa"):
        series.append(("lm", name, full if name == "aft-full-lm" else long, True))
    peers = [256] if quick else [256, 1024, 4096]
    for kind in ("full", "simple", "local"):
        lengths = peers[:2] if kind == "local" else peers  # aft-pytorch's local rebuilds w with an O(L^2) loop
        series.append(("peer", f"aft-{kind}", lengths, False))
        series.append(("peer", f"aft-pytorch-{kind}", lengths, False))
    for name in ("aft-simple-lm", "aft-local-lm", "aft-conv-lm", "aft-full-lm", "llama-sdpa"):
        series.append(("decode", name, prefixes, True))
    return series


def environment(device, threads):
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device == "cuda":
        cpu = torch.cuda.get_device_name()
    try:
        import aft_pytorch  # noqa: F401

        peer = "installed"
    except ImportError:
        peer = "not installed"
    return {
        "device": device,
        "hardware": cpu,
        "threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "aft_pytorch": peer,
        "python": platform.python_version(),
    }


# ----------------------------------------------------------------------------------------------- report
def _fmt_time(point):
    if point is None:
        return "-"
    return f"{point['time_ms']:.1f} ms" if point["ok"] else point["error"]


def _fmt_mem(point, key="peak_mb"):
    if point is None or not point["ok"]:
        return "-"
    return f"{point[key]:.0f} MB" if point[key] >= 10 else f"{point[key]:.2f} MB"


def markdown(results):
    env = results["environment"]
    points = results["points"]

    def lookup(mode, name, length):
        return next((p for p in points if (p["mode"], p["name"], p["length"]) == (mode, name, length)), None)

    def lengths(mode):
        return sorted({p["length"] for p in points if p["mode"] == mode})

    def names(mode):
        return list(dict.fromkeys(p["name"] for p in points if p["mode"] == mode))

    def k(n):
        return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)

    lines = [
        f"Machine: {env['hardware']} ({env['device']}, {env['threads']} threads), torch {env['torch']}, "
        f"transformers {env['transformers']}. Batch 1, width {WIDTH}, float32; forward + backward; "
        "peak memory = extra resident memory of one step.",
        "",
    ]
    for mode, title in (
        ("mixer", f"One causal token mixer (projections + mixing), vs a same-width SDPA block ({ATTN_HEADS} heads)"),
        ("lm", f"Whole causal LM ({LAYERS} layers, d {WIDTH}, FFN {FFN}) vs transformers' Llama (sdpa)"),
    ):
        ls = lengths(mode)
        lines += [f"**{title}**", ""]
        lines.append("| model | " + " | ".join(f"time {k(n)} | memory {k(n)}" for n in ls) + " |")
        lines.append("|---|" + "---|---|" * len(ls))
        for name in names(mode):
            cells = []
            for n in ls:
                p = lookup(mode, name, n)
                cells += [_fmt_time(p), _fmt_mem(p)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    ls = lengths("decode")
    lines += [
        f"**Decoding: one cached token after a prefix of {' / '.join(map(str, ls))} tokens ({LAYERS}-layer LMs)**",
        "",
        "| model | " + " | ".join(f"latency @{n} | cache @{n}" for n in ls) + " |",
        "|---|" + "---|---|" * len(ls),
    ]
    for name in names("decode"):
        cells = []
        for n in ls:
            p = lookup("decode", name, n)
            cells += [_fmt_time(p), _fmt_mem(p, "cache_mb")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    ls = lengths("peer")
    lines += [
        "**Peers: bidirectional mixer, ours vs the PyPI package `aft-pytorch` (forward + backward)**",
        "",
        "| variant | " + " | ".join(f"ours {k(n)} | aft-pytorch {k(n)}" for n in ls) + " |",
        "|---|" + "---|---|" * len(ls),
    ]
    for kind in ("full", "simple", "local"):
        cells = []
        for n in ls:
            cells += [_fmt_time(lookup("peer", f"aft-{kind}", n)), _fmt_time(lookup("peer", f"aft-pytorch-{kind}", n))]
        lines.append(f"| AFT-{kind} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short sequences only (smoke run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per worker (default: 1 on CPU, where OpenMP threads on shared cores make timings "
        "unstable; torch's default on CUDA)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per point before it is abandoned")
    parser.add_argument("--memory-cap-gb", type=float, default=8.0, help="CPU address-space cap per point")
    parser.add_argument("--output-dir", default=str(ROOT / "benchmarks" / "aft"))
    parser.add_argument("--only", nargs="*", default=None, help="run only these modes (mixer lm peer decode)")
    args = parser.parse_args(argv)

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads is None:
        args.threads = 1 if device == "cpu" else torch.get_num_threads()
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["torch", "transformers", "hf_efficient"])
    results = {"environment": environment(device, args.threads), "points": []}
    started = time.time()
    for mode, name, lengths, causal in plan(args.quick):
        if args.only and mode not in args.only:
            continue
        if name.startswith("aft-pytorch") and results["environment"]["aft_pytorch"] != "installed":
            for n in lengths:
                results["points"].append(
                    {"mode": mode, "name": name, "length": n, "ok": False, "error": "not installed"}
                )
            continue
        stop_reason = None
        for n in lengths:
            point = {"mode": mode, "name": name, "length": n}
            if stop_reason:
                results["points"].append(
                    {**point, "ok": False, "error": f"skipped ({stop_reason} at a shorter length)"}
                )
                continue
            spec = {
                **point,
                "causal": causal,
                "device": device,
                "threads": args.threads,
                "cap_gb": args.memory_cap_gb,
                "repeats": 3 if n <= 4096 else 1,
                "steps": 8 if args.quick else 24,
            }
            tic = time.time()
            result = run_point(context, spec, args.timeout)
            results["points"].append({**point, **result})
            shown = result.get("time_ms")
            print(
                f"[{time.time() - started:6.0f}s] {mode:6s} {name:22s} {n:6d}: "
                + (f"{shown:9.1f} ms" if result["ok"] else result["error"])
                + f"  ({time.time() - tic:.0f}s)",
                flush=True,
            )
            if not result["ok"]:
                stop_reason = result["error"]
    results["environment"]["wall_s"] = round(time.time() - started)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (out / f"results{suffix}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
