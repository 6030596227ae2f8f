"""`hf-efficient evaluate`: a checkpoint's metrics on its task's validation data, with the task's Trainer. (Named
`evaluation`, not `evaluate`, so that it is never mistaken for the `evaluate` library its metrics use.)"""

import json
import tempfile
from pathlib import Path

from transformers.trainer_callback import PrinterCallback

from ..errors import TaskError
from .models import accelerator_available, load_checkpoint
from .outputs import finite
from .tasks import Task


def evaluate_checkpoint(task: Task, model, processing, data_args, eval_args) -> dict:
    """The task's metrics of a checkpoint on the validation data, with the task's Trainer; where the task scores
    generated text (seq2seq), evaluation generates (greedy, up to the data's `generation_max_length`)."""
    import transformers
    from transformers import Seq2SeqTrainingArguments

    data = task.load_data(data_args, processing, model.config.to_dict(), train=False, seed=eval_args.seed)
    if data.label_names is not None and getattr(model.config, "id2label", None):
        if len(model.config.id2label) != len(data.label_names):
            raise TaskError(
                f"the model has {len(model.config.id2label)} labels but the dataset has {len(data.label_names)} "
                f"({', '.join(map(str, data.label_names[:10]))})"
            )
    with tempfile.TemporaryDirectory() as scratch:
        args = Seq2SeqTrainingArguments(  # (TrainingArguments and the generation fields, read by Seq2SeqTrainer)
            output_dir=scratch,
            per_device_eval_batch_size=eval_args.per_device_eval_batch_size,
            report_to="none",
            use_cpu=not accelerator_available(),
            remove_unused_columns=task.remove_unused_columns,
            disable_tqdm=eval_args.disable_tqdm,
            predict_with_generate=data.generation_max_length is not None,
            generation_max_length=data.generation_max_length,
        )
        trainer = getattr(transformers, task.trainer)(
            model=model,
            args=args,
            eval_dataset=data.validation,
            data_collator=data.collator,
            processing_class=data.processing,
            compute_metrics=data.compute_metrics,
            preprocess_logits_for_metrics=data.preprocess_logits_for_metrics,
        )
        trainer.remove_callback(PrinterCallback)  # (--disable-tqdm) the metrics are printed once, as JSON
        metrics = trainer.evaluate()
    metrics.update(task.metrics_from_loss(metrics, data))
    metrics.update(task=task.name, dataset=data.description, dataset_path=data_args.dataset)
    return finite(metrics)


def run_evaluate(checkpoint_args, data_args, eval_args) -> dict:
    _, task, model, processing = load_checkpoint(checkpoint_args, eval_args.task)
    metrics = evaluate_checkpoint(task, model, processing, data_args, eval_args)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    if eval_args.output_file:
        Path(eval_args.output_file).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics
