"""Sparse-MLP: the generic tester (vision-only, MoE), reference agreement of routing / experts / aux losses / blocks,
capacity dropping, the three experts implementations, gradients, presets, pipeline, and two-process DDP training."""

import json
import math
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoConfig, pipeline, set_seed

from hf_efficient.models.sparse_mlp import SparseMLPConfig, SparseMLPForImageClassification, SparseMLPModel
from hf_efficient.models.sparse_mlp.modeling_sparse_mlp import SparseMLPMoE, SparseMLPSparseBlock
from hf_efficient.models.sparse_mlp.ops_sparse_mlp import capacity_keep_mask, expert_capacity, route
from tests import helpers
from tests.model_tester import GenericModelTests, MixtureOfExpertsTests, two_process_launch
from tests.references.sparse_mlp_reference import moe_reference, sparse_block_reference

REPO = Path(__file__).resolve().parents[1]
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def tiny_config(**overrides) -> SparseMLPConfig:
    """helpers.TINY["sparse_mlp"]: 8x8 images, 2x2 patches -> S = 16 patches, C = 16 channels, sparse blocks at
    S' = 32, C' = 8 (multiples of 8, so that grouped_mm also runs in bfloat16)."""
    return helpers.tiny_config("sparse_mlp", **overrides)


class TestSparseMLP(GenericModelTests, MixtureOfExpertsTests):
    model_type = "sparse_mlp"
    all_heads = [SparseMLPModel, SparseMLPForImageClassification]
    vision_only = True
    # (`experts_implementation` is a run-time choice that transformers does not save in config.json, so the generic
    # save/load tests run the default; the three implementations are compared below.)
    variants = {"sparse": {}, "top2_drop_path": {"token_top_k": 2, "drop_path_rate": 0.1}}
    # The load-balancing loss and expert capacity are batch statistics, and the router noise is random: one step then
    # depends on how the batch is split (as in any MoE); without them it must not.
    batch_split_invariant_overrides = {
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "capacity_factor": None,
    }
    invalid_configs = [
        ({"hidden_size": 0}, "hidden_size"),
        ({"image_size": 30, "patch_size": 16}, "patch_size"),
        ({"token_top_k": 5, "num_token_experts": 4}, "token_top_k"),
        ({"channel_top_k": 3, "num_channel_experts": 2}, "channel_top_k"),
        ({"num_sparse_layers": 13, "num_hidden_layers": 12}, "num_sparse_layers"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_priority": "random"}, "capacity_priority"),
        ({"router_jitter_noise": -1.0}, "router_jitter_noise"),
        ({"hidden_size": 15}, "hidden_size"),
        ({"sparse_num_patches": -2}, "sparse_num_patches"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"hidden_act": "nope"}, "hidden_act"),
        ({"initializer_range": 0.0}, "initializer_range"),
    ]

    def get_config(self, variant, head):
        return tiny_config(**self.variants[variant])


class TestPlainMixer(GenericModelTests):
    """`num_sparse_layers=0`: a plain MLP-Mixer (timm's layout), no aux loss."""

    model_type = "sparse_mlp"
    all_heads = [SparseMLPModel, SparseMLPForImageClassification]
    vision_only = True
    variants = {"mixer": {"num_sparse_layers": 0}}
    invalid_configs = [({"patch_size": 3}, "patch_size")]

    def get_config(self, variant, head):
        return tiny_config(**self.variants[variant])

    def test_no_aux_loss_without_sparse_blocks(self):
        model = SparseMLPForImageClassification(tiny_config(num_sparse_layers=0))
        out = model(pixel_values=torch.randn(2, 3, 8, 8), labels=torch.tensor([0, 1]), output_router_logits=True)
        assert out.aux_loss is None and out.router_logits is None
        torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1])))

    def test_mixer_claims_no_router_outputs(self):
        """No router: nothing recordable (`can_record_outputs`), and `router_logits` stays None whether asked by
        argument or by the config, while a sparse model built alongside still records its four MoE layers (the
        recording registry is per class)."""
        sparse = SparseMLPModel(tiny_config()).eval()
        mixer = SparseMLPModel(tiny_config(num_sparse_layers=0, output_router_logits=True)).eval()
        assert mixer.can_record_outputs == {} and "router_logits" in sparse.can_record_outputs
        pixels = torch.randn(2, 3, 8, 8)
        with torch.no_grad():
            assert mixer(pixel_values=pixels).router_logits is None
            assert mixer(pixel_values=pixels, output_router_logits=True).router_logits is None
            assert len(sparse(pixel_values=pixels, output_router_logits=True).router_logits) == 4


# ---------------------------------------------------------------------- routing and MoE vs the per-unit reference
def make_moe(implementation="eager", num_experts=4, top_k=2, dim=8, hidden=16, seed=0, **config_overrides):
    config = tiny_config(experts_implementation=implementation, **config_overrides)
    torch.manual_seed(seed)
    moe = SparseMLPMoE(config, num_experts, top_k, dim, hidden).eval()
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0.0, 0.5)
    return moe


def reference_of(moe, units, noise=None, **kwargs):
    experts = moe.experts
    return moe_reference(
        units,
        moe.router.weight.detach(),
        experts.up_proj.detach(),
        experts.up_proj_bias.detach(),
        experts.down_proj.detach(),
        experts.down_proj_bias.detach(),
        moe.top_k,
        noise=noise,
        noise_std=moe.noise_std,
        **kwargs,
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("with_noise", [False, True])
def test_moe_matches_reference(implementation, top_k, with_noise):
    moe = make_moe(implementation, top_k=top_k)
    units = torch.randn(37, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(37, 4, generator=torch.Generator().manual_seed(2)) * moe.noise_std if with_noise else None
    out, logits, aux = moe(units, noise=noise)
    expected, expected_aux, dropped = reference_of(moe, units, noise)
    assert not dropped
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits.double(), units.double() @ moe.router.weight.double().T, rtol=0, atol=1e-5)
    assert math.isclose(float(aux.detach()), expected_aux["total"], rel_tol=1e-5, abs_tol=1e-7)
    assert (expected_aux["load"] is not None) == with_noise


def test_aux_loss_terms_match_reference_formulas():
    """Each term separately: importance from noise-free probabilities, V-MoE's smooth load from the noisy threshold."""
    from hf_efficient.models.sparse_mlp.ops_sparse_mlp import importance_loss, load_loss

    moe = make_moe(top_k=2)
    units = torch.randn(50, 8, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(50, 4, generator=torch.Generator().manual_seed(4)) * moe.noise_std
    logits = moe.router(units).detach()
    _, aux, _ = reference_of(moe, units, noise)
    assert math.isclose(float(importance_loss(logits.softmax(-1))), aux["importance"], rel_tol=1e-5)
    assert math.isclose(float(load_loss(logits, logits + noise, moe.noise_std, 2)), aux["load"], rel_tol=1e-5)
    assert aux["importance"] > 0 and aux["load"] > 0
    # balanced routing has zero loss: identical units at a zero router
    flat = route(torch.zeros(10, 4), 2, noise=torch.zeros(10, 4), noise_std=0.25)
    assert float(flat.aux_loss) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_sparse_block_matches_reference(implementation):
    config = tiny_config(experts_implementation=implementation)
    torch.manual_seed(0)
    model = SparseMLPModel(config).eval()
    block = model.layers[-1]
    assert isinstance(block, SparseMLPSparseBlock)
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    x = torch.randn(2, config.num_patches, config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out, aux, (token_logits, channel_logits) = block(x)
    assert token_logits.shape == (2 * config.sparse_channels, config.sparse_patches)[:1] + (4,)
    assert channel_logits.shape == (2 * config.sparse_patches, 4)
    for i in range(2):
        expected, _, _ = sparse_block_reference(x[i], block, config.layer_norm_eps)
        torch.testing.assert_close(out[i].double(), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- capacity
def test_capacity_drops_exactly_the_documented_units():
    """E = 2, k = 1, 4 units all choosing expert 0, capacity ceil(1.0 * 4 * 1 / 2) = 2: "importance" keeps the two
    largest top-1 gates (units 1 and 3), "position" keeps the first two units (0 and 1)."""
    assert expert_capacity(4, 2, 1, 1.0) == 2
    index = torch.zeros(4, 1, dtype=torch.long)
    weights = torch.tensor([[0.6], [0.9], [0.7], [0.8]])
    keep = capacity_keep_mask(index, weights, 2, 2, "importance")
    assert keep[:, 0].tolist() == [False, True, False, True]
    keep = capacity_keep_mask(index, weights, 2, 2, "position")
    assert keep[:, 0].tolist() == [True, True, False, False]
    # top-1 choices before top-2 choices: unit 2's second choice (expert 0) loses to unit 3's first choice
    index = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]])
    weights = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    keep = capacity_keep_mask(index, weights, 2, 3, "importance")  # capacity 3 per expert
    assert keep.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    # ties in the top-1 gate: lower unit index first
    keep = capacity_keep_mask(torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 0.5), 2, 1, "importance")
    assert keep[:, 0].tolist() == [True, False, False]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("priority", ["importance", "position"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_matches_reference_and_dropped_units_pass_through(implementation, priority, top_k):
    moe = make_moe(implementation, top_k=top_k, capacity_factor=0.5, capacity_priority=priority)
    units = torch.randn(40, 8, generator=torch.Generator().manual_seed(6))
    out, _, _ = moe(units)
    expected, _, dropped = reference_of(moe, units, capacity_factor=0.5, priority=priority)
    assert dropped, "capacity factor 0.5 must drop pairs"
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    routing = route(moe.router(units), top_k, capacity_factor=0.5, priority=priority)
    dropped_fast = {
        (int(n), int(routing.top_k_index[n, j])) for n, j in zip(*torch.nonzero(~routing.keep, as_tuple=True))
    }
    assert dropped_fast == dropped
    fully_dropped = [n for n in range(40) if all((n, int(e)) in dropped for e in routing.top_k_index[n])]
    assert fully_dropped, "some unit must lose all its experts"
    assert torch.equal(out[fully_dropped], torch.zeros_like(out[fully_dropped]))  # residual only


def test_capacity_in_the_model_leaves_dropped_units_on_the_residual():
    """A capacity so small that every pair is dropped except one per expert: the MoE adds (almost) nothing, so a
    sparse block equals its re-represent layers around the bare residual stream."""
    config = tiny_config(capacity_factor=1e-6)
    torch.manual_seed(0)
    block = SparseMLPModel(config).eval().layers[-1]
    x = torch.randn(1, config.num_patches, config.hidden_size)
    with torch.no_grad():
        out, _, _ = block(x)
        expected, _, _ = sparse_block_reference(x[0], block, config.layer_norm_eps, capacity_factor=1e-6)
    torch.testing.assert_close(out[0].double(), expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- experts implementations
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_experts_implementations_agree_in_forward_and_backward(capacity_factor, tmp_path):
    config = tiny_config(capacity_factor=capacity_factor)
    set_seed(0)
    SparseMLPForImageClassification(config).save_pretrained(tmp_path)
    pixels = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    labels = torch.tensor([0, 1, 2, 0])
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = SparseMLPForImageClassification.from_pretrained(tmp_path, experts_implementation=implementation)
        assert model.config._experts_implementation == implementation
        model.train()
        torch.manual_seed(11)  # same router noise and drop path for every implementation
        out = model(pixel_values=pixels, labels=labels)
        out.loss.backward()
        results[implementation] = (out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    logits, grads = results["eager"]
    for implementation in ("batched_mm", "grouped_mm"):
        torch.testing.assert_close(results[implementation][0], logits, rtol=1e-5, atol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(results[implementation][1][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_set_experts_implementation_switches_at_run_time():
    model = SparseMLPForImageClassification(tiny_config()).eval()
    assert model.config._experts_implementation == "eager"  # the default (see the config docstring)
    pixels = torch.randn(2, 3, 8, 8)
    outputs = {}
    for implementation in IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        assert model.config._experts_implementation == implementation
        with torch.no_grad():
            outputs[implementation] = model(pixel_values=pixels).logits
    for implementation in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(outputs[implementation], outputs["eager"], rtol=1e-5, atol=1e-5)


def test_grouped_mm_with_unaligned_sizes_raises_a_clear_error():
    config = tiny_config(hidden_size=14, experts_implementation="grouped_mm")  # C' = 7
    model = SparseMLPModel(config)
    with pytest.raises(ValueError, match="7"):
        model(pixel_values=torch.randn(1, 3, 8, 8))
    model.set_experts_implementation("eager")
    assert model(pixel_values=torch.randn(1, 3, 8, 8)).last_hidden_state.shape == (1, 16, 14)


# ---------------------------------------------------------------------- router noise, gradients, outputs
def test_router_noise_only_in_training():
    model = SparseMLPForImageClassification(tiny_config())
    pixels = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(pixel_values=pixels, output_router_logits=True)
        torch.manual_seed(2)
        second = model(pixel_values=pixels, output_router_logits=True)
    assert torch.equal(first.logits, second.logits)
    assert first.aux_loss > 0
    model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        noisy_a = model(pixel_values=pixels).logits
        torch.manual_seed(2)
        noisy_b = model(pixel_values=pixels).logits
        torch.manual_seed(1)
        noisy_c = model(pixel_values=pixels).logits
    assert not torch.equal(noisy_a, noisy_b) and torch.equal(noisy_a, noisy_c)
    model.config.router_jitter_noise = 0.0
    quiet = SparseMLPForImageClassification(model.config)
    quiet.load_state_dict(model.state_dict())
    quiet.train()
    with torch.no_grad():
        torch.testing.assert_close(quiet(pixel_values=pixels).logits, first.logits, rtol=0, atol=1e-6)


def test_gradients_reach_the_router_and_every_expert_that_received_units():
    """Evaluation mode (no noise), so the routing is read off the returned router logits: every expert that received
    a unit gets a non-zero gradient in all four tensors, the others exactly zero (they still enter the graph)."""
    config = tiny_config(num_channel_experts=8, num_token_experts=8)
    model = SparseMLPForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    out = model(pixel_values=pixels, labels=torch.tensor([0, 1]), output_router_logits=True)
    out.loss.backward()
    moes = [m for m in model.modules() if isinstance(m, SparseMLPMoE)]
    assert len(moes) == len(out.router_logits) == 4
    for moe, logits in zip(moes, out.router_logits):
        assert moe.router.weight.grad.abs().sum() > 0
        used = torch.zeros(8, dtype=torch.bool)
        used[logits.topk(moe.top_k, dim=-1).indices.unique()] = True
        for name in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias"):
            per_expert = getattr(moe.experts, name).grad.flatten(1).abs().sum(-1)
            assert torch.equal(per_expert > 0, used), (name, per_expert, used)
    # The generic tester's tiny config routes units to every expert, so its every-parameter gradient test is about
    # real gradients, not zeros.
    generic = SparseMLPForImageClassification(tiny_config()).eval()
    with torch.no_grad():
        logits = generic(pixel_values=torch.randn(3, 3, 8, 8), output_router_logits=True).router_logits
    for layer_logits, k in zip(logits, [1, 2, 1, 2]):
        assert len(layer_logits.topk(k, dim=-1).indices.unique()) == 4


def test_sparse_block_keeps_the_signal_scale_at_the_default_init():
    """No residual goes around a sparse block, so its re-represent layers get a variance-preserving init: at the
    default `initializer_range` (0.02) a sparse block's output has about its input's scale (a 0.02-normal init would
    shrink it ~1e-4 times and the digits task would barely train)."""
    config = tiny_config(initializer_range=0.02, hidden_size=64, image_size=16)
    block = SparseMLPModel(config).eval().layers[-1]
    x = torch.randn(4, config.num_patches, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ratio = float(block(x)[0].std() / x.std())
    assert 0.3 < ratio < 3.0, ratio
    assert torch.equal(block.channels_in.bias, torch.zeros_like(block.channels_in.bias))


def test_router_logits_and_aux_loss_outputs():
    model = SparseMLPModel(tiny_config()).eval()
    out = model(pixel_values=torch.randn(2, 3, 8, 8), output_router_logits=True)
    config = model.config
    shapes = [tuple(r.shape) for r in out.router_logits]
    assert shapes == [(2 * config.sparse_channels, 4), (2 * config.sparse_patches, 4)] * 2
    assert out.pooler_output.shape == (2, config.hidden_size)
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state.mean(1))
    # the eval aux loss is the importance terms only, recomputed here from the router logits
    from hf_efficient.models.sparse_mlp.ops_sparse_mlp import importance_loss

    expected = sum(0.5 * importance_loss(r.float().softmax(-1)) for r in out.router_logits)
    torch.testing.assert_close(out.aux_loss, expected)
    assert model(pixel_values=torch.randn(2, 3, 8, 8)).router_logits is None


def test_router_logits_are_recorded_the_transformers_way():
    """`_can_record_outputs` declares the MoE layers' router logits (transformers' MoE convention): `capture_outputs`
    records each MoE layer's router logits `W_g x` in call order, by argument, by `config.output_router_logits`, and
    in the `return_dict=False` tuple."""
    from transformers.utils.output_capturing import OutputRecorder

    assert SparseMLPModel._can_record_outputs == {"router_logits": OutputRecorder(SparseMLPMoE, index=1)}
    model = SparseMLPForImageClassification(tiny_config(output_router_logits=True)).eval()
    moes = [m for m in model.modules() if isinstance(m, SparseMLPMoE)]
    inputs = []
    hooks = [moe.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for moe in moes]
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 3, 8, 8))  # from the config
    for hook in hooks:
        hook.remove()
    assert len(out.router_logits) == len(moes) == 4
    for moe, units, logits in zip(moes, inputs, out.router_logits):
        torch.testing.assert_close(logits, units @ moe.router.weight.T, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert model(pixel_values=torch.randn(2, 3, 8, 8), output_router_logits=False).router_logits is None
        as_tuple = model.model(torch.randn(2, 3, 8, 8), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[-1]) == 4


def test_empty_batch_is_refused():
    """A batch of 0 images used to fail with a reshape error inside the sparse blocks."""
    model = SparseMLPForImageClassification(tiny_config()).eval()
    with pytest.raises(ValueError, match="`pixel_values` is an empty batch \\(shape \\(0, 3, 8, 8\\)\\)"):
        model(pixel_values=torch.randn(0, 3, 8, 8))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_bfloat16_forward_backward_of_every_implementation(implementation):
    model = SparseMLPForImageClassification(tiny_config(experts_implementation=implementation)).eval()
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        full = model(pixel_values=pixels).logits
    model.to(torch.bfloat16)
    half = model(pixel_values=pixels.bfloat16()).logits
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max() + 0.05
    model.train()
    out = model(pixel_values=pixels.bfloat16(), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


# ---------------------------------------------------------------------- pipeline, presets
def test_image_classification_pipeline_from_a_saved_folder(tmp_path):
    from transformers import ViTImageProcessorPil

    config = tiny_config(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    SparseMLPForImageClassification(config).save_pretrained(tmp_path)
    ViTImageProcessorPil(size={"height": 8, "width": 8}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path
    )
    classify = pipeline("image-classification", model=str(tmp_path))
    image = Image.fromarray((np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8))
    top = classify(image)
    assert {p["label"] for p in top} == {"a", "b", "c"}
    assert sum(p["score"] for p in top) == pytest.approx(1.0, abs=1e-5)


# Parameter counts published by the papers (ImageNet-1k heads, 224 px, patch 16).
PUBLISHED_PARAMS = {
    "mixer-b16-224": 59e6,  # MLP-Mixer paper, Table 1 (Mixer-B/16: 59M)
    "mixer-l16-224": 207e6,  # MLP-Mixer paper, Table 1 (Mixer-L/16: 207M)
}


def preset_param_count(preset: str) -> int:
    config = AutoConfig.from_pretrained(REPO / "model_cards" / preset)
    with torch.device("meta"):
        model = SparseMLPForImageClassification(config)
    return sum(p.numel() for p in model.parameters())


def analytic_param_count(c) -> int:
    """Parameters from the architecture's definition (independent of the module code)."""
    s, ch = c.num_patches, c.hidden_size
    s2, c2 = c.sparse_patches, c.sparse_channels

    def mlp(dim, hidden):
        return dim * hidden + hidden + hidden * dim + dim

    dense = 4 * ch + mlp(s, c.token_mixing_dim) + mlp(ch, c.channel_mixing_dim)
    sparse = 2 * (ch * c2 + s * s2) + s2 + c2 + s + ch  # re-represent weights and biases
    sparse += 4 * c2  # token_norm, channel_norm
    sparse += c.num_token_experts * (s2 + mlp(s2, c.sparse_token_dim))  # router column + expert
    sparse += c.num_channel_experts * (c2 + mlp(c2, c.sparse_channel_dim))
    stem = ch * c.num_channels * c.patch_size**2 + ch
    head = 2 * ch + ch * c.num_labels + c.num_labels
    return stem + (c.num_hidden_layers - c.num_sparse_layers) * dense + c.num_sparse_layers * sparse + head


SPARSE_PRESETS = {"sparse-mlp-b16-224": (2, 4), "sparse-mlp-l16-224": (4, 4)}


@pytest.mark.parametrize("preset", sorted(SPARSE_PRESETS))
def test_sparse_presets_are_their_mixer_plus_experts(preset):
    """The paper's parameter table could not be checked offline (see the cards): the sparse presets are tested
    against the architecture's own parameter formula and against the Mixer they grow from."""
    config = AutoConfig.from_pretrained(REPO / "model_cards" / preset)
    assert (config.num_sparse_layers, config.num_channel_experts) == SPARSE_PRESETS[preset]
    assert preset_param_count(preset) == analytic_param_count(config)
    mixer = AutoConfig.from_pretrained(REPO / "model_cards" / preset.replace("sparse-mlp", "mixer"))
    for key in ("hidden_size", "token_mixing_dim", "channel_mixing_dim", "num_hidden_layers", "patch_size"):
        assert getattr(config, key) == getattr(mixer, key), key
    card = json.loads((REPO / "model_cards" / preset / "card.json").read_text())
    assert card["head"] == "SparseMLPForImageClassification" and card["paper"]["arxiv"] == "2109.02008"


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PARAMS))
def test_preset_parameter_counts_match_the_papers(preset):
    count = preset_param_count(preset)
    published = PUBLISHED_PARAMS[preset]
    assert abs(count - published) / published < 0.03, (preset, count, published)
    assert count == analytic_param_count(AutoConfig.from_pretrained(REPO / "model_cards" / preset))
    card = json.loads((REPO / "model_cards" / preset / "card.json").read_text())
    assert card["head"] == "SparseMLPForImageClassification"


# ---------------------------------------------------------------------- two-process DDP
DDP_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
    from hf_efficient.models.sparse_mlp import SparseMLPConfig, SparseMLPForImageClassification
    from hf_efficient.models.sparse_mlp.modeling_sparse_mlp import SparseMLPMoE

    out_dir = sys.argv[1]
    rank = int(os.environ.get("RANK", "0"))
    # MoE_S routes C' = 4 channel rows per image to 8 experts (k = 1), one image per process and step: at least 4 of
    # the 8 token experts get no unit in every step on every rank.
    config = SparseMLPConfig(image_size=8, patch_size=2, hidden_size=8, sparse_hidden_size=4, token_mixing_dim=8,
                             channel_mixing_dim=16, num_hidden_layers=2, num_sparse_layers=1, num_token_experts=8,
                             num_channel_experts=4, num_labels=3, initializer_range=0.2)
    set_seed(0)
    model = SparseMLPForImageClassification(config)
    unused = []
    moe = next(m for m in model.modules() if isinstance(m, SparseMLPMoE))
    moe.register_forward_hook(lambda m, a, o: unused.append(8 - len(o[1].argmax(-1).unique())))
    g = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, 8, 8, generator=g).tolist(), "labels": i % 3} for i in range(8)]
    args = TrainingArguments(output_dir=out_dir, max_steps=3, per_device_train_batch_size=1, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                             ddp_find_unused_parameters=False, ddp_backend="gloo", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows).with_format("torch"))
    result = trainer.train()
    state = {n: p.detach().double().sum().item() for n, p in model.named_parameters()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"world": trainer.args.world_size, "unused": unused, "loss": result.training_loss,
                   "state": state}, f)
    """
)


def test_accelerate_two_processes_with_unused_experts(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (DDP over gloo on CPU) with `find_unused_parameters=False`:
    experts without units in a step still enter the graph (zero gradients), so DDP neither hangs nor errors, and
    both ranks end with identical weights."""
    script = tmp_path / "train_ddp.py"
    script.write_text(DDP_SCRIPT)
    launch = [*two_process_launch(tmp_path), str(script), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    assert all(min(r["unused"]) >= 4 for r in ranks), [r["unused"] for r in ranks]
    assert math.isfinite(ranks[0]["loss"])
    for name, value in ranks[0]["state"].items():
        assert ranks[1]["state"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
