"""Attention Free Transformer configuration (Zhai et al., 2021, "An Attention Free Transformer")."""

from transformers import PreTrainedConfig

from ..shared.config_checks import (
    require_activation,
    require_choice,
    require_divides,
    require_image_settings,
    require_non_negative,
    require_positive,
    require_positive_int,
    require_probability,
    require_task_fields,
)

AFT_TYPES = ("full", "local", "simple", "conv")


class AFTConfig(PreTrainedConfig):
    r"""
    Configuration of an Attention Free Transformer (AFT) model.

    Each block is pre-LN, `x + AFT(LN(x))` then `x + FFN(LN(x))`, as in the paper's experiments. The AFT layer
    projects `Q, K, V`, computes per channel a position-biased softmax over the keys that weights the values,
    gates it with `sigmoid(Q)` and applies an output projection:

        Y_t = sigmoid(Q_t) * sum_t' exp(K_t' + w_tt') V_t' / sum_t' exp(K_t' + w_tt')

    - `aft_type="full"`: `w` is a learned position bias, factorised `w = u v^T` (`u, v` of shape
      `max_position_embeddings x position_bias_dim`, init N(0, `position_bias_init_std`^2)) or, with
      `position_bias_dim=None`, a full learned `max_position_embeddings x max_position_embeddings` matrix.
    - `aft_type="local"`: the same `w` used only where `|t - t'| < local_window` and **0** (not -inf) outside, so
      the global context is kept.
    - `aft_type="simple"`: `w = 0`; no position bias, no length limit.
    - `aft_type="conv"`: `num_heads` heads; `K` has one channel per head, `Q` and `V` are split into heads, and
      per head a depthwise convolution with kernel `exp(w) - 1` (size `conv_kernel_size`, 1-D over text,
      2-D over the patch grid of images) is added to the global sums. `w` is reparameterised
      `gamma * (w - mean(w)) / std(w) + beta` per head with `gamma = beta = 0` at init, so AFT-conv starts as
      AFT-simple. No length limit for text. `conv_gain_multiplier` `m` scales the reparameterised kernel,
      `m * (gamma * (w - mean(w)) / std(w) + beta)`: the same model family and the same start (AFT-simple) for any
      `m`, but under Adam, whose steps do not depend on a gradient's scale, `gamma` and `beta` move `m` times
      faster, so the local kernel outweighs the global sums (`log L`) much sooner (the main job: 1.77 bits per byte
      in 7 minutes with `m = 100`, 1.86 with 1). `m = 1` is the paper's parameterisation.

    Causal models (`AFTForCausalLM`, or `causal=True`) sum over `t' <= t`; a causal text conv kernel covers the
    current and the `conv_kernel_size - 1` previous tokens.

    Length: full/local need `w` at every position, so inputs longer than `max_position_embeddings` raise a
    `ValueError`; simple/conv text models accept any length unless `position_embeddings=True`.

    Vision (`image_size` and `patch_size` set): a patch stem turns the image into `(image_size / patch_size)^2`
    tokens. Full/local/simple add a class token and learned position embeddings (DeiT style, as the paper's
    ImageNet models) and classify from the class token; AFT-conv uses a 2-D depthwise conv over the patch grid,
    no position embedding and no class token, and mean-pools, as in the paper. *(open)* AFT-local on images uses
    a 1-D window over the raster order `[class token, patches]`.

    Args:
        vocab_size (`int` or `None`, defaults to 384): token vocabulary (384 = ByT5 bytes). `None`: vision only.
        hidden_size (`int`, defaults to 256): model width `d`.
        intermediate_size (`int`, defaults to 1024): hidden width of each block's FFN.
        num_hidden_layers (`int`, defaults to 6): number of blocks.
        aft_type (`str`, defaults to `"local"`): one of `"full"`, `"local"`, `"simple"`, `"conv"`.
        local_window (`int`, defaults to 32): `s` of AFT-local (window `|t - t'| < s`).
        position_bias_dim (`int` or `None`, defaults to 64): `d'` of the factorised bias `w = u v^T` (full/local);
            `None` learns the full `L x L` matrix instead.
        position_bias_init_std (`float`, defaults to 0.01): std of the normal init of `u, v` (or of `w`).
        num_heads (`int`, defaults to 8): AFT-conv heads `h` (must divide `hidden_size`).
        conv_kernel_size (`int`, defaults to 7): AFT-conv kernel size `k` (odd: the bidirectional kernel is centred).
        conv_gain_multiplier (`float`, defaults to 1.0): constant `m` in front of the AFT-conv kernel's
            reparameterisation (above); 1 is the paper's. The main job's preset (`aft-conv-main-job`) uses 100.
        max_position_embeddings (`int`, defaults to 1024): longest sequence of full/local (size of `w`) and of
            learned position embeddings.
        causal (`bool`, defaults to `False`): causality of `AFTModel` and `AFTForSequenceClassification`.
            `AFTForCausalLM` is always causal, `AFTForMaskedLM` / `AFTForImageClassification` never are.
        position_embeddings (`bool`, defaults to `False`): add learned absolute position embeddings to text
            tokens (position information otherwise comes from `w`, the conv kernel or causality; a bidirectional
            AFT-simple text model without them is permutation invariant). Vision models decide by `aft_type`.
        hidden_act (`str`, defaults to `"gelu"`): FFN activation.
        layer_norm_eps (`float`, defaults to 1e-5), initializer_range (`float`, defaults to 0.02).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout on each branch before the residual add.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over the blocks.
        image_size, patch_size, num_channels: vision models only.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head to the token embeddings.
    """

    model_type = "aft"

    def __init__(
        self,
        vocab_size: int | None = 384,
        hidden_size: int = 256,
        intermediate_size: int = 1024,
        num_hidden_layers: int = 6,
        aft_type: str = "local",
        local_window: int = 32,
        position_bias_dim: int | None = 64,
        position_bias_init_std: float = 0.01,
        num_heads: int = 8,
        conv_kernel_size: int = 7,
        conv_gain_multiplier: float = 1.0,
        max_position_embeddings: int = 1024,
        causal: bool = False,
        position_embeddings: bool = False,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        hidden_dropout_prob: float = 0.0,
        drop_path_rate: float = 0.0,
        image_size: int | None = None,
        patch_size: int | None = None,
        num_channels: int = 3,
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
        self.aft_type = aft_type
        self.local_window = local_window
        self.position_bias_dim = position_bias_dim
        self.position_bias_init_std = position_bias_init_std
        self.num_heads = num_heads
        self.conv_kernel_size = conv_kernel_size
        self.conv_gain_multiplier = conv_gain_multiplier
        self.max_position_embeddings = max_position_embeddings
        self.causal = causal
        self.position_embeddings = position_embeddings
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.hidden_dropout_prob = hidden_dropout_prob
        self.drop_path_rate = drop_path_rate
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
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

    @property
    def is_vision(self) -> bool:
        return self.image_size is not None

    @property
    def grid_size(self) -> tuple[int, int] | None:
        """(rows, columns) of the patch grid of a vision model."""
        if not self.is_vision:
            return None
        side = self.image_size // self.patch_size
        return side, side

    @property
    def uses_class_token(self) -> bool:
        """Vision full/local/simple: DeiT-style class token and position embeddings (not AFT-conv)."""
        return self.is_vision and self.aft_type != "conv"

    @property
    def needs_positions(self) -> bool:
        """Whether inputs are limited to `max_position_embeddings` (position bias or position embeddings)."""
        return self.aft_type in ("full", "local") or self.position_embeddings or self.uses_class_token

    def _validate(self):
        """Reject invalid values and combinations at creation time, naming the field."""
        require_positive_int(self, "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")
        require_positive_int(self, "vocab_size", allow_none=True)
        require_choice(self, "aft_type", AFT_TYPES)
        if self.aft_type == "local":
            require_positive_int(self, "local_window")
        if self.aft_type in ("full", "local"):
            require_positive_int(self, "position_bias_dim", allow_none=True)
            require_non_negative(self, "position_bias_init_std")
        if self.aft_type == "conv":
            require_positive_int(self, "num_heads", "conv_kernel_size")
            require_divides(self, "num_heads", "hidden_size")
            require_positive(self, "conv_gain_multiplier")
            if self.conv_kernel_size % 2 == 0:
                raise ValueError(
                    f"AFTConfig: `conv_kernel_size` must be odd (the bidirectional kernel is centred), "
                    f"got {self.conv_kernel_size}."
                )
        require_probability(self, "hidden_dropout_prob", "drop_path_rate")
        require_positive(self, "layer_norm_eps")
        require_non_negative(self, "initializer_range")
        require_activation(self)
        require_image_settings(self)
        if self.is_vision:
            if self.causal:
                raise ValueError("AFTConfig: `causal=True` is not supported for a vision model (image_size is set).")
            tokens = (self.image_size // self.patch_size) ** 2 + (1 if self.uses_class_token else 0)
            if self.needs_positions and tokens > self.max_position_embeddings:
                raise ValueError(
                    f"AFTConfig: a vision AFT-{self.aft_type} model has {tokens} tokens (patches"
                    f"{' + class token' if self.uses_class_token else ''}), more than `max_position_embeddings` "
                    f"({self.max_position_embeddings})."
                )


__all__ = ["AFTConfig"]
