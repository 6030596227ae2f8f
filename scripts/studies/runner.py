"""The shared study runner: the arm x seed loop, resumability, one thread per run, the writers of `results.json`,
`results.md` and the plot, the verdict of each claim and the claims table (`CLAIMS.md`).

Protocol (every study):

- A study module declares `NAME`, `TITLE`, `PAPER`, `VERSION`, `settings(quick) -> dict` (everything that sets the
  numbers: sizes, steps, data), `runs(settings, seeds) -> [Run]` (one per arm, task, seed and context), `execute(run)
  -> metrics` (trains and evaluates one run; every arm of a study with the same recipe, data order and budget),
  `METRICS` (per task: the metrics to tabulate) and `claims(settings) -> [Claim]`; optionally `extra(results)`
  (more numbers computed from the runs), `report(results) -> markdown`, `plot(results, path)` and
  `estimate(run) -> seconds` (a few timed steps at the run's size).
- Each run writes `<out>/<study>/runs/<key>.json` when it completes: its metrics, its config and the hash of it,
  wall time, thread count, machine and package commit. A later invocation skips every run whose file is there with
  the same config hash, so a full mode can be spread over several sessions (an interrupted run starts over).
- Every run executes with one intra-op thread (`torch.set_num_threads(1)`, `OMP_NUM_THREADS=1`); `jobs > 1` runs
  that many runs at once, each in its own process.
- The verdict of a claim is computed from the per-seed numbers by `verdict` (a pure function): the paired effect
  `e_s` of each seed `s` (positive = the claim's direction, see `claim_effects`), `gap = mean(e)`, `spread = max(e) -
  min(e)`: *reproduced* when every `e_s > 0` and `gap > spread`, *not reproduced* when every `e_s < 0` and `-gap >
  spread`, else *inconclusive*. With 3 seeds the rule is about a one-sided t-test at 5% (the range of 3 normal
  draws is ~1.7 sigma). Nothing in a verdict is written by hand.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

DEFAULT_OUT = ROOT / "benchmarks" / "studies"
# The claim studies first (hours), then the Pareto (the longest): the order of `all`.
CLAIM_STUDIES = ("aft", "gmlp", "combiner", "r_transformer", "ngram", "sparse_mlp", "recall")
STUDIES = (*CLAIM_STUDIES, "pareto")
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
CLAIM_KINDS = ("better", "within", "match", "at_least")


# ------------------------------------------------------------------------------------------------------ the claims
@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim as a comparison of one metric between arms, seed by seed (paired: same seed, same data order).

    `kind` (A = `arm`, B = `baseline`; `d` = how much A is better than B in the metric's direction, relative to B's
    value when `relative`):
    - `"better"`: A is better than B: `e = d`.
    - `"within"`: A is not worse than B by more than `tolerance`: `e = tolerance + d`.
    - `"match"`: A and B are about equal: `e = tolerance - |d|`.
    - `"at_least"`: A alone reaches `tolerance` (a threshold; `baseline` None): `e = value - tolerance`, or
      `tolerance - value` for a lower-is-better metric.
    `requires`: preconditions `(arm, metric, ">=" or "<=", value)` every seed must meet for the claim to be judged
    (e.g. the full-attention model reaches 85 BLEU); unmet, the verdict is inconclusive and says so.
    """

    id: str
    paper: str
    text: str
    task: str
    metric: str
    kind: str
    arm: str
    baseline: str | None = None
    tolerance: float = 0.0
    relative: bool = False
    higher_is_better: bool = False
    requires: tuple = ()
    scale_hint: str = ""

    def __post_init__(self):
        if self.kind not in CLAIM_KINDS:
            raise ValueError(f"Claim {self.id!r}: kind must be one of {CLAIM_KINDS}, got {self.kind!r}.")
        if (self.baseline is None) != (self.kind == "at_least"):
            raise ValueError(
                f"Claim {self.id!r}: a {self.kind!r} claim {'needs' if self.kind != 'at_least' else 'has no'} baseline."
            )
        if self.tolerance < 0:
            raise ValueError(f"Claim {self.id!r}: tolerance must be >= 0, got {self.tolerance}.")
        for requirement in self.requires:
            if len(requirement) != 4 or requirement[2] not in (">=", "<="):
                raise ValueError(
                    f"Claim {self.id!r}: a requirement is (arm, metric, '>=' or '<=', value), got {requirement!r}."
                )


def claim_effects(claim: Claim, values: dict[tuple[str, int], float]) -> tuple[list[int], list[float]]:
    """The seeds where every arm of `claim` has a value, and the claim's effect at each (see `Claim`).

    `values[(arm, seed)]` is the claim's metric of that run (its task). Pure: no I/O."""
    arms = [claim.arm] + ([claim.baseline] if claim.baseline else [])
    seeds = sorted({seed for arm, seed in values if arm == claim.arm})
    seeds = [s for s in seeds if all((arm, s) in values for arm in arms)]
    sign = 1.0 if claim.higher_is_better else -1.0
    effects = []
    for seed in seeds:
        a = float(values[(claim.arm, seed)])
        if claim.kind == "at_least":
            effects.append(sign * (a - claim.tolerance))
            continue
        b = float(values[(claim.baseline, seed)])
        d = sign * (a - b)
        if claim.relative:
            if b == 0:
                raise ValueError(f"Claim {claim.id!r}: relative difference to a zero baseline value (seed {seed}).")
            d /= abs(b)
        effects.append({"better": d, "within": claim.tolerance + d, "match": claim.tolerance - abs(d)}[claim.kind])
    return seeds, effects


def verdict(effects: Sequence[float]) -> dict:
    """The verdict of a claim from its per-seed effects (positive = the claim holds in that seed). Pure.

    reproduced: every effect > 0 and their mean (the gap) > their range (the seed spread); not reproduced: every
    effect < 0 and -gap > spread; inconclusive otherwise (fewer than 2 seeds, signs that differ, or a gap within the
    spread). Returns `{"verdict", "gap", "spread", "seeds", "reason"}`.
    """
    values = [float(e) for e in effects]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"verdict: effects must be finite numbers, got {values}.")
    n = len(values)
    if n == 0:
        return {"verdict": INCONCLUSIVE, "gap": None, "spread": None, "seeds": 0, "reason": "no completed seed"}
    gap = statistics.fmean(values)
    spread = round(max(values) - min(values), 12)  # no float round-off (1e-16) posing as a spread
    base = {"gap": gap, "spread": spread, "seeds": n}
    if n < 2:
        return {**base, "verdict": INCONCLUSIVE, "reason": "one seed: no seed spread to weigh the gap against"}
    if min(values) > 0 and gap > spread:
        return {
            **base,
            "verdict": REPRODUCED,
            "reason": f"holds in all {n} seeds; gap {gap:.4g} > spread {spread:.4g}",
        }
    if max(values) < 0 and -gap > spread:
        return {
            **base,
            "verdict": NOT_REPRODUCED,
            "reason": f"the opposite holds in all {n} seeds; gap {gap:.4g}, |gap| > spread {spread:.4g}",
        }
    if min(values) > 0 or max(values) < 0:
        reason = f"same sign in all {n} seeds, but |gap| {abs(gap):.4g} <= spread {spread:.4g}"
    else:
        positive = sum(v > 0 for v in values)
        reason = f"holds in {positive} of {n} seeds (gap {gap:.4g}, spread {spread:.4g})"
    return {**base, "verdict": INCONCLUSIVE, "reason": reason}


def judge(claim: Claim, values: dict[tuple[str, int], float], metrics: dict[tuple[str, int], dict]) -> dict:
    """`verdict` of `claim`, after its preconditions (`metrics[(arm, seed)]` = the run's metrics in the claim's task)."""
    seeds, effects = claim_effects(claim, values)
    result = {**dataclasses.asdict(claim), "requires": [list(r) for r in claim.requires]}
    result.update(seeds_used=seeds, effects=effects, **verdict(effects))
    unmet = []
    for arm, metric, op, bound in claim.requires:
        for seed in seeds:
            value = metrics.get((arm, seed), {}).get(metric)
            ok = value is not None and (value >= bound if op == ">=" else value <= bound)
            if not ok:
                unmet.append(f"{arm} {metric} = {value} (seed {seed}), needs {op} {bound}")
    result["direction"] = None
    if claim.kind == "match" and result["verdict"] == NOT_REPRODUCED:
        # "about equal" fails both ways: say which (a model far better than claimed is not a failure of the model)
        sign = 1.0 if claim.higher_is_better else -1.0
        diffs = []
        for seed in seeds:
            a, b = float(values[(claim.arm, seed)]), float(values[(claim.baseline, seed)])
            diffs.append(sign * (a - b) / (abs(b) if claim.relative else 1.0))
        if min(diffs) > 0 or max(diffs) < 0:
            result["direction"] = "better" if min(diffs) > 0 else "worse"
            size = f"{100 * statistics.fmean(diffs):+.1f}%" if claim.relative else f"{statistics.fmean(diffs):+.4g}"
            result["reason"] += (
                f"; {claim.arm} is {result['direction']} than {claim.baseline} by more than the tolerance in every "
                f"seed (mean {size})"
            )
    if unmet:
        result["verdict"] = INCONCLUSIVE
        result["reason"] = "precondition not met: " + "; ".join(unmet)
    if result["verdict"] == INCONCLUSIVE and claim.scale_hint:
        result["reason"] += f". What would decide it: {claim.scale_hint}"
    return result


# ------------------------------------------------------------------------------------------------------------ runs
@dataclasses.dataclass
class Run:
    """One training run: an arm of a study, on a task, with a seed (and a context length where the study has
    several). `config` holds everything that determines its numbers (the hash of it decides resumption)."""

    study: str
    arm: str
    seed: int
    task: str = "main"
    context: int | None = None
    config: dict = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        parts = (
            [self.arm, self.task] + ([f"ctx{self.context}"] if self.context is not None else []) + [f"s{self.seed}"]
        )
        return "__".join(parts)

    def config_hash(self, version: int) -> str:
        payload = {"study": self.study, "version": version, "key": self.key, "config": self.config}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_study(name: str):
    if name not in STUDIES:
        raise ValueError(f"Unknown study {name!r}; expected one of {', '.join(STUDIES)} (or 'all').")
    return importlib.import_module(f"studies.{name}")


def single_thread() -> None:
    """One intra-op (and, where still possible, one inter-op) thread: every run is timed on one core."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started in this process
        pass


def seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine() -> dict:
    """What ran it: CPU model and count, platform, Python and library versions, the thread count in use."""
    import torch
    import transformers
    from bench_lib.measure import cpu_model  # (on sys.path through the studies package)

    cpu = cpu_model()
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def package_commit() -> dict:
    """The package's git commit and whether the working tree had changes (read-only git calls)."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"commit": None, "dirty": None, "error": str(error)}
    if head.returncode != 0:
        return {"commit": None, "dirty": None, "error": head.stderr.strip()[:200]}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def run_path(out: Path, run: Run) -> Path:
    return Path(out) / run.study / "runs" / f"{run.key}.json"


def completed_record(out: Path, run: Run, version: int) -> dict | None:
    """The record of `run` if its file exists with the same config hash (else None: it must run)."""
    path = run_path(out, run)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("config_hash") == run.config_hash(version) else None


def execute_run(study_name: str, fields: dict, out: str) -> dict:
    """Run one study run (in this process or a worker), write its record when it completes, and return it."""
    single_thread()
    module = load_study(study_name)
    run = Run(**fields)
    seed_everything(run.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics = module.execute(run)
    record = {
        "study": run.study,
        "key": run.key,
        "arm": run.arm,
        "task": run.task,
        "seed": run.seed,
        "context": run.context,
        "config": run.config,
        "config_hash": run.config_hash(module.VERSION),
        "metrics": metrics,
        "wall_s": round(time.perf_counter() - start, 2),
        "cpu_s": round(time.process_time() - cpu_start, 2),
        "machine": machine(),
        "package": package_commit(),
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    path = run_path(Path(out), run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=_json_default) + "\n")
    tmp.replace(path)  # atomic: a run file is complete or absent
    return record


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _worker(args):
    study_name, fields, out = args
    try:
        return execute_run(study_name, fields, out), None
    except Exception:  # reported by the parent, which goes on with the other runs
        return None, traceback.format_exc()


def run_study(
    name: str,
    quick: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    jobs: int = 1,
    out: Path = DEFAULT_OUT,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every missing run of study `name`, then write its results (json, markdown, plot). Returns the results;
    `results["failed"]` lists the runs that raised (they write no record and run again next time)."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}.")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}.")
    out = Path(out)
    module = load_study(name)
    settings = module.settings(quick)
    runs = module.runs(settings, seeds)
    keys = [run.key for run in runs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"study {name}: duplicate run keys in its plan")
    records, todo = {}, []
    for run in runs:
        record = completed_record(out, run, module.VERSION)
        if record is None:
            todo.append(run)
        else:
            records[run.key] = record
    log(
        f"[{name}] {len(runs)} runs: {len(records)} done before, {len(todo)} to run ({'quick' if quick else 'full'} mode)"
    )
    failed = {}
    work = [(name, dataclasses.asdict(run), str(out)) for run in todo]
    if jobs == 1 or len(work) <= 1:
        single_thread()
        for item, run in zip(work, todo):
            record, error = _worker(item)
            _collect(run, record, error, records, failed, log)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=single_thread) as pool:
            for run, (record, error) in zip(todo, pool.map(_worker, work)):
                _collect(run, record, error, records, failed, log)
    results = build_results(module, settings, runs, records, quick, seeds)
    results["failed"] = failed
    write_results(module, results, out / name)
    return results


def _collect(run, record, error, records, failed, log):
    if record is None:
        failed[run.key] = error
        log(f"[{run.study}] {run.key} FAILED\n{error}")
        return
    records[run.key] = record
    shown = {k: v for k, v in record["metrics"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    log(
        f"[{run.study}] {run.key} done in {record['wall_s']:.0f} s: "
        + ", ".join(f"{k}={v:.4g}" for k, v in list(shown.items())[:4])
    )


# --------------------------------------------------------------------------------------------------------- results
def summarize(records: list[dict], metrics: dict[str, list[tuple]]) -> list[dict]:
    """Per (task, context, arm): every tabulated metric's per-seed values, mean, min and max. Pure."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record.get("context"), record["arm"]), []).append(record)
    rows = []
    for (task, context, arm), group in groups.items():
        group = sorted(group, key=lambda r: r["seed"])
        row = {"task": task, "context": context, "arm": arm, "seeds": [r["seed"] for r in group], "metrics": {}}
        row["wall_s"] = round(sum(r["wall_s"] for r in group), 1)
        for spec in metrics.get(task, []):
            metric = spec[0]
            values = [r["metrics"][metric] for r in group if r["metrics"].get(metric) is not None]
            if values:
                row["metrics"][metric] = {
                    "values": values,
                    "mean": statistics.fmean(values),
                    "min": min(values),
                    "max": max(values),
                }
        rows.append(row)
    return rows


def build_results(module, settings: dict, runs: list[Run], records: dict, quick: bool, seeds: list[int]) -> dict:
    done = [records[run.key] for run in runs if run.key in records]
    claims = []
    for claim in module.claims(settings):
        task_records = [r for r in done if r["task"] == claim.task]
        values = {
            (r["arm"], r["seed"]): r["metrics"][claim.metric] for r in task_records if claim.metric in r["metrics"]
        }
        metrics = {(r["arm"], r["seed"]): r["metrics"] for r in task_records}
        claims.append(judge(claim, values, metrics))
    results = {
        "study": module.NAME,
        "title": module.TITLE,
        "paper": module.PAPER,
        "version": module.VERSION,
        "mode": "quick" if quick else "full",
        "seeds": seeds,
        "settings": settings,
        "arms": getattr(module, "ARM_LABELS", {}),
        "summary": summarize(done, module.METRICS),
        "claims": claims,
        "missing": [run.key for run in runs if run.key not in records],
        "wall_s": round(sum(r["wall_s"] for r in done), 1),
        "machine": machine(),
        "package": package_commit(),
        "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs": done,
    }
    if hasattr(module, "extra"):
        results["extra"] = module.extra(results)
    return results


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def metric_cell(stats: dict | None, digits: int = 4) -> str:
    """`mean [min, max]` of a metric over the seeds (one seed, or the same value in every seed: that value)."""
    if not stats:
        return "-"
    if stats["min"] == stats["max"]:
        return fmt(stats["values"][0], digits)
    return f"{fmt(stats['mean'], digits)} [{fmt(stats['min'], digits)}, {fmt(stats['max'], digits)}]"


def markdown(module, results: dict) -> str:
    """`results.md`: the setting, one table per task (mean [min, max] over the seeds), the claims and verdicts."""
    label = results.get("arms", {})
    lines = [f"# {results['title']}", "", f"Paper: {results['paper']}.", ""]
    lines.append(
        f"Mode: **{results['mode']}**; seeds {results['seeds']}; {len(results['runs'])} runs, {results['wall_s'] / 3600:.2f} h "
        f"of single-thread run time in all; machine: {results['machine']['cpu']}; package commit "
        f"{(results['package'].get('commit') or '?')[:10]}{' (with local changes)' if results['package'].get('dirty') else ''}."
    )
    if results["missing"]:
        lines += [
            "",
            f"**Incomplete**: {len(results['missing'])} runs missing ({', '.join(results['missing'][:8])}...).",
        ]
    lines += ["", "Setting: `" + json.dumps(results["settings"], sort_keys=True, default=str) + "`", ""]
    for task, specs in module.METRICS.items():
        rows = [r for r in results["summary"] if r["task"] == task]
        if not rows:
            continue
        with_context = any(r["context"] is not None for r in rows)
        head = "| arm | " + ("context | " if with_context else "") + " | ".join(s[1] for s in specs)
        lines += [f"## Task `{task}`", "", head + " | seeds | run time (s) |"]
        lines.append("|---|" + ("---|" if with_context else "") + "---|" * len(specs) + "---|---|")
        for row in rows:
            cells = [metric_cell(row["metrics"].get(s[0])) for s in specs]
            context = f"{fmt(row['context'])} | " if with_context else ""
            lines.append(
                f"| {label.get(row['arm'], row['arm'])} | {context}"
                + " | ".join(cells)
                + f" | {len(row['seeds'])} | {row['wall_s']:.0f} |"
            )
        lines.append("")
    if hasattr(module, "report"):
        lines += [module.report(results), ""]
    if results["claims"]:
        lines += [
            "## Claims and verdicts",
            "",
            "| claim | effect per seed | gap | spread | verdict | why |",
            "|---|---|---|---|---|---|",
        ]
        for c in results["claims"]:
            effects = ", ".join(fmt(e, 3) for e in c["effects"]) or "-"
            lines.append(
                f"| {c['text']} | {effects} | {fmt(c['gap'], 3)} | {fmt(c['spread'], 3)} | **{c['verdict']}** | {c['reason']} |"
            )
        lines += [
            "",
            "Effect per seed: positive when the claim holds in that seed (`scripts/studies/runner.py`, `Claim`). "
            "Reproduced: positive in every seed and gap (mean) > spread (max - min); not reproduced: the opposite; "
            "else inconclusive. Computed by the runner from `results.json`; never edited by hand.",
        ]
    return "\n".join(lines) + "\n"


def default_plot(module, results: dict, path: Path) -> bool:
    """One panel per (task, metric): every arm's per-seed values and their mean. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [(task, spec) for task, specs in module.METRICS.items() for spec in specs[:1]]
    panels = [(t, s) for t, s in panels if any(r["task"] == t for r in results["summary"])]
    if not panels:
        return False
    label = results.get("arms", {})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, (task, spec) in zip(axes[0], panels):
        rows = [r for r in results["summary"] if r["task"] == task and spec[0] in r["metrics"]]
        names = [label.get(r["arm"], r["arm"]) for r in rows]
        for i, row in enumerate(rows):
            stats = row["metrics"][spec[0]]
            ax.scatter([i] * len(stats["values"]), stats["values"], s=14, color="tab:blue", alpha=0.6)
            ax.plot([i - 0.3, i + 0.3], [stats["mean"]] * 2, color="black")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(spec[1])
        ax.set_title(f"{results['study']}: {task}", fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_results(module, results: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
    (folder / "results.md").write_text(markdown(module, results))
    plot = getattr(module, "plot", None)
    if plot is not None:
        plot(results, folder)
    else:
        default_plot(module, results, folder / f"{module.NAME}.png")


# ---------------------------------------------------------------------------------------------------- claims table
def claims_table(out: Path = DEFAULT_OUT) -> str:
    """`CLAIMS.md`: a title, how to read it, and `claims_rows(out)`."""
    lines = [
        "# Claims of the papers, checked at small scale",
        "",
        "Generated by `python scripts/studies/run.py --table` from `benchmarks/studies/<study>/results.json`; do not edit "
        "by hand. Result: the arms' metric as mean [min, max] over the seeds, then the paired effect (positive = the "
        "claim holds) as gap (mean) and spread (max - min). Verdict rule: `scripts/studies/runner.py` (`verdict`).",
        "",
    ]
    return "\n".join(lines) + "\n" + claims_rows(out)


def claims_rows(out: Path = DEFAULT_OUT, studies: Sequence[str] = STUDIES) -> str:
    """The "Claims" table of every study whose `results.json` is in `out`: paper, claim, our setting, result with
    spread, verdict, wall time. Generated from the results only (the documentation's claims page and the README
    show the same table: `scripts/checks/make_docs.py`)."""
    lines = [
        "| paper | claim | our setting | result | verdict | wall time |",
        "|---|---|---|---|---|---|",
    ]
    found = False
    for name in studies:
        if name not in STUDIES:
            raise ValueError(f"unknown study {name!r}; expected one of {', '.join(STUDIES)}")
        path = Path(out) / name / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        found = True
        setting = results["settings"].get("description", "")
        if results["mode"] != "full":
            setting += f" (**{results['mode']} mode**: a smoke test, not a result)"
        wall = f"{results['wall_s'] / 3600:.2f} h ({name})"
        for c in results["claims"]:
            cells = []
            for arm in [c["arm"]] + ([c["baseline"]] if c["baseline"] else []):
                stats = next(
                    (
                        r["metrics"].get(c["metric"])
                        for r in results["summary"]
                        if r["task"] == c["task"] and r["arm"] == arm
                    ),
                    None,
                )
                cells.append(f"{results['arms'].get(arm, arm)}: {metric_cell(stats)}")
            result = f"{c['metric']}: " + " vs ".join(cells) + f"; effect {fmt(c['gap'], 3)} ± {fmt(c['spread'], 3)}"
            verdict_cell = f"**{c['verdict']}**"
            if c.get("direction") and c["verdict"] == NOT_REPRODUCED:
                verdict_cell += f" ({results['arms'].get(c['arm'], c['arm'])} is {c['direction']})"
            lines.append(f"| {c['paper']} | {c['text']} | {setting} | {result} | {verdict_cell} | {wall} |")
    if not found:
        lines.append("| - | no study results yet | - | - | - | - |")
    return "\n".join(lines) + "\n"


def write_claims_table(out: Path = DEFAULT_OUT) -> Path:
    path = Path(out) / "CLAIMS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(claims_table(out))
    return path
