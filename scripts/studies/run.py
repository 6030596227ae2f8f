"""Run the reproduction studies (issue #24) and write their results.

    python scripts/studies/run.py claims --jobs 2     # the seven claim studies: ~5.5 h of one thread (~2.8 h on 2 cores)
    python scripts/studies/run.py pareto              # the Pareto: 32 runs of ~23 min, ~12.4 h of one thread
    python scripts/studies/run.py all                 # both (claims first), resumable: rerun the same command
    python scripts/studies/run.py aft gmlp --seeds 5  # some studies, 5 seeds (0..4)
    python scripts/studies/run.py all --quick         # smoke run of every code path (~1 minute), into a temp folder
    python scripts/studies/run.py all --estimate      # time a few steps of every arm at full size: the cost table
    python scripts/studies/run.py --table             # regenerate CLAIMS.md from the results present

Each study writes `<out>/<study>/results.json`, `results.md` and a plot; each run `<out>/<study>/runs/<key>.json` as
soon as it completes, and a later invocation skips the runs already there (same config), so the full mode can be
spread over several sessions (an interrupted run starts over). `<out>/CLAIMS.md` is regenerated after every study.
Every run uses one thread; `--jobs N` runs N at a time in separate processes (the Pareto's timings are then taken
with the other core busy: keep `--jobs 1` there on a machine with other work). Sizes, budgets and the estimated
times: `benchmarks/studies/README.md`.
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per run
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studies import runner


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "study",
        nargs="*",
        help=f"studies to run: any of {', '.join(runner.STUDIES)}; 'claims' (all but pareto); 'all'",
    )
    parser.add_argument("--quick", action="store_true", help="smoke mode: tiny models, few steps, 2 seeds")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..n-1); default 3, quick 2")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each in its own one-thread process")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/studies (quick: a temp folder)")
    parser.add_argument("--table", action="store_true", help="only regenerate <out>/CLAIMS.md from the results")
    parser.add_argument("--estimate", action="store_true", help="time a few steps per arm at full size; no training")
    args = parser.parse_args(argv)
    if not args.table and not args.study:
        parser.error("name a study (or 'claims', or 'all'), or pass --table")
    for name in args.study:
        if name not in (*runner.STUDIES, "claims", "all"):
            parser.error(f"unknown study {name!r}; expected any of {', '.join(runner.STUDIES)}, 'claims' or 'all'")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.quick and args.estimate:
        parser.error("--estimate times the full mode; it takes no --quick")
    return args


def estimate(names, seeds: int, out: Path) -> dict:
    """Time a few training steps of every distinct run at full size (this process's CPU time) and extrapolate each
    study's single-thread wall time (seeds cost the same: one is timed). Updates `<out>/estimates.json` (the studies
    named; the others' entries are kept)."""
    runner.single_thread()
    path = out / "estimates.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    report = {"seeds": seeds, "machine": runner.machine(), "studies": previous.get("studies", {})}
    for name in names:
        module = runner.load_study(name)
        setting = module.settings(False)
        plan = module.runs(setting, list(range(seeds)))
        timed, total, per_arm = {}, 0.0, {}
        for run in plan:
            key = (run.arm, run.task, run.context)
            if key not in timed:
                runner.seed_everything(0)
                start = time.perf_counter()
                timed[key] = module.estimate(run)
                print(
                    f"  {name} {run.arm} {run.task} ctx={run.context}: {timed[key]:.0f} s per run "
                    f"(measured in {time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
            total += timed[key]
            per_arm[run.key.rsplit("__s", 1)[0]] = round(timed[key], 1)
        report["studies"][name] = {
            "runs": len(plan),
            "seconds": round(total),
            "hours": round(total / 3600, 2),
            "per_run_s": per_arm,
            "measured_at": time.strftime("%Y-%m-%d %H:%M"),
        }
        print(f"{name}: {len(plan)} runs, about {total / 3600:.2f} h on one thread", flush=True)
    report["total_hours"] = round(sum(s["seconds"] for s in report["studies"].values()) / 3600, 2)
    print(f"total: about {report['total_hours']:.2f} h on one thread")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    if out is None:
        out = Path(tempfile.gettempdir()) / "hf-efficient-studies-quick" if args.quick else runner.DEFAULT_OUT
    if args.table:
        print(f"wrote {runner.write_claims_table(out)}")
        return 0
    groups = {"all": runner.STUDIES, "claims": runner.CLAIM_STUDIES}
    names = list(dict.fromkeys(n for name in args.study for n in groups.get(name, (name,))))
    seeds = args.seeds or (2 if args.quick else 3)
    if args.estimate:
        estimate(names, seeds, out)
        return 0
    failures = 0
    for name in names:
        results = runner.run_study(name, quick=args.quick, seeds=range(seeds), jobs=args.jobs, out=out)
        failures += len(results["failed"])
        for claim in results["claims"]:
            print(f"  [{name}] {claim['text']}: {claim['verdict']} ({claim['reason']})")
        print(f"[{name}] wrote {out / name / 'results.md'}")
        runner.write_claims_table(out)
    print(f"claims table: {out / 'CLAIMS.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
