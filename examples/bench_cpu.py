"""CPU inference speed of UPQ models: the ``cpu`` backend (torch's INT4 kernel) against the dense model and
against the reference ``torch`` backend (dequantize + matmul, the path before the ``cpu`` backend existed).

    python examples/bench_cpu.py [--threads 2] [--tokens 64] [--runs 5] [--json out.json]
                                 [--parts decode,layer,prefill,crossover,profile,floor]

The quantized rows run on each CPU backend this machine has: ``cpu`` (torch's INT4 kernel), ``avx2``
(upq_hf's own kernel, upq_hf/csrc/upq_cpu.c) and ``a8`` (its int8-activation kernel, AVX512-VNNI CPUs; not
exact: opt-in only), and on the automatic choice (``upq_hf.backends.cpu_backend``:
what a user gets without setting a backend).

* decode: greedy decoding of ``--tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``, so every
  model writes the same number) after a chat prompt, with the bundled SmolLM2-135M-Instruct: dense fp32,
  dense bf16, INT2 g64 and INT4 g64 (round to nearest: decode speed does not depend on how the codes were
  found) in bf16 and in fp32 (the rest of each model in the same dtype as the dense model it is compared
  with) on each CPU backend, and INT2 g64 on the reference backend. Tokens/s = new tokens / wall time of ``generate``
  (prefill of the short prompt included); the models run in turn, one generation each per round, for
  ``--runs`` rounds after a warm-up round (so that load from other processes falls on all alike): median and
  best run.
* layer: a 4096 x 4096 layer, group 64, M = 1 and 8: ``F.linear`` on the bf16 weight against the
  ``UPQLinear`` forward (INT2 and INT4) on each CPU backend, and the reference backend at M = 1.
* prefill: one forward of a 512-token prompt through the bundled INT2 g64 model (bf16 and fp32):
  each CPU backend (which hand calls of more than their ``MAX_ROWS`` rows to the reference path),
  reference backend, dense model.
* crossover: kernel against dequantize + matmul per layer shape and row count (where ``MAX_ROWS`` comes from).
* profile (not in the default parts): where decode time goes, per op, dense bf16 against INT2.
* floor (not in the default parts): the decode of ``decode`` with every decoder-block linear layer of the
  dense bf16 model replaced by a stub that returns zeros of the right shape (the output head stays): the
  time per token that no linear-layer kernel can remove (Python, attention, norms, the head), and so the
  highest decode speed-up over dense bf16 that any weight format could reach on this machine.
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


def cpu_backends() -> tuple[str, ...]:
    """The CPU backends timed: torch's INT4 kernel (``cpu``), upq_hf's own AVX2 kernel (``avx2``) and its
    int8-activation kernel (``a8``, AVX512-VNNI; not exact), where each runs on this machine."""
    from upq_hf import avx2, int4pack

    names = tuple(name for name, backend in (("cpu", int4pack), ("avx2", avx2)) if backend.available())
    return names + (("a8",) if avx2.available() and avx2.kernel().a8 else ())


CPU_BACKENDS = cpu_backends()


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


def interleaved_ms(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """Run each callable once per round, in turn, for ``rounds`` rounds (after ``warmup`` rounds), so that
    load from other processes falls on every candidate alike; per callable (median, best) milliseconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}


def decode_prompt(tokenizer, tokens: int):
    """The chat prompt every decode timing starts from, and ``generate``'s settings: exactly ``tokens`` greedy
    new tokens (``min_new_tokens`` = ``max_new_tokens``), so that every model writes the same number."""
    from upq_hf.chat import chat_prompt_ids

    ids = torch.tensor([chat_prompt_ids(tokenizer, "Write a short poem about the sea.")])
    settings = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return ids, settings


def part_decode(args, dense, tokenizer) -> list[dict]:
    from upq_hf import int4pack

    ids, settings = decode_prompt(tokenizer, args.tokens)
    models = {"dense fp32": dense, "dense bf16": copy.deepcopy(dense).to(torch.bfloat16)}
    for backend in CPU_BACKENDS + ("automatic",):
        for bits in (2, 4):
            for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
                models[f"INT{bits} g64 {name}, {backend} backend"] = quantized(
                    dense, bits, dtype, None if backend == "automatic" else backend)
    repack = {}
    for name, model in models.items():
        if not name.endswith(("cpu backend", "automatic backend")):
            continue  # only torch's INT4 kernel (the cpu backend, and the automatic choice's calls to it) repacks
        start = time.perf_counter()
        nbytes = int4pack.prepare(model)
        if nbytes:
            repack[name] = (time.perf_counter() - start, nbytes / 2 ** 20)

    def generate(model):
        return lambda: model.generate(ids, **settings)

    with torch.no_grad():
        timings = interleaved_ms({name: generate(model) for name, model in models.items()}, args.runs)
        reference = quantized(dense, 2, torch.bfloat16, "torch")  # today's path: slow, timed apart, fewer runs
        timings["INT2 g64 bf16, torch backend (reference)"] = interleaved_ms(
            {"reference": generate(reference)}, max(1, args.runs // 3))["reference"]
    rows = []
    for name, (median, best) in timings.items():
        row = dict(model=name, tokens_per_s=args.tokens / (median / 1e3), best_tokens_per_s=args.tokens / (best / 1e3))
        if name in repack:
            row["repack_s"], row["repacked_mib"] = repack[name]
        rows.append(row)
        print(f"  {name}: {row['tokens_per_s']:.1f} tokens/s (best run {row['best_tokens_per_s']:.1f})"
              + (f", repacked in {row['repack_s']:.2f} s, {row['repacked_mib']:.1f} MiB" if name in repack else ""),
              flush=True)
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        for base in ("dense bf16", "dense fp32"):
            key = "vs_" + base.replace(" ", "_")
            r[key] = r["tokens_per_s"] / by_name[base]["tokens_per_s"]
            r["best_" + key] = r["best_tokens_per_s"] / by_name[base]["best_tokens_per_s"]
    return rows


def part_profile(args, dense, tokenizer) -> list[dict]:
    """Where decode time goes: self CPU time per op class during ``--tokens`` greedy tokens (torch.profiler),
    dense bf16 against INT2 g64 bf16 on the cpu backend."""
    from torch.profiler import ProfilerActivity, profile

    ids = tokenizer("Write a short poem about the sea.", return_tensors="pt").input_ids  # plain text, no chat template
    _, settings = decode_prompt(tokenizer, args.tokens)
    rows = []
    for name, model in (("dense bf16", copy.deepcopy(dense).to(torch.bfloat16)),
                        ("INT2 g64 bf16, cpu backend", quantized(dense, 2, torch.bfloat16, "cpu"))):
        with torch.no_grad():
            model.generate(ids, **settings)
            start = time.perf_counter()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                model.generate(ids, **settings)
            wall = time.perf_counter() - start
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        lm_head = sum(e.self_cpu_time_total for e in events if e.key == "aten::mm")  # the only dense mm left in INT2
        linears = sum(e.self_cpu_time_total for e in events if e.key in ("aten::_weight_int4pack_mm_for_cpu",))
        attention = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key)
        row = dict(model=name, wall_ms_per_token=wall * 1e3 / args.tokens,
                   ops_ms_per_token=total / 1e3 / args.tokens, mm_ms_per_token=lm_head / 1e3 / args.tokens,
                   int4pack_ms_per_token=linears / 1e3 / args.tokens,
                   attention_ms_per_token=attention / 1e3 / args.tokens,
                   top=[(e.key, e.self_cpu_time_total / 1e3 / args.tokens, e.count // args.tokens)
                        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]])
        rows.append(row)
        print(f"  {name}: {row['wall_ms_per_token']:.1f} ms/token under the profiler, ops {row['ops_ms_per_token']:.1f}"
              f" (aten::mm {row['mm_ms_per_token']:.1f}, int4pack {row['int4pack_ms_per_token']:.1f}, attention "
              f"{row['attention_ms_per_token']:.1f})", flush=True)
        for key, ms, count in row["top"]:
            print(f"      {key:55s} {ms:7.2f} ms/token  {count} calls/token", flush=True)
        del model
    return rows


class _FreeLinear(torch.nn.Module):
    """A linear layer that costs nothing but its output's allocation (zeros of the right shape)."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def part_floor(args, dense, tokenizer) -> list[dict]:
    from upq_hf.convert import replace_module

    ids, settings = decode_prompt(tokenizer, args.tokens)
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    floor = copy.deepcopy(bf16)
    for name, module in list(floor.named_modules()):
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            replace_module(floor, name, _FreeLinear(module.out_features))
    models = {"dense bf16": bf16, **{f"INT2 g64 bf16, {b} backend": quantized(dense, 2, torch.bfloat16, b)
                                     for b in CPU_BACKENDS}, "dense bf16, decoder linears free": floor}
    with torch.no_grad():
        timings = interleaved_ms({name: (lambda m=m: m.generate(ids, **settings)) for name, m in models.items()},
                                 args.runs)
    per_token = {name: median / args.tokens for name, (median, _) in timings.items()}
    floor_ms = per_token["dense bf16, decoder linears free"]
    rows = [dict(model=name, ms_per_token=ms, linear_ms_per_token=ms - floor_ms,
                 vs_dense_bf16=per_token["dense bf16"] / ms) for name, ms in per_token.items()]
    for r in rows:
        print(f"  {r['model']}: {r['ms_per_token']:.1f} ms/token, of it {r['linear_ms_per_token']:.1f} in decoder "
              f"linears; {r['vs_dense_bf16']:.2f}x dense bf16", flush=True)
    return rows


def part_layer(args) -> list[dict]:
    from torch import nn

    from upq_hf import UPQLinear

    torch.manual_seed(0)
    K = N = 4096
    linear = nn.Linear(K, N, bias=False)
    dense = linear.weight.detach().to(torch.bfloat16)
    layers = {(bits, backend): UPQLinear.from_linear(linear, bits, 64, scale_init="max", backend=backend)
              for backend in CPU_BACKENDS for bits in (2, 4)}
    reference = UPQLinear.from_linear(linear, 2, 64, scale_init="max", backend="torch")
    rows = []
    with torch.no_grad():
        for M in (1, 8):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            calls = {"dense": lambda: F.linear(x, dense)}
            calls.update({f"int{bits}_{backend}": (lambda m=m: m(x)) for (bits, backend), m in layers.items()})
            t = interleaved_ms(calls, 30 * args.runs, warmup=5)
            row = dict(M=M, dense_bf16_ms=t["dense"][0], best_dense_bf16_ms=t["dense"][1])
            for name in calls:
                if name == "dense":
                    continue
                row[f"{name}_ms"], row[f"best_{name}_ms"] = t[name]
                row[f"{name}_speedup"] = row["dense_bf16_ms"] / row[f"{name}_ms"]
                row[f"best_{name}_speedup"] = row["best_dense_bf16_ms"] / row[f"best_{name}_ms"]
            if M == 1:
                row["int2_torch_ms"] = median_ms(lambda: reference(x), 3)
            rows.append(row)
            print(f"  M={M}: dense bf16 {row['dense_bf16_ms']:.2f} ms, " + ", ".join(
                f"{name} {row[f'{name}_ms']:.2f} ms (x{row[f'{name}_speedup']:.2f}; best x{row[f'best_{name}_speedup']:.2f})"
                for name in calls if name != "dense")
                + (f", INT2 torch {row['int2_torch_ms']:.1f} ms" if "int2_torch_ms" in row else ""), flush=True)
    return rows


def part_prefill(args, dense, tokenizer) -> list[dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (1, 512))
    rows = []
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        models = {backend: quantized(dense, 2, dtype, backend) for backend in ("torch",) + CPU_BACKENDS}
        models["dense"] = copy.deepcopy(dense).to(dtype)
        with torch.no_grad():
            t = interleaved_ms({key: (lambda m=m: m(ids)) for key, m in models.items()}, args.runs)
        row = dict(dtype=name)
        for key, (median, best) in t.items():
            row[f"{key}_ms"], row[f"best_{key}_ms"] = median, best
        for backend in CPU_BACKENDS:
            row[f"{backend}_vs_torch"] = row["torch_ms"] / row[f"{backend}_ms"]
            row[f"best_{backend}_vs_torch"] = row["best_torch_ms"] / row[f"best_{backend}_ms"]
        rows.append(row)
        print(f"  {name}: torch backend {row['torch_ms']:.0f} ms, " + ", ".join(
            f"{b} backend {row[f'{b}_ms']:.0f} ms (x{row[f'{b}_vs_torch']:.2f}; best runs x{row[f'best_{b}_vs_torch']:.2f})"
            for b in CPU_BACKENDS) + f", dense {row['dense_ms']:.0f} ms", flush=True)
        del models
    return rows


def part_crossover(args) -> list[dict]:
    from torch import nn

    from upq_hf import UPQLinear, avx2, int4pack
    from upq_hf.backends import torch_linear

    rows = []
    with torch.no_grad():
        for K, N in ((576, 576), (576, 1536), (1536, 576), (4096, 4096)):
            layer = UPQLinear.from_linear(nn.Linear(K, N, bias=False), 2, 64, scale_init="max")
            pack = int4pack.cached_pack(layer) if "cpu" in CPU_BACKENDS else None
            compiled = avx2.kernel()
            for M in (8, 16, 32, 64, 128, 256, 512):
                x = torch.randn(M, K, dtype=torch.bfloat16)
                runs = args.runs if K * N < 4096 * 4096 else 2
                row = dict(K=K, N=N, M=M, reference_ms=median_ms(lambda: torch_linear(x, layer), runs))
                if pack is not None:
                    row["kernel_ms"] = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                        x, pack.packed, pack.group_size, pack.scales_and_zeros), runs)
                if compiled is not None:
                    y = torch.empty(M, N, dtype=x.dtype)

                    def call():
                        compiled.linear(x.data_ptr(), 1, M, K, layer.weight.data_ptr(), N, 2, 64,
                                        layer.weight_scale.data_ptr(), None, 2, None, 0, y.data_ptr(), 1,
                                        torch.get_num_threads())

                    row["avx2_ms"] = median_ms(call, runs)  # on AVX512-BF16 CPUs: the bf16 several-rows kernel
                    if compiled.bf16:  # and its fp32 FMA kernel, as AVX2-only CPUs run it
                        compiled.set_bf16(0)
                        try:
                            row["avx2_fp32fma_ms"] = median_ms(call, runs)
                        finally:
                            compiled.set_bf16(1)
                    if compiled.a8:  # the a8 backend's int8-activation kernel (not exact)
                        row["a8_ms"] = median_ms(lambda: compiled.linear_a8(
                            x.data_ptr(), 1, M, K, layer.weight.data_ptr(), N, 2, 64, layer.weight_scale.data_ptr(),
                            None, 2, None, 0, y.data_ptr(), 1, torch.get_num_threads()), runs)
                rows.append(row)
                print(f"  {K}x{N} M={M}: dequantize + matmul {row['reference_ms']:.2f} ms"
                      + "".join(f", {key[:-3]} {row[key]:.2f} ms" for key in ("kernel_ms", "avx2_ms", "avx2_fp32fma_ms",
                                                                            "a8_ms")
                                if key in row), flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"{report['machine']}; torch {report['torch']}, {report['threads']} threads; load average before "
             f"{report['load_before']}, after {report['load_after']}; {report['date']}", ""]
    if "decode" in report:
        lines += [f"Decode, bundled SmolLM2-135M-Instruct, {report['tokens']} greedy tokens (median of interleaved runs; "
                  "best run in brackets):", "",
                  "| model | tokens/s | vs dense bf16 | vs dense fp32 |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['tokens_per_s']:.1f} ({r['best_tokens_per_s']:.1f}) | "
                  f"{r['vs_dense_bf16']:.2f}x ({r['best_vs_dense_bf16']:.2f}x) | "
                  f"{r['vs_dense_fp32']:.2f}x ({r['best_vs_dense_fp32']:.2f}x) |" for r in report["decode"]]
        lines.append("")
    if "layer" in report:
        names = [f"int{bits}_{backend}" for backend in CPU_BACKENDS for bits in (2, 4)]
        lines += ["Layer 4096 x 4096, group 64, bf16 activations, `UPQLinear` forward (ms per call, median of interleaved "
                  "calls; best call in brackets; speed-up over dense bf16):", "",
                  "| M | dense bf16 | " + " | ".join(f"{n.replace('_', ' ').upper()} | speed-up" for n in names)
                  + " | INT2 torch (reference) |", "|---:|---:|" + "---:|---:|" * len(names) + "---:|"]
        lines += [f"| {r['M']} | {r['dense_bf16_ms']:.2f} ({r['best_dense_bf16_ms']:.2f}) | " + " | ".join(
            f"{r[f'{n}_ms']:.2f} ({r[f'best_{n}_ms']:.2f}) | {r[f'{n}_speedup']:.2f}x ({r[f'best_{n}_speedup']:.2f}x)"
            for n in names) + " | " + (f"{r['int2_torch_ms']:.1f} |" if "int2_torch_ms" in r else "- |")
            for r in report["layer"]]
        lines.append("")
    if "prefill" in report:
        lines += ["Prefill, 512-token prompt, bundled INT2 g64 model (ms per forward, median of interleaved runs; best "
                  "in brackets):", "",
                  "| model dtype | torch backend (reference) | " + " | ".join(
                      f"{b} backend | {b} vs torch" for b in CPU_BACKENDS) + " | dense |",
                  "|---|---:|" + "---:|---:|" * len(CPU_BACKENDS) + "---:|"]
        lines += [f"| {r['dtype']} | {r['torch_ms']:.0f} ({r['best_torch_ms']:.0f}) | " + " | ".join(
            f"{r[f'{b}_ms']:.0f} ({r[f'best_{b}_ms']:.0f}) | {r[f'{b}_vs_torch']:.2f}x ({r[f'best_{b}_vs_torch']:.2f}x)"
            for b in CPU_BACKENDS) + f" | {r['dense_ms']:.0f} ({r['best_dense_ms']:.0f}) |" for r in report["prefill"]]
        lines.append("")
    if "floor" in report:
        lines += ["Decode floor, bundled model, bf16 (ms per token, median of interleaved runs):", "",
                  "| model | ms/token | of it in decoder linears | vs dense bf16 |", "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['ms_per_token']:.1f} | {r['linear_ms_per_token']:.1f} | {r['vs_dense_bf16']:.2f}x |"
                  for r in report["floor"]]
        lines.append("")
    if "crossover" in report:
        lines += ["Kernels against dequantize + matmul, bf16, INT2 g64 (ms per call; `cpu` = torch's INT4 kernel):", "",
                  "| K x N | M | dequantize + matmul | cpu kernel | avx2 kernel | avx2, fp32 FMA kernel | a8 kernel (int8 "
                  "activations) |", "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['K']}x{r['N']} | {r['M']} | {r['reference_ms']:.2f} | "
                  + " | ".join(f"{r[key]:.2f}" if key in r else "-"
                               for key in ("kernel_ms", "avx2_ms", "avx2_fp32fma_ms", "a8_ms"))
                  + " |"
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
    if {"decode", "prefill", "profile", "floor"} & set(parts):
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
        elif part == "profile":
            report["profile"] = part_profile(args, dense, tokenizer)
        elif part == "floor":
            report["floor"] = part_floor(args, dense, tokenizer)
        else:
            raise SystemExit(f"unknown part {part!r}")
    report["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print()
    print(markdown(report))
    if args.json:
        from upq_hf.atomic import write_text

        write_text(args.json, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
