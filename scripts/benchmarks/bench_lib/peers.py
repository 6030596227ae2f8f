"""Peers mode: our implementation vs the public PyPI ones, same config and input, timed pair by pair (A/B
alternation, medians), reported as our time / their time.

Pairs: `aft-pytorch` (AFT-full, AFT-simple, AFT-local token mixers; bidirectional, its only mode), `g-mlp-pytorch` (gMLP and aMLP causal LMs), timm's gMLP
(vision; run in `--timm-python`, where timm and a matching torchvision import, beside our model in the same process).
A peer that is not installed is skipped with the reason recorded.
"""

import functools
import importlib
import importlib.util
import json
import statistics
import subprocess
import sys

from . import measure, specs


def alternate(fn_a, fn_b, device: str, repeats: int, warmup: int = 1) -> dict:
    """Time `fn_a` and `fn_b` alternately (A B A B ...) after a warm-up of each; medians and the ratio A / B."""
    for _ in range(warmup):
        measure.time_call(fn_a, device)
        measure.time_call(fn_b, device)
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(measure.time_call(fn_a, device))
        times_b.append(measure.time_call(fn_b, device))
    ours, theirs = statistics.median(times_a), statistics.median(times_b)
    return {
        "ours_s": round(ours, 5),
        "theirs_s": round(theirs, 5),
        "ratio": round(ours / theirs, 3) if theirs > 0 else None,
        "ours_all_s": [round(t, 5) for t in times_a],
        "theirs_all_s": [round(t, 5) for t in times_b],
    }


def _loss(output):
    return output.float().pow(2).mean()


def _module_step(module, x):
    _loss(module(x)).backward()
    module.zero_grad(set_to_none=True)


def _aft_ours_step(layer, x, start):
    _loss(layer(x, causal=False, start=start)[0]).backward()
    layer.zero_grad(set_to_none=True)


def _hf_lm_step(model, ids):
    model(input_ids=ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)


def _logits_lm_step(model, ids):
    import torch.nn.functional as F

    logits = model(ids)
    F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)


def _missing(package: str) -> str | None:
    return None if importlib.util.find_spec(package) is not None else f"{package} is not installed"


def _aft_pairs(d, lengths, batch, device, repeats):
    import torch

    reason = _missing("aft_pytorch")
    if reason is None:
        try:
            import hf_efficient

            AFTConfig = hf_efficient.get_config_class("aft")
            AFTLayer = importlib.import_module(specs_module("aft", "modeling_aft")).AFTLayer
        except Exception as error:
            reason = f"hf_efficient's AFT is not available: {type(error).__name__}: {error}"
    rows = []
    variants = [
        ("aft-full (full L x L w)", "full", {"position_bias_dim": None}, "AFTFull"),
        ("aft-simple", "simple", {}, "AFTSimple"),
        ("aft-local (s=32, full L x L w)", "local", {"position_bias_dim": None, "local_window": 32}, "AFTLocal"),
    ]
    for length in lengths:
        for label, aft_type, extra, peer_class in variants:
            row = {
                "pair": label,
                "peer": f"aft-pytorch {peer_class}",
                "length": length,
                "batch": batch,
                "hidden_size": d,
            }
            if reason:
                rows.append({**row, "status": "skipped", "reason": reason})
                continue
            try:
                import aft_pytorch

                torch.manual_seed(0)
                config = AFTConfig(
                    hidden_size=d, aft_type=aft_type, max_position_embeddings=length, causal=False, **extra
                )
                ours = AFTLayer(config).to(device)
                kwargs = {"s": extra["local_window"]} if aft_type == "local" else {}
                theirs = getattr(aft_pytorch, peer_class)(max_seqlen=length, dim=d, hidden_dim=d, **kwargs).to(device)
                x = torch.randn(batch, length, d, device=device)
                start = torch.zeros(1, dtype=torch.long, device=device)

                run_ours = functools.partial(_aft_ours_step, ours, x, start)
                run_theirs = functools.partial(_module_step, theirs, x)
                with torch.no_grad():
                    finite = bool(torch.isfinite(theirs(x)).all())
                rows.append(
                    {
                        **row,
                        "status": "ok",
                        **alternate(run_ours, run_theirs, device, repeats),
                        "peer_output_finite": finite,
                    }
                )
            except Exception as error:
                rows.append({**row, "status": "error", "error": f"{type(error).__name__}: {error}"[:400]})
    return rows


def specs_module(arch: str, module: str) -> str:
    import hf_efficient

    if arch not in hf_efficient.ARCHITECTURES:
        raise ModuleNotFoundError(f"architecture {arch!r} is not registered")
    return f"hf_efficient.models.{hf_efficient.ARCHITECTURES[arch]}.{module}"


def _gmlp_pairs(d, depth, lengths, batch, device, repeats):
    import torch

    reason = _missing("g_mlp_pytorch")
    rows = []
    for length in lengths:
        for label, attn in (("gmlp-lm (causal)", None), ("amlp-lm (causal, attn 64)", 64)):
            ff_mult = 4
            row = {
                "pair": label,
                "peer": "g-mlp-pytorch gMLP",
                "length": length,
                "batch": batch,
                "hidden_size": d,
                "depth": depth,
            }
            if reason:
                rows.append({**row, "status": "skipped", "reason": reason})
                continue
            try:
                from g_mlp_pytorch import gMLP

                from hf_efficient.models.gmlp import GMLPConfig, GMLPForCausalLM

                torch.manual_seed(0)
                ours = GMLPForCausalLM(
                    GMLPConfig(
                        vocab_size=384,
                        hidden_size=d,
                        intermediate_size=d * ff_mult,
                        num_hidden_layers=depth,
                        max_position_embeddings=length,
                        causal=True,
                        tiny_attn_size=attn,
                    )
                ).to(device)
                theirs = gMLP(
                    num_tokens=384, dim=d, depth=depth, seq_len=length, ff_mult=ff_mult, causal=True, attn_dim=attn
                )
                theirs = theirs.to(device)
                ids = torch.randint(3, 384, (batch, length), device=device)
                row["ours_parameters"] = specs.count_parameters(ours)
                row["theirs_parameters"] = specs.count_parameters(theirs)

                run_ours = functools.partial(_hf_lm_step, ours, ids)
                run_theirs = functools.partial(_logits_lm_step, theirs, ids)
                rows.append({**row, "status": "ok", **alternate(run_ours, run_theirs, device, repeats)})
            except Exception as error:
                rows.append({**row, "status": "error", "error": f"{type(error).__name__}: {error}"[:400]})
    return rows


TIMM_WORKER = r"""
import json, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import torch, timm, transformers
from transformers import AutoConfig, AutoModelForImageClassification
import hf_efficient  # registers the model types with the Auto classes
args = json.loads(sys.argv[2])
torch.set_num_threads(args["threads"]) if args["threads"] else None
device = args["device"]
def timed(fn):
    if device.startswith("cuda"): torch.cuda.synchronize()
    t = time.perf_counter(); fn()
    if device.startswith("cuda"): torch.cuda.synchronize()
    return time.perf_counter() - t
def medians(fa, fb):
    timed(fa); timed(fb)  # warm-up
    a, b = [], []
    for _ in range(args["repeats"]):  # alternated A/B
        a.append(timed(fa)); b.append(timed(fb))
    return a, b
rows = []
for spec in args["models"]:
    # "timm_name" pairs timm's model with our preset of the same name; "timm_name=preset" with another preset (e.g.
    # timm's dense Mixer-B/16 as the peer of our Sparse-MLP-B/16).
    name, _, preset = spec.partition("=")
    preset = preset or name.replace("_", "-")
    torch.manual_seed(0)
    theirs = timm.create_model(name, pretrained=False, num_classes=1000).to(device)
    config = AutoConfig.from_pretrained(f"{sys.argv[1]}/model_cards/{preset}")
    config.num_labels = 1000
    ours = AutoModelForImageClassification.from_config(config).to(device)
    x = torch.randn(args["batch"], 3, 224, 224, device=device)
    labels = torch.randint(0, 1000, (args["batch"],), device=device)
    def train_ours():
        torch.nn.functional.cross_entropy(ours(pixel_values=x).logits, labels).backward(); ours.zero_grad(set_to_none=True)
    def train_theirs():
        torch.nn.functional.cross_entropy(theirs(x), labels).backward(); theirs.zero_grad(set_to_none=True)
    ours.train(); theirs.train()
    a, b = medians(train_ours, train_theirs)
    ours.eval(); theirs.eval()
    with torch.no_grad():
        ai, bi = medians(lambda: ours(pixel_values=x), lambda: theirs(x))
    rows.append({"pair": f"{preset} (image classifier)", "peer": f"timm {timm.__version__} {name}", "batch": args["batch"],
                 "status": "ok", "ours_s": round(statistics.median(a), 5), "theirs_s": round(statistics.median(b), 5),
                 "ratio": round(statistics.median(a) / statistics.median(b), 3),
                 "ours_all_s": [round(t, 5) for t in a], "theirs_all_s": [round(t, 5) for t in b],
                 "ours_infer_s": round(statistics.median(ai), 5), "theirs_infer_s": round(statistics.median(bi), 5),
                 "infer_ratio": round(statistics.median(ai) / statistics.median(bi), 3),
                 "ours_parameters": sum(p.numel() for p in ours.parameters()),
                 "theirs_parameters": sum(p.numel() for p in theirs.parameters()),
                 "environment": f"torch {torch.__version__}, timm {timm.__version__}, transformers {transformers.__version__} "
                                f"(both models in this one process)"})
print("RESULT " + json.dumps(rows))
"""


def _timm_pairs(timm_python, models, batch, device, repeats, threads, timeout):
    base = {"peer": "timm", "batch": batch}
    python = timm_python
    if python is None:
        if _missing("timm") is None:
            python = sys.executable
        else:
            return [
                {
                    **base,
                    "pair": f"{m} (image classifier)",
                    "status": "skipped",
                    "reason": "timm is not importable here and no --timm-python was given",
                }
                for m in models
            ]
    args = json.dumps({"models": models, "batch": batch, "device": device, "repeats": repeats, "threads": threads})
    try:
        proc = subprocess.run(
            [python, "-c", TIMM_WORKER, str(specs.ROOT), args], capture_output=True, text=True, timeout=timeout
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return [
            {
                **base,
                "pair": f"{m} (image classifier)",
                "status": "error",
                "error": f"{type(error).__name__}: {error}"[:400],
            }
            for m in models
        ]
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            rows = json.loads(line[len("RESULT ") :])
            for row in rows:
                row["python"] = python
            return rows
    return [
        {**base, "pair": f"{m} (image classifier)", "status": "error", "error": (proc.stderr or proc.stdout)[-400:]}
        for m in models
    ]


GROUPS = ("aft", "gmlp", "timm")


def run(
    sizes, lengths, batch, device, repeats, timm_python, timm_models, timm_batch, threads, log=print, groups=GROUPS
) -> list[dict]:
    """The peer pairs of `groups` (`aft`: aft-pytorch, `gmlp`: g-mlp-pytorch, `timm`: timm's vision models)."""
    d = sizes["model"]["hidden_size"]
    depth = sizes["model"]["num_hidden_layers"]
    rows = []
    runners = {
        "aft": lambda: _aft_pairs(d, lengths, batch, device, repeats),
        "gmlp": lambda: _gmlp_pairs(d, depth, lengths, batch, device, repeats),
        "timm": lambda: _timm_pairs(timm_python, timm_models, timm_batch, device, repeats, threads, timeout=1800),
    }
    for group in (runners[name] for name in GROUPS if name in groups):
        for row in group():
            rows.append(row)
            log(
                f"  peers {row['pair']:28s} L={row.get('length', '-')!s:6s} {row['status']:7s} "
                + (
                    f"ours/theirs = {row['ratio']}"
                    if row["status"] == "ok"
                    else row.get("reason") or row.get("error", "")[:120]
                )
            )
    return rows
