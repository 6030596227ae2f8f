"""The ecosystem claims, proven with real runs of the `hf-efficient` command on tiny models: pipelines for every
head, evaluate / generate / publish, an offline Hub round trip (with and without hf-efficient installed), PEFT LoRA,
resuming an interrupted run, and multi-process training with `accelerate launch` (DDP over gloo on CPU)."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, pipeline

import hf_efficient
from hf_efficient import cli
from hf_efficient.data import stdlib_lm_dataset
from tests.helpers import InterruptAt
from tests.model_tester import two_process_launch

REPO = Path(__file__).resolve().parents[1]
TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,max_position_embeddings=32"
QUIET = ["--disable-tqdm", "--no-sample", "--logging-steps", "100", "--max-eval-samples", "32"]
SMALL_TEXT = ["--max-train-bytes", "40000", "--max-eval-bytes", "4000"]
RUNS = {
    # a tiny gMLP (the clm task's default model, the main job's AFT-conv, is trained in test_cli)
    "clm": ["--task", "clm", "--model", "gmlp-main-job", "--config-overrides", TINY, *SMALL_TEXT, "--max-steps", "8"]
    + ["--learning-rate", "1e-2"],
    "mlm": ["--task", "mlm", "--config-overrides", TINY, *SMALL_TEXT, "--max-steps", "4"],
    "seq-cls": ["--task", "seq-cls", "--config-overrides", TINY, "--max-steps", "4", "--max-train-samples", "64"],
    "image-cls": [
        "--task",
        "image-cls",
        "--config-overrides",
        "hidden_size=16,intermediate_size=32,num_hidden_layers=1",
    ]
    + ["--max-steps", "4", "--max-train-samples", "64"],
}


def shared_root(tmp_path_factory) -> Path:
    """A folder shared by the pytest-xdist workers of this session (not by other sessions)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """`trained(task)`: the folder of a tiny model trained by `hf-efficient train` (once per session)."""
    root = shared_root(tmp_path_factory) / "hf-efficient-runs"
    root.mkdir(exist_ok=True)

    def get(task: str) -> Path:
        folder = root / task
        with FileLock(str(root / f"{task}.lock")):
            if not folder.exists():
                code = cli.main(["train", *RUNS[task], *QUIET, "--save-strategy", "no", "--output-dir", str(folder)])
                assert code == 0
        return folder

    return get


def assert_hub_ready(folder: Path, task: str):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "all_results.json"} <= names, names
    assert {"configuration_gmlp.py", "modeling_gmlp.py", "ops_gmlp.py"} <= names
    assert "tokenizer_config.json" in names if task != "image-cls" else "preprocessor_config.json" in names
    if task == "clm":
        assert "generation_config.json" in names
    config = json.loads((folder / "config.json").read_text())
    assert "AutoConfig" in config["auto_map"] and "AutoModelForCausalLM" in config["auto_map"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\n") and "model-index:" in card and "library_name: transformers" in card
    results = json.loads((folder / "all_results.json").read_text())
    metric = "eval_bits_per_byte" if task == "clm" else "eval_accuracy" if task != "mlm" else "eval_loss"
    assert metric in results and f"{results[metric]:.4g}" in card


# ------------------------------------------------------------------------------------------ outputs and pipelines
def test_train_outputs_are_hub_ready_and_pipelines_work(trained, tmp_path):
    for task in RUNS:
        assert_hub_ready(trained(task), task)
    results = json.loads((trained("clm") / "all_results.json").read_text())
    assert results["world_size"] == 1 and results["global_step"] == 8
    assert results["eval_bits_per_byte"] == pytest.approx(results["eval_loss"] / np.log(2))
    assert results["eval_bits_per_byte"] < 8  # better than uniform bytes after 8 steps

    generator = pipeline("text-generation", model=str(trained("clm")))
    text = generator("def f(x):", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert text.startswith("def f(x):")

    fill = pipeline("fill-mask", model=str(trained("mlm")))
    predictions = fill(f"import o{fill.tokenizer.mask_token}")
    assert len(predictions) == 5 and all("token_str" in p for p in predictions)

    classify = pipeline("text-classification", model=str(trained("seq-cls")))
    label = classify("async def main(): await asyncio.sleep(1)", truncation=True)[0]["label"]
    assert label in {"asyncio", "email", "tkinter", "unittest"}

    for task in ("seq-cls", "image-cls"):  # `evaluate` reproduces each classifier's final validation accuracy
        argv = ["evaluate", str(trained(task)), "--max-eval-samples", "32", "--disable-tqdm", "--output-file"]
        assert cli.main([*argv, str(tmp_path / f"{task}.json")]) == 0
        measured = json.loads((tmp_path / f"{task}.json").read_text())
        expected = json.loads((trained(task) / "all_results.json").read_text())
        assert measured["eval_accuracy"] == pytest.approx(expected["eval_accuracy"])

    images = pipeline("image-classification", model=str(trained("image-cls")))
    digit = Image.fromarray((np.eye(8) * 255).astype(np.uint8), mode="L")
    top = images(digit)
    assert top[0]["label"] in {str(d) for d in range(10)} and len(top) == 5


def test_evaluate_generate_and_publish(trained, tmp_path, capsys):
    folder = trained("clm")
    # evaluate reproduces the final evaluation of the training run (same validation blocks)
    metrics_file = tmp_path / "metrics.json"
    argv = ["evaluate", str(folder), "--max-eval-bytes", "4000", "--max-eval-samples", "32", "--disable-tqdm"]
    assert cli.main([*argv, "--output-file", str(metrics_file)]) == 0
    measured = json.loads(metrics_file.read_text())
    trained_results = json.loads((folder / "all_results.json").read_text())
    assert measured["eval_loss"] == pytest.approx(trained_results["eval_loss"], abs=1e-5)
    assert measured["eval_bits_per_byte"] == pytest.approx(trained_results["eval_bits_per_byte"], abs=1e-5)

    capsys.readouterr()
    assert (
        cli.main(["generate", str(folder), "--prompt", "import ", "--prompt", "class ", "--max-new-tokens", "8"]) == 0
    )
    out = capsys.readouterr().out
    assert "--- sample 1\nimport " in out and "--- sample 2\nclass " in out
    assert cli.main(["generate", str(folder), "--greedy", "--num-beams", "2", "--max-new-tokens", "100"]) == 0
    assert "generating 28 tokens, not 100: the model's context is 32" in capsys.readouterr().err

    # publish into a new folder; the upload fails (no network) with one line, and the folder stays complete
    published = tmp_path / "published"
    code = subprocess.run(
        [sys.executable, "-m", "hf_efficient", "publish", str(folder), "--output-dir", str(published)]
        + ["--repo-id", "someone/tiny-gmlp"],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert code.returncode == 1, code.stderr
    last = code.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-efficient: error: upload to the Hub repo 'someone/tiny-gmlp' failed")
    assert "complete and unchanged" in last and "Traceback" not in code.stderr
    assert_hub_ready(published, "clm")
    assert not any(p.name.startswith("checkpoint-") for p in published.iterdir())
    assert "name: someone/tiny-gmlp" in (published / "README.md").read_text()


def test_fine_tune_a_checkpoint_with_a_new_head(trained, tmp_path):
    """A causal checkpoint fine-tuned as a classifier: the body's weights come from it, the head is new."""
    out = tmp_path / "classifier"
    argv = ["train", "--model", str(trained("clm")), "--task", "seq-cls", "--max-steps", "2"]
    assert (
        cli.main([*argv, "--max-train-samples", "32", *QUIET, "--save-strategy", "no", "--output-dir", str(out)]) == 0
    )
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GMLPForSequenceClassification"] and len(config["id2label"]) == 4
    assert json.loads((out / "all_results.json").read_text())["model_source"] == "checkpoint"
    assert_hub_ready(out, "seq-cls")


# ------------------------------------------------------------------------------------------ offline Hub round trip
def place_in_hub_cache(folder: Path, cache: Path, repo_id: str) -> None:
    """Lay the folder out as `huggingface_hub` downloads it: blobs by hash, a snapshot of symlinks, refs/main."""
    repo = cache / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            (repo / "blobs" / digest).write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(Path("..", "..", "blobs", digest))


def test_offline_hub_round_trip_with_and_without_hf_efficient(trained, tmp_path):
    repo_id = "hf-efficient-tests/tiny-gmlp-clm"
    place_in_hub_cache(trained("clm"), tmp_path / "hf_home", repo_id)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["hf_efficient"] = None  # as on a machine without hf-efficient
        import torch, transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        repo = {repo_id!r}
        tokenizer = AutoTokenizer.from_pretrained(repo)
        ids = tokenizer("def f(x):", add_special_tokens=False, return_tensors="pt").input_ids
        remote = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True).eval()
        assert not type(remote).__module__.startswith("hf_efficient"), type(remote).__module__
        with torch.no_grad():
            remote_logits = remote(ids).logits
        remote_tokens = remote.generate(ids, max_new_tokens=6, do_sample=False)

        del sys.modules["hf_efficient"]
        import hf_efficient  # installed: the registered classes load the same checkpoint by repo id
        local = AutoModelForCausalLM.from_pretrained(repo).eval()
        assert type(local).__module__.startswith("hf_efficient."), type(local).__module__
        with torch.no_grad():
            torch.testing.assert_close(local(ids).logits, remote_logits, atol=1e-5, rtol=1e-5)
        assert torch.equal(local.generate(ids, max_new_tokens=6, do_sample=False), remote_tokens)
        text = transformers.pipeline("text-generation", model=repo)("def ", max_new_tokens=4)[0]["generated_text"]
        assert text.startswith("def ")
        print("ROUND-TRIP-OK")
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_HUB_CACHE", "TRANSFORMERS_CACHE")}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert "ROUND-TRIP-OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------- PEFT
def test_peft_lora_trains_saves_and_reloads(trained, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    folder = trained("clm")
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(folder),
        # The channel projections. (Not `sgu.proj`: the spatial op reads its weight directly, so a LoRA wrapper
        # around that module would never be called; `modules_to_save=["proj"]` trains it fully instead.)
        LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], task_type="CAUSAL_LM"),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in model.parameters()) / 2
    base_before = {k: v.clone() for k, v in model.named_parameters() if "lora_" not in k}
    data = stdlib_lm_dataset(block_size=32, max_train_bytes=20_000, max_validation_bytes=2_000)
    args = TrainingArguments(
        str(tmp_path / "run"),
        max_steps=5,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        label_names=["labels"],
    )
    losses = Trainer(model=model, args=args, train_dataset=data["train"]).train()
    assert np.isfinite(losses.training_loss)
    for name, value in model.named_parameters():
        if "lora_B" in name:
            assert value.abs().sum() > 0, name  # B starts at zero: training moved it
        elif "lora_" not in name:
            assert torch.equal(value, base_before[name]), name  # the base stays frozen

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    ids = AutoTokenizer.from_pretrained(folder)("def f(x):", add_special_tokens=False, return_tensors="pt").input_ids
    model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits, expected)


# --------------------------------------------------------------------------------------------------------- resume
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, capsys):
    argv = ["train", *RUNS["clm"][:-4], "--max-steps", "6", "--save-steps", "3", *QUIET, "--learning-rate", "1e-2"]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert cli.main([*argv, "--output-dir", str(whole)]) == 0

    with pytest.raises(KeyboardInterrupt):
        cli.run([*argv, "--output-dir", str(interrupted)], callbacks=[InterruptAt(4)])
    partial = tmp_path / "interrupted.partial"
    assert not interrupted.exists(), "an interrupted run must not look complete"
    assert (partial / "checkpoint-3" / "trainer_state.json").is_file()
    capsys.readouterr()
    assert cli.main([*argv, "--output-dir", str(interrupted)]) == 1  # refuses to silently restart
    assert "--resume-from-checkpoint" in capsys.readouterr().err

    assert cli.main([*argv, "--output-dir", str(interrupted), "--resume-from-checkpoint"]) == 0
    assert interrupted.is_dir() and not partial.exists()
    assert json.loads((interrupted / "all_results.json").read_text())["global_step"] == 6
    a, b = load_file(whole / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------- multi-process DDP
def test_accelerate_launch_two_processes_matches_one_process(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` of `python -m hf_efficient train`: two processes train with
    DDP (gloo on CPU), the run records world size 2, and the weights equal one process with the same global batch."""
    common = ["--task", "clm", "--model", "gmlp-main-job", "--config-overrides", TINY, *SMALL_TEXT, "--max-steps", "4"]
    common += ["--learning-rate", "1e-2"]
    # (--logging-steps 1: the logged train_loss is then the mean over both processes at every step.)
    common += ["--warmup-steps", "0", "--save-strategy", "no", "--seed", "0", *QUIET, "--logging-steps", "1"]
    common += ["--max-train-minutes", "60"]  # not reached; its per-step decision is broadcast from rank 0
    launch = [*two_process_launch(tmp_path), "-m", "hf_efficient", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ddp = subprocess.run(
        [*launch, *common, "--per-device-train-batch-size", "2", "--output-dir", str(tmp_path / "ddp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (
        cli.main(["train", *common, "--per-device-train-batch-size", "4", "--output-dir", str(tmp_path / "one")]) == 0
    )

    ddp_results = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    one_results = json.loads((tmp_path / "one" / "all_results.json").read_text())
    assert ddp_results["world_size"] == 2 and ddp_results["num_processes"] == 2
    assert ddp_results["distributed_type"].endswith("MULTI_CPU")
    assert one_results["world_size"] == 1
    assert ddp_results["global_batch_size"] == one_results["global_batch_size"] == 4
    assert ddp_results["train_loss"] == pytest.approx(one_results["train_loss"], abs=1e-5)
    a, b = load_file(tmp_path / "ddp" / "model.safetensors"), load_file(tmp_path / "one" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4)
    assert hf_efficient.ARCHITECTURES  # the launched command used the same registry


def test_accelerate_launch_two_processes_follow_one_time_sized_plan(tmp_path):
    """--max-train-minutes without --max-steps under `accelerate launch --multi_gpu --num_processes 2`: rank 0's
    plan (and its revisions) reaches both processes, which stop at the same step (a process that took one more DDP
    step than the other would hang in its gradient all-reduce), and the run records the plan."""
    common = ["--task", "clm", "--config-overrides", TINY, *SMALL_TEXT, "--save-strategy", "no", *QUIET]
    common += ["--max-train-minutes", "0.15", "--per-device-train-batch-size", "2", "--logging-steps", "1"]
    launch = [*two_process_launch(tmp_path), "-m", "hf_efficient", "train"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    ddp = subprocess.run(
        [*launch, *common, "--output-dir", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=500
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    results = json.loads((tmp_path / "ddp" / "all_results.json").read_text())
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert results["world_size"] == 2 and results["schedule_sized_to_time_budget"]
    assert 2 < results["max_steps"] == state["max_steps"] < 1_000_000
    assert results["global_step"] == results["max_steps"] or results["stopped_by_time_budget"]


# -------------------------------------------------------------------------------------------------------- seq2seq
def test_seq2seq_task_on_an_encoder_decoder_checkpoint(tmp_path):
    """The seq2seq task is not tied to hf-efficient's own encoder-decoder: it trains any encoder-decoder checkpoint
    (here a tiny T5) on the embedded data, and its evaluation generates (BLEU / chrF besides the loss)."""
    from transformers import T5Config, T5ForConditionalGeneration

    from hf_efficient.data import default_tokenizer

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=384, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "t5")
    default_tokenizer().save_pretrained(tmp_path / "t5")
    argv = ["train", "--model", str(tmp_path / "t5"), "--task", "seq2seq", "--max-steps", "3", "--block-size", "64"]
    assert cli.main([*argv, "--max-train-samples", "64", *QUIET, "--output-dir", str(tmp_path / "out")]) == 0
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["task"] == "seq2seq" and np.isfinite(results["eval_bits_per_byte"])
    assert 0 <= results["eval_bleu"] <= 100 and 0 <= results["eval_chrf"] <= 100
    assert "model-index:" in (tmp_path / "out" / "README.md").read_text()
