"""`hf-efficient train`: resolve the model (architecture, preset or checkpoint) -> the task -> TrainArguments -> the
task's data -> the config (built once) -> the model -> the task's Trainer (Seq2SeqTrainer for seq2seq) -> a Hub-ready
folder (staged in <out>.partial), its metrics and a generated sample."""

import copy
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from transformers import TrainerCallback

import hf_efficient

from ..errors import TaskError, first_line
from ..hub import auto_map_for, copy_code, has_code
from . import model_card
from .arguments import TrainArguments
from .generate import default_generation_config, generate_text
from .models import (
    accelerator_available,
    announce_new_model,
    build_config,
    check_task_head,
    config_values,
    create_model,
    parse_overrides,
    resolve_model,
)
from .outputs import finite, install_output, prepare_output, remove_incomplete_checkpoints, write_json
from .tasks import TASKS, Task


def training_arguments(values: dict, task: Task, staging: Path, resume: str | None) -> TrainArguments:
    """`TrainArguments` from the parsed flags, the task's defaults for those not given, and the staging folder."""
    values = dict(values, output_dir=str(staging), resume_from_checkpoint=resume)
    values.update({k: v for k, v in task.training.items() if values.get(k) is None})
    if values.get("predict_with_generate") is None:
        values["predict_with_generate"] = False
    if values["per_device_eval_batch_size"] is None:
        values["per_device_eval_batch_size"] = values["per_device_train_batch_size"]
    values["remove_unused_columns"] = task.remove_unused_columns
    if values.pop("gradient_checkpointing"):  # (its current name; the old one warns)
        values["activation_checkpointing"] = True
    if values["use_cpu"] is None:
        # Without it, `accelerate launch` on a CPU-only machine starts N processes that each train alone.
        values["use_cpu"] = not accelerator_available()
    try:
        return TrainArguments(**values)
    except (ValueError, TypeError) as error:
        raise TaskError(f"invalid training arguments: {first_line(error)}") from error


class TimeBudget:
    """`--max-train-minutes`: stop training (cleanly: evaluation and saving still run) once the budget is spent.
    Rank 0's clock decides, broadcast to every process, so that all of them stop at the same step.

    Without `--max-steps` the schedule is sized to the budget (`sized=True`): training starts with a provisional
    step count, and once `CALIBRATION` of the budget has passed, the steps that fit in the rest are planned from the
    measured time per step (rank 0's, broadcast); `state.max_steps` and the learning-rate schedule (its warm-up and
    decay, as `--lr-scheduler-type` and `--warmup-steps` say) are then rebuilt for that count, so that the decay ends
    when the time does instead of a fixed step count ending early or the clock cutting a schedule short. The plan is
    revised at every further `REPLAN` of the budget from the step time since the previous revision, so that a
    machine that gets busier (or freer) mid-run still ends its decay near the end of the budget."""

    CALIBRATION = 0.05  # the share of the budget timed before planning (after the first steps' warm-up)
    REPLAN = 0.1  # revise the plan after every further tenth of the budget
    MARGIN = 0.97  # plan for 97% of the remaining time: step times drift, checkpoints and logging cost a little
    PROVISIONAL_STEPS = 1_000_000  # `max_steps` until the plan exists (the learning rate is still ~0 then)

    def __init__(self, minutes: float, sized: bool = False):
        from transformers import TrainerCallback

        budget = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.started = time.time()
                budget.first_step = budget.first_time = None

            def on_step_end(self, args, state, control, **kwargs):
                over, plan = budget.decide(state)
                if plan is not None:
                    previous = budget.planned_steps
                    budget.apply_plan(plan, args, state, kwargs["lr_scheduler"])
                    # transformers' DefaultFlowCallback runs first: on the previous plan's last step it has already
                    # stopped the run; a revision made on that step moves the end, so the new plan decides
                    if previous is not None and previous <= state.global_step < plan:
                        control.should_training_stop = False
                if over:
                    budget.stopped_at = state.global_step
                    control.should_training_stop = True
                elif budget.planned_steps is not None and state.global_step >= budget.planned_steps:
                    control.should_training_stop = True

        self.seconds = minutes * 60
        self.sized = sized
        self.started = time.time()
        self.first_step = self.first_time = None
        self.stopped_at = None
        self.planned_steps = None
        self.per_step = None
        self.planned_at = 0.0  # the share of the budget spent when the plan was last made
        self.trainer = None  # set once the Trainer exists (its progress bar learns the planned steps)
        self.callback = Callback()

    def decide(self, state) -> tuple[bool, int | None]:
        """After a step: whether the budget is spent, and a new plan of the run's steps when one is due (sized
        schedules). Rank 0's clock and step times decide, broadcast in one message, so that every process stops at
        the same step and follows the same plan."""
        import torch

        now = time.time()
        elapsed = now - self.started
        plan = -1.0
        if self.sized and self.first_step is None:  # the first step pays one-time costs (allocation): not timed
            self.first_step, self.first_time = state.global_step, now
        elif self.sized:
            due = self.CALIBRATION if self.planned_steps is None else self.planned_at + self.REPLAN
            if elapsed >= due * self.seconds and state.global_step - self.first_step >= 2:
                per_step = (now - self.first_time) / (state.global_step - self.first_step)
                remaining = max(0.0, self.seconds - elapsed) * self.MARGIN
                plan = float(state.global_step + max(1, int(remaining / per_step)))
                self.per_step = per_step
                self.planned_at = elapsed / self.seconds
                self.first_step, self.first_time = state.global_step, now  # the next revision times from here
        message = torch.tensor([float(elapsed > self.seconds), plan], dtype=torch.float64)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(message, src=0)
        return bool(message[0].item()), (int(message[1].item()) if message[1].item() > 0 else None)

    def apply_plan(self, plan: int, args, state, lr_scheduler) -> None:
        """Make `plan` the run's step count: `max_steps`, the learning-rate schedule and the progress bar."""
        first = self.planned_steps is None
        self.planned_steps = plan
        state.max_steps = plan
        rebuild_schedule(args, lr_scheduler, self.planned_steps)
        for callback in self.trainer.callback_handler.callbacks if self.trainer is not None else ():
            bar = getattr(callback, "training_bar", None)  # transformers' ProgressCallback: the bar's new total
            if bar is not None:
                bar.total = self.planned_steps
                bar.refresh()
        if first and state.is_world_process_zero:
            print(
                f"hf-efficient: {self.per_step:.2f} s per step: the schedule is sized to {self.planned_steps} steps "
                f"({self.seconds / 60:g} minutes; revised as the step time changes)",
                flush=True,
            )


def rebuild_schedule(args, lr_scheduler, total_steps: int) -> None:
    """Give the Trainer's running scheduler the learning-rate curve of a `total_steps` run (same type, warm-up and
    options), keeping its position, and set the optimizer's learning rate to that curve's value at this step."""
    from transformers import get_scheduler

    lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # (Accelerate's wrapper, where there is one)
    if not hasattr(lr_scheduler, "lr_lambdas"):
        return  # a schedule that does not depend on the step count (reduce_lr_on_plateau)
    optimizer = lr_scheduler.optimizer
    current = [group["lr"] for group in optimizer.param_groups]
    fresh = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=args.lr_scheduler_kwargs,
    )
    for group, lr in zip(optimizer.param_groups, current):  # (building `fresh` stepped the optimizer's lr to step 0)
        group["lr"] = lr
    lr_scheduler.lr_lambdas = fresh.lr_lambdas
    step = lr_scheduler.last_epoch
    values = [base * fn(step) for base, fn in zip(lr_scheduler.base_lrs, lr_scheduler.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, values):
        group["lr"] = lr
    lr_scheduler._last_lr = values


class LogAtSave(TrainerCallback):
    """Log the training loss at every checkpoint step, so that a checkpoint's log history covers every step up to
    it and a resumed run can report the loss of the whole run (`whole_run_loss`)."""

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            control.should_log = True


def checkpoint_step(checkpoint: str) -> int:
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])


def checkpoint_max_steps(checkpoint: str) -> int | None:
    """The step count a checkpoint's run planned (`max_steps` of its trainer state), if it recorded one."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    steps = int(state.get("max_steps") or 0)
    return steps if 0 < steps < TimeBudget.PROVISIONAL_STEPS else None


def checkpoint_finished(checkpoint: str) -> bool:
    """Whether a checkpoint was written at the last step of its run (its `max_steps`)."""
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return 0 < int(state.get("max_steps") or 0) <= int(state["global_step"])


def whole_run_loss(state, resumed_from: int, resumed_loss: float | None) -> dict:
    """`train_loss` of a resumed run over the whole run: the checkpoint's logged losses (each the mean over the
    steps since the previous log) up to the step it resumed from, plus the resumed part's mean loss."""
    steps = state.global_step - resumed_from
    total, covered, previous = 0.0, 0, 0
    for entry in state.log_history:
        if "loss" in entry and entry.get("step", 0) <= resumed_from:
            total += entry["loss"] * (entry["step"] - previous)
            previous = covered = entry["step"]
    if steps > 0 and resumed_loss is not None:
        total += resumed_loss * steps
        covered += steps
    values = {"resumed_from_step": resumed_from, "train_loss_resumed_part": resumed_loss}
    if covered:
        values["train_loss"] = total / covered
        values["train_loss_steps"] = covered  # the steps the loss covers (all of them, unless logs are missing)
    return values


def command_line() -> str:
    return shlex.join(["hf-efficient", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "hf-efficient"


def versions() -> str:
    import torch
    import transformers

    return (
        f"hf-efficient {hf_efficient.__version__}, transformers {transformers.__version__}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )


def preset_training_defaults(source, training_values: dict) -> dict:
    """A preset's card may declare how it is meant to be trained (`"training"`, checked by `resolve_model`): its
    values fill the training options the user left unset, before the task's defaults do."""
    filled = {k: v for k, v in source.training.items() if k != "block_size" and training_values.get(k) is None}
    return {**training_values, **filled}


def preset_block_size(source, data_args, config: dict):
    """`data_args` with the preset's `block_size` where `--block-size` is unset, at most the model's context (which
    `--config-overrides` may have made shorter)."""
    import dataclasses

    block_size = source.training.get("block_size")
    if block_size is None or data_args.block_size is not None:
        return data_args
    return dataclasses.replace(
        data_args, block_size=min(block_size, config.get("max_position_embeddings") or block_size)
    )


def run_train(model_args, data_args, training_values: dict, callbacks=()) -> Path:
    """`hf-efficient train` (`training_values`: the parsed `TrainArguments` fields): returns the finished folder."""
    import torch
    import transformers
    from transformers import set_seed

    started = time.time()
    overrides = parse_overrides(model_args.config_overrides)
    model_name = model_args.model_name_or_path or TASKS[model_args.task or "clm"].default_model
    source = resolve_model(model_name, model_args.trust_remote_code)
    task = TASKS[model_args.task or source.task or "clm"]
    check_task_head(source, task)
    announce_new_model(source, model_name)
    training_values = preset_training_defaults(source, training_values)
    config_class, values = config_values(source, task, overrides)
    output_dir = training_values["output_dir"] or str(Path("out") / f"{Path(model_name).name or 'model'}-{task.name}")
    final, staging, resume = prepare_output(
        output_dir,
        training_values["overwrite_output_dir"],
        training_values["resume_from_checkpoint"],
        data_args.dataset,
    )
    # `--max-train-minutes` without `--max-steps`: a schedule sized to the time budget (TimeBudget), unless this
    # resumes such a run: its checkpoint holds the planned step count, which then stays fixed.
    sized = bool(training_values.get("max_train_minutes")) and training_values.get("max_steps") is None
    if sized:
        planned = checkpoint_max_steps(resume) if resume is not None else None
        training_values = dict(training_values, max_steps=planned or TimeBudget.PROVISIONAL_STEPS)
        sized = planned is None
    args = training_arguments(training_values, task, staging, resume)

    sized_by_data = source.kind == "architecture"  # a new model may take its image size from the data
    draft = {**values, **overrides}
    data_args = preset_block_size(source, data_args, draft)
    with args.main_process_first(desc="data"):
        processing = task.load_processing(source.path, source.kind == "checkpoint", None if sized_by_data else draft)
        data = task.load_data(
            data_args,
            processing,
            draft,
            seed=args.seed,
            sized_by_data=sized_by_data,
            config_class=config_class,
            new_model=source.kind != "checkpoint",
        )
    config = build_config(config_class, values, data, overrides)
    compute_metrics = data.compute_metrics
    if data.generation_max_length is not None:  # the metrics score generated text
        if not args.predict_with_generate:
            compute_metrics = None  # --predict-with-generate false: the loss only
        elif args.generation_max_length is None:
            args.generation_max_length = data.generation_max_length
    set_seed(args.seed)
    model = create_model(task, source, config, new_head=data.label_names is not None or source.task != task.name)
    generation_config = None
    if task.generation is not None and hasattr(model, "generation_config"):
        generation_config = default_generation_config(model, data.processing, task)
        model.generation_config = copy.deepcopy(generation_config)
    if args.should_save:
        if staging.exists() and resume is None:
            shutil.rmtree(staging)  # an unfinished earlier run (--overwrite-output-dir): the run's own folder
        remove_incomplete_checkpoints(staging, resume)
        staging.mkdir(parents=True, exist_ok=True)

    budget = TimeBudget(args.max_train_minutes, sized=sized) if args.max_train_minutes else None
    trainer = getattr(transformers, task.trainer)(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=data.collator,
        processing_class=data.processing,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        callbacks=[*callbacks, LogAtSave(), *([budget.callback] if budget else [])],
    )
    if budget is not None:
        budget.trainer = trainer
    main = trainer.is_world_process_zero()
    if main:
        print(
            f"hf-efficient: training {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
            f"parameters, {source.kind} {source.name!r}) for {task.name} on {data.description}; "
            f"{args.world_size} process(es) on {args.device.type}; writing {final}",
            flush=True,
        )
    if resume is not None and checkpoint_finished(resume):
        # Killed after its last checkpoint (during the final evaluation or save): the Trainer would run one step
        # past max_steps, so load the checkpoint's weights and state, and evaluate and save as usual.
        from transformers import TrainerState

        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        metrics = {}
    else:
        metrics = dict(trainer.train(resume_from_checkpoint=resume).metrics)
    if sized and budget.planned_steps and metrics.get("train_runtime"):
        # (the Trainer counts samples from the `max_steps` it started with: the provisional count)
        samples = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        metrics["train_samples_per_second"] = round(samples * args.world_size / metrics["train_runtime"], 3)
    if resume is not None:
        metrics.update(whole_run_loss(trainer.state, checkpoint_step(resume), metrics.get("train_loss")))
    eval_metrics = trainer.evaluate()
    eval_metrics.update(task.metrics_from_loss(eval_metrics, data))
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    results = {
        **metrics,
        **eval_metrics,
        "task": task.name,
        "model": model_name,
        "model_source": source.kind,
        "dataset": data.description,
        "dataset_path": data_args.dataset,
        "global_step": trainer.state.global_step,
        "max_steps": budget.planned_steps if budget is not None and budget.planned_steps else args.max_steps,
        "schedule_sized_to_time_budget": sized,
        "stopped_by_time_budget": bool(budget and budget.stopped_at is not None),
        "world_size": args.world_size,
        "num_processes": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "command": command_line(),
        "versions": versions(),
    }
    if has_code(unwrapped):  # config.json gets an auto_map, the folder the code: it loads with trust_remote_code
        unwrapped.config.auto_map = auto_map_for(unwrapped)
    if generation_config is not None:  # (Seq2SeqTrainer's evaluation fills in every default, `max_length` included)
        unwrapped.generation_config = generation_config
    trainer.save_model(str(staging))
    if main:
        if has_code(unwrapped):
            copy_code(unwrapped, staging)
        trainer.save_state()
        results["wall_time_s"] = round(time.time() - started, 1)
        results = finite(results)
        write_json(staging / "train_results.json", metrics)
        write_json(staging / "eval_results.json", eval_metrics)
        write_json(staging / "all_results.json", results)
        (staging / "README.md").write_text(model_card.render(final.name, unwrapped.config, task.name, results))
        install_output(staging, final)
        _print_results(task.name, results, final)
    trainer.accelerator.wait_for_everyone()
    if main and task.default_prompt is not None and not args.no_sample:
        torch.manual_seed(args.seed)
        text = generate_text(unwrapped, data.processing, [task.default_prompt], {})[0]
        print(f"hf-efficient: sample (prompt {task.default_prompt!r}):\n" + text, flush=True)
    return final


def _print_results(task: str, results: dict, folder: Path) -> None:
    keys = [
        "train_loss",
        "eval_loss",
        "eval_bits_per_byte",
        "eval_perplexity",
        "eval_accuracy",
        "eval_bleu",
        "eval_chrf",
        "eval_exact_match",
        "global_step",
        "stopped_by_time_budget",
        "world_size",
        "train_runtime",
        "wall_time_s",
    ]
    shown = ", ".join(f"{k}={_fmt(results[k])}" for k in keys if k in results)
    print(f"hf-efficient: {task} finished: {shown}", flush=True)
    print(f"hf-efficient: saved a Hub-ready folder: {folder} (metrics in {folder / 'all_results.json'})", flush=True)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
