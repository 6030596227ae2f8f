"""N-gram masked self-attention Transformer configuration (Chelba, Chen, Bapna, Shazeer, "Faster Transformer Decoding:
N-gram Masked Self-Attention", 2020)."""

from transformers import PreTrainedConfig

from ..shared.config_checks import (
    require_activation,
    require_choice,
    require_divides,
    require_positive,
    require_positive_int,
    require_probability,
    require_task_fields,
)
from .ops_ngram_transformer import default_block_size

POSITION_EMBEDDING_TYPES = ("sinusoidal", "learned")


class NgramTransformerConfig(PreTrainedConfig):
    r"""
    Configuration of an N-gram Transformer: a Transformer whose **decoder self-attention** sees only the current target
    token and the `N - 1` before it (Chelba et al., 2020):

        allowed(i, j)  iff  0 <= i - j <= N - 1          (N = `ngram_size`; `None`: full causal attention)

    Encoder self-attention and cross-attention are unchanged. A stack of k decoder layers has a receptive field of
    k (N - 1) + 1 target tokens. Training costs O(L N) per decoder layer (blocked local attention, no L x L score
    matrix or mask); decoding keeps exactly the last N - 1 keys and values per decoder layer (a rolling cache) plus
    the fixed cross-attention cache, so a decoding step costs the same at every target length.

    `is_encoder_decoder=True` (the paper's translation setting) builds an encoder-decoder
    (`NgramTransformerForConditionalGeneration`); `False` builds a decoder-only stack with the same mask
    (`NgramTransformerForCausalLM`). `NgramTransformerModel` is the base of either, chosen by this flag.

    Choices made here (the paper builds on the standard Transformer and does not fix them): pre-LayerNorm blocks
    (`x + Dropout(Attn(LN(x)))`, `x + Dropout(FFN(LN(x)))`) with a final LayerNorm per stack; token embeddings
    shared by encoder, decoder and the LM head, multiplied by sqrt(d) (`scale_embedding`); sinusoidal positions
    (Vaswani et al.) or a learned table; position ids count each sample's real tokens (`cumsum(mask) - 1`), so left
    padding gives the sample's outputs alone. The N-gram window is measured in sequence positions; padding belongs
    at either end of a sequence (left or right), where it never changes a real token's output.

    Args:
        vocab_size (`int`, defaults to 384): token vocabulary, shared by source and target (384 = ByT5's bytes).
        hidden_size (`int`, defaults to 512): model width d (`d_model`).
        intermediate_size (`int`, defaults to 2048): hidden width of each feed-forward block (`d_ff`).
        num_hidden_layers (`int`, defaults to 6): decoder layers (also the layers of the decoder-only stack).
        num_encoder_layers (`int`, *optional*): encoder layers; defaults to `num_hidden_layers`.
        num_attention_heads (`int`, defaults to 8): heads; must divide `hidden_size`.
        ngram_size (`int` or `None`, defaults to 4): N, the number of target tokens (current one included) that decoder
            self-attention sees; `None` is full causal attention (the baseline).
        attention_block_size (`int`, *optional*): block length of the blocked local attention (training and prefill):
            queries of a block attend to their own and the previous block. Must be >= N - 1. Default: the smallest
            multiple of N that is at least 64 (`default_block_size` in ops_ngram_transformer.py: batched matmuls stay
            efficient at small N; cost O(L * block)).
        is_encoder_decoder (`bool`, defaults to `False`): encoder-decoder (True, the paper's translation model) or
            decoder-only (False). The default is False because transformers omits values equal to its base config
            default when saving; the encoder-decoder presets set it explicitly.
        position_embedding_type (`str`, defaults to `"sinusoidal"`): `"sinusoidal"` (no length limit) or `"learned"`
            (a table of `max_position_embeddings` rows).
        max_position_embeddings (`int`, defaults to 1024): size of the learned position table (unused by sinusoidal).
        hidden_act (`str`, defaults to `"relu"`): feed-forward activation (the Transformer's ReLU).
        hidden_dropout_prob (`float`, defaults to 0.1): dropout on embeddings and residual branches.
        attention_dropout (`float`, defaults to 0.0): dropout on attention probabilities.
        activation_dropout (`float`, defaults to 0.0): dropout inside the feed-forward block.
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of every LayerNorm.
        initializer_range (`float`, defaults to 0.02): std of the normal init of weights.
        scale_embedding (`bool`, defaults to `True`): multiply token embeddings by sqrt(d).
        attention_bias (`bool`, defaults to `True`): biases of the q/k/v/o projections.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head to the token embeddings.
        use_cache (`bool`, defaults to `True`): return a decoding cache by default.
    """

    model_type = "ngram_transformer"
    keys_to_ignore_at_inference = ["cache"]

    def __init__(
        self,
        vocab_size: int = 384,
        hidden_size: int = 512,
        intermediate_size: int = 2048,
        num_hidden_layers: int = 6,
        num_encoder_layers: int | None = None,
        num_attention_heads: int = 8,
        ngram_size: int | None = 4,
        attention_block_size: int | None = None,
        is_encoder_decoder: bool = False,
        position_embedding_type: str = "sinusoidal",
        max_position_embeddings: int = 1024,
        hidden_act: str = "relu",
        hidden_dropout_prob: float = 0.1,
        attention_dropout: float = 0.0,
        activation_dropout: float = 0.0,
        layer_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        scale_embedding: bool = True,
        attention_bias: bool = True,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 1,
        decoder_start_token_id: int | None = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_encoder_layers = num_hidden_layers if num_encoder_layers is None else num_encoder_layers
        self.num_attention_heads = num_attention_heads
        self.ngram_size = ngram_size
        self.attention_block_size = attention_block_size
        self.position_embedding_type = position_embedding_type
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.scale_embedding = scale_embedding
        self.attention_bias = attention_bias
        self.use_cache = use_cache
        self._validate()
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            decoder_start_token_id=decoder_start_token_id,
            is_encoder_decoder=is_encoder_decoder,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        require_task_fields(self)  # needs the fields that `PreTrainedConfig.__init__` sets

    @property
    def needs_positions(self) -> bool:
        """Whether `max_position_embeddings` limits the length (only the learned table does)."""
        return self.position_embedding_type == "learned"

    @property
    def resolved_block_size(self) -> int | None:
        """The block length the blocked attention uses (`None` for full causal attention)."""
        if self.ngram_size is None:
            return None
        if self.attention_block_size is not None:
            return self.attention_block_size
        return default_block_size(self.ngram_size)

    def _validate(self):
        """Reject invalid values at creation time, naming the field and the value."""
        require_positive_int(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_encoder_layers",
            "num_attention_heads",
            "max_position_embeddings",
        )
        require_divides(self, "num_attention_heads", "hidden_size")
        require_positive_int(self, "ngram_size", "attention_block_size", allow_none=True)
        n, block = self.ngram_size, self.attention_block_size
        if n is not None and block is not None and block < n - 1:
            raise ValueError(
                f"NgramTransformerConfig: `attention_block_size` ({block}) must be >= ngram_size - 1 ({n - 1}): "
                "a block's queries reach back only into the previous block."
            )
        require_choice(self, "position_embedding_type", POSITION_EMBEDDING_TYPES)
        require_probability(self, "hidden_dropout_prob", "attention_dropout", "activation_dropout")
        require_activation(self)
        require_positive(self, "initializer_range", "layer_norm_eps")


__all__ = ["NgramTransformerConfig"]
