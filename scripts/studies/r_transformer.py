"""R-Transformer (Wang et al. 2019, "R-Transformer: Recurrent Neural Network Enhanced Transformer"): better than a
Transformer of equal size and than an LSTM, on pixel-by-pixel image classification and on a byte LM; the ablation
without LocalRNN shows what the LocalRNN adds.

Arms (equal parameter counts, the R-Transformer's): the R-Transformer (GRU LocalRNN, M = 7; the benchmark's entry),
a Transformer (Llama-SDPA, its FFN widened to the R-Transformer's parameter count), an LSTM (2 layers, its width set
to the same count) and the R-Transformer with `num_rnn_layers=0` (no LocalRNN, so no position information but the
causal mask: fewer parameters, by construction). Tasks: the embedded digits (scikit-learn's 8 x 8, the command's
image-cls data) upscaled and read pixel by pixel, row-major (a sequence of `side^2` pixels; every model maps a
pixel's intensity to d by a linear layer and classifies from the last position, as the paper's pixel-MNIST model),
and the byte LM of the embedded corpus.
"""

import torch

from . import tasks
from .runner import Claim, Run

NAME = "r_transformer"
TITLE = "R-Transformer vs a Transformer and an LSTM; its LocalRNN ablation"
PAPER = "Wang et al. 2019, R-Transformer: Recurrent Neural Network Enhanced Transformer"
VERSION = 2  # 2: LM 400 steps (v1: 200, where full attention is still on the byte-statistics plateau)
ARMS = ("r-transformer", "transformer", "lstm", "r-transformer-no-localrnn")
ARM_LABELS = {
    "r-transformer": "R-Transformer (GRU, M=7)",
    "transformer": "Transformer (Llama, SDPA; equal parameters)",
    "lstm": "LSTM (2 layers; equal parameters)",
    "r-transformer-no-localrnn": "R-Transformer without LocalRNN",
}
ENTRY = {"r-transformer": "r-transformer-gru-m7", "r-transformer-no-localrnn": "r-transformer-no-localrnn"}
LSTM_LAYERS = 2
METRICS = {
    "pixels": [
        ("test_accuracy", "test accuracy"),
        ("train_accuracy", "train accuracy"),
        ("parameters", "parameters"),
        ("train_s", "train s"),
    ],
    "lm": [
        ("validation_bpb", "validation bits/byte"),
        ("final_train_bpb", "train bits/byte (last 10%)"),
        ("parameters", "parameters"),
        ("train_s", "train s"),
    ],
}


def settings(quick: bool) -> dict:
    if quick:
        sizes = dict(hidden_size=16, num_hidden_layers=1, num_heads=2, intermediate_size=32, vocab_size=384)
        pixels = dict(side=8, batch=8, steps=3, lr=2e-3)
        lm = dict(context=32, batch=2, steps=3, lr=2e-3, train_bytes=100_000, validation_blocks=2)
    else:
        sizes = dict(hidden_size=64, num_hidden_layers=3, num_heads=4, intermediate_size=256, vocab_size=384)
        pixels = dict(side=16, batch=24, steps=250, lr=2e-3)
        # 400 steps: as the AFT study, where full attention leaves the byte-statistics plateau (2.55 bits per byte)
        lm = dict(context=256, batch=8, steps=400, lr=2e-3, train_bytes=32_000_000, validation_blocks=256)
    matched = {"pixels": _matched(sizes, "pixels", pixels["side"]), "lm": _matched(sizes, "lm", lm["context"])}
    description = (
        f"pixel digits ({pixels['side']}x{pixels['side']} = {pixels['side'] ** 2}-step sequences, "
        f"{pixels['steps'] * pixels['batch'] / 1437:.0f} epochs) and byte LM (context {lm['context']}, "
        f"{lm['steps'] * lm['batch'] * lm['context'] / 1e6:.2g}M tokens), d {sizes['hidden_size']}, "
        f"{sizes['num_hidden_layers']} layers, equal parameters"
    )
    return {"description": description, "sizes": sizes, "pixels": pixels, "lm": lm, "matched": matched}


def runs(setting: dict, seeds) -> list[Run]:
    out = []
    for task in ("pixels", "lm"):
        config = {"sizes": setting["sizes"], task: setting[task], "matched": setting["matched"][task]}
        out += [Run(NAME, arm, seed, task=task, config=config) for arm in ARMS for seed in seeds]
    return out


# ---------------------------------------------------------------------------------------------------------- models
def _pixel_overrides(side: int) -> dict:
    return dict(vocab_size=None, image_size=side, num_channels=1, num_labels=10)


def _r_transformer(arm: str, sizes: dict, task: str, length: int):
    if task == "pixels":
        model = tasks.build(
            ENTRY[arm], sizes, None, head="AutoModelForImageClassification", **_pixel_overrides(length)
        )
        return tasks.Inputs(model, "pixel_values")
    return tasks.build(ENTRY[arm], sizes, None)


def _transformer(sizes: dict, task: str, length: int, intermediate_size: int | None = None):
    extra = {} if intermediate_size is None else {"intermediate_size": intermediate_size}
    if task == "pixels":
        base = tasks.build("llama-sdpa", sizes, length * length, head="AutoModel", vocab_size=1, **extra)
        return tasks.PixelSequenceClassifier(base, sizes["hidden_size"], 1, 10)
    return tasks.build("llama-sdpa", sizes, length, **extra)


def _lstm(sizes: dict, task: str, width: int):
    if task == "pixels":
        return tasks.PixelSequenceClassifier(
            torch.nn.LSTM(width, width, num_layers=LSTM_LAYERS, batch_first=True), width, 1, 10
        )
    return tasks.LSTMLanguageModel(sizes["vocab_size"], width, LSTM_LAYERS)


def _matched(sizes: dict, task: str, length: int) -> dict:
    """The Transformer's FFN width and the LSTM's width that give the R-Transformer's parameter count."""
    target = tasks.parameters(_r_transformer("r-transformer", sizes, task, length))
    base = _transformer(sizes, task, length)
    first = base.config.intermediate_size if task == "lm" else base.backbone.config.intermediate_size
    per_unit = 3 * sizes["hidden_size"] * sizes["num_hidden_layers"]  # SwiGLU: gate, up, down
    ffn = max(1, first + round((target - tasks.parameters(base)) / per_unit))
    if task == "pixels":  # pixel projection (2 h) and classifier (10 h + 10) around the LSTM
        width = tasks.lstm_width(target, LSTM_LAYERS, extra_per_width=12, constant=10)
    else:  # tied byte embedding (vocab h)
        width = tasks.lstm_width(target, LSTM_LAYERS, extra_per_width=sizes["vocab_size"])
    return {"parameters": target, "transformer_intermediate_size": ffn, "lstm_width": width}


def make_model(run: Run):
    sizes, matched = run.config["sizes"], run.config["matched"]
    length = run.config["pixels"]["side"] if run.task == "pixels" else run.config["lm"]["context"]
    if run.arm in ENTRY:
        return _r_transformer(run.arm, sizes, run.task, length)
    if run.arm == "transformer":
        return _transformer(sizes, run.task, length, matched["transformer_intermediate_size"])
    if run.arm == "lstm":
        return _lstm(sizes, run.task, matched["lstm_width"])
    raise ValueError(f"unknown arm {run.arm!r}")


def execute(run: Run) -> dict:
    model = make_model(run)
    if run.task == "lm":
        return tasks.lm_run(model, run.config["lm"], run.seed)
    if not isinstance(model, tasks.Inputs):
        model = tasks.Inputs(model, "pixel_values")
    return tasks.classification_run(model, run.config["pixels"], run.seed)


def estimate(run: Run) -> float:
    if run.task == "lm":
        return tasks.lm_estimate(lambda: make_model(run), run.config["lm"])

    def build():
        model = make_model(run)
        return model if isinstance(model, tasks.Inputs) else tasks.Inputs(model, "pixel_values")

    return tasks.classification_estimate(build, run.config["pixels"])


def claims(setting: dict) -> list[Claim]:
    paper = "R-Transformer (Wang et al. 2019)"
    pixels = dict(
        paper=paper,
        task="pixels",
        metric="test_accuracy",
        higher_is_better=True,
        scale_hint="more epochs (the paper: 100 on 60k MNIST images), a larger image set, or more seeds",
    )
    lm = dict(paper=paper, task="lm", metric="validation_bpb", scale_hint="more training tokens or seeds")
    out = []
    for common, where in ((pixels, "pixel-by-pixel digits"), (lm, "the byte LM")):
        out += [
            Claim(
                id=f"rt-beats-transformer-{common['task']}",
                text=f"R-Transformer is better than a Transformer of equal size on {where}",
                kind="better",
                arm="r-transformer",
                baseline="transformer",
                **common,
            ),
            Claim(
                id=f"rt-beats-lstm-{common['task']}",
                text=f"R-Transformer is better than an LSTM of equal size on {where}",
                kind="better",
                arm="r-transformer",
                baseline="lstm",
                **common,
            ),
            Claim(
                id=f"localrnn-helps-{common['task']}",
                text=f"the LocalRNN helps: R-Transformer is better than without it on {where}",
                kind="better",
                arm="r-transformer",
                baseline="r-transformer-no-localrnn",
                **common,
            ),
        ]
    return out
