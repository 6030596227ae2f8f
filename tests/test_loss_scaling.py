"""Trainer's loss and gradients do not depend on how a batch is split: one batch of 4, four accumulated batches of 1,
or two processes (`accelerate launch --multi_gpu --num_processes 2`, DDP over gloo) of 2 each, for every head kind.

A head whose `forward` takes `**kwargs` is believed by `Trainer` to normalise its loss by `num_items_in_batch`; if it
does not (a plain batch mean), Trainer stops dividing by the accumulation steps and averaging over processes, and
the loss and gradients come out multiplied by them. The generic tester checks accumulation for every architecture
and head in process; this file runs one model of each head kind through real multi-process launches too, and the
encoder-decoder head the generic tester does not cover.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.model_tester import two_process_launch

# One SGD step (lr 1, no clipping or decay: the parameter change is minus the applied gradient) of `Trainer` per
# head kind, then `evaluate()`; rank 0 writes the logged losses and the parameter changes.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from datasets import Dataset
    from safetensors.torch import save_file
    from transformers import Trainer, TrainingArguments, set_seed
    from hf_efficient.models.gmlp import (
        GMLPConfig, GMLPForCausalLM, GMLPForImageClassification, GMLPForMaskedLM, GMLPForSequenceClassification,
        GMLPForTokenClassification,
    )
    from hf_efficient.models.ngram_transformer import NgramTransformerConfig, NgramTransformerForConditionalGeneration
    from hf_efficient.models.sparse_mlp import SparseMLPConfig, SparseMLPForImageClassification

    out, batch_size, accumulation = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, max_position_embeddings=8)
    image = dict(image_size=8, patch_size=4, num_channels=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 64, (4, 8), generator=g)
    pixels = torch.randn(4, 3, 8, 8, generator=g)
    classes = torch.randint(0, 3, (4,), generator=g)
    tags = torch.randint(0, 3, (4, 8), generator=g)
    heads = {
        "causal_lm": (GMLPForCausalLM, GMLPConfig(causal=True, **text), {"input_ids": ids, "labels": ids}),
        "masked_lm": (GMLPForMaskedLM, GMLPConfig(**text), {"input_ids": ids, "labels": ids}),
        "sequence_classification": (
            GMLPForSequenceClassification, GMLPConfig(num_labels=3, **text), {"input_ids": ids, "labels": classes}
        ),
        "token_classification": (
            GMLPForTokenClassification, GMLPConfig(num_labels=3, **text), {"input_ids": ids, "labels": tags}
        ),
        "image_classification": (
            GMLPForImageClassification,
            GMLPConfig(vocab_size=None, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       max_position_embeddings=4, num_labels=3, **image),
            {"pixel_values": pixels, "labels": classes},
        ),
        "sparse_mlp_image_classification": (
            SparseMLPForImageClassification,
            SparseMLPConfig(hidden_size=16, num_hidden_layers=2, num_sparse_layers=1, token_mixing_dim=8,
                            channel_mixing_dim=32, num_token_experts=2, num_channel_experts=2, num_labels=3,
                            router_aux_loss_coef=0.0, router_jitter_noise=0.0, drop_path_rate=0.0, **image),
            {"pixel_values": pixels, "labels": classes},
        ),
        "seq2seq_lm": (
            NgramTransformerForConditionalGeneration,
            NgramTransformerConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, ngram_size=3, is_encoder_decoder=True,
                                   decoder_start_token_id=2, hidden_dropout_prob=0.0, attention_dropout=0.0,
                                   activation_dropout=0.0),
            {"input_ids": ids, "labels": ids[:, :5]},
        ),
    }
    results, changes = {}, {}
    for name, (head, config, columns) in heads.items():
        set_seed(0)
        model = head(config)
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        data = Dataset.from_dict({k: v.tolist() for k, v in columns.items()}).with_format("torch")
        args = TrainingArguments(
            output_dir=f"{out}/{name}", max_steps=1, per_device_train_batch_size=batch_size,
            per_device_eval_batch_size=batch_size, gradient_accumulation_steps=accumulation, optim="sgd",
            learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
            report_to=[], save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
            use_cpu=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        train_loss = trainer.train().training_loss
        eval_loss = trainer.evaluate()["eval_loss"]
        results[name] = {
            "train_loss": train_loss, "eval_loss": eval_loss, "num_processes": trainer.accelerator.num_processes,
            "accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
        }
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        for k, p in unwrapped.named_parameters():
            changes[f"{name}.{k}"] = (before[k] - p.detach()).contiguous()
    if trainer.accelerator.is_main_process:
        json.dump(results, open(f"{out}/results.json", "w"), indent=1)
        save_file(changes, f"{out}/changes.safetensors")
    """
)

HEADS = (
    "causal_lm",
    "masked_lm",
    "sequence_classification",
    "token_classification",
    "image_classification",
    "sparse_mlp_image_classification",
    "seq2seq_lm",
)


def run(command, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def load(out):
    return json.loads((out / "results.json").read_text()), load_file(out / "changes.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("loss_scaling")
    script = tmp_path / "step.py"
    script.write_text(SCRIPT)
    run([sys.executable, str(script), str(tmp_path / "one"), "4", "1"], tmp_path)
    run([sys.executable, str(script), str(tmp_path / "accumulated"), "1", "4"], tmp_path)
    run([*two_process_launch(tmp_path), str(script), str(tmp_path / "two_processes"), "2", "1"], tmp_path)
    return {name: load(tmp_path / name) for name in ("one", "accumulated", "two_processes")}


@pytest.mark.slow
@pytest.mark.parametrize("split", ["accumulated", "two_processes"])
@pytest.mark.parametrize("head", HEADS)
def test_loss_and_gradients_do_not_depend_on_the_batch_split(runs, split, head):
    one_results, one_changes = runs["one"]
    results, changes = runs[split]
    assert one_results[head]["num_processes"] == 1
    assert results[head]["num_processes"] == (2 if split == "two_processes" else 1)
    assert results[head]["train_loss"] == pytest.approx(one_results[head]["train_loss"], rel=1e-5, abs=1e-6)
    assert results[head]["eval_loss"] == pytest.approx(one_results[head]["eval_loss"], rel=1e-5, abs=1e-6)
    names = [name for name in one_changes if name.startswith(f"{head}.")]
    assert names and any(one_changes[name].abs().max() > 0 for name in names)
    for name in names:
        torch.testing.assert_close(changes[name], one_changes[name], rtol=1e-4, atol=1e-6, msg=name)
