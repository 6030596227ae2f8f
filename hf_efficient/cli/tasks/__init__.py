"""The tasks of the `hf-efficient` command. A task is an object that owns everything specific to it: the Auto head
it trains, its training defaults, the config a new model takes for it, where its data comes from, how a batch is
collated and which metrics it reports. `TASKS` declares them; the command has no other per-task branches.

Default data is embedded (no download):

- `clm`, `mlm`: the standard-library byte corpus of `hf_efficient.data` (ByT5 byte tokens, blocks of `block_size`).
- `seq-cls`: *which standard-library package does a 128-byte block of source come from?* Four classes (`asyncio`,
  `email`, `tkinter`, `unittest`); files are split into train / validation by a hash of their path (20% validation),
  so validation blocks come from files never seen in training. Chance is 25%.
- `image-cls`: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 real 8 x 8
  grey-scale images, 10 classes), 20% held out (stratified, fixed seed). Images are fed as RGB (grey replicated),
  as transformers' image pipelines load them.
- `seq2seq`: *write numbers and dates out in English words* (`hf_efficient.seq2seq_data`): `"40,517"` -> `"forty
  thousand five hundred seventeen"`, `"1987-03-09"` -> `"March ninth, nineteen eighty-seven"`; 20,000 training
  pairs, 300 validation pairs with no source in common. As in translation the source carries the information and
  the target needs local reordering; evaluation generates (greedy, `Seq2SeqTrainer(predict_with_generate=True)`,
  at most a few tokens past the longest validation target) and reports corpus BLEU, chrF and exact match besides
  the loss (`hf_efficient.cli.metrics`: evaluate modules, BLEU and chrF by sacrebleu). (`Seq2SeqTask.embedded`
  names the function; any function returning `(train, validation)` datasets with `source` and `target` columns can
  replace it.)

Any local `datasets`-loadable path replaces the default (`hf_efficient.data.read_local_dataset`): a file or folder
of json / jsonl / csv / tsv / text / parquet files (`train.*`, `validation.*` / `test.*` give the splits), a folder
saved with `save_to_disk`, or an `imagefolder` tree (`<split>/<label>/<image>` or `<label>/<image>`). Without a
validation split, a seeded `--validation-split-percentage` of the training rows is held out.

The task classes: `Task` and `TaskData` in `base.py`, the text tasks in `text.py`, the image task in `image.py`.
"""

from ... import seq2seq_data
from .base import Task, TaskData
from .image import ImageClassification
from .text import LanguageModelling, Seq2SeqTask, SequenceClassification

# The tasks. Training defaults: optimizer steps, per-device batch size, peak learning rate.
TASKS = {
    task.name: task
    for task in (
        LanguageModelling(
            "clm",
            "AutoModelForCausalLM",
            ("ForCausalLM", "LMHeadModel"),
            "text-generation",
            "causal language modelling",
            "Python standard-library source bytes (embedded)",
            training=dict(max_steps=600, per_device_train_batch_size=32, learning_rate=3e-3),
            # the main job: a sub-quadratic model with a 512-byte context (its card trains it on 8 x 512 blocks)
            default_model="aft-conv-main-job",
            new_config={"causal": True},  # the causal head is causal anyway; the saved base model should match it
            default_prompt="def ",
            generation=dict(do_sample=True, temperature=0.8, top_k=0, top_p=0.95),
        ),
        LanguageModelling(
            "mlm",
            "AutoModelForMaskedLM",
            ("ForMaskedLM",),
            "fill-mask",
            "masked language modelling",
            "Python standard-library source bytes (embedded)",
            training=dict(max_steps=600, per_device_train_batch_size=32, learning_rate=3e-3),
            new_config={"causal": False},  # a masked token is predicted from both sides
            masked=True,
        ),
        SequenceClassification(
            "seq-cls",
            "AutoModelForSequenceClassification",
            ("ForSequenceClassification",),
            "text-classification",
            "sequence classification",
            "which standard-library package (asyncio, email, tkinter, unittest) a 128-byte block comes from (embedded)",
            training=dict(max_steps=300, per_device_train_batch_size=32, learning_rate=1e-3),
        ),
        ImageClassification(
            "image-cls",
            "AutoModelForImageClassification",
            ("ForImageClassification",),
            "image-classification",
            "image classification",
            "scikit-learn handwritten digits, 8x8 grey-scale (embedded)",
            training=dict(max_steps=300, per_device_train_batch_size=32, learning_rate=2e-3),
            default_model="gmlp",  # a new vision gMLP, sized from the images (below)
            # A tiny vision model for the 8 x 8 digits (no token embeddings); sizes the config does not have are
            # skipped, so one declaration serves every architecture.
            new_model=dict(
                patch_size=None,  # chosen from the image size (`ImageClassification.sized_config`)
                hidden_size=64,
                intermediate_size=256,
                num_hidden_layers=4,
                token_mixing_dim=32,
                channel_mixing_dim=256,
                vocab_size=None,
            ),
        ),
        Seq2SeqTask(
            "seq2seq",
            "AutoModelForSeq2SeqLM",
            ("ForConditionalGeneration", "ForSeq2SeqLM"),
            "text2text-generation",
            "sequence-to-sequence generation",
            training=dict(
                max_steps=1000,
                per_device_train_batch_size=32,
                learning_rate=1e-3,
                predict_with_generate=True,  # evaluation generates: BLEU / chrF / exact match besides the loss
            ),
            # A small N-gram encoder-decoder (N = 4; 2 + 2 layers, d 128) that trains on a CPU.
            default_model="ngram-transformer-tiny-n4",
            new_config={"is_encoder_decoder": True},  # an architecture with both forms builds the encoder-decoder
            default_prompt="1987-03-09",
            generation=dict(do_sample=False, num_beams=1),  # greedy, as evaluation decodes
            embedded=seq2seq_data.numbers_to_words_splits,  # the default data: a function returning (train, validation)
        ),
    )
}


def task_of_architecture(class_name: str) -> str | None:
    """The task a saved head trains (`config.architectures[0]`), e.g. 'GMLPForCausalLM' -> 'clm'."""
    return next((t.name for t in TASKS.values() if class_name.endswith(t.head_suffixes)), None)


def task_of_auto(auto_name: str) -> str | None:
    """The task of an Auto class (a key of an architecture's `AUTO_MAPPING`), e.g. 'AutoModelForMaskedLM' -> 'mlm'."""
    return next((t.name for t in TASKS.values() if t.auto_class == auto_name), None)


__all__ = ["TASKS", "Task", "TaskData", "task_of_architecture", "task_of_auto"]
