"""Benchmark the UPQ Triton kernels against torch's bf16 matmul, and INT2 decode end to end (CUDA only).

Kernels: for M in {1, 16, 64, 256, 1024} rows, weights (K x N) 4096x4096, 4096x14336, 14336x4096 and
8192x8192, in INT2 per-row, INT2 group 128 and INT4 group 128, the median time per call of
``upq_kernels.upq_matmul`` and of ``F.linear`` on the bf16 weight. Each measurement replays a CUDA
graph that calls the layer on enough copies of the weight to overrun L2 several times, after an
explicit L2 flush, so that every call reads its weight from memory. Achieved bandwidth (weight,
scale, activation and output bytes per call over the time) is given as a fraction of the copy
bandwidth measured in the same run.

End to end: greedy decode tokens/s of ``generate`` (static cache, ``torch.compile`` with CUDA graphs)
for a random-weight Llama shaped like a 1B model, bf16 against INT2 per-row (round to nearest).
Decode speed is ``(n2 - n1) / (t(n2) - t(n1))`` for two generation lengths, so prefill cancels out.

    python examples/bench_kernels.py [--quick] [--no-e2e] [--out results.json]

The first run on a GPU tunes the kernel configurations (minutes) and saves them under
``~/.cache/upq_hf/``; later runs load them. ``UPQ_AUTOTUNE=0`` runs the default configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from upq_hf.atomic import write_text

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192)]  # (K, N): in_features x out_features
ROWS = [1, 16, 64, 256, 1024]
FORMATS = {"INT2 per-row": (2, None), "INT2 g128": (2, 128), "INT4 g128": (4, 128)}
QUICK_SHAPES = [(4096, 4096), (4096, 14336)]
QUICK_ROWS = [1, 16, 256]
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

def l2_bytes() -> int:
    return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20) or 50 * 2 ** 20


def graph_ms_per_call(calls: list, replays: int, flush: torch.Tensor) -> float:
    """Median milliseconds per call of a CUDA graph that makes all ``calls`` in turn, L2 flushed
    before each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, tuning) must happen outside the capture
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(replays)]
    graph.replay()  # first replay uploads the graph
    for start, end in events:
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / len(calls)


def copy_bandwidth(flush: torch.Tensor, size_bytes: int = 2 ** 30, reps: int = 20) -> float:
    """Bytes per second of a large device-to-device copy (read plus write)."""
    source = torch.empty(size_bytes // 4, dtype=torch.float32, device="cuda").uniform_()
    target = torch.empty_like(source)
    ms = graph_ms_per_call([lambda: target.copy_(source)], reps, flush)
    return 2 * size_bytes / (ms * 1e-3)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

def random_packed_layer(bits: int, group_size: int | None, in_features: int, out_features: int) -> dict:
    """A packed layer with random codes (every bit pattern), scales and zeros, in the stored layout."""
    from upq_hf.packing import packed_shape

    groups = 1 if group_size is None else in_features // group_size
    packed = torch.randint(-2 ** 31, 2 ** 31 - 1, packed_shape(out_features, in_features, bits),
                           dtype=torch.int32, device="cuda")
    scale = (torch.rand(groups, out_features, device="cuda") * 0.01 + 0.001).half()
    zero = torch.randint(0, 16, (groups, out_features), device="cuda").half() if bits == 4 else None
    return dict(packed=packed, scale=scale, zero=zero, bits=bits, group_size=group_size, in_features=in_features)


def layer_bytes(layer: dict) -> int:
    return sum(t.numel() * t.element_size() for t in (layer["packed"], layer["scale"], layer["zero"]) if t is not None)


def bench_kernels(shapes, rows, replays: int, flush: torch.Tensor, copy_bytes_per_s: float) -> list[dict]:
    import upq_kernels
    from upq_kernels.common import PackedWeight

    results = []
    rotate_bytes = 4 * l2_bytes()
    for in_features, out_features in shapes:
        dense_bytes = in_features * out_features * 2
        dense_copies = max(2, math.ceil(rotate_bytes / dense_bytes))
        dense = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(dense_copies)]
        for format_name, (bits, group_size) in FORMATS.items():
            layer = random_packed_layer(bits, group_size, in_features, out_features)
            copies = max(2, min(256, math.ceil(rotate_bytes / layer_bytes(layer))))
            layers = [layer] + [{key: value.clone() if torch.is_tensor(value) else value for key, value in layer.items()}
                                for _ in range(copies - 1)]
            for M in rows:
                x = torch.randn(M, in_features, device="cuda", dtype=torch.bfloat16)
                io_bytes = (M * in_features + M * out_features) * 2
                upq_ms = graph_ms_per_call([lambda layer=layer: upq_kernels.upq_matmul(x, **layer) for layer in layers],
                                           replays, flush)
                dense_ms = graph_ms_per_call([lambda w=w: F.linear(x, w) for w in dense], replays, flush)
                upq_bytes_per_s = (layer_bytes(layer) + io_bytes) / (upq_ms * 1e-3)
                weight = PackedWeight(layer["packed"], layer["scale"], layer["zero"], bits, group_size, in_features)
                row = dict(format=format_name, K=in_features, N=out_features, M=M,
                           variant=upq_kernels.choose_variant(M, weight),
                           upq_us=upq_ms * 1e3, bf16_us=dense_ms * 1e3, speedup=dense_ms / upq_ms,
                           upq_gb_per_s=upq_bytes_per_s / 1e9, copy_bw_fraction=upq_bytes_per_s / copy_bytes_per_s,
                           bf16_gb_per_s=(dense_bytes + io_bytes) / (dense_ms * 1e-3) / 1e9)
                results.append(row)
                print(f"  {format_name:13s} {in_features:>5d}x{out_features:<5d} M={M:<4d} {row['variant']:7s} "
                      f"{row['upq_us']:8.1f} us  bf16 {row['bf16_us']:8.1f} us  x{row['speedup']:.2f}  "
                      f"{100 * row['copy_bw_fraction']:.0f}% of copy BW", flush=True)
            del layers
        del dense
    return results


# ----------------------------------------------------------------------------------------------
# End to end decode
# ----------------------------------------------------------------------------------------------

def decode_tokens_per_second(model, prompt_length: int, short: int, long: int, reps: int) -> float:
    """Greedy decode tokens/s with a static cache and a compiled forward (CUDA graphs)."""
    model.generation_config.cache_implementation = "static"
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, mode="reduce-overhead", dynamic=False)  # transformers' defaults
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_length), device="cuda")

    def generate_seconds(new_tokens: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        output = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                disable_compile=True, pad_token_id=0)
        torch.cuda.synchronize()
        assert output.shape[1] == prompt_length + new_tokens
        return time.perf_counter() - start

    try:
        with torch.no_grad():
            for new_tokens in (short, long, short, long):  # compile, tune, record graphs for both cache sizes
                generate_seconds(new_tokens)
            short_s = statistics.median(generate_seconds(short) for _ in range(reps))
            long_s = statistics.median(generate_seconds(long) for _ in range(reps))
    finally:
        model.forward = eager_forward
        torch._dynamo.reset()
    return (long - short) / (long_s - short_s)


def bench_decode(quick: bool) -> list[dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import upq_hf

    short, long, reps = (16, 48, 2) if quick else (32, 160, 3)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(LlamaConfig(**LLAMA_1B)).to(torch.bfloat16).eval()
    results = []
    bf16_tps = decode_tokens_per_second(model, 32, short, long, reps)
    results.append(dict(model="Llama 1B-shaped, bf16", decode_tokens_per_s=bf16_tps, speedup=1.0))
    print(f"  bf16: {bf16_tps:.1f} tokens/s", flush=True)
    upq_hf.quantize_model(model, upq_hf.UPQConfig(bits=2, group_size=None, recipe="rtn", rtn={"scale_init": "max"}),
                          progress=False)
    model.cuda()
    int2_tps = decode_tokens_per_second(model, 32, short, long, reps)
    results.append(dict(model="Llama 1B-shaped, INT2 per-row", decode_tokens_per_s=int2_tps,
                        speedup=int2_tps / bf16_tps))
    print(f"  INT2 per-row: {int2_tps:.1f} tokens/s (x{int2_tps / bf16_tps:.2f})", flush=True)
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"Device: {report['device']}; torch {report['torch']}, triton {report['triton']}; "
             f"copy bandwidth {report['copy_bandwidth_gb_per_s']:.0f} GB/s", ""]
    if report["kernels"]:
        lines += ["| format | K x N | M | variant | UPQ (us) | bf16 (us) | speed-up | UPQ GB/s | % of copy BW |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['format']} | {r['K']}x{r['N']} | {r['M']} | {r['variant']} | {r['upq_us']:.1f} | "
                  f"{r['bf16_us']:.1f} | {r['speedup']:.2f}x | {r['upq_gb_per_s']:.0f} | "
                  f"{100 * r['copy_bw_fraction']:.0f}% |" for r in report["kernels"]]
        lines.append("")
    if report["decode"]:
        lines += ["| model | decode tokens/s | speed-up |", "|---|---:|---:|"]
        lines += [f"| {r['model']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x |" for r in report["decode"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"shapes {QUICK_SHAPES}, rows {QUICK_ROWS}, short decode")
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode benchmark")
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel sweep")
    parser.add_argument("--replays", type=int, default=20, help="timed graph replays per measurement (median)")
    parser.add_argument("--out", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine. "
              "(The kernels' correctness tests run without one: pytest tests/test_kernels.py.)", file=sys.stderr)
        return 2

    import triton

    flush = torch.empty(2 * l2_bytes(), dtype=torch.uint8, device="cuda")
    copy_bytes_per_s = copy_bandwidth(flush)
    report = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                  copy_bandwidth_gb_per_s=copy_bytes_per_s / 1e9, kernels=[], decode=[])
    print(f"{report['device']}: copy bandwidth {copy_bytes_per_s / 1e9:.0f} GB/s", flush=True)
    if not args.no_kernels:
        report["kernels"] = bench_kernels(QUICK_SHAPES if args.quick else SHAPES, QUICK_ROWS if args.quick else ROWS,
                                          args.replays, flush, copy_bytes_per_s)
    if not args.no_e2e:
        report["decode"] = bench_decode(args.quick)
    print()
    print(markdown(report))
    if args.out:
        write_text(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
