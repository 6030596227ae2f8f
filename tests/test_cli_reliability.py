"""The `hf-efficient` command when things go wrong (issues 13 and 14, command side), with real runs of the command on
tiny models and real files: overwriting never deletes the user's files, interrupted runs resume from the newest
complete checkpoint and report the whole run, output folders that cannot be renamed into place fail before training,
damaged weights and mismatched configs are named, the saved generation config leaves lengths to the caller,
fixed-length models stop at their limit, and --disable-tqdm silences every progress bar."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import hf_efficient
from hf_efficient import cli
from hf_efficient.cli import arguments, tasks
from hf_efficient.cli.generate import default_generation_config, position_limit
from hf_efficient.cli.outputs import install_output
from hf_efficient.cli.tasks.image import extra_tokens
from hf_efficient.data import default_tokenizer
from tests.helpers import InterruptAt

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,max_position_embeddings=32"
QUIET = ["--disable-tqdm", "--no-sample", "--max-eval-samples", "8", "--max-eval-bytes", "2000"]
# A tiny causal gMLP (a 32-position limit that generation must respect), not the clm task's default AFT-conv
CLM = ["train", "--task", "clm", "--model", "gmlp-main-job", "--config-overrides", TINY, "--max-train-bytes", "20000"]
CLM += ["--learning-rate", "1e-2"]
BAR = re.compile(r"\d+%\||it/s\]|s/it\]")  # a tqdm progress bar


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_line(err: str) -> str:
    lines = err.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Real outputs of the command: a tiny causal gMLP (4 steps, checkpoints at 2 and 4 kept in the folder) and a
    tiny masked-LM gMLP."""
    root = tmp_path_factory.mktemp("runs")
    clm = root / "clm"
    argv = [*CLM, "--max-steps", "4", "--save-steps", "2", *QUIET, "--output-dir", clm]
    assert cli.main([str(a) for a in argv]) == 0
    mlm = root / "mlm"
    argv = ["train", "--task", "mlm", "--config-overrides", TINY, "--max-train-bytes", "20000", "--max-steps", "1"]
    assert cli.main([str(a) for a in [*argv, *QUIET, "--save-strategy", "no", "--output-dir", mlm]]) == 0
    return {"clm": clm, "mlm": mlm}


def copy_folder(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


# ------------------------------------------------------------------------------------- issue 13: nothing lost
def test_overwrite_never_deletes_the_users_files(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = [*CLM, "--max-steps", "1", "--save-strategy", "no", *QUIET]
    out = tmp_path / "out"
    out.mkdir()
    corpus = out / "corpus.txt"
    corpus.write_text("def f(x):\n    return x\n" * 400)
    notes = out / "README.md"
    notes.write_text("my notes\n")
    code, _, err = run_cli(capsys, *run, "--dataset", corpus, "--output-dir", out, "--overwrite-output-dir")
    assert code == 1
    line = last_line(err)
    assert "--overwrite-output-dir replaces only an earlier run's output" in line, line
    assert "README.md" in line and "corpus.txt" in line and "never deleted" in line
    assert corpus.read_text().startswith("def f(x):") and notes.read_text() == "my notes\n"
    assert not (tmp_path / "out.partial").exists()

    # `--output-dir .` in a working directory with other files: refused, nothing touched
    (tmp_path / "keep.py").write_text("print('mine')\n")
    code, _, err = run_cli(capsys, *run, "--output-dir", ".", "--overwrite-output-dir")
    assert code == 1 and "never deleted" in last_line(err) and "keep.py" in last_line(err)
    assert (tmp_path / "keep.py").read_text() == "print('mine')\n" and corpus.is_file()

    # an earlier run's output is replaced (its checkpoints and weights too); the new run's files are there
    fresh = tmp_path / "fresh"
    checkpoints = ["--max-steps", "2", "--save-strategy", "steps", "--save-steps", "1"]
    assert run_cli(capsys, *run, *checkpoints, "--output-dir", fresh)[0] == 0
    assert (fresh / "checkpoint-2").is_dir()
    first = load_file(fresh / "model.safetensors")
    assert run_cli(capsys, *run, "--seed", "3", "--output-dir", fresh, "--overwrite-output-dir")[0] == 0
    assert not (fresh / "checkpoint-2").exists() and not (tmp_path / "fresh.partial").exists()
    second = load_file(fresh / "model.safetensors")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    assert json.loads((fresh / "all_results.json").read_text())["global_step"] == 1

    # a user file added to an earlier output folder: still refused, still there
    (fresh / "eval_notes.txt").write_text("keep")
    code, _, err = run_cli(capsys, *run, "--output-dir", fresh, "--overwrite-output-dir")
    assert code == 1 and "eval_notes.txt" in last_line(err)
    assert (fresh / "eval_notes.txt").read_text() == "keep" and (fresh / "model.safetensors").is_file()

    # publish --output-dir follows the same rule
    code, _, err = run_cli(capsys, "publish", fresh, "--output-dir", out, "--overwrite-output-dir", "--no-evaluate")
    assert code == 1 and "corpus.txt" in last_line(err) and corpus.is_file() and notes.read_text() == "my notes\n"

    # the final move itself keeps anything that is not the run's (e.g. a file that appeared during the run)
    staging, final = tmp_path / "s", tmp_path / "f"
    staging.mkdir()
    final.mkdir()
    (staging / "config.json").write_text("{}")
    (final / "config.json").write_text('{"old": 1}')
    (final / "checkpoint-7").mkdir()
    (final / "data.jsonl").write_text("mine")
    install_output(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "data.jsonl"] and not staging.exists()
    assert (final / "config.json").read_text() == "{}" and (final / "data.jsonl").read_text() == "mine"


class InterruptAfterSaving(TrainerCallback):
    """Ctrl-C right after the checkpoint of a given step is written (killed during the final evaluation/save)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


def test_resume_picks_the_newest_complete_checkpoint_and_reports_the_whole_run(tmp_path, capsys):
    run = [*CLM, "--max-steps", "6", "--save-steps", "3", "--logging-steps", "2", "--save-total-limit", "3", *QUIET]
    whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
    assert run_cli(capsys, *run, "--output-dir", whole)[0] == 0
    expected = json.loads((whole / "all_results.json").read_text())
    assert expected["global_step"] == 6

    with pytest.raises(KeyboardInterrupt):
        cli.run([str(a) for a in [*run, "--output-dir", interrupted]], callbacks=[InterruptAt(4)])
    partial = tmp_path / "interrupted.partial"
    assert (partial / "checkpoint-3" / "trainer_state.json").is_file() and not interrupted.exists()
    # What a run killed while saving leaves: a folder with only config.json, and one with an empty trainer_state
    (partial / "checkpoint-9").mkdir()
    shutil.copy(partial / "checkpoint-3" / "config.json", partial / "checkpoint-9")
    shutil.copytree(partial / "checkpoint-3", partial / "checkpoint-6")
    (partial / "checkpoint-6" / "trainer_state.json").write_text("")

    # naming a half-written checkpoint is a clear error that points at the good one
    code, _, err = run_cli(
        capsys, *run, "--output-dir", interrupted, "--resume-from-checkpoint", partial / "checkpoint-6"
    )
    assert code == 1
    assert "is not a complete Trainer checkpoint (trainer_state.json is empty" in last_line(err)
    assert f"the last complete one is '{partial / 'checkpoint-3'}'" in last_line(err)

    code, _, err = run_cli(capsys, *run, "--output-dir", interrupted, "--resume-from-checkpoint")
    assert code == 0, err
    assert "skipping the incomplete checkpoint checkpoint-9 (no trainer_state.json (it holds config.json)" in err
    assert "skipping the incomplete checkpoint checkpoint-6 (trainer_state.json is empty" in err
    assert f"resuming from {partial / 'checkpoint-3'}" in err
    assert not partial.exists() and not (interrupted / "checkpoint-9").exists()
    results = json.loads((interrupted / "all_results.json").read_text())
    assert results["global_step"] == 6 and results["resumed_from_step"] == 3 and results["train_loss_steps"] == 6
    # the loss of the whole run (steps 1-6), not of the resumed part only
    assert results["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
    assert results["train_loss_resumed_part"] != pytest.approx(expected["train_loss"], abs=1e-3)
    card = (interrupted / "README.md").read_text()
    assert "| training steps | 6 |" in card and f"| final training loss | {results['train_loss']:.4g} |" in card
    a, b = load_file(whole / "model.safetensors"), load_file(interrupted / "model.safetensors")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-6)

    # killed after the last checkpoint was written (during the final evaluation / save): resumes with no step left
    late = tmp_path / "late"
    with pytest.raises(KeyboardInterrupt):
        cli.run([str(a) for a in [*run, "--output-dir", late]], callbacks=[InterruptAfterSaving(6)])
    assert run_cli(capsys, *run, "--output-dir", late, "--resume-from-checkpoint")[0] == 0
    results = json.loads((late / "all_results.json").read_text())
    assert results["global_step"] == 6 and results["train_loss"] == pytest.approx(expected["train_loss"], abs=1e-5)
    c = load_file(late / "model.safetensors")
    for key in a:
        torch.testing.assert_close(c[key], a[key], atol=1e-6, rtol=1e-6)


def test_resume_with_no_complete_checkpoint_names_the_incomplete_ones(tmp_path, capsys):
    partial = tmp_path / "out.partial"
    (partial / "checkpoint-2").mkdir(parents=True)
    (partial / "checkpoint-2" / "config.json").write_text("{}")
    code, _, err = run_cli(capsys, *CLM, *QUIET, "--output-dir", tmp_path / "out", "--resume-from-checkpoint")
    assert code == 1
    assert "no complete checkpoint-* folder" in last_line(err) and "incomplete: checkpoint-2" in last_line(err)


def test_an_output_folder_that_cannot_be_renamed_into_place_fails_before_training(tmp_path, capsys):
    mount = next(p for p in ("/dev/shm", "/proc", "/sys", "/dev") if os.path.ismount(p))
    for target, expected in (
        (mount, "is a mount point"),
        ("/proc/hf-efficient-test-out", "does not allow creating and renaming folders"),  # read-only for root too
        (tmp_path / "a-file" / "out", "is not a folder"),
    ):
        (tmp_path / "a-file").write_text("x")
        code, out, err = run_cli(capsys, *CLM, *QUIET, "--output-dir", target, "--overwrite-output-dir")
        assert code == 1 and expected in last_line(err), (target, err)
        assert "hf-efficient: training" not in out  # failed before any data, model or training
    assert not Path(mount + ".partial").exists()


def test_damaged_weights_name_the_file_and_the_last_good_checkpoint(folders, tmp_path, capsys):
    broken = copy_folder(folders["clm"], tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for argv in (
        ["evaluate", broken, *QUIET[:1]],
        ["generate", broken, "--max-new-tokens", "2"],
        ["train", "--model", broken, "--max-steps", "1", *QUIET, "--output-dir", tmp_path / "o"],
    ):
        code, _, err = run_cli(capsys, *argv)
        line = last_line(err)
        assert code == 1 and f"the weights file '{weights}' is damaged or truncated" in line, line
        assert f"the last good checkpoint is '{broken / 'checkpoint-4'}'" in line, line
    # the suggested checkpoint works
    assert run_cli(capsys, "generate", broken / "checkpoint-4", "--max-new-tokens", "2")[0] == 0


# ------------------------------------------------------------------------- issue 14: generation config and length
def test_saved_generation_config_leaves_the_length_to_the_caller(folders, capsys):
    saved = json.loads((folders["clm"] / "generation_config.json").read_text())
    assert "max_new_tokens" not in saved and "max_length" not in saved
    assert saved["do_sample"] is True and saved["pad_token_id"] == 0
    model = AutoModelForCausalLM.from_pretrained(folders["clm"]).eval()
    ids = AutoTokenizer.from_pretrained(folders["clm"])(
        "def f", add_special_tokens=False, return_tensors="pt"
    ).input_ids
    for length in (9, 14):
        output = model.generate(ids, max_length=length, do_sample=False, eos_token_id=None)
        assert output.shape == (1, length)
    output = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert output.shape == (1, ids.shape[1] + 3)
    # the command keeps its own default (200 new tokens), capped by the model's 32 positions with a note
    code, out, err = run_cli(capsys, "generate", folders["clm"], "--prompt", "def f", "--greedy")
    assert code == 0 and "generating 27 tokens, not 200: the model's context is 32" in err
    assert arguments.DEFAULT_MAX_NEW_TOKENS == 200


def save_causal(folder: Path, config) -> Path:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = default_generation_config(model, default_tokenizer())
    model.save_pretrained(folder)
    default_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "model_type, fields",
    [
        ("gmlp", {"max_position_embeddings": 24}),
        ("combiner", {"max_position_embeddings": 24}),
        ("aft", {"max_position_embeddings": 24, "aft_type": "full", "position_bias_dim": None}),
    ],
)
def test_generate_stops_at_a_fixed_length_models_limit(model_type, fields, tmp_path, capsys):
    config_class = hf_efficient.get_config_class(model_type)
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, vocab_size=384, causal=True)
    config = config_class(**{k: v for k, v in {**sizes, **fields}.items() if k in config_class().to_dict()})
    folder = save_causal(tmp_path / model_type, config)
    code, out, err = run_cli(capsys, "generate", folder, "--prompt", "def ", "--max-new-tokens", "100", "--greedy")
    assert code == 0, err
    assert "generating 20 tokens, not 100: the model's context is 24 (max_position_embeddings)" in err
    assert out.startswith("def ")
    for prompt in ("x" * 24, "x" * 30):  # no room left: a clear error before generating
        code, _, err = run_cli(capsys, "generate", folder, "--prompt", prompt, "--max-new-tokens", "5")
        assert code == 1
        assert f"the prompt has {len(prompt)} tokens: the model's context is 24 tokens" in last_line(err)


def test_generate_on_a_seq2seq_checkpoint_respects_its_encoder_and_decoder_limits(tmp_path, capsys):
    """A seq2seq checkpoint generates the decoder's output for each prompt (encoded with eos, as in training). With a
    learned position table of 24 rows the source may fill the encoder (24 tokens) and the decoder generates at
    most 23 tokens after its start token; a longer source is a one-line error."""
    from transformers import AutoModelForSeq2SeqLM

    config = hf_efficient.get_config_class("ngram_transformer")(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        is_encoder_decoder=True,
        position_embedding_type="learned",
        max_position_embeddings=24,
    )
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config)
    model.generation_config = default_generation_config(model, default_tokenizer(), tasks.TASKS["seq2seq"])
    model.save_pretrained(tmp_path / "s2s")
    default_tokenizer().save_pretrained(tmp_path / "s2s")
    assert model.generation_config.do_sample is False and model.generation_config.decoder_start_token_id == 0

    prompt = "x" * 23  # 23 bytes + eos: the whole encoder
    code, out, err = run_cli(capsys, "generate", tmp_path / "s2s", "--prompt", prompt, "--max-new-tokens", "100")
    assert code == 0, err
    assert "generating at most 23 tokens, not 100: the model's decoder takes 24" in err
    assert not out.startswith(prompt)  # the output alone, not the prompt continued
    tokenizer = default_tokenizer()
    encoded = tokenizer([prompt], return_tensors="pt")
    expected = model.generate(**encoded, max_new_tokens=23, eos_token_id=None)
    assert expected.shape[1] == 24  # start token + 23
    reference = tokenizer.batch_decode(model.generate(**encoded, max_new_tokens=23), skip_special_tokens=True)[0]
    assert out == reference + "\n"
    code, _, err = run_cli(capsys, "generate", tmp_path / "s2s", "--prompt", "x" * 24, "--max-new-tokens", "5")
    assert code == 1
    assert "the prompt has 25 tokens: the model's encoder takes at most 24" in last_line(err)


def test_position_limit_is_read_from_the_config():
    aft = hf_efficient.get_config_class("aft")
    assert position_limit(aft(aft_type="full", max_position_embeddings=24, causal=True)) == 24
    assert position_limit(aft(aft_type="simple", max_position_embeddings=24, causal=True)) is None
    assert position_limit(hf_efficient.get_config_class("gmlp")(max_position_embeddings=24)) == 24


# ------------------------------------------------------------------------------ issue 14: the command's edges
def test_a_new_model_fits_the_tasks_data_whatever_extra_tokens_its_config_counts(tmp_path, capsys):
    """`train --model aft --task image-cls` out of the box: AFT adds a class token to the 16 patches."""
    aft, gmlp = hf_efficient.get_config_class("aft"), hf_efficient.get_config_class("gmlp")
    vision = {"image_size": 8, "patch_size": 2}
    assert extra_tokens(aft, {**aft().to_dict(), **vision}) == 1
    assert extra_tokens(aft, {**aft().to_dict(), **vision, "aft_type": "conv"}) == 0
    assert extra_tokens(gmlp, {**gmlp().to_dict(), **vision}) == 0
    out = tmp_path / "aft-digits"
    argv = ["train", "--model", "aft", "--task", "image-cls", "--max-steps", "1", "--max-train-samples", "8"]
    code, _, err = run_cli(capsys, *argv, *QUIET, "--save-strategy", "no", "--output-dir", out)
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["image_size"], config["patch_size"], config["max_position_embeddings"]) == (8, 2, 17)


def test_weights_that_do_not_fit_the_config_are_an_error(folders, tmp_path, capsys):
    wrong = copy_folder(folders["clm"], tmp_path / "wrong")
    aft = hf_efficient.get_config_class("aft")(
        vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=32
    )
    aft.architectures = ["AFTForCausalLM"]
    aft.save_pretrained(wrong)  # config.json of another model type; the weights stay gMLP's
    for argv in (
        ["evaluate", wrong, "--disable-tqdm"],
        ["generate", wrong],
        ["train", "--model", wrong, "--task", "seq-cls", "--max-steps", "1", *QUIET, "--output-dir", tmp_path / "o"],
    ):
        code, _, err = run_cli(capsys, *argv)
        line = last_line(err)
        assert code == 1 and f"the weights of '{wrong}' do not fit the AFTFor" in line, (argv, line)
        assert "model_type 'aft'" in line and "missing (model.layers.0." in line and "unexpected" in line
    assert not (tmp_path / "o").exists()
    # a new head on a base checkpoint stays allowed: only the head's weights are new
    out = tmp_path / "classifier"
    argv = ["train", "--model", folders["clm"], "--task", "seq-cls", "--max-steps", "1", "--max-train-samples", "8"]
    assert run_cli(capsys, *argv, *QUIET, "--save-strategy", "no", "--output-dir", out)[0] == 0


def test_train_from_a_folder_without_weights_says_so(folders, tmp_path, capsys):
    preset = tmp_path / "preset"
    preset.mkdir()
    shutil.copy(folders["clm"] / "config.json", preset)
    argv = ["train", "--model", preset, "--max-steps", "1", *QUIET, "--save-strategy", "no"]
    code, _, err = run_cli(capsys, *argv, "--output-dir", tmp_path / "o")
    assert code == 0
    assert f"hf-efficient: '{preset}' has a config.json but no weights" in err
    assert "training a new, randomly initialised model from its config" in err
    # an unfinished run's folder (weights only in its checkpoints): an error naming the checkpoint to pass
    run = copy_folder(folders["clm"], tmp_path / "run.partial")
    (run / "model.safetensors").unlink()
    code, _, err = run_cli(capsys, "train", "--model", run, *QUIET, "--output-dir", tmp_path / "o2")
    assert code == 1 and "is a training run without final weights" in last_line(err)
    assert f"pass --model {run / 'checkpoint-4'}" in last_line(err)


def test_a_masked_lm_checkpoint_cannot_generate_or_evaluate_as_causal(folders, capsys):
    for argv in (["generate", folders["mlm"]], ["evaluate", folders["mlm"], "--task", "clm", "--disable-tqdm"]):
        code, _, err = run_cli(capsys, *argv)
        assert code == 1
        assert "is a masked-LM / bidirectional checkpoint (GMLPForMaskedLM, causal=False)" in last_line(err)
    code, out, _ = run_cli(capsys, "evaluate", folders["mlm"], "--disable-tqdm", "--max-eval-samples", "4")
    assert code == 0 and json.loads(out)["task"] == "mlm"


def test_a_misspelled_model_type_is_named_with_the_registered_ones(folders, tmp_path, capsys):
    typo = copy_folder(folders["clm"], tmp_path / "typo")
    config = json.loads((typo / "config.json").read_text())
    (typo / "config.json").write_text(json.dumps({**config, "model_type": "gmpl"}))
    for argv in (["evaluate", typo], ["train", "--model", typo, "--output-dir", tmp_path / "o"]):
        code, _, err = run_cli(capsys, *argv)
        line = last_line(err)
        assert code == 1 and "names model_type 'gmpl', which is not registered; did you mean 'gmlp'?" in line
        assert ", ".join(sorted(hf_efficient.ARCHITECTURES)) in line


def test_disable_tqdm_silences_every_progress_bar_in_any_position(folders, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"sample {i} {'ab' * i},{'ab'[i % 2]}\n" for i in range(40)))
    train = ["train", "--task", "seq-cls", "--dataset", data, "--config-overrides", TINY, "--max-steps", "2"]
    train += ["--no-sample", "--save-strategy", "no", "--output-dir", tmp_path / "cls"]

    def run(*argv):
        assert cli.main([str(a) for a in argv]) == 0
        out, err = capfd.readouterr()
        return out + err

    # without the flag the command shows bars (the check below can fail)
    assert BAR.search(run("evaluate", folders["clm"], "--max-eval-samples", "4", "--max-eval-bytes", "2000"))
    for argv in (
        ["--disable-tqdm", *train],  # before the command: datasets' csv/map bars, the Trainer's, saving
        ["evaluate", "--disable-tqdm", folders["clm"], "--max-eval-samples", "4", "--max-eval-bytes", "2000"],
        ["generate", folders["clm"], "--max-new-tokens", "4", "--disable-tqdm"],
        ["--disable-tqdm", "generate", folders["clm"], "--max-new-tokens", "4"],
        ["--disable-tqdm", "list"],
    ):
        text = run(*argv)
        assert not BAR.search(text), (argv, BAR.search(text).group(0), text[-500:])
    assert hf_logging.is_progress_bar_enabled()  # restored after the command
    # (the csv's string labels became class ids: the classifier trained on them)
    assert json.loads((tmp_path / "cls" / "config.json").read_text())["id2label"] == {"0": "a", "1": "b"}
