"""R-Transformer (Wang, Ma, Liu, Tang 2019, "R-Transformer: Recurrent Neural Network Enhanced Transformer") as
transformers models.

Reads top to bottom in the order data flows: cache -> LayerNorm -> LocalRNN -> attention -> FFN -> block ->
PreTrainedModel -> base model -> heads.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import can_return_tuple

from ..shared.blocked_attention import attention_interface
from ..shared.common import (
    EfficientPreTrainedModel,
    eager_attention_forward,
    mask_if_padded,
    past_key_values_alias,
)
from ..shared.heads import CausalLMHead, ImageClassificationHead, SequenceClassificationHead, TokenClassificationHead
from ..shared.state_cache import StateCache, StateCacheModelMixin, open_cached_forward
from .configuration_r_transformer import RTransformerConfig
from .ops_r_transformer import GATES, local_rnn, official_layer_norm


class RTransformerCache(StateCache):
    """Decoding cache of an R-Transformer. Per block: the last M - 1 (normalised, padding-zeroed) inputs of each
    LocalRNN sublayer (`rnn_inputs_<j>`, `(B, M - 1, d)`) and the attention's keys and values (`key`, `value`,
    `(B, h, T, d / h)`); block 0 also keeps the attention mask of all T positions seen (`attention_mask`, `(B, T)`).
    A new token costs O(M d^2) in the LocalRNNs and O(T d) in attention."""


class RTransformerLayerNorm(nn.Module):
    """LayerNorm over the last dim: the official form `w (x - mean) / (std_unbiased + eps) + b` when
    `config.official_layer_norm`, else the standard `w (x - mean) / sqrt(var + eps) + b`."""

    def __init__(self, config: RTransformerConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(config.hidden_size))
        self.bias = nn.Parameter(torch.zeros(config.hidden_size))
        self.eps = config.layer_norm_eps
        self.official = config.official_layer_norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.official:
            return official_layer_norm(hidden_states, self.weight, self.bias, self.eps)
        return nn.functional.layer_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.bias, self.eps)


RNN_MODULES = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}
# The faster LocalRNN computation per device type, measured with `scripts/benchmarks/bench_localrnn.py` (CPU, 1 thread, d 256,
# M 7, forward + backward: projected 1.7-2.4x faster than nn.GRU on the unfolded windows, 1.2-1.4x for LSTM, 1.5-1.7x
# for RNN). Devices not measured yet (CUDA included) take "projected" too: fewer FLOPs and no M-fold window copy.
AUTO_IMPLEMENTATION = {"cpu": "projected"}


class RTransformerRNNWeights(nn.Module):
    """The LocalRNN's weights, with the names, shapes and gate order of a one-layer batch-first `nn.GRU` / `nn.LSTM`
    / `nn.RNN` (`weight_ih_l0 (G d, d)`, `weight_hh_l0 (G d, d)`, `bias_ih_l0`, `bias_hh_l0`; G = 3, 4, 1), so
    checkpoints keep the official layout, in a plain module: dynamo refuses to wrap any `nn.RNNBase` (even to read
    a parameter), which broke a compiled model's graph at every LocalRNN.

    Calling it runs the fused `nn.GRU` / `nn.LSTM` / `nn.RNN` kernel with these weights (`torch.func.functional_call`
    on a meta-device module of that type): `(output (N, M, d), h_n)` for `(N, M, d)` inputs, as the module would.
    """

    batch_first = True
    num_layers = 1

    def __init__(self, rnn_type: str, hidden_size: int):
        super().__init__()
        self.rnn_type, self.input_size, self.hidden_size = rnn_type, hidden_size, hidden_size
        rows = GATES[rnn_type] * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(rows, hidden_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(rows, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(rows))
        self.bias_hh_l0 = nn.Parameter(torch.empty(rows))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's (and so the official code's) RNN init: U(-1/sqrt(d), 1/sqrt(d)) for every weight and bias."""
        bound = self.hidden_size**-0.5
        for param in self.parameters():
            init.uniform_(param, -bound, bound)

    def forward(self, inputs: torch.Tensor, hx=None):
        with torch.device("meta"):
            module = RNN_MODULES[self.rnn_type](self.input_size, self.hidden_size, batch_first=True)
        args = (inputs,) if hx is None else (inputs, hx)
        return torch.func.functional_call(module, dict(self.named_parameters()), args)

    def extra_repr(self) -> str:
        return f"{self.rnn_type}, {self.input_size}, {self.hidden_size}, batch_first=True"


class RTransformerLocalRNN(nn.Module):
    """LocalRNN(M): for each position, an RNN from a zero state over its M-position window; keeps the last state.

    `rnn` holds the weights of a one-layer `nn.GRU` / `nn.LSTM` / `nn.RNN` (batch first) under their official names
    and layout (`rnn.weight_ih_l0`, ...; `RTransformerRNNWeights`). Two computations with equal outputs
    (`config.local_rnn_implementation`):
    `"projected"` (`ops_r_transformer.local_rnn`: input projections once per position, M batched recurrence steps)
    and `"unfold"` (the official form: `rnn` over the `(B L, M, d)` unfolded windows); `"auto"` takes the faster
    per device type as measured by `scripts/benchmarks/bench_localrnn.py` (`AUTO_IMPLEMENTATION`). In training, `"projected"`
    runs as one autograd Function whose backward recomputes the window steps by segments of
    `config.local_rnn_segment_length` positions in calls longer than that (activations O(L d), not O(L M d));
    `"unfold"` keeps nn.RNN's activations.
    """

    def __init__(self, config: RTransformerConfig):
        super().__init__()
        self.rnn_type = config.rnn_type
        self.window = config.local_window
        self.implementation = config.local_rnn_implementation
        self.segment_length = config.local_rnn_segment_length
        self.rnn = RTransformerRNNWeights(config.rnn_type, config.hidden_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """`inputs`: `(B, M - 1 + L, d)`, the M - 1 positions of left context then the L new ones -> `(B, L, d)`."""
        implementation = self.implementation
        if implementation == "auto":
            implementation = AUTO_IMPLEMENTATION.get(inputs.device.type, "projected")
        if implementation == "projected":
            return local_rnn(
                inputs,
                self.rnn.weight_ih_l0,
                self.rnn.weight_hh_l0,
                self.rnn.bias_ih_l0,
                self.rnn.bias_hh_l0,
                rnn_type=self.rnn_type,
                window=self.window,
                segment=self.segment_length,
            )
        batch_size, padded_len, dim = inputs.shape
        num_out = padded_len - (self.window - 1)
        # (B, L, d, M) view -> (B L, M, d): every window as one sequence of the fused RNN kernel.
        windows = inputs.unfold(1, self.window, 1).permute(0, 1, 3, 2).reshape(batch_size * num_out, self.window, dim)
        return self.rnn(windows)[0][:, -1].reshape(batch_size, num_out, dim)


class RTransformerLocalRNNLayer(nn.Module):
    """`x + Dropout(LocalRNN(LN(x)))`. Padded positions enter the windows as zero inputs (the official zero padding)."""

    def __init__(self, config: RTransformerConfig):
        super().__init__()
        self.window = config.local_window
        self.norm = RTransformerLayerNorm(config)
        self.local_rnn = RTransformerLocalRNN(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None, past_inputs: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states` `(B, L, d)`; `token_mask` `(B, L)` (1 = real) or None; `past_inputs` `(B, M - 1, d)`
        (cached decoding) or None (zeros). Returns the new hidden states and the last M - 1 inputs (for the cache)."""
        inputs = self.norm(hidden_states)
        if token_mask is not None:
            inputs = inputs * token_mask[..., None].to(inputs.dtype)
        if past_inputs is None:
            batch_size, _, dim = inputs.shape
            past_inputs = inputs.new_zeros(batch_size, self.window - 1, dim)
        inputs = torch.cat([past_inputs, inputs], dim=1)
        output = self.local_rnn(inputs)
        return hidden_states + self.dropout(output), inputs[:, inputs.shape[1] - (self.window - 1) :]


class RTransformerAttention(nn.Module):
    """Multi-head attention (the official `MHPooling`: q, k, v, out linears with biases), through transformers'
    attention interface (`config._attn_implementation`: eager or sdpa). No position information of its own."""

    def __init__(self, config: RTransformerConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_key: torch.Tensor | None = None,
        past_value: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`hidden_states` `(B, L, d)` -> output `(B, L, d)`, probabilities (eager) and keys / values of all T."""
        batch_size, seq_len, _ = hidden_states.shape
        shape = (batch_size, seq_len, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if past_key is not None:
            key = torch.cat([past_key, key], dim=2)
            value = torch.cat([past_value, value], dim=2)
        dropout = self.attention_dropout if self.training else 0.0
        interface: Callable = eager_attention_forward
        if not output_attentions:  # only the eager path can return the probabilities
            # sdpa with dropout on CPU gets the blocked attention (SDPA's math path would keep the L x L matrices)
            interface = attention_interface(self.config._attn_implementation, query, dropout)
        output, weights = interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling)
        output = self.o_proj(output.reshape(batch_size, seq_len, -1))
        return output, weights, key, value


class RTransformerFeedForward(nn.Module):
    """`Linear(d, d_ff) - ReLU - Dropout - Linear(d_ff, d)` (the official `PositionwiseFeedForward`)."""

    def __init__(self, config: RTransformerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(nn.functional.relu(self.fc1(hidden_states))))


class RTransformerBlock(GradientCheckpointingLayer):
    """`n x [x + Dropout(LocalRNN(LN(x)))]`, then `x + Dropout(MHA(LN(x)))` (causal), then `x + Dropout(FFN(LN(x)))`."""

    def __init__(self, config: RTransformerConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.rnn_layers = nn.ModuleList([RTransformerLocalRNNLayer(config) for _ in range(config.num_rnn_layers)])
        self.attention_norm = RTransformerLayerNorm(config)
        self.attention = RTransformerAttention(config, layer_idx)
        self.ffn_norm = RTransformerLayerNorm(config)
        self.ffn = RTransformerFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        cache: RTransformerCache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` `(B, L, d)`; `attention_mask` `(B|1, 1, L, T)` in the attention implementation's format;
        `token_mask` `(B, L)` (1 = real) or None when nothing is padded."""
        past = cache.get_states(self.layer_idx) if cache is not None else {}
        new_states = {}
        for index, rnn_layer in enumerate(self.rnn_layers):
            name = f"rnn_inputs_{index}"
            hidden_states, new_states[name] = rnn_layer(hidden_states, token_mask, past.get(name))
        attended, weights, new_states["key"], new_states["value"] = self.attention(
            self.attention_norm(hidden_states),
            attention_mask,
            past_key=past.get("key"),
            past_value=past.get("value"),
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.ffn(self.ffn_norm(hidden_states)))
        if cache is not None:
            cache.update_states(self.layer_idx, hidden_states.shape[1], **new_states)
        return hidden_states, weights


class RTransformerPixelEmbeddings(nn.Module):
    """An image `(B, C, H, W)` as a pixel sequence `(B, H W, d)`: row-major pixels, each pixel's C channels mapped to
    d by a linear layer (the official sequential-MNIST encoder)."""

    def __init__(self, config: RTransformerConfig):
        super().__init__()
        self.image_size = config.image_size
        self.num_channels = config.num_channels
        self.proj = nn.Linear(config.num_channels, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        expected = (self.num_channels, self.image_size, self.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {', '.join(map(str, expected))}) (image_size "
                f"{self.image_size}), got {tuple(pixel_values.shape)}."
            )
        pixels = pixel_values.flatten(2).transpose(1, 2)  # (B, H W, C), row-major
        return self.proj(pixels.to(self.proj.weight.dtype))


def causal_attention_mask(
    key_mask: torch.Tensor | None,
    num_queries: int,
    past_length: int,
    *,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor | None:
    """The attention mask of `num_queries` new positions over all `T = past_length + num_queries` positions.

    Causal, and padded keys (`key_mask` 0) masked; a padded query with no real key before it attends to itself, so
    its (ignored) output stays finite. `None` where SDPA's own causal flag is exact (no padding, no past or a single
    query). Boolean `(B|1, 1, L, T)` (True = attend) for sdpa, additive float for eager.
    """
    if key_mask is None and (num_queries == 1 or (past_length == 0 and implementation == "sdpa")):
        return None
    total = past_length + num_queries
    query_pos = torch.arange(past_length, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None]
    if key_mask is not None:
        allowed = (allowed & key_mask.bool()[:, None, None, :]) | (key_pos == query_pos)[None, None]
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


class RTransformerPreTrainedModel(StateCacheModelMixin, EfficientPreTrainedModel):
    config: RTransformerConfig
    _no_split_modules = ["RTransformerBlock"]
    # The LocalRNN windows are not rolled back token by token: assisted / prompt-lookup decoding get transformers'
    # own "not supported with stateful models" error instead of a failure deep inside generate().
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, RTransformerRNNWeights):
            module.reset_parameters()  # PyTorch's RNN init, as the official code
            return
        super()._init_weights(module)


class RTransformerModel(RTransformerPreTrainedModel):
    """The R-Transformer stack: token embeddings (or the pixel-sequence encoder), embedding dropout, blocks. No
    position embeddings and no final norm (as the official code, whose final norm is defined but unused)."""

    def __init__(self, config: RTransformerConfig):
        super().__init__(config)
        self.causal = True  # every task uses the causal mask, as the official code
        self.embed_tokens = (
            nn.Embedding(config.vocab_size, config.hidden_size) if config.vocab_size is not None else None
        )
        self.patch_embed = RTransformerPixelEmbeddings(config) if config.image_size is not None else None
        self.embedding_dropout = nn.Dropout(config.embedding_dropout)
        self.layers = nn.ModuleList([RTransformerBlock(config, idx) for idx in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()

    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: RTransformerCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`attention_mask` `(B, T)` covers past + current positions (1 = real); `pixel_values` `(B, C, H, W)`.
        `output_attentions` / `output_hidden_states` default to the config's values, as in transformers."""
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        hidden_states = self.embed(input_ids, inputs_embeds, pixel_values)
        batch_size, seq_len, _ = hidden_states.shape
        cache, past_length = open_cached_forward(
            self, hidden_states, attention_mask, cache, use_cache, cache_class=RTransformerCache, causal=True
        )

        key_mask = attention_mask
        if cache is not None:
            past_mask = cache.get_states(0).get("attention_mask") if past_length else None
            if key_mask is None and past_mask is not None:
                new = past_mask.new_ones(batch_size, seq_len)
                key_mask = torch.cat([past_mask, new], dim=1)
            stored = (
                key_mask if key_mask is not None else hidden_states.new_ones(batch_size, seq_len, dtype=torch.long)
            )
            cache.update_states(0, 0, attention_mask=stored.long())
        key_mask = mask_if_padded(key_mask)  # nothing padded: the fast paths
        token_mask = key_mask[:, -seq_len:] if key_mask is not None else None
        mask = causal_attention_mask(
            key_mask,
            seq_len,
            past_length,
            implementation="eager" if output_attentions else self.config._attn_implementation,
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )

        hidden_states = self.embedding_dropout(hidden_states)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=mask,
                token_mask=token_mask,
                cache=cache,
                output_attentions=bool(output_attentions),
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (weights,)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, cache=cache, hidden_states=all_hidden_states, attentions=all_attentions
        )


class RTransformerForCausalLM(CausalLMHead, RTransformerPreTrainedModel, GenerationMixin):
    """R-Transformer language model (the official char / word models: LM head tied to the embeddings, with a bias,
    `config.lm_head_bias`). Decoding caches the LocalRNNs' last M - 1 inputs and the attention keys / values."""

    base_model_class = RTransformerModel
    base_model_causal = None  # always causal, as the official model


class RTransformerForSequenceClassification(SequenceClassificationHead, RTransformerPreTrainedModel):
    """A linear classifier on the last real position (the official pixel-MNIST head reads the last position)."""

    base_model_class = RTransformerModel
    pooling = "last"


class RTransformerForTokenClassification(TokenClassificationHead, RTransformerPreTrainedModel):
    """A linear classifier on every position (causal: each label sees its prefix)."""

    base_model_class = RTransformerModel


class RTransformerForImageClassification(ImageClassificationHead, RTransformerPreTrainedModel):
    """Sequential image classification (the official pixel-MNIST model): the image as a row-major pixel sequence,
    a linear input projection of each pixel's channels, causal blocks, a linear classifier on the last position."""

    base_model_class = RTransformerModel
    base_model_causal = None  # always causal, as the official model

    def pool_image(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, -1]


__all__ = [
    "RTransformerCache",
    "RTransformerForCausalLM",
    "RTransformerForImageClassification",
    "RTransformerForSequenceClassification",
    "RTransformerForTokenClassification",
    "RTransformerModel",
    "RTransformerPreTrainedModel",
]
