"""Config validation shared by every architecture: each check raises a ValueError naming the class, the field and
the value, at config creation (not when the model is built).

The one copy in the package; a checkpoint saved with its code carries it as a file of its own folder
(`hf_efficient.hub.bundle_files`).
"""

from transformers.activations import ACT2FN


def _fail(config, name: str, requirement: str) -> None:
    raise ValueError(f"{type(config).__name__}: `{name}` must be {requirement}, got {getattr(config, name)!r}.")


def require_positive_int(config, *names: str, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            _fail(config, name, "a positive integer" + (" or None" if allow_none else ""))


def require_probability(config, *names: str) -> None:
    """Dropout-like rates in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            _fail(config, name, "in [0, 1)")


def require_positive(config, *names: str) -> None:
    """Strictly positive numbers (epsilons)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            _fail(config, name, "a positive number")


def require_non_negative(config, *names: str) -> None:
    """Numbers >= 0 (initialisation standard deviations)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            _fail(config, name, "a number >= 0")


def require_choice(config, name: str, choices) -> None:
    if getattr(config, name) not in choices:
        _fail(config, name, f"one of {', '.join(repr(c) for c in choices)}")


def require_activation(config, name: str = "hidden_act") -> None:
    """An activation name transformers' `ACT2FN` knows (`gelu`, `relu`, `silu`, ...)."""
    value = getattr(config, name)
    if not isinstance(value, str) or value not in ACT2FN:
        _fail(config, name, f"an activation name known to transformers ({', '.join(sorted(ACT2FN))})")


def require_divides(config, divisor: str, dividend: str) -> None:
    """`getattr(config, divisor)` divides `getattr(config, dividend)` (e.g. heads divide the width)."""
    if getattr(config, dividend) % getattr(config, divisor) != 0:
        raise ValueError(
            f"{type(config).__name__}: `{divisor}` ({getattr(config, divisor)}) must divide `{dividend}` "
            f"({getattr(config, dividend)})."
        )


def require_image_settings(config) -> None:
    """`image_size` and `patch_size` set together (vision) or both None (text); the patch divides the image."""
    image_size, patch_size = config.image_size, config.patch_size
    if (image_size is None) != (patch_size is None):
        raise ValueError(
            f"{type(config).__name__}: `image_size` ({image_size!r}) and `patch_size` ({patch_size!r}) must be set "
            "together (vision) or both left None (text)."
        )
    if image_size is not None:
        require_positive_int(config, "image_size", "patch_size", "num_channels")
        if image_size % patch_size != 0:
            raise ValueError(
                f"{type(config).__name__}: `image_size` ({image_size}) must be a positive multiple of `patch_size` "
                f"({patch_size})."
            )


SPECIAL_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")


def require_task_fields(config) -> None:
    """What every config shares with transformers' `PreTrainedConfig`: at least one label (`num_labels`, or None for
    transformers' default), and special
    token ids (`pad_token_id`, `bos_token_id`, `eos_token_id` (an id or a list), `decoder_start_token_id`) that are
    None or ids inside the vocabulary `[0, vocab_size)` (a `pad_token_id` equal to `vocab_size` would otherwise
    fail inside `nn.Embedding` when the model is built, and an out-of-range `eos_token_id` never stops generation)."""
    num_labels = config.num_labels  # None until `id2label` is set (transformers then defaults to 2)
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(
            f"{type(config).__name__}: `num_labels` must be a positive integer (the classes of a classification "
            f"head; 1 for regression), got {num_labels!r}."
        )
    vocab_size = getattr(config, "vocab_size", None)
    for name in SPECIAL_TOKEN_FIELDS:
        value = getattr(config, name, None)
        if value is None:
            continue
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            valid = isinstance(token_id, int) and not isinstance(token_id, bool) and token_id >= 0
            if valid and (vocab_size is None or token_id < vocab_size):
                continue
            inside = f"[0, {vocab_size - 1}] (vocab_size={vocab_size})" if vocab_size else "a non-negative integer"
            raise ValueError(
                f"{type(config).__name__}: `{name}` must be None or a token id in {inside}, got {value!r}."
            )
