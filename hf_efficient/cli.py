"""The `hf-efficient` command (also `python -m hf_efficient`): list / train / evaluate / generate / publish.

    hf-efficient list
    hf-efficient train --output-dir out/gmlp-clm                     # the main job: gMLP byte LM, embedded corpus
    hf-efficient train --task image-cls --model gmlp --output-dir out/digits
    hf-efficient evaluate out/gmlp-clm
    hf-efficient generate out/gmlp-clm --prompt "def " --temperature 0.7
    hf-efficient publish out/gmlp-clm --repo-id you/gmlp-clm

Every registered architecture (`hf_efficient.ARCHITECTURES`, each with its `AUTO_MAPPING` of heads) is available
without changes here. Errors the user can fix print one line, `hf-efficient: error: ...`, and exit non-zero;
`--debug` (or `HF_EFFICIENT_DEBUG=1`) shows the traceback instead.
"""

import argparse
import json
import os
import sys

from .tasks import TASKS, TaskError

PROG = "hf-efficient"


class UsageError(Exception):
    """A command-line syntax error (argparse)."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def _add(group, name: str, **kwargs):
    """`--name-with-dashes`, also accepted as `--name_with_underscores` (transformers' example-script spelling)."""
    names = [f"--{name}"]
    if "-" in name:
        names.append(f"--{name.replace('-', '_')}")
    group.add_argument(*names, **kwargs)


def _add_data_arguments(parser, evaluate_only: bool = False):
    group = parser.add_argument_group("data (default: the task's embedded data set, no download)")
    _add(
        group,
        "dataset",
        metavar="PATH",
        help="a local datasets-loadable file or folder: json/jsonl/csv/tsv/txt/parquet files (train.* and "
        "validation.*/test.* give splits), a save_to_disk folder, or an imagefolder tree",
    )
    _add(group, "dataset-format", choices=["json", "csv", "text", "parquet", "imagefolder"], help="override the guess")
    _add(group, "text-column", default="text", help="text column (clm, mlm, seq-cls; default: %(default)s)")
    _add(group, "label-column", default="label", help="label column (seq-cls, image-cls; default: %(default)s)")
    _add(group, "image-column", default="image", help="image column (image-cls; default: %(default)s)")
    _add(group, "source-column", default="source", help="input column (seq2seq; default: %(default)s)")
    _add(group, "target-column", default="target", help="output column (seq2seq; default: %(default)s)")
    _add(
        group,
        "validation-split-percentage",
        type=float,
        default=5.0,
        help="share of the training rows held out when the dataset has no validation split (default: %(default)s)",
    )
    _add(group, "block-size", type=int, help="tokens per example (default: min(256, the model's context))")
    if not evaluate_only:
        _add(
            group,
            "max-train-bytes",
            type=int,
            default=8_000_000,
            help="bytes of the embedded training corpus to read (default: %(default)s)",
        )
    _add(
        group,
        "max-eval-bytes",
        type=int,
        default=65_536,
        help="bytes of the embedded validation corpus (default: %(default)s)",
    )
    if not evaluate_only:
        _add(group, "max-train-samples", type=int, help="keep only the first N training examples")
    _add(group, "max-eval-samples", type=int, help="keep only the first N validation examples")
    if evaluate_only:
        parser.set_defaults(max_train_bytes=None, max_train_samples=None)  # (the training split is not read)
    _add(group, "mlm-probability", type=float, default=0.15, help="masked share of tokens (mlm; default: %(default)s)")
    _add(group, "seed", type=int, default=42, help="seed of model init, data order and splits (default: %(default)s)")


def _add_model_source_arguments(parser):
    _add(
        parser,
        "trust-remote-code",
        action="store_true",
        help="allow model code shipped with a checkpoint of a type hf-efficient does not register",
    )


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Train, evaluate, sample and publish hf-efficient models with the transformers Trainer.",
        epilog="Run `hf-efficient <command> --help` for a command's options.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    commands.required = True

    listing = commands.add_parser(
        "list", help="registered architectures, variants, heads, presets and tasks", allow_abbrev=False
    )
    listing.add_argument("--json", action="store_true", help="print JSON")

    # ----------------------------------------------------------------------------------------------------- train
    train = commands.add_parser(
        "train",
        help="pretrain or fine-tune a model on a task with the transformers Trainer",
        description="Pretrain or fine-tune any registered architecture, preset or checkpoint with the transformers "
        "Trainer, evaluate it, and save a Hub-ready folder (safetensors, config, tokenizer or image processor, "
        "generation config, model card with the measured metrics, model code for trust_remote_code). The run "
        "writes into <output-dir>.partial and renames it to <output-dir> only when complete. "
        "With no options it is the main job: a 0.7M-parameter causal gMLP byte LM, 600 steps on the embedded corpus.",
        epilog="Any other TrainingArguments field is accepted as --field_name VALUE (e.g. --optim adamw_torch, "
        "--fsdp 'full_shard auto_wrap', --deepspeed ds.json, --torch_compile), as in transformers' example scripts. "
        "Multi-process: `accelerate launch --multi_gpu --num_processes N -m hf_efficient train ...`.",
        allow_abbrev=False,
    )
    model = train.add_argument_group("model")
    model.add_argument(
        "--model",
        "--model-name-or-path",
        "--model_name_or_path",
        help="a registered architecture (with its config class defaults), a preset name or folder "
        "(model_cards/<preset>), a checkpoint folder, or a Hub id. Default: gmlp with hidden_size=128, "
        "intermediate_size=768, num_hidden_layers=4, max_position_embeddings=128 (0.7M parameters, the main job's "
        "model; for image-cls a tiny vision gMLP sized from the images)",
    )
    model.add_argument("--task", choices=sorted(TASKS), help="default: the checkpoint's or preset's task, else clm")
    _add(
        model,
        "config-overrides",
        metavar="K=V,...",
        help="config fields to change, e.g. hidden_size=128,num_hidden_layers=4,tiny_attn_size=64",
    )
    _add_model_source_arguments(model)
    _add_data_arguments(train)
    run = train.add_argument_group("training (TrainingArguments)")
    _add(run, "output-dir", help="the Hub-ready folder to write (default: out/<model>-<task>)")
    _add(run, "overwrite-output-dir", action="store_true", help="replace an existing output folder")
    _add(run, "max-steps", type=int, help="optimizer steps (default: 600 for clm/mlm, else 300; <= 0: epochs)")
    _add(run, "num-train-epochs", type=float, default=3.0, help="epochs when --max-steps <= 0 (default: 3)")
    _add(
        run,
        "max-train-minutes",
        type=float,
        help="stop training after this many minutes (then evaluate and save as usual; all_results.json records it)",
    )
    _add(run, "per-device-train-batch-size", type=int, help="default: 32 (16 for seq2seq)")
    _add(run, "per-device-eval-batch-size", type=int, help="default: the training batch size")
    _add(run, "gradient-accumulation-steps", type=int, default=1)
    _add(
        run, "learning-rate", type=float, help="peak learning rate (default: 3e-3 clm/mlm, 2e-3 image-cls, else 1e-3)"
    )
    _add(run, "weight-decay", type=float, default=0.0)
    _add(run, "warmup-steps", type=float, default=0.1, help="steps, or a fraction of them if < 1 (default: 0.1)")
    _add(run, "lr-scheduler-type", default="cosine", help="default: %(default)s")
    _add(run, "logging-steps", type=float, default=25, help="default: %(default)s")
    _add(run, "eval-strategy", choices=["no", "steps", "epoch"], default="no", help="the final evaluation always runs")
    _add(run, "eval-steps", type=float)
    _add(run, "save-strategy", choices=["no", "steps", "epoch", "best"], default="steps", help="default: %(default)s")
    _add(run, "save-steps", type=float, default=500, help="checkpoint every N steps (default: %(default)s)")
    _add(run, "save-total-limit", type=int, default=2, help="checkpoints kept (default: %(default)s)")
    _add(run, "bf16", action="store_true", help="bfloat16 mixed precision")
    _add(run, "fp16", action="store_true", help="float16 mixed precision (GPU)")
    _add(run, "gradient-checkpointing", action="store_true", help="recompute activations in the backward pass")
    _add(
        run,
        "resume-from-checkpoint",
        nargs="?",
        const="last",
        metavar="CHECKPOINT",
        help="resume an interrupted run: from its last checkpoint in <output-dir>.partial, or from CHECKPOINT",
    )
    _add(run, "report-to", default="none", help="trackers for the logs (default: %(default)s)")
    _add(run, "disable-tqdm", action="store_true", default=None, help="no progress bars")
    _add(run, "no-sample", action="store_true", help="clm: do not print a generated sample at the end")

    # -------------------------------------------------------------------------------------------------- evaluate
    evaluate = commands.add_parser(
        "evaluate",
        help="evaluate a saved checkpoint on a dataset",
        description="Evaluate a checkpoint (folder or Hub id) on its task's validation data (the embedded default "
        "or --dataset): loss, bits per byte / perplexity (text) or accuracy (classification). Prints JSON.",
        allow_abbrev=False,
    )
    evaluate.add_argument("checkpoint", help="checkpoint folder or Hub id")
    evaluate.add_argument("--task", choices=sorted(TASKS), help="default: from the checkpoint's head")
    _add_model_source_arguments(evaluate)
    _add_data_arguments(evaluate, evaluate_only=True)
    _add(evaluate, "per-device-eval-batch-size", type=int, default=32)
    _add(evaluate, "output-file", metavar="JSON", help="also write the metrics here")
    _add(evaluate, "disable-tqdm", action="store_true", default=None, help="no progress bars")

    # -------------------------------------------------------------------------------------------------- generate
    generate = commands.add_parser(
        "generate",
        help="generate text from a causal checkpoint",
        description="Sample text from a causal LM checkpoint. Options left out come from its generation_config.json.",
        allow_abbrev=False,
    )
    generate.add_argument("checkpoint", help="checkpoint folder or Hub id")
    _add(generate, "prompt", action="append", help="prompt text (repeat for a batch; default: 'def ')")
    _add(generate, "max-new-tokens", type=int, help="tokens to add (capped by the model's context)")
    sampling = generate.add_mutually_exclusive_group()
    _add(sampling, "do-sample", action="store_true", default=None, help="sample")
    sampling.add_argument("--greedy", dest="do_sample", action="store_false", help="greedy / beam search decoding")
    _add(generate, "temperature", type=float)
    _add(generate, "top-k", type=int)
    _add(generate, "top-p", type=float)
    _add(generate, "num-beams", type=int)
    _add(generate, "repetition-penalty", type=float)
    _add(generate, "num-return-sequences", type=int)
    _add(generate, "seed", type=int, default=0, help="default: %(default)s")
    _add_model_source_arguments(generate)

    # --------------------------------------------------------------------------------------------------- publish
    publish = commands.add_parser(
        "publish",
        help="make a checkpoint folder Hub-ready and upload it",
        description="Write safetensors weights, config (with auto_map), the model code, tokenizer or image "
        "processor, generation config and a model card with YAML metadata and the measured metrics (evaluating "
        "first if the folder has none); then, with --repo-id, create the repo and upload the folder. "
        "If the upload fails, the folder stays complete.",
        allow_abbrev=False,
    )
    publish.add_argument("checkpoint", help="checkpoint folder (or Hub id, with --output-dir)")
    publish.add_argument("--task", choices=sorted(TASKS), help="default: from the checkpoint's head")
    _add(publish, "output-dir", help="write the Hub-ready folder here instead of in place")
    _add(publish, "overwrite-output-dir", action="store_true")
    _add(publish, "repo-id", metavar="OWNER/NAME", help="upload to this Hub model repo")
    publish.add_argument("--private", action="store_true", help="create the repo private")
    publish.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    _add(publish, "commit-message", default="Upload hf-efficient model")
    _add(publish, "no-evaluate", action="store_true", help="do not evaluate a folder that has no metrics")
    _add(publish, "per-device-eval-batch-size", type=int, default=32)
    _add(publish, "disable-tqdm", action="store_true", default=None, help="no progress bars")
    _add_model_source_arguments(publish)
    _add_data_arguments(publish, evaluate_only=True)
    return parser


def training_arguments_from(extra: list[str]) -> dict:
    """TrainingArguments fields given as extra `--field value` options (only those given)."""
    from transformers import HfArgumentParser, TrainingArguments

    class Parser(HfArgumentParser):
        def error(self, message):
            raise UsageError(f"train: {message} (see `hf-efficient train --help`)")

    parser = Parser(TrainingArguments)
    defaults = vars(parser.parse_args([]))
    namespace, unknown = parser.parse_known_args(extra)
    if unknown:
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see `hf-efficient train --help`)")
    return {key: value for key, value in vars(namespace).items() if value != defaults[key]}


def print_listing(as_json: bool) -> None:
    from .training import registry

    info = registry()
    if as_json:
        print(json.dumps(info, indent=2))
        return
    print("Architectures (hf_efficient.ARCHITECTURES):")
    for model_type, entry in info["architectures"].items():
        if "error" in entry:
            print(f"  {model_type}: not loadable ({entry['error']})")
            continue
        print(f"  {model_type}  [{entry['config']}, {entry['folder']}]")
        if entry["summary"]:
            print(f"    {entry['summary']}")
        variants = ", ".join(f"{name} ({json.dumps(cfg)})" for name, cfg in entry["variants"].items())
        print(f"    variants: {variants or 'set through config fields (--config-overrides), see the presets'}")
        heads = ", ".join(f"{cls}" for cls in entry["heads"].values())
        print(f"    heads: {heads}")
        print(f"    tasks: {', '.join(entry['tasks']) or 'none'}")
    print("Presets (model_cards/<name>/config.json; any such folder path also works):")
    if not info["presets"]:
        print("  none found")
    for name, entry in info["presets"].items():
        detail = entry.get("error") or f"{entry.get('model_type')}, {entry.get('task') or '?'}: {entry.get('title')}"
        print(f"  {name}  ({detail})")
    print("Tasks:")
    for name, entry in info["tasks"].items():
        print(
            f"  {name}  [{entry['auto_class']}, pipeline {entry['pipeline']}]  default data: {entry['default_data']}"
        )


def run(argv: list[str], callbacks=()) -> int:
    """Parse and run one command (errors propagate; `main` turns them into one line)."""
    parser = build_parser()
    options, extra = parser.parse_known_args(argv)
    if extra and options.command != "train":
        raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see `hf-efficient {options.command} --help`)")
    if options.command == "list":
        print_listing(options.json)
        return 0

    from . import training

    if options.command == "train":
        extra_args = training_arguments_from(extra) if extra else {}
        training.run_train(options, extra_args, callbacks=callbacks)
    elif options.command == "evaluate":
        training.run_evaluate(options)
    elif options.command == "generate":
        training.run_generate(options)
    elif options.command == "publish":
        training.run_publish(options)
    return 0


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "unknown error"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("HF_EFFICIENT_DEBUG", "") not in ("", "0")
    try:
        return run(argv)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except UsageError as error:
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except TaskError as error:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(error)}", file=sys.stderr)
        return 1
    except Exception as error:  # anything else still ends in one line; --debug shows where it came from
        if debug:
            raise
        print(
            f"{PROG}: error: {type(error).__name__}: {_one_line(error)} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
