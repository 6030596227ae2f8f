"""AFT (Zhai et al. 2021, "An Attention Free Transformer"): AFT-local and AFT-conv reach about the Transformer's
bits per byte at equal tokens on a byte-level LM; AFT-simple (no position bias) is behind them.

Arms: Llama-SDPA (the Transformer), AFT-local (s = 32), AFT-conv (8 heads, kernel 15), AFT-simple, as declared in
`model_cards/benchmarks/aft.json`, all at the same width, depth and FFN size; the byte LM of the embedded corpus,
the same recipe, data order, seed and token budget for every arm.
"""

from . import tasks
from .runner import Claim, Run

NAME = "aft"
TITLE = "AFT vs a Transformer on the byte LM"
PAPER = "Zhai et al. 2021, An Attention Free Transformer"
VERSION = 1
ARMS = ("llama-sdpa", "aft-local", "aft-conv", "aft-simple")
ARM_LABELS = {
    "llama-sdpa": "Transformer (Llama, SDPA)",
    "aft-local": "AFT-local (s=32)",
    "aft-conv": "AFT-conv (h=8, k=15)",
    "aft-simple": "AFT-simple",
}
METRICS = {
    "lm": [
        ("validation_bpb", "validation bits/byte"),
        ("final_train_bpb", "train bits/byte (last 10%)"),
        ("parameters", "parameters"),
        ("train_s", "train s"),
    ]
}
TOLERANCE = 0.03  # "within a few percent" of the Transformer's bits per byte


def settings(quick: bool) -> dict:
    if quick:
        sizes = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64, vocab_size=384)
        lm = dict(context=64, batch=2, steps=4, lr=2e-3, train_bytes=100_000, validation_blocks=2)
    else:
        sizes = dict(hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=512, vocab_size=384)
        lm = dict(context=256, batch=8, steps=400, lr=2e-3, train_bytes=32_000_000, validation_blocks=256)
    tokens = lm["steps"] * lm["batch"] * lm["context"]
    description = (
        f"byte LM, d {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, context {lm['context']}, "
        f"{tokens / 1e6:.2g}M tokens per arm"
    )
    return {"description": description, "sizes": sizes, "lm": lm}


def runs(setting: dict, seeds) -> list[Run]:
    config = {"sizes": setting["sizes"], "lm": setting["lm"]}
    return [Run(NAME, arm, seed, task="lm", config=config) for arm in ARMS for seed in seeds]


def make_model(run: Run):
    return tasks.build(run.arm, run.config["sizes"], length=run.config["lm"]["context"])


def execute(run: Run) -> dict:
    return tasks.lm_run(make_model(run), run.config["lm"], run.seed)


def estimate(run: Run) -> float:
    return tasks.lm_estimate(lambda: make_model(run), run.config["lm"])


def claims(setting: dict) -> list[Claim]:
    hint = "more training tokens (the paper trains enwik8 for 100k+ steps) or more seeds"
    common = dict(paper="AFT (Zhai et al. 2021)", task="lm", metric="validation_bpb", scale_hint=hint)
    return [
        Claim(
            id="aft-local-near-transformer",
            text=f"AFT-local is within {TOLERANCE:.0%} of the Transformer's bits per byte",
            kind="within",
            arm="aft-local",
            baseline="llama-sdpa",
            tolerance=TOLERANCE,
            relative=True,
            **common,
        ),
        Claim(
            id="aft-conv-near-transformer",
            text=f"AFT-conv is within {TOLERANCE:.0%} of the Transformer's bits per byte",
            kind="within",
            arm="aft-conv",
            baseline="llama-sdpa",
            tolerance=TOLERANCE,
            relative=True,
            **common,
        ),
        Claim(
            id="aft-simple-behind-local",
            text="AFT-simple is behind AFT-local",
            kind="better",
            arm="aft-local",
            baseline="aft-simple",
            **common,
        ),
        Claim(
            id="aft-simple-behind-conv",
            text="AFT-simple is behind AFT-conv",
            kind="better",
            arm="aft-conv",
            baseline="aft-simple",
            **common,
        ),
    ]
