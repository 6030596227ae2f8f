"""gMLP / aMLP (Liu et al. 2021, "Pay Attention to MLPs"): on masked-LM pretraining, gMLP reaches about the
perplexity of a Transformer encoder of the same size, and aMLP (gMLP plus a tiny single-head attention) is better
than gMLP.

Arms: transformers' BERT (SDPA; post-LN, learned positions, GELU FFN of 4 d), gMLP and aMLP (tiny attention 64) as
declared in `model_cards/benchmarks/gmlp.json` in their bidirectional masked-LM form. gMLP's d_ffn = 2 x the FFN
size gives its channel projections (1.5 d d_ffn = 12 d^2) the parameters of a BERT layer (4 d^2 + 2 d 4d = 12 d^2);
its spatial matrix adds n^2 per layer. The byte corpus in windows of `context` bytes, BERT's masking (15%: 80% mask
token, 10% random byte, 10% kept), the same windows and masks for every arm; validation: one fixed masking of the
validation blocks, perplexity per masked byte.
"""

from . import tasks
from .runner import Claim, Run

NAME = "gmlp"
TITLE = "gMLP and aMLP vs a Transformer encoder on masked-LM perplexity"
PAPER = "Liu et al. 2021, Pay Attention to MLPs"
VERSION = 1
ARMS = ("bert-sdpa", "gmlp", "amlp")
ARM_LABELS = {"bert-sdpa": "Transformer encoder (BERT, SDPA)", "gmlp": "gMLP", "amlp": "aMLP (tiny attention 64)"}
METRICS = {
    "mlm": [
        ("validation_ppl", "validation perplexity (per masked byte)"),
        ("validation_bits", "bits per masked byte"),
        ("parameters", "parameters"),
        ("train_s", "train s"),
    ]
}
TOLERANCE = 0.05  # "about equal": within 5% of the encoder's perplexity, either way


def settings(quick: bool) -> dict:
    if quick:
        sizes = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64, vocab_size=384)
        mlm = dict(context=32, batch=4, steps=4, lr=1e-3, train_bytes=100_000, validation_blocks=4)
    else:
        sizes = dict(hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=512, vocab_size=384)
        mlm = dict(context=128, batch=16, steps=300, lr=1e-3, train_bytes=32_000_000, validation_blocks=256)
    tokens = mlm["steps"] * mlm["batch"] * mlm["context"]
    description = (
        f"masked byte LM, d {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, context {mlm['context']}, "
        f"{tokens / 1e6:.2g}M tokens per arm"
    )
    return {"description": description, "sizes": sizes, "mlm": mlm}


def runs(setting: dict, seeds) -> list[Run]:
    config = {"sizes": setting["sizes"], "mlm": setting["mlm"]}
    return [Run(NAME, arm, seed, task="mlm", config=config) for arm in ARMS for seed in seeds]


def make_model(run: Run):
    overrides = {} if run.arm == "bert-sdpa" else {"causal": False}
    context = run.config["mlm"]["context"]
    return tasks.build(run.arm, run.config["sizes"], length=context, head="AutoModelForMaskedLM", **overrides)


def _batches(setting: dict, seed: int):
    train_ids, _ = tasks.corpus(setting["context"], setting["train_bytes"], setting["validation_blocks"])
    return tasks.mlm_batches(train_ids, setting["context"], setting["batch"], seed)


def execute(run: Run) -> dict:
    setting = run.config["mlm"]
    model = make_model(run)
    result = tasks.fit(model, _batches(setting, run.seed), setting["steps"], setting["lr"])
    _, val_blocks = tasks.corpus(setting["context"], setting["train_bytes"], setting["validation_blocks"])
    return {
        **tasks.mlm_evaluate(model, val_blocks),
        "final_train_loss": round(tasks.tail_mean(result["losses"]), 5),
        "parameters": tasks.parameters(model),
        "tokens": setting["steps"] * setting["batch"] * setting["context"],
        "train_s": round(result["train_s"], 2),
        "loss_curve": tasks.curve(result["losses"]),
    }


def estimate(run: Run) -> float:
    setting = run.config["mlm"]
    per_step = tasks.estimate_seconds_per_step(lambda: make_model(run), _batches(setting, 0), setting["lr"])
    return per_step * (setting["steps"] + setting["validation_blocks"] / setting["batch"] / 3)


def claims(setting: dict) -> list[Claim]:
    common = dict(
        paper="gMLP (Liu et al. 2021)",
        task="mlm",
        metric="validation_ppl",
        scale_hint="a longer pretraining budget (the paper: 125k+ steps of BERT-base size) or more seeds",
    )
    return [
        Claim(
            id="gmlp-matches-transformer",
            text=f"gMLP's masked-LM perplexity is about the Transformer encoder's (within {TOLERANCE:.0%})",
            kind="match",
            arm="gmlp",
            baseline="bert-sdpa",
            tolerance=TOLERANCE,
            relative=True,
            **common,
        ),
        Claim(
            id="amlp-better-than-gmlp",
            text="aMLP is better than gMLP",
            kind="better",
            arm="amlp",
            baseline="gmlp",
            **common,
        ),
    ]
