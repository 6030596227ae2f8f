"""Sparse-MLP measurements the shared harness does not take (its `images` mode times every entry of
`model_cards/benchmarks/sparse_mlp.json`; run that for images/s beside ViT):

1. the training step's achieved FLOP/s as a share of this machine's matmul ceiling (a large float32 matmul), for
   each experts implementation, next to the dense Mixer of equal active FLOPs;
2. expert load balance after a short training run on the embedded digits (scikit-learn `load_digits`, 8 x 8,
   upscaled to 16 x 16): the share of units routed to each expert of every MoE layer (top-k choices counted, no
   capacity), over the validation images, in evaluation mode.

    python scripts/benchmarks/bench_sparse_mlp.py --out results/sparse_mlp.json     # about 2 minutes on 2 CPU cores

Active FLOPs are counted as 2 x multiply-accumulates of every linear map and expert matmul actually run (a training
step = 3 x the forward), LayerNorms, activations and routing excluded.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from hf_efficient.models.sparse_mlp import SparseMLPConfig, SparseMLPForImageClassification
from hf_efficient.models.sparse_mlp.modeling_sparse_mlp import SparseMLPMoE

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")


def forward_macs(config: SparseMLPConfig) -> int:
    """Multiply-accumulates per image of one forward (active experts only)."""
    s, c = config.num_patches, config.hidden_size
    macs = s * c * config.num_channels * config.patch_size**2 + c * config.num_labels
    dense = 2 * s * c * config.token_mixing_dim + 2 * s * c * config.channel_mixing_dim
    s2, c2 = config.sparse_patches, config.sparse_channels
    sparse = 2 * (s * c * c2 + c2 * s * s2)  # re-represent in and out
    sparse += c2 * config.token_top_k * 2 * s2 * config.sparse_token_dim  # MoE_S: C' units of size S'
    sparse += s2 * config.channel_top_k * 2 * c2 * config.sparse_channel_dim  # MoE_C: S' units of size C'
    sparse += c2 * s2 * config.num_token_experts + s2 * c2 * config.num_channel_experts  # routers
    num_sparse = config.num_sparse_layers
    return macs + (config.num_hidden_layers - num_sparse) * dense + num_sparse * sparse


def matmul_ceiling(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def time_train_step(model, batch: int, repeats: int) -> float:
    c = model.config
    pixels = torch.randn(batch, c.num_channels, c.image_size, c.image_size)
    labels = torch.randint(0, c.num_labels, (batch,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        model(pixel_values=pixels, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:  # the first step warms up
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def hardware_share(sizes: dict, batch: int, repeats: int) -> list[dict]:
    ceiling = matmul_ceiling()
    sparse = SparseMLPConfig(**sizes)
    target = (forward_macs(sparse) - forward_macs(SparseMLPConfig(**{**sizes, "num_sparse_layers": 0}))) // (
        sparse.num_hidden_layers
    )
    matched = sparse.channel_mixing_dim + target // (2 * sparse.num_patches * sparse.hidden_size)
    rows = []
    variants = [(f"sparse-mlp ({impl})", {"experts_implementation": impl}) for impl in IMPLEMENTATIONS]
    variants.append(("mixer (equal active FLOPs)", {"num_sparse_layers": 0, "channel_mixing_dim": matched}))
    for name, overrides in variants:
        config = SparseMLPConfig(**{**sizes, **overrides})
        torch.manual_seed(0)
        model = SparseMLPForImageClassification(config)
        # batched_mm gathers a (h, d) weight matrix per (unit, expert) pair: ~100x slower here, so 1 image, 1 repeat
        slow = overrides.get("experts_implementation") == "batched_mm"
        images = 1 if slow else batch
        step = time_train_step(model, images, 1 if slow else repeats)
        flops = 3 * 2 * forward_macs(config) * images
        rows.append(
            {
                "name": name,
                "batch": images,
                "parameters": sum(p.numel() for p in model.parameters()),
                "active_gflop_per_image_forward": round(2 * forward_macs(config) / 1e9, 3),
                "train_images_per_s": round(images / step, 2),
                "train_gflop_per_s": round(flops / step / 1e9, 2),
                "share_of_matmul_ceiling": round(flops / step / ceiling, 3),
            }
        )
        print(rows[-1])
    return [{"matmul_ceiling_gflop_per_s": round(ceiling / 1e9, 1)}, *rows]


def digits_load_balance(steps: int, seed: int = 0) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 8.0 - 1.0  # [0, 16] -> [-1, 1]
    images = torch.nn.functional.interpolate(images[:, None], size=16, mode="nearest").expand(-1, 3, -1, -1)
    labels = torch.tensor(digits.target)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=generator)
    train, val = order[:1500], order[1500:]
    config = SparseMLPConfig(
        image_size=16,
        patch_size=2,
        num_channels=3,
        hidden_size=64,
        token_mixing_dim=32,
        channel_mixing_dim=128,
        num_hidden_layers=4,
        num_sparse_layers=2,
        num_token_experts=4,
        num_channel_experts=4,
        num_labels=10,
        experts_implementation="eager",
    )
    torch.manual_seed(seed)
    model = SparseMLPForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    model.train()
    aux = []
    start = time.perf_counter()
    for _ in range(steps):
        batch = train[torch.randint(0, len(train), (64,), generator=generator)]
        out = model(pixel_values=images[batch], labels=labels[batch])
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        aux.append(float(out.aux_loss.detach()))
    train_s = time.perf_counter() - start
    model.eval()
    moes = [m for m in model.modules() if isinstance(m, SparseMLPMoE)]
    with torch.no_grad():
        out = model(pixel_values=images[val], output_router_logits=True)
    accuracy = float((out.logits.argmax(-1) == labels[val]).float().mean())
    layers = []
    for index, (moe, logits) in enumerate(zip(moes, out.router_logits)):
        chosen = logits.float().softmax(-1).topk(moe.top_k, dim=-1).indices.reshape(-1)
        share = torch.bincount(chosen, minlength=moe.num_experts).float() / chosen.numel()
        layers.append(
            {
                "layer": f"block {config.num_hidden_layers - config.num_sparse_layers + index // 2} "
                + ("MoE_S (channel rows)" if index % 2 == 0 else "MoE_C (patches)"),
                "units": logits.shape[0],
                "top_k": moe.top_k,
                "share_per_expert": [round(float(x), 3) for x in share],
                "max_over_uniform": round(float(share.max()) * moe.num_experts, 2),
            }
        )
        print(layers[-1])
    return {
        "steps": steps,
        "batch": 64,
        "train_seconds": round(train_s, 1),
        "validation_accuracy": round(accuracy, 4),
        "aux_loss_first_last": [round(aux[0], 4), round(sum(aux[-10:]) / 10, 4)],
        "layers": layers,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=150, help="digits training steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The harness's default image level (width 192, depth 4, D_C 768, 224 px, patch 16), half the blocks sparse.
    sizes = dict(
        image_size=224,
        patch_size=16,
        hidden_size=192,
        token_mixing_dim=96,
        channel_mixing_dim=768,
        num_hidden_layers=4,
        num_sparse_layers=2,
        num_labels=1000,
    )
    results = {
        "threads": args.threads,
        "hardware": hardware_share(sizes, args.batch, args.repeats),
        "digits_load_balance": digits_load_balance(args.steps),
    }
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text if not args.out else f"wrote {args.out}")
    return 0 if math.isfinite(results["digits_load_balance"]["validation_accuracy"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
