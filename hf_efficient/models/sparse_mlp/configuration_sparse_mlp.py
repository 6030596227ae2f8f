"""Sparse-MLP configuration (Lou, Xue, Zheng, You, "Sparse-MLP: A Fully-MLP Architecture with Conditional
Computation", arXiv:2109.02008, 2021)."""

from transformers import PreTrainedConfig

from ..shared.config_checks import (
    require_activation,
    require_choice,
    require_divides,
    require_non_negative,
    require_positive,
    require_positive_int,
    require_probability,
    require_task_fields,
)

CAPACITY_PRIORITIES = ("importance", "position")


class SparseMLPConfig(PreTrainedConfig):
    r"""
    Configuration of a Sparse-MLP model: an MLP-Mixer whose last `num_sparse_layers` blocks are sparse
    mixture-of-experts blocks along both axes (Lou et al., 2021).

    Dense block (timm's `MixerBlock`): `x = x + MLP_tok(LN(x)^T)^T; x = x + MLP_ch(LN(x))` on `x` of shape `(S, C)`
    (`S` patches, `C` channels); each MLP is `fc2(GELU(fc1(.)))`.

    Sparse block, on `x` of shape `(S, C)`:

        h = RepIn(x)                 # (S, C) -> (S', C'): Linear C -> C' on each patch, then Linear S -> S' on each
                                     # channel (paper: S' = 2S, C' = C/2)
        h = h + MoE_S(LN(h)^T)^T     # token-mixing experts: each of the C' channel rows (a length-S' vector) of each
                                     # image is one routed unit
        h = h + MoE_C(LN(h))         # channel-mixing experts: each of the S' patches (a length-C' vector) is one unit
        y = RepOut(h)                # (S', C') -> (S, C): Linear S' -> S, then Linear C' -> C

    *(open)* decisions, documented and tested:
    - No residual around the whole sparse block (the two MoE sub-layers have their own residuals). With identity
      re-represent layers (`S' = S`, `C' = C`) a sparse block whose experts all equal a dense block's MLPs then
      computes exactly that dense block (used by the timm upcycling converter).
    - Router: `g(x) = TopK(softmax(W_g x + eps))`, `W_g` without bias, `eps ~ N(0, sigma^2)` in training only, with
      `sigma = router_jitter_noise` (default `1 / E`, V-MoE's choice; `0` disables it). The top-k gate values are not
      renormalised (V-MoE). Units of the whole batch are routed together (one group per MoE layer and step).
    - Auxiliary loss per MoE layer: `0.5 * L_importance + 0.5 * L_load` with V-MoE's definitions (Riquelme et al.
      2021, App. A): `Imp_e = sum_x softmax(W_g x)_e` (noise-free probabilities), `L_importance = CV(Imp)^2`;
      `load_e = mean_x P(e is in the top-k if the noise were re-sampled) = mean_x (1 - Phi((t_k(x) - (W_g x)_e) /
      sigma))` with `t_k(x)` the k-th largest *noisy* logit of `x` (the smooth, differentiable load estimator),
      `L_load = CV(load)^2`, `CV^2 = population variance / mean^2`. The load term needs noise: in evaluation (or
      with `router_jitter_noise=0`) it is left out, as in V-MoE. The model returns `aux_loss` = the sum of these
      terms over all MoE layers (two per sparse block), and a head's loss is `task loss + router_aux_loss_coef *
      aux_loss` (transformers' convention for MoE models; the paper's 0.01 is the default).
    - Capacity: with `capacity_factor` set, each expert takes at most `ceil(capacity_factor * N * k / E)` units
      (`N` units in the batch). Overflow is dropped deterministically in V-MoE's order: every unit's top-1 choice
      before any top-2 choice; within a choice rank, units by priority: `"importance"` (V-MoE's Batch Priority
      Routing, the paper's "importance-score routing": larger top-1 gate value first, ties by unit index) or
      `"position"` (vanilla: unit index). A dropped (unit, expert) pair contributes nothing: a unit dropped by all
      its experts passes through the residual unchanged. `None` drops nothing.

    Args:
        image_size (`int`, defaults to 224), patch_size (`int`, defaults to 16), num_channels (`int`, defaults to 3):
            the patch stem turns a `num_channels x image_size x image_size` image into `S = (image_size /
            patch_size)^2` patches.
        hidden_size (`int`, defaults to 768): channels `C`.
        token_mixing_dim (`int`, defaults to 384): hidden width `D_S` of the dense blocks' token-mixing MLPs.
        channel_mixing_dim (`int`, defaults to 3072): hidden width `D_C` of the dense blocks' channel-mixing MLPs.
        num_hidden_layers (`int`, defaults to 12): blocks in all.
        num_sparse_layers (`int`, defaults to 2): the last `num_sparse_layers` blocks are sparse; 0 gives a plain
            MLP-Mixer.
        num_token_experts (`int`, defaults to 4), num_channel_experts (`int`, defaults to 4): experts `E` of MoE_S /
            MoE_C.
        token_top_k (`int`, defaults to 1), channel_top_k (`int`, defaults to 2): experts per unit `K`.
        sparse_num_patches (`int`, *optional*): `S'` after re-represent-in; default `2 * S`.
        sparse_hidden_size (`int`, *optional*): `C'` after re-represent-in; default `C / 2` (`C` must then be even).
        sparse_token_mixing_dim (`int`, *optional*): hidden width of each MoE_S expert; default `token_mixing_dim`.
        sparse_channel_mixing_dim (`int`, *optional*): hidden width of each MoE_C expert; default
            `channel_mixing_dim`.
        capacity_factor (`float`, *optional*): expert capacity factor (`None`: no unit is ever dropped).
        capacity_priority (`str`, defaults to `"importance"`): overflow priority, `"importance"` or `"position"`.
        router_jitter_noise (`float`, *optional*): std of the training noise on the router logits; `None` = `1 / E`.
        router_aux_loss_coef (`float`, defaults to 0.01): weight of `aux_loss` in a head's loss.
        output_router_logits (`bool`, defaults to `False`): also return every MoE layer's router logits.
        hidden_act (`str`, defaults to `"gelu"`): activation of every MLP and expert (exact GELU, as timm).
        layer_norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon (timm's Mixer: 1e-6).
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and expert weights.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over the blocks.
        num_labels (`int`, defaults to 2): classes of `SparseMLPForImageClassification`.
        experts_implementation (`str`, defaults to `"eager"`): transformers' experts interface, also a
            `from_pretrained` / `set_experts_implementation` argument: `"eager"` (this model's own padded batched
            matmul, vectorised, any sizes), `"batched_mm"` (gathers one weight matrix per (unit, expert) pair: for a
            few units only) or `"grouped_mm"` (`torch.nn.functional.grouped_mm`; every expert matrix dimension must be
            a multiple of 16 bytes, i.e. 4 float32 / 8 bfloat16 values, else a ValueError names it). The default is
            `"eager"` rather than transformers' `"grouped_mm"`: it is as fast or faster on CPU here, has no size
            constraint, and never falls back to transformers' per-expert Python loop (used for `grouped_mm` on CPU
            with torch <= 2.10 and unaligned tensors, and on torch <= 2.8).
    """

    model_type = "sparse_mlp"

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        num_channels: int = 3,
        hidden_size: int = 768,
        token_mixing_dim: int = 384,
        channel_mixing_dim: int = 3072,
        num_hidden_layers: int = 12,
        num_sparse_layers: int = 2,
        num_token_experts: int = 4,
        num_channel_experts: int = 4,
        token_top_k: int = 1,
        channel_top_k: int = 2,
        sparse_num_patches: int | None = None,
        sparse_hidden_size: int | None = None,
        sparse_token_mixing_dim: int | None = None,
        sparse_channel_mixing_dim: int | None = None,
        capacity_factor: float | None = None,
        capacity_priority: str = "importance",
        router_jitter_noise: float | None = None,
        router_aux_loss_coef: float = 0.01,
        output_router_logits: bool = False,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        drop_path_rate: float = 0.0,
        **kwargs,
    ):
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.hidden_size = hidden_size
        self.token_mixing_dim = token_mixing_dim
        self.channel_mixing_dim = channel_mixing_dim
        self.num_hidden_layers = num_hidden_layers
        self.num_sparse_layers = num_sparse_layers
        self.num_token_experts = num_token_experts
        self.num_channel_experts = num_channel_experts
        self.token_top_k = token_top_k
        self.channel_top_k = channel_top_k
        self.sparse_num_patches = sparse_num_patches
        self.sparse_hidden_size = sparse_hidden_size
        self.sparse_token_mixing_dim = sparse_token_mixing_dim
        self.sparse_channel_mixing_dim = sparse_channel_mixing_dim
        self.capacity_factor = capacity_factor
        self.capacity_priority = capacity_priority
        self.router_jitter_noise = router_jitter_noise
        self.router_aux_loss_coef = router_aux_loss_coef
        self.output_router_logits = output_router_logits
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.drop_path_rate = drop_path_rate
        self._validate()
        kwargs.setdefault("experts_implementation", "eager")
        super().__init__(**kwargs)
        require_task_fields(self)  # needs the fields that `PreTrainedConfig.__init__` sets

    # Derived sizes are properties (not stored), so that changing `hidden_size` or `image_size` of a saved config
    # (as the command line does for a new image task) keeps the paper's defaults consistent.
    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def sparse_patches(self) -> int:
        return self.sparse_num_patches if self.sparse_num_patches is not None else 2 * self.num_patches

    @property
    def sparse_channels(self) -> int:
        return self.sparse_hidden_size if self.sparse_hidden_size is not None else self.hidden_size // 2

    @property
    def sparse_token_dim(self) -> int:
        return self.sparse_token_mixing_dim if self.sparse_token_mixing_dim is not None else self.token_mixing_dim

    @property
    def sparse_channel_dim(self) -> int:
        return (
            self.sparse_channel_mixing_dim if self.sparse_channel_mixing_dim is not None else self.channel_mixing_dim
        )

    def router_noise_std(self, num_experts: int) -> float:
        return 1.0 / num_experts if self.router_jitter_noise is None else float(self.router_jitter_noise)

    def _validate(self):
        """Reject invalid values and combinations at creation time, naming the field."""
        require_positive_int(
            self,
            "image_size",
            "patch_size",
            "num_channels",
            "hidden_size",
            "token_mixing_dim",
            "channel_mixing_dim",
            "num_hidden_layers",
            "num_token_experts",
            "num_channel_experts",
            "token_top_k",
            "channel_top_k",
        )
        require_positive_int(
            self,
            "sparse_num_patches",
            "sparse_hidden_size",
            "sparse_token_mixing_dim",
            "sparse_channel_mixing_dim",
            allow_none=True,
        )
        require_divides(self, "patch_size", "image_size")
        if (
            not isinstance(self.num_sparse_layers, int)
            or isinstance(self.num_sparse_layers, bool)
            or not 0 <= self.num_sparse_layers <= self.num_hidden_layers
        ):
            raise ValueError(
                f"SparseMLPConfig: `num_sparse_layers` must be an integer in [0, num_hidden_layers="
                f"{self.num_hidden_layers}], got {self.num_sparse_layers!r}."
            )
        if self.token_top_k > self.num_token_experts:
            raise ValueError(
                f"SparseMLPConfig: `token_top_k` ({self.token_top_k}) cannot exceed `num_token_experts` "
                f"({self.num_token_experts})."
            )
        if self.channel_top_k > self.num_channel_experts:
            raise ValueError(
                f"SparseMLPConfig: `channel_top_k` ({self.channel_top_k}) cannot exceed `num_channel_experts` "
                f"({self.num_channel_experts})."
            )
        if self.num_sparse_layers > 0 and self.sparse_hidden_size is None and self.hidden_size % 2 != 0:
            raise ValueError(
                f"SparseMLPConfig: the default `sparse_hidden_size` is hidden_size / 2, so `hidden_size` must be even, "
                f"got {self.hidden_size} (or set `sparse_hidden_size`)."
            )
        if self.capacity_factor is not None:
            require_positive(self, "capacity_factor")
        require_choice(self, "capacity_priority", CAPACITY_PRIORITIES)
        if self.router_jitter_noise is not None:
            require_non_negative(self, "router_jitter_noise")
        require_non_negative(self, "router_aux_loss_coef")
        require_probability(self, "drop_path_rate")
        require_activation(self)
        require_positive(self, "initializer_range", "layer_norm_eps")


__all__ = ["SparseMLPConfig"]
