"""Combiner (Ren et al. 2021, "Combiner: Full Attention Transformer with Sparse Computation Cost"): Combiner-Fixed
and Combiner-Axial are about as good as full attention, and better than the same model without its span summaries
(local blocks only), on the byte LM and on a task that needs long-range retrieval (the associative-recall probe).

Arms: full attention (Llama-SDPA), Combiner-Fixed, Combiner-Axial (block s = sqrt(L) = 32 at L = 1024, the
benchmark's entries) and Combiner-Fixed with `use_span_summaries=False` (each position attends to its own segment of
s positions only: the local-blocks ablation; Axial without its abstractions is the same model). Two tasks: the byte
LM at context 1024, and the recall probe of the `recall` study (pairs at the start, each key queried once in the last
positions: every answer lies about 1000 positions back, out of reach of a local block).
"""

from . import recall, tasks
from .runner import Claim, Run

NAME = "combiner"
TITLE = "Combiner vs full attention and vs its local-blocks ablation"
PAPER = "Ren et al. 2021, Combiner: Full Attention Transformer with Sparse Computation Cost"
VERSION = 2  # 2: LM 800 steps x 2 (v1: 200 x 4 left every arm on the byte-statistics plateau)
ARMS = ("llama-sdpa", "combiner-fixed", "combiner-axial", "combiner-fixed-nospans")
ARM_LABELS = {
    "llama-sdpa": "full attention (Llama, SDPA)",
    "combiner-fixed": "Combiner-Fixed",
    "combiner-axial": "Combiner-Axial",
    "combiner-fixed-nospans": "no span summaries (local blocks)",
}
METRICS = {
    "lm": [
        ("validation_bpb", "validation bits/byte"),
        ("final_train_bpb", "train bits/byte (last 10%)"),
        ("parameters", "parameters"),
        ("train_s", "train s"),
    ],
    "recall": [("accuracy", "recall accuracy"), ("final_loss", "final train loss"), ("train_s", "train s")],
}
LM_TOLERANCE = 0.03  # "about equal" on the LM: within 3% of full attention's bits per byte, either way
RECALL_TOLERANCE = 0.05  # and within 5 accuracy points on the recall probe


def settings(quick: bool) -> dict:
    if quick:
        sizes = dict(hidden_size=32, num_hidden_layers=1, num_heads=2, intermediate_size=64, vocab_size=384)
        lm = dict(context=64, batch=2, steps=4, lr=2e-3, train_bytes=100_000, validation_blocks=2)
    else:
        sizes = dict(hidden_size=128, num_hidden_layers=4, num_heads=4, intermediate_size=512, vocab_size=384)
        # 800 small steps (1.6M tokens): 200 steps of 4 left full attention at 3.19 bits per byte, on the plateau
        # where no model uses its context yet (`tasks.LM_PLATEAU_BPB`); the claims require it to have left it.
        lm = dict(context=1024, batch=2, steps=800, lr=2e-3, train_bytes=32_000_000, validation_blocks=64)
    probe = recall.probe(quick)
    tokens = lm["steps"] * lm["batch"] * lm["context"]
    description = (
        f"byte LM, d {sizes['hidden_size']}, {sizes['num_hidden_layers']} layers, context {lm['context']}, "
        f"{tokens / 1e6:.2g}M tokens; recall probe at {probe['recall']['length']} ({probe['description']})"
    )
    return {"description": description, "sizes": sizes, "lm": lm, "recall": probe}


def runs(setting: dict, seeds) -> list[Run]:
    lm = {"sizes": setting["sizes"], "lm": setting["lm"]}
    probe = {"sizes": setting["recall"]["sizes"], "recall": setting["recall"]["recall"]}
    return [
        Run(NAME, arm, seed, task=task, config=config)
        for task, config in (("lm", lm), ("recall", probe))
        for arm in ARMS
        for seed in seeds
    ]


def make_model(run: Run):
    length = run.config["lm"]["context"] if run.task == "lm" else run.config["recall"]["length"]
    return tasks.build(run.arm, run.config["sizes"], length=length)


def execute(run: Run) -> dict:
    if run.task == "lm":
        return tasks.lm_run(make_model(run), run.config["lm"], run.seed)
    return tasks.recall_run(make_model(run), run.config["recall"], run.seed)


def estimate(run: Run) -> float:
    if run.task == "lm":
        return tasks.lm_estimate(lambda: make_model(run), run.config["lm"])
    return tasks.recall_estimate(lambda: make_model(run), run.config["recall"])


def claims(setting: dict) -> list[Claim]:
    # Preconditions: comparing how models use long context means nothing until full attention uses it (off the LM's
    # byte-statistics plateau; solving the recall probe).
    lm = dict(
        paper="Combiner (Ren et al. 2021)",
        task="lm",
        metric="validation_bpb",
        requires=(("llama-sdpa", "validation_bpb", "<=", tasks.LM_PLATEAU_BPB),),
        scale_hint="more training tokens or seeds",
    )
    probe = dict(
        paper="Combiner (Ren et al. 2021)",
        task="recall",
        metric="accuracy",
        higher_is_better=True,
        requires=(("llama-sdpa", "accuracy", ">=", recall.THRESHOLD),),
        scale_hint="a longer recall curriculum (more steps at length 1024) or more seeds",
    )
    out = []
    for arm, name in (("combiner-fixed", "Fixed"), ("combiner-axial", "Axial")):
        out += [
            Claim(
                id=f"{arm}-matches-full-lm",
                text=f"Combiner-{name} is about as good as full attention on the byte LM (within {LM_TOLERANCE:.0%})",
                kind="match",
                arm=arm,
                baseline="llama-sdpa",
                tolerance=LM_TOLERANCE,
                relative=True,
                **lm,
            ),
            Claim(
                id=f"{arm}-beats-local-lm",
                text=f"Combiner-{name} is better than its local-blocks ablation on the byte LM",
                kind="better",
                arm=arm,
                baseline="combiner-fixed-nospans",
                **lm,
            ),
            Claim(
                id=f"{arm}-matches-full-recall",
                text=f"Combiner-{name} is about as good as full attention on recall (within {RECALL_TOLERANCE:.2f})",
                kind="match",
                arm=arm,
                baseline="llama-sdpa",
                tolerance=RECALL_TOLERANCE,
                **probe,
            ),
            Claim(
                id=f"{arm}-beats-local-recall",
                text=f"Combiner-{name} is better than its local-blocks ablation on recall",
                kind="better",
                arm=arm,
                baseline="combiner-fixed-nospans",
                **probe,
            ),
        ]
    return out
