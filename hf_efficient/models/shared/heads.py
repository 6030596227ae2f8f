"""Task heads shared by every architecture: thin wrappers that put one projection and a loss on a base model.

An architecture's head is one class statement plus its docstring, e.g.

    class GMLPForCausalLM(CausalLMHead, GMLPPreTrainedModel, GenerationMixin):
        '''gMLP language model with a causal SGU.'''
        base_model_class = GMLPModel

The mixin comes first so its `__init__`/`forward` win; `super().__init__(config)` then reaches the architecture's
`PreTrainedModel`. The base model is built directly (`base_model_class(config)`), not through
`AutoModel.from_config` as transformers' `Generic*` heads do, because under `trust_remote_code` the Auto class does
not know the dynamically loaded config. Base models take `input_ids` / `inputs_embeds` (or `pixel_values`),
`attention_mask`, `cache`, `use_cache`, `output_hidden_states`, `return_dict` and `**kwargs`, and return a
`BaseModelOutputWithPast`-like output.

The one copy in the package; a checkpoint saved with its code carries it as a file of its own folder
(`hf_efficient.hub.bundle_files`).
"""

import functools

import torch
from torch import nn
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.modeling_layers import GenericForTokenClassification
from transformers.modeling_outputs import (
    CausalLMOutputWithPast,
    ImageClassifierOutput,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.utils import can_return_tuple, logging

from .common import check_class_labels, check_labels, last_token_pool, mean_pool, past_key_values_alias

logger = logging.get_logger(__name__)


def sequence_length_limit(config) -> int | None:
    """The longest sequence a model takes: `max_position_embeddings`, unless the config says its inputs are not
    limited by it (`needs_positions` False: no position table, e.g. AFT-simple or sinusoidal positions)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit is None or getattr(config, "needs_positions", True) is False:
        return None
    return limit


# `generate()` arguments that switch on assisted decoding (a draft model, prompt lookup, early exit, multi-token
# prediction); the last two do not exist in every transformers of the supported range, hence `getattr`.
ASSISTED_DECODING_ARGUMENTS = ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit", "use_mtp")


def refuse_assisted_decoding(model, generation_config, generate_kwargs: dict) -> None:
    """A NotImplementedError of the package's own when `generate()` is asked for assisted or prompt-lookup decoding on a model
    whose decoding state cannot be rolled back (`_is_stateful`: running sums, span summaries, RNN windows, a rolling
    key/value window). Assisted decoding drops rejected draft tokens by cropping the cache, which such a state does
    not allow; transformers' own message for it changed between releases (5.24: "stateful models", 5.25: "requires
    a cache"), so the package checks first and says the same on every supported release."""
    if not getattr(model, "_is_stateful", False):
        return
    config = generation_config if generation_config is not None else model.generation_config
    asked = [
        name
        for name in ASSISTED_DECODING_ARGUMENTS
        if generate_kwargs.get(name, getattr(config, name, None)) not in (None, False)
    ]
    if asked:
        raise NotImplementedError(
            f"{type(model).__name__} does not support assisted or prompt-lookup decoding (got "
            f"{', '.join(f'`{name}`' for name in asked)}): its decoding state is not kept per token, so the cache "
            "cannot be cropped back when draft tokens are rejected. Decode without an assistant (greedy, sampling "
            "or beam search)."
        )


class RefuseAssistedDecodingMixin:
    """`generate()` that checks `refuse_assisted_decoding` first: a base of `CausalLMHead` and of any other
    generating head (an encoder-decoder). Put it before `GenerationMixin` in the bases."""

    def generate(self, inputs=None, generation_config=None, **kwargs):
        refuse_assisted_decoding(self, generation_config, kwargs)
        return super().generate(inputs, generation_config=generation_config, **kwargs)


class SequenceLengthLimit(StoppingCriteria):
    """Stops generation when the sequences reach the model's length limit (a fixed spatial matrix or position
    table), instead of failing on the next forward."""

    def __init__(self, limit: int):
        self.limit = limit

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = input_ids.shape[-1] >= self.limit
        if done:
            logger.warning_once(f"Generation stopped at the model's length limit of {self.limit} tokens.")
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class BaseModelHead:
    """Builds `self.model`: `base_model_class(config)`, forced causal / bidirectional by `base_model_causal`."""

    base_model_class: type | None = None
    base_model_causal: bool | None = None  # None: the config's own choice (`config.causal` where it has one)

    def build_base_model(self, config) -> nn.Module:
        if self.base_model_class is None:
            raise NotImplementedError(f"{type(self).__name__} must set `base_model_class`.")
        if self.base_model_causal is None:
            return self.base_model_class(config)
        return self.base_model_class(config, causal=self.base_model_causal)


class CausalLMHead(RefuseAssistedDecodingMixin, BaseModelHead):
    """Causal language model: `lm_head` tied to the input embeddings (with a bias where `config.lm_head_bias` says
    so); decoding through the base model's cache."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_causal = True

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "vocab_size", None) is None:
            raise ValueError(f"{type(self).__name__} needs a `vocab_size`.")
        self.model = self.build_base_model(config)
        bias = bool(getattr(config, "lm_head_bias", False))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=bias)
        self.post_init()

    def generate(self, inputs=None, generation_config=None, stopping_criteria=None, **kwargs):
        """`GenerationMixin.generate`, stopping at the model's length limit (`sequence_length_limit`) where it has one:
        a prompt that already fills it is a ValueError, and generation ends there instead of failing partway.
        Assisted decoding on a model that cannot roll its state back is refused (`RefuseAssistedDecodingMixin`)."""
        limit = sequence_length_limit(self.config)
        if limit is not None:
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            if prompt is not None and prompt.shape[-1] >= limit:
                raise ValueError(
                    f"{type(self).__name__}: the prompt has {prompt.shape[-1]} tokens and this model takes at most "
                    f"{limit} (max_position_embeddings): there is no room to generate. Shorten the prompt."
                )
            stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []), SequenceLengthLimit(limit)])
        return super().generate(
            inputs, generation_config=generation_config, stopping_criteria=stopping_criteria, **kwargs
        )

    # `position_ids` is not a named argument on purpose: `generate()` would then compute and pass them, and the base
    # models derive the same positions from `attention_mask` themselves (a caller's `position_ids` still pass through).
    @past_key_values_alias
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """`labels`: `(B, L)` next-token targets (shifted inside the loss), -100 to ignore."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            check_labels(type(self).__name__, labels, hidden_states.shape[:2], "(batch, length) like the inputs")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None),
        )


class MaskedLMHead(BaseModelHead):
    """Masked language model on a bidirectional base model, `lm_head` tied to the input embeddings."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    base_model_causal = False

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "vocab_size", None) is None:
            raise ValueError(f"{type(self).__name__} needs a `vocab_size`.")
        self.model = self.build_base_model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """`labels`: `(B, L)` targets at masked positions, -100 elsewhere."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        logits = self.lm_head(outputs.last_hidden_state)
        loss = None
        if labels is not None:
            check_labels(type(self).__name__, labels, logits.shape[:2], "(batch, length) like the inputs")
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return MaskedLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None),
        )


class SequenceClassificationHead(BaseModelHead):
    """Linear classifier on pooled final hidden states: `pooling = "mean"` over real positions or `"last"` real
    token (a config field `classifier_pooling` overrides it per model)."""

    pooling = "mean"
    # The loss is a mean over the batch and never reads `num_items_in_batch`: `Trainer` must scale it for gradient
    # accumulation and average it over processes itself (it only stops doing so for models that accept loss kwargs,
    # which it would otherwise infer from `**kwargs`).
    accepts_loss_kwargs = False

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = self.build_base_model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """`labels`: `(B,)` class ids (or floats for regression, as transformers' `problem_type` decides).
        `use_cache` is accepted and ignored: a classifier never decodes."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        pooling = getattr(self.config, "classifier_pooling", None) or self.pooling
        pool = last_token_pool if pooling == "last" else mean_pool
        logits = self.score(pool(outputs.last_hidden_state, attention_mask))
        loss = None
        if labels is not None:
            check_class_labels(type(self).__name__, labels, logits.shape[0], self.num_labels)
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=getattr(outputs, "attentions", None),
        )


class TokenClassificationHead(BaseModelHead, GenericForTokenClassification):
    """Linear classifier on every position: transformers' `GenericForTokenClassification.forward`, our `__init__`."""

    # Its loss (`loss_function(logits, labels, config)`) is a mean over the batch's labelled tokens and is not given
    # `num_items_in_batch`: `Trainer` must scale it itself (see SequenceClassificationHead).
    accepts_loss_kwargs = False

    def __init__(self, config):
        # Skip the generic `__init__` (its `AutoModel.from_config` fails under remote code): straight to the
        # architecture's `PreTrainedModel`.
        super(GenericForTokenClassification, self).__init__(config)
        self.num_labels = config.num_labels
        self.model = self.build_base_model(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(dropout if dropout is not None else getattr(config, "hidden_dropout_prob", 0.0))
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    @functools.wraps(GenericForTokenClassification.forward)  # keeps its signature (the Trainer reads it)
    def forward(self, *args, **kwargs):
        # A per-position classifier never decodes: no cache unless asked for (the generic forward passes None,
        # which a causal base model would read as "build one").
        kwargs.setdefault("use_cache", False)
        return GenericForTokenClassification.forward(self, *args, **kwargs)

    def loss_function(self, logits, labels, config, **kwargs):
        """transformers' token-classification loss, after a shape check of `labels` `(B, L)`."""
        check_labels(type(self).__name__, labels, logits.shape[:2], "(batch, length) like the inputs")
        return super().loss_function(logits, labels, config, **kwargs)


class ImageClassificationHead(BaseModelHead):
    """Linear classifier on the pooled patch tokens of a bidirectional base model that takes `pixel_values`
    (`pool_image`: the mean of the tokens; override it, e.g. for a class token). An architecture with more to its
    loss or its output (Sparse-MLP's router balance loss) overrides `image_loss` / `extra_outputs` and
    `output_class`."""

    main_input_name = "pixel_values"
    base_model_causal = False
    accepts_loss_kwargs = False  # a batch mean that never reads `num_items_in_batch` (see SequenceClassificationHead)
    output_class = ImageClassifierOutput

    def __init__(self, config):
        super().__init__(config)
        if getattr(config, "image_size", None) is None:
            raise ValueError(f"{type(self).__name__} needs `image_size` (and its patch settings) in its config.")
        self.num_labels = config.num_labels
        self.model = self.build_base_model(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def pool_image(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(B, N, d)` -> `(B, d)`."""
        return hidden_states.mean(dim=1)

    def image_loss(self, logits: torch.Tensor, labels: torch.LongTensor, outputs) -> torch.Tensor:
        """The batch's loss from `logits` `(B, num_labels)`, `labels` `(B,)` and the base model's `outputs`:
        transformers' loss for the config's problem type (cross-entropy for single-label)."""
        return self.loss_function(labels=labels, pooled_logits=logits, config=self.config)

    def extra_outputs(self, outputs) -> dict:
        """Fields of `output_class` beyond loss, logits and hidden states, from the base model's `outputs`."""
        return {"attentions": getattr(outputs, "attentions", None)}

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        """`pixel_values`: `(B, C, H, W)`; `labels`: `(B,)` class ids. Other keyword arguments go to the base model."""
        outputs = self.model(
            pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True, **kwargs
        )
        logits = self.classifier(self.pool_image(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            check_class_labels(type(self).__name__, labels, logits.shape[0], self.num_labels)
            loss = self.image_loss(logits, labels, outputs)
        return self.output_class(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **self.extra_outputs(outputs)
        )
