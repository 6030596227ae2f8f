"""`hf-efficient generate`: a causal LM continues its prompts, a seq2seq model writes its output for each; and the
generation config saved with a checkpoint of a task that generates."""

import sys

from ..errors import TaskError, first_line
from ..models.shared.heads import sequence_length_limit
from .arguments import DEFAULT_MAX_NEW_TOKENS
from .models import load_checkpoint
from .tasks import TASKS, Task


def default_generation_config(model, tokenizer, task: Task | None = None):
    """The decoding settings saved with a checkpoint of a task that generates (`Task.generation`: sampling for clm,
    the default `task`, greedy for seq2seq) and the special tokens. No length (`max_new_tokens` / `max_length`): a
    saved length would win over a caller's `max_length` in transformers; `hf-efficient generate` has its own default
    (`arguments.DEFAULT_MAX_NEW_TOKENS`, capped by the model's position limit)."""
    from transformers import GenerationConfig

    tokens = dict(
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=getattr(model.config, "bos_token_id", None),
    )
    if getattr(model.config, "is_encoder_decoder", False):
        tokens["decoder_start_token_id"] = getattr(model.config, "decoder_start_token_id", None)
    return GenerationConfig(**(task or TASKS["clm"]).generation, **tokens)


def generate_text(model, tokenizer, prompts: list[str], settings: dict) -> list[str]:
    """Prompts -> generated texts, the checkpoint's generation config updated by `settings`. A causal LM continues
    the prompt (left-padded, no special tokens; the text includes the prompt); an encoder-decoder reads each prompt
    as its source, encoded as in training (with eos), and the text is the decoder's output alone."""
    import torch

    model.eval()
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    tokenizer.padding_side = "right" if encoder_decoder else "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=encoder_decoder)
    prompt_length = encoded["input_ids"].shape[1]
    if prompt_length == 0 or not all(prompts):
        raise TaskError("the prompt is empty: pass --prompt with at least one character")
    settings = {k: v for k, v in settings.items() if v is not None}
    new_tokens = settings.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS
    if new_tokens <= 0:
        raise TaskError(f"--max-new-tokens must be positive, got {new_tokens}")
    limit = position_limit(model.config)
    if limit is not None and encoder_decoder:  # the source fills the encoder; the decoder starts with one token
        if prompt_length > limit:
            raise TaskError(
                f"the prompt has {prompt_length} tokens: the model's encoder takes at most {limit} "
                "(max_position_embeddings); shorten the prompt"
            )
        if new_tokens > limit - 1:
            print(
                f"hf-efficient: generating at most {limit - 1} tokens, not {new_tokens}: the model's decoder takes "
                f"{limit} (max_position_embeddings), its start token included",
                file=sys.stderr,
            )
            new_tokens = limit - 1
    elif limit is not None:
        if prompt_length >= limit:
            raise TaskError(
                f"the prompt has {prompt_length} tokens: the model's context is {limit} tokens "
                f"(max_position_embeddings), so there is no room to generate; shorten the prompt"
            )
        if prompt_length + new_tokens > limit:
            print(
                f"hf-efficient: generating {limit - prompt_length} tokens, not {new_tokens}: the model's context is "
                f"{limit} (max_position_embeddings) and the prompt has {prompt_length}",
                file=sys.stderr,
            )
            new_tokens = limit - prompt_length
    settings["max_new_tokens"] = new_tokens
    if settings.get("num_beams", 1) > 1 and "do_sample" not in settings:
        settings["do_sample"] = False
    if settings.get("do_sample") is False:
        settings.update(temperature=None, top_k=None, top_p=None)
    settings.setdefault("pad_token_id", tokenizer.pad_token_id)
    try:
        with torch.no_grad():
            output = model.generate(**encoded.to(model.device), **settings)
    except ValueError as error:
        raise TaskError(f"generation failed: {first_line(error)}") from error
    return tokenizer.batch_decode(output, skip_special_tokens=True)


# The longest sequence a model takes: the same rule the models' own `generate()` stops at (heads.py).
position_limit = sequence_length_limit


def run_generate(checkpoint_args, generate_args) -> list[str]:
    """`hf-efficient generate`: a causal LM's continuations, or a seq2seq checkpoint's outputs, of the prompts."""
    from transformers import set_seed

    settings = generate_args.settings()
    _, task, model, tokenizer = load_checkpoint(checkpoint_args, generating=True)
    set_seed(generate_args.seed)
    texts = generate_text(model, tokenizer, generate_args.prompt or [task.default_prompt], settings)
    for index, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {index + 1}")
        print(text)
    return texts
