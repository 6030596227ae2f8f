"""Convert a timm gMLP checkpoint into a `GMLPForImageClassification` folder (weights, config, code, card).

timm's names map one to one onto ours (no tensor is reshaped, so the port is lossless):

    stem.proj.{weight,bias}                      -> model.patch_embed.proj.*
    blocks.{i}.norm.*                            -> model.layers.{i}.norm.*
    blocks.{i}.mlp_channels.fc1.*                -> model.layers.{i}.fc1.*
    blocks.{i}.mlp_channels.gate.norm.*          -> model.layers.{i}.sgu.norm.*
    blocks.{i}.mlp_channels.gate.proj.*          -> model.layers.{i}.sgu.proj.*   (Linear(n, n), same layout)
    blocks.{i}.mlp_channels.fc2.*                -> model.layers.{i}.fc2.*
    norm.*                                       -> model.norm.*
    head.*                                       -> classifier.*

The config (width, depth, d_ffn, patch size, image size, classes) is read off the tensor shapes.

    python scripts/convert_timm_gmlp.py --checkpoint gmlp_s16_224.safetensors --output-dir gmlp-s16-224-timm
    python scripts/convert_timm_gmlp.py --timm-model gmlp_s16_224 --pretrained --output-dir out   # needs timm + Hub
    python scripts/convert_timm_gmlp.py --checkpoint ckpt.pth --output-dir out --verify           # needs timm

`--verify` builds the timm model, loads the same checkpoint and checks that both give the same logits on a
random image (max abs difference printed; fails above 1e-4).
"""

import argparse
import math
import re
import sys
from pathlib import Path

import torch

RENAMES = [
    (r"^stem\.proj\.", "model.patch_embed.proj."),
    (r"^blocks\.(\d+)\.norm\.", r"model.layers.\1.norm."),
    (r"^blocks\.(\d+)\.mlp_channels\.fc1\.", r"model.layers.\1.fc1."),
    (r"^blocks\.(\d+)\.mlp_channels\.gate\.norm\.", r"model.layers.\1.sgu.norm."),
    (r"^blocks\.(\d+)\.mlp_channels\.gate\.proj\.", r"model.layers.\1.sgu.proj."),
    (r"^blocks\.(\d+)\.mlp_channels\.fc2\.", r"model.layers.\1.fc2."),
    (r"^norm\.", "model.norm."),
    (r"^head\.", "classifier."),
]


def rename_key(key: str) -> str:
    for pattern, replacement in RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    raise ValueError(f"Unexpected key in a timm gMLP checkpoint: {key!r}")


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "state_dict_ema"):
            if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
                break
    return {k.removeprefix("module."): v for k, v in state.items()}


def config_from_state_dict(state: dict[str, torch.Tensor], **overrides):
    """A `GMLPConfig` read off the checkpoint's tensor shapes."""
    from hf_efficient.models.gmlp import GMLPConfig

    stem = state["stem.proj.weight"]  # (d, C, p, p)
    hidden_size, num_channels, patch_size = stem.shape[0], stem.shape[1], stem.shape[2]
    num_blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    intermediate_size = state["blocks.0.mlp_channels.fc1.weight"].shape[0]
    num_patches = state["blocks.0.mlp_channels.gate.proj.weight"].shape[0]
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"The spatial projection has {num_patches} positions, not a square patch grid.")
    kwargs = dict(
        vocab_size=None,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_blocks,
        max_position_embeddings=num_patches,
        image_size=grid * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_labels=state["head.weight"].shape[0],
        layer_norm_eps=1e-6,
        gate_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    return GMLPConfig(**kwargs)


def convert(state: dict[str, torch.Tensor], **config_overrides):
    """timm state dict -> (GMLPForImageClassification in eval mode, config)."""
    from hf_efficient.models.gmlp import GMLPForImageClassification

    config = config_from_state_dict(state, **config_overrides)
    model = GMLPForImageClassification(config)
    converted = {rename_key(k): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"Conversion mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval(), config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="timm state dict (.safetensors, .pth, .bin)")
    source.add_argument("--timm-model", help="timm model name, e.g. gmlp_s16_224 (needs timm)")
    parser.add_argument("--pretrained", action="store_true", help="with --timm-model: timm's pretrained weights")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--verify", action="store_true", help="compare logits with timm on a random image")
    args = parser.parse_args(argv)

    import hf_efficient

    timm_model = None
    if args.timm_model:
        import timm

        timm_model = timm.create_model(args.timm_model, pretrained=args.pretrained).eval()
        state = timm_model.state_dict()
    else:
        if not args.checkpoint.is_file():
            parser.error(f"checkpoint not found: {args.checkpoint}")
        state = load_state_dict(args.checkpoint)

    model, config = convert(state)
    hf_efficient.save_pretrained_with_code(model, args.output_dir)
    print(
        f"Converted {len(state)} tensors: gMLP d={config.hidden_size} depth={config.num_hidden_layers} "
        f"d_ffn={config.intermediate_size} patch={config.patch_size} image={config.image_size} "
        f"classes={config.num_labels} -> {args.output_dir}"
    )

    if args.verify:
        import timm

        if timm_model is None:
            name = f"gmlp_custom_{config.hidden_size}"
            timm_model = timm.models.mlp_mixer.MlpMixer(
                num_classes=config.num_labels,
                img_size=config.image_size,
                in_chans=config.num_channels,
                patch_size=config.patch_size,
                num_blocks=config.num_hidden_layers,
                embed_dim=config.hidden_size,
                mlp_ratio=config.intermediate_size / config.hidden_size,
                block_layer=timm.models.mlp_mixer.SpatialGatingBlock,
                mlp_layer=timm.layers.GatedMlp,
            ).eval()
            timm_model.load_state_dict(state)
            print(f"built {name} in timm for verification")
        image = torch.randn(
            2, config.num_channels, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            expected = timm_model(image)
            got = model(pixel_values=image).logits
        difference = (expected - got).abs().max().item()
        print(f"verify: max |logits_timm - logits_ours| = {difference:.3e}")
        if difference > 1e-4:
            print("verify: FAILED", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
