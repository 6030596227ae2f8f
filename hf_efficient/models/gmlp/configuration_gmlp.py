"""gMLP / aMLP configuration (Liu, Dai, So, Le, "Pay Attention to MLPs", NeurIPS 2021)."""

from transformers import PreTrainedConfig

from ..shared.config_checks import (
    require_activation,
    require_image_settings,
    require_non_negative,
    require_positive,
    require_positive_int,
    require_probability,
    require_task_fields,
)


class GMLPConfig(PreTrainedConfig):
    r"""
    Configuration of a gMLP (or aMLP, when `tiny_attn_size` is set) model.

    A gMLP block is `x + W_out(SGU(GELU(W_in(LN(x)))))`; the spatial gating unit (SGU) splits its input channels into
    `u` (first half) and `v` (second half), normalises `v`, projects it along the **sequence** axis with an `n x n`
    matrix `W` (init near 0) and bias `b` (init 1), and returns `u * (W v + b)`. There are no position embeddings:
    `W` itself is position-aware, so `max_position_embeddings` (= `n`) is the longest sequence the model supports.

    Args:
        vocab_size (`int` or `None`, defaults to 384):
            Token vocabulary (384 = ByT5's byte vocabulary). `None` for a vision-only model (no token embeddings).
        hidden_size (`int`, defaults to 256): model width `d_model`.
        intermediate_size (`int`, defaults to 1536): `d_ffn`, the width after `W_in` (6 x d_model in the paper). Must
            be even: the SGU splits it into two halves and outputs `d_ffn / 2` channels.
        num_hidden_layers (`int`, defaults to 6): number of gMLP blocks.
        max_position_embeddings (`int`, defaults to 256): the SGU length `n`. Causal models accept any length
            `<= n` (W is lower-triangular, so a prefix of W is exact). Bidirectional models also accept any length
            `<= n`: a shorter input behaves exactly as if it were right-padded to `n` with masked positions (masked
            positions contribute nothing to the spatial projection). Longer inputs raise a `ValueError`.
        causal (`bool`, defaults to `False`): whether the base model's SGU (and tiny attention) is causal.
            `GMLPForCausalLM` is always causal and `GMLPForMaskedLM` / `GMLPForImageClassification` never are,
            whatever this says; it decides for `GMLPModel`, sequence and token classification.
        tiny_attn_size (`int` or `None`, defaults to `None`): `d_attn` of aMLP's single-head tiny attention (64 in
            the paper); `None` gives plain gMLP. *(open)* The tiny attention reads the block's normalised input
            `LN(x)`, and its output (`d_ffn / 2` channels) is added to the gate after the spatial projection.
        hidden_act (`str`, defaults to `"gelu"`): activation after `W_in` (exact GELU, as timm).
        layer_norm_eps (`float`, defaults to 1e-6): epsilon of the block and final LayerNorms (timm's gMLP: 1e-6).
        gate_norm_eps (`float`, defaults to 1e-5): epsilon of the SGU's LayerNorm on `v` (timm's `gate.norm` is a
            default `nn.LayerNorm`, eps 1e-5; kept separate so timm weights port losslessly).
        sgu_init_std (`float`, defaults to 1e-6): std of the normal init of the spatial weight `W` ("near 0").
        initializer_range (`float`, defaults to 0.02): std of the other weights.
        hidden_dropout_prob (`float`, defaults to 0.0): dropout on each block's output before the residual add.
        drop_path_rate (`float`, defaults to 0.0): stochastic depth, linearly increasing over the blocks.
        image_size, patch_size, num_channels (`int` or `None`): vision models only; a patch stem turns a
            `num_channels x image_size x image_size` image into `(image_size / patch_size)^2` tokens, which must
            equal `max_position_embeddings`.
        tie_word_embeddings (`bool`, defaults to `True`): tie the LM head to the token embeddings.
    """

    model_type = "gmlp"

    def __init__(
        self,
        vocab_size: int | None = 384,
        hidden_size: int = 256,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 6,
        max_position_embeddings: int = 256,
        causal: bool = False,
        tiny_attn_size: int | None = None,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        gate_norm_eps: float = 1e-5,
        sgu_init_std: float = 1e-6,
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
        self.max_position_embeddings = max_position_embeddings
        self.causal = causal
        self.tiny_attn_size = tiny_attn_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.gate_norm_eps = gate_norm_eps
        self.sgu_init_std = sgu_init_std
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

    def _validate(self):
        """Reject invalid values and combinations at creation time, naming the field."""
        require_positive_int(self, "hidden_size", "intermediate_size", "num_hidden_layers", "max_position_embeddings")
        require_positive_int(self, "vocab_size", "tiny_attn_size", allow_none=True)
        if self.intermediate_size % 2 != 0:
            raise ValueError(
                f"GMLPConfig: `intermediate_size` must be even (the SGU splits it in two halves), "
                f"got {self.intermediate_size}."
            )
        require_probability(self, "hidden_dropout_prob", "drop_path_rate")
        require_positive(self, "layer_norm_eps", "gate_norm_eps")
        require_non_negative(self, "sgu_init_std", "initializer_range")
        require_activation(self)
        require_image_settings(self)
        if self.image_size is not None:
            num_patches = (self.image_size // self.patch_size) ** 2
            if num_patches != self.max_position_embeddings:
                raise ValueError(
                    f"GMLPConfig: a vision model has (image_size / patch_size)^2 = {num_patches} tokens, so "
                    f"`max_position_embeddings` must be {num_patches}, got {self.max_position_embeddings}."
                )
            if self.causal:
                raise ValueError("GMLPConfig: `causal=True` is not supported for a vision model (image_size is set).")


__all__ = ["GMLPConfig"]
