"""Hardware-efficiency mode: achieved FLOP/s of a training step (and of the FFN part alone) as a fraction of this
machine's own measured dense-matmul FLOP/s (the practical ceiling).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` over one forward + backward (matmuls, batched
matmuls, convolutions, SDPA; elementwise work is not counted, so for models that are not matmul-bound the fraction
understates how busy the machine is and mostly shows how little of their time goes to matmuls).
"""

from . import measure, scaling, specs


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(device: str, sizes: list[int], repeats: int = 5) -> dict:
    """Best achieved float32 FLOP/s of square `n x n @ n x n` matmuls over `sizes` (fastest of `repeats` each: the
    practical ceiling, robust to other processes briefly taking the cores)."""
    import torch

    results = []
    for n in sizes:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        measure.time_call(lambda a=a, b=b: a @ b, device)
        times = [measure.time_call(lambda a=a, b=b: a @ b, device) for _ in range(repeats)]
        t = min(times)
        results.append({"n": n, "time_s": round(t, 6), "gflops": round(2 * n**3 / t / 1e9, 2)})
    best = max(results, key=lambda r: r["gflops"])
    return {"dtype": "float32", "per_size": results, "peak_gflops": best["gflops"], "peak_at_n": best["n"]}


def _time_fn(fn, device, repeats, time_target, statistic="median"):
    timing = measure.timed_repeats(fn, device, repeats, time_target, statistic=statistic)
    return timing["time_s"]


def entry_efficiency(
    entry, sizes, length, batch, device, repeats, time_target, peak_gflops, statistic="median"
) -> dict:
    import torch

    torch.manual_seed(0)
    config = specs.level_config(entry, "model", sizes, length=length)
    model = specs.build_model(entry, config, specs.model_head(entry, "model")).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, model.config.vocab_size, (batch, length), device=device)

    def fwd_bwd():
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def train_step():
        fwd_bwd()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    flops = count_flops(fwd_bwd)
    optimizer.zero_grad(set_to_none=True)
    step_s = _time_fn(train_step, device, repeats, time_target, statistic)
    achieved = flops / step_s / 1e9
    row = {
        "status": "ok",
        "length": length,
        "batch": batch,
        "parameters": specs.count_parameters(model),
        "matmul_bound": bool(entry.get("matmul_bound")),
        "step_s": round(step_s, 4),
        "step_gflop": round(flops / 1e9, 3),
        "achieved_gflops": round(achieved, 2),
        "fraction_of_peak": round(achieved / peak_gflops, 3),
        **scaling.dropout_record(model),
    }
    ffn = specs.get_submodule(model, entry.get("ffn_module"))
    if ffn is not None:
        x = torch.randn(batch, length, model.config.hidden_size, device=device, requires_grad=True)

        def ffn_step():
            out = ffn(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().pow(2).mean().backward()
            model.zero_grad(set_to_none=True)
            x.grad = None

        ffn_flops = count_flops(ffn_step)
        ffn_s = _time_fn(ffn_step, device, repeats, time_target, statistic)
        row.update(
            ffn_module=entry["ffn_module"],
            ffn_gflop=round(ffn_flops / 1e9, 3),
            ffn_s=round(ffn_s, 5),
            ffn_achieved_gflops=round(ffn_flops / ffn_s / 1e9, 2),
            ffn_fraction_of_peak=round(ffn_flops / ffn_s / 1e9 / peak_gflops, 3),
        )
    else:
        row["ffn_module"] = None
    return row


def run(
    entries, sizes, length, batch, device, repeats, time_target, matmul_sizes, log=print, statistic="median"
) -> tuple[dict, list[dict]]:
    # The ceiling is measured before and after the models, and the higher figure is used.
    before = matmul_peak(device, matmul_sizes)
    log(f"  hardware: dense float32 matmul peak {before['peak_gflops']} GFLOP/s (n = {before['peak_at_n']})")
    rows = []
    for entry in entries:
        record = {"name": entry["name"], "model_type": entry["model_type"]}
        try:
            record.update(
                entry_efficiency(
                    entry, sizes, length, batch, device, repeats, time_target, before["peak_gflops"], statistic
                )
            )
        except Exception as error:
            record.update(measure.failure(error))
        rows.append(record)
        log(
            f"  hardware {entry['name']:18s} {record['status']:6s} "
            + measure.outcome(
                record,
                lambda r: (
                    f"{r['achieved_gflops']} GFLOP/s = {r['fraction_of_peak']:.0%} of peak"
                    + (f"; FFN {r['ffn_fraction_of_peak']:.0%}" if r.get("ffn_module") else "")
                ),
            )
        )
    after = matmul_peak(device, matmul_sizes)
    log(f"  hardware: dense float32 matmul peak after the models {after['peak_gflops']} GFLOP/s")
    peak = max(before, after, key=lambda p: p["peak_gflops"])
    peak = {**peak, "measured_before_gflops": before["peak_gflops"], "measured_after_gflops": after["peak_gflops"]}
    for row in rows:
        if row["status"] == "ok":
            row["fraction_of_peak"] = round(row["achieved_gflops"] / peak["peak_gflops"], 3)
            if row.get("ffn_module"):
                row["ffn_fraction_of_peak"] = round(row["ffn_achieved_gflops"] / peak["peak_gflops"], 3)
    return peak, rows
