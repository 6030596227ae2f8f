"""The `hf-efficient` command: help, listing, and one-line errors for bad input (no traceback, no output folder)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import hf_efficient
from hf_efficient import cli
from hf_efficient.cli import arguments, listing, models, parser, tasks
from hf_efficient.cli.generate import run_generate
from hf_efficient.cli.tasks.image import image_processor_for
from hf_efficient.cli.tasks.text import generation_length
from hf_efficient.errors import TaskError

TINY = "hidden_size=32,intermediate_size=64,num_hidden_layers=2,max_position_embeddings=32"
COMMANDS = ["list", "train", "evaluate", "generate", "publish"]


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_of_every_command(capsys):
    for command in [None, *COMMANDS]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--help"] if command else ["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("usage: hf-efficient"), out[:200]
    # TrainingArguments flags in both spellings, and the pass-through of the other fields, are documented
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--per-device-train-batch-size", "--resume-from-checkpoint", "--gradient-checkpointing", "--bf16"):
        assert flag in out
    assert "--field_name VALUE" in out


def test_list_shows_every_registered_architecture_and_head(capsys):
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0
    info = json.loads(out)
    assert set(info["architectures"]) == set(hf_efficient.ARCHITECTURES)
    for model_type in hf_efficient.ARCHITECTURES:
        mapping = hf_efficient.get_architecture(model_type).AUTO_MAPPING
        entry = info["architectures"][model_type]
        assert entry["heads"] == {auto: cls.__name__ for auto, cls in mapping.items()}
    gmlp = info["architectures"]["gmlp"]
    assert {"clm", "mlm", "seq-cls", "image-cls"} <= set(gmlp["tasks"])
    assert info["presets"]["gmlp-small-clm-256"]["task"] == "clm"
    code, text, _ = run_cli(capsys, "list")
    assert code == 0 and "gmlp" in text and "gmlp-ti16-224" in text and "image-cls" in text


def test_list_json_has_no_empty_field(capsys):
    """Every field `list --json` reports is filled for every architecture, preset and task (an architecture's name
    and variants come from its `ARCHITECTURE_CARD`; a field read from a name nothing defines would be empty)."""
    code, out, _ = run_cli(capsys, "list", "--json")
    assert code == 0
    info = json.loads(out)

    def empty_fields(value, path):
        if value is None or value == "" or value == {} or value == []:
            yield path
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from empty_fields(item, f"{path}.{key}")
        elif isinstance(value, list):
            for index, item in enumerate(value):
                yield from empty_fields(item, f"{path}[{index}]")

    assert list(empty_fields(info, "list")) == []
    for model_type, entry in info["architectures"].items():
        card = hf_efficient.get_architecture(model_type).ARCHITECTURE_CARD
        assert (entry["name"], entry["variants"]) == (card["name"], card["variants"])
        assert entry["presets"] and all(info["presets"][p]["model_type"] == model_type for p in entry["presets"])


def test_console_script_error_is_one_line(tmp_path):
    """The installed `hf-efficient` script in a real process: exit code, one line, no traceback, no folder.
    (`python -m hf_efficient` runs in the multi-process test of tests/test_ecosystem.py.)"""
    script = Path(sys.executable).with_name("hf-efficient")  # the script installed with this interpreter
    result = subprocess.run(
        [str(script if script.exists() else shutil.which("hf-efficient")), "train", "--model", "no-such-architecture"]
        + ["--output-dir", "o"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1].startswith("hf-efficient: error: unknown model 'no-such-architecture'")
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def write_png_folder(root, size, labels=("a", "b"), per_label=3, odd_one=None):
    for label in labels:
        (root / label).mkdir(parents=True)
        for index in range(per_label):
            side = odd_one if (odd_one and label == labels[-1] and index == 0) else size
            pixels = (np.arange(side * side).reshape(side, side) % 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(root / label / f"{index}.png")


def bad_inputs(tmp_path):
    """(argv, text the one-line error must contain) for each kind of bad input."""
    (tmp_path / "broken.json").write_text('{"text": "an unterminated record\n')
    (tmp_path / "no_text.csv").write_text("body,label\nhello,0\nworld,1\n")
    (tmp_path / "data.weird").write_text("x")
    write_png_folder(tmp_path / "digits16", 16)
    write_png_folder(tmp_path / "mixed", 8, odd_one=12)
    tiny = ["--config-overrides", TINY]
    return [
        (["train", "--model", "nope"], "unknown model 'nope'"),
        (["train", "--model", "gmlp", "--task", "seq2seq"], "architecture 'gmlp' has no head for task 'seq2seq'"),
        (["train", "--model", "gmlp-ti16-224", "--task", "clm"], "no token embeddings"),
        (["train", "--model", "gmlp-small-clm-256", "--task", "image-cls"], "not a vision model"),
        (["train", *tiny, "--dataset", str(tmp_path / "missing.json")], "does not exist"),
        (["train", *tiny, "--dataset", str(tmp_path / "broken.json")], "could not read dataset"),
        (["train", *tiny, "--dataset", str(tmp_path / "data.weird")], "cannot tell the format"),
        (["train", *tiny, "--task", "seq-cls", "--dataset", str(tmp_path / "no_text.csv")], "no column 'text'"),
        (
            ["train", "--model", "gmlp-ti16-224", "--task", "image-cls", "--dataset", str(tmp_path / "digits16")],
            "has 16x16 images, but the model expects 224x224",
        ),
        (["train", "--task", "image-cls", "--dataset", str(tmp_path / "mixed")], "is 12x12"),
        (["train", "--config-overrides", "hidden_sise=3"], "unknown config field(s) hidden_sise"),
        (["train", "--config-overrides", "num_heads=7"], "num_heads"),
        (["train", *tiny, "--block-size", "64"], "exceeds the model's context"),
        (["train", *tiny, "--max-stepz", "3"], "unrecognized arguments: --max-stepz"),
        (["train", *tiny, "--resume-from-checkpoint"], "no complete checkpoint-* folder"),
        (["evaluate", str(tmp_path / "nothing-here")], "unknown model"),
        (["generate", "model_cards/gmlp-small-clm-256"], "has no weights"),
    ]


def test_bad_input_gives_one_line_error_and_no_output(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, expected in bad_inputs(tmp_path):
        output = tmp_path / "out"
        if argv[0] == "train":
            argv = [*argv, "--output-dir", str(output)]
        if argv[0] == "generate":
            argv = ["generate", str(models.REPO_ROOT / argv[1])]
        code, out, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code != 0, argv
        assert lines and lines[-1].startswith("hf-efficient: error: "), (argv, err)
        assert expected in lines[-1], (argv, lines[-1])
        assert "Traceback" not in err, argv
        assert not output.exists() and not (tmp_path / "out.partial").exists(), argv


def test_time_budget_stops_training_cleanly(tmp_path, capsys):
    """--max-train-minutes: training stops at the budget, and the run still evaluates and saves a complete folder."""
    out = tmp_path / "out"
    argv = ["train", "--config-overrides", TINY, "--max-train-bytes", "20000", "--max-eval-bytes", "2000"]
    argv += [
        "--max-steps",
        "50",
        "--max-train-minutes",
        "1e-9",
        "--disable-tqdm",
        "--no-sample",
        "--save-strategy",
        "no",
    ]
    assert cli.main([*argv, "--output-dir", str(out)]) == 0
    results = json.loads((out / "all_results.json").read_text())
    assert results["global_step"] == 1 and results["max_steps"] == 50 and results["stopped_by_time_budget"]
    assert "eval_bits_per_byte" in results and (out / "model.safetensors").is_file()
    assert "stopped by the --max-train-minutes budget" in (out / "README.md").read_text()


def test_rebuild_schedule_gives_the_running_scheduler_the_planned_curve(tmp_path):
    """The time-sized schedule: a scheduler started for a provisional step count, rebuilt after 5 steps for 100,
    gives from then on exactly the learning rates of a scheduler built for 100 steps from the start (warm-up share
    and decay included), and ends at zero."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from hf_efficient.cli.train import TimeBudget, rebuild_schedule

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1, lr_scheduler_type="cosine", report_to=[])

    def scheduler(total):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        warmup = args.get_warmup_steps(total)
        return optimizer, get_scheduler("cosine", optimizer, num_warmup_steps=warmup, num_training_steps=total)

    optimizer, running = scheduler(TimeBudget.PROVISIONAL_STEPS)
    reference_optimizer, reference = scheduler(100)
    for _ in range(5):
        for opt, sched in ((optimizer, running), (reference_optimizer, reference)):
            opt.step()
            sched.step()
    assert optimizer.param_groups[0]["lr"] < reference_optimizer.param_groups[0]["lr"] / 100  # before: ~0
    rebuild_schedule(args, running, 100)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"], rel=1e-12)
    for _ in range(95):
        for opt, sched in ((optimizer, running), (reference_optimizer, reference)):
            opt.step()
            sched.step()
        assert optimizer.param_groups[0]["lr"] == pytest.approx(reference_optimizer.param_groups[0]["lr"], rel=1e-12)
    assert running.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)


def test_a_revision_on_the_last_planned_step_moves_the_end(tmp_path):
    """The plan is revised on the step where the previous plan ends: transformers' DefaultFlowCallback (which runs
    before the budget's callback) has already stopped the run there; the revision must move the end instead of
    leaving a run that stops 2 steps before the max_steps it records."""
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments, get_scheduler
    from transformers.trainer_callback import DefaultFlowCallback

    from hf_efficient.cli.train import TimeBudget

    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1, lr_scheduler_type="cosine", report_to=[])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=216)
    budget = TimeBudget(1.0, sized=True)
    budget.planned_steps = 216
    state, control = TrainerState(global_step=216, max_steps=216), TrainerControl()
    revisions = iter([(False, 218), (False, None), (False, None)])
    budget.decide = lambda _state: next(revisions)  # rank 0's clock: a revision is due on this step
    DefaultFlowCallback().on_step_end(args, state, control)
    assert control.should_training_stop  # the previous plan's end
    budget.callback.on_step_end(args, state, control, lr_scheduler=scheduler)
    assert not control.should_training_stop and state.max_steps == budget.planned_steps == 218
    for step in (217, 218):  # the new plan's end stops it
        state.global_step = step
        DefaultFlowCallback().on_step_end(args, state, control)
        budget.callback.on_step_end(args, state, control, lr_scheduler=scheduler)
        assert control.should_training_stop == (step == 218)


def test_time_budget_without_max_steps_sizes_the_schedule(tmp_path, capsys):
    """--max-train-minutes without --max-steps: the steps are planned from the measured step time, the run's
    max_steps is that plan (not the task's 600 nor the provisional count), and the learning rate decays over it."""
    from hf_efficient.cli.train import TimeBudget

    out = tmp_path / "out"
    argv = ["train", "--config-overrides", TINY, "--max-train-bytes", "20000", "--max-eval-bytes", "2000"]
    argv += ["--max-train-minutes", "0.15", "--disable-tqdm", "--no-sample", "--save-strategy", "no"]
    argv += ["--logging-steps", "1", "--per-device-train-batch-size", "4"]
    assert cli.main([*argv, "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "all_results.json").read_text())
    state = json.loads((out / "trainer_state.json").read_text())
    planned = results["max_steps"]
    assert results["schedule_sized_to_time_budget"] and 2 < planned < TimeBudget.PROVISIONAL_STEPS
    assert planned != tasks.TASKS["clm"].training["max_steps"] and state["max_steps"] == planned
    first_plan = re.search(r"the schedule is sized to (\d+) steps", printed)  # (later revisions are silent)
    assert first_plan and 2 < int(first_plan.group(1)) < TimeBudget.PROVISIONAL_STEPS
    assert results["global_step"] == planned or results["stopped_by_time_budget"]
    rates = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    peak = max(rates)
    assert rates.index(peak) < len(rates) - 1 and rates[-1] < 0.5 * peak  # warm-up, then decay over the plan
    samples = results["global_step"] * 4 / results["train_runtime"]
    assert results["train_samples_per_second"] == pytest.approx(samples, rel=0.01)


@pytest.mark.parametrize("model_type", sorted(hf_efficient.ARCHITECTURES))
def test_every_registered_architecture_trains_from_the_command(model_type, tmp_path):
    """No per-architecture code in the command: each registered architecture trains (one step, its config defaults)
    on its first text task and leaves a folder that loads with trust_remote_code."""
    tasks = listing.registry()["architectures"][model_type]["tasks"]
    task = next(t for t in ("clm", "mlm", "seq-cls", "image-cls") if t in tasks)
    out = tmp_path / "out"
    argv = ["train", "--model", model_type, "--task", task, "--max-steps", "1", "--per-device-train-batch-size", "2"]
    argv += ["--max-train-samples", "4", "--max-eval-samples", "2", "--max-train-bytes", "20000"]
    argv += ["--max-eval-bytes", "4000", "--disable-tqdm", "--no-sample", "--save-strategy", "no"]
    argv += [] if task == "image-cls" else ["--block-size", "64"]
    assert cli.main([*argv, "--output-dir", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and "AutoConfig" in config["auto_map"]
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    # the saved weights fit the model its config builds (evaluate refuses missing / unexpected weights)
    evaluate = ["evaluate", str(out), "--max-eval-samples", "2", "--max-eval-bytes", "4000", "--disable-tqdm"]
    assert cli.main([*evaluate, *([] if task == "image-cls" else ["--block-size", "64"])]) == 0


@pytest.mark.parametrize(
    "model_type",
    [m for m in sorted(hf_efficient.ARCHITECTURES) if "image-cls" in listing.registry()["architectures"][m]["tasks"]],
)
def test_every_vision_architecture_fits_the_image_task_out_of_the_box(model_type, tmp_path):
    """A model built from an architecture name for image-cls fits the data (patches + any extra token the config
    counts, e.g. AFT's class token), with its config class defaults and no per-architecture branch."""
    out = tmp_path / "out"
    argv = ["train", "--model", model_type, "--task", "image-cls", "--max-steps", "1", "--max-train-samples", "4"]
    argv += ["--max-eval-samples", "2", "--disable-tqdm", "--save-strategy", "no", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["image_size"] == 8


def test_flags_are_typed_dataclass_fields_in_both_spellings():
    """`train` parses into ModelArguments / TrainDataArguments / TrainArguments fields: `--field_name` and
    `--field-name` alike, and every other TrainingArguments field passes through as a flag of its own."""
    argv = ["train", "--model_name_or_path", "gmlp", "--config-overrides", "hidden_size=32", "--max_steps", "3"]
    argv += ["--max-train-bytes", "1000", "--optim", "adafactor", "--per_device_train_batch_size", "4"]
    argv += ["--resume-from-checkpoint", "--disable-tqdm", "--use_cpu", "--torch_compile"]
    command, (model, data, training_values) = parser.parse(argv)
    assert (
        command == "train"
        and isinstance(model, arguments.ModelArguments)
        and isinstance(data, arguments.TrainDataArguments)
    )
    assert (model.model_name_or_path, model.config_overrides, data.max_train_bytes) == ("gmlp", "hidden_size=32", 1000)
    assert training_values["max_steps"] == 3 and training_values["per_device_train_batch_size"] == 4
    assert training_values["optim"] == "adafactor" and training_values["torch_compile"] is True
    assert training_values["resume_from_checkpoint"] == "last" and training_values["disable_tqdm"] is True
    assert training_values["use_cpu"] is True
    assert training_values["learning_rate"] is None  # not given: the task's default applies
    _, (model, _, defaults) = parser.parse(["train"])
    assert model.model_name_or_path is None and defaults["max_train_minutes"] is None and defaults["use_cpu"] is None
    assert defaults["predict_with_generate"] is None  # the task's default (True for seq2seq)
    _, (_, _, values) = parser.parse(["train", "--predict-with-generate", "false", "--generation-max-length", "50"])
    assert values["predict_with_generate"] is False and values["generation_max_length"] == 50
    _, (_, _, values) = parser.parse(["train", "--predict_with_generate", "--generation_num_beams", "4"])
    assert values["predict_with_generate"] is True and values["generation_num_beams"] == 4
    _, (checkpoint, generate) = parser.parse(["generate", "folder", "--prompt", "a", "--prompt", "b", "--greedy"])
    assert checkpoint.checkpoint == "folder" and generate.prompt == ["a", "b"]
    assert generate.settings()["do_sample"] is False


def test_unknown_or_abbreviated_flag_names_the_closest_one(capsys):
    for argv, closest in (
        (["train", "--max-stepz", "3"], "--max-steps"),
        (["train", "--max-step", "3"], "--max-steps"),  # no abbreviations
        (["train", "--learning-rat", "0.5"], "--learning-rate"),
        (["evaluate", "folder", "--max-eval-sample", "3"], "--max-eval-samples"),
        (["generate", "folder", "--temprature", "0.5"], "--temperature"),
    ):
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, argv
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"hf-efficient: error: unrecognized arguments: {argv[-2]}"), line
        assert f"did you mean {closest}?" in line, line
    code, _, err = run_cli(capsys, "generate", "folder", "--greedy", "--do-sample")
    assert code == 2 and "exclude each other" in err


def test_debug_anywhere_shows_the_traceback():
    for argv in (["--debug", "train", "--model", "nope"], ["train", "--model", "nope", "--debug"]):
        with pytest.raises(TaskError, match="unknown model 'nope'"):
            cli.main(argv)


def test_task_defaults_are_data():
    """What differs between tasks is declared in `TASKS` (no per-architecture or per-task branch in the command)."""
    info = listing.registry()
    for name, task in tasks.TASKS.items():
        assert {"max_steps", "per_device_train_batch_size", "learning_rate"} <= set(task.training), name
        assert info["tasks"][name]["default_model"] == task.default_model
        assert task.default_model in info["presets"] or task.default_model in hf_efficient.ARCHITECTURES
    # the main job's model is a preset folder: a sub-quadratic causal AFT-conv with a 512-byte context, which its
    # card trains on 8 x 512-byte blocks; mlm and seq-cls keep the gMLP preset
    assert tasks.TASKS["clm"].default_model == "aft-conv-main-job"
    assert tasks.TASKS["mlm"].default_model == tasks.TASKS["seq-cls"].default_model == "gmlp-main-job"
    folder = models.REPO_ROOT / "model_cards" / "aft-conv-main-job"
    preset = json.loads((folder / "config.json").read_text())
    fields = ("aft_type", "hidden_size", "num_hidden_layers", "max_position_embeddings", "conv_gain_multiplier")
    assert {k: preset[k] for k in fields} == {
        "aft_type": "conv",
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "max_position_embeddings": 512,
        "conv_gain_multiplier": 100.0,
    }
    source = models.resolve_model("aft-conv-main-job")
    assert source.kind == "preset" and source.training == {"block_size": 512, "per_device_train_batch_size": 8}


def test_a_presets_training_defaults_fill_only_what_the_flags_leave_unset(tmp_path):
    """The card's "training": the main job's preset trains on 8 x 512 blocks unless the flags say otherwise; its
    block size is capped by a context that --config-overrides made shorter; an unknown key names the allowed ones."""
    from hf_efficient.cli.arguments import TrainDataArguments
    from hf_efficient.cli.train import preset_block_size, preset_training_defaults

    source = models.resolve_model("aft-conv-main-job")
    unset = {"per_device_train_batch_size": None, "learning_rate": None}
    assert preset_training_defaults(source, unset) == {"per_device_train_batch_size": 8, "learning_rate": None}
    given = {"per_device_train_batch_size": 2}
    assert preset_training_defaults(source, given) == given
    assert preset_block_size(source, TrainDataArguments(), {"max_position_embeddings": 512}).block_size == 512
    assert preset_block_size(source, TrainDataArguments(), {"max_position_embeddings": 64}).block_size == 64
    assert (
        preset_block_size(source, TrainDataArguments(block_size=128), {"max_position_embeddings": 512}).block_size
        == 128
    )
    for name in ("gmlp", "gmlp-main-job"):  # no card defaults: the task's
        assert preset_block_size(models.resolve_model(name), TrainDataArguments(), {}).block_size is None
    folder = tmp_path / "my-preset"
    shutil.copytree(models.REPO_ROOT / "model_cards" / "aft-conv-main-job", folder)
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "training": {"warmup_steps": 5}}))
    with pytest.raises(TaskError, match="warmup_steps cannot be set by a preset"):
        preset_training_defaults(models.resolve_model(str(folder)), {})
    # end to end: the card's batch size unless the flag gives one
    argv = ["train", "--config-overrides", TINY, "--max-train-bytes", "20000", "--max-eval-bytes", "2000"]
    argv += ["--max-steps", "1", "--disable-tqdm", "--no-sample", "--save-strategy", "no"]
    for extra, batch in (([], 8), (["--per-device-train-batch-size", "2"], 2)):
        out = tmp_path / f"out{batch}"
        assert cli.main([*argv, *extra, "--output-dir", str(out)]) == 0
        assert json.loads((out / "all_results.json").read_text())["global_batch_size"] == batch


def test_seq2seq_default_data_is_one_declaration():
    """The seq2seq task reads its default data from `embedded` (and its description from that function's
    docstring), so switching the default data is one argument of the declaration."""
    import dataclasses

    from datasets import Dataset

    from hf_efficient.data import default_tokenizer

    def numbers():
        """numbers to words (test data)"""
        rows = {"source": ["1", "2", "3"], "target": ["one", "two", "three"]}
        return Dataset.from_dict(rows), Dataset.from_dict(rows)

    task = dataclasses.replace(tasks.TASKS["seq2seq"], embedded=numbers, default_data=None)
    assert task.default_data == "numbers to words (test data)"
    args = arguments.TrainDataArguments()
    data = task.load_data(args, default_tokenizer(), {"max_position_embeddings": 16}, seed=0)
    assert data.description == "numbers to words (test data)" and len(data.train) == 3
    assert data.train[1]["labels"] == default_tokenizer()("two")["input_ids"]
    # evaluation generates up to the longest target (5 bytes of "three", eos, the start token) and a margin of 8
    assert data.generation_max_length == 7 + 8
    assert generation_length([[5] * 40], block_size=16) == 17  # never past a cut target (16) + start


def test_seq2seq_default_is_the_numbers_to_words_task_on_an_ngram_encoder_decoder(capsys):
    """The default seq2seq data is the embedded numbers/dates-to-words task (not the stdlib next-line task), the
    default model an N-gram encoder-decoder preset, and `list` says so."""
    from hf_efficient import seq2seq_data

    task = tasks.TASKS["seq2seq"]
    assert task.embedded is seq2seq_data.numbers_to_words_splits and task.trainer == "Seq2SeqTrainer"
    train, validation = task.embedded()
    assert (len(train), len(validation)) == (20_000, 300)
    assert not set(train["source"]) & set(validation["source"])
    assert validation[:2] == {k: v[:2] for k, v in seq2seq_data.numbers_to_words_dataset()["validation"][:2].items()}
    preset = json.loads((models.REPO_ROOT / "model_cards" / task.default_model / "config.json").read_text())
    assert preset["model_type"] == "ngram_transformer" and preset["is_encoder_decoder"] is True
    assert preset["ngram_size"] == 4 and preset["hidden_size"] <= 128  # small enough for a CPU
    code, out, _ = run_cli(capsys, "list", "--json")
    entry = json.loads(out)["tasks"]["seq2seq"]
    assert entry["default_model"] == "ngram-transformer-tiny-n4" and "English words" in entry["default_data"]


def test_seq2seq_trains_evaluates_and_generates_on_the_embedded_task(tmp_path, capsys):
    """`train --task seq2seq` (the default N-gram encoder-decoder, the embedded data, the real Seq2SeqTrainer):
    evaluation generates and reports BLEU / chrF / exact match besides the loss; `evaluate` on the folder gives the
    same figures, and they are the corpus metrics of what `generate` writes for the same sources."""
    from hf_efficient.cli.metrics import text_metrics
    from hf_efficient.data import default_tokenizer

    out = tmp_path / "words"
    rows = 32
    argv = ["train", "--task", "seq2seq", "--max-steps", 100, "--per-device-train-batch-size", 16]
    argv += ["--warmup-steps", 10]
    argv += ["--learning-rate", "3e-3", "--per-device-eval-batch-size", rows, "--max-eval-samples", rows]
    argv += ["--disable-tqdm", "--save-strategy", "no", "--logging-steps", "100", "--output-dir", out]
    code, stdout, err = run_cli(capsys, *map(str, argv))
    assert code == 0, err
    results = json.loads((out / "all_results.json").read_text())
    assert results["task"] == "seq2seq" and results["model"] == "ngram-transformer-tiny-n4"
    assert results["global_step"] == 100 and "English words" in results["dataset"]
    for key in ("eval_bleu", "eval_chrf", "eval_exact_match"):
        assert 0.0 <= results[key] <= 100.0, (key, results[key])
    # 100 steps teach the target's character n-grams (chrF 15.3 here; an untrained model's repeated byte: about 2)
    assert results["eval_chrf"] > 5 and np.isfinite(results["eval_loss"]) and results["eval_bits_per_byte"] > 0
    assert "eval_bleu=" in stdout and "eval_chrf=" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ngram_transformer" and config["is_encoder_decoder"] and config["ngram_size"] == 4
    # a clean greedy generation config (Seq2SeqTrainer's evaluation fills in every default, max_length 20 included)
    saved = json.loads((out / "generation_config.json").read_text())
    assert saved["do_sample"] is False and "max_length" not in saved and saved["decoder_start_token_id"] == 0
    assert "hf-efficient: sample (prompt '1987-03-09'):" in stdout

    code, stdout, err = run_cli(capsys, "evaluate", str(out), "--max-eval-samples", str(rows), "--disable-tqdm")
    assert code == 0, err
    metrics = json.loads(stdout[stdout.index("{") :])
    for key in ("eval_bleu", "eval_chrf", "eval_exact_match", "eval_loss"):
        assert metrics[key] == pytest.approx(results[key], rel=1e-6, abs=1e-9), key

    # `generate` on the same sources, as long as evaluation generates: its outputs score the same BLEU / chrF
    _, validation = tasks.TASKS["seq2seq"].embedded()
    sources, targets = list(validation["source"][:rows]), list(validation["target"][:rows])
    labels = default_tokenizer()(text_target=targets)["input_ids"]
    new_tokens = generation_length(labels, block_size=256) - 1  # (max_length counts the start token)
    prompts = [item for source in sources for item in ("--prompt", source)]
    _, arguments = parser.parse(["generate", str(out), "--max-new-tokens", str(new_tokens), *prompts])
    texts = run_generate(*arguments)
    capsys.readouterr()
    assert len(texts) == rows
    scores = text_metrics(texts, targets)
    for key in ("bleu", "chrf", "exact_match"):
        assert scores[key] == pytest.approx(metrics[f"eval_{key}"], rel=1e-6, abs=1e-9), (key, texts[:3])

    # the command line, on the example: the decoder's output alone (not the prompt continued)
    code, stdout, err = run_cli(capsys, "generate", str(out), "--prompt", "1987-03-09", "--max-new-tokens", "60")
    assert code == 0, err
    assert stdout.strip() and not stdout.startswith("1987-03-09")


def save_image_checkpoint(folder: Path, image_size: int, processor) -> Path:
    """A small gMLP image classifier for 10 classes saved as `train` saves it (weights with code, processor), with
    no measured metrics (so `publish` evaluates it)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gmlp", hidden_size=32, intermediate_size=64, num_hidden_layers=2, image_size=image_size, patch_size=4,
        num_channels=3, max_position_embeddings=(image_size // 4) ** 2, vocab_size=None, num_labels=10,
    )  # fmt: skip
    model = hf_efficient.get_architecture("gmlp").GMLPForImageClassification(config)
    hf_efficient.save_pretrained_with_code(model, folder)
    processor.save_pretrained(folder)
    return folder


def test_publish_evaluates_an_image_checkpoint_whose_processor_resizes_the_data(tmp_path, capsys):
    """Issue 21: a checkpoint made for 16 x 16 images is evaluated on the embedded 8 x 8 digits by `publish` (and
    `evaluate`): its own image processor resizes them to the model's size, as transformers' pipelines would."""
    folder = save_image_checkpoint(tmp_path / "digits16", 16, image_processor_for(16, 3))
    evaluate = ["--max-eval-samples", "8", "--disable-tqdm"]
    code, out, err = run_cli(capsys, "publish", str(folder), "--output-dir", str(tmp_path / "hub"), *evaluate)
    assert code == 0, err
    assert "has 8x8 images: the model's image processor resizes them to 16x16" in err
    results = json.loads((tmp_path / "hub" / "all_results.json").read_text())
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    code, out, err = run_cli(capsys, "evaluate", str(folder), *evaluate)
    assert code == 0 and "eval_accuracy" in out, err


def test_an_image_checkpoint_whose_processor_does_not_resize_names_both_sizes(tmp_path, capsys):
    """A processor that leaves the images at 8 x 8 cannot feed a 16 x 16 model: a one-line error, not a crash."""
    from transformers import ViTImageProcessorPil

    processor = ViTImageProcessorPil(do_resize=False, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    folder = save_image_checkpoint(tmp_path / "digits16", 16, processor)
    code, _, err = run_cli(capsys, "evaluate", str(folder), "--max-eval-samples", "8", "--disable-tqdm")
    assert code == 1
    assert err.strip().splitlines()[-1] == (
        "hf-efficient: error: the digits has 8x8 images, but the model expects 16x16 (its config's image_size) and "
        "its image processor makes them 8x8"
    )


def test_a_preset_with_a_changed_image_size_gets_a_processor_of_that_size(tmp_path):
    """The vision presets carry their image processor (224 x 224); a preset whose image size is changed with
    --config-overrides is fed images of its new size, not the preset's."""
    out = tmp_path / "out"
    argv = ["train", "--model", "gmlp-ti16-224", "--task", "image-cls", "--max-steps", "1", "--max-train-samples", "4"]
    argv += ["--config-overrides", "image_size=8,patch_size=2,max_position_embeddings=16,num_hidden_layers=2"]
    argv += ["--max-eval-samples", "2", "--disable-tqdm", "--save-strategy", "no", "--output-dir", str(out)]
    assert cli.main(argv) == 0
    saved = json.loads((out / "preprocessor_config.json").read_text())
    assert saved["size"] == {"height": 8, "width": 8}


def missing_module_run(module: str, *argv: str, cwd: Path) -> subprocess.CompletedProcess:
    """`hf-efficient ARGV` in a fresh interpreter where `import MODULE` fails, as if it were not installed."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; from hf_efficient import cli; sys.exit(cli.main({list(argv)!r}))"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.parametrize(
    "module, requirement, task",
    [
        ("sklearn", "scikit-learn>=1.3", "image-cls"),
        ("PIL", "Pillow>=9.1", "image-cls"),
        ("sacrebleu", "sacrebleu>=2.3", "seq2seq"),
    ],
)
def test_a_missing_command_dependency_names_the_pip_command(module, requirement, task, tmp_path):
    """Issue 21: `train --task image-cls` without scikit-learn or Pillow, or `--task seq2seq` without sacrebleu (its
    BLEU / chrF), is one line naming the pip command, before any training (all are in the `cli` extra:
    test_command_dependencies_are_declared)."""
    result = missing_module_run(module, "train", "--task", task, "--max-steps", "1", "--output-dir", "o", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("hf-efficient: error: ") and f'python3 -m pip install "{requirement}"' in last, last
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()
    assert not (tmp_path / "o.partial").exists()


def test_command_dependencies_are_declared():
    """What the image task and the metric modules import is in setup.cfg's `cli` extra (the command's
    dependencies)."""
    import configparser

    from hf_efficient.cli.metrics import REQUIREMENTS
    from hf_efficient.data import IMAGE_REQUIREMENTS

    setup_cfg = configparser.ConfigParser()
    setup_cfg.read(models.REPO_ROOT / "setup.cfg")
    requires = [line.split("#")[0].strip() for line in setup_cfg["options.extras_require"]["cli"].splitlines()]
    for requirement in [*IMAGE_REQUIREMENTS.values(), *(r for _, r in REQUIREMENTS.values())]:
        assert requirement in requires, (requirement, requires)
