"""LocalRNN: input projections once per position + M batched recurrence steps ("projected") vs the official form,
`nn.GRU` / `nn.LSTM` / `nn.RNN` over the unfolded `(B L, M, d)` windows ("unfold"); and the 2-layer causal-LM
target against Llama-SDPA of the same size.

    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_localrnn.py localrnn --lengths 1024 4096 --device cpu
    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_localrnn.py target --length 4096
    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_localrnn.py segments --lengths 1024 4096 16384 --rnn-types gru

`segments` (issue 15): the projected LocalRNN's training cost three ways: autograd through the M steps (the
computation before the hand-written backward), the autograd Function in one piece (steps kept from the forward) and
by segments of `--segment` positions (steps recomputed in the backward); forward + backward time and the bytes its
graph keeps for the backward (unique storages seen by `saved_tensors_hooks`, inputs and weights included).

Prints one JSON line per measurement (fastest of `--repeats` timed runs after one warm-up). Times forward and
forward + backward; the FLOP/s of the projected LocalRNN are counted as 2 (L + (M - 1) L) G d^2 multiply-adds per
forward (input projections once, M - 1 hidden-to-hidden steps), against a plain `(B L, d) x (d, G d)` matmul's FLOP/s
on the same machine (the matmul ceiling at this shape).
"""

import argparse
import json
import time

import torch

from hf_efficient.models.r_transformer import RTransformerConfig, RTransformerForCausalLM, ops_r_transformer
from hf_efficient.models.r_transformer.modeling_r_transformer import RTransformerBlock, RTransformerLocalRNN
from hf_efficient.models.r_transformer.ops_r_transformer import GATES


def timed(fn, repeats: int, device: str) -> float:
    """Fastest of `repeats` runs of `fn()` after one warm-up, in seconds (the minimum is the least disturbed by other
    jobs on a shared machine)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_localrnn(args) -> None:
    for length in args.lengths:
        for rnn_type in args.rnn_types:
            config = RTransformerConfig(
                hidden_size=args.hidden_size, rnn_type=rnn_type, local_window=args.window, num_attention_heads=1
            )
            torch.manual_seed(0)
            module = RTransformerLocalRNN(config).to(args.device)
            inputs = torch.randn(args.batch_size, args.window - 1 + length, args.hidden_size, device=args.device)
            grad_inputs = inputs.clone().requires_grad_(True)
            row = {"bench": "localrnn", "rnn_type": rnn_type, "B": args.batch_size, "L": length}
            row.update({"d": args.hidden_size, "M": args.window, "device": args.device})
            for implementation in ("projected", "unfold"):
                module.implementation = implementation
                with torch.no_grad():
                    forward = timed(lambda m=module, x=inputs: m(x), args.repeats, args.device)
                backward = timed(lambda m=module, x=grad_inputs: m(x).sum().backward(), args.repeats, args.device)
                row[f"{implementation}_fwd_ms"] = round(forward * 1e3, 2)
                row[f"{implementation}_fwd_bwd_ms"] = round(backward * 1e3, 2)
            row["speedup_fwd"] = round(row["unfold_fwd_ms"] / row["projected_fwd_ms"], 2)
            row["speedup_fwd_bwd"] = round(row["unfold_fwd_bwd_ms"] / row["projected_fwd_bwd_ms"], 2)
            gates, d, rows = GATES[rnn_type], args.hidden_size, args.batch_size * length
            flops = 2 * (rows + (args.window - 1) * rows) * gates * d * d
            row["projected_gflops"] = round(flops / (row["projected_fwd_ms"] * 1e-3) / 1e9, 2)
            a, w = torch.randn(rows, d, device=args.device), torch.randn(gates * d, d, device=args.device)
            matmul = timed(lambda a=a, w=w: torch.nn.functional.linear(a, w), args.repeats, args.device)
            row["matmul_ceiling_gflops"] = round(2 * rows * gates * d * d / matmul / 1e9, 2)
            print(json.dumps(row), flush=True)


def _kept_bytes(fn) -> tuple[torch.Tensor, int]:
    """`fn()` and the bytes of the distinct storages its autograd graph keeps for the backward."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, sum(storages.values())


def _segment_ways(inputs, weights, rnn_type: str, window: int, segment: int) -> dict:
    """The three ways of computing the projected LocalRNN with autograd, as closures."""
    length, hidden_size = inputs.shape[1] - (window - 1), weights[1].shape[1]

    def autograd_steps():  # the recurrence with autograd recording every step (no Function)
        bias = ops_r_transformer._folded_input_bias(weights[2], weights[3], rnn_type, hidden_size)
        projected = torch.nn.functional.linear(inputs, weights[0], bias)
        return ops_r_transformer._recurrence(
            projected, weights[1], weights[3], rnn_type=rnn_type, window=window, num_out=length, keep=False
        )[0]

    def function(segment_size):
        return lambda: ops_r_transformer.local_rnn(
            inputs, *weights, rnn_type=rnn_type, window=window, segment=segment_size
        )

    return {"autograd": autograd_steps, "one_piece": function(max(length, 1)), "segmented": function(segment)}


def bench_segments(args) -> None:
    modules = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM, "rnn": torch.nn.RNN}
    for length in args.lengths:
        for rnn_type in args.rnn_types:
            torch.manual_seed(0)
            rnn = modules[rnn_type](args.hidden_size, args.hidden_size, batch_first=True).to(args.device)
            weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
            shape = (args.batch_size, args.window - 1 + length, args.hidden_size)
            inputs = torch.randn(*shape, device=args.device, requires_grad=True)
            row = {"bench": "segments", "rnn_type": rnn_type, "B": args.batch_size, "L": length}
            row.update({"d": args.hidden_size, "M": args.window, "segment": args.segment, "device": args.device})
            for name, fn in _segment_ways(inputs, weights, rnn_type, args.window, args.segment).items():
                row[f"{name}_kept_mb"] = round(_kept_bytes(fn)[1] / 2**20, 1)
                step_time = timed(lambda fn=fn: fn().sum().backward(), args.repeats, args.device)
                row[f"{name}_fwd_bwd_ms"] = round(step_time * 1e3, 1)
            print(json.dumps(row), flush=True)


def _sizes(args) -> dict:
    """The model sizes both sides of `target` share."""
    return dict(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
    )


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        **_sizes(args),
        num_key_value_heads=args.heads,
        max_position_embeddings=args.length,
        attn_implementation="sdpa",
        use_cache=False,
    )


def bench_target(args) -> None:
    """2-layer causal LM, d 256, GRU M 7, one LocalRNN per block: forward + backward at `--length` vs Llama-SDPA.

    The R-Transformer runs RTransformerConfig's default dropout (0.1, what users train, as Llama its own defaults),
    and again with its dropout set to 0 (`r_transformer_dropout0`), in the same run."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(
        **_sizes(args),
        local_window=args.window,
        rnn_type="gru",
        num_rnn_layers=1,
        attn_implementation="sdpa",
        use_cache=False,
    )
    rt_config = RTransformerConfig(**common)
    zero = {k: 0.0 for k in ("hidden_dropout_prob", "attention_dropout", "embedding_dropout")}
    ids = torch.randint(3, args.vocab_size, (args.batch_size, args.length), device=args.device)
    results = {}
    models = {
        "r_transformer": RTransformerForCausalLM(rt_config),
        "r_transformer_dropout0": RTransformerForCausalLM(RTransformerConfig(**common, **zero)),
        "llama_sdpa": LlamaForCausalLM(llama_config(args)),
    }
    for name, model in models.items():
        model.to(args.device).train()

        def step(model=model):
            model(input_ids=ids, labels=ids).loss.backward()

        results[name] = timed(step, args.repeats, args.device)
        results[f"{name}_params"] = sum(p.numel() for p in model.parameters())
    # the LocalRNN's share of an R-Transformer block (forward + backward)
    block = RTransformerBlock(rt_config, 0).to(args.device).train()
    x = torch.randn(args.batch_size, args.length, args.hidden_size, device=args.device, requires_grad=True)
    block_time = timed(lambda: block(x)[0].sum().backward(), args.repeats, args.device)
    rnn_layer = block.rnn_layers[0]
    rnn_time = timed(lambda: rnn_layer(x, None, None)[0].sum().backward(), args.repeats, args.device)
    row = {"bench": "target", "B": args.batch_size, "L": args.length, "d": args.hidden_size, "layers": args.layers}
    row.update({"M": args.window, "device": args.device, "threads": torch.get_num_threads()})
    row["dropout"] = {k: getattr(rt_config, k) for k in zero}
    row["r_transformer_fwd_bwd_s"] = round(results["r_transformer"], 3)
    row["r_transformer_dropout0_fwd_bwd_s"] = round(results["r_transformer_dropout0"], 3)
    row["llama_sdpa_fwd_bwd_s"] = round(results["llama_sdpa"], 3)
    row["ratio"] = round(results["r_transformer"] / results["llama_sdpa"], 2)
    row["ratio_dropout0"] = round(results["r_transformer_dropout0"] / results["llama_sdpa"], 2)
    row["params"] = {"r_transformer": results["r_transformer_params"], "llama_sdpa": results["llama_sdpa_params"]}
    row["localrnn_share_of_block"] = round(rnn_time / block_time, 2)
    print(json.dumps(row), flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["localrnn", "target", "segments"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--window", type=int, default=7)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--rnn-types", nargs="+", default=["gru", "lstm", "rnn"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=None)
    parser.add_argument("--vocab-size", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--segment", type=int, default=ops_r_transformer.SEGMENT_POSITIONS)
    args = parser.parse_args(argv)
    {"localrnn": bench_localrnn, "target": bench_target, "segments": bench_segments}[args.mode](args)


if __name__ == "__main__":
    main()
