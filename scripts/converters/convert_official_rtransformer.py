"""Convert an official R-Transformer checkpoint (DSE-MSU/R-transformer: the state dict of the `RT` module of the
char, word or image experiment) into a Hub-ready folder (weights, config, code) that loads with
`trust_remote_code=True`.

The official names map one to one onto ours (no tensor is reshaped; the LocalRNN weights keep the `nn.GRU` /
`nn.LSTM` / `nn.RNN` layout):

    rt.forward_net.{i}.layers.{j}.connection.norm.{a_2,b_2}  -> model.layers.{i}.rnn_layers.{j}.norm.{weight,bias}
    rt.forward_net.{i}.layers.{j}.local_rnn.rnn.*            -> model.layers.{i}.rnn_layers.{j}.local_rnn.rnn.*
    rt.forward_net.{i}.connections.0.norm.{a_2,b_2}          -> model.layers.{i}.attention_norm.{weight,bias}
    rt.forward_net.{i}.pooling.linears.{0,1,2,3}.*           -> model.layers.{i}.attention.{q,k,v,o}_proj.*
    rt.forward_net.{i}.connections.1.norm.{a_2,b_2}          -> model.layers.{i}.ffn_norm.{weight,bias}
    rt.forward_net.{i}.feed_forward.{w_1,w_2}.*              -> model.layers.{i}.ffn.{fc1,fc2}.*
    encoder.weight (char / word: nn.Embedding)               -> model.embed_tokens.weight
    decoder.{weight,bias} (char / word)                      -> lm_head.{weight,bias}   (tied: same as the encoder)
    encoder.* (image: nn.Linear(C, d))                       -> model.patch_embed.proj.*
    linear.* (image)                                         -> classifier.*

Defined but never used by the official forward, so dropped (and listed): each LocalRNN's `output` Linear+ReLU,
`rt.norm` (final LayerNorm) and `rt.feed_forward`. The config (d, levels, n, rnn type, vocabulary / classes /
channels, tying) is read off the tensor shapes; the heads `h` and the window `M` are not in the weights and default to
the experiment's defaults (char: h 8, M 7; word: h 8, M 9; image: h 2, M 7). The official LayerNorm is kept
(`official_layer_norm=True`, eps 1e-6), so the outputs equal the official model's (the image head returns logits,
the official model their log_softmax).

    python scripts/converters/convert_official_rtransformer.py --checkpoint m_char.pt --task char --output-dir rt-char
    python scripts/converters/convert_official_rtransformer.py --checkpoint m.pt --task image --image-size 28 --output-dir o
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the `converters` package

from converters import common

TASKS = {"char": {"heads": 8, "window": 7}, "word": {"heads": 8, "window": 9}, "image": {"heads": 2, "window": 7}}
BLOCK_RENAMES = [
    (r"layers\.(\d+)\.connection\.norm\.a_2", r"rnn_layers.\1.norm.weight"),
    (r"layers\.(\d+)\.connection\.norm\.b_2", r"rnn_layers.\1.norm.bias"),
    (r"layers\.(\d+)\.local_rnn\.rnn\.((weight|bias)_(ih|hh)_l0)", r"rnn_layers.\1.local_rnn.rnn.\2"),
    (r"connections\.0\.norm\.a_2", "attention_norm.weight"),
    (r"connections\.0\.norm\.b_2", "attention_norm.bias"),
    (r"connections\.1\.norm\.a_2", "ffn_norm.weight"),
    (r"connections\.1\.norm\.b_2", "ffn_norm.bias"),
    (r"pooling\.linears\.0\.(weight|bias)", r"attention.q_proj.\1"),
    (r"pooling\.linears\.1\.(weight|bias)", r"attention.k_proj.\1"),
    (r"pooling\.linears\.2\.(weight|bias)", r"attention.v_proj.\1"),
    (r"pooling\.linears\.3\.(weight|bias)", r"attention.o_proj.\1"),
    (r"feed_forward\.w_1\.(weight|bias)", r"ffn.fc1.\1"),
    (r"feed_forward\.w_2\.(weight|bias)", r"ffn.fc2.\1"),
]
UNUSED = [r"^rt\.forward_net\.\d+\.layers\.\d+\.local_rnn\.output\.", r"^rt\.norm\.", r"^rt\.feed_forward\."]
TOP_RENAMES = {
    "char": {
        "encoder.weight": "model.embed_tokens.weight",
        "decoder.weight": "lm_head.weight",
        "decoder.bias": "lm_head.bias",
    },
    "image": {
        "encoder.weight": "model.patch_embed.proj.weight",
        "encoder.bias": "model.patch_embed.proj.bias",
        "linear.weight": "classifier.weight",
        "linear.bias": "classifier.bias",
    },
}
TOP_RENAMES["word"] = TOP_RENAMES["char"]


def rename_key(key: str, task: str) -> str | None:
    """Our name for an official key, or None for a weight the official forward never uses."""
    if any(re.match(pattern, key) for pattern in UNUSED):
        return None
    match = re.match(r"^rt\.forward_net\.(\d+)\.(.+)$", key)
    if match:
        level, rest = match.groups()
        for pattern, replacement in BLOCK_RENAMES:
            if re.fullmatch(pattern, rest):
                return f"model.layers.{level}." + re.sub(pattern, replacement, rest)
    elif key in TOP_RENAMES[task]:
        return TOP_RENAMES[task][key]
    raise ValueError(f"Unexpected key in an official R-Transformer {task} checkpoint: {key!r}")


def config_from_state_dict(state: dict, task: str, heads: int, window: int, image_size: int | None):
    from hf_efficient.models.r_transformer import RTransformerConfig
    from hf_efficient.models.r_transformer.ops_r_transformer import GATES

    if task not in TASKS:
        raise ValueError(f"--task must be one of {sorted(TASKS)}, got {task!r}.")
    levels = common.indices(state, r"^rt\.forward_net\.(\d+)\.")
    if not levels:
        raise ValueError("No `rt.forward_net.*` keys: not an official R-Transformer `RT` state dict.")
    sublayers = common.indices(state, r"^rt\.forward_net\.0\.layers\.(\d+)\.")
    weight_ih = state["rt.forward_net.0.layers.0.local_rnn.rnn.weight_ih_l0"]
    hidden_size = weight_ih.shape[1]
    gates = weight_ih.shape[0] // hidden_size
    kwargs = dict(
        hidden_size=hidden_size,
        num_hidden_layers=len(levels),
        num_rnn_layers=len(sublayers),
        num_attention_heads=heads,
        local_window=window,
        rnn_type={count: rnn_type for rnn_type, count in GATES.items()}[gates],
        intermediate_size=state["rt.forward_net.0.feed_forward.w_1.weight"].shape[0],
        official_layer_norm=True,
        layer_norm_eps=1e-6,
    )
    if task == "image":
        channels = state["encoder.weight"].shape[1]
        if image_size is None:
            raise ValueError("--image-size is required for an image checkpoint (28 for the official pixel-MNIST).")
        kwargs.update(
            vocab_size=None,
            image_size=image_size,
            num_channels=channels,
            num_labels=state["linear.weight"].shape[0],
            tie_word_embeddings=False,
        )
    else:
        tied = torch.equal(state["encoder.weight"], state["decoder.weight"])
        kwargs.update(
            vocab_size=state["encoder.weight"].shape[0],
            lm_head_bias="decoder.bias" in state,
            tie_word_embeddings=tied,
            pad_token_id=None,
            eos_token_id=None,
        )
    return RTransformerConfig(**kwargs)


def convert(state: dict, task: str, heads: int | None = None, window: int | None = None, image_size=None):
    """(model, dropped keys): the converted head (`RTransformerForCausalLM` or `RTransformerForImageClassification`)
    with the official weights loaded strictly."""
    from hf_efficient.models.r_transformer import RTransformerForCausalLM, RTransformerForImageClassification

    heads = heads or TASKS[task]["heads"]
    window = window or TASKS[task]["window"]
    config = config_from_state_dict(state, task, heads, window, image_size)
    head = RTransformerForImageClassification if task == "image" else RTransformerForCausalLM
    model = head(config).eval()
    renamed, dropped = {}, []
    for key, tensor in state.items():
        new = rename_key(key, task)
        if new is None:
            dropped.append(key)
        else:
            renamed[new] = tensor
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    for key in tied:
        renamed.pop(key, None)  # the same tensor as the embeddings
    common.load_strictly(model, renamed, absent=tied)
    if tied:
        model.tie_weights()
    return model, dropped


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--heads", type=int, default=None, help="h (default: the experiment's)")
    parser.add_argument(
        "--window", type=int, default=None, help="the LocalRNN window M, `ksize` (default: the experiment's)"
    )
    parser.add_argument("--image-size", type=int, default=None, help="side of the square image (pixel-MNIST: 28)")
    parser.add_argument("--output-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        state = common.load_state_dict(
            args.checkpoint, why_not_plain=" (the official `save()` pickles the whole model)"
        )
        model, dropped = convert(state, args.task, args.heads, args.window, args.image_size)
    except (ValueError, KeyError) as error:
        print(f"convert_official_rtransformer: error: {error}", file=sys.stderr)
        return 1
    import hf_efficient

    hf_efficient.save_pretrained_with_code(model, args.output_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"Saved {type(model).__name__} ({params / 1e6:.2f}M parameters) to {args.output_dir}")
    if dropped:
        print(f"Dropped {len(dropped)} weights the official forward never uses: {', '.join(dropped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
