"""CPU inference speed of UPQ models: the ``cpu`` backend (torch's INT4 kernel) against the dense model and
against the reference ``torch`` backend (dequantize + matmul, the path before the ``cpu`` backend existed).

    python examples/bench_cpu.py [--threads 2] [--tokens 64] [--runs 5] [--parts decode,layer,prefill,crossover]
                                 [--json out.json]

* decode: greedy decoding of ``--tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``, so every
  model writes the same number) after a chat prompt, with the bundled SmolLM2-135M-Instruct: dense fp32,
  dense bf16, INT2 g64 and INT4 g64 (round to nearest: decode speed does not depend on how the codes were
  found) in bf16 and in fp32 (the rest of each model in the same dtype as the dense model it is compared
  with), and INT2 g64 on the reference backend. Tokens/s = new tokens / wall time of ``generate``
  (prefill of the short prompt included), median of ``--runs`` after one warm-up run.
* layer: a 4096 x 4096 layer, group 64, M = 1 and 8: ``F.linear`` on the bf16 weight against the
  ``UPQLinear`` forward (INT2 and INT4) on the ``cpu`` backend, and the reference backend at M = 1.
* prefill: one forward of a 512-token prompt through the bundled INT2 g64 model (bf16 and fp32):
  ``cpu`` backend (which hands calls of more than ``int4pack.MAX_ROWS`` rows to the reference path),
  reference backend, dense model.
* crossover: kernel against dequantize + matmul per layer shape and row count (where ``MAX_ROWS`` comes from).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def set_backend(model, backend: str | None) -> None:
    from upq_hf import UPQLinear

    for module in model.modules():
        if isinstance(module, UPQLinear):
            module.backend = backend


def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from upq_hf.models import bundled_model_dir

    folder = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, tokenizer


def quantized(dense, bits: int, dtype: torch.dtype, backend: str | None):
    from upq_hf.convert import quantize_linears_rtn

    model = copy.deepcopy(dense)
    quantize_linears_rtn(model, bits, 64, scale_init="max")
    model = model.to(dtype)
    set_backend(model, backend)
    return model


def part_decode(args, dense, tokenizer) -> list[dict]:
    from upq_hf import int4pack

    messages = [{"role": "user", "content": "Write a short poem about the sea."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)

    def tokens_per_s(model, runs):
        with torch.no_grad():
            ms = median_ms(lambda: model.generate(ids, **settings), runs)
        return args.tokens / (ms / 1e3)

    rows = []
    models = [("dense fp32", lambda: dense, args.runs), ("dense bf16", lambda: copy.deepcopy(dense).to(torch.bfloat16), args.runs)]
    for bits in (2, 4):
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            models.append((f"INT{bits} g64 {name}, cpu backend", lambda b=bits, d=dtype: quantized(dense, b, d, "cpu"),
                           args.runs))
    models.append(("INT2 g64 bf16, torch backend (reference)",
                   lambda: quantized(dense, 2, torch.bfloat16, "torch"), max(1, args.runs // 3)))
    for name, build, runs in models:
        model = build()
        start = time.perf_counter()
        repacked = int4pack.prepare(model) if "cpu backend" in name else 0
        prepare_s = time.perf_counter() - start
        tps = tokens_per_s(model, runs)
        rows.append(dict(model=name, tokens_per_s=tps, repack_s=prepare_s, repacked_mib=repacked / 2 ** 20))
        print(f"  {name}: {tps:.1f} tokens/s" + (f" (repack {prepare_s:.2f} s, {repacked / 2**20:.1f} MiB)"
                                                 if repacked else ""), flush=True)
        del model
    by_name = {r["model"]: r["tokens_per_s"] for r in rows}
    for r in rows:
        r["vs_dense_bf16"] = r["tokens_per_s"] / by_name["dense bf16"]
        r["vs_dense_fp32"] = r["tokens_per_s"] / by_name["dense fp32"]
    return rows


def part_layer(args) -> list[dict]:
    from torch import nn

    from upq_hf import UPQLinear

    torch.manual_seed(0)
    K = N = 4096
    linear = nn.Linear(K, N, bias=False)
    dense = linear.weight.detach().to(torch.bfloat16)
    layers = {bits: UPQLinear.from_linear(linear, bits, 64, scale_init="max") for bits in (2, 4)}
    rows = []
    with torch.no_grad():
        for M in (1, 8):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            dense_ms = median_ms(lambda: F.linear(x, dense), 20 * args.runs, warmup=5)
            row = dict(M=M, dense_bf16_ms=dense_ms)
            for bits, layer in layers.items():
                layer.backend = "cpu"
                row[f"int{bits}_cpu_ms"] = median_ms(lambda: layer(x), 20 * args.runs, warmup=5)
                row[f"int{bits}_speedup"] = dense_ms / row[f"int{bits}_cpu_ms"]
            if M == 1:
                layers[2].backend = "torch"
                row["int2_torch_ms"] = median_ms(lambda: layers[2](x), 3)
            rows.append(row)
            print(f"  M={M}: dense bf16 {dense_ms:.2f} ms, INT2 cpu {row['int2_cpu_ms']:.2f} ms "
                  f"(x{row['int2_speedup']:.2f}), INT4 cpu {row['int4_cpu_ms']:.2f} ms (x{row['int4_speedup']:.2f})"
                  + (f", INT2 torch {row['int2_torch_ms']:.1f} ms" if "int2_torch_ms" in row else ""), flush=True)
    return rows


def part_prefill(args, dense, tokenizer) -> list[dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (1, 512))
    rows = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        model = quantized(dense, 2, dtype, None)
        dense_model = copy.deepcopy(dense).to(dtype)
        row = dict(dtype=name)
        with torch.no_grad():
            for backend in ("cpu", "torch"):
                set_backend(model, backend)
                row[f"{backend}_ms"] = median_ms(lambda: model(ids), args.runs)
            row["dense_ms"] = median_ms(lambda: dense_model(ids), args.runs)
        row["cpu_vs_torch"] = row["torch_ms"] / row["cpu_ms"]
        rows.append(row)
        print(f"  {name}: cpu backend {row['cpu_ms']:.0f} ms, torch backend {row['torch_ms']:.0f} ms "
              f"(x{row['cpu_vs_torch']:.2f}), dense {row['dense_ms']:.0f} ms", flush=True)
        del model, dense_model
    return rows


def part_crossover(args) -> list[dict]:
    from torch import nn

    from upq_hf import UPQLinear
    from upq_hf.backends import torch_linear

    rows = []
    with torch.no_grad():
        for K, N in ((576, 576), (576, 1536), (1536, 576), (4096, 4096)):
            layer = UPQLinear.from_linear(nn.Linear(K, N, bias=False), 2, 64, scale_init="max")
            layer.backend = "cpu"
            from upq_hf import int4pack

            pack = int4pack.cached_pack(layer)
            for M in (32, 64, 128, 256, 512):
                x = torch.randn(M, K, dtype=torch.bfloat16)
                runs = args.runs if K * N < 4096 * 4096 else 2
                kernel_ms = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x, pack.packed, pack.group_size, pack.scales_and_zeros), runs)
                reference_ms = median_ms(lambda: torch_linear(x, layer), runs)
                rows.append(dict(K=K, N=N, M=M, kernel_ms=kernel_ms, reference_ms=reference_ms))
                print(f"  {K}x{N} M={M}: kernel {kernel_ms:.2f} ms, dequantize + matmul {reference_ms:.2f} ms", flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"{report['machine']}; torch {report['torch']}, {report['threads']} threads; load average before "
             f"{report['load_before']}, after {report['load_after']}; {report['date']}", ""]
    if "decode" in report:
        lines += [f"Decode, bundled SmolLM2-135M-Instruct, {report['tokens']} greedy tokens:", "",
                  "| model | tokens/s | vs dense bf16 | vs dense fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['tokens_per_s']:.1f} | {r['vs_dense_bf16']:.2f}x | {r['vs_dense_fp32']:.2f}x |"
                  for r in report["decode"]]
        lines.append("")
    if "layer" in report:
        lines += ["Layer 4096 x 4096, group 64, bf16 activations (ms per call):", "",
                  "| M | dense bf16 | INT2 cpu | speed-up | INT4 cpu | speed-up | INT2 torch (reference) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['M']} | {r['dense_bf16_ms']:.2f} | {r['int2_cpu_ms']:.2f} | {r['int2_speedup']:.2f}x | "
                  f"{r['int4_cpu_ms']:.2f} | {r['int4_speedup']:.2f}x | "
                  f"{r['int2_torch_ms']:.1f} |" if "int2_torch_ms" in r else
                  f"| {r['M']} | {r['dense_bf16_ms']:.2f} | {r['int2_cpu_ms']:.2f} | {r['int2_speedup']:.2f}x | "
                  f"{r['int4_cpu_ms']:.2f} | {r['int4_speedup']:.2f}x | - |" for r in report["layer"]]
        lines.append("")
    if "prefill" in report:
        lines += ["Prefill, 512-token prompt, bundled INT2 g64 model (ms per forward):", "",
                  "| model dtype | cpu backend | torch backend (today's path) | cpu vs torch | dense |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['dtype']} | {r['cpu_ms']:.0f} | {r['torch_ms']:.0f} | {r['cpu_vs_torch']:.2f}x | {r['dense_ms']:.0f} |"
                  for r in report["prefill"]]
        lines.append("")
    if "crossover" in report:
        lines += ["Kernel against dequantize + matmul, bf16, INT2 g64 (ms per call):", "",
                  "| K x N | M | kernel | dequantize + matmul |", "|---|---:|---:|---:|"]
        lines += [f"| {r['K']}x{r['N']} | {r['M']} | {r['kernel_ms']:.2f} | {r['reference_ms']:.2f} |"
                  for r in report["crossover"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--parts", default="decode,layer,prefill,crossover")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    report = dict(machine=f"CPU, {os.cpu_count()} cores", torch=torch.__version__, threads=args.threads,
                  tokens=args.tokens, date=time.strftime("%Y-%m-%d %H:%M"),
                  load_before=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    dense = tokenizer = None
    if {"decode", "prefill"} & set(parts):
        dense, tokenizer = bundled()
    for part in parts:
        print(f"== {part}", flush=True)
        if part == "decode":
            report["decode"] = part_decode(args, dense, tokenizer)
        elif part == "layer":
            report["layer"] = part_layer(args)
        elif part == "prefill":
            report["prefill"] = part_prefill(args, dense, tokenizer)
        elif part == "crossover":
            report["crossover"] = part_crossover(args)
        else:
            raise SystemExit(f"unknown part {part!r}")
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
