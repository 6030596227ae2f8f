"""Smoke tests of `scripts/benchmark.py`: every mode at tiny sizes (JSON schema, no crash), the benchmark-config
files, the fresh-process runner and the report. No timing assertions anywhere."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_lib import measure, report, scaling, specs  # noqa: E402

STATUSES = {"ok", "oom", "timeout", "error", "skipped"}
MODES = ("scaling", "decode", "peers", "hardware", "quality", "recall")

# Required fields of an "ok" row, per mode.
OK_FIELDS = {
    "scaling": {"name", "level", "length", "time_s", "peak_memory_mb", "memory_method", "parameters"},
    "decode": {"name", "prefix", "ms_per_token", "cache_mb", "prefill_s"},
    "peers": {"pair", "peer", "ours_s", "theirs_s", "ratio"},
    "hardware": {"name", "step_s", "step_gflop", "achieved_gflops", "fraction_of_peak"},
    "quality": {"name", "parameters", "non_embedding_parameters", "validation_bpb", "tokens"},
    "recall": {"name", "length", "num_pairs", "accuracy", "steps"},
}


def run_benchmark(mode: str, out: Path, *extra: str) -> dict:
    command = [
        sys.executable,
        str(ROOT / "scripts" / "benchmark.py"),
        mode,
        "--tiny",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run([*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / f"{mode}.json").read_text())


def check_schema(data: dict, mode: str) -> None:
    assert data["schema"] == "hf-efficient-benchmark/1"
    assert data["mode"] == mode and data["profile"] == "tiny"
    for key in ("cpu_model", "cores", "torch", "transformers", "device", "tag"):
        assert key in data["machine"], key
    assert isinstance(data["settings"], dict) and isinstance(data["results"], list) and data["results"]
    assert data["reference"] == specs.REFERENCE
    for row in data["results"]:
        assert row["status"] in STATUSES, row
        if row["status"] == "ok":
            missing = OK_FIELDS[mode] - set(row)
            assert not missing, (missing, row)
        else:
            assert row.get("error") or row.get("reason"), row


@pytest.mark.parametrize("mode", MODES)
def test_mode_tiny(mode, tmp_path):
    extra = ("--lengths", "32") if mode == "scaling" else ()
    data = run_benchmark(mode, tmp_path, *extra)
    check_schema(data, mode)
    entries, skipped = specs.discover()
    assert data["skipped"] == skipped
    names = {row.get("name") for row in data["results"]}
    if mode in ("scaling", "hardware"):
        # every registered architecture's entries (and both baselines) ran, and ran fine at tiny sizes
        assert names == {e["name"] for e in entries}
        not_ok = [r for r in data["results"] if r["status"] != "ok"]
        # only the mixer level of a block with no separable FFN (gMLP) is skipped
        assert all(r["status"] == "skipped" and r["level"] == "mixer" for r in not_ok), not_ok
        if mode == "scaling":
            assert {r["name"] for r in not_ok} == {e["name"] for e in entries if not scaling.has_mixer_level(e)}
    if mode in ("decode", "quality", "recall"):
        causal = {e["name"] for e in entries if e.get("causal_head") and not e.get("baseline")}
        assert causal <= names and specs.REFERENCE in names
        assert all(row["status"] == "ok" for row in data["results"]), [
            r for r in data["results"] if r["status"] != "ok"
        ]
    if mode == "scaling":
        assert {row["level"] for row in data["summary"]} == {"block", "mixer", "model"}
        for row in data["summary"]:
            assert "time_slope" in row and "memory_slope" in row and "ratio_vs_reference" in row
        assert all(row["peak_memory_mb"] >= 0 for row in data["results"] if row["status"] == "ok")
    if mode == "peers":
        assert {row["status"] for row in data["results"]} <= {"ok", "skipped"}, data["results"]
    if mode == "hardware":
        assert data["matmul_peak"]["peak_gflops"] > 0
    # The report renders every mode's table (and its plot) from the JSON alone.
    results = report.load(tmp_path)
    assert set(results) == {mode}
    written = report.plots(tmp_path, results)
    text = report.markdown(tmp_path, results)
    assert "|---|" in text
    for png in written:
        assert (tmp_path / png).stat().st_size > 0


def test_benchmark_configs_are_valid_and_build():
    """Every `model_cards/benchmarks/*.json` belongs to a registered architecture and builds at every level."""
    import torch

    import hf_efficient

    files = sorted(specs.BENCH_CONFIG_DIR.glob("*.json"))
    assert files
    for path in files:
        data = json.loads(path.read_text())
        specs.validate_file(data, path)
        assert data["model_type"] == path.stem and path.stem in hf_efficient.ARCHITECTURES
    entries, _ = specs.discover()
    for entry in entries:
        for level in ("block", "model", "quality"):
            config = specs.level_config(entry, level, specs.SIZES["default"], length=1024)
            with torch.device("meta"):
                model = specs.build_model(entry, config, specs.model_head(entry, level))
            assert model.config.hidden_size == specs.SIZES["default"][level]["hidden_size"], (entry["name"], level)
            if entry.get("ffn_module"):
                assert specs.get_submodule(model, entry["ffn_module"]) is not None, (
                    entry["name"],
                    entry["ffn_module"],
                )


def test_architecture_without_config_is_reported(tmp_path, monkeypatch):
    (tmp_path / "gmlp.json").write_text((specs.BENCH_CONFIG_DIR / "gmlp.json").read_text())
    monkeypatch.setattr(specs, "BENCH_CONFIG_DIR", tmp_path)
    monkeypatch.setattr(specs, "ROOT", tmp_path)
    entries, skipped = specs.discover()
    import hf_efficient

    assert {s["model_type"] for s in skipped} == set(hf_efficient.ARCHITECTURES) - {"gmlp"}
    assert all("no benchmark config" in s["reason"] for s in skipped)
    assert {e["model_type"] for e in entries} == {"gmlp", "llama", "gpt2"}


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="entry 0 has no `model`"):
        specs.validate_file(
            {"entries": [{"name": "x", "label": "x", "block": {}, "quality": {}}]}, tmp_path / "x.json"
        )
    with pytest.raises(ValueError, match="Bad template"):
        specs.evaluate_templates("{no_such_size * 2}", {"hidden_size": 8})
    assert specs.evaluate_templates({"a": ["{2 * hidden_size}", 3]}, {"hidden_size": 8}) == {"a": [16, 3]}


def test_fit_slope():
    assert scaling.fit_slope([(n, 3.0 * n**1.5) for n in (256, 512, 1024, 4096)]) == pytest.approx(1.5)
    assert scaling.fit_slope([(1024, 1.0)]) is None


def _sleep(seconds):
    time.sleep(seconds)
    return {"status": "ok"}


def _allocate(gigabytes):
    import torch

    measure.cap_address_space(256 << 20)
    torch.empty(int(gigabytes * 2**30), dtype=torch.uint8).fill_(1)
    return {"status": "ok"}


def _raise():
    raise ValueError("bad length")


def test_fresh_process_statuses():
    assert measure.run_fresh(_sleep, {"seconds": 0}, timeout=60)["status"] == "ok"
    assert measure.run_fresh(_sleep, {"seconds": 30}, timeout=1)["status"] == "timeout"
    assert measure.run_fresh(_allocate, {"gigabytes": 4}, timeout=60)["status"] == "oom"
    failed = measure.run_fresh(_raise, {}, timeout=60)
    assert failed["status"] == "error" and "bad length" in failed["error"]


def test_readme_section_is_replaced_in_place(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Other\n\ntext\n")
    report.update_readme(readme, "first")
    report.update_readme(readme, "second")
    text = readme.read_text()
    assert text.count("## Benchmarks") == 1 and "second" in text and "first" not in text
    assert text.startswith("# x\n\n## Other\n\ntext\n")
