"""What one ``UPQLinear`` call costs around its kernel on the CPU: the layer as a module, the kernel through its C++
torch operator (``torch.ops.upq_cpu.linear``), through ``ctypes``, and through the Python custom op that compiled
graphs call where the operator did not build. One decode row, the bundled model's shapes, INT2 g64, median of
``--runs`` rounds of ``--calls`` calls each (microseconds per call).

    python examples/bench_layer_call.py [--threads 1] [--dtype bfloat16] [--calls 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from upq_hf import UPQLinear, avx2

    if not avx2.has_op():
        raise SystemExit(f"the operator is not available here: {avx2._load_op()}")
    dtype = getattr(torch, args.dtype)
    print(f"| K x N | module (automatic backend) | C++ operator | ctypes | Python custom op |\n|---|---:|---:|---:|---:|")
    for k, n in ((576, 192), (576, 576), (576, 1536), (1536, 576)):
        torch.manual_seed(0)
        module = UPQLinear.from_linear(torch.nn.Linear(k, n, bias=False), 2, 64, "mse", torch.float16)
        x = torch.randn(1, 1, k, dtype=dtype)
        call = (x, module.weight, module.weight_scale, module.weight_zero, None, 2, 64, k, False)
        paths = {"module": lambda: module(x), "op": lambda: torch.ops.upq_cpu.linear(*call),
                 "ctypes": lambda: avx2._run(*call), "custom op": lambda: avx2.cpu_linear(*call)}
        results = {}
        with torch.no_grad():
            for name, path in paths.items():
                for _ in range(50):
                    path()
                rounds = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    for _ in range(args.calls):
                        path()
                    rounds.append((time.perf_counter() - started) / args.calls * 1e6)
                results[name] = statistics.median(rounds)
        print(f"| {k} x {n} | " + " | ".join(f"{results[name]:.1f}" for name in paths) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
