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

    python scripts/converters/convert_timm_gmlp.py --checkpoint gmlp_s16_224.safetensors --output-dir gmlp-s16-timm
    python scripts/converters/convert_timm_gmlp.py --timm-model gmlp_s16_224 --pretrained --output-dir out  # timm, Hub
    python scripts/converters/convert_timm_gmlp.py --checkpoint ckpt.pth --output-dir out --verify          # timm

`--verify` builds the timm model, loads the same checkpoint and checks that both give the same logits on a
random image (max abs difference printed; fails above 1e-4).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the `converters` package

from converters import common

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
    if (new := common.rename(key, RENAMES)) is None:
        raise ValueError(f"Unexpected key in a timm gMLP checkpoint: {key!r}")
    return new


def config_from_state_dict(state, **overrides):
    """A `GMLPConfig` read off the checkpoint's tensor shapes."""
    from hf_efficient.models.gmlp import GMLPConfig

    hidden_size, num_channels, patch_size = common.timm_stem(state)
    num_patches = state["blocks.0.mlp_channels.gate.proj.weight"].shape[0]
    kwargs = dict(
        vocab_size=None,
        hidden_size=hidden_size,
        intermediate_size=state["blocks.0.mlp_channels.fc1.weight"].shape[0],
        num_hidden_layers=common.indices(state, r"blocks\.(\d+)\.")[-1] + 1,
        max_position_embeddings=num_patches,
        image_size=common.square_side(num_patches, "The spatial projection") * patch_size,
        patch_size=patch_size,
        num_channels=num_channels,
        num_labels=state["head.weight"].shape[0],
        layer_norm_eps=1e-6,
        gate_norm_eps=1e-5,
    )
    kwargs.update(overrides)
    return GMLPConfig(**kwargs)


def convert(state, **config_overrides):
    """timm state dict -> (GMLPForImageClassification in eval mode, config)."""
    from hf_efficient.models.gmlp import GMLPForImageClassification

    config = config_from_state_dict(state, **config_overrides)
    converted = {rename_key(k): v for k, v in state.items()}
    return common.load_strictly(GMLPForImageClassification(config), converted).eval(), config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_timm_source_arguments(parser, example="gmlp_s16_224")
    args = parser.parse_args(argv)

    import hf_efficient

    state, timm_model = common.read_timm_source(parser, args)
    model, config = convert(state)
    hf_efficient.save_pretrained_with_code(model, args.output_dir)
    print(
        f"Converted {len(state)} tensors: gMLP d={config.hidden_size} depth={config.num_hidden_layers} "
        f"d_ffn={config.intermediate_size} patch={config.patch_size} image={config.image_size} "
        f"classes={config.num_labels} -> {args.output_dir}"
    )

    if not args.verify:
        return 0
    if timm_model is None:
        from timm.layers import GatedMlp
        from timm.models.mlp_mixer import SpatialGatingBlock

        ratio = config.intermediate_size / config.hidden_size
        timm_model = common.timm_mixer(config, state, ratio, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)
        print(f"built gmlp_custom_{config.hidden_size} in timm for verification")
    return common.verify_against_timm(model, timm_model, config)


if __name__ == "__main__":
    sys.exit(main())
