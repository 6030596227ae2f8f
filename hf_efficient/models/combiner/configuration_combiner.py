"""Combiner configuration (Ren et al., "Combiner: Full Attention Transformer with Sparse Computation Cost", NeurIPS
2021)."""

import math

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
from .ops_combiner import COMBINER_TYPES, SPAN_SUMMARIES


class CombinerConfig(PreTrainedConfig):
    r"""
    Configuration of a Combiner model: a pre-LN Transformer (as the official code: learned absolute position
    embeddings, `x + Attn(LN(x))`, `x + FFN(LN(x))`, final LayerNorm) whose attention is Combiner's *full attention
    at sub-quadratic cost*: each position attends to every allowed position, directly (`Omega0`) or through span
    abstractions, in one softmax:

        A(x_i) = sum_{j in Omega0} p(j|i) v_j + sum_r p(Omega_r|i) v_{Omega_r}

    A span's key is the pooled keys of the span (`span_summary`), its value the attention of the pooled span query
    over the span (computed once per span). 1/sqrt(d_head) is applied once; no log|Omega| correction.

    `combiner_type` (s = `block_size`):
    - `"fixed"`: direct = own segment of s positions (causal prefix); spans = the other (earlier) segments.
      O(L (s + L/s)).
    - `"logsparse"`: direct = the position itself; spans = the sibling aligned dyadic block at each level
      (2^l, l < ceil(log2 L)) - the prefix split into at most log2 L blocks. O(L log L). `block_size` is unused.
    - `"axial"`: row-major `rows x s` grid; direct = own row (causal prefix); for every other (earlier) row one
      abstraction per column: value = attention of that row's query in the same column over its row, key =
      `W_k LayerNorm(x + W_o a)` (extra parameters `axial_out_proj`, `axial_norm`, `axial_key_proj`). O(L (s + L/s)).
    - `"mixture"`: direct = own-row prefix + own column above; spans = column summaries above the current row and,
      for every earlier row, its left-of-column and right-of-column spans (the official mixture: a mixture of
      the column partition and the row partition). O(L (s + L/s)).
    Bidirectional forms (`CombinerForMaskedLM`, `causal=False`) use the symmetric sets and the spans exclude the
    directly attended region (the official TF code double-counts the own segment there; we do not).

    Open points, decided here (and tested): lengths that are not a multiple of `block_size` are padded internally
    and masked; padded positions never enter a softmax or a pooled summary and a span with no real position gets no
    weight; a padded slot of an Axial row abstracts that row with a zero query (the plain mean of its real values),
    so every real token stays reachable. Each sample's real tokens are packed to the front before the blocks are
    formed, so a left-padded sample gives the same outputs as the sample alone.

    Decoding (`CombinerForCausalLM.generate`) keeps the current segment / row and the summaries of completed spans:
    each new token attends to O(s + L/s) entries (Fixed, Axial, Mixture) or 1 + log2 L (Logsparse).

    Args:
        vocab_size (`int`, defaults to 384): token vocabulary (384 = ByT5's byte vocabulary).
        hidden_size (`int`, defaults to 256): model width `d`.
        intermediate_size (`int`, defaults to 1024): hidden width of each block's FFN.
        num_hidden_layers (`int`, defaults to 6): number of blocks.
        num_attention_heads (`int`, defaults to 4): heads; must divide `hidden_size`.
        combiner_type (`str`, defaults to `"fixed"`): one of `"fixed"`, `"logsparse"`, `"axial"`, `"mixture"`.
        block_size (`int` or `None`, defaults to `None`): segment length (Fixed) or row length (Axial, Mixture).
            `None` picks `round(sqrt(max_position_embeddings))`, the paper's s ~ sqrt(L).
        span_summary (`str`, defaults to `"max"`): pooling of span keys and span queries: `"max"` (the paper's
            default), `"mean"` or `"sum"`.
        use_span_summaries (`bool`, defaults to `True`): `False` is the ablation *without span summaries* (the
            studies' "local blocks only" arm): each position attends to `Omega0` alone, its own segment of
            `block_size` positions (its causal prefix when causal), and no span is summarised, so nothing outside
            the segment is reachable within a layer. Defined for `combiner_type="fixed"` only (Axial without its
            abstractions is the same block-local attention); decoding keeps the current segment only.
        max_position_embeddings (`int`, defaults to 1024): longest sequence (size of the learned position table).
        causal (`bool`, defaults to `False`): causality of `CombinerModel` and the classification head.
            `CombinerForCausalLM` is always causal and `CombinerForMaskedLM` never is.
        hidden_act (`str`, defaults to `"gelu"`): FFN activation.
        attention_bias (`bool`, defaults to `True`): biases of the q/k/v/o projections (the official code's
            `dense_use_bias`).
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout on the embeddings and on each residual branch.
        initializer_range (`float`, defaults to 0.02): std of the normal init of every weight.
        classifier_pooling (`str`, defaults to `"mean"`): `"mean"` over real positions, or `"last"` (the last real
            token, natural for a causal classifier).
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM heads to the token embeddings.
    """

    model_type = "combiner"

    def __init__(
        self,
        vocab_size: int = 384,
        hidden_size: int = 256,
        intermediate_size: int = 1024,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        combiner_type: str = "fixed",
        block_size: int | None = None,
        span_summary: str = "max",
        use_span_summaries: bool = True,
        max_position_embeddings: int = 1024,
        causal: bool = False,
        hidden_act: str = "gelu",
        attention_bias: bool = True,
        layer_norm_eps: float = 1e-6,
        hidden_dropout_prob: float = 0.0,
        initializer_range: float = 0.02,
        classifier_pooling: str = "mean",
        pad_token_id: int | None = 0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 1,
        tie_word_embeddings: bool = True,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.combiner_type = combiner_type
        self.max_position_embeddings = max_position_embeddings
        if block_size is None and isinstance(max_position_embeddings, int) and max_position_embeddings > 0:
            block_size = max(1, round(math.sqrt(max_position_embeddings)))
        self.block_size = block_size
        self.span_summary = span_summary
        self.use_span_summaries = use_span_summaries
        self.causal = causal
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.layer_norm_eps = layer_norm_eps
        self.hidden_dropout_prob = hidden_dropout_prob
        self.initializer_range = initializer_range
        self.classifier_pooling = classifier_pooling
        # A declared field (transformers drops undeclared generation parameters): causal models return a cache
        # by default outside training; `use_cache=False` turns that off.
        self.use_cache = use_cache
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        require_task_fields(self)  # needs the fields that `PreTrainedConfig.__init__` sets

    def _validate(self):
        """Reject invalid values and combinations at creation time, naming the field and the value."""
        require_positive_int(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "max_position_embeddings",
            "block_size",
        )
        require_divides(self, "num_attention_heads", "hidden_size")
        require_choice(self, "combiner_type", COMBINER_TYPES)
        require_choice(self, "span_summary", SPAN_SUMMARIES)
        if not isinstance(self.use_span_summaries, bool):
            raise ValueError(f"CombinerConfig: `use_span_summaries` must be a bool, got {self.use_span_summaries!r}.")
        if not self.use_span_summaries and self.combiner_type != "fixed":
            raise ValueError(
                f"CombinerConfig: `use_span_summaries=False` (the ablation without span summaries) is defined for "
                f"combiner_type='fixed' only, got combiner_type={self.combiner_type!r} (Axial without its "
                "abstractions is the same block-local attention: use combiner_type='fixed')."
            )
        require_choice(self, "classifier_pooling", ("mean", "last"))
        require_probability(self, "hidden_dropout_prob")
        require_positive(self, "layer_norm_eps")
        require_non_negative(self, "initializer_range")
        require_activation(self)


__all__ = ["CombinerConfig"]
