"""Combiner (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost", NeurIPS 2021) as
transformers models.

Reads top to bottom in the order data flows: decoding cache -> attention -> MLP -> block -> PreTrainedModel ->
base model -> heads. The attention math lives in `ops_combiner.py` (pure tensor functions).
"""

import functools

import torch
from torch import nn
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
)
from transformers.utils import can_return_tuple

from ..shared.common import (
    EfficientPreTrainedModel,
    FeedForward,
    check_position_ids,
    mask_if_padded,
    past_key_values_alias,
    run_blocks,
)
from ..shared.heads import CausalLMHead, MaskedLMHead, SequenceClassificationHead
from ..shared.state_cache import StateCache, StateCacheModelMixin, open_cached_forward
from .configuration_combiner import CombinerConfig
from .decoding_combiner import combiner_chunk_step, combiner_prefill_state
from .ops_combiner import (
    axial_abstraction_keys,
    combiner_attention,
    num_logsparse_levels,
)


class CombinerCache(StateCache):
    """Decoding cache of a Combiner model: per layer the past queries/keys/values it needs and the span summaries,
    computed once when a span completes."""


class CombinerAttention(nn.Module):
    """Multi-head Combiner attention: q/k/v projections, the Combiner op of `config.combiner_type`, output projection.

    Axial adds the parameters of its column-abstraction keys, `W_k LayerNorm(x + W_o a)`: `axial_out_proj` (`W_o`),
    `axial_norm` and `axial_key_proj` (`W_k`), bias-free as in the official code. With
    `config.use_span_summaries=False` (the ablation, Fixed only) the op keeps the own segment and no summary.

    With a cache, the first call (the prompt) runs the fast op and stores the decoding state; later calls continue
    from that state: one token (`generate()`) with `combiner_step`, several tokens at once with
    `combiner_chunk_step` (one vectorised pass over the chunk, same result as a step per token). Each new token costs
    O(s + L/s) (Fixed, Axial, Mixture) or O(log L) spans (Logsparse).
    """

    def __init__(self, config: CombinerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.combiner_type = config.combiner_type
        self.block_size = config.block_size
        self.span_summary = config.span_summary
        self.use_spans = config.use_span_summaries
        self.max_length = config.max_position_embeddings  # a compiled decoding step's buffer capacity
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.logsparse_levels = (
            num_logsparse_levels(config.max_position_embeddings) if config.combiner_type == "logsparse" else None
        )
        width, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(width, width, bias=bias)
        self.k_proj = nn.Linear(width, width, bias=bias)
        self.v_proj = nn.Linear(width, width, bias=bias)
        self.o_proj = nn.Linear(width, width, bias=bias)
        if config.combiner_type == "axial":
            self.axial_out_proj = nn.Linear(width, width, bias=False)
            self.axial_norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
            self.axial_key_proj = nn.Linear(width, width, bias=False)

    def abstraction_key_fn(self):
        """Axial: `(row_output, x) -> W_k LayerNorm(x + W_o row_output)` with this layer's parameters bound."""
        if self.combiner_type != "axial":
            return None
        return functools.partial(
            axial_abstraction_keys,
            out_weight=self.axial_out_proj.weight,
            norm_weight=self.axial_norm.weight,
            norm_bias=self.axial_norm.bias,
            key_weight=self.axial_key_proj.weight,
            norm_eps=self.axial_norm.eps,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        causal: bool,
        key_mask: torch.Tensor | None,
        cache: CombinerCache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(B, L, d)`, each sample's real tokens first (the base model packs them).
            key_mask: `(B, L)`, 1 for real tokens (right padding), or None.
            cache: a `CombinerCache`: empty -> store the state of these L tokens; filled -> decode them.
        """
        batch_size, seq_len, _ = hidden_states.shape
        q, k, v = (
            proj(hidden_states).view(batch_size, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        options = dict(
            combiner_type=self.combiner_type,
            block_size=self.block_size,
            span_summary=self.span_summary,
            abstraction_key_fn=self.abstraction_key_fn(),
            use_spans=self.use_spans,
        )
        state = cache.get_states(self.layer_idx) if cache is not None else {}
        if not state:
            # While compiling / exporting, Logsparse runs a level count fixed by the position table (levels past
            # ceil(log2 L) have no allowed span: same result), so no shape inside the op follows the length and the
            # length can be dynamic. Eager keeps ceil(log2 L) levels (no padding of short inputs to the table).
            static_levels = self.logsparse_levels if torch.compiler.is_compiling() else None
            out = combiner_attention(
                q,
                k,
                v,
                causal=causal,
                key_mask=key_mask,
                hidden_states=hidden_states,
                num_levels=static_levels,
                **options,
            )
            if cache is not None:
                lengths = (
                    key_mask.long().sum(-1)
                    if key_mask is not None
                    else torch.full((batch_size,), seq_len, device=q.device)
                )
                state = combiner_prefill_state(q, k, v, lengths, hidden_states=hidden_states, **options)
                cache.update_states(self.layer_idx, seq_len, **state)
        else:
            # A filled cache: `generate()` feeds one token per step (`combiner_chunk_step` runs `combiner_step`);
            # several tokens at once (a continued prompt, a chunk) run in one vectorised pass over the chunk against
            # the state, no loop over its tokens, with the outputs and the state of one step per token.
            out, state = combiner_chunk_step(
                q, k, v, state, valid=key_mask, hidden_states=hidden_states, max_length=self.max_length, **options
            )
            cache.update_states(self.layer_idx, seq_len, **state)
        return self.o_proj(out.transpose(1, 2).reshape(batch_size, seq_len, -1))


class CombinerBlock(GradientCheckpointingLayer):
    """Pre-LN block of the official code: `x + Dropout(Attn(LN(x)))`, then `x + Dropout(MLP(LN(x)))`."""

    def __init__(self, config: CombinerConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CombinerAttention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        causal: bool = False,
        key_mask: torch.Tensor | None = None,
        cache: CombinerCache | None = None,
    ) -> torch.Tensor:
        attended = self.attn(self.attn_norm(hidden_states), causal=causal, key_mask=key_mask, cache=cache)
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class CombinerPreTrainedModel(StateCacheModelMixin, EfficientPreTrainedModel):
    # The decoding state is span summaries folded as spans complete: it cannot be rolled back to drop rejected
    # draft tokens, so
    # `generate(assistant_model=...)` and prompt-lookup decoding raise transformers' "not supported with stateful
    # models" error.
    _is_stateful = True
    config: CombinerConfig
    _no_split_modules = ["CombinerBlock"]


def _pack_real_tokens(attention_mask: torch.Tensor) -> torch.LongTensor:
    """Per-sample order that puts the real tokens first (stable): `(B, L)` indices into the sequence."""
    return torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)


def _gather_tokens(x: torch.Tensor, order: torch.LongTensor) -> torch.Tensor:
    """`x[b, order[b]]` for `(B, L, ...)` tensors."""
    index = order.view(order.shape + (1,) * (x.ndim - 2)).expand(order.shape + x.shape[2:])
    return x.gather(1, index)


class CombinerModel(CombinerPreTrainedModel):
    """The Combiner stack: token + learned position embeddings, blocks, final LayerNorm.

    Combiner's blocks (segments, rows, dyadic spans) are laid out on each sample's **real** tokens: with padding,
    the real tokens are packed to the front (a stable per-sample permutation), run through the stack with a
    right-padding mask, and put back in place. A padded batch therefore gives each sample the outputs it gets alone,
    left padding included. `causal` (default: `config.causal`) selects the causal form.
    """

    def __init__(self, config: CombinerConfig, causal: bool | None = None):
        super().__init__(config)
        self.causal = config.causal if causal is None else causal
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([CombinerBlock(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def _run_packed_blocks(
        self, hidden_states: torch.Tensor, order: torch.LongTensor, output_hidden_states: bool, **block_kwargs
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """`run_blocks` on packed tokens (`hidden_states` `(B, L, d)` in the packed `order`), returning the outputs
        in the caller's order. The returned hidden states are on the autograd graph the outputs depend on: each
        block reads the packed copy *of the returned tensor*, so `hidden_states[i].retain_grad()` gets a gradient
        (attribution, probing) as it does without padding."""
        inverse = torch.argsort(order, dim=1)
        if not output_hidden_states:
            hidden_states, _ = run_blocks(self.layers, hidden_states, self.norm, False, **block_kwargs)
            return _gather_tokens(hidden_states, inverse), None
        all_hidden_states = ()
        for block in self.layers:
            in_place = _gather_tokens(hidden_states, inverse)
            all_hidden_states += (in_place,)
            hidden_states = block(_gather_tokens(in_place, order), **block_kwargs)
        hidden_states = _gather_tokens(self.norm(hidden_states), inverse)
        return hidden_states, all_hidden_states + (hidden_states,)

    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: CombinerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """
        Args:
            input_ids: `(B, L)` token ids, or `inputs_embeds` `(B, L, d)`.
            attention_mask: `(B, T)`, 1 for real tokens and 0 for padding, over past + current tokens when a cache is
                passed (`T = past + L`), else over the `L` current tokens.
            position_ids: `(B, L)` indices into the learned position table; default: the index among the sample's
                real tokens (`cumsum(mask) - 1`). They move the embeddings only; Combiner's blocks always follow the
                real-token order.
            cache: a `CombinerCache` from an earlier call (causal models only).
            use_cache: return a cache (default: `config.use_cache` for causal models outside training).
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        inputs_embeds = self.embed(input_ids, inputs_embeds)
        batch_size, seq_len, _ = inputs_embeds.shape
        device = inputs_embeds.device

        cache, past_length = open_cached_forward(
            self, inputs_embeds, attention_mask, cache, use_cache, cache_class=CombinerCache, causal=self.causal
        )
        check_position_ids(type(self).__name__, position_ids, batch_size, seq_len)
        # Reading tensor values (a mask without padding, the largest position) is data-dependent control flow: it is
        # skipped while compiling or exporting, where the graph keeps the general (packed, masked) path.
        eager = not torch.compiler.is_compiling()
        # no padding among these tokens: the fast paths
        new_mask = mask_if_padded(attention_mask[:, -seq_len:] if attention_mask is not None else None)

        order = None
        decoding = cache is not None and past_length > 0
        if decoding:
            # Each sample continues from its own number of real tokens (the decoding state's `length`).
            seen = cache.get_states(0)["length"].to(device)
            valid = new_mask.long() if new_mask is not None else torch.ones(batch_size, seq_len, device=device).long()
            default_positions = seen[:, None] + valid.cumsum(-1) - 1
        else:
            if new_mask is not None:
                order = _pack_real_tokens(new_mask)
                inputs_embeds = _gather_tokens(inputs_embeds, order)
                new_mask = _gather_tokens(new_mask, order)
                if position_ids is not None:
                    position_ids = _gather_tokens(position_ids.expand(batch_size, seq_len), order)
            default_positions = torch.arange(seq_len, device=device).expand(batch_size, seq_len)
        if position_ids is None:
            position_ids = default_positions
        position_ids = position_ids.clamp(min=0)
        if new_mask is not None:
            position_ids = position_ids.masked_fill(new_mask == 0, 0)  # padding: any valid index will do
        limit = self.config.max_position_embeddings
        longest = int(position_ids.max()) + 1 if eager and position_ids.numel() else seq_len
        if longest > limit:
            raise ValueError(
                f"Sequence length {longest} exceeds max_position_embeddings={limit} (the learned position table) of "
                "this Combiner."
            )

        hidden_states = self.dropout(inputs_embeds + self.embed_positions(position_ids))
        block_kwargs = dict(causal=self.causal, key_mask=new_mask, cache=cache)
        if order is None:
            hidden_states, all_hidden_states = run_blocks(
                self.layers, hidden_states, self.norm, output_hidden_states, **block_kwargs
            )
        else:
            hidden_states, all_hidden_states = self._run_packed_blocks(
                hidden_states, order, output_hidden_states, **block_kwargs
            )
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states)


class CombinerForCausalLM(CausalLMHead, CombinerPreTrainedModel, GenerationMixin):
    """Combiner language model (causal form). Decoding keeps the current segment / row and the summaries of the
    completed spans: each new token costs O(s + L/s) (Fixed, Axial, Mixture) or O(log L) (Logsparse) per layer."""

    base_model_class = CombinerModel


class CombinerForMaskedLM(MaskedLMHead, CombinerPreTrainedModel):
    """Combiner masked language model (bidirectional form: the spans exclude the directly attended region)."""

    base_model_class = CombinerModel


class CombinerForSequenceClassification(SequenceClassificationHead, CombinerPreTrainedModel):
    """Combiner with a linear classifier on the pooled final hidden states (`config.classifier_pooling`: mean over
    real positions, or the last real token)."""

    base_model_class = CombinerModel


__all__ = [
    "CombinerCache",
    "CombinerForCausalLM",
    "CombinerForMaskedLM",
    "CombinerForSequenceClassification",
    "CombinerModel",
    "CombinerPreTrainedModel",
]
