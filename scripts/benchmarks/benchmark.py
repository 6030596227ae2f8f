#!/usr/bin/env python3
"""Benchmarks of every registered architecture beside softmax attention (transformers' Llama with SDPA, GPT-2, ViT)
and the public peers: speed, memory, scaling, decoding, hardware efficiency, image throughput and quality.

    python scripts/benchmarks/benchmark.py all                 # the reference run (every mode, then the report)
    python scripts/benchmarks/benchmark.py all --quick         # minutes: fewer lengths, shorter training
    python scripts/benchmarks/benchmark.py scaling --only gmlp llama-sdpa --lengths 256 1024 4096
    python scripts/benchmarks/benchmark.py decode --decode-levels mixer --prefixes 1024 8192  # the mixer's step alone
    python scripts/benchmarks/benchmark.py throughput --batches 1 8 32 --throughput-prefixes 512 4096 --new-tokens 16
    python scripts/benchmarks/benchmark.py report --docs       # tables + plots from the JSON files, docs/benchmarks.md
    python scripts/benchmarks/benchmark.py report --check      # CI: fail when docs/benchmarks.md's tables differ
    python scripts/benchmarks/benchmark.py scaling --device cuda

Modes: `scaling` (fwd+bwd time and peak memory vs length at the block, token-mixer (FFN zeroed) and small-LM levels,
one fresh process per point, fitted log-log slopes, crossover length vs SDPA), `compile` (the small LM's training
step eager vs `model.compile()`: step time, compile time, graph breaks, peak memory), `decode` (per-token latency and
cache size after a prefix, of the small LM and of the token mixer alone), `throughput` (tokens/s of `generate()` at
batch 1, 8, 32 after prefixes of 512 and 4096 tokens, and the prefill time; Llama with its dynamic and its static
cache; the target "every sub-quadratic variant ahead of Llama at 4096" computed), `peers` (aft-pytorch, g-mlp-pytorch,
timm; ours / theirs), `hardware` (achieved FLOP/s of a training step / the measured matmul peak), `images` (images/s
of a training step and of inference, beside ViT), `quality` (bits-per-byte leaderboard), `recall` (multi-query
associative recall), `all`, `report`.

Which models: every architecture in `hf_efficient.ARCHITECTURES` with a `model_cards/benchmarks/<model_type>.json`
(see CONTRIBUTING.md, "Benchmark configs"); one without is listed as "no benchmark config", and a vision-only one is
skipped by the text modes with the reason recorded. Beside them: Llama (SDPA), GPT-2 and the peers users would pick
instead, transformers' Mamba2, Mamba, RWKV and RecurrentGemma at the same width, depth and vocabulary (their torch
paths; Mamba only where its CPU path is usable: decoding). Every model runs its config class's defaults, dropout
included, in training mode; where those have nonzero dropout the training modes (`scaling`, `compile`, `hardware`)
also measure a `<name>-dropout0` twin in the same run (`--dropout-zero off`: not). Results go to `benchmarks/results/<machine-tag>/<mode>.json`
(+ PNG plots, `summary.md`); every ratio is measured side by side in one run, and absolute times are only meaningful
with their machine (recorded in every file). The tables of the documentation's benchmark page, docs/benchmarks.md,
are generated from the results folder their start marker names (`report --docs`).
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import specs

SCHEMA = "hf-efficient-benchmark/1"
ROOT = specs.ROOT
MODES = ("scaling", "compile", "decode", "throughput", "peers", "hardware", "images", "quality", "recall")
DROPOUT_ZERO_MODES = ("scaling", "compile", "hardware")  # training steps: defaults beside a dropout-0 twin

# Per-profile defaults; every one can be overridden by a flag.
PROFILES = {
    "full": dict(
        sizes="default",
        lengths=[256, 512, 1024, 2048, 4096, 8192, 16384],
        levels=["block", "mixer", "model"],
        budget=240.0,
        repeats=3,
        time_target=12.0,
        batch=1,
        min_fit_length=2048,
        mmap_threshold_kb=0,
        compile_lengths=[2048],
        compile_backend="inductor",
        prefixes=[128, 512, 2048, 8192],
        decode_levels=["model", "mixer"],
        decode_steps=16,
        decode_warmup=2,
        decode_budget=120.0,
        throughput_prefixes=[512, 4096],
        batches=[1, 8, 32],
        new_tokens=16,
        throughput_budget=300.0,
        peer_lengths=[256, 1024],
        peer_batch=2,
        peer_repeats=5,
        # timm's model beside our preset of the same name, or "timm_name=preset" (Sparse-MLP-B vs timm's Mixer-B)
        timm_models=["gmlp_ti16_224", "gmlp_s16_224", "mixer_b16_224", "mixer_b16_224=sparse-mlp-b16-224"],
        timm_batch=4,
        hw_length=1024,
        hw_batch=2,
        matmul_sizes=[512, 1024, 2048, 4096],
        image_batch=8,
        context=1024,
        quality_steps=150,
        quality_batch=4,
        quality_lr=2e-3,
        train_bytes=16_000_000,
        validation_blocks=48,
        recall_lengths=[64, 256, 1024],
        recall_pairs=4,
        recall_steps=400,
        recall_tokens=2048,
        recall_lr=3e-3,
        recall_eval_batches=4,
    ),
}
PROFILES["quick"] = {
    **PROFILES["full"],
    "lengths": [256, 1024, 4096],
    "budget": 30.0,
    "repeats": 2,
    "time_target": 4.0,
    "min_fit_length": 1024,
    "prefixes": [128, 1024],
    "decode_steps": 6,
    "throughput_prefixes": [512, 2048],
    "batches": [1, 8],
    "new_tokens": 8,
    "throughput_budget": 120.0,
    "peer_lengths": [256],
    "peer_repeats": 3,
    "timm_models": ["gmlp_ti16_224"],
    "timm_batch": 2,
    "matmul_sizes": [1024, 2048],
    "hw_length": 512,
    "image_batch": 4,
    "quality_steps": 20,
    "quality_batch": 2,
    "train_bytes": 2_000_000,
    "validation_blocks": 8,
    "recall_lengths": [64, 256],
    "recall_steps": 30,
    "recall_tokens": 1024,
    "recall_eval_batches": 2,
}
PROFILES["tiny"] = {
    **PROFILES["quick"],
    "sizes": "tiny",
    "lengths": [32, 64],
    "budget": 60.0,
    "repeats": 1,
    "time_target": 1.0,
    "min_fit_length": 0,
    "compile_lengths": [32],
    "compile_backend": "aot_eager",  # the smoke test checks the plumbing; inductor's C++ build takes minutes here
    "mmap_threshold_kb": 128,  # exercise the pinned-allocator memory option in the smoke test
    "prefixes": [16, 32],
    "decode_steps": 2,
    "decode_warmup": 1,
    "throughput_prefixes": [16],
    "batches": [1, 2],
    "new_tokens": 3,
    "throughput_budget": 60.0,
    "peer_lengths": [32],
    "peer_repeats": 1,
    "timm_models": ["gmlp_ti16_224"],
    "timm_batch": 1,
    "hw_length": 32,
    "hw_batch": 1,
    "matmul_sizes": [128],
    "image_batch": 2,
    "context": 64,
    "quality_steps": 2,
    "quality_batch": 2,
    "train_bytes": 100_000,
    "validation_blocks": 2,
    "recall_lengths": [32],
    "recall_pairs": 2,
    "recall_steps": 2,
    "recall_tokens": 64,
    "recall_eval_batches": 1,
}


# ---------------------------------------------------------------------------------------------------------- machine
def machine_info(device: str) -> dict:
    import torch
    import transformers
    from bench_lib.measure import cpu_model

    cpu = cpu_model()
    try:
        import psutil

        memory_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        memory_gb = None
    info = {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") and torch.cuda.is_available() else None,
    }
    try:
        load = os.getloadavg()
        info["load_average_at_start"] = [round(x, 2) for x in load]
    except OSError:
        pass
    info["tag"] = machine_tag(info)
    return info


def machine_tag(info: dict) -> str:
    def slug(text):
        return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")

    if info["device"].startswith("cuda") and info.get("gpu"):
        return f"cuda-{slug(info['gpu'])}"
    return f"cpu-{slug(info['cpu_model'])}-{info['cores']}c"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


# -------------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=[*MODES, "all", "report"])
    profile = parser.add_mutually_exclusive_group()
    profile.add_argument("--quick", action="store_true", help="a few minutes per mode: fewer lengths, short training")
    profile.add_argument("--tiny", action="store_true", help="tiny sizes, seconds (the CI smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<machine-tag>[-quick])")
    parser.add_argument("--only", nargs="+", help="entry names or model types to run (baselines included by name)")
    parser.add_argument("--no-baselines", action="store_true", help="leave out Llama SDPA and GPT-2")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--memory-cap-gb", type=float, help="address-space cap per CPU point (default: 60%% of free RAM, <= 16)"
    )
    parser.add_argument("--start-method", choices=["fork", "spawn", "forkserver"], help="fresh-process start method")
    parser.add_argument("--timm-python", help="python with timm + torchvision (default: this one, if timm imports)")
    parser.add_argument(
        "--peer-groups",
        nargs="+",
        choices=["aft", "gmlp", "timm"],
        default=["aft", "gmlp", "timm"],
        help="peers: which pairs (aft-pytorch, g-mlp-pytorch, timm's vision models; default all)",
    )
    parser.add_argument(
        "--time-statistic",
        choices=["median", "min"],
        default="median",
        help="scaling, hardware: a point's time is the median of its timed runs, or the fastest (on a loaded machine)",
    )
    parser.add_argument(
        "--dropout-zero",
        choices=["auto", "off"],
        default="auto",
        help="training modes: also measure a dropout-0 twin of every entry whose defaults have dropout (default auto)",
    )
    parser.add_argument(
        "--docs", "--readme", action="store_true", help="report: also rewrite docs/benchmarks.md's generated sections"
    )
    parser.add_argument(
        "--check", action="store_true", help="report: exit 1 (with a diff) if docs/benchmarks.md's tables are stale"
    )
    parser.add_argument("--seed", type=int, default=0)
    for key, value in PROFILES["full"].items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            kind = type(value[0])
            parser.add_argument(flag, nargs="+", type=kind, dest=key, help=f"(full default: {value})")
        elif isinstance(value, (int, float)):
            parser.add_argument(flag, type=type(value), dest=key, help=f"(full default: {value})")
        else:
            parser.add_argument(flag, dest=key, help=f"(full default: {value})")
    args = parser.parse_args(argv)
    args.profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    for key, value in PROFILES[args.profile].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and args.start_method in (None, "fork"):
        args.start_method = "spawn"  # CUDA cannot be initialised in a forked child
    args.start_method = args.start_method or "fork"
    return args


def check_device(device: str) -> None:
    """Stop once, before any point runs, when `--device` is not a device this machine has (every point would fail
    on its own otherwise): `cpu`, or `cuda` / `cuda:N` with a CUDA GPU that torch sees."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise SystemExit(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise SystemExit(
            f"--device {device!r}: CUDA is not available here ({why}; torch {torch.__version__}); run on a machine "
            "with a CUDA GPU and a CUDA build of torch, or use --device cpu"
        )
    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def default_out(args, machine: dict) -> Path:
    suffix = "" if args.profile == "full" else f"-{args.profile}"
    return ROOT / "benchmarks" / "results" / f"{machine['tag']}{suffix}"


ENTRY_FIELDS = ("name", "label", "model_type", "baseline", "complexity", "expected_slope", "fixed_length")
OPTIONAL_ENTRY_FIELDS = ("peer", "dropout", "dropout_zero_of", "dropout_zeroed", "generate")  # where an entry has them


def write_result(args, machine, mode: str, payload: dict, started: float, entries, skipped) -> Path:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:  # how loaded the machine was while the mode ran (other jobs share the cores)
        machine = {**machine, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    except OSError:
        pass
    data = {
        "schema": SCHEMA,
        "mode": mode,
        "profile": args.profile,
        "command": "python scripts/benchmarks/benchmark.py " + " ".join(sys.argv[1:]),
        "started": datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
        "elapsed_s": round(time.time() - started, 1),
        "git_commit": git_commit(),
        "machine": machine,
        "reference": specs.REFERENCE,
        "entries": [
            {k: e.get(k) for k in (*ENTRY_FIELDS, *OPTIONAL_ENTRY_FIELDS) if k in e or k in ENTRY_FIELDS}
            for e in entries
        ],
        "skipped": skipped,
        **payload,
    }
    path = out / f"{mode}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def run_mode(args, mode: str) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info(args.device)
    args.out = args.out or default_out(args, machine)
    sizes = specs.SIZES[args.sizes]
    entries, skipped = specs.discover(include_baselines=not args.no_baselines, names=args.only)
    entries, mode_skipped = specs.split_for_mode(entries, mode)
    skipped = skipped + mode_skipped
    if mode in DROPOUT_ZERO_MODES:
        entries = specs.with_dropout_zero(entries, sizes)
        if args.dropout_zero == "off":
            entries = [e for e in entries if not e.get("dropout_zero_of")]
    elif mode == "throughput":
        from bench_lib import throughput

        entries = throughput.throughput_entries(entries)
    from bench_lib import measure

    memory_cap = int(args.memory_cap_gb * 2**30) if args.memory_cap_gb else measure.default_memory_cap()
    started = time.time()
    print(f"== {mode} ({args.profile}) on {machine['tag']}: {', '.join(e['name'] for e in entries)}")
    for s in skipped:
        print(f"  skipped {s.get('name') or s['model_type']}: {s['reason']}")

    if mode == "scaling":
        from bench_lib import scaling

        points = scaling.run(
            entries, sizes, args.lengths, args.levels, args.device, args.budget, args.repeats, args.time_target,
            args.batch, memory_cap if not args.device.startswith("cuda") else None, args.start_method, args.threads,
            mmap_threshold_kb=args.mmap_threshold_kb, statistic=args.time_statistic,
        )  # fmt: skip
        payload = {
            "settings": {
                k: getattr(args, k)
                for k in (
                    "lengths",
                    "levels",
                    "budget",
                    "repeats",
                    "time_target",
                    "batch",
                    "min_fit_length",
                    "mmap_threshold_kb",
                )  # fmt: skip
            }
            | {"sizes": sizes, "memory_cap_bytes": memory_cap}
            | ({"time_statistic": args.time_statistic} if args.time_statistic != "median" else {})
            | ({"dropout_zero": args.dropout_zero}),
            "results": points,
            "summary": scaling.summarise(entries, points, args.levels, args.min_fit_length),
        }
    elif mode == "compile":
        from bench_lib import scaling

        points = scaling.compile_run(
            entries, sizes, args.compile_lengths, args.device, args.budget, args.repeats, args.time_target,
            args.batch, memory_cap if not args.device.startswith("cuda") else None, args.start_method, args.threads,
            backend=args.compile_backend,
        )  # fmt: skip
        payload = {
            "settings": {"lengths": args.compile_lengths, "repeats": args.repeats, "batch": args.batch}
            | {"backend": args.compile_backend}
            | {"sizes": sizes["model"], "memory_cap_bytes": memory_cap},
            "results": points,
        }
    else:
        if not args.device.startswith("cuda"):
            measure.cap_address_space(memory_cap)
        if mode == "throughput":
            from bench_lib import throughput

            points = throughput.run(
                entries, sizes, args.throughput_prefixes, args.batches, args.device, args.new_tokens,
                args.throughput_budget, memory_cap if not args.device.startswith("cuda") else None, args.start_method,
                args.threads, seed=args.seed,
            )  # fmt: skip
            payload = {
                "settings": {
                    "prefixes": args.throughput_prefixes,
                    "batches": args.batches,
                    "new_tokens": args.new_tokens,
                    "budget": args.throughput_budget,
                    "seed": args.seed,
                    "sizes": sizes["model"],
                    "memory_cap_bytes": memory_cap,
                },
                "results": points,
                "summary": throughput.summarise(entries, points, args.throughput_prefixes, args.batches),
            }
        elif mode == "decode":
            from bench_lib import decode

            points = decode.run(
                entries, sizes, args.prefixes, args.device, args.decode_steps, args.decode_warmup, args.decode_budget,
                args.decode_levels,
            )  # fmt: skip
            payload = {
                "settings": {
                    "prefixes": args.prefixes,
                    "levels": args.decode_levels,
                    "steps": args.decode_steps,
                    "warmup": args.decode_warmup,
                    "sizes": sizes["model"],
                },
                "results": points,
            }
        elif mode == "peers":
            from bench_lib import peers

            rows = peers.run(
                sizes, args.peer_lengths, args.peer_batch, args.device, args.peer_repeats, args.timm_python,
                args.timm_models, args.timm_batch, args.threads, groups=args.peer_groups,
            )  # fmt: skip
            payload = {
                "settings": {
                    "lengths": args.peer_lengths,
                    "batch": args.peer_batch,
                    "repeats": args.peer_repeats,
                    "sizes": sizes["model"],
                },
                "results": rows,
            }
        elif mode == "hardware":
            from bench_lib import hardware

            peak, rows = hardware.run(
                entries,
                sizes,
                args.hw_length,
                args.hw_batch,
                args.device,
                args.repeats,
                args.time_target,
                args.matmul_sizes,
                statistic=args.time_statistic,
            )
            payload = {
                "settings": {
                    "length": args.hw_length,
                    "batch": args.hw_batch,
                    "sizes": sizes["model"],
                    "time_statistic": args.time_statistic,
                    "dropout_zero": args.dropout_zero,
                },
                "matmul_peak": peak,
                "results": rows,
            }
        elif mode == "images":
            from bench_lib import images

            rows = images.run(entries, sizes, args.image_batch, args.device, args.repeats, args.time_target)
            payload = {
                "settings": {"batch": args.image_batch, "repeats": args.repeats, "sizes": sizes["image"]},
                "results": rows,
            }
        elif mode == "quality":
            from bench_lib import quality

            rows = quality.leaderboard(
                [e for e in entries if not e.get("baseline") or e["name"] == specs.REFERENCE], sizes, args.context,
                args.quality_steps, args.quality_batch, args.quality_lr, args.train_bytes, args.validation_blocks,
                args.device, args.seed,
            )  # fmt: skip
            payload = {
                "settings": {
                    "context": args.context, "steps": args.quality_steps, "batch": args.quality_batch, "lr": args.quality_lr,
                    "train_bytes": args.train_bytes, "validation_blocks": args.validation_blocks, "seed": args.seed,
                    "sizes": sizes["quality"],
                },
                "results": rows,
            }  # fmt: skip
        elif mode == "recall":
            from bench_lib import quality

            rows = quality.recall(
                [e for e in entries if not e.get("baseline") or e["name"] == specs.REFERENCE], sizes, args.recall_lengths,
                args.recall_pairs, args.recall_steps, args.recall_tokens, args.recall_lr, args.device, args.seed,
                args.recall_eval_batches,
            )  # fmt: skip
            payload = {
                "settings": {
                    "lengths": args.recall_lengths, "num_pairs": args.recall_pairs, "steps": args.recall_steps,
                    "tokens_per_step": args.recall_tokens, "lr": args.recall_lr, "seed": args.seed, "sizes": sizes["recall"],
                },
                "results": rows,
            }  # fmt: skip
        else:
            raise ValueError(mode)
    write_result(args, machine, mode, payload, started, entries, skipped)


def run_report(args) -> None:
    """Summaries and plots of the results folders (`--out`, else every folder a section of the benchmark page names);
    with `--docs` the page's generated sections are rewritten, with `--check` only compared (exit 1 on a
    difference)."""
    from bench_lib import report

    readme = ROOT / report.DOCS_PAGE
    if args.check:
        diff = report.check_readme(readme, ROOT)
        if diff:
            sys.stdout.write(diff)
            raise SystemExit(
                f"{report.DOCS_PAGE}: the benchmark tables differ from what the committed results generate; run "
                "`python scripts/benchmarks/benchmark.py report --docs` (and commit) to regenerate them."
            )
        print(f"{report.DOCS_PAGE}: {len(report.sections(readme.read_text()))} benchmark sections match their results")
        return
    folders = [args.out] if args.out else [ROOT / s["folder"] for s in report.sections(readme.read_text())]
    for folder in dict.fromkeys(folders):
        results = report.load(folder)
        if not results:
            raise SystemExit(f"no results in {folder}")
        report.plots(folder, results)
        (folder / "summary.md").write_text(report.markdown(folder, results) + "\n")
        print(f"wrote {folder / 'summary.md'}")
    if args.docs:
        changed = report.update_readme(readme, ROOT)
        print(f"updated {report.DOCS_PAGE}" if changed else f"{report.DOCS_PAGE} already up to date")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.mode == "report":
        run_report(args)
        return
    check_device(args.device)
    if args.mode == "all":
        # Each mode in its own fresh process (the scaling workers fork from a parent that has run no torch op).
        rest = [a for a in argv if a != "all"]
        for mode in MODES:
            code = subprocess.run([sys.executable, __file__, mode, *rest]).returncode
            if code != 0:
                print(f"mode {mode} failed with exit code {code}", file=sys.stderr)
        subprocess.run([sys.executable, __file__, "report", *rest], check=True)
    else:
        run_mode(args, args.mode)


if __name__ == "__main__":
    main()
