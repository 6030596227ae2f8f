"""N-gram masked self-attention Transformer (Chelba, Chen, Bapna, Shazeer, "Faster Transformer Decoding: N-gram Masked
Self-Attention", 2020) as transformers models: encoder-decoder (the paper's translation setting) and decoder-only.

Reads top to bottom in the order data flows: rolling decoding cache -> attention (eager / SDPA through transformers'
attention interface) -> feed-forward -> encoder and decoder layers -> PreTrainedModel -> encoder and decoder stacks
-> base model -> heads. The N-gram attention math lives in `ops_ngram_transformer.py` (pure tensor functions).
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple

from ..shared.common import (
    EfficientPreTrainedModel,
    FeedForward,
    _checking,
    check_attention_mask,
    check_position_ids,
    eager_attention_forward,
    embed_inputs,
    mask_if_padded,
    past_key_values_alias,
    positions_from_mask,
)
from ..shared.heads import CausalLMHead, RefuseAssistedDecodingMixin, check_labels
from .configuration_ngram_transformer import NgramTransformerConfig
from .ops_ngram_transformer import ngram_attention, padding_mask, sinusoidal_positions


# ---------------------------------------------------------------------------------------------- decoding cache
class NgramWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window KV layer with `sliding_window = N`: after each update it keeps exactly the last
    N - 1 keys and values (all a later query can see: itself plus the N - 1 before it).

    The stock layer slices `[-(N - 1):]`, which keeps *everything* when N = 1; here N = 1 keeps nothing (a query then
    sees only its own key, which arrives with it)."""

    def __init__(self, ngram_size: int, **kwargs):
        super().__init__(sliding_window=ngram_size, **kwargs)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self.sliding_window == 1 and not self.record_past:
            self.keys, self.values = self.keys[:, :, :0], self.values[:, :, :0]
        return keys, values


class NgramTransformerCache(DynamicCache):
    """Decoder self-attention cache: one `NgramWindowLayer` (the rolling window of the last N - 1 keys / values) per
    decoder layer, or growing `DynamicLayer`s when `ngram_size=None` (full attention). Seq2seq models pair it with
    a `DynamicCache` of cross-attention keys in an `EncoderDecoderCache`. `get_seq_length()` counts every token
    seen; beam reordering and batch expansion come from the stock layers."""

    def __init__(self, config: NgramTransformerConfig):
        n = config.ngram_size
        layers = [NgramWindowLayer(n) if n is not None else DynamicLayer() for _ in range(config.num_hidden_layers)]
        Cache.__init__(self, layers=layers)


# ---------------------------------------------------------------------------------------------- attention
class NgramTransformerAttention(nn.Module):
    """Multi-head attention with q/k/v/o projections; `kind` is `"encoder"` (bidirectional), `"cross"` (decoder to
    encoder) or `"decoder"` (N-gram masked causal self-attention). The attention itself goes through transformers'
    attention interface (`config._attn_implementation`: eager or SDPA); `output_attentions` uses eager."""

    def __init__(self, config: NgramTransformerConfig, layer_idx: int, kind: str):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.kind = kind
        self.is_causal = kind == "decoder"
        self.ngram_size = config.ngram_size
        self.block_size = config.resolved_block_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        width, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.o_proj = nn.Linear(width, width, bias=bias)

    def _heads(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return proj(x).view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def _implementation(self, output_attentions: bool) -> str:
        return "eager" if output_attentions else (self.config._attn_implementation or "eager")

    def _attention_fn(self, output_attentions: bool) -> Callable:
        implementation = self._implementation(output_attentions)
        interface = (
            eager_attention_forward
            if implementation == "eager"
            else ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        )
        dropout = self.attention_dropout if self.training else 0.0

        def attend(query, key, value, mask, is_causal):
            return interface(self, query, key, value, mask, dropout=dropout, scaling=self.scaling, is_causal=is_causal)

        return attend

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        key_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: `(B, L, d)` queries' inputs.
            key_mask: decoder: `(B, T)` 0/1 over past + current target tokens (or None); encoder / cross: the
                `(B, 1, 1, S)` boolean padding mask of the keys (or None).
            encoder_hidden_states: `(B, S, d)` (cross-attention; unused when the cache already holds its keys).
            cache: decoder: the self-attention cache (rolling window); cross: an `EncoderDecoderCache`.
        """
        batch_size, seq_len, _ = hidden_states.shape
        query = self._heads(self.q_proj, hidden_states)
        attend = self._attention_fn(output_attentions)
        if self.kind == "decoder":
            key, value = self._heads(self.k_proj, hidden_states), self._heads(self.v_proj, hidden_states)
            if cache is not None:
                # The cache returns its window followed by the new keys; queries are the newest positions.
                key, value = cache.update(key, value, self.layer_idx)
            window_mask = key_mask[:, -key.shape[2] :] if key_mask is not None else None
            out, weights = ngram_attention(
                query,
                key,
                value,
                ngram_size=self.ngram_size,
                attention_fn=attend,
                key_mask=window_mask,
                block_size=self.block_size,
                implicit_causal=self._implementation(output_attentions) == "sdpa",
                return_weights=output_attentions,
            )
        else:
            if self.kind == "cross" and cache is not None and cache.is_updated.get(self.layer_idx, False):
                layer = cache.cross_attention_cache.layers[self.layer_idx]
                key, value = layer.keys, layer.values
            else:
                source = encoder_hidden_states if self.kind == "cross" else hidden_states
                key, value = self._heads(self.k_proj, source), self._heads(self.v_proj, source)
                if self.kind == "cross" and cache is not None:
                    key, value = cache.cross_attention_cache.update(key, value, self.layer_idx)
                    cache.is_updated[self.layer_idx] = True
            out, weights = attend(query, key, value, key_mask, False)
        return self.o_proj(out.reshape(batch_size, seq_len, -1)), weights


# ---------------------------------------------------------------------------------------------- layers
class NgramTransformerEncoderLayer(GradientCheckpointingLayer):
    """Pre-LN encoder layer: `x + Dropout(SelfAttn(LN(x)))`, `x + Dropout(FFN(LN(x)))` (full bidirectional attention)."""

    def __init__(self, config: NgramTransformerConfig, layer_idx: int):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = NgramTransformerAttention(config, layer_idx, "encoder")
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states, attention_mask=None, output_attentions=False):
        attended, weights = self.self_attn(
            self.self_attn_norm(hidden_states), key_mask=attention_mask, output_attentions=output_attentions
        )
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, weights


class NgramTransformerDecoderLayer(GradientCheckpointingLayer):
    """Pre-LN decoder layer: N-gram masked self-attention, cross-attention (encoder-decoder only), feed-forward."""

    def __init__(self, config: NgramTransformerConfig, layer_idx: int):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = NgramTransformerAttention(config, layer_idx, "decoder")
        if config.is_encoder_decoder:
            self.cross_attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.cross_attn = NgramTransformerAttention(config, layer_idx, "cross")
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ):
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        attended, self_weights = self.self_attn(
            self.self_attn_norm(hidden_states),
            key_mask=key_mask,
            cache=self_cache,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attended)
        cross_weights = None
        if encoder_hidden_states is not None:
            attended, cross_weights = self.cross_attn(
                self.cross_attn_norm(hidden_states),
                key_mask=encoder_attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                cache=cache if isinstance(cache, EncoderDecoderCache) else None,
                output_attentions=output_attentions,
            )
            hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, self_weights, cross_weights


# ---------------------------------------------------------------------------------------------- models
class NgramTransformerPreTrainedModel(EfficientPreTrainedModel):
    config: NgramTransformerConfig
    _no_split_modules = ["NgramTransformerEncoderLayer", "NgramTransformerDecoderLayer"]
    # The rolling N-gram cache is built by the decoder itself and not cropped token by token: assisted /
    # prompt-lookup decoding get transformers' own "not supported with stateful models" error.
    _is_stateful = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    # `generate()` must not build a full-length DynamicCache: the decoder builds its rolling `NgramTransformerCache`.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False


class _Embedder(nn.Module):
    """Token embeddings (shared, held by the base model and only *referenced* here) times sqrt(d) when
    `scale_embedding`, plus this stack's sinusoidal or learned positions, then dropout."""

    def __init__(self, config: NgramTransformerConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self._shared = [embed_tokens]  # a list: not a submodule, so the weight is saved once (by the base model)
        self.scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        if config.position_embedding_type == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def tokens(self, model_name, input_ids, inputs_embeds) -> torch.Tensor:
        """Checked `(B, L, d)` token embeddings (every bad input is a ValueError naming it)."""
        weight = self._shared[0].weight
        return embed_inputs(
            model_name,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            embed_tokens=self._shared[0],
            hidden_size=self.config.hidden_size,
            dtype=weight.dtype if weight.is_floating_point() else None,
        )

    def forward(self, model_name, embeds, position_ids) -> torch.Tensor:
        """`embeds` `(B, L, d)`, `position_ids` `(B or 1, L)` (a caller's are checked by `check_position_ids`)."""
        learned = self.config.position_embedding_type == "learned"
        if learned:
            limit = self.config.max_position_embeddings
            # A value check reads data: skipped in a compiled / exported graph (no branch on data there).
            if not torch.compiler.is_compiling() and position_ids.numel() and int(position_ids.max()) >= limit:
                raise ValueError(
                    f"{model_name}: position {int(position_ids.max())} exceeds max_position_embeddings={limit} "
                    "(the learned position table)."
                )
        if learned:
            positions = self.embed_positions(position_ids)
        else:
            positions = sinusoidal_positions(position_ids, self.config.hidden_size, embeds.dtype)
        return self.dropout(embeds * self.scale + positions)


def check_encoder_states(name: str, states, batch_size: int, hidden_size: int) -> None:
    """The encoder's output the decoder cross-attends to: `(B, S, d)` with the decoder inputs' batch `B` (not
    broadcast from a batch of 1), at least one source position and the model's width `d`; else a ValueError."""
    shape = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
    if (
        not isinstance(states, torch.Tensor)
        or states.ndim != 3
        or states.shape[0] != batch_size
        or (states.shape[1] == 0 or states.shape[2] != hidden_size)
    ):
        raise ValueError(
            f"NgramTransformer: `{name}` must be the encoder's hidden states of shape (batch, source_length, "
            f"hidden_size) = ({batch_size}, S >= 1, {hidden_size}) (the decoder inputs' batch), got {shape}."
        )


class NgramTransformerEncoder(nn.Module):
    """The encoder stack (full bidirectional self-attention), callable alone as `generate()` does."""

    def __init__(self, config: NgramTransformerConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embedder = _Embedder(config, embed_tokens)
        self.layers = nn.ModuleList(
            [NgramTransformerEncoderLayer(config, idx) for idx in range(config.num_encoder_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput | tuple:
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        embeds = self.embedder.tokens("NgramTransformerEncoder", input_ids, inputs_embeds)
        length = embeds.shape[1]
        check_attention_mask(attention_mask, length, batch_size=embeds.shape[0])
        positions = positions_from_mask(attention_mask, 0, length, embeds.device)
        hidden_states = self.embedder("NgramTransformerEncoder", embeds, positions)
        mask = padding_mask(attention_mask)
        all_hidden, all_attentions = ((hidden_states,) if output_hidden_states else None), ()
        for layer in self.layers:
            hidden_states, weights = layer(hidden_states, mask, bool(output_attentions))
            all_attentions += (weights,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)  # as in transformers: the last one is normalised
        output = BaseModelOutput(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden,
            attentions=all_attentions if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()


class NgramTransformerDecoder(nn.Module):
    """The decoder stack: N-gram masked self-attention (+ cross-attention in an encoder-decoder) per layer.

    Self-attention keys are cached in a rolling window of N - 1 per layer (`NgramTransformerCache`); an
    encoder-decoder wraps it with the cross-attention keys in an `EncoderDecoderCache`."""

    def __init__(self, config: NgramTransformerConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.config = config
        self.embedder = _Embedder(config, embed_tokens)
        self.layers = nn.ModuleList(
            [NgramTransformerDecoderLayer(config, idx) for idx in range(config.num_hidden_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def _resolve_cache(self, cache: Cache | None, use_cache: bool, batch_size: int) -> Cache | None:
        """The cache to decode with: the caller's own (`NgramTransformerCache`, in an `EncoderDecoderCache` for the
        encoder-decoder), a new one in place of None or of an empty foreign cache; a filled foreign cache, or one
        built on another batch size, is a ValueError."""
        if not use_cache and cache is None:
            return None
        seq2seq = self.config.is_encoder_decoder
        self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        own = isinstance(self_cache, NgramTransformerCache) and (isinstance(cache, EncoderDecoderCache) == seq2seq)
        if cache is None or (not own and cache.get_seq_length() == 0):
            # (an empty foreign cache, e.g. a DynamicCache from `generate()`, is replaced by the rolling window)
            cache = NgramTransformerCache(self.config)
            return EncoderDecoderCache(cache, DynamicCache()) if seq2seq else cache
        if not own:
            expected = "an EncoderDecoderCache of an NgramTransformerCache" if seq2seq else "an NgramTransformerCache"
            found = type(cache).__name__
            if isinstance(cache, EncoderDecoderCache):
                found += f" of a {type(self_cache).__name__}"
            raise ValueError(
                f"NgramTransformerDecoder: continuing decoding needs {expected} (what this model returns), got a "
                f"filled {found}."
            )
        caches = [self_cache] + ([cache.cross_attention_cache] if seq2seq else [])
        for layer in (layer for part in caches for layer in part.layers):
            keys = getattr(layer, "keys", None) if layer.is_initialized else None
            if keys is not None and keys.shape[0] != batch_size:
                raise ValueError(
                    f"NgramTransformerDecoder: the cache holds the state of a batch of {keys.shape[0]}, but the inputs "
                    f"have a batch of {batch_size}: continue a cache with the batch it was built on (or expand it "
                    "with `cache.batch_repeat_interleave`)."
                )
        return cache

    @past_key_values_alias
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        if self.config.is_encoder_decoder and encoder_hidden_states is None:
            raise ValueError("NgramTransformerDecoder: an encoder-decoder config needs `encoder_hidden_states`.")
        use_cache = self.config.use_cache and not self.training if use_cache is None else use_cache
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        embeds = self.embedder.tokens("NgramTransformerDecoder", input_ids, inputs_embeds)
        batch_size, length = embeds.shape[:2]
        if encoder_hidden_states is not None:
            check_encoder_states("encoder_hidden_states", encoder_hidden_states, batch_size, self.config.hidden_size)
            check_attention_mask(encoder_attention_mask, encoder_hidden_states.shape[1], batch_size=batch_size)
        cache = self._resolve_cache(cache, use_cache, batch_size)
        device = embeds.device
        past_length = cache.get_seq_length() if cache is not None else 0
        check_attention_mask(attention_mask, past_length + length, past_length, batch_size=batch_size)
        check_position_ids("NgramTransformerDecoder", position_ids, batch_size, length)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past_length, length, device)
        hidden_states = self.embedder("NgramTransformerDecoder", embeds, position_ids)
        key_mask = mask_if_padded(attention_mask)
        cross_mask = padding_mask(encoder_attention_mask)

        all_hidden = (hidden_states,) if output_hidden_states else None
        all_self, all_cross = (), ()
        for layer in self.layers:
            # Tensors positionally: a reentrant checkpoint (`use_reentrant=True`) only sees positional tensors, and
            # `encoder_hidden_states` by keyword would be replayed on a graph already freed.
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                key_mask,
                encoder_hidden_states,
                cross_mask,
                cache=cache,
                output_attentions=bool(output_attentions),
            )
            all_self += (self_weights,)
            all_cross += (cross_weights,)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        hidden_states = self.norm(hidden_states)
        if output_hidden_states:
            all_hidden = all_hidden[:-1] + (hidden_states,)
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            cache=cache if use_cache else None,
            hidden_states=all_hidden,
            attentions=all_self if output_attentions else None,
            cross_attentions=all_cross if output_attentions and self.config.is_encoder_decoder else None,
        )


class NgramTransformerModel(NgramTransformerPreTrainedModel):
    """The base model, one class for both forms (so `AutoModel` maps the single config to it):

    - `config.is_encoder_decoder=True`: shared token embeddings, encoder, N-gram decoder with cross-attention;
      `forward(input_ids, attention_mask, decoder_input_ids, ...)` returns a `Seq2SeqModelOutput`.
    - `config.is_encoder_decoder=False`: token embeddings and the N-gram decoder alone (a causal LM's body);
      `forward(input_ids, attention_mask, ...)` returns a `BaseModelOutputWithPast`.
    """

    def __init__(self, config: NgramTransformerConfig):
        super().__init__(config)
        self.causal = not config.is_encoder_decoder  # the decoder-only body is a causal model over `input_ids`
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        if config.is_encoder_decoder:
            self.encoder = NgramTransformerEncoder(config, self.embed_tokens)
        self.decoder = NgramTransformerDecoder(config, self.embed_tokens)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value
        for stack in (getattr(self, "encoder", None), self.decoder):
            if stack is not None:
                stack.embedder._shared[0] = value

    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput | BaseModelOutputWithPast:
        """
        Decoder-only (`is_encoder_decoder=False`): `input_ids` `(B, L)` (or `inputs_embeds`), `attention_mask`
        `(B, past + L)`, `position_ids` (default `cumsum(mask) - 1`), `cache` (an `NgramTransformerCache`).

        Encoder-decoder: `input_ids` / `attention_mask` are the source; `decoder_input_ids` `(B, T)` the target
        prefix, `decoder_attention_mask` `(B, past + T)`, `encoder_outputs` a precomputed encoder output, `cache` an
        `EncoderDecoderCache` (rolling self-attention window + cross-attention keys).
        """
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        if not self.config.is_encoder_decoder:
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
                cache=cache,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
            return BaseModelOutputWithPast(
                last_hidden_state=out.last_hidden_state,
                cache=out.cache,
                hidden_states=out.hidden_states,
                attentions=out.attentions,
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
            )
        elif not isinstance(encoder_outputs, BaseModelOutput):
            if not isinstance(encoder_outputs, (tuple, list)) or not encoder_outputs:
                raise ValueError(
                    "NgramTransformerModel: `encoder_outputs` must be the encoder's output (a BaseModelOutput, or a "
                    f"tuple whose first element is its last hidden state), got {type(encoder_outputs).__name__}."
                )
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError("NgramTransformerModel (encoder-decoder): pass `decoder_input_ids` or `labels`.")
        decoder_inputs = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
        if decoder_inputs.ndim >= 2:  # (a malformed decoder input is the decoder's own error, naming it)
            states = encoder_outputs.last_hidden_state
            check_encoder_states("encoder_outputs", states, decoder_inputs.shape[0], self.config.hidden_size)
            check_attention_mask(attention_mask, states.shape[1], batch_size=states.shape[0])
        out = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            inputs_embeds=decoder_inputs_embeds,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=out.last_hidden_state,
            cache=out.cache,
            decoder_hidden_states=out.hidden_states,
            decoder_attentions=out.attentions,
            cross_attentions=out.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


def shift_tokens_right(labels: torch.LongTensor, pad_token_id: int, decoder_start_token_id: int) -> torch.LongTensor:
    """Teacher forcing: `decoder_input_ids = [start, labels[:-1]]`, with -100 (ignored labels) replaced by padding."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


class NgramTransformerForConditionalGeneration(
    RefuseAssistedDecodingMixin, NgramTransformerPreTrainedModel, GenerationMixin
):
    """Encoder-decoder N-gram Transformer with an LM head (the paper's translation model): `Seq2SeqTrainer`,
    `generate()` (greedy, sampling, beam search; the decoder keeps N - 1 keys / values per layer plus the fixed
    cross-attention keys) and `pipeline("text2text-generation")`."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: NgramTransformerConfig):
        if not config.is_encoder_decoder:
            raise ValueError(
                "NgramTransformerForConditionalGeneration needs `is_encoder_decoder=True` in its config (got False); "
                "use NgramTransformerForCausalLM for the decoder-only model."
            )
        super().__init__(config)
        self.model = NgramTransformerModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self, modality: str | None = None):
        return self.model.encoder

    def _check_labels(self, labels: torch.Tensor, decoder_inputs: torch.Tensor | None = None) -> None:
        """`labels` `(B, T)` integer target ids in the vocabulary or -100 (ignored), of the decoder inputs' `(B, T)`
        where those are given; else a ValueError naming `labels` (not the decoder input they would be shifted into,
        nor torch's loss)."""
        name = type(self).__name__
        if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.shape[0] == 0 or labels.shape[1] == 0:
            shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"{name}: `labels` must have shape (batch, target_length) (target ids), got {shape}.")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"{name}: `labels` must be integer token ids (-100 to ignore), got dtype {labels.dtype}.")
        if decoder_inputs is not None and decoder_inputs.ndim >= 2:
            check_labels(
                name, labels, tuple(decoder_inputs.shape[:2]), "(batch, target_length) like the decoder inputs"
            )
        vocab_size = self.config.vocab_size
        if _checking():
            invalid = ((labels < 0) | (labels >= vocab_size)) & (labels != -100)
            if bool(invalid.any()):
                raise ValueError(
                    f"{name}: `labels` holds the id {int(labels[invalid][0])}, outside the vocabulary "
                    f"[0, {vocab_size - 1}] (vocab_size={vocab_size}); -100 marks an ignored position."
                )

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.LongTensor:
        """Teacher forcing (`shift_tokens_right`): needs `config.decoder_start_token_id` (the first decoder input)
        and `config.pad_token_id` (in place of the -100 of ignored labels)."""
        self._check_labels(labels)
        for field in ("decoder_start_token_id", "pad_token_id"):
            if getattr(self.config, field) is None:
                raise ValueError(
                    f"{type(self).__name__}: `labels` without `decoder_input_ids` are shifted right into the decoder "
                    f"inputs, which needs `config.{field}`, but it is None: set it in the config (or pass "
                    "`decoder_input_ids`)."
                )
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        """`labels`: `(B, T)` target ids (-100 to ignore); without `decoder_input_ids` they are shifted right behind
        `decoder_start_token_id` (teacher forcing) and the loss compares position t's logits with `labels[:, t]`."""
        if labels is not None:
            decoder_inputs = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
            if decoder_inputs is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)  # checks the labels too
            else:
                self._check_labels(labels, decoder_inputs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            decoder_position_ids=decoder_position_ids,
            encoder_outputs=encoder_outputs,
            cache=cache,
            inputs_embeds=inputs_embeds,
            decoder_inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            # Labels are already aligned with the logits (the decoder input is the shifted labels): no second shift.
            # Contiguous: the loss flattens them with `.view` (a sliced `labels[:, :T]` would fail there).
            loss = self.loss_function(
                logits=logits,
                labels=None,
                shift_labels=labels.contiguous(),
                vocab_size=self.config.vocab_size,
                **kwargs,
            )
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            decoder_hidden_states=outputs.decoder_hidden_states,
            decoder_attentions=outputs.decoder_attentions,
            cross_attentions=outputs.cross_attentions,
            encoder_last_hidden_state=outputs.encoder_last_hidden_state,
            encoder_hidden_states=outputs.encoder_hidden_states,
            encoder_attentions=outputs.encoder_attentions,
        )


class NgramTransformerForCausalLM(CausalLMHead, NgramTransformerPreTrainedModel, GenerationMixin):
    """Decoder-only N-gram Transformer language model (`is_encoder_decoder=False`): every position sees the N - 1
    tokens before it per layer; decoding keeps N - 1 keys / values per layer, so a step costs the same at any length."""

    base_model_class = NgramTransformerModel
    base_model_causal = None  # the base model's form follows from the config (decoder-only here)

    def build_base_model(self, config: NgramTransformerConfig) -> NgramTransformerModel:
        if config.is_encoder_decoder:
            raise ValueError(
                "NgramTransformerForCausalLM needs `is_encoder_decoder=False` in its config (got True); use "
                "NgramTransformerForConditionalGeneration for the encoder-decoder model."
            )
        return super().build_base_model(config)


__all__ = [
    "NgramTransformerCache",
    "NgramTransformerForCausalLM",
    "NgramTransformerForConditionalGeneration",
    "NgramTransformerModel",
    "NgramTransformerPreTrainedModel",
    "NgramWindowLayer",
]
