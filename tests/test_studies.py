"""The study runner (scripts/studies): the verdict rule and the claims' effects (pure functions), resumability, the
command, the claims table, and every study's quick mode end to end (training, evaluation, verdicts, table, plot)."""

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from studies import runner  # noqa: E402
from studies.runner import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, Claim, claim_effects, judge, verdict  # noqa: E402


# ---------------------------------------------------------------------------------------------------- the verdict
@pytest.mark.parametrize(
    "effects, expected",
    [
        ([0.3, 0.4, 0.35], REPRODUCED),  # same sign everywhere, gap 0.35 > spread 0.1
        ([0.03, 0.04, 0.05], REPRODUCED),  # small but consistent: gap 0.04 > spread 0.02
        ([-0.3, -0.35, -0.4], NOT_REPRODUCED),  # the opposite, consistently
        ([0.5, -0.1, 0.4], INCONCLUSIVE),  # signs differ
        ([0.01, 0.02, 0.05], INCONCLUSIVE),  # one sign, but gap 0.0267 <= spread 0.04
        ([-0.01, -0.02, -0.05], INCONCLUSIVE),  # the opposite sign, within the spread
        ([0.1, 0.2, 0.3], INCONCLUSIVE),  # gap == spread: not larger
        ([0.2, 0.2, 0.2], REPRODUCED),  # no spread at all
        ([0.0, 0.2, 0.3], INCONCLUSIVE),  # a zero effect is not a positive one
        ([0.5], INCONCLUSIVE),  # one seed: nothing to weigh the gap against
        ([], INCONCLUSIVE),
    ],
)
def test_verdict_rule(effects, expected):
    result = verdict(effects)
    assert result["verdict"] == expected, result
    assert result["seeds"] == len(effects)
    if len(effects) >= 2:
        assert result["gap"] == pytest.approx(sum(effects) / len(effects))
        assert result["spread"] == pytest.approx(max(effects) - min(effects))
    assert result["reason"]


def test_verdict_rejects_non_finite_effects():
    with pytest.raises(ValueError, match="finite"):
        verdict([0.1, math.nan, 0.2])
    with pytest.raises(ValueError, match="finite"):
        verdict([math.inf, 0.1])


def values(table):
    return {(arm, seed): v for arm, per_seed in table.items() for seed, v in enumerate(per_seed)}


def test_claim_effects_per_kind():
    lower = {"a": [1.0, 1.2, 0.9], "b": [1.1, 1.25, 1.0]}  # bits per byte: lower is better
    better = Claim(id="x", paper="p", text="t", task="lm", metric="bpb", kind="better", arm="a", baseline="b")
    seeds, effects = claim_effects(better, values(lower))
    assert seeds == [0, 1, 2] and effects == pytest.approx([0.1, 0.05, 0.1])
    relative = Claim(
        id="x",
        paper="p",
        text="t",
        task="lm",
        metric="bpb",
        kind="within",
        arm="b",
        baseline="a",
        tolerance=0.05,
        relative=True,
    )  # b is at most 5% worse than a?
    _, effects = claim_effects(relative, values(lower))
    assert effects == pytest.approx([0.05 - 0.1, 0.05 - 0.05 / 1.2, 0.05 - 0.1 / 0.9])
    match = Claim(
        id="x", paper="p", text="t", task="lm", metric="bpb", kind="match", arm="b", baseline="a", tolerance=0.08
    )
    _, effects = claim_effects(match, values(lower))
    assert effects == pytest.approx([-0.02, 0.03, -0.02])  # 0.08 - |a - b|, either direction
    higher = {"a": [0.9, 0.8], "b": [0.7, 0.85]}  # accuracy: higher is better
    acc = Claim(
        id="x",
        paper="p",
        text="t",
        task="c",
        metric="acc",
        kind="better",
        arm="a",
        baseline="b",
        higher_is_better=True,
    )
    assert claim_effects(acc, values(higher))[1] == pytest.approx([0.2, -0.05])
    threshold = Claim(
        id="x",
        paper="p",
        text="t",
        task="c",
        metric="acc",
        kind="at_least",
        arm="a",
        tolerance=0.85,
        higher_is_better=True,
    )
    assert claim_effects(threshold, values(higher))[1] == pytest.approx([0.05, -0.05])
    ceiling = Claim(id="x", paper="p", text="t", task="c", metric="ratio", kind="at_least", arm="a", tolerance=2.0)
    assert claim_effects(ceiling, {("a", 0): 1.5, ("a", 1): 2.5})[1] == pytest.approx([0.5, -0.5])


def test_a_failed_match_claim_says_which_way_it_failed():
    """ "About equal" fails both ways: an arm far better than its baseline is not reproduced either, and the verdict
    says it is better (the claims table too), where one far worse says worse."""
    from studies.runner import NOT_REPRODUCED, judge

    match = Claim(
        id="x", paper="p", text="t", task="lm", metric="ppl", kind="match", arm="g", baseline="t", tolerance=0.05,
        relative=True,
    )  # fmt: skip
    better = values({"g": [12.2, 12.8, 12.4], "t": [18.8, 19.3, 19.0]})  # perplexity: lower is better
    result = judge(match, better, {})
    assert result["verdict"] == NOT_REPRODUCED and result["direction"] == "better"
    assert "g is better than t by more than the tolerance in every seed" in result["reason"]
    worse = values({"g": [19.0, 19.3, 18.8], "t": [12.2, 12.8, 12.4]})
    assert judge(match, worse, {})["direction"] == "worse"
    close = values({"g": [12.2, 12.8, 12.4], "t": [12.3, 12.7, 12.4]})
    assert judge(match, close, {})["direction"] is None


def test_claim_effects_pair_seeds_and_reject_bad_claims():
    table = {("a", 0): 1.0, ("a", 1): 1.0, ("a", 2): 1.0, ("b", 0): 2.0, ("b", 2): 2.0}  # b's seed 1 is missing
    claim = Claim(id="x", paper="p", text="t", task="lm", metric="m", kind="better", arm="a", baseline="b")
    assert claim_effects(claim, table) == ([0, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="kind"):
        Claim(id="x", paper="p", text="t", task="lm", metric="m", kind="bigger", arm="a", baseline="b")
    with pytest.raises(ValueError, match="needs baseline"):
        Claim(id="x", paper="p", text="t", task="lm", metric="m", kind="better", arm="a")
    with pytest.raises(ValueError, match="has no baseline"):
        Claim(id="x", paper="p", text="t", task="lm", metric="m", kind="at_least", arm="a", baseline="b")
    with pytest.raises(ValueError, match="tolerance"):
        Claim(id="x", paper="p", text="t", task="lm", metric="m", kind="match", arm="a", baseline="b", tolerance=-1)
    with pytest.raises(ValueError, match="requirement"):
        Claim(
            id="x",
            paper="p",
            text="t",
            task="lm",
            metric="m",
            kind="better",
            arm="a",
            baseline="b",
            requires=(("a", "m", ">"),),
        )
    zero = Claim(
        id="x", paper="p", text="t", task="lm", metric="m", kind="within", arm="a", baseline="b", relative=True
    )
    with pytest.raises(ValueError, match="zero baseline"):
        claim_effects(zero, {("a", 0): 1.0, ("b", 0): 0.0})


def test_judge_checks_preconditions_and_adds_the_scale_hint():
    claim = Claim(
        id="x",
        paper="p",
        text="t",
        task="s",
        metric="bleu",
        kind="better",
        arm="full",
        baseline="n1",
        higher_is_better=True,
        requires=(("full", "bleu", ">=", 85.0),),
        scale_hint="train longer",
    )
    bleu = {("full", 0): 90.0, ("full", 1): 80.0, ("n1", 0): 50.0, ("n1", 1): 40.0}
    metrics = {key: {"bleu": value} for key, value in bleu.items()}
    result = judge(claim, bleu, metrics)
    assert result["effects"] == [40.0, 40.0]  # the effect alone would be "reproduced"
    assert result["verdict"] == INCONCLUSIVE and "precondition not met" in result["reason"]
    assert "seed 1" in result["reason"] and "train longer" in result["reason"]
    bleu[("full", 1)] = 86.0
    metrics[("full", 1)] = {"bleu": 86.0}
    result = judge(claim, bleu, metrics)
    assert result["verdict"] == REPRODUCED and "train longer" not in result["reason"]


# ---------------------------------------------------------------------------------------------- resumability
def fake_study(calls: list, version: int = 1, steps: int = 3):
    """A study module in the runner's protocol whose runs are instantaneous and counted."""

    def execute(run):
        calls.append(run.key)
        value = {"a": 1.0, "b": 2.0}[run.arm] + 0.01 * run.seed
        return {"score": value, "steps": run.config["steps"]}

    module = types.SimpleNamespace(
        NAME="aft",  # a known study name, so that the run files land where the runner looks
        TITLE="fake",
        PAPER="fake paper",
        VERSION=version,
        ARM_LABELS={"a": "arm A", "b": "arm B"},
        METRICS={"t": [("score", "score")]},
        settings=lambda quick: {"description": "fake", "steps": steps},
        runs=lambda setting, seeds: [
            runner.Run("aft", arm, seed, task="t", config={"steps": setting["steps"]})
            for arm in "ab"
            for seed in seeds
        ],
        execute=execute,
        claims=lambda setting: [
            Claim(
                id="c",
                paper="fake",
                text="A is better",
                task="t",
                metric="score",
                kind="better",
                arm="a",
                baseline="b",
            )
        ],
    )
    module.plot = lambda results, folder: (folder / "fake.png").write_bytes(b"png")
    return module


def test_second_invocation_skips_completed_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "load_study", lambda name: fake_study(calls))
    first = runner.run_study("aft", seeds=[0, 1, 2], out=tmp_path, log=lambda _: None)
    assert sorted(calls) == sorted(f"{arm}__t__s{seed}" for arm in "ab" for seed in range(3))
    runs = sorted((tmp_path / "aft" / "runs").glob("*.json"))
    assert len(runs) == 6
    record = json.loads(runs[0].read_text())
    for field in ("config", "config_hash", "metrics", "wall_s", "machine", "package", "seed"):
        assert field in record
    assert record["machine"]["torch_threads"] == 1
    assert first["claims"][0]["verdict"] == REPRODUCED  # a = 1.0x < b = 2.0x in every seed
    calls.clear()
    second = runner.run_study("aft", seeds=[0, 1, 2], out=tmp_path, log=lambda _: None)
    assert calls == [] and second["claims"] == first["claims"] and not second["missing"]
    # one more seed: only its runs; a damaged run file: that run again
    (tmp_path / "aft" / "runs" / "b__t__s1.json").write_text("{not json")
    runner.run_study("aft", seeds=[0, 1, 2, 3], out=tmp_path, log=lambda _: None)
    assert sorted(calls) == ["a__t__s3", "b__t__s1", "b__t__s3"]
    # another config (or study version) changes the hash: everything runs again
    calls.clear()
    monkeypatch.setattr(runner, "load_study", lambda name: fake_study(calls, steps=4))
    runner.run_study("aft", seeds=[0], out=tmp_path, log=lambda _: None)
    assert sorted(calls) == ["a__t__s0", "b__t__s0"]
    calls.clear()
    monkeypatch.setattr(runner, "load_study", lambda name: fake_study(calls, version=2, steps=4))
    runner.run_study("aft", seeds=[0], out=tmp_path, log=lambda _: None)
    assert sorted(calls) == ["a__t__s0", "b__t__s0"]
    results = json.loads((tmp_path / "aft" / "results.json").read_text())
    assert results["version"] == 2 and len(results["runs"]) == 2 and (tmp_path / "aft" / "fake.png").exists()


def test_a_failing_run_is_reported_and_runs_again(tmp_path, monkeypatch):
    calls = []
    module = fake_study(calls)
    good = module.execute

    def flaky(run):
        if run.key == "b__t__s1":
            raise RuntimeError("out of memory")
        return good(run)

    module.execute = flaky
    monkeypatch.setattr(runner, "load_study", lambda name: module)
    results = runner.run_study("aft", seeds=[0, 1], out=tmp_path, log=lambda _: None)
    assert list(results["failed"]) == ["b__t__s1"] and "out of memory" in results["failed"]["b__t__s1"]
    assert results["missing"] == ["b__t__s1"] and not (tmp_path / "aft" / "runs" / "b__t__s1.json").exists()
    module.execute = good
    calls.clear()
    results = runner.run_study("aft", seeds=[0, 1], out=tmp_path, log=lambda _: None)
    assert calls == ["b__t__s1"] and not results["missing"] and not results["failed"]


def test_bad_runner_arguments(tmp_path):
    with pytest.raises(ValueError, match="Unknown study 'bert'"):
        runner.run_study("bert", out=tmp_path)
    with pytest.raises(ValueError, match="jobs"):
        runner.run_study("aft", jobs=0, out=tmp_path)
    with pytest.raises(ValueError, match="seeds"):
        runner.run_study("aft", seeds=[0, 0], out=tmp_path)


# ------------------------------------------------------------------------------------------------- claims table
def test_claims_table_is_generated_from_results(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(runner, "load_study", lambda name: fake_study(calls))
    assert "no study results yet" in runner.claims_table(tmp_path)
    runner.run_study("aft", quick=True, seeds=[0, 1, 2], out=tmp_path, log=lambda _: None)
    table = runner.write_claims_table(tmp_path).read_text()
    row = next(line for line in table.splitlines() if line.startswith("| fake |"))
    assert "A is better" in row and "**reproduced**" in row and "quick mode" in row
    assert "arm A: 1.01 [1, 1.02] vs arm B: 2.01 [2, 2.02]" in row and "effect 1 ± 0" in row


def test_pareto_front():
    from studies.pareto import front

    points = [("slow-good", 10.0, 1.0), ("fast-bad", 1.0, 2.0), ("dominated", 5.0, 2.5), ("mid", 5.0, 1.5)]
    assert front(points) == ["fast-bad", "mid", "slow-good"]
    assert front([("a", 1.0, 1.0), ("b", 1.0, 1.0)]) == ["a", "b"]  # ties dominate neither
    assert front([("a", 1.0, 1.0), ("a", 2.0, 0.5), ("b", 2.0, 0.6)]) == ["a"]


def test_recall_probe_layout():
    """The redesigned probe: P pair tokens binding distinct keys to values, filler, then L/2 queries whose labels
    (shifted as transformers shifts them) are the values bound to their keys; nothing of an answer in the input."""
    import torch
    from studies import tasks

    generator = torch.Generator().manual_seed(0)
    ids, labels = tasks.recall_batch(generator, 3, 64, 8)
    assert ids.shape == labels.shape == (3, 64)
    for row, label in zip(ids.tolist(), labels.tolist()):
        pairs = row[:8]
        assert all(tasks.PAIR_BASE <= t < tasks.QUERY_BASE for t in pairs)
        bound = {
            (t - tasks.PAIR_BASE) // tasks.RECALL_VALUES: (t - tasks.PAIR_BASE) % tasks.RECALL_VALUES for t in pairs
        }
        assert len(bound) == 8  # distinct keys
        assert all(t >= tasks.FILLER_BASE for t in row[8:32])
        queries = row[32:]
        assert all(tasks.QUERY_BASE <= t < tasks.ANSWER_BASE for t in queries)
        assert label[:33] == [-100] * 33
        for i, query in enumerate(queries[:-1]):  # query i at 32 + i, its answer labelled at 33 + i
            assert label[33 + i] == tasks.ANSWER_BASE + bound[query - tasks.QUERY_BASE]
        assert not any(tasks.ANSWER_BASE <= t < tasks.FILLER_BASE for t in row)
    with pytest.raises(ValueError, match="pairs"):
        tasks.recall_batch(generator, 1, 14, 8)
    with pytest.raises(ValueError, match="pairs"):
        tasks.recall_batch(generator, 1, 64, 17)
    stages = [[64, 0.6], [256, 0.2, 4], [1024, 0.2]]
    assert [tasks.curriculum_stage(s, 100, stages) for s in (0, 59, 60, 79, 80, 99, 150)] == [
        (64, None),
        (64, None),
        (256, 4),
        (256, 4),
        (1024, None),
        (1024, None),
        (1024, None),
    ]


# ------------------------------------------------------------------------------------------------- the command
def run_command(*args, timeout=900):
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "studies" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_command_rejects_bad_arguments():
    for args, message in (
        ([], "name a study"),
        (["bert"], "unknown study 'bert'"),
        (["aft", "bert"], "unknown study 'bert'"),
        (["aft", "--seeds", "0"], "--seeds must be >= 1"),
        (["aft", "--jobs", "0"], "--jobs must be >= 1"),
        (["aft", "--quick", "--estimate"], "takes no --quick"),
    ):
        result = run_command(*args, timeout=120)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


@pytest.mark.slow
def test_command_quick_with_two_jobs_then_table(tmp_path):
    """Two runs at a time in their own processes; a second invocation skips them all; --table rewrites CLAIMS.md."""
    result = run_command("gmlp", "--quick", "--jobs", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "6 to run" in result.stdout and (tmp_path / "gmlp" / "results.md").exists()
    records = [json.loads(p.read_text()) for p in (tmp_path / "gmlp" / "runs").glob("*.json")]
    assert len(records) == 6 and all(r["machine"]["torch_threads"] == 1 for r in records)
    result = run_command("gmlp", "--quick", "--out", str(tmp_path))
    assert result.returncode == 0 and "6 done before, 0 to run" in result.stdout
    (tmp_path / "CLAIMS.md").unlink()
    result = run_command("--table", "--out", str(tmp_path))
    assert result.returncode == 0 and "aMLP is better than gMLP" in (tmp_path / "CLAIMS.md").read_text()


# ----------------------------------------------------------------------------------- every study's quick mode
@pytest.mark.slow
@pytest.mark.parametrize("study", runner.STUDIES)
def test_quick_mode(study, tmp_path):
    """Every code path of the study: its runs train and evaluate, the verdicts are computed, results.json /
    results.md / the plot are written, and nothing is missing or failed."""
    results = runner.run_study(study, quick=True, seeds=[0, 1], out=tmp_path, log=lambda _: None)
    assert not results["failed"], results["failed"]
    assert not results["missing"]
    folder = tmp_path / study
    saved = json.loads((folder / "results.json").read_text())
    assert saved["mode"] == "quick" and saved["study"] == study and saved["runs"]
    for record in saved["runs"]:
        assert record["metrics"] and record["machine"]["torch_threads"] == 1 and "commit" in record["package"]
    assert list(folder.glob("*.png")), "no plot"
    markdown = (folder / "results.md").read_text()
    for claim in saved["claims"]:
        assert claim["verdict"] in (REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE)
        assert claim["text"] in markdown
        assert len(claim["effects"]) == 2  # both seeds paired
    module = runner.load_study(study)
    assert len(saved["claims"]) == len(module.claims(saved["settings"]))
    if study == "pareto":
        assert set(saved["extra"]) == {str(c) for c in saved["settings"]["pareto"]["contexts"]}
        assert all(data["front"] for data in saved["extra"].values())
    else:
        assert saved["claims"], "a claim study without claims"
        done = {(r["task"], r["arm"], r["seed"]) for r in saved["runs"]}
        for claim in saved["claims"]:  # every arm of a claim runs every seed
            for arm in filter(None, (claim["arm"], claim["baseline"])):
                assert {(claim["task"], arm, 0), (claim["task"], arm, 1)} <= done, (claim["id"], arm)
