"""What the checkpoint converters share: reading a checkpoint file, renaming keys by patterns, reading sizes off the
tensors, loading the renamed weights strictly, and for the timm ports their command line (a checkpoint file or a timm
model) and the logits check against timm.

The converters import it as `converters.common` (each puts `scripts/` on `sys.path`), so they run as
`python scripts/converters/<converter>.py` and load with `importlib` from their path alike.
"""

import math
import re
import sys
from pathlib import Path

import torch

# The keys a training checkpoint keeps its state dict under (the first one present is taken).
WRAPPERS = ("state_dict", "model", "state_dict_ema")


def load_state_dict(path: Path, why_not_plain: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file: safetensors, or a `torch.save`d state dict (loaded with `weights_only=True`,
    so no code runs), unwrapped from a training checkpoint's `{"state_dict" | "model" | "state_dict_ema": ...}` and
    without DataParallel's `module.` prefix. A pickled module (not a plain state dict) is a `ValueError`;
    `why_not_plain` says where such files come from."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(
                f"{path} is not a plain state dict{why_not_plain}: load it where the code that saved it is importable "
                f"and save `model.state_dict()` instead ({str(error).splitlines()[0]})."
            ) from error
        for wrapper in WRAPPERS:
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    return {k.removeprefix("module."): v for k, v in state.items()}


def rename(key: str, renames: list[tuple[str, str]]) -> str | None:
    """`key` renamed by the first `(pattern, replacement)` whose pattern matches its start, or None."""
    for pattern, replacement in renames:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def indices(state: dict, pattern: str) -> list[int]:
    """The sorted distinct numbers that `pattern`'s first group matches at the start of the keys (block indices)."""
    return sorted({int(m.group(1)) for key in state if (m := re.match(pattern, key))})


def square_side(count: int, what: str) -> int:
    """The side of a square patch grid of `count` patches; `what` (the tensor that counts them) names the error."""
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"{what} has {count} patches, not a square patch grid.")
    return side


def load_strictly(model, weights: dict[str, torch.Tensor], absent=()):
    """Load the converted `weights`; a parameter that none of them fills (other than those named in `absent`, e.g. a
    tied output layer) or a weight the model lacks is a `ValueError` naming them."""
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [key for key in missing if key not in absent]
    if missing or unexpected:
        raise ValueError(f"The checkpoint does not match its config: missing {missing}, unexpected {unexpected}.")
    return model


# ---------------------------------------------------------------------- timm checkpoints
def timm_stem(state: dict[str, torch.Tensor]) -> tuple[int, int, int]:
    """(width, image channels, patch size) of a timm `stem.proj` patch convolution, `(d, C, p, p)`."""
    width, channels, patch = state["stem.proj.weight"].shape[:3]
    return width, channels, patch


def add_timm_source_arguments(parser, example: str) -> None:
    """Where the weights come from (a checkpoint file or a timm model: one of the two), the output folder and
    `--verify`."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="timm state dict (.safetensors, .pth, .bin)")
    source.add_argument("--timm-model", help=f"timm model name, e.g. {example} (needs timm)")
    parser.add_argument("--pretrained", action="store_true", help="with --timm-model: timm's pretrained weights")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--verify", action="store_true", help="compare logits with timm on a random image")


def read_timm_source(parser, args):
    """(state dict, the timm model or None) from `--checkpoint` or `--timm-model` (which needs timm)."""
    if args.timm_model:
        import timm

        timm_model = timm.create_model(args.timm_model, pretrained=args.pretrained).eval()
        return timm_model.state_dict(), timm_model
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint not found: {args.checkpoint}")
    return load_state_dict(args.checkpoint), None


def timm_mixer(config, state: dict[str, torch.Tensor], mlp_ratio, **layers):
    """timm's `MlpMixer` of the config's sizes (`layers`: its block and MLP classes), with `state` loaded."""
    from timm.models.mlp_mixer import MlpMixer

    model = MlpMixer(
        num_classes=config.num_labels,
        img_size=config.image_size,
        in_chans=config.num_channels,
        patch_size=config.patch_size,
        num_blocks=config.num_hidden_layers,
        embed_dim=config.hidden_size,
        mlp_ratio=mlp_ratio,
        **layers,
    ).eval()
    model.load_state_dict(state)
    return model


def verify_against_timm(model, timm_model, config, tolerance: float = 1e-4) -> int:
    """0 when the converted model's logits equal timm's on a random image (within `tolerance`), 1 otherwise."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, config.num_channels, config.image_size, config.image_size, generator=generator)
    with torch.no_grad():
        difference = (model(pixel_values=image).logits - timm_model(image)).abs().max().item()
    print(f"verify: max |logits - timm logits| = {difference:.3e}")
    if difference > tolerance:
        print("verify: FAILED: the converted model does not reproduce timm's logits", file=sys.stderr)
        return 1
    return 0
