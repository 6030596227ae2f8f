"""Input checks and small helpers that every architecture's base model and heads share.

The one copy in the package; a checkpoint saved with its code carries it as a file of its own folder
(`hf_efficient.hub.bundle_files`).
"""

from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_utils import PreTrainedModel
from transformers.utils.deprecation import deprecate_kwarg

# transformers 5.24 renamed the cache argument `past_key_values` -> `cache`, and keeps the old name as a deprecated
# alias in its own models. Every forward that takes a cache accepts it the same way (a FutureWarning, then used as
# `cache`), so a caller's cache is never swallowed by `**kwargs` and silently ignored; both names at once is an error.
past_key_values_alias = deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)


def _checking() -> bool:
    """Value checks read tensor data (a device sync, data-dependent control flow): skip them while compiling or
    exporting, where the graph must not branch on data."""
    return not torch.compiler.is_compiling()


def mask_if_padded(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The `(B, L)` 0/1 mask where it has padding, None where it has none (the models' unmasked fast paths).

    In a compiled or exported graph the mask is always kept: whether it is all ones is data, and a graph must not
    branch on data (the masked paths give the same result for a mask of ones)."""
    if attention_mask is None or (_checking() and bool(attention_mask.all())):
        return None
    return attention_mask


def embed_inputs(
    model_name: str,
    *,
    input_ids: torch.LongTensor | None,
    inputs_embeds: torch.Tensor | None,
    embed_tokens: torch.nn.Module | None,
    hidden_size: int,
    pixel_values: torch.Tensor | None = None,
    patch_embed: torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Check the inputs of a base model and turn them into `(B, L, d)` embeddings.

    Exactly one of `input_ids` `(B, L)`, `inputs_embeds` `(B, L, d)` or `pixel_values` `(B, C, H, W)` (when the model
    has a `patch_embed`). Every mistake is a `ValueError` naming the value, raised before any tensor op: the wrong
    number of dimensions, an empty batch or sequence, ids outside the vocabulary, embeddings of the wrong width or
    of another floating dtype than the model's (`dtype`).
    """
    given = [name for name, x in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds)) if x is not None]
    if pixel_values is not None:
        given.append("pixel_values")
    if len(given) != 1:
        allowed = "`input_ids`, `inputs_embeds`" + (" or `pixel_values`" if patch_embed is not None else "")
        raise ValueError(f"{model_name}: pass exactly one of {allowed}; got {given or 'none'}.")
    if pixel_values is not None:
        if patch_embed is None:
            raise ValueError(f"{model_name}: this config has no image settings: it cannot take `pixel_values`.")
        if pixel_values.ndim == 4 and pixel_values.shape[0] == 0:
            raise ValueError(f"{model_name}: `pixel_values` is an empty batch (shape {tuple(pixel_values.shape)}).")
        return patch_embed(pixel_values)
    if inputs_embeds is not None:
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != hidden_size:
            raise ValueError(
                f"{model_name}: `inputs_embeds` must have shape (batch, length, {hidden_size}), "
                f"got {tuple(inputs_embeds.shape)}."
            )
        if dtype is not None and inputs_embeds.dtype != dtype:
            raise ValueError(
                f"{model_name}: `inputs_embeds` has dtype {inputs_embeds.dtype}, the model runs in {dtype}: "
                f"cast them with `.to({dtype})` (or the model with `.to(dtype)`)."
            )
        _check_not_empty(model_name, "inputs_embeds", inputs_embeds.shape)
        return inputs_embeds
    if embed_tokens is None:
        raise ValueError(f"{model_name}: this config has `vocab_size=None` (vision only): it cannot take `input_ids`.")
    if input_ids.ndim != 2:
        raise ValueError(f"{model_name}: `input_ids` must have shape (batch, length), got {tuple(input_ids.shape)}.")
    _check_not_empty(model_name, "input_ids", input_ids.shape)
    if input_ids.is_floating_point():
        raise ValueError(f"{model_name}: `input_ids` must be integer token ids, got dtype {input_ids.dtype}.")
    vocab_size = embed_tokens.num_embeddings
    if _checking():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"{model_name}: `input_ids` holds the id {bad}, outside the vocabulary [0, {vocab_size - 1}] "
                f"(vocab_size={vocab_size})."
            )
    return embed_tokens(input_ids)


def _check_not_empty(model_name: str, name: str, shape: torch.Size) -> None:
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(
            f"{model_name}: `{name}` is empty (shape {tuple(shape)}): every sample needs at least one token."
        )


def check_attention_mask(
    attention_mask: torch.Tensor | None, expected_length: int, past_length: int = 0, batch_size: int | None = None
) -> None:
    """`attention_mask` `(B, T)` covers past + current tokens (transformers' convention): 1 = real, 0 = padding.

    Its batch must be the inputs' (`batch_size`, where given): a mask of one row is not broadcast over a batch, as
    that would apply one sample's padding to every sample. Any dtype (bool, int, float) is accepted as long as the
    values are 0 and 1; an additive mask (0 = keep, -inf or a large negative = pad) would be read inverted, so it is
    a ValueError that says what masks look like.
    """
    if attention_mask is None:
        return
    batch = "batch" if batch_size is None else batch_size
    if (
        attention_mask.ndim != 2
        or attention_mask.shape[-1] != expected_length
        or (batch_size is not None and attention_mask.shape[0] != batch_size)
    ):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {expected_length}) "
            f"(the inputs' batch; past {past_length} + current {expected_length - past_length} tokens)."
        )
    if attention_mask.dtype != torch.bool and _checking():
        invalid = (attention_mask != 0) & (attention_mask != 1)
        if bool(invalid.any()):
            value = attention_mask[invalid][0].item()
            raise ValueError(
                f"attention_mask must hold 1 for real tokens and 0 for padding (bool, int or float), got the value "
                f"{value}. An additive mask (0 = keep, -inf = pad) is not accepted: pass `(mask == 0)` instead."
            )


def check_labels(model_name: str, labels: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    """`labels` of the shape the head's loss needs (`expected`, e.g. `(B, L)` like the inputs, or `(B,)`), else a
    ValueError naming it: torch's own loss would otherwise fail deep inside with a flattened-size mismatch."""
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(
            f"{model_name}: `labels` must have shape {meaning} = {tuple(expected)}, got {tuple(labels.shape)}."
        )


def check_class_labels(model_name: str, labels: torch.Tensor, batch_size: int, num_labels: int) -> None:
    """Sequence / image classification labels: `(B,)` class ids, `(B,)` or `(B, 1)` regression targets, or
    `(B, num_labels)` multi-label targets (transformers' `problem_type`)."""
    allowed = {(batch_size,), (batch_size, num_labels)} | ({(batch_size, 1)} if num_labels == 1 else set())
    if tuple(labels.shape) not in allowed:
        shapes = " or ".join(str(shape) for shape in sorted(allowed))
        raise ValueError(
            f"{model_name}: `labels` must have shape (batch,) (class ids or regression targets) or "
            f"(batch, num_labels) (multi-label), here {shapes}; got {tuple(labels.shape)}."
        )


def check_position_ids(model_name: str, position_ids: torch.Tensor | None, batch_size: int, length: int) -> None:
    """A caller's `position_ids`: shape `(B, L)` or `(1, L)` like the current tokens, and no negative position (an
    index into a learned table would otherwise be clamped or wrap around silently)."""
    if position_ids is None:
        return
    if position_ids.ndim != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch_size):
        raise ValueError(
            f"{model_name}: `position_ids` must have shape ({batch_size}, {length}) or (1, {length}) like the current "
            f"tokens, got {tuple(position_ids.shape)}."
        )
    if _checking() and position_ids.numel() and int(position_ids.min()) < 0:
        raise ValueError(
            f"{model_name}: `position_ids` holds the position {int(position_ids.min())}: positions start at 0."
        )


def positions_from_mask(
    attention_mask: torch.Tensor | None, past_length: int, num_new: int, device: torch.device
) -> torch.LongTensor:
    """Position ids `(B or 1, num_new)` of the newest tokens: `cumsum(mask) - 1` (0 on padding), or plain counting.

    Counting real tokens only makes a left-padded sample see the same positions as alone.
    """
    if attention_mask is None:
        return torch.arange(past_length, past_length + num_new, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)[:, -num_new:]


def mean_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real positions: `(B, L, d)` -> `(B, d)`."""
    if attention_mask is None:
        return hidden_states.mean(dim=1)
    mask = attention_mask[:, -hidden_states.shape[1] :].to(hidden_states.dtype)[..., None]
    return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def last_token_pool(hidden_states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The last real position of each sample (left or right padding): `(B, L, d)` -> `(B, d)`."""
    if attention_mask is None:
        return hidden_states[:, -1]
    mask = attention_mask[:, -hidden_states.shape[1] :].long()
    index = torch.arange(mask.shape[1], device=mask.device)
    last = (index * mask).argmax(dim=-1)
    return hidden_states[torch.arange(hidden_states.shape[0], device=hidden_states.device), last]


def run_blocks(
    blocks: nn.ModuleList,
    hidden_states: torch.Tensor,
    final_norm: nn.Module,
    output_hidden_states: bool | None,
    **block_kwargs,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Apply the blocks then the final norm: `(B, L, d)` -> `(B, L, d)`, with the hidden states transformers returns
    for `output_hidden_states` (the embeddings, then each block's output, the last one normalised)."""
    all_hidden_states = (hidden_states,) if output_hidden_states else None
    for block in blocks:
        hidden_states = block(hidden_states, **block_kwargs)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
    hidden_states = final_norm(hidden_states)
    if output_hidden_states:
        all_hidden_states = all_hidden_states[:-1] + (hidden_states,)
    return hidden_states, all_hidden_states


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The "eager" entry of transformers' attention interface: `softmax(q k^T * scaling + mask) v`.

    q `(B, h, Lq, d_h)`, k / v `(B, h, T, d_h)`; `attention_mask` boolean (True = attend) or additive, broadcastable
    to `(B, h, Lq, T)`, or None with `is_causal` (query i at position T - Lq + i). Returns `(B, Lq, h, d_h)` and the
    probabilities `(B, h, Lq, T)` (what `output_attentions` reports).
    """
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is None and is_causal:
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample with probability `drop_prob`."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1.0 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    keep = hidden_states.new_empty(shape).bernoulli_(keep_prob)
    return hidden_states * keep / keep_prob


class EfficientPreTrainedModel(PreTrainedModel):
    """What every architecture's `PreTrainedModel` shares: heads keep the base model in `self.model`, text input by
    default, gradient checkpointing through `GradientCheckpointingLayer` blocks."""

    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # `attn_implementation="eager" | "sdpa"` is accepted by every architecture, so `from_pretrained(...,
    # attn_implementation=...)` and `set_attn_implementation` behave the same everywhere. Models with softmax
    # attention through transformers' attention interface dispatch on it; the others have nothing to dispatch
    # (their token mixers are their own ops) and ignore it.
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a local folder with a `config.json` but no weights (such as a preset of
        `model_cards/`) gets an error that says how to build a model from it instead of only "no file named"."""
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        except OSError as error:
            folder = Path(str(pretrained_model_name_or_path))
            weights = [*folder.glob("*.safetensors"), *folder.glob("*.bin"), *folder.glob("*.safetensors.index.json")]
            if not (folder.is_dir() and (folder / "config.json").is_file() and not weights):
                raise
            raise OSError(
                f"{folder} has a config.json but no weights: it is a configuration (a preset), not a checkpoint. "
                f"Build a randomly initialised model from it with `{cls.__name__}.from_config("
                f"AutoConfig.from_pretrained({str(folder)!r}))` (or the matching AutoModelFor*.from_config), or train "
                f"one with `hf-efficient train --model {folder.name}`. ({error})"
            ) from error

    # Installed by `hf_efficient.hub` when the package is imported: `save_pretrained_with_code`. A model of the
    # package whose class was registered with `register_for_auto_class` saves through it, because transformers' own
    # saver would copy the architecture's files as they are, with `from ..shared.x` imports it cannot follow,
    # instead of the flat bundle. (In a checkpoint loaded with trust_remote_code it stays None: that code is flat
    # already and takes transformers' path.)
    save_with_code = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; after `register_for_auto_class`, with the flat code bundle (above)."""
        if self._auto_class is not None and self.save_with_code is not None:
            self.save_with_code(save_directory, *args, **kwargs)
            return None
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_input_embeddings(self) -> nn.Module | None:
        """The token embedding, or for a model that reads `pixel_values` its patch embedding (as transformers'
        vision models return theirs)."""
        base = getattr(self, self.base_model_prefix, self)
        if self.main_input_name == "pixel_values" or getattr(base, "embed_tokens", None) is None:
            patch_embed = getattr(base, "patch_embed", None)
            if patch_embed is not None:
                return patch_embed
        return getattr(base, "embed_tokens", None)

    def embed(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`embed_inputs` with this base model's `embed_tokens` and `patch_embed` (where it has them)."""
        return embed_inputs(
            type(self).__name__,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            embed_tokens=getattr(self, "embed_tokens", None),
            hidden_size=self.config.hidden_size,
            pixel_values=pixel_values,
            patch_embed=getattr(self, "patch_embed", None),
            dtype=self.dtype,
        )


def token_embedding(config) -> nn.Embedding | None:
    """The token embedding table, or None for a vision-only config (`vocab_size=None`)."""
    if getattr(config, "vocab_size", None) is None:
        return None
    return nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)


def stochastic_depth_rates(config) -> list[float]:
    """Per-block drop-path rates growing linearly from 0 to `config.drop_path_rate` (plain Python: also works on the
    meta device)."""
    num_layers = config.num_hidden_layers
    return [config.drop_path_rate * i / max(num_layers - 1, 1) for i in range(num_layers)]


class FeedForward(nn.Module):
    """The block's feed-forward network: `fc2(Dropout(act(fc1(x))))`, `d -> config.intermediate_size -> d`; the
    dropout rate is `config.activation_dropout` where the config has one (else none)."""

    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(getattr(config, "activation_dropout", 0.0))
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(hidden_states))))


class PatchEmbeddings(nn.Module):
    """Patch stem (timm's `stem.proj`): `(B, C, H, W)` -> `(B, (H / p) * (W / p), d)`; a wrong image size is a
    ValueError naming the expected shape."""

    def __init__(self, config):
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
