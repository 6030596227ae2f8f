"""R-Transformer configuration (Wang, Ma, Liu, Tang, "R-Transformer: Recurrent Neural Network Enhanced Transformer",
2019, arXiv:1907.05572)."""

from transformers import PreTrainedConfig

from ..shared.config_checks import (
    require_choice,
    require_divides,
    require_positive,
    require_positive_int,
    require_probability,
    require_task_fields,
)
from .ops_r_transformer import GATES

RNN_TYPES = tuple(GATES)
LOCAL_RNN_IMPLEMENTATIONS = ("auto", "projected", "unfold")


class RTransformerConfig(PreTrainedConfig):
    r"""
    Configuration of an R-Transformer: a stack of pre-LN blocks, each

        n x [ x = x + Dropout(LocalRNN(LN(x))) ]          # local order, window M
        x = x + Dropout(MHA(LN(x)))                        # global context, causal mask
        x = x + Dropout(FFN(LN(x)))                        # FFN = Linear(d, d_ff) - ReLU - Dropout - Linear(d_ff, d)

    and no position embeddings (the LocalRNN carries order). `LocalRNN(M)` runs, for every position t, an RNN from
    a zero state over the window `x[t-M+1 .. t]` (zero-padded on the left) and keeps its last hidden state.

    What the official code (DSE-MSU/R-transformer, `models/RTransformer.py`) defines but never uses, and our choice:
    its LocalRNN builds an output `Linear(d, d) + ReLU` that `forward` never applies, and `RTransformer` builds a
    final `LayerNorm` and an extra `PositionwiseFeedForward` that are never applied either. We leave all three out
    (so the outputs equal the official forward, and the converter drops those weights): the model's last hidden state
    is the last block's output, without a final norm.

    Attention is causal in every head, as the official code uses a causal mask in every task (including the
    pixel-MNIST classifier, which reads the last position). Sequence and image classification therefore read the
    last real position. Padded positions (attention mask 0) are masked out of attention and enter LocalRNN windows
    as zero inputs, exactly like the official left zero-padding: a left-padded sample gives the same outputs as the
    sample alone.

    Args:
        vocab_size (`int` or `None`, defaults to 384): token vocabulary (384 = ByT5's byte vocabulary). `None` for a
            model without token embeddings (pixel / feature sequences only).
        hidden_size (`int`, defaults to 256): `d_model`; also the LocalRNN hidden size (as the official code).
        num_hidden_layers (`int`, defaults to 3): number of blocks (the official `n_level`).
        num_attention_heads (`int`, defaults to 8): heads `h`; must divide `hidden_size`.
        intermediate_size (`int` or `None`, defaults to `None`): FFN width `d_ff`; `None` means `4 * hidden_size`
            (the official code's fixed choice).
        rnn_type (`str`, defaults to `"gru"`): `"gru"`, `"lstm"` or `"rnn"` (tanh), with weights in the standard
            `nn.GRU` / `nn.LSTM` / `nn.RNN` layout (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`).
        local_window (`int`, defaults to 7): the LocalRNN window `M` (the official `ksize`), >= 1.
        num_rnn_layers (`int`, defaults to 1): LocalRNN sublayers per block (the official `n`), >= 0. `0` is the
            ablation *without LocalRNN* (the studies' arm that shows what the LocalRNN adds): each block is then
            `x + MHA(LN(x))`, `x + FFN(LN(x))` only, a causal Transformer with no position information but the causal
            mask (the model has no position embeddings); `local_window` and the other LocalRNN fields are unused.
        local_rnn_implementation (`str`, defaults to `"auto"`): how the LocalRNN is computed; every choice gives the
            same outputs. `"projected"`: input projections once per position, then the M-step recurrence batched
            over all B x L windows (hidden-to-hidden matmul per step). `"unfold"`: the official form, the windows
            unfolded to `(B L, M, d)` and fed to `nn.GRU` / `nn.LSTM` / `nn.RNN` (fused kernels, M times the input
            projections and memory). `"auto"`: the faster one measured per device type (`scripts/benchmarks/bench_localrnn.py`):
            `"projected"` on CPU; devices not measured yet (CUDA included) also take `"projected"`.
        local_rnn_segment_length (`int`, defaults to 1024): training memory vs time of the `"projected"` LocalRNN
            (exact either way). With autograd on, a LocalRNN call over at most this many positions keeps its window
            steps' tensors for the backward (O(L M d) floats); a longer call keeps only its inputs and recomputes the
            steps in the backward, this many positions at a time (O(L d) + O(segment M d) floats, about one extra
            LocalRNN forward in time). Smaller: less memory at short lengths, slower training; larger: the reverse.
        hidden_dropout_prob (`float`, defaults to 0.1): dropout on every residual branch and inside the FFN (the
            official `dropout`).
        attention_dropout (`float`, defaults to 0.1): dropout on the attention probabilities (the official code uses
            its one `dropout` there too).
        embedding_dropout (`float`, defaults to 0.1): dropout on the input embeddings (the official `emb_dropout`).
        official_layer_norm (`bool`, defaults to `True`): the official LayerNorm, `a (x - mean) / (std + eps) + b`
            with the *unbiased* std and `eps` added to the std; `False` gives the standard
            `a (x - mean) / sqrt(var + eps) + b` (`nn.LayerNorm`). Official weights reproduce exactly only with `True`.
        layer_norm_eps (`float`, defaults to 1e-6): the LayerNorm epsilon (official: 1e-6).
        lm_head_bias (`bool`, defaults to `True`): a bias in the LM head (the official char/word decoders have one).
        initializer_range (`float`, defaults to 0.02): std of the normal init of linear and embedding weights (RNN
            weights get PyTorch's `U(-1/sqrt(d), 1/sqrt(d))`, as the official code).
        image_size (`int` or `None`), num_channels (`int`, defaults to 3): pixel-sequence input (the official
            sequential-MNIST setting): an image `(C, H, W)` is read as `H * W` pixels in row-major order, each a
            `C`-feature vector mapped to `d` by a linear layer.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head weight to the token embeddings (the official
            char and word models).
        use_cache (`bool`, defaults to `True`): return a decoding cache by default (`RTransformerForCausalLM`);
            `False` makes a forward return `cache=None`.
    """

    model_type = "r_transformer"

    def __init__(
        self,
        vocab_size: int | None = 384,
        hidden_size: int = 256,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 8,
        intermediate_size: int | None = None,
        rnn_type: str = "gru",
        local_window: int = 7,
        num_rnn_layers: int = 1,
        local_rnn_implementation: str = "auto",
        local_rnn_segment_length: int = 1024,
        hidden_dropout_prob: float = 0.1,
        attention_dropout: float = 0.1,
        embedding_dropout: float = 0.1,
        official_layer_norm: bool = True,
        layer_norm_eps: float = 1e-6,
        lm_head_bias: bool = True,
        initializer_range: float = 0.02,
        image_size: int | None = None,
        num_channels: int = 3,
        use_cache: bool = True,
        pad_token_id: int | None = 0,
        bos_token_id: int | None = None,
        eos_token_id: int | None = 1,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = (
            4 * hidden_size if intermediate_size is None and _is_int(hidden_size) else (intermediate_size)
        )
        self.rnn_type = rnn_type
        self.local_window = local_window
        self.num_rnn_layers = num_rnn_layers
        self.local_rnn_implementation = local_rnn_implementation
        self.local_rnn_segment_length = local_rnn_segment_length
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_dropout = attention_dropout
        self.embedding_dropout = embedding_dropout
        self.official_layer_norm = official_layer_norm
        self.layer_norm_eps = layer_norm_eps
        self.lm_head_bias = lm_head_bias
        self.initializer_range = initializer_range
        self.image_size = image_size
        self.num_channels = num_channels
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
        """Reject invalid values at creation time, naming the field and the value."""
        require_positive_int(
            self,
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "local_window",
            "num_channels",
            "local_rnn_segment_length",
        )
        if not _is_int(self.num_rnn_layers) or self.num_rnn_layers < 0:
            raise ValueError(
                f"RTransformerConfig: `num_rnn_layers` must be an integer >= 0 (0: the ablation without LocalRNN), "
                f"got {self.num_rnn_layers!r}."
            )
        require_divides(self, "num_attention_heads", "hidden_size")
        require_choice(self, "rnn_type", RNN_TYPES)
        require_choice(self, "local_rnn_implementation", LOCAL_RNN_IMPLEMENTATIONS)
        require_positive_int(self, "vocab_size", "image_size", allow_none=True)
        require_probability(self, "hidden_dropout_prob", "attention_dropout", "embedding_dropout")
        require_positive(self, "initializer_range", "layer_norm_eps")
        if self.official_layer_norm and self.hidden_size < 2:
            raise ValueError(
                f"RTransformerConfig: the official LayerNorm (unbiased std) needs `hidden_size` >= 2, "
                f"got {self.hidden_size}."
            )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


__all__ = ["RTransformerConfig"]
