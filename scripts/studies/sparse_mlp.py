"""Sparse-MLP (Lou et al. 2021, "Sparse-MLP: A Fully-MLP Architecture with Conditional Computation"): better than a
dense MLP-Mixer at equal active FLOPs, and not worse at equal parameters; the experts' load stays balanced.

Arms (the benchmark's `model_cards/benchmarks/sparse_mlp.json` entries at the sizes below): Sparse-MLP (the last half
of the blocks sparse: 4 experts per MoE layer, top-1 token mixing, top-2 channel mixing, V-MoE's balance loss),
`mixer-equal-active` (a dense Mixer whose channel width gives Sparse-MLP's multiply-accumulates per image) and
`mixer-equal-params` (a dense Mixer whose channel width gives Sparse-MLP's parameter count). Task: the embedded digits
(scikit-learn's 8 x 8, the command's image-cls split) upscaled to `side x side`, one channel; the dense Mixer must stay
below 100% test accuracy (a precondition of the claims). Expert load: the share of routed (unit, choice) pairs each
expert receives on the test split (evaluation mode, no router noise), per MoE layer.
"""

import torch

from hf_efficient.models.sparse_mlp.modeling_sparse_mlp import SparseMLPMoE

from . import tasks
from .runner import Claim, Run

NAME = "sparse_mlp"
TITLE = "Sparse-MLP vs dense MLP-Mixers at equal active FLOPs and at equal parameters"
PAPER = "Lou et al. 2021, Sparse-MLP: A Fully-MLP Architecture with Conditional Computation"
VERSION = 1
ARMS = ("sparse-mlp", "mixer-equal-active", "mixer-equal-params")
ARM_LABELS = {
    "sparse-mlp": "Sparse-MLP (4 experts, top-1 / top-2)",
    "mixer-equal-active": "dense Mixer, equal active FLOPs",
    "mixer-equal-params": "dense Mixer, equal parameters",
}
METRICS = {
    "images": [
        ("test_accuracy", "test accuracy"),
        ("train_accuracy", "train accuracy"),
        ("max_share_ratio", "largest expert share x E"),
        ("parameters", "parameters"),
        ("train_s", "train s"),
    ]
}
EQUAL_PARAMS_TOLERANCE = 0.01  # "not worse": at most 1 accuracy point below
BALANCE_LIMIT = 2.0  # "balanced": no expert gets more than twice the uniform share 1/E


def settings(quick: bool) -> dict:
    if quick:
        image = dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_heads=1,
            intermediate_size=32,
            image_size=8,
            patch_size=2,
            num_channels=1,
            num_labels=10,
        )
        train = dict(side=8, batch=16, steps=4, lr=2e-3)
    else:
        image = dict(
            hidden_size=64,
            num_hidden_layers=4,
            num_heads=1,
            intermediate_size=256,
            image_size=16,
            patch_size=2,
            num_channels=1,
            num_labels=10,
        )
        train = dict(side=16, batch=64, steps=400, lr=2e-3)
    if image["image_size"] != train["side"]:
        raise ValueError("the model's image_size must be the data's side")
    matched = _equal_params_width(image)
    description = (
        f"digits {train['side']}x{train['side']} (patch {image['patch_size']}), C {image['hidden_size']}, "
        f"{image['num_hidden_layers']} blocks ({image['num_hidden_layers'] // 2} sparse), "
        f"{train['steps'] * train['batch'] / 1437:.0f} epochs"
    )
    return {"description": description, "image": image, "train": train, "equal_params_channel_dim": matched}


def runs(setting: dict, seeds) -> list[Run]:
    config = {
        "image": setting["image"],
        "train": setting["train"],
        "equal_params_channel_dim": setting["equal_params_channel_dim"],
    }
    return [Run(NAME, arm, seed, task="images", config=config) for arm in ARMS for seed in seeds]


def _build(name: str, image: dict, **overrides):
    return tasks.build(name, image, None, head="AutoModelForImageClassification", level="image", **overrides)


def _equal_params_width(image: dict) -> int:
    """The dense Mixer's channel width D_C with Sparse-MLP's parameter count (the count is linear in D_C)."""
    target = tasks.parameters(_build("sparse-mlp", image))
    d0, d1 = image["intermediate_size"], 2 * image["intermediate_size"]
    p0 = tasks.parameters(_build("mixer-same-backbone", image, channel_mixing_dim=d0))
    p1 = tasks.parameters(_build("mixer-same-backbone", image, channel_mixing_dim=d1))
    return max(1, round(d0 + (target - p0) * (d1 - d0) / (p1 - p0)))


def make_model(run: Run):
    image = run.config["image"]
    if run.arm == "mixer-equal-params":
        model = _build("mixer-same-backbone", image, channel_mixing_dim=run.config["equal_params_channel_dim"])
    else:
        model = _build(run.arm, image)
    return tasks.Inputs(model, "pixel_values")


def expert_shares(model, x: torch.Tensor, batch: int = 128) -> dict[str, list[float]]:
    """Per MoE layer, the share of the routed (unit, choice) pairs each expert gets on `x` (eval mode: the top-k of
    the noise-free router logits)."""
    counts, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, SparseMLPMoE):
            counts[name] = torch.zeros(module.num_experts)

            def hook(module, _inputs, outputs, name=name):
                chosen = outputs[1].topk(module.top_k, dim=-1).indices.flatten()
                counts[name] += torch.bincount(chosen, minlength=module.num_experts).float()

            hooks.append(module.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch):
                model(input_ids=x[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
    return {name: [round(float(c), 5) for c in count / count.sum()] for name, count in counts.items()}


def execute(run: Run) -> dict:
    model = make_model(run)
    metrics = tasks.classification_run(model, run.config["train"], run.seed)
    shares = expert_shares(model, tasks.digits(run.config["train"]["side"])["test"][0])
    if shares:
        metrics["expert_shares"] = shares
        metrics["max_share_ratio"] = round(max(max(s) * len(s) for s in shares.values()), 5)
    return metrics


def estimate(run: Run) -> float:
    return tasks.classification_estimate(lambda: make_model(run), run.config["train"])


def report(results: dict) -> str:
    rows = [r for r in results["runs"] if "expert_shares" in r["metrics"]]
    if not rows:
        return ""
    lines = [
        "## Expert load (share of routed pairs per expert, test split)",
        "",
        "| seed | MoE layer | shares |",
        "|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["seed"]):
        for layer, shares in r["metrics"]["expert_shares"].items():
            lines.append(f"| {r['seed']} | {layer} | {', '.join(f'{s:.3f}' for s in shares)} |")
    return "\n".join(lines)


def claims(setting: dict) -> list[Claim]:
    common = dict(
        paper="Sparse-MLP (Lou et al. 2021)",
        task="images",
        metric="test_accuracy",
        higher_is_better=True,
        requires=(("mixer-equal-active", "test_accuracy", "<=", 0.999),),
        scale_hint="a harder image task (more classes, less data per class) or more seeds",
    )
    return [
        Claim(
            id="sparse-beats-equal-active",
            text="Sparse-MLP is better than a dense Mixer at equal active FLOPs",
            kind="better",
            arm="sparse-mlp",
            baseline="mixer-equal-active",
            **common,
        ),
        Claim(
            id="sparse-not-worse-equal-params",
            text=f"Sparse-MLP is not worse than a dense Mixer at equal parameters (by more than {EQUAL_PARAMS_TOLERANCE:.0%})",
            kind="within",
            arm="sparse-mlp",
            baseline="mixer-equal-params",
            tolerance=EQUAL_PARAMS_TOLERANCE,
            **common,
        ),
        Claim(
            id="sparse-balanced",
            text=f"the experts' load stays balanced (no expert above {BALANCE_LIMIT:g}x the uniform share)",
            paper="Sparse-MLP (Lou et al. 2021)",
            task="images",
            metric="max_share_ratio",
            kind="at_least",
            arm="sparse-mlp",
            tolerance=BALANCE_LIMIT,
            higher_is_better=False,
            scale_hint="longer training (the balance loss acts over many steps) or more seeds",
        ),
    ]
