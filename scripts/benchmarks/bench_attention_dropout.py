"""Attention dropout without the `L x L` matrix (issue 23): training cost of R-Transformer with its default attention
dropout (0.1) against the same model with `attention_dropout=0`, beside transformers' Llama (sdpa) of the same size.

    python scripts/benchmarks/bench_attention_dropout.py            # 4096 and 16384 tokens, writes the results
    python scripts/benchmarks/bench_attention_dropout.py --lengths 4096 --repeats 3

Model: 2 layers, width 256, 4 heads, FFN 1024, the R-Transformer defaults otherwise (`attn_implementation="sdpa"`),
causal LM, one sequence, training mode, forward + backward. Every point runs in a fresh subprocess: peak memory is
that process's RSS high-water mark (`ru_maxrss`) minus its RSS after building the model and inputs; time is the
fastest of `--repeats` forward + backward steps after one warm-up, with `--threads` torch threads. Variants:

- `default`: R-Transformer as configured (attention dropout 0.1): what the package runs.
- `dropout0`: R-Transformer with `attention_dropout=0` (SDPA's fused CPU kernel).
- `sdpa_math`: the default, with the sdpa entry forced to transformers' own (SDPA's CPU math path with dropout, the
  `L x L` probabilities): the cost before the blocked attention.
- `llama`: `LlamaForCausalLM`, sdpa, same width / depth / heads / FFN (its attention dropout is 0).

Writes `benchmarks/attention_dropout/results.json` and `results.md`.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "benchmarks" / "attention_dropout"
VARIANTS = ("default", "dropout0", "sdpa_math", "llama")
SIZE = {"hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 1024}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(variant: str, length: int, repeats: int, threads: int) -> dict:
    """One point, in this process (called in a fresh subprocess by `main`)."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    integrated = False
    if variant == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=384, max_position_embeddings=length, attn_implementation="sdpa", **SIZE)
        model = LlamaForCausalLM(config)
    else:
        from hf_efficient.models.r_transformer import RTransformerConfig, RTransformerForCausalLM

        extra = {"attention_dropout": 0.0} if variant == "dropout0" else {}
        config = RTransformerConfig(attn_implementation="sdpa", **SIZE, **extra)
        model = RTransformerForCausalLM(config)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from hf_efficient.models.r_transformer import modeling_r_transformer
        from hf_efficient.models.shared import blocked_attention

        integrated = hasattr(modeling_r_transformer, "attention_interface")
        if variant == "sdpa_math" and integrated:
            # whatever the model selects for sdpa, use transformers' entry (SDPA's math path under dropout)
            modeling_r_transformer.attention_interface = lambda implementation, query, dropout: sdpa_attention_forward
        elif variant == "default" and not integrated:
            # the model does not select the blocked attention yet: route its sdpa calls through the selection
            def selected(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
                chosen = blocked_attention.attention_interface("sdpa", query, dropout)
                chosen = sdpa_attention_forward if chosen is selected else chosen
                return chosen(module, query, key, value, attention_mask, dropout=dropout, **kwargs)

            ALL_ATTENTION_FUNCTIONS["sdpa"] = selected
    model.train()
    input_ids = torch.randint(2, config.vocab_size, (1, length))
    base = _rss_mb()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=input_ids, labels=input_ids).loss.backward()

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "variant": variant,
        "length": length,
        "attention_dropout": getattr(config, "attention_dropout", 0.0),
        "time_s": min(times),
        "peak_mb": peak - base,
        "threads": threads,
        "selection": "in the model"
        if variant != "llama" and integrated
        else ("patched" if variant == "default" else ""),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point; a slower point is skipped")
    parser.add_argument("--point", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        print(json.dumps(measure(args.point[0], int(args.point[1]), args.repeats, args.threads)))
        return
    results = []
    for length in args.lengths:
        for variant in args.variants:
            command = [sys.executable, __file__, "--point", variant, str(length)]
            command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
            env = {"OMP_NUM_THREADS": str(args.threads), "PATH": "/usr/bin:/bin"}
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                row = {"variant": variant, "length": length, "skipped": f"over {args.timeout:.0f} s"}
            else:
                if done.returncode:
                    raise RuntimeError(f"{variant} at {length}: {done.stderr[-2000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
            print(json.dumps(row), flush=True)
            results.append(row)
    OUT.mkdir(parents=True, exist_ok=True)
    # merge with earlier runs: a point (variant, length, threads) measured again replaces its old row
    path = OUT / "results.json"
    old = json.loads(path.read_text()) if path.exists() else []
    new = {(r["variant"], r["length"], args.threads) for r in results}
    for r in results:
        r.setdefault("threads", args.threads)
    results = [r for r in old if (r["variant"], r["length"], r.get("threads")) not in new] + results
    results.sort(key=lambda r: (r.get("threads", 0), r["length"], VARIANTS.index(r["variant"])))
    path.write_text(json.dumps(results, indent=2) + "\n")
    (OUT / "results.md").write_text(markdown(results))


def markdown(results: list[dict]) -> str:
    lines = [
        "# Attention dropout without the L x L matrix",
        "",
        "R-Transformer causal LM (2 layers, width 256, 4 heads, FFN 1024, sdpa), one sequence, training forward +",
        "backward on CPU; peak = RSS high-water mark above the built model, time = fastest step. Ratios are against",
        "the same model with `attention_dropout=0`. Written by `scripts/benchmarks/bench_attention_dropout.py`.",
        "",
        "| threads | tokens | variant | attention dropout | peak MB | time s | memory / dropout0 | time / dropout0 |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    reference = {(r["length"], r["threads"]): r for r in results if r["variant"] == "dropout0" and "time_s" in r}
    for r in results:
        if "time_s" not in r:
            lines.append(f"| {r['threads']} | {r['length']} | {r['variant']} | | | {r['skipped']} | | |")
            continue
        ref = reference.get((r["length"], r["threads"]))
        mem = f"{r['peak_mb'] / ref['peak_mb']:.2f}x" if ref else ""
        tim = f"{r['time_s'] / ref['time_s']:.2f}x" if ref else ""
        row = f"| {r['threads']} | {r['length']} | {r['variant']} | {r['attention_dropout']} | {r['peak_mb']:.0f} | {r['time_s']:.2f}"
        lines.append(f"{row} | {mem} | {tim} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
