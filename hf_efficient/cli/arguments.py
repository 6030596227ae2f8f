"""The options of each command as typed argument dataclasses, parsed with `transformers.HfArgumentParser` (see
`parser.py`): every field is a flag, spelled `--field_name` or `--field-name`. The command's modules read them; this
module imports none of those modules but the task declarations."""

from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy, SchedulerType

from ..errors import UsageError
from .tasks import TASKS

DEFAULT_PROMPT = TASKS["clm"].default_prompt  # `generate`'s prompt for a causal LM (each task declares its own)
DEFAULT_MAX_NEW_TOKENS = 200  # `generate`'s default length (never saved in a checkpoint's generation config)


def _option(help: str, **kwargs):
    """A dataclass field that is a command-line option (`kwargs`: `default`, or argparse settings)."""
    default = kwargs.pop("default", None)
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str | None = _option(
        "a registered architecture (with its config class defaults and the task's sizes for a new model), a preset "
        "name or folder (model_cards/<preset>), a checkpoint folder, or a Hub id. Default: the task's "
        "`default_model` (clm: the main job's preset aft-conv-main-job, a 0.78M-parameter AFT-conv; mlm and "
        "seq-cls: the preset gmlp-main-job, a 0.7M-parameter gMLP; for image-cls a tiny vision "
        "gMLP sized from the images; for seq2seq the N-gram encoder-decoder preset ngram-transformer-tiny-n4)",
        aliases=["--model"],
    )
    task: str | None = _option("default: the checkpoint's or preset's task, else clm", choices=sorted(TASKS))
    config_overrides: str | None = _option(
        "config fields to change, e.g. hidden_size=128,num_hidden_layers=4,tiny_attn_size=64", metavar="K=V,..."
    )
    trust_remote_code: bool = _option(
        "allow model code shipped with a checkpoint of a type hf-efficient does not register", default=False
    )


@dataclass
class DataArguments:
    _argument_group_name = "data (default: the task's embedded data set, no download)"

    dataset: str | None = _option(
        "a local datasets-loadable file or folder: json/jsonl/csv/tsv/txt/parquet files (train.* and "
        "validation.*/test.* give splits), a save_to_disk folder, or an imagefolder tree",
        metavar="PATH",
    )
    dataset_format: str | None = _option(
        "override the guess", choices=["json", "csv", "text", "parquet", "imagefolder"]
    )
    text_column: str = _option("text column (clm, mlm, seq-cls)", default="text")
    label_column: str = _option("label column (seq-cls, image-cls)", default="label")
    image_column: str = _option("image column (image-cls)", default="image")
    source_column: str = _option("input column (seq2seq)", default="source")
    target_column: str = _option("output column (seq2seq)", default="target")
    validation_split_percentage: float = _option(
        "share of the training rows held out when the dataset has no validation split", default=5.0
    )
    block_size: int | None = _option("tokens per example (default: min(256, the model's context))")
    max_eval_bytes: int = _option("bytes of the embedded validation corpus", default=65_536)
    max_eval_samples: int | None = _option("keep only the first N validation examples")
    mlm_probability: float = _option("masked share of tokens (mlm)", default=0.15)


@dataclass
class TrainDataArguments(DataArguments):
    max_train_bytes: int = _option("bytes of the embedded training corpus to read", default=8_000_000)
    max_train_samples: int | None = _option("keep only the first N training examples")


@dataclass
class TrainArguments(Seq2SeqTrainingArguments):
    """`Seq2SeqTrainingArguments` (`TrainingArguments` plus the generation fields of `Seq2SeqTrainer`) with the
    command's defaults. The fields left `None` take the task's defaults (`Task.training`); it is built once, when the
    task and the staging folder are known."""

    _argument_group_name = "training (TrainingArguments: every field is a flag)"

    output_dir: str | None = _option("the Hub-ready folder to write (default: out/<model>-<task>)")
    overwrite_output_dir: bool = _option("replace an existing output folder", default=False)
    max_steps: int | None = _option("optimizer steps (default: the task's; <= 0: epochs)")
    per_device_train_batch_size: int | None = _option("default: the task's")
    per_device_eval_batch_size: int | None = _option("default: the training batch size")
    learning_rate: float | None = _option("peak learning rate (default: the task's)")
    warmup_steps: float = _option("steps, or a fraction of them if < 1", default=0.1)
    lr_scheduler_type: SchedulerType | str = _option("the learning-rate schedule", default="cosine")
    logging_steps: float = _option("log every N steps", default=25)
    eval_strategy: IntervalStrategy | str = _option("the final evaluation always runs", default="no")
    save_strategy: SaveStrategy | str = _option("when to write checkpoints", default="steps")
    save_total_limit: int | None = _option("checkpoints kept", default=2)
    disable_tqdm: bool | None = _option("no progress bars", nargs="?", const=True)
    resume_from_checkpoint: str | None = _option(
        "resume an interrupted run: from its last checkpoint in <output-dir>.partial, or from CHECKPOINT",
        nargs="?",
        const="last",
        metavar="CHECKPOINT",
    )
    use_cpu: bool | None = _option("train on the CPU (default: when no accelerator is found)", nargs="?", const=True)
    max_train_minutes: float | None = _option(
        "stop training after this many minutes (then evaluate and save as usual; all_results.json records it). "
        "Without --max-steps the schedule is sized to the budget: the steps that fit are planned from the measured "
        "step time (revised every tenth of the budget) and the warm-up and decay follow that plan"
    )
    predict_with_generate: bool | None = _option(
        "seq2seq: evaluation generates and reports BLEU, chrF and exact match besides the loss (default: the task's: "
        "true)",
        nargs="?",
        const=True,
    )
    generation_max_length: int | None = _option(
        "seq2seq: max_length of evaluation's generate() (default: the longest validation target plus a margin)"
    )
    no_sample: bool = _option("clm, seq2seq: do not print a generated sample at the end", default=False)


@dataclass
class CheckpointArguments:
    checkpoint: str = field(default=None, init=False, metadata={"positional": True, "help": "folder or Hub id"})
    trust_remote_code: bool = _option(
        ModelArguments.__dataclass_fields__["trust_remote_code"].metadata["help"], default=False
    )


@dataclass
class EvaluationArguments:
    task: str | None = _option("default: from the checkpoint's head", choices=sorted(TASKS))
    per_device_eval_batch_size: int = _option("evaluation batch size", default=32)
    disable_tqdm: bool | None = _option("no progress bars", nargs="?", const=True)
    seed: int = _option("seed of the held-out split of a dataset without one", default=42)


@dataclass
class EvaluateArguments(EvaluationArguments):
    output_file: str | None = _option("also write the metrics here", metavar="JSON")


@dataclass
class PublishArguments(EvaluationArguments):
    output_dir: str | None = _option("write the Hub-ready folder here instead of in place")
    overwrite_output_dir: bool = _option("replace an existing --output-dir", default=False)
    repo_id: str | None = _option("upload to this Hub model repo", metavar="OWNER/NAME")
    private: bool = _option("create the repo private", default=False)
    token: str | None = _option("Hub token (default: HF_TOKEN or the cached login)")
    commit_message: str = _option("the Hub commit message", default="Upload hf-efficient model")
    no_evaluate: bool = _option("do not evaluate a folder that has no metrics", default=False)


@dataclass
class GenerateArguments:
    prompt: list[str] = field(
        default_factory=list,
        metadata={
            "help": f"prompt text (repeat for a batch; default: the task's, {DEFAULT_PROMPT!r} for clm)",
            "action": "extend",
        },
    )
    max_new_tokens: int | None = _option(
        f"tokens to add (default {DEFAULT_MAX_NEW_TOKENS}; capped by the model's position limit with a one-line note)"
    )
    do_sample: bool | None = _option("sample", nargs="?", const=True)
    greedy: bool = _option("greedy / beam search decoding (not with --do-sample)", default=False)
    temperature: float | None = _option("sampling temperature")
    top_k: int | None = _option("sample from the k most likely tokens")
    top_p: float | None = _option("nucleus sampling")
    num_beams: int | None = _option("beam search")
    repetition_penalty: float | None = _option("penalise repeated tokens")
    num_return_sequences: int | None = _option("samples per prompt")
    seed: int = _option("sampling seed", default=0)
    disable_tqdm: bool | None = _option("no progress bars", nargs="?", const=True)

    def settings(self) -> dict:
        """The `generate()` options given (None: from the checkpoint's generation config)."""
        if self.greedy and self.do_sample:
            raise UsageError("generate: --greedy and --do-sample exclude each other")
        names = ("max_new_tokens", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")
        settings = {name: getattr(self, name) for name in (*names, "num_return_sequences")}
        settings["do_sample"] = False if self.greedy else self.do_sample
        return settings


@dataclass
class ListArguments:
    json: bool = _option("print JSON", default=False)
