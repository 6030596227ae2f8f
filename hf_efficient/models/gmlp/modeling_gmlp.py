"""gMLP and aMLP (Liu, Dai, So, Le, "Pay Attention to MLPs", NeurIPS 2021) as transformers models.

Reads top to bottom in the order data flows: decoding cache -> spatial gating unit -> tiny attention -> block ->
PreTrainedModel -> base model -> heads.
"""

import math

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from ..shared.common import (
    EfficientPreTrainedModel,
    PatchEmbeddings,
    check_position_ids,
    drop_path,
    eager_attention_forward,
    mask_if_padded,
    past_key_values_alias,
    positions_from_mask,
    run_blocks,
    stochastic_depth_rates,
    token_embedding,
)
from ..shared.heads import (
    CausalLMHead,
    ImageClassificationHead,
    MaskedLMHead,
    SequenceClassificationHead,
    TokenClassificationHead,
)
from ..shared.state_cache import (
    StateCache,
    StateCacheLayer,
    StateCacheModelMixin,
    open_cached_forward,
)
from .configuration_gmlp import GMLPConfig
from .ops_gmlp import spatial_gating_projection


class GMLPCacheLayer(StateCacheLayer):
    """One gMLP block's decoding state. Every tensor is per position (`(B, T, ...)`: gate inputs, tiny-attention
    keys/values, positions and mask), so the state can be cut back to an earlier length: `crop` is exact, which is
    what assisted and prompt-lookup decoding need to drop rejected draft tokens."""

    is_croppable = True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` positions, as `DynamicLayer.crop` does (transformers 5.24+): the
        argument is 0 or negative, and `crop(0)` (what assisted decoding calls when every draft token was accepted)
        keeps everything."""
        if tokens_to_remove > 0:
            raise ValueError(
                f"{type(self).__name__}.crop takes a negative number of tokens to remove (or 0), got "
                f"{tokens_to_remove}."
            )
        keep = max(self.num_seen_tokens + tokens_to_remove, 0)
        if keep >= self.num_seen_tokens:
            return
        self.states = {name: t[:, :keep] for name, t in self.states.items()}
        self.num_seen_tokens = keep


class GMLPCache(StateCache):
    """Decoding cache of a gMLP model: per block the normalised gate inputs of past positions (and aMLP's tiny
    attention keys/values), so a new token costs O(t) per block instead of a full recompute. Croppable (every state
    is per position), so `generate(assistant_model=...)` and prompt-lookup decoding work."""

    def __init__(self, config=None, num_layers: int | None = None):
        super().__init__(config, num_layers)
        self.layers = [GMLPCacheLayer() for _ in self.layers]


class GMLPSpatialGatingUnit(nn.Module):
    """SGU: `u, v = split(x); v = LN(v); return u * (W v + b)`, `W` along the sequence axis.

    `proj` is `nn.Linear(n, n)` laid out exactly as timm's `gate.proj`, applied along positions.
    """

    def __init__(self, config: GMLPConfig):
        super().__init__()
        gate_dim = config.intermediate_size // 2
        self.norm = nn.LayerNorm(gate_dim, eps=config.gate_norm_eps)
        self.proj = nn.Linear(config.max_position_embeddings, config.max_position_embeddings)
        self.proj.is_spatial_projection = True  # tells `_init_weights` to use the paper's init

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        causal: bool,
        positions: torch.LongTensor | None,
        key_mask: torch.Tensor | None,
        past_gate: torch.Tensor | None = None,
        gate_residual: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            hidden_states: `(B, L, d_ffn)`.
            positions, key_mask: `(B, T)` over past + current positions (`T = past + L`), or `None`.
            past_gate: `(B, T - L, d_ffn / 2)` normalised gate inputs of earlier positions (cached decoding).
            gate_residual: `(B, L, d_ffn / 2)` aMLP's tiny-attention output, added after the spatial projection.

        Returns:
            The gated output `(B, L, d_ffn / 2)` and the gate inputs of all `T` positions (for the cache).
        """
        u, v = hidden_states.chunk(2, dim=-1)
        v = self.norm(v)
        if past_gate is not None:
            v = torch.cat([past_gate, v], dim=1)
        if key_mask is not None:
            v = v.masked_fill(~key_mask.bool()[..., None], 0.0)
        gate = spatial_gating_projection(
            v,
            self.proj.weight,
            self.proj.bias,
            causal=causal,
            num_queries=u.shape[1],
            positions=positions,
            key_mask=None,  # already applied above, so the cached gate inputs are clean too
        )
        if gate_residual is not None:
            gate = gate + gate_residual
        return u * gate, v


def tiny_attention_mask(
    num_queries: int, total_len: int, *, causal: bool, key_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask `(B or 1, 1, Lq, T)` of aMLP's tiny attention (True = attend), or None where `is_causal` (or no
    mask at all) says everything: no padding and either bidirectional or `Lq == T`.

    The queries are the last `Lq` of `T` positions. A padded query may see no real key at all (left padding +
    causal), and a fully masked softmax row is NaN: such rows (and only those) attend to their own position; their
    outputs are padding anyway. This is the mask `ops_gmlp.tiny_attention` builds.
    """
    if key_mask is None and (not causal or num_queries == total_len):
        return None
    allowed = torch.ones(num_queries, total_len, dtype=torch.bool, device=device)
    if causal:
        allowed = torch.tril(allowed, diagonal=total_len - num_queries)
    allowed = allowed[None]
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, :]
        own = (
            torch.arange(num_queries, device=device)[:, None] + (total_len - num_queries)
            == torch.arange(total_len, device=device)[None, :]
        )
        allowed = allowed | (own[None] & ~allowed.any(dim=-1, keepdim=True))
    return allowed[:, None]


class GMLPTinyAttention(nn.Module):
    """aMLP's tiny single-head attention: `W_o softmax(q k^T / sqrt(d_attn)) v`, output `d_ffn / 2` channels.

    Runs through transformers' attention interface: `config._attn_implementation` "eager" or "sdpa" (the default).
    """

    def __init__(self, config: GMLPConfig):
        super().__init__()
        self.config = config
        self.attn_size = config.tiny_attn_size
        self.scaling = 1.0 / math.sqrt(config.tiny_attn_size)
        self.qkv = nn.Linear(config.hidden_size, 3 * config.tiny_attn_size)
        self.out = nn.Linear(config.tiny_attn_size, config.intermediate_size // 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        causal: bool,
        key_mask: torch.Tensor | None,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states`: `(B, L, d)` -> `(B, L, d_ffn / 2)`, plus keys and values of all positions (cache)."""
        query, key, value = self.qkv(hidden_states).chunk(3, dim=-1)
        if past_key is not None:
            key = torch.cat([past_key, key], dim=1)
            value = torch.cat([past_value, value], dim=1)
        num_queries, total_len = query.shape[1], key.shape[1]
        mask = tiny_attention_mask(num_queries, total_len, causal=causal, key_mask=key_mask, device=query.device)
        implementation = self.config._attn_implementation or "sdpa"
        attention = (
            eager_attention_forward
            if implementation == "eager"
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        )
        attended, _ = attention(
            self,
            query[:, None],
            key[:, None],
            value[:, None],
            mask,
            dropout=0.0,
            scaling=self.scaling,
            is_causal=causal and mask is None,
        )
        return self.out(attended[:, :, 0]), key, value


class GMLPBlock(GradientCheckpointingLayer):
    """`x + Dropout(W_out(SGU(GELU(W_in(LN(x))))))` with stochastic depth; aMLP adds the tiny attention."""

    def __init__(self, config: GMLPConfig, layer_idx: int, drop_path_rate: float = 0.0):
        super().__init__()
        self.layer_idx = layer_idx
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.sgu = GMLPSpatialGatingUnit(config)
        self.fc2 = nn.Linear(config.intermediate_size // 2, config.hidden_size)
        self.tiny_attn = GMLPTinyAttention(config) if config.tiny_attn_size is not None else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path_rate = drop_path_rate

    def forward(
        self,
        hidden_states: torch.Tensor,
        causal: bool = False,
        positions: torch.LongTensor | None = None,
        key_mask: torch.Tensor | None = None,
        cache: GMLPCache | None = None,
    ) -> torch.Tensor:
        """`hidden_states`: `(B, L, d)`; `positions` / `key_mask`: `(B, T)` over past + current positions."""
        num_new = hidden_states.shape[1]
        past = cache.get_states(self.layer_idx) if cache is not None else {}
        new_states = {}

        residual = hidden_states
        hidden_states = self.norm(hidden_states)
        gate_residual = None
        if self.tiny_attn is not None:
            gate_residual, new_states["attn_key"], new_states["attn_value"] = self.tiny_attn(
                hidden_states,
                causal=causal,
                key_mask=key_mask,
                past_key=past.get("attn_key"),
                past_value=past.get("attn_value"),
            )
        hidden_states = self.act(self.fc1(hidden_states))
        hidden_states, new_states["gate"] = self.sgu(
            hidden_states,
            causal=causal,
            positions=positions,
            key_mask=key_mask,
            past_gate=past.get("gate"),
            gate_residual=gate_residual,
        )
        hidden_states = self.dropout(self.fc2(hidden_states))

        if cache is not None:
            cache.update_states(self.layer_idx, num_new, **new_states)
        return residual + drop_path(hidden_states, self.drop_path_rate, self.training)


class GMLPPreTrainedModel(StateCacheModelMixin, EfficientPreTrainedModel):
    config: GMLPConfig
    _no_split_modules = ["GMLPBlock"]

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate()` builds the (croppable) `GMLPCache` up front, as it does a `DynamicCache` for KV models:
        assisted and prompt-lookup decoding need the cache before the first forward."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        base = getattr(self, self.base_model_prefix, self)
        if model_kwargs.get("cache") is None and generation_config.use_cache is not False and base.causal:
            model_kwargs["cache"] = GMLPCache(self.config)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "is_spatial_projection", False):
            # The paper: W near 0 and b = 1, so every block starts close to a plain channel MLP (u * 1).
            init.normal_(module.weight, mean=0.0, std=self.config.sgu_init_std)
            init.ones_(module.bias)
            return
        super()._init_weights(module)


class GMLPModel(GMLPPreTrainedModel):
    """The gMLP/aMLP stack: embeddings (tokens, or a patch stem for images), blocks, final LayerNorm.

    `causal` (default: `config.causal`) selects the lower-triangular SGU and causal tiny attention.
    """

    def __init__(self, config: GMLPConfig, causal: bool | None = None):
        super().__init__(config)
        self.causal = config.causal if causal is None else causal
        self.embed_tokens = token_embedding(config)
        self.patch_embed = PatchEmbeddings(config) if config.image_size is not None else None
        rates = stochastic_depth_rates(config)
        self.layers = nn.ModuleList(
            [GMLPBlock(config, idx, drop_path_rate=rates[idx]) for idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: GMLPCache | None = None,
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
            position_ids: `(B, L)`; default `cumsum(attention_mask) - 1`, so left padding does not shift positions.
            cache: a `GMLPCache` from an earlier call (causal models only).
            use_cache: return a cache (default: `config.use_cache` for causal models outside training).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        inputs_embeds = self.embed(input_ids, inputs_embeds, pixel_values)
        batch_size, seq_len, _ = inputs_embeds.shape
        cache, past_length = open_cached_forward(
            self, inputs_embeds, attention_mask, cache, use_cache, cache_class=GMLPCache, causal=self.causal
        )
        total_len = past_length + seq_len
        # Reading tensor values (a mask without padding, the largest position) is data-dependent control flow: it is
        # skipped while compiling or exporting, where the graph keeps the general (masked, gathered) path.
        eager = not torch.compiler.is_compiling()
        attention_mask = mask_if_padded(attention_mask)  # no padding: take the fast paths
        explicit_positions = position_ids is not None
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_length, seq_len, inputs_embeds.device)
        limit = self.config.max_position_embeddings
        # a caller's positions index the SGU's spatial matrix: shape like the tokens, none negative
        check_position_ids(type(self).__name__, position_ids if explicit_positions else None, batch_size, seq_len)
        max_position = int(position_ids.max()) if eager and explicit_positions and position_ids.numel() else -1
        if total_len > limit or max_position >= limit:
            raise ValueError(
                f"Sequence length {max(total_len, max_position + 1)} exceeds max_position_embeddings={limit} "
                f"(the size of the SGU's spatial matrix) of this gMLP."
            )

        # Positions/mask over all T positions. Without a cache, left padding or explicit position ids, positions are
        # 0..T-1 for every row and the ops take the shared-weight fast path (positions=None).
        key_mask = attention_mask
        positions = position_ids.expand(batch_size, seq_len)
        if cache is not None:
            past = cache.get_states(0)
            if "positions" in past:
                positions = torch.cat([past["positions"], positions], dim=1)
                past_mask = past["key_mask"]
            else:
                past_mask = None
            new_mask = (
                attention_mask[:, -seq_len:]
                if attention_mask is not None
                else torch.ones(batch_size, seq_len, dtype=torch.long, device=inputs_embeds.device)
            )
            key_mask = torch.cat([past_mask, new_mask], dim=1) if past_mask is not None else new_mask
        elif attention_mask is None and (
            not explicit_positions
            or (
                eager
                and torch.equal(positions, torch.arange(seq_len, device=positions.device).expand(batch_size, seq_len))
            )
        ):
            positions = None

        hidden_states, all_hidden_states = run_blocks(
            self.layers,
            inputs_embeds,
            self.norm,
            output_hidden_states,
            causal=self.causal,
            positions=positions,
            key_mask=key_mask,
            cache=cache,
        )
        if cache is not None:
            # Model-level bookkeeping shared by every layer, kept in layer 0's states so beam search reorders it.
            cache.update_states(0, 0, positions=positions, key_mask=key_mask)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class GMLPForCausalLM(CausalLMHead, GMLPPreTrainedModel, GenerationMixin):
    """gMLP language model with a causal (lower-triangular) SGU; decoding caches past gate inputs, so each new
    token costs O(t) per block instead of a full recompute."""

    base_model_class = GMLPModel


class GMLPForMaskedLM(MaskedLMHead, GMLPPreTrainedModel):
    """gMLP masked language model (bidirectional SGU)."""

    base_model_class = GMLPModel


class GMLPForSequenceClassification(SequenceClassificationHead, GMLPPreTrainedModel):
    """gMLP with a linear classifier on the mean of the real positions' final hidden states."""

    base_model_class = GMLPModel


class GMLPForTokenClassification(TokenClassificationHead, GMLPPreTrainedModel):
    """gMLP with a linear classifier on every position."""

    base_model_class = GMLPModel


class GMLPForImageClassification(ImageClassificationHead, GMLPPreTrainedModel):
    """Vision gMLP (timm layout): patch stem, bidirectional blocks with stochastic depth, LayerNorm, mean pool, head."""

    base_model_class = GMLPModel


__all__ = [
    "GMLPCache",
    "GMLPForCausalLM",
    "GMLPForImageClassification",
    "GMLPForMaskedLM",
    "GMLPForSequenceClassification",
    "GMLPForTokenClassification",
    "GMLPModel",
    "GMLPPreTrainedModel",
]
