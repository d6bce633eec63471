"""One decode row through every UPQ layer of a checkpoint, in turn: the kernel's share of a decode step.

Calls ``torch.ops.upq_cpu.linear`` (the CPU kernel's operator) once per UPQ layer with one random row, exact and
with int8 activations, fp32 and bf16 rows, and prints milliseconds per pass and the rate at which the codes stream.
With the weights bigger than the cache (a 1B-shaped model: 242 MB of codes) it measures the kernel's reads from
memory. ``--blocks`` also times the int8 kernel's former 32-output blocks (``UPQ_CPU_A8_PANELS=0``: the same bits).

    python examples/bench_layer_stack.py /tmp/upq-1b-int2 [--threads 2] [--passes 3] [--blocks]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--blocks", action="store_true", help="also the int8 kernel's 32-output blocks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from upq_hf import UPQLinear, avx2

    if not avx2.has_op():
        raise SystemExit(f"the CPU kernel's operator is not available here: {avx2.unavailable_reason()}")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    layers = [m for m in model.modules() if isinstance(m, UPQLinear)]
    megabytes = sum(m.weight.numel() * 4 for m in layers) / 1e6
    rows = {}

    def one_pass(dtype, a8):
        for m in layers:
            x = rows.setdefault((m.in_features, dtype), torch.randn(1, m.in_features, dtype=dtype))
            torch.ops.upq_cpu.linear(x, m.weight, m.weight_scale, m.weight_zero, m.bias, m.bits,
                                     m.group_size or m.in_features, m.in_features, a8)

    arms = [("exact", False, True), ("int8 activations", True, True)]
    if args.blocks:
        arms.append(("int8 activations, 32-output blocks", True, False))
    print(f"{len(layers)} layers, {megabytes:.0f} MB of codes, {args.threads} threads\n")
    print("| kernel | row dtype | ms a pass | GB/s of codes |\n|---|---|---:|---:|")
    for name, a8, panels in arms:
        avx2.set_a8_panels(panels)
        for dtype in (torch.float32, torch.bfloat16):
            one_pass(dtype, a8)
            started = time.perf_counter()
            for _ in range(args.passes):
                one_pass(dtype, a8)
            ms = (time.perf_counter() - started) / args.passes * 1e3
            print(f"| {name} | {str(dtype).split('.')[-1]} | {ms:.1f} | {megabytes / ms:.1f} |", flush=True)
    avx2.set_a8_panels(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
