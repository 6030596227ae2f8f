"""The Pareto of the causal LMs: validation bits per byte against training time, one thread, at context 1024 and
4096.

Every causal variant of the package (AFT x4, Combiner x4, gMLP, aMLP, R-Transformer GRU and LSTM, N-gram decoder
N = 8 and full; the benchmark's entries) beside Llama-SDPA and transformers' Mamba2 (its torch path on CPU), at the
same width, depth, heads and FFN size (about equal parameters; gMLP's L x L spatial weights grow with the context,
by design). One run per model and context, one seed, a fixed wall-clock budget: the number of steps is set from the
time of a few calibration steps of a throwaway copy (so the learning-rate schedule, the benchmark's warm-up then
cosine decay, ends with the budget), and the validation bits per byte are logged every `eval_every_tokens` (the
evaluation time is not counted as training time). Both budgets come from the same run: equal wall-clock (the end of
each run) and equal tokens (the largest logged count every model reached). The Pareto front (no other point both
faster and lower) is named per context. No paper claim: no verdict.
"""

import time

from bench_lib import quality

from . import tasks
from .runner import Run, seed_everything

NAME = "pareto"
TITLE = "Pareto of the causal LMs: validation bits per byte vs training time (one thread)"
PAPER = "all the package's papers, side by side (no single claim)"
VERSION = 1
METRICS = {
    "lm": [
        ("final_bpb", "validation bits/byte at the end (equal wall-clock)"),
        ("tokens", "tokens trained"),
        ("train_s", "train s (evaluation excluded)"),
        ("parameters", "parameters"),
    ]
}


def arms() -> list[str]:
    return tasks.causal_entries()


ARM_LABELS = {name: tasks.entry(name)["label"] for name in arms()}


def settings(quick: bool) -> dict:
    if quick:
        sizes = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64, vocab_size=384)
        pareto = dict(
            contexts=[32, 64],
            budget_s=0.4,
            calibration_steps=1,
            tokens_per_step=128,
            eval_every_tokens=256,
            validation_tokens=128,
            lr=1e-3,
            train_bytes=100_000,
        )
    else:
        sizes = dict(hidden_size=256, num_hidden_layers=4, num_heads=4, intermediate_size=1024, vocab_size=384)
        pareto = dict(
            contexts=[1024, 4096],
            # 22 minutes: the fastest models (N-gram N=8, AFT-conv, Combiner-Fixed / Axial: 3.4-3.6 s per step of
            # 8192 tokens on one EPYC core) reach the 3M tokens; 10 minutes would give them ~1.4M
            budget_s=1320,
            calibration_steps=3,
            tokens_per_step=8192,
            eval_every_tokens=262_144,
            validation_tokens=16_384,
            lr=1e-3,
            train_bytes=32_000_000,
        )
    description = (
        f"byte LM, d {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, contexts {pareto['contexts']}, "
        f"{pareto['budget_s']:g} s of one thread per model and context"
    )
    return {"description": description, "sizes": sizes, "pareto": pareto}


def runs(setting: dict, seeds) -> list[Run]:
    """One seed (the first): the Pareto is a single run per model and context."""
    config = {"sizes": setting["sizes"], "pareto": setting["pareto"]}
    return [
        Run(NAME, arm, list(seeds)[0], task="lm", context=context, config=config)
        for context in setting["pareto"]["contexts"]
        for arm in arms()
    ]


def make_model(run: Run):
    return tasks.build(run.arm, run.config["sizes"], length=run.context)


def _data(run: Run):
    setting = run.config["pareto"]
    batch = max(1, setting["tokens_per_step"] // run.context)
    blocks = max(1, setting["validation_tokens"] // run.context)
    train_ids, val_blocks = tasks.corpus(run.context, setting["train_bytes"], blocks)
    return batch, train_ids, val_blocks


def execute(run: Run) -> dict:
    setting = run.config["pareto"]
    batch, train_ids, val_blocks = _data(run)
    tokens_per_step = batch * run.context
    # Calibration on a throwaway copy and its own data stream: the run's steps fill the wall-clock budget.
    calibration = quality.lm_batches(train_ids, run.context, batch, run.seed + 1000)
    per_step = tasks.seconds_per_step(
        lambda: make_model(run), calibration, setting["lr"], setting["calibration_steps"]
    )
    steps = max(2, int(setting["budget_s"] / per_step))
    seed_everything(run.seed)
    model = make_model(run)
    every = max(1, setting["eval_every_tokens"] // tokens_per_step)
    log = {"curve": [], "eval_s": 0.0, "calls": 0}
    start = time.perf_counter()

    def evaluate(_message=None):  # the training loop's log hook: every `every` steps
        log["calls"] += 1
        begin = time.perf_counter()
        bpb = quality.evaluate_bpb(model, val_blocks, tasks.DEVICE)
        model.train()
        log["curve"].append(
            {
                "tokens": log["calls"] * every * tokens_per_step,
                "train_s": round(begin - start - log["eval_s"], 2),
                "validation_bpb": round(bpb, 5),
            }
        )
        log["eval_s"] += time.perf_counter() - begin

    result = tasks.fit(
        model, quality.lm_batches(train_ids, run.context, batch, run.seed), steps, setting["lr"], every, evaluate
    )
    train_s = result["train_s"] - log["eval_s"]
    final = log["curve"][-1]["validation_bpb"] if steps % every == 0 else None
    if final is None:  # the last steps were not followed by an evaluation
        begin = time.perf_counter()
        final = round(quality.evaluate_bpb(model, val_blocks, tasks.DEVICE), 5)
        log["eval_s"] += time.perf_counter() - begin
        log["curve"].append({"tokens": steps * tokens_per_step, "train_s": round(train_s, 2), "validation_bpb": final})
    return {
        "final_bpb": final,
        "tokens": steps * tokens_per_step,
        "steps": steps,
        "batch": batch,
        "train_s": round(train_s, 2),
        "eval_s": round(log["eval_s"], 2),
        "calibrated_s_per_step": round(per_step, 4),
        "tokens_per_s": round(steps * tokens_per_step / train_s, 1),
        "parameters": tasks.parameters(model),
        "curve": log["curve"],
        "loss_curve": tasks.curve(result["losses"]),
    }


def estimate(run: Run) -> float:
    """The budget, the calibration, and the evaluations (about a third of a step per validation token)."""
    setting = run.config["pareto"]
    batch, train_ids, val_blocks = _data(run)
    per_step = tasks.estimate_seconds_per_step(
        lambda: make_model(run), quality.lm_batches(train_ids, run.context, batch, 0), setting["lr"], 1
    )
    steps = setting["budget_s"] / per_step
    evaluations = steps * batch * run.context / setting["eval_every_tokens"]
    eval_s = evaluations * per_step / 3 * val_blocks.size / (batch * run.context)
    tokens = steps * batch * run.context
    print(f"    {run.arm} ctx {run.context}: {per_step:.2f} s/step, about {tokens / 1e6:.2f}M tokens in the budget")
    return setting["budget_s"] + (setting["calibration_steps"] + 2) * per_step + eval_s


def claims(setting: dict) -> list:
    return []


# --------------------------------------------------------------------------------------------------- the analysis
def front(points: list[tuple[str, float, float]]) -> list[str]:
    """The names whose (time, bits) points include one no other point beats in both (lower time and lower bits, at
    least one strictly), ordered by the time of their first such point. Pure."""
    best: dict[str, float] = {}
    for name, t, bits in points:
        dominated = any(
            (t2 <= t and b2 <= bits) and (t2 < t or b2 < bits)
            for n2, t2, b2 in points
            if (n2, t2, b2) != (name, t, bits)
        )
        if not dominated:
            best[name] = min(best.get(name, t), t)
    return sorted(best, key=best.get)


def extra(results: dict) -> dict:
    """Per context: the equal-tokens comparison (the largest logged count every model reached), the equal-wall-clock
    one (the end of each run) and the Pareto front."""
    out = {}
    for context in results["settings"]["pareto"]["contexts"]:
        runs = [r for r in results["runs"] if r["context"] == context]
        if not runs:
            continue
        common = min(max(p["tokens"] for p in r["metrics"]["curve"]) for r in runs)
        equal_tokens = {}
        for r in runs:
            at = [p for p in r["metrics"]["curve"] if p["tokens"] <= common]
            equal_tokens[r["arm"]] = at[-1]["validation_bpb"] if at else None
        points = [(r["arm"], p["train_s"], p["validation_bpb"]) for r in runs for p in r["metrics"]["curve"]]
        out[str(context)] = {
            "equal_tokens": common,
            "bpb_at_equal_tokens": equal_tokens,
            "bpb_at_equal_time": {r["arm"]: r["metrics"]["final_bpb"] for r in runs},
            "train_s": {r["arm"]: r["metrics"]["train_s"] for r in runs},
            "front": front(points),
        }
    return out


def report(results: dict) -> str:
    labels = results["arms"]
    lines = []
    for context, data in results.get("extra", {}).items():
        lines += [
            f"## Context {context}",
            "",
            f"Pareto front (validation bits/byte vs training time): **{', '.join(labels.get(n, n) for n in data['front'])}**.",
            "",
            f"| model | bits/byte at {data['equal_tokens'] / 1e6:.3g}M tokens (equal tokens) | bits/byte at the end "
            "(equal wall-clock) | train s | on the front |",
            "|---|---|---|---|---|",
        ]
        order = sorted(data["bpb_at_equal_time"], key=lambda n: data["bpb_at_equal_time"][n])
        for name in order:
            lines.append(
                f"| {labels.get(name, name)} | {data['bpb_at_equal_tokens'][name]} | {data['bpb_at_equal_time'][name]} | "
                f"{data['train_s'][name]:.0f} | {'yes' if name in data['front'] else ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results: dict, folder) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = results["arms"]
    for context, data in results.get("extra", {}).items():
        runs = [r for r in results["runs"] if str(r["context"]) == context]
        fig, ax = plt.subplots(figsize=(8, 5))
        cmap = plt.get_cmap("tab20")
        for i, r in enumerate(sorted(runs, key=lambda r: r["arm"])):
            curve = r["metrics"]["curve"]
            on_front = r["arm"] in data["front"]
            ax.plot(
                [max(p["train_s"], 1e-3) for p in curve],
                [p["validation_bpb"] for p in curve],
                "-o",
                ms=2.5,
                lw=2.2 if on_front else 1.0,
                color=cmap(i % 20),
                label=labels.get(r["arm"], r["arm"]) + (" (front)" if on_front else ""),
            )
        points = sorted((p["train_s"], p["validation_bpb"]) for r in runs for p in r["metrics"]["curve"])
        hull, best = [], float("inf")
        for t, b in points:
            if b < best:
                hull.append((max(t, 1e-3), b))
                best = b
        ax.step(
            [t for t, _ in hull],
            [b for _, b in hull],
            where="post",
            color="black",
            lw=1,
            ls="--",
            label="Pareto front",
        )
        ax.set_xscale("log")
        ax.set_xlabel("training time, one thread (s)")
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"Causal LMs at context {context}: bits/byte vs training time")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(folder / f"pareto_ctx{context}.png", dpi=110)
        plt.close(fig)
