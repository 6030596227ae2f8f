"""gMLP and aMLP (Liu, Dai, So, Le, "Pay Attention to MLPs", NeurIPS 2021) as transformers models.

Reads top to bottom in the order data flows: decoding cache -> spatial gating unit -> tiny attention -> block ->
PreTrainedModel -> base model -> heads.
"""

import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    ImageClassifierOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel

from .configuration_gmlp import GMLPConfig
from .ops_gmlp import spatial_gating_projection, tiny_attention


class GMLPCacheLayer(CacheLayerMixin):
    """One layer's decoding state: named tensors, each with the batch on dim 0.

    The layer that owns the state decides what the tensors mean (past gate inputs, running sums, rolling windows,
    span summaries...); this class only keeps them, counts the tokens seen, and applies the batch operations that
    `generate()` needs (beam reordering, batch expansion and selection) to every tensor alike.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.states: dict[str, torch.Tensor] = {}
        self.num_seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} keeps named states, not keys/values: use `cache.update_states(layer_idx, ...)`."
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.states = {}
        self.num_seen_tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(f"{type(self).__name__} cannot be cropped (its states are not per token).")

    def offload(self):
        self.states = {name: t.to("cpu", non_blocking=True) for name, t in self.states.items()}

    def prefetch(self):
        if self.is_initialized:
            self.states = {name: t.to(self.device, non_blocking=True) for name, t in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = {name: t.index_select(0, beam_idx.to(t.device)) for name, t in self.states.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = {name: t.repeat_interleave(repeats, dim=0) for name, t in self.states.items()}

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = {name: t[indices, ...] for name, t in self.states.items()}


class GMLPCache(Cache):
    """Decoding cache of a gMLP model, one `GMLPCacheLayer` of named states per block.

    A `transformers.cache_utils.Cache`, so `generate()` (greedy, sampling, beam search), `get_seq_length()` and
    continuing from a returned cache work as with a KV cache.
    """

    def __init__(self, config: GMLPConfig | None = None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError("GMLPCache needs a `config` or `num_layers`.")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[GMLPCacheLayer() for _ in range(num_layers)])

    def get_states(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The states stored for `layer_idx` (empty before the first forward)."""
        return self.layers[layer_idx].states

    def update_states(self, layer_idx: int, num_new_tokens: int, **states: torch.Tensor) -> None:
        """Replace the states of `layer_idx` after it consumed `num_new_tokens` more tokens."""
        layer = self.layers[layer_idx]
        layer.states.update(states)
        layer.num_seen_tokens += num_new_tokens
        if states and not layer.is_initialized:
            layer.is_initialized = True
            layer.device = next(iter(states.values())).device


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability `drop_prob`."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


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


class GMLPTinyAttention(nn.Module):
    """aMLP's tiny single-head attention: `W_o softmax(q k^T / sqrt(d_attn)) v`, output `d_ffn / 2` channels."""

    def __init__(self, config: GMLPConfig):
        super().__init__()
        self.attn_size = config.tiny_attn_size
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
        attended = tiny_attention(query, key, value, causal=causal, key_mask=key_mask)
        return self.out(attended), key, value


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


class GMLPPatchEmbeddings(nn.Module):
    """Patch stem (timm's `stem.proj`): `(B, C, H, W)` -> `(B, (H / p) * (W / p), d)`."""

    def __init__(self, config: GMLPConfig):
        super().__init__()
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        self.proj = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}."
            )
        return self.proj(pixel_values.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class GMLPPreTrainedModel(PreTrainedModel):
    config_class = GMLPConfig
    config: GMLPConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GMLPBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "is_spatial_projection", False):
            # The paper: W near 0 and b = 1, so every block starts close to a plain channel MLP (u * 1).
            init.normal_(module.weight, mean=0.0, std=self.config.sgu_init_std)
            init.ones_(module.bias)
            return
        super()._init_weights(module)

    # `generate()` must not build a DynamicCache for us: the base model creates its own `Cache` subclass.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False


def _positions_from_mask(
    attention_mask: torch.Tensor | None, past_length: int, num_new: int, device: torch.device
) -> torch.LongTensor:
    """Position ids of the `num_new` newest tokens: `cumsum(mask) - 1` (0 on padding), or plain counting."""
    if attention_mask is None:
        return torch.arange(past_length, past_length + num_new, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -num_new:]


class GMLPModel(GMLPPreTrainedModel):
    """The gMLP/aMLP stack: embeddings (tokens, or a patch stem for images), blocks, final LayerNorm.

    `causal` (default: `config.causal`) selects the lower-triangular SGU and causal tiny attention.
    """

    def __init__(self, config: GMLPConfig, causal: bool | None = None):
        super().__init__(config)
        self.causal = config.causal if causal is None else causal
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            if config.vocab_size is not None
            else None
        )
        self.patch_embed = GMLPPatchEmbeddings(config) if config.image_size is not None else None
        # Stochastic depth grows linearly over the blocks (plain Python: also works on the meta device).
        rates = [
            config.drop_path_rate * i / max(config.num_hidden_layers - 1, 1) for i in range(config.num_hidden_layers)
        ]
        self.layers = nn.ModuleList(
            [GMLPBlock(config, idx, drop_path_rate=rates[idx]) for idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

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
        return_dict: bool | None = None,
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
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if sum(x is not None for x in (input_ids, inputs_embeds, pixel_values)) != 1:
            raise ValueError("Pass exactly one of `input_ids`, `inputs_embeds` or `pixel_values`.")
        if pixel_values is not None:
            if self.patch_embed is None:
                raise ValueError("This gMLP config has no `image_size`/`patch_size`: it cannot take `pixel_values`.")
            inputs_embeds = self.patch_embed(pixel_values)
        elif inputs_embeds is None:
            if self.embed_tokens is None:
                raise ValueError("This gMLP config has `vocab_size=None` (vision only): it cannot take `input_ids`.")
            inputs_embeds = self.embed_tokens(input_ids)
        batch_size, seq_len, _ = inputs_embeds.shape

        if use_cache is None:
            use_cache = self.causal and getattr(self.config, "use_cache", True) and not self.training
        if (use_cache or cache is not None) and not self.causal:
            if cache is not None:
                raise ValueError("A cache can only be used with a causal gMLP (bidirectional SGUs see the future).")
            use_cache = False
        if use_cache and not isinstance(cache, GMLPCache):
            # `generate()` or a user may hand us another (empty) Cache type: replace it by ours.
            if cache is not None and cache.get_seq_length() > 0:
                raise ValueError(f"gMLP needs a GMLPCache to continue decoding, got a filled {type(cache).__name__}.")
            cache = GMLPCache(self.config)
        if not use_cache and cache is not None and not isinstance(cache, GMLPCache):
            cache = None
        past_length = cache.get_seq_length() if cache is not None else 0
        total_len = past_length + seq_len

        if attention_mask is not None and attention_mask.shape[-1] != total_len:
            raise ValueError(
                f"attention_mask has length {attention_mask.shape[-1]}, expected {total_len} "
                f"(past {past_length} + current {seq_len})."
            )
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: take the fast paths
        if position_ids is None:
            position_ids = _positions_from_mask(attention_mask, past_length, seq_len, inputs_embeds.device)
        max_position = int(position_ids.max()) if position_ids.numel() else -1
        limit = self.config.max_position_embeddings
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
        elif attention_mask is None and torch.equal(
            positions, torch.arange(seq_len, device=positions.device).expand(batch_size, seq_len)
        ):
            positions = None

        hidden_states = inputs_embeds
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(
                hidden_states, causal=self.causal, positions=positions, key_mask=key_mask, cache=cache
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        if cache is not None:
            # Model-level bookkeeping shared by every layer, kept in layer 0's states so beam search reorders it.
            cache.update_states(0, 0, positions=positions, key_mask=key_mask)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            # As in transformers, the last hidden state is the normalised output.
            all_hidden_states = all_hidden_states[:-1] + (hidden_states,)

        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states) if v is not None)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class GMLPForCausalLM(GMLPPreTrainedModel, GenerationMixin):
    """gMLP language model with a causal (lower-triangular) SGU; decoding caches past gate inputs, so each new
    token costs O(t) per block instead of a full recompute."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GMLPConfig):
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("GMLPForCausalLM needs a `vocab_size`.")
        self.model = GMLPModel(config, causal=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: GMLPCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """`labels`: `(B, L)` next-token targets (shifted inside the loss), -100 to ignore."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = (logits,) + tuple(v for v in (outputs.cache, outputs.hidden_states) if v is not None)
            return ((loss,) + output) if loss is not None else output
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )


class GMLPForMaskedLM(GMLPPreTrainedModel):
    """gMLP masked language model (bidirectional SGU)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GMLPConfig):
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("GMLPForMaskedLM needs a `vocab_size`.")
        self.model = GMLPModel(config, causal=False)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        """`labels`: `(B, L)` targets at masked positions, -100 elsewhere."""
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


def _mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real positions: `(B, L, d)` -> `(B, d)`."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask[:, -hidden_states.shape[1] :].to(hidden_states.dtype)[..., None]
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class GMLPForSequenceClassification(GMLPPreTrainedModel):
    """gMLP with a linear classifier on the mean of the real positions' final hidden states."""

    def __init__(self, config: GMLPConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = GMLPModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.score(_mean_pool(outputs.last_hidden_state, attention_mask))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class GMLPForTokenClassification(GMLPPreTrainedModel):
    """gMLP with a linear classifier on every position."""

    def __init__(self, config: GMLPConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = GMLPModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return TokenClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class GMLPForImageClassification(GMLPPreTrainedModel):
    """Vision gMLP (timm layout): patch stem, bidirectional blocks with stochastic depth, LayerNorm, mean pool, head."""

    main_input_name = "pixel_values"

    def __init__(self, config: GMLPConfig):
        super().__init__(config)
        if config.image_size is None:
            raise ValueError("GMLPForImageClassification needs `image_size` and `patch_size` in its config.")
        self.num_labels = config.num_labels
        self.model = GMLPModel(config, causal=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.model(pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.last_hidden_state.mean(dim=1))
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


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
