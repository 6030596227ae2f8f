"""Attention Free Transformer (Zhai et al., 2021, "An Attention Free Transformer") as transformers models.

Reads top to bottom in the order data flows: decoding cache -> position bias -> AFT layer -> FFN -> block ->
PreTrainedModel -> base model -> heads. The AFT maths (all four variants, stable and certified, plus the decoding
steps) lives in `ops_aft.py`.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
)
from transformers.utils import can_return_tuple

from ..shared.common import (
    EfficientPreTrainedModel,
    FeedForward,
    PatchEmbeddings,
    drop_path,
    mask_if_padded,
    past_key_values_alias,
    run_blocks,
    stochastic_depth_rates,
    token_embedding,
)
from ..shared.heads import CausalLMHead, ImageClassificationHead, MaskedLMHead, SequenceClassificationHead
from ..shared.state_cache import StateCache, StateCacheModelMixin, open_cached_forward
from .configuration_aft import AFTConfig
from .ops_aft import (
    AFTState,
    aft_conv1d,
    aft_conv1d_step,
    aft_conv2d,
    aft_full,
    aft_full_step,
    aft_local,
    aft_local_step,
    aft_simple,
    aft_simple_step,
    local_window_offsets,
)


class AFTCache(StateCache):
    """Decoding cache of an AFT model: per layer the running sums (and the rolling window for AFT-local/conv, the
    past keys/values for AFT-full) that make a new token cost O(d) / O(s d) / O(t d)."""


class AFTPositionBias(nn.Module):
    """The learned position bias `w` of AFT-full / AFT-local, shared by all channels of a layer.

    Factorised `w = u v^T` with `u, v` of shape `(n, d')` (the paper's default), or a learned `(n, n)` matrix when
    `position_bias_dim` is None; `n = max_position_embeddings`. Positions are contiguous per sample:
    position `start_b + i` for index `i` (`start_b < 0` for left-padded samples, whose padding is masked anyway);
    indices outside `[0, n)` are clamped (they only ever meet masked keys or discarded queries).
    """

    def __init__(self, config: AFTConfig):
        super().__init__()
        n = config.max_position_embeddings
        self.max_positions = n
        if config.position_bias_dim is None:
            self.weight = nn.Parameter(torch.empty(n, n))
            self.u = self.v = None
        else:
            self.weight = None
            self.u = nn.Parameter(torch.empty(n, config.position_bias_dim))
            self.v = nn.Parameter(torch.empty(n, config.position_bias_dim))

    def _index(self, start: torch.Tensor, offsets: torch.Tensor) -> torch.LongTensor:
        """(Bp, *offsets.shape) clamped positions `start_b + offsets`."""
        return (start.view(-1, *([1] * offsets.dim())) + offsets).clamp(0, self.max_positions - 1)

    def matrix(self, query_start: torch.Tensor, num_queries: int, key_start: torch.Tensor, num_keys: int):
        """AFT-full bias `(Bp, Lq, Lk)`: `w[query_start + i, key_start + j]`."""
        device = query_start.device
        rows = self._index(query_start, torch.arange(num_queries, device=device))
        cols = self._index(key_start, torch.arange(num_keys, device=device))
        if self.weight is not None:
            return self.weight[rows[:, :, None], cols[:, None, :]]
        return torch.matmul(self.u[rows], self.v[cols].transpose(1, 2))

    def factors(self, query_start: torch.Tensor, num_queries: int, key_start: torch.Tensor, num_keys: int):
        """AFT-full bias as factors `(u_rows (Bp, Lq, d'), v_cols (Bp, Lk, d'))` with `w = u_rows v_cols^T`, so
        `aft_full` streams it and the `(Lq, Lk)` matrix never exists; the learned `(n, n)` matrix (no factors)
        gives its dense block `(Bp, Lq, Lk)` as `matrix`."""
        if self.weight is not None:
            return self.matrix(query_start, num_queries, key_start, num_keys)
        device = query_start.device
        rows = self._index(query_start, torch.arange(num_queries, device=device))
        cols = self._index(key_start, torch.arange(num_keys, device=device))
        return self.u[rows], self.v[cols]

    def band(self, start: torch.Tensor, length: int, window: int, causal: bool) -> torch.Tensor:
        """AFT-local bias band `(Bp, L, n_w)`: `band[t, j] = w[p_t, p_t + o_j]` with `p_t = start + t` and the window
        offsets `o_j` of `local_window_offsets` (no `(L, n_w, d')` tensor: blocked matmul for the factorised form).
        """
        device = start.device
        offsets = torch.tensor(list(local_window_offsets(window, causal)), device=device)
        if self.weight is not None:
            rows = self._index(start, torch.arange(length, device=device))
            cols = (rows[..., None] + offsets).clamp(0, self.max_positions - 1)
            return self.weight[rows[..., None], cols]
        # Query blocks of `window` positions against the strip of keys [block - window, block + 2 window):
        # (Bp, n, s, d') @ (Bp, n, d', 3s) -> (Bp, n, s, 3s), then pick each row's n_w band columns.
        n = -(-length // window)
        strip = (2 if causal else 3) * window
        u = self.u[self._index(start, torch.arange(n * window, device=device))].view(-1, n, window, self.u.shape[1])
        key_range = torch.arange(-window, (n + (0 if causal else 1)) * window, device=device)
        v = self.v[self._index(start, key_range)]  # (Bp, (n + 2|3) * s, d')
        blocks = torch.matmul(u, v.unfold(1, strip, window))  # (Bp, n, s, strip)
        column = torch.arange(window, device=device)[:, None] + window + offsets[None, :]  # strip index of o_j
        band = blocks.gather(-1, column.expand(*blocks.shape[:2], window, offsets.numel()))
        return band.reshape(blocks.shape[0], n * window, -1)[:, :length]

    def row(self, position: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """One query's bias `(Bp, K)` over key positions `position + offsets` (decoding)."""
        rows = self._index(position, torch.zeros(1, dtype=torch.long, device=position.device))
        cols = self._index(position, offsets)
        if self.weight is not None:
            return self.weight[rows, cols]
        return (self.u[rows] * self.v[cols]).sum(-1)


class AFTLayer(nn.Module):
    """The AFT token mixer: `o_proj(sigmoid(Q) * AFT-average(K, V, w))` with `Q, K, V` linear projections.

    AFT-conv: `K` has `num_heads` channels and `w` is a per-head kernel, reparameterised
    `gamma * (w - mean) / std + beta` with `gamma = beta = 0` at init (AFT-conv starts as AFT-simple).
    """

    def __init__(self, config: AFTConfig):
        super().__init__()
        d = config.hidden_size
        self.aft_type = config.aft_type
        self.window = config.local_window
        self.grid_size = config.grid_size
        key_channels = config.num_heads if config.aft_type == "conv" else d
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, key_channels)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)
        self.position_bias = AFTPositionBias(config) if config.aft_type in ("full", "local") else None
        if config.aft_type == "conv":
            size = config.conv_kernel_size
            shape = (config.num_heads, size, size) if config.is_vision else (config.num_heads, size)
            self.conv_weight = nn.Parameter(torch.empty(shape))
            self.conv_gamma = nn.Parameter(torch.empty(config.num_heads))
            self.conv_beta = nn.Parameter(torch.empty(config.num_heads))
            self.conv_gain_multiplier = config.conv_gain_multiplier

    def conv_kernel(self) -> torch.Tensor:
        """The reparameterised AFT-conv kernel `m * (gamma * (w - mean) / std + beta)`, per head (`m`: the config's
        `conv_gain_multiplier`, a constant that speeds up how fast Adam moves gamma and beta)."""
        flat = self.conv_weight.flatten(1)
        mean = flat.mean(-1, keepdim=True)
        std = flat.std(-1, unbiased=False, keepdim=True)
        # m folded into the (h,) scale and shift: exact for m = 1, and no extra pass over the kernel
        gain, shift = self.conv_gain_multiplier * self.conv_gamma, self.conv_gain_multiplier * self.conv_beta
        kernel = gain[:, None] * (flat - mean) / (std + 1e-5) + shift[:, None]
        return kernel.view_as(self.conv_weight)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        causal: bool,
        start: torch.Tensor | None,
        past_length: int = 0,
        key_mask: torch.Tensor | None = None,
        state: AFTState | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, AFTState | None]:
        """
        Args:
            hidden_states: `(B, L, d)` (normalised) inputs of the `L` new tokens.
            start: `(Bp,)` position of index 0 of the sequence (Bp = 1 shared, or B), for the position bias.
            past_length: tokens already folded into `state`.
            key_mask: `(B, L)` bool, False on padding of the new tokens (None: no padding).
            state: decoding state from earlier tokens (causal only); `return_state` returns the updated one.
        """
        query, key, value = self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states)
        num_new = hidden_states.shape[1]
        step = state is not None and num_new == 1  # O(1) / O(s) / O(t) decoding step
        valid = key_mask[:, 0] if (step and key_mask is not None) else None
        stateful = dict(initial_state=state, return_state=return_state) if (state is not None or return_state) else {}
        new_state = None
        if self.aft_type == "simple":
            if step:
                out, new_state = aft_simple_step(query[:, 0], key[:, 0], value[:, 0], state, valid)
            else:
                out = aft_simple(query, key, value, causal=causal, key_padding_mask=key_mask, **stateful)
        elif self.aft_type == "local":
            if step:
                offsets = torch.tensor(list(local_window_offsets(self.window, True)), device=start.device)
                band = self.position_bias.row(start + past_length, offsets)
                out, new_state = aft_local_step(query[:, 0], key[:, 0], value[:, 0], band, state, valid)
            else:
                band = self.position_bias.band(start + past_length, num_new, self.window, causal)
                band = band if band.shape[0] > 1 else band[0]
                out = aft_local(
                    query, key, value, band, self.window, causal=causal, key_padding_mask=key_mask, **stateful
                )
        elif self.aft_type == "conv":
            kernel = self.conv_kernel()
            if self.grid_size is not None:
                out = aft_conv2d(query, key, value, kernel, self.grid_size, key_padding_mask=key_mask)
            elif step:
                out, new_state = aft_conv1d_step(query[:, 0], key[:, 0], value[:, 0], kernel, state, valid)
            else:
                out = aft_conv1d(query, key, value, kernel, causal=causal, key_padding_mask=key_mask, **stateful)
        else:  # full: the bias of the new queries against every key so far
            if step:
                w = self.position_bias.matrix(start + past_length, 1, start, past_length + 1)
                out, new_state = aft_full_step(query[:, 0], key[:, 0], value[:, 0], w[:, 0], state, valid)
            else:
                # Factors `(u, v)` (or the dense block of a learned matrix): aft_full streams `u v^T` in tiles.
                w = self.position_bias.factors(start + past_length, num_new, start, past_length + num_new)
                if isinstance(w, tuple):
                    w = tuple(x if x.shape[0] > 1 else x[0] for x in w)
                else:
                    w = w if w.shape[0] > 1 else w[0]
                out = aft_full(query, key, value, w, causal=causal, key_padding_mask=key_mask, **stateful)
        if step:
            out = out[:, None]
        elif return_state:
            out, new_state = out
        return self.o_proj(out), new_state


class AFTBlock(GradientCheckpointingLayer):
    """Pre-LN block: `x + AFT(LN(x))`, then `x + FFN(LN(x))`, each branch with dropout and stochastic depth."""

    def __init__(self, config: AFTConfig, layer_idx: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.aft = AFTLayer(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        hidden_states: torch.Tensor,
        causal: bool = False,
        start: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: "AFTCache | None" = None,
    ) -> torch.Tensor:
        """`hidden_states`: `(B, L, d)`; `start`: `(Bp,)` position of index 0; `key_mask`: `(B, L)` of the new tokens."""
        past = cache.get_states(self.layer_idx) if cache is not None else {}
        state = AFTState(**{name: past[name] for name in AFTState._fields}) if "max" in past else None
        mixed, new_state = self.aft(
            self.norm1(hidden_states),
            causal=causal,
            start=start,
            past_length=cache.get_seq_length(self.layer_idx) if cache is not None else 0,
            key_mask=key_mask,
            state=state,
            return_state=cache is not None,
        )
        hidden_states = hidden_states + drop_path(self.dropout(mixed), self.drop_path_rate, self.training)
        hidden_states = hidden_states + drop_path(
            self.dropout(self.mlp(self.norm2(hidden_states))), self.drop_path_rate, self.training
        )
        if cache is not None:
            cache.update_states(self.layer_idx, hidden_states.shape[1], **new_state._asdict())
        return hidden_states


class AFTPreTrainedModel(StateCacheModelMixin, EfficientPreTrainedModel):
    # The decoding state is running sums over every past key (and a rolling window): it cannot be rolled back to
    # drop rejected draft tokens, so
    # `generate(assistant_model=...)` and prompt-lookup decoding raise transformers' "not supported with stateful
    # models" error.
    _is_stateful = True
    config: AFTConfig
    _no_split_modules = ["AFTBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, AFTPositionBias):
            # The paper: u, v ~ N(0, 1e-2) (std), so every layer starts close to AFT-simple.
            for param in (module.weight, module.u, module.v):
                if param is not None:
                    init.normal_(param, mean=0.0, std=self.config.position_bias_init_std)
        elif isinstance(module, AFTLayer) and module.aft_type == "conv":
            # gamma = beta = 0: the reparameterised kernel is 0 at init, i.e. AFT-conv starts as AFT-simple.
            init.normal_(module.conv_weight, mean=0.0, std=1.0)
            init.zeros_(module.conv_gamma)
            init.zeros_(module.conv_beta)
        elif isinstance(module, AFTModel) and module.class_token is not None:
            init.normal_(module.class_token, mean=0.0, std=self.config.initializer_range)
        else:
            super()._init_weights(module)


class AFTModel(AFTPreTrainedModel):
    """The AFT stack: embeddings (tokens, or a patch stem for images), pre-LN AFT blocks, final LayerNorm.

    `causal` (default: `config.causal`) selects the causal AFT (sums over `t' <= t`).
    Positions are contiguous per sample and start after any left padding, so a left-padded sample sees the
    same position biases as alone (explicit `position_ids` are not supported: they follow from `attention_mask`).
    """

    def __init__(self, config: AFTConfig, causal: bool | None = None):
        super().__init__(config)
        self.causal = config.causal if causal is None else causal
        self.embed_tokens = token_embedding(config)
        self.patch_embed = PatchEmbeddings(config) if config.is_vision else None
        self.class_token = nn.Parameter(torch.empty(1, 1, config.hidden_size)) if config.uses_class_token else None
        with_positions = config.uses_class_token or (config.position_embeddings and not config.is_vision)
        self.embed_positions = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size) if with_positions else None
        )
        rates = stochastic_depth_rates(config)
        self.layers = nn.ModuleList(
            [AFTBlock(config, idx, drop_path_rate=rates[idx]) for idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def _embed(self, input_ids, inputs_embeds, pixel_values) -> torch.Tensor:
        embeds = self.embed(input_ids, inputs_embeds, pixel_values)
        if pixel_values is not None and self.class_token is not None:
            embeds = torch.cat([self.class_token.expand(embeds.shape[0], -1, -1).to(embeds.dtype), embeds], 1)
        return embeds

    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: AFTCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        Args:
            input_ids: `(B, L)` token ids; or `inputs_embeds` `(B, L, d)`; or `pixel_values` `(B, C, H, W)`.
            attention_mask: `(B, T)` 1 for real tokens, 0 for padding, over past + current tokens when a cache is
                passed (`T = past + L`), else over the `L` current tokens.
            cache: an `AFTCache` from an earlier call (causal models only).
            use_cache: return a cache (default: `config.use_cache` for causal models outside training).
        """
        if kwargs.get("position_ids") is not None:
            raise ValueError(
                "AFT does not take `position_ids`: positions are contiguous per sample and start after the left "
                "padding given by `attention_mask`."
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        hidden_states = self._embed(input_ids, inputs_embeds, pixel_values)
        batch_size, seq_len, _ = hidden_states.shape
        device = hidden_states.device

        cache, past_length = open_cached_forward(
            self, hidden_states, attention_mask, cache, use_cache, cache_class=AFTCache, causal=self.causal
        )
        total_len = past_length + seq_len
        # Reading the mask's values (is there padding at all?) is data-dependent control flow: it is skipped while
        # compiling or exporting, where the graph keeps the general, masked path.
        eager = not torch.compiler.is_compiling()
        key_mask = mask_if_padded(attention_mask)
        if key_mask is not None:
            key_mask = key_mask[:, -seq_len:] != 0
        if self.config.needs_positions and total_len > self.config.max_position_embeddings:
            raise ValueError(
                f"Sequence length {total_len} exceeds max_position_embeddings={self.config.max_position_embeddings} "
                f"of this AFT-{self.config.aft_type} model (the size of its position "
                f"{'bias' if self.config.aft_type in ('full', 'local') else 'embeddings'})."
            )

        # Position of index 0 of the sequence: minus the number of leading pads (kept in the cache while decoding).
        past = cache.get_states(0) if cache is not None else {}
        if "position_start" in past:
            start = past["position_start"]
        elif attention_mask is not None and not (eager and bool(attention_mask[:, 0].all())):
            start = -(attention_mask != 0).long().argmax(-1)
        else:
            start = torch.zeros(1, dtype=torch.long, device=device)
        if self.embed_positions is not None:
            positions = (start[:, None] + past_length + torch.arange(seq_len, device=device)).clamp(min=0)
            hidden_states = hidden_states + self.embed_positions(positions)

        hidden_states, all_hidden_states = run_blocks(
            self.layers,
            hidden_states,
            self.norm,
            output_hidden_states,
            causal=self.causal,
            start=start,
            key_mask=key_mask,
            cache=cache,
        )
        if cache is not None:
            # Model-level bookkeeping, kept in layer 0's states so beam search reorders it with everything else.
            cache.update_states(0, 0, position_start=start.expand(batch_size).clone())
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class AFTForCausalLM(CausalLMHead, AFTPreTrainedModel, GenerationMixin):
    """AFT language model (causal). Decoding keeps running sums per layer: O(d) state and time per token for
    AFT-simple, O(s d) for AFT-local / AFT-conv (the window), O(t d) for AFT-full (its bias needs every key)."""

    base_model_class = AFTModel


class AFTForMaskedLM(MaskedLMHead, AFTPreTrainedModel):
    """AFT masked language model (bidirectional)."""

    base_model_class = AFTModel


class AFTForSequenceClassification(SequenceClassificationHead, AFTPreTrainedModel):
    """AFT with a linear classifier on the mean of the real positions' final hidden states."""

    base_model_class = AFTModel


class AFTForImageClassification(ImageClassificationHead, AFTPreTrainedModel):
    """Vision AFT: patch stem, bidirectional blocks with stochastic depth, LayerNorm, linear head on the class token
    (full/local/simple, DeiT style) or on the mean of the patches (AFT-conv, as the paper)."""

    base_model_class = AFTModel

    def pool_image(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0] if self.config.uses_class_token else hidden_states.mean(dim=1)


__all__ = [
    "AFTCache",
    "AFTForCausalLM",
    "AFTForImageClassification",
    "AFTForMaskedLM",
    "AFTForSequenceClassification",
    "AFTModel",
    "AFTPreTrainedModel",
]
