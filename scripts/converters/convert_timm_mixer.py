"""Convert a timm MLP-Mixer checkpoint (`mixer_*`) into a `SparseMLPForImageClassification` folder, optionally
upcycling its last blocks into mixture-of-experts blocks (a dense start for Sparse-MLP).

Dense port (`num_sparse_layers=0`): timm's names map one to one onto ours, so the logits are exactly timm's:

    stem.proj.{weight,bias}                   -> model.patch_embed.proj.*
    blocks.{i}.norm1.* / norm2.*              -> model.layers.{i}.norm1.* / norm2.*
    blocks.{i}.mlp_tokens.fc{1,2}.*           -> model.layers.{i}.mlp_tokens.fc{1,2}.*
    blocks.{i}.mlp_channels.fc{1,2}.*         -> model.layers.{i}.mlp_channels.fc{1,2}.*
    norm.*                                    -> model.norm.*
    head.*                                    -> classifier.*

Upcycling (`--upcycle N`): the last N blocks become sparse blocks with identity re-represent layers (`S' = S`,
`C' = C`, weights I, biases 0), `token_norm` / `channel_norm` = the block's `norm1` / `norm2`, router weights 0, and
every expert a copy of the block's dense MLP with its output layer (`fc2` weight and bias) scaled by `E / k`. With a
zero router every gate is `1 / E`, so in evaluation the `k` selected experts sum to `k * (1/E) * (E/k) * MLP(x) =
MLP(x)`: the upcycled model starts with exactly the dense model's outputs (up to float rounding), whichever experts
are picked. No capacity is set (a dropped pair would break that equality). Training then breaks the symmetry
through the router noise (on by default).

The config (width, depth, MLP widths, patch size, image size, classes) is read off the tensor shapes.

    python scripts/converters/convert_timm_mixer.py --checkpoint mixer_b16_224.safetensors --output-dir mixer-b16-timm
    python scripts/converters/convert_timm_mixer.py --checkpoint ckpt.pth --output-dir out --upcycle 2 --experts 4 4
    python scripts/converters/convert_timm_mixer.py --timm-model mixer_b16_224 --pretrained --output-dir out  # timm, Hub

`--verify` compares the logits with timm's on a random image (needs timm). The folder gets the model, its code
(`trust_remote_code=True` works without hf-efficient) and an image processor with timm's preprocessing for the
Mixer checkpoints (resize to the image size, mean = std = 0.5), so `pipeline("image-classification", folder)` works.
"""

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the `converters` package

from converters import common

RENAMES = [
    (r"^stem\.proj\.", "model.patch_embed.proj."),
    (r"^norm\.", "model.norm."),
    (r"^head\.", "classifier."),
]


def rename_key(key: str) -> str:
    if match := re.match(r"^blocks\.(\d+)\.(.+)$", key):
        if re.match(r"(norm1|norm2|mlp_tokens\.fc[12]|mlp_channels\.fc[12])\.(weight|bias)$", match.group(2)):
            return f"model.layers.{match.group(1)}.{match.group(2)}"
    elif (new := common.rename(key, RENAMES)) is not None:
        return new
    raise ValueError(f"Unexpected key in a timm MLP-Mixer checkpoint: {key!r}")


def config_from_state_dict(state: dict[str, torch.Tensor], upcycle: int = 0, experts=(4, 4), top_k=(1, 2), **extra):
    """A `SparseMLPConfig` read off the checkpoint's tensor shapes (the last `upcycle` blocks sparse)."""
    from hf_efficient.models.sparse_mlp import SparseMLPConfig

    hidden_size, num_channels, patch_size = common.timm_stem(state)
    token_dim, num_patches = state["blocks.0.mlp_tokens.fc1.weight"].shape
    kwargs = dict(
        image_size=common.square_side(num_patches, "The token-mixing MLP") * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        token_mixing_dim=token_dim,
        channel_mixing_dim=state["blocks.0.mlp_channels.fc1.weight"].shape[0],
        num_hidden_layers=common.indices(state, r"blocks\.(\d+)\.")[-1] + 1,
        num_sparse_layers=upcycle,
        num_labels=state["head.weight"].shape[0],
        layer_norm_eps=1e-6,
    )
    if upcycle:
        kwargs.update(
            num_token_experts=experts[0],
            num_channel_experts=experts[1],
            token_top_k=top_k[0],
            channel_top_k=top_k[1],
            sparse_num_patches=num_patches,
            sparse_hidden_size=hidden_size,
        )
    kwargs.update(extra)
    return SparseMLPConfig(**kwargs)


def _upcycle_block(state, block: int, config) -> dict[str, torch.Tensor]:
    """The parameters of sparse block `block` from dense block `block` of the timm state dict (see module doc)."""
    src, dst = f"blocks.{block}.", f"model.layers.{block}."
    patches, channels = config.num_patches, config.hidden_size
    out = {
        dst + "channels_in.weight": torch.eye(channels),
        dst + "channels_in.bias": torch.zeros(channels),
        dst + "patches_in.weight": torch.eye(patches),
        dst + "patches_in.bias": torch.zeros(patches),
        dst + "patches_out.weight": torch.eye(patches),
        dst + "patches_out.bias": torch.zeros(patches),
        dst + "channels_out.weight": torch.eye(channels),
        dst + "channels_out.bias": torch.zeros(channels),
    }
    for norm, moe, mlp, num_experts, top_k in (
        ("norm1", "token", "mlp_tokens", config.num_token_experts, config.token_top_k),
        ("norm2", "channel", "mlp_channels", config.num_channel_experts, config.channel_top_k),
    ):
        out[f"{dst}{moe}_norm.weight"] = state[f"{src}{norm}.weight"]
        out[f"{dst}{moe}_norm.bias"] = state[f"{src}{norm}.bias"]
        fc1_w, fc1_b = state[f"{src}{mlp}.fc1.weight"], state[f"{src}{mlp}.fc1.bias"]
        fc2_w, fc2_b = state[f"{src}{mlp}.fc2.weight"], state[f"{src}{mlp}.fc2.bias"]
        scale = num_experts / top_k
        out[f"{dst}{moe}_moe.router.weight"] = torch.zeros(num_experts, fc1_w.shape[1])
        out[f"{dst}{moe}_moe.experts.up_proj"] = fc1_w.expand(num_experts, -1, -1).clone()
        out[f"{dst}{moe}_moe.experts.up_proj_bias"] = fc1_b.expand(num_experts, -1).clone()
        out[f"{dst}{moe}_moe.experts.down_proj"] = (fc2_w * scale).expand(num_experts, -1, -1).clone()
        out[f"{dst}{moe}_moe.experts.down_proj_bias"] = (fc2_b * scale).expand(num_experts, -1).clone()
    return out


def convert(state: dict[str, torch.Tensor], upcycle: int = 0, experts=(4, 4), top_k=(1, 2), **config_overrides):
    """timm state dict -> (SparseMLPForImageClassification in eval mode, config)."""
    from hf_efficient.models.sparse_mlp import SparseMLPForImageClassification

    config = config_from_state_dict(state, upcycle, experts, top_k, **config_overrides)
    first_sparse = config.num_hidden_layers - upcycle
    converted = {}
    for key, value in state.items():
        match = re.match(r"^blocks\.(\d+)\.", key)
        if match and int(match.group(1)) >= first_sparse:
            continue
        converted[rename_key(key)] = value
    for block in range(first_sparse, config.num_hidden_layers):
        converted |= _upcycle_block(state, block, config)
    return common.load_strictly(SparseMLPForImageClassification(config), converted).eval(), config


def image_processor(config):
    """timm's evaluation preprocessing of the Mixer checkpoints: bicubic resize, mean = std = 0.5 (timm also
    center-crops 0.875 of a larger resize; a plain resize to the image size is used here)."""
    from transformers import ViTImageProcessorPil

    return ViTImageProcessorPil(
        size={"height": config.image_size, "width": config.image_size},
        resample=3,  # PIL bicubic
        image_mean=[0.5] * config.num_channels,
        image_std=[0.5] * config.num_channels,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_timm_source_arguments(parser, example="mixer_b16_224")
    parser.add_argument("--upcycle", type=int, default=0, help="turn the last N blocks into MoE blocks")
    parser.add_argument("--experts", type=int, nargs=2, default=(4, 4), metavar=("E_S", "E_C"))
    parser.add_argument("--top-k", type=int, nargs=2, default=(1, 2), metavar=("K_S", "K_C"))
    args = parser.parse_args(argv)

    import hf_efficient

    state, timm_model = common.read_timm_source(parser, args)
    try:
        model, config = convert(state, args.upcycle, tuple(args.experts), tuple(args.top_k))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    hf_efficient.save_pretrained_with_code(model, args.output_dir)
    image_processor(config).save_pretrained(args.output_dir)
    print(
        f"Converted {len(state)} tensors: Mixer C={config.hidden_size} depth={config.num_hidden_layers} "
        f"D_S={config.token_mixing_dim} D_C={config.channel_mixing_dim} patch={config.patch_size} "
        f"image={config.image_size} classes={config.num_labels}, last {args.upcycle} blocks upcycled "
        f"-> {args.output_dir}"
    )

    if not args.verify:
        return 0
    if timm_model is None:
        ratios = (config.token_mixing_dim / config.hidden_size, config.channel_mixing_dim / config.hidden_size)
        timm_model = common.timm_mixer(config, state, ratios)
    return common.verify_against_timm(model, timm_model, config)


if __name__ == "__main__":
    sys.exit(main())
