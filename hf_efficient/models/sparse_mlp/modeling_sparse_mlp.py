"""Sparse-MLP (Lou, Xue, Zheng, You, 2021, arXiv:2109.02008) as transformers models: an MLP-Mixer whose last blocks
route channel rows to token-mixing experts (MoE_S) and patches to channel-mixing experts (MoE_C).

Reads top to bottom in the order data flows: outputs -> MLP -> experts -> MoE layer -> dense block -> sparse block
-> PreTrainedModel -> base model -> head.
"""

import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import grouped_mm_experts_forward, use_experts_implementation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..shared.common import EfficientPreTrainedModel, PatchEmbeddings, drop_path
from ..shared.heads import ImageClassificationHead
from .configuration_sparse_mlp import SparseMLPConfig
from .ops_sparse_mlp import padded_experts_forward, route


@dataclass
class SparseMLPModelOutput(BaseModelOutputWithPooling):
    """`BaseModelOutputWithPooling` plus the MoE fields of transformers' MoE outputs.

    aux_loss (`torch.FloatTensor` of shape `()`): sum over the MoE layers of `0.5 * L_importance + 0.5 * L_load`
        (unweighted; `None` for a model without sparse blocks).
    router_logits (`tuple(torch.FloatTensor)`): with `output_router_logits=True`, the router logits `(N, E)` of every
        MoE layer in order (block i's MoE_S, then its MoE_C, ...); MoE_S has `N = batch * C'` units, MoE_C
        `N = batch * S'`. Recorded the transformers way (`_can_record_outputs`, `capture_outputs`); always `None`
        for a plain Mixer (`num_sparse_layers=0`: no router).
    """

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class SparseMLPImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus `aux_loss` and `router_logits` (see `SparseMLPModelOutput`); `loss` already
    includes `router_aux_loss_coef * aux_loss`."""

    aux_loss: torch.FloatTensor | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class SparseMLPMlp(nn.Module):
    """timm's `Mlp`: `fc2(act(fc1(x)))`."""

    def __init__(self, config: SparseMLPConfig, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))


@use_experts_implementation(has_bias=True, has_gate=False)
class SparseMLPExperts(nn.Module):
    """`E` two-layer MLP experts stored as 3D tensors in transformers' experts layout (no gate, with bias), so that
    `experts_implementation="eager" | "batched_mm" | "grouped_mm"` all run them:
    `up_proj` `(E, h, d)`, `up_proj_bias` `(E, h)`, `down_proj` `(E, d, h)`, `down_proj_bias` `(E, d)`.

    `forward(hidden_states (N, d), top_k_index (N, k), top_k_weights (N, k)) -> (N, d)`; the eager forward is the
    padded batched matmul of `ops_sparse_mlp.padded_experts_forward` (no loop over experts)."""

    def __init__(self, config: SparseMLPConfig, num_experts: int, dim: int, hidden_dim: int):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_dim = dim
        self.intermediate_dim = hidden_dim
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.up_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.LongTensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # The padded buffer's size is the largest expert load, a data-dependent shape (a graph break): in a
            # compiled graph the same sums run as transformers' grouped matmul over the expert-sorted pairs.
            return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
        return padded_experts_forward(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.up_proj,
            self.up_proj_bias,
            self.down_proj,
            self.down_proj_bias,
            self.act_fn,
        )


class SparseMLPMoE(nn.Module):
    """One MoE layer: router `W_g` (no bias), `TopK(softmax(W_g x + eps))`, optional capacity, experts.

    `forward(units (N, d)) -> (output (N, d), router_logits (N, E), aux_loss ())`. Pairs dropped by the capacity are
    not computed at all (only kept pairs reach the experts); their contribution is zero, so a unit dropped by all its
    experts passes through the surrounding residual unchanged."""

    def __init__(self, config: SparseMLPConfig, num_experts: int, top_k: int, dim: int, hidden_dim: int):
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = config.router_noise_std(num_experts)
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = SparseMLPExperts(config, num_experts, dim, hidden_dim)

    def _check_grouped_mm(self, units: torch.Tensor) -> None:
        if self.config._experts_implementation != "grouped_mm":
            return
        values_per_16_bytes = max(1, 16 // units.element_size())
        for name, size in (
            ("unit size", self.experts.hidden_dim),
            ("expert hidden size", self.experts.intermediate_dim),
        ):
            if size % values_per_16_bytes:
                raise ValueError(
                    f"experts_implementation='grouped_mm' needs matrix sizes that are multiples of "
                    f"{values_per_16_bytes} for {units.dtype}; this MoE layer's {name} is {size}. "
                    "Use experts_implementation='eager' or 'batched_mm', or change the config's sizes."
                )

    def forward(
        self, units: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`units` `(N, d)`; `noise`: the router noise `eps` `(N, E)` to use (default: drawn in training only)."""
        self._check_grouped_mm(units)
        router_logits = self.router(units)
        if noise is None and self.training and self.noise_std > 0:
            noise = torch.randn_like(router_logits, dtype=torch.float32) * self.noise_std
        routing = route(
            router_logits,
            self.top_k,
            noise=noise,
            noise_std=self.noise_std,
            capacity_factor=self.config.capacity_factor,
            priority=self.config.capacity_priority,
        )
        weights = routing.top_k_weights.to(units.dtype)
        if routing.keep is None:
            return self.experts(units, routing.top_k_index, weights), router_logits, routing.aux_loss
        # Capacity: compute only the kept (unit, choice) pairs, each as its own single-choice row.
        unit_idx, choice_idx = routing.keep.nonzero(as_tuple=True)
        kept_out = self.experts(
            units[unit_idx], routing.top_k_index[unit_idx, choice_idx, None], weights[unit_idx, choice_idx, None]
        )
        pair_out = units.new_zeros(units.shape[0] * self.top_k, units.shape[-1])
        pair_out = pair_out.index_put((unit_idx * self.top_k + choice_idx,), kept_out)  # pairs are distinct
        return pair_out.view(units.shape[0], self.top_k, -1).sum(dim=1), router_logits, routing.aux_loss


class SparseMLPDenseBlock(GradientCheckpointingLayer):
    """timm's `MixerBlock`: `x = x + MLP_tok(LN(x)^T)^T; x = x + MLP_ch(LN(x))`, with stochastic depth."""

    def __init__(self, config: SparseMLPConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp_tokens = SparseMLPMlp(config, config.num_patches, config.token_mixing_dim)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp_channels = SparseMLPMlp(config, config.hidden_size, config.channel_mixing_dim)
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None, tuple]:
        """`hidden_states`: `(B, S, C)`."""
        mixed = self.mlp_tokens(self.norm1(hidden_states).transpose(1, 2)).transpose(1, 2)
        hidden_states = hidden_states + drop_path(mixed, self.drop_path_rate, self.training)
        mixed = self.mlp_channels(self.norm2(hidden_states))
        return hidden_states + drop_path(mixed, self.drop_path_rate, self.training), None, ()


class SparseMLPSparseBlock(GradientCheckpointingLayer):
    """Re-represent-in `(S, C) -> (S', C')`, MoE_S (token mixing; each channel row is a unit), MoE_C (channel
    mixing; each patch is a unit), re-represent-out `(S', C') -> (S, C)`; no residual around the whole block."""

    def __init__(self, config: SparseMLPConfig, drop_path_rate: float = 0.0):
        super().__init__()
        patches, channels = config.num_patches, config.hidden_size
        sparse_patches, sparse_channels = config.sparse_patches, config.sparse_channels
        self.channels_in = nn.Linear(channels, sparse_channels)
        self.patches_in = nn.Linear(patches, sparse_patches)
        self.token_norm = nn.LayerNorm(sparse_channels, eps=config.layer_norm_eps)
        self.token_moe = SparseMLPMoE(
            config, config.num_token_experts, config.token_top_k, sparse_patches, config.sparse_token_dim
        )
        self.channel_norm = nn.LayerNorm(sparse_channels, eps=config.layer_norm_eps)
        self.channel_moe = SparseMLPMoE(
            config, config.num_channel_experts, config.channel_top_k, sparse_channels, config.sparse_channel_dim
        )
        self.patches_out = nn.Linear(sparse_patches, patches)
        self.channels_out = nn.Linear(sparse_channels, channels)
        for layer in (self.channels_in, self.patches_in, self.patches_out, self.channels_out):
            layer.is_re_represent = True  # variance-preserving init, see `_init_weights`
        self.drop_path_rate = drop_path_rate

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """`hidden_states`: `(B, S, C)`; returns the block output, its MoE layers' aux loss and router logits."""
        batch_size = hidden_states.shape[0]
        hidden_states = self.channels_in(hidden_states)  # (B, S, C')
        hidden_states = self.patches_in(hidden_states.transpose(1, 2)).transpose(1, 2)  # (B, S', C')
        _, sparse_patches, sparse_channels = hidden_states.shape

        rows = self.token_norm(hidden_states).transpose(1, 2).reshape(batch_size * sparse_channels, sparse_patches)
        mixed, token_logits, token_aux = self.token_moe(rows)
        mixed = mixed.view(batch_size, sparse_channels, sparse_patches).transpose(1, 2)
        hidden_states = hidden_states + drop_path(mixed, self.drop_path_rate, self.training)

        patches = self.channel_norm(hidden_states).reshape(batch_size * sparse_patches, sparse_channels)
        mixed, channel_logits, channel_aux = self.channel_moe(patches)
        mixed = mixed.view(batch_size, sparse_patches, sparse_channels)
        hidden_states = hidden_states + drop_path(mixed, self.drop_path_rate, self.training)

        hidden_states = self.patches_out(hidden_states.transpose(1, 2)).transpose(1, 2)  # (B, S, C')
        return self.channels_out(hidden_states), token_aux + channel_aux, (token_logits, channel_logits)


class SparseMLPPreTrainedModel(EfficientPreTrainedModel):
    config_class = SparseMLPConfig
    config: SparseMLPConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["SparseMLPDenseBlock", "SparseMLPSparseBlock"]
    # transformers' MoE convention: `output_router_logits` collects the second output (the router logits `(N, E)`)
    # of every MoE layer through `capture_outputs` hooks, in call order.
    _can_record_outputs = {"router_logits": OutputRecorder(SparseMLPMoE, index=1)}

    @property
    def has_experts(self) -> bool:
        """Whether the config has sparse (MoE) blocks; a plain Mixer (`num_sparse_layers=0`) has no router."""
        return self.config.num_sparse_layers > 0

    @property
    def can_record_outputs(self) -> dict:
        """`_can_record_outputs`, except for a plain Mixer: it records (and so claims) no router outputs."""
        return super().can_record_outputs if self.has_experts else {}

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "is_re_represent", False):
            # The re-represent layers sit on the residual stream (no residual around a sparse block): a small normal
            # init would shrink the signal ~(0.02 sqrt(d))^4 per sparse block, so they get Xavier-uniform (timm's
            # Mixer init for linear layers), which roughly preserves its scale.
            init.xavier_uniform_(module.weight)
            init.zeros_(module.bias)
            return
        if isinstance(module, SparseMLPExperts):
            init.normal_(module.up_proj, mean=0.0, std=self.config.initializer_range)
            init.normal_(module.down_proj, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.up_proj_bias)
            init.zeros_(module.down_proj_bias)
            return
        super()._init_weights(module)


def _router_outputs_only_with_experts(forward):
    """`output_router_logits=None` means the config's value (`capture_outputs` reads only a value that is passed,
    so a None from a head is dropped); a plain Mixer has no router: the flag is off there, so its outputs keep
    `router_logits=None` instead of an empty tuple."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if kwargs.get("output_router_logits", 0) is None:
            del kwargs["output_router_logits"]
        if not self.has_experts:
            kwargs["output_router_logits"] = False
        return forward(self, *args, **kwargs)

    return wrapper


class SparseMLPModel(SparseMLPPreTrainedModel):
    """Patch stem, `num_hidden_layers - num_sparse_layers` dense Mixer blocks, `num_sparse_layers` sparse blocks,
    final LayerNorm; `pooler_output` is the mean over patches (timm's global average pool)."""

    def __init__(self, config: SparseMLPConfig):
        super().__init__(config)
        self.patch_embed = PatchEmbeddings(config)  # timm's `stem.proj`
        num_dense = config.num_hidden_layers - config.num_sparse_layers
        rates = [
            config.drop_path_rate * i / max(config.num_hidden_layers - 1, 1) for i in range(config.num_hidden_layers)
        ]
        self.layers = nn.ModuleList(
            [
                SparseMLPDenseBlock(config, rates[i]) if i < num_dense else SparseMLPSparseBlock(config, rates[i])
                for i in range(config.num_hidden_layers)
            ]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.patch_embed

    @_router_outputs_only_with_experts
    @capture_outputs
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> SparseMLPModelOutput:
        """
        Args:
            pixel_values: `(B, num_channels, image_size, image_size)`, a batch of at least one image.
            output_router_logits: return every MoE layer's router logits (default `config.output_router_logits`);
                `capture_outputs` records them from the MoE layers (`_can_record_outputs`).
        """
        if pixel_values is None:
            raise ValueError("SparseMLPModel: `pixel_values` is required (a vision-only model).")
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self.embed(pixel_values=pixel_values)  # checked: shape, a non-empty batch
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        aux_loss = None
        for layer in self.layers:
            hidden_states, layer_aux, _ = layer(hidden_states)
            if layer_aux is not None:
                aux_loss = layer_aux if aux_loss is None else aux_loss + layer_aux
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # As in transformers, the last hidden state is the normalised output.
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
        return SparseMLPModelOutput(
            last_hidden_state=hidden_states,
            pooler_output=hidden_states.mean(dim=1),
            hidden_states=all_hidden_states,
            aux_loss=aux_loss,
        )


class SparseMLPForImageClassification(ImageClassificationHead, SparseMLPPreTrainedModel):
    """Sparse-MLP with a linear classifier on the mean-pooled final features (timm's Mixer head); the loss adds
    `router_aux_loss_coef * aux_loss` to the cross-entropy. `output_router_logits=True` returns every MoE layer's
    router logits."""

    base_model_class = SparseMLPModel
    base_model_causal = None  # a Mixer has no causal mode
    output_class = SparseMLPImageClassifierOutput

    def image_loss(self, logits: torch.Tensor, labels: torch.LongTensor, outputs) -> torch.Tensor:
        loss = super().image_loss(logits, labels, outputs)
        if outputs.aux_loss is not None:
            loss = loss + self.config.router_aux_loss_coef * outputs.aux_loss.to(loss.device)
        return loss

    def extra_outputs(self, outputs) -> dict:
        return {"aux_loss": outputs.aux_loss, "router_logits": outputs.router_logits}


__all__ = [
    "SparseMLPExperts",
    "SparseMLPForImageClassification",
    "SparseMLPImageClassifierOutput",
    "SparseMLPModel",
    "SparseMLPModelOutput",
    "SparseMLPPreTrainedModel",
]
