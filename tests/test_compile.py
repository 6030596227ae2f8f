"""torch.compile of training steps of R-Transformer, N-gram attention and Sparse-MLP (issues 14 and 15).

gMLP, AFT and Combiner are covered in tests/test_export.py. Every step is compiled with `fullgraph=True` (a graph
break is an error) and must give the eager loss and gradients; inputs are left-padded where the model takes a mask.
These use the `aot_eager` backend (dynamo's graph and AOTAutograd's backward, no code generation); one test runs
torch.compile's default backend (inductor: generated C++ kernels) on gMLP, the model whose documented option is
`model.compile()` for training (see README, "Compiling").
"""

import shutil
from functools import partial

import pytest
import torch
import torch._dynamo

from hf_efficient.models.gmlp import GMLPForCausalLM
from hf_efficient.models.ngram_transformer import (
    NgramTransformerForCausalLM,
    NgramTransformerForConditionalGeneration,
)
from hf_efficient.models.r_transformer import (
    RTransformerForCausalLM,
    RTransformerForSequenceClassification,
)
from hf_efficient.models.sparse_mlp import SparseMLPForImageClassification
from tests.helpers import SMALL, assert_same_step, loss_and_grads, sized_config, tiny_config

ngram_config = partial(tiny_config, "ngram_transformer")
# Sparse-MLP on 16x16 images in 4x4 patches, 2 blocks (one sparse), token-mixing width 8
SPARSE = dict(image_size=16, patch_size=4, token_mixing_dim=8, num_hidden_layers=2, num_sparse_layers=1)
sparse_config = partial(tiny_config, "sparse_mlp", SPARSE)


def _compare(model, inputs, fullgraph=True, backend="aot_eager"):
    """Loss and gradients of one training step, eager and compiled."""
    model.train()

    def step(**kwargs):
        return model(**kwargs).loss

    torch._dynamo.reset()
    eager = loss_and_grads(model, lambda: step(**inputs), seed=0)
    compiled_step = torch.compile(step, backend=backend, fullgraph=fullgraph)
    assert_same_step(loss_and_grads(model, lambda: compiled_step(**inputs), seed=0), eager, atol=1e-6)
    return eager[0]


def _text_inputs(length=16, vocab=64):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on one row
    return ids, mask


@pytest.mark.parametrize("padded", [True, False])
def test_ngram_causal_lm_compiles_without_graph_break(padded):
    torch.manual_seed(0)
    model = NgramTransformerForCausalLM(ngram_config())
    ids, mask = _text_inputs()
    inputs = {"input_ids": ids, "labels": ids, "attention_mask": mask if padded else torch.ones_like(mask)}
    _compare(model, inputs)


def test_ngram_seq2seq_compiles_without_graph_break():
    torch.manual_seed(0)
    model = NgramTransformerForConditionalGeneration(ngram_config(is_encoder_decoder=True))
    ids, mask = _text_inputs()
    labels = ids[:, 3:13].clone()
    labels[1, -2:] = -100
    _compare(model, {"input_ids": ids, "attention_mask": mask, "labels": labels})


@pytest.mark.parametrize("dynamic", [False, True])
def test_ngram_causal_lm_exports_equal_to_eager(dynamic):
    """torch.export of the decoder-only N-gram LM, with a static length and with a dynamic one (a multiple of the
    attention block size, 4 here): the program's logits equal eager ones on left-padded batches of other lengths."""
    torch.manual_seed(0)
    model = NgramTransformerForCausalLM(ngram_config()).eval()
    ids, mask = _text_inputs()
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    shapes = None
    if dynamic:
        blocks = torch.export.Dim("blocks", min=2, max=16)
        shapes = {"input_ids": {1: 4 * blocks}, "attention_mask": {1: 4 * blocks}, "use_cache": None}
    program = torch.export.export(model, (), inputs, dynamic_shapes=shapes)
    for length in [8, 24, 40] if dynamic else [16]:
        ids, mask = _text_inputs(length)
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        with torch.no_grad():
            expected = model(**inputs).logits
            got = program.module()(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_sparse_mlp_compiles_without_graph_break(capacity_factor):
    """The default ("eager") experts run a padded batched matmul whose buffer size is the largest expert load (data);
    in a graph they run transformers' grouped matmul over the same expert-sorted pairs: same loss and gradients.
    The router noise is drawn inside the step from the seeded generator, eager and compiled alike."""
    torch.manual_seed(0)
    model = SparseMLPForImageClassification(sparse_config(capacity_factor=capacity_factor))
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(4, 3, 16, 16, generator=generator)
    loss = _compare(model, {"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 1])})
    assert torch.isfinite(loss)


@pytest.mark.skipif(
    not any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++")),
    reason="inductor generates C++ and needs a C++ compiler on PATH (none found)",
)
def test_gmlp_inductor_training_step_equals_eager():
    """`model.compile()` as the README documents it (torch.compile's defaults: inductor): same loss and gradients as
    eager, within float32 reassociation (inductor fuses and reorders reductions)."""
    config = sized_config(
        "gmlp", SMALL, num_hidden_layers=2, max_position_embeddings=32, causal=True, sgu_init_std=0.1
    )
    torch.manual_seed(0)
    model = GMLPForCausalLM(config).train()
    ids, mask = _text_inputs(length=32)
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}

    def step():
        return model(**inputs).loss

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    eager = loss_and_grads(model, step)
    counters.clear()
    model.compile()
    compiled = loss_and_grads(model, step)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    assert_same_step(compiled, eager)


def r_transformer_config():
    return tiny_config("r_transformer", problem_type="single_label_classification")


@pytest.mark.parametrize("head", [RTransformerForCausalLM, RTransformerForSequenceClassification])
@pytest.mark.parametrize("dynamic", [False, True])
def test_r_transformer_exports_equal_to_eager(head, dynamic):
    """torch.export of R-Transformer heads with a static length and with a dynamic one (any length: the LocalRNN runs
    in one piece for a symbolic length); the program's logits equal eager ones on left-padded batches."""
    torch.manual_seed(0)
    model = head(r_transformer_config()).eval()
    causal = head is RTransformerForCausalLM
    ids, mask = _text_inputs()
    inputs = {"input_ids": ids, "attention_mask": mask} | ({"use_cache": False} if causal else {})
    shapes = None
    if dynamic:
        length = torch.export.Dim("length", min=2, max=64)
        shapes = {name: ({1: length} if name != "use_cache" else None) for name in inputs}
    program = torch.export.export(model, (), inputs, dynamic_shapes=shapes)
    for length in [7, 16, 33] if dynamic else [16]:
        ids, mask = _text_inputs(length)
        inputs = {"input_ids": ids, "attention_mask": mask} | ({"use_cache": False} if causal else {})
        with torch.no_grad():
            expected = model(**inputs).logits
            got = program.module()(**inputs).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_r_transformer_compiles_without_graph_breaks():
    """The whole training step compiles with `fullgraph=True` (the LocalRNN's weights sit in a plain module with the
    nn.GRU layout, not in an `nn.GRU`, which dynamo refuses to wrap) and gives eager's loss and gradients."""
    torch.manual_seed(0)
    model = RTransformerForCausalLM(r_transformer_config()).train()
    ids, mask = _text_inputs()
    inputs = {"input_ids": ids, "attention_mask": mask, "labels": ids}

    def step(**kwargs):
        return model(**kwargs).loss

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(**inputs)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    _compare(model, inputs, fullgraph=True)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_sparse_mlp_classifier_exports_equal_to_eager(capacity_factor):
    """torch.export of the image classifier (in a graph the default experts run the grouped matmul, no data-dependent
    buffer size); the program's logits equal eager ones on other images."""
    torch.manual_seed(0)
    model = SparseMLPForImageClassification(sparse_config(capacity_factor=capacity_factor)).eval()
    generator = torch.Generator().manual_seed(2)
    program = torch.export.export(model, (), {"pixel_values": torch.randn(4, 3, 16, 16, generator=generator)})
    pixels = torch.randn(4, 3, 16, 16, generator=generator)
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits
        got = program.module()(pixel_values=pixels).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
