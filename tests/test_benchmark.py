"""Smoke tests of `scripts/benchmarks/benchmark.py`: every mode at tiny sizes (JSON schema, no crash), every
benchmark declaration at every level, vision-only declarations, the fresh-process runner, the report and the generated
sections of the documentation's benchmark page (`report --check`). No timing assertions anywhere."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import hf_efficient

ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = ROOT / "scripts" / "benchmarks" / "benchmark.py"
sys.path.insert(0, str(BENCHMARK.parent))

from bench_lib import decode, images, measure, report, scaling, specs, throughput  # noqa: E402

STATUSES = {"ok", "oom", "timeout", "error", "skipped"}
MODES = ("scaling", "compile", "decode", "throughput", "peers", "hardware", "images", "quality", "recall")
PEERS = {"mamba2", "mamba", "rwkv", "recurrent-gemma"}  # transformers' sub-quadratic LMs beside Llama (issue 23)

# Required fields of an "ok" row, per mode.
OK_FIELDS = {
    "scaling": {"name", "level", "length", "time_s", "peak_memory_mb", "memory_method", "parameters", "dropout"},
    "compile": {"name", "length", "mode", "time_s", "peak_memory_mb", "dropout", "training"},
    "decode": {"name", "prefix", "ms_per_token", "cache_mb", "prefill_s", "dropout"},
    "throughput": {
        *("name", "prefix", "batch", "new_tokens", "prefill_s", "decode_tokens_per_s", "decode_ms_per_step"),
        *("step_ms", "cache_mb", "peak_memory_mb", "dropout", "load_average"),
    },
    "peers": {"pair", "peer", "ours_s", "theirs_s", "ratio"},
    "hardware": {"name", "step_s", "step_gflop", "achieved_gflops", "fraction_of_peak", "dropout", "training"},
    "quality": {"name", "parameters", "non_embedding_parameters", "validation_bpb", "tokens"},
    "recall": {"name", "length", "num_pairs", "accuracy", "steps"},
    "images": {"name", "parameters", "train_images_per_s", "inference_images_per_s", "train_step_s", "inference_s"},
}


def run_benchmark(mode: str, out: Path, *extra: str) -> dict:
    command = [
        sys.executable,
        str(BENCHMARK),
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


def check_dropout_rows(data: dict, entries: list[dict]) -> None:
    """Every row of a training mode records the dropout it ran with, in training mode: the config's defaults for a
    declared entry, 0 for its dropout-0 twin (measured in the same run, named `<name>-dropout0`)."""
    by_name = {e["name"]: e for e in entries}
    twins = {e["name"]: e["dropout_zero_of"] for e in entries if e.get("dropout_zero_of")}
    # the twins are exactly the entries whose config defaults have dropout: the N-gram and R-Transformer ones, GPT-2
    assert set(twins.values()) == {e["name"] for e in entries if e.get("dropout")}
    assert all(n + specs.DROPOUT_ZERO_SUFFIX in by_name for n in twins.values())
    if any(e["model_type"] == "ngram_transformer" for e in entries):
        assert "ngram-8-dropout0" in twins
    assert {(r["name"], r.get("level")) for r in data["results"] if r["name"] in twins} == {
        (r["name"] + specs.DROPOUT_ZERO_SUFFIX, r.get("level")) for r in data["results"] if r["name"] in twins.values()
    }
    for row in data["results"]:
        if row["status"] != "ok":
            continue
        assert row["training"] is True, row
        rates = {k: v for k, v in row["dropout"].items() if v}
        entry = by_name[row["name"]]
        if entry.get("dropout_zero_of"):
            assert not rates and set(entry["dropout_zeroed"]) <= set(row["dropout"]), row
        else:
            assert rates == entry["dropout"], row
    text = "\n".join(report.markdown(Path("."), {data["mode"]: data}).splitlines())
    if data["mode"] in ("scaling", "hardware") and twins:
        assert "0 (defaults zeroed)" in text and "defaults: hidden 0.1" in text


def check_throughput(data: dict, entries: list[dict]) -> None:
    """`throughput`: every causal variant of ours, Llama with its dynamic and its static cache and the peers, at every
    (prefix, batch); `generate()` made the requested tokens, the steps after the first are timed, the target line is
    computed from the points."""
    settings = data["settings"]
    expected = {e["name"] for e in throughput.throughput_entries(entries)}
    causal = {e["name"] for e in entries if e.get("causal_head") and not e.get("baseline")}
    assert causal | PEERS | {specs.REFERENCE, specs.REFERENCE + "-static"} == expected
    points = {(r["name"], r["prefix"], r["batch"]) for r in data["results"]}
    assert points == {(n, p, b) for n in expected for p in settings["prefixes"] for b in settings["batches"]}
    assert all(r["status"] == "ok" for r in data["results"]), [r for r in data["results"] if r["status"] != "ok"]
    for row in data["results"]:
        assert row["new_tokens"] == settings["new_tokens"] and len(row["step_ms"]) == settings["new_tokens"] - 1
        assert row["training"] is False and row["prefill_s"] > 0 and row["decode_tokens_per_s"] > 0
    static = [r for r in data["results"] if r["name"] == specs.REFERENCE + "-static"]
    assert {r["cache_type"] for r in static} == {"StaticCache"}
    fixed = [r for r in data["results"] if r["name"] == "gmlp"]  # n x n SGU: built for prefix + new tokens
    assert all(r["declared_length"] == r["prefix"] + settings["new_tokens"] for r in fixed)
    summary = data["summary"]
    assert summary["ratio_vs_reference"][specs.REFERENCE] == {
        f"{p}x{b}": 1.0 for p in settings["prefixes"] for b in settings["batches"]
    }
    target = summary["target"]
    assert set(target["subquadratic"]) == {
        e["name"] for e in entries if e["name"] in causal and throughput.is_subquadratic(e)
    }
    assert {"ngram-8", "aft-simple", "combiner-fixed"} <= set(target["subquadratic"])
    assert not {"gmlp", "aft-full", "ngram-full"} & set(target["subquadratic"])
    longest = max(settings["prefixes"])
    for name in target["subquadratic"]:
        behind = {
            str(b): summary["ratio_vs_reference"][name][f"{longest}x{b}"]
            for b in settings["batches"]
            if summary["ratio_vs_reference"][name][f"{longest}x{b}"] <= 1.0
        }
        listed = next((m["behind_at_batch"] for m in target["missing"] if m["name"] == name), {})
        assert listed == behind, (name, listed, behind)


def test_throughput_target_is_computed():
    """The target line names exactly the sub-quadratic variants behind Llama at the longest prefix (or not run)."""
    entries = [
        {"name": "fast", "baseline": False, "expected_slope": {"time": 1.0}},
        {"name": "slow", "baseline": False, "expected_slope": {"time": 1.5}},
        {"name": "quadratic", "baseline": False, "expected_slope": {"time": 2.0}},
        {"name": "failed", "baseline": False, "expected_slope": {"time": 1.0}},
        {"name": specs.REFERENCE, "baseline": True, "expected_slope": {"time": 2.0}},
    ]

    def point(name, prefix, batch, rate, status="ok"):
        return {"name": name, "prefix": prefix, "batch": batch, "status": status, "decode_tokens_per_s": rate}

    points = []
    for batch in (1, 8):
        points += [point(specs.REFERENCE, 512, batch, 100.0), point(specs.REFERENCE, 4096, batch, 50.0)]
        points += [point("fast", 512, batch, 10.0), point("fast", 4096, batch, 60.0)]
        points += [point("slow", 512, batch, 200.0), point("slow", 4096, batch, 60.0 if batch == 1 else 40.0)]
        points += [point("quadratic", 4096, batch, 1.0), point("failed", 4096, batch, None, "timeout")]
    summary = throughput.summarise(entries, points, [512, 4096], [1, 8])
    assert summary["target"]["subquadratic"] == ["fast", "slow", "failed"]
    assert summary["target"]["missing"] == [
        {"name": "slow", "behind_at_batch": {"8": 0.8}},
        {"name": "failed", "behind_at_batch": {"1": "timeout", "8": "timeout"}},
    ]
    data = {
        "settings": {"prefixes": [512, 4096], "batches": [1, 8], "new_tokens": 4},
        "results": [{**p, "prefill_s": 0.5, "cache_mb": 1.0} if p["status"] == "ok" else p for p in points],
        "summary": summary,
        "entries": [],
    }
    text = "\n".join(report.throughput_tables(data, {}))
    assert "missed by slow (B=8: 0.80x); failed (B=1: timeout, B=8: timeout)." in text
    assert "| fast | 10.0 (**0.10x**) | 10.0 (**0.10x**) | 60.0 (1.20x) | 60.0 (1.20x) |" in text


def test_declarations_do_not_zero_dropout():
    """Issue 23: the benchmark declarations measure each config class's defaults; no declaration (and no baseline)
    sets a dropout field to 0 — the dropout-0 figure is the derived twin, never the only one."""
    entries, _ = specs.discover()
    for entry in entries:
        for level in ("variant", *specs.LEVELS):
            for key, value in (entry.get(level) or {}).items():
                assert not (specs.is_dropout_field(key) and value == 0), (entry["name"], level, key)
    derived = {
        e["name"]: e for e in specs.with_dropout_zero(specs.split_for_mode(entries, "scaling")[0], specs.SIZES["tiny"])
    }
    assert derived["ngram-8"]["dropout"] == {"hidden_dropout_prob": 0.1}
    assert derived["r-transformer-gru-m7-dropout0"]["variant"]["embedding_dropout"] == 0.0
    assert derived["gpt2"]["dropout"] == {"attn_pdrop": 0.1, "embd_pdrop": 0.1, "resid_pdrop": 0.1}
    assert derived["llama-sdpa"]["dropout"] == {} and "llama-sdpa-dropout0" not in derived
    assert derived["mamba2"]["dropout"] == {} and "aft-simple-dropout0" not in derived


@pytest.mark.parametrize("mode", MODES)
def test_mode_tiny(mode, tmp_path):
    extra = {"scaling": ("--lengths", "32"), "compile": ("--only", "amlp", "ngram-8", "llama-sdpa")}.get(mode, ())
    data = run_benchmark(mode, tmp_path, *extra)
    check_schema(data, mode)
    only = list(extra[1:]) if extra[:1] == ("--only",) else None
    all_entries, skipped = specs.discover(names=only)
    entries, mode_skipped = specs.split_for_mode(all_entries, mode)
    assert data["skipped"] == skipped + mode_skipped
    if mode in ("scaling", "compile", "hardware"):
        # the declared defaults, each beside its dropout-0 twin where the defaults have dropout
        entries = specs.with_dropout_zero(entries, specs.SIZES["tiny"])
        check_dropout_rows(data, entries)
    if mode in ("scaling", "hardware", "compile") and only is None:
        # Mamba's CPU training path is O(L^2) (its reason is recorded); the other peers train
        assert [s["name"] for s in mode_skipped if s["name"] in PEERS] == ["mamba"]
        assert PEERS - {"mamba"} <= {e["name"] for e in entries}
    assert all(s["reason"] for s in data["skipped"])
    names = {row.get("name") for row in data["results"]}
    if mode in ("scaling", "hardware"):
        # every registered text architecture's entries (and both text baselines) ran, and ran fine at tiny sizes
        assert names == {e["name"] for e in entries}
        not_ok = [r for r in data["results"] if r["status"] != "ok"]
        # only the mixer level of a block with no separable FFN (gMLP) is skipped (and RWKV's 1-layer block,
        # which transformers cannot build)
        assert all(r["status"] == "skipped" for r in not_ok), not_ok
        assert all(r["level"] == "mixer" or r["name"] == "rwkv" for r in not_ok), not_ok
        if mode == "scaling":
            assert {r["name"] for r in not_ok} == {e["name"] for e in entries if not scaling.has_mixer_level(e)}
            assert {r["level"] for r in not_ok if r["name"] == "rwkv"} == {"block", "mixer"}
    if mode in ("decode", "quality", "recall"):
        causal = {e["name"] for e in entries if e.get("causal_head") and not e.get("baseline")}
        assert causal <= names and specs.REFERENCE in names
        not_ok = [r for r in data["results"] if r["status"] != "ok"]
        if mode == "decode":  # the mixer level of a block with no separable FFN is skipped, nothing else
            decoding = {e["name"] for e in decode.decoding_entries(entries)}
            assert names == decoding and PEERS - {"recurrent-gemma"} <= names
            assert "recurrent-gemma" in {s["name"] for s in mode_skipped}  # no cache from its forward: throughput
            assert all(r["status"] == "skipped" and r["level"] == "mixer" for r in not_ok), not_ok
            assert {(r["name"], r["level"]) for r in not_ok} == {
                (e["name"], "mixer") for e in entries if e["name"] in decoding and not scaling.has_mixer_level(e)
            }
            assert {r["level"] for r in data["results"]} == {"model", "mixer"}
            mixer = [r for r in data["results"] if r["level"] == "mixer" and r["status"] == "ok"]
            assert {r["name"] for r in mixer} >= {specs.REFERENCE} and all(r["cache_bytes"] > 0 for r in mixer)
        else:
            assert not not_ok, not_ok
    if mode == "scaling":
        assert {row["level"] for row in data["summary"]} == {"block", "mixer", "model"}
        for row in data["summary"]:
            assert "time_slope" in row and "memory_slope" in row and "ratio_vs_reference" in row
            assert row["reference"] == specs.REFERENCE
            assert ("crossover_time" in row) == (row["name"] != specs.REFERENCE)
        assert all(row["peak_memory_mb"] >= 0 for row in data["results"] if row["status"] == "ok")
        assert data["settings"]["mmap_threshold_kb"] == 128
        if sys.platform == "linux":  # glibc's mallopt pinned the threshold in every worker
            ok = [row for row in data["results"] if row["status"] == "ok"]
            assert all("glibc mmap threshold 128 KiB" in row["memory_method"] for row in ok)
    if mode == "compile":
        # each entry eager and compiled (the tiny profile compiles with aot_eager), with no graph break
        assert data["settings"]["backend"] == "aot_eager"
        assert {(r["name"], r["mode"]) for r in data["results"]} == {
            (n, m) for n in ("amlp", "ngram-8", "ngram-8-dropout0", "llama-sdpa") for m in ("eager", "compiled")
        }
        assert all(r["status"] == "ok" for r in data["results"]), data["results"]
        compiled = [r for r in data["results"] if r["mode"] == "compiled"]
        assert all(r["compile_s"] > 0 and r["graph_breaks"] == 0 for r in compiled), compiled
    if mode == "peers":
        assert {row["status"] for row in data["results"]} <= {"ok", "skipped"}, data["results"]
        assert any(row["pair"].startswith("aft-local") for row in data["results"])
    if mode == "hardware":
        assert data["matmul_peak"]["peak_gflops"] > 0
        assert names == {e["name"] for e in entries}
    if mode == "throughput":
        check_throughput(data, entries)
    if mode == "images":
        # every declaration with an image level, beside the ViT reference; the text-only ones are listed as skipped
        assert names == {e["name"] for e in entries} and specs.IMAGE_REFERENCE in names
        assert {e["name"] for e in entries if not e.get("baseline")}, "no declaration has an image level"
        assert all(row["status"] == "ok" for row in data["results"]), data["results"]
        assert all(row["train_ratio_vs_reference"] > 0 for row in data["results"])
        assert {s["name"] for s in mode_skipped} == {e["name"] for e in all_entries if "image" not in e} - set(
            specs.BASELINE_NAMES
        )
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
        levels = [level for level in specs.LEVELS if level in entry]
        assert levels, entry["name"]
        for level in levels:
            length = None if level == "image" else 1024
            config = specs.level_config(entry, level, specs.SIZES["default"], length=length)
            head = "AutoModelForImageClassification" if level == "image" else specs.model_head(entry, level)
            with torch.device("meta"):
                model = specs.build_model(entry, config, head)
            assert model.config.hidden_size == specs.SIZES["default"][level]["hidden_size"], (entry["name"], level)
            if level == "image":
                continue
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
    assert {e["model_type"] for e in entries} == {
        *("gmlp", "llama", "gpt2", "vit"),
        *("mamba2", "mamba", "rwkv", "recurrent_gemma"),
    }


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="entry 0 has no `model`"):
        specs.validate_file(
            {"entries": [{"name": "x", "label": "x", "block": {}, "quality": {}}]}, tmp_path / "x.json"
        )
    with pytest.raises(ValueError, match="entry 0 has no `image`"):
        specs.validate_file({"entries": [{"name": "x", "label": "x", "modality": "vision"}]}, tmp_path / "x.json")
    with pytest.raises(ValueError, match="`modality` is 'audio'"):
        specs.validate_file({"entries": [{"name": "x", "label": "x", "modality": "audio"}]}, tmp_path / "x.json")
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


def test_vision_only_declaration(tmp_path, monkeypatch):
    """A vision-only architecture's declaration (no text levels; or `"modality": "vision"`) is skipped by every text
    mode with the reason recorded and measured by the images mode."""
    data = json.loads((specs.BENCH_CONFIG_DIR / "gmlp.json").read_text())
    text_entry = data["entries"][0]
    vision = {"name": "gmlp-vision", "label": "gMLP (vision only)", "image": text_entry["image"]}
    tagged = {**text_entry, "name": "gmlp-tagged", "modality": "vision"}
    (tmp_path / "gmlp.json").write_text(json.dumps({"model_type": "gmlp", "entries": [vision, tagged]}))
    monkeypatch.setattr(specs, "BENCH_CONFIG_DIR", tmp_path)
    monkeypatch.setattr(specs, "ROOT", tmp_path)
    entries, _ = specs.discover(names=["gmlp", "llama-sdpa", "vit-sdpa"])
    assert {e["name"]: e["modality"] for e in entries} == {
        "gmlp-vision": "vision",
        "gmlp-tagged": "vision",
        "llama-sdpa": "text",
        "vit-sdpa": "vision",
    }
    for mode in specs.TEXT_MODES:
        runnable, skipped = specs.split_for_mode(entries, mode)
        assert [e["name"] for e in runnable] == ["llama-sdpa"]
        assert {s["name"] for s in skipped} == {"gmlp-vision", "gmlp-tagged"}
        assert all("vision-only architecture" in s["reason"] for s in skipped)
    runnable, skipped = specs.split_for_mode(entries, "images")
    assert {e["name"] for e in runnable} == {"gmlp-vision", "gmlp-tagged", "vit-sdpa"} and not skipped
    rows = images.run(runnable, specs.SIZES["tiny"], 2, "cpu", 1, 1.0, log=lambda *_: None)
    assert all(r["status"] == "ok" and r["inference_images_per_s"] > 0 for r in rows), rows
    assert {r["name"]: r["inference_ratio_vs_reference"] for r in rows}["vit-sdpa"] == 1.0


def test_crossover():
    # ours is slower up to 1024, faster from 2048 on: the log ratio crosses 0 between them
    found = scaling.crossover([(512, 2.0, 1.0), (1024, 2.0, 1.0), (2048, 1.0, 2.0), (4096, 1.0, 4.0)])
    assert found["length"] == round(2**10.5) and "between 1024 and 2048" in found["note"]
    assert scaling.crossover([(256, 1.0, 2.0), (512, 1.0, 3.0)])["length"] == 256
    assert scaling.crossover([(256, 1.0, 2.0), (512, 3.0, 2.0)]) is None  # slower at the longest length
    assert scaling.crossover([(256, 1.0, 2.0), (512, 3.0, 2.0), (1024, 1.0, 2.0)])["note"] == "between 512 and 1024"
    assert scaling.crossover([]) is None


def _section(folder: str, body: str, options: str = "") -> str:
    return f"{report.start_marker(folder, options)}\n{body}\n{report.README_END}\n"


def test_readme_sections_are_rewritten_and_checked(tmp_path):
    results = tmp_path / "benchmarks" / "results" / "m"
    results.mkdir(parents=True)
    source = ROOT / report.REFERENCE_RUN
    for mode in ("scaling", "peers"):
        (results / f"{mode}.json").write_text((source / f"{mode}.json").read_text())
    readme = tmp_path / "README.md"
    head, middle, tail = "# x\n\n## One\n\n", "\nprose between\n\n", "\n## After\n\ntext\n"
    readme.write_text(
        head + _section("benchmarks/results/m", "stale table") + middle
        + _section("benchmarks/results/m", "", "absolute=all") + tail
    )  # fmt: skip
    diff = report.check_readme(readme, tmp_path)
    assert "-stale table" in diff
    assert report.update_readme(readme, tmp_path) is True
    assert report.check_readme(readme, tmp_path) == ""
    assert report.update_readme(readme, tmp_path) is False  # idempotent
    text = readme.read_text()
    assert text.startswith(head) and text.endswith(tail) and middle in text and "stale table" not in text
    first, second = (text[s["start"] : s["end"]] for s in report.sections(text))
    assert "Absolute figures (model level" in first and "Absolute figures (block level" not in first
    assert "Absolute figures (block level" in second  # absolute=all: every level's absolute table
    assert "aft-pytorch AFTLocal" in first and "| AFT-simple |" in first
    # A section naming a folder without results, or with no end marker, is an error naming it.
    readme.write_text(_section("benchmarks/results/none", ""))
    with pytest.raises(ValueError, match="benchmarks/results/none"):
        report.check_readme(readme, tmp_path)
    readme.write_text(report.start_marker("benchmarks/results/m") + "\n")
    with pytest.raises(ValueError, match="no matching"):
        report.update_readme(readme, tmp_path)


def test_committed_readme_tables_are_generated():
    """What CI runs: the benchmark sections of the documentation's benchmark page (docs/benchmarks.md) are exactly
    what the committed results generate, and the README has none (it links the page)."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARK), "report", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not report.sections((ROOT / "README.md").read_text())
    text = (ROOT / report.DOCS_PAGE).read_text()
    assert {s["folder"] for s in report.sections(text)} == {report.REFERENCE_RUN}


def test_published_figures_come_from_one_reference_run_of_every_family():
    """The benchmark page publishes one run: every mode measured the same code (the package, the harness and its
    declarations are identical at every commit a mode recorded: a mode run after a change to any of them must be
    rerun), every registered architecture measured (the text modes for the language models, `images` for the
    vision-only ones), and no other results folder."""
    folder = ROOT / report.REFERENCE_RUN
    results = report.load(folder)
    assert set(results) == set(report.MODES)
    commits = sorted({data["git_commit"] for data in results.values()})
    assert None not in commits
    for commit in commits[1:]:
        measured = ["hf_efficient", "scripts/benchmarks", "model_cards/benchmarks"]
        changed = subprocess.run(
            [
                "git",
                "diff",
                "--name-only",
                commits[0],
                commit,
                "--",
                *measured,
                ":(exclude)scripts/benchmarks/bench_lib/report.py",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert not changed, f"the reference run's modes measured different code ({commits[0]} vs {commit}): {changed}"
    measured = {
        p["model_type"] for mode in ("scaling", "images") for p in results[mode]["results"] if p["status"] == "ok"
    }
    families = set(hf_efficient.ARCHITECTURES)
    assert families <= measured, f"not measured in the reference run: {sorted(families - measured)}"
    assert sorted(p.name for p in folder.parent.iterdir() if p.is_dir()) == [folder.name]


@pytest.mark.parametrize(
    "device, message",
    [
        ("cuda:99", "--device 'cuda:99': "),  # no machine has CUDA device 99 (and one without CUDA has none at all)
        ("gpu", "--device 'gpu': expected cpu, cuda or cuda:N"),
    ],
)
def test_an_unavailable_device_stops_once_before_any_point(device, message, tmp_path):
    """Issue 21: `--device cuda` where CUDA is not available used to fail every point with an assertion; it now
    stops at once with one message (for `all` too, before any mode starts), and writes nothing."""
    for mode in ("scaling", "all"):
        command = [sys.executable, str(BENCHMARK), mode, "--tiny", "--device", device]
        started = time.time()
        proc = subprocess.run(
            [*command, "--out", str(tmp_path / mode)], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]], proc.stderr[-2000:]
        assert proc.stderr.strip().startswith(message), proc.stderr
        assert "Traceback" not in proc.stderr and "==" not in proc.stdout  # no mode started
        assert not (tmp_path / mode).exists()
        assert time.time() - started < 120


def test_a_missing_cuda_build_is_named():
    """On a torch without CUDA, `--device cuda` names the reason and the way out."""
    import benchmark
    import torch

    if torch.cuda.is_available():  # the message below is for machines without CUDA; here cuda is accepted
        benchmark.check_device("cuda")
        return
    with pytest.raises(SystemExit, match=r"--device 'cuda': CUDA is not available here .*use --device cpu"):
        benchmark.check_device("cuda")


def test_report_without_matplotlib_names_the_pip_command(tmp_path):
    """`report` draws its plots with matplotlib (the `bench` extra): without it, one message with the install
    command, not a traceback."""
    run_benchmark("recall", tmp_path)
    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.argv = [sys.argv[0], 'report', '--out', sys.argv[1]]; "
        f"sys.path.insert(0, {str(BENCHMARK.parent)!r}); import benchmark; benchmark.main()"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert 'python3 -m pip install -e ".[bench]"' in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_benchmark_extra_declares_what_the_report_needs():
    import configparser

    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(ROOT / "setup.cfg")
    bench = setup_cfg["options.extras_require"]["bench"]
    assert "matplotlib" in bench and "psutil" in bench


def test_at_a_glance_rows_are_the_reference_runs_figures():
    """The README's and model pages' table: one row per default causal LM (no dropout-0 twin), Llama last at 1.00x,
    every other ratio the one the scaling summary and the decode points give."""
    results = report.load(ROOT / report.REFERENCE_RUN)
    table = report.at_a_glance(results, ["aft"])
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    labels = report._labels(results)
    expected = [r["name"] for r in results["scaling"]["summary"] if r["level"] == "model" and r["model_type"] == "aft"]
    assert [row[0].lstrip("| ") for row in rows] == [labels[n] for n in expected] + [labels[specs.REFERENCE]]
    assert rows[-1][1:5] == ["1.00x"] * 4
    summary = {r["name"]: r for r in results["scaling"]["summary"] if r["level"] == "model"}
    for name, row in zip(expected, rows):
        assert row[3] == f"{summary[name]['ratio_vs_reference']['16384']['time']:.2f}x"
    everything = report.at_a_glance(results, None, ("mamba2",))
    assert specs.DROPOUT_ZERO_SUFFIX not in everything and labels["mamba2"] in everything
