"""The N-gram decoder claim at small scale: BLEU / chrF / loss vs N on the embedded seq2seq task.

Chelba et al. (2020) report that an N-gram masked decoder self-attention "loses very little" BLEU for N in 4..8 on
WMT En-De / En-Fr. Here: the embedded task of `hf_efficient.seq2seq_data` (numbers and ISO dates to English words:
the source carries the information, the target needs local reordering), a small byte-level encoder-decoder, the
same training budget (steps, batch, learning-rate schedule), data order and initialisation seed for every N in
{1, 2, 4, 8, full}; greedy decoding of the held-out test split, scored with corpus BLEU and chrF.

    OMP_NUM_THREADS=1 python scripts/studies/ngram_claim.py                # ~15 minutes on one core
    python scripts/studies/ngram_claim.py --steps 50 --test-size 40 --out /tmp/x   # smoke run

Writes `results.json`, `results.md` (the table) and `bleu_vs_n.png` to `--out` (default `benchmarks/ngram/`).
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hf_efficient.cli.metrics import text_metrics  # noqa: E402
from hf_efficient.models.ngram_transformer import (  # noqa: E402
    NgramTransformerConfig,
    NgramTransformerForConditionalGeneration,
)
from hf_efficient.seq2seq_data import numbers_to_words_dataset  # noqa: E402

BYTE_OFFSET, PAD, EOS = 3, 0, 1  # ByT5 byte ids (hf_efficient.data): byte b -> b + 3, </s> = 1


def encode(texts: list[str]) -> torch.Tensor:
    """Texts -> right-padded byte ids with </s> (what ByT5Tokenizer produces, without its Python overhead)."""
    rows = [list(t.encode()) for t in texts]
    length = max(len(r) for r in rows) + 1
    out = torch.full((len(rows), length), PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r) + 1] = torch.tensor([b + BYTE_OFFSET for b in r] + [EOS])
    return out


def decode(ids: torch.Tensor) -> list[str]:
    texts = []
    for row in ids.tolist():
        data = bytearray()
        for t in row[1:]:  # skip the decoder start token
            if t == EOS:
                break
            if t >= BYTE_OFFSET:
                data.append(t - BYTE_OFFSET)
        texts.append(data.decode("utf-8", errors="replace"))
    return texts


def model_config(ngram_size: int | None, args) -> NgramTransformerConfig:
    return NgramTransformerConfig(
        vocab_size=384,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_encoder_layers=args.layers,
        num_attention_heads=4,
        ngram_size=ngram_size,
        is_encoder_decoder=True,
        hidden_dropout_prob=0.1,
    )


def run(ngram_size: int | None, data, args) -> dict:
    torch.manual_seed(args.seed)
    model = NgramTransformerForConditionalGeneration(model_config(ngram_size, args))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def schedule(step):  # linear warm-up, cosine decay
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    train_sources, train_targets = data["train"]["source"], data["train"]["target"]
    order = torch.randperm(len(train_sources), generator=torch.Generator().manual_seed(args.seed)).tolist()
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(args.steps):
        index = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        source, labels = encode([train_sources[i] for i in index]), encode([train_targets[i] for i in index])
        labels = labels.masked_fill(labels == PAD, -100)
        loss = model(input_ids=source, attention_mask=(source != PAD).long(), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if args.log_every and (step + 1) % args.log_every == 0:
            print(
                f"  N={ngram_size} step {step + 1}: loss {sum(losses[-args.log_every :]) / args.log_every:.3f}",
                flush=True,
            )
    train_seconds = time.perf_counter() - start

    model.eval()
    test = data["test"]
    hypotheses, nll, tokens = [], 0.0, 0
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(test), 100):
            sources, targets = test["source"][i : i + 100], test["target"][i : i + 100]
            source = encode(sources)
            mask = (source != PAD).long()
            labels = encode(targets)
            labels = labels.masked_fill(labels == PAD, -100)
            out = model(input_ids=source, attention_mask=mask, labels=labels)
            count = int((labels != -100).sum())
            nll, tokens = nll + float(out.loss) * count, tokens + count
            generated = model.generate(
                source, attention_mask=mask, max_new_tokens=labels.shape[1] + 8, do_sample=False, num_beams=1
            )
            hypotheses += decode(generated)
    metrics = text_metrics(hypotheses, test["target"])
    return {
        "ngram_size": ngram_size,
        "label": "full" if ngram_size is None else f"N={ngram_size}",
        "receptive_field": None if ngram_size is None else args.layers * (ngram_size - 1) + 1,
        **{k: round(v, 2) for k, v in metrics.items()},
        "test_loss": round(nll / tokens, 4),
        "final_train_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "examples": [
            {"source": s, "reference": r, "output": h}
            for s, r, h in zip(test["source"][:5], test["target"][:5], hypotheses[:5])
        ],
    }


def write_report(results: list[dict], args, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["torch_threads"] = torch.get_num_threads()
    (out / "results.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    full = next((r for r in results if r["ngram_size"] is None), None)
    lines = [
        "| decoder self-attention | receptive field (target bytes) | BLEU | chrF | exact match % | test loss (nats/byte) |"
        + (" BLEU vs full |" if full else ""),
        "|---|---|---|---|---|---|" + ("---|" if full else ""),
    ]
    for r in results:
        field = "all" if r["receptive_field"] is None else str(r["receptive_field"])
        row = f"| {r['label']} | {field} | {r['bleu']:.1f} | {r['chrf']:.1f} | {r['exact_match']:.1f} | {r['test_loss']:.3f} |"
        if full:
            row += f" {r['bleu'] - full['bleu']:+.1f} |"
        lines.append(row)
    note = (
        f"\nEncoder-decoder, d={args.hidden_size}, {args.layers}+{args.layers} layers, byte tokens; {args.steps} steps x "
        f"batch {args.batch_size}, lr {args.lr}, seed {args.seed} for every N; greedy decoding of {args.test_size} test "
        "examples. Produced by `scripts/studies/ngram_claim.py`.\n"
    )
    (out / "results.md").write_text("\n".join(lines) + "\n" + note)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [r["label"] for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(labels, [r["bleu"] for r in results], "o-", label="BLEU")
    ax.plot(labels, [r["chrf"] for r in results], "s--", label="chrF")
    ax.set_xlabel("decoder self-attention window")
    ax.set_ylabel("score (test split)")
    ax.set_title("N-gram decoder: numbers/dates -> English words")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "bleu_vs_n.png", dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngram-sizes", default="1,2,4,8,full", help="comma-separated N values ('full' = None)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=96)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=20_000)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50, help="print the mean training loss every so many steps")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "ngram")
    args = parser.parse_args(argv)
    sizes = [None if s.strip() == "full" else int(s) for s in args.ngram_sizes.split(",")]
    data = numbers_to_words_dataset(train_size=args.train_size, validation_size=100, test_size=args.test_size)
    results = []
    for n in sizes:
        result = run(n, data, args)
        results.append(result)
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}), flush=True)
        write_report(results, args, args.out)
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
