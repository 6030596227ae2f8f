"""Decoding cache of named per-layer states, for models whose state is not (only) a key/value cache.

The one copy in the package; a checkpoint saved with its code carries it as a file of its own folder
(`hf_efficient.hub.bundle_files`).
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .common import check_attention_mask


class StateCacheLayer(CacheLayerMixin):
    """One layer's decoding state: named tensors, each with the batch on dim 0.

    The layer that owns the state decides what the tensors mean (past gate inputs, running sums, rolling windows,
    span summaries, past keys/values...); this class only keeps them, counts the tokens seen, and applies the batch
    operations that `generate()` needs (beam reordering, batch expansion and selection) to every tensor alike.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, **kwargs):
        super().__init__()
        self.states: dict[str, torch.Tensor] = {}
        self.num_seen_tokens = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} keeps named states, not keys/values: use `cache.update_states(layer_idx, ...)`."
        )

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_seen_tokens + query_length, 0

    def get_seq_length(self) -> int:
        return self.num_seen_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.states = {}
        self.num_seen_tokens = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise NotImplementedError(f"{type(self).__name__} cannot be cropped (its states are not per token).")

    def offload(self):
        self.states = {name: t.to("cpu", non_blocking=True) for name, t in self.states.items()}

    def prefetch(self):
        if self.is_initialized:
            self.states = {name: t.to(self.device, non_blocking=True) for name, t in self.states.items()}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.states = {name: t.index_select(0, beam_idx.to(t.device)) for name, t in self.states.items()}

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.states = {name: t.repeat_interleave(repeats, dim=0) for name, t in self.states.items()}

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.states = {name: t[indices, ...] for name, t in self.states.items()}


class StateCache(Cache):
    """Decoding cache with one `StateCacheLayer` of named states per block.

    A `transformers.cache_utils.Cache`, so `generate()` (greedy, sampling, beam search), `get_seq_length()` and
    continuing from a returned cache work as with a KV cache. Each architecture subclasses it under its own name
    (`GMLPCache`, `AFTCache`, ...) so that a model can tell its own cache from a foreign one.
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if num_layers is None:
            if config is None:
                raise ValueError(f"{type(self).__name__} needs a `config` or `num_layers`.")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[StateCacheLayer() for _ in range(num_layers)])

    def get_states(self, layer_idx: int) -> dict[str, torch.Tensor]:
        """The states stored for `layer_idx` (empty before the first forward)."""
        return self.layers[layer_idx].states

    def update_states(self, layer_idx: int, num_new_tokens: int, **states: torch.Tensor) -> None:
        """Replace the states of `layer_idx` after it consumed `num_new_tokens` more tokens."""
        layer = self.layers[layer_idx]
        layer.states.update(states)
        layer.num_seen_tokens += num_new_tokens
        if states and not layer.is_initialized:
            layer.is_initialized = True
            layer.device = next(iter(states.values())).device


def resolve_state_cache(
    cache: Cache | None,
    use_cache: bool | None,
    *,
    cache_class: type,
    config,
    causal: bool,
    training: bool,
    batch_size: int | None = None,
) -> StateCache | None:
    """The cache a base model's forward should use (or `None`), following transformers' conventions.

    `use_cache=None` means `config.use_cache` for a causal model outside training. A bidirectional model never
    caches (its outputs depend on the future) and refuses a cache it is handed. `generate()` or a user may hand in
    another, empty `Cache` type: it is replaced by `cache_class`; a filled foreign cache is an error, and so is a
    filled cache of another batch size than the inputs' (`batch_size`).
    """
    name = cache_class.__name__
    if use_cache is None:
        use_cache = causal and getattr(config, "use_cache", True) and not training
    if not causal:
        if cache is not None:
            raise ValueError(f"A cache can only be used with a causal model ({name}): this one is bidirectional.")
        return None
    if isinstance(cache, cache_class):
        check_cache_batch(cache, batch_size)
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(f"This model needs a {name} to continue decoding, got a filled {type(cache).__name__}.")
    return cache_class(config) if use_cache else None


def open_cached_forward(
    model,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: Cache | None,
    use_cache: bool | None,
    *,
    cache_class: type,
    causal: bool,
) -> tuple[StateCache | None, int]:
    """The opening every stateful base model's forward shares, after embedding: the cache to use
    (`resolve_state_cache`), the number of tokens it already holds, and the attention mask checked against past +
    current tokens. `hidden_states`: `(B, L, d)`. Returns `(cache, past_length)`."""
    batch_size, seq_len = hidden_states.shape[:2]
    cache = resolve_state_cache(
        cache,
        use_cache,
        cache_class=cache_class,
        config=model.config,
        causal=causal,
        training=model.training,
        batch_size=batch_size,
    )
    past_length = cache.get_seq_length() if cache is not None else 0
    check_attention_mask(attention_mask, past_length + seq_len, past_length, batch_size=batch_size)
    return cache, past_length


def check_cache_batch(cache: StateCache, batch_size: int | None) -> None:
    """A filled cache holds the states of `B` sequences: continuing it with another batch size is a ValueError (the
    states would broadcast or fail deep inside a layer)."""
    if batch_size is None or not cache.layers or not cache.layers[0].states:
        return
    cached = next(iter(cache.layers[0].states.values())).shape[0]
    if cached != batch_size:
        raise ValueError(
            f"The {type(cache).__name__} holds the state of a batch of {cached}, but the inputs have a batch of "
            f"{batch_size}: continue a cache with the batch it was built on (or expand it with "
            "`cache.batch_repeat_interleave`)."
        )


class StateCacheModelMixin:
    """For a `PreTrainedModel` whose base model builds its own `StateCache` subclass (see `resolve_state_cache`)."""

    # `generate()` must not build a DynamicCache for us: the base model creates its own cache.
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False
