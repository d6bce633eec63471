"""Are two UPQ checkpoints the same? Tensor for tensor (bit for bit) and their fidelity reports' numbers.

Used to check that ``upq quantize --stream on`` gives the checkpoint of ``--stream off`` (issue 33), and for any
"did this change move the weights" question. Reads the safetensors files only (no model is built).

    python examples/same_checkpoint.py out/int4-stage/default-s0 out/stream/135m-default-s0

Exit status 0 when every tensor is bit-for-bit equal and the report metrics agree, 1 otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

import torch
from safetensors.torch import load_file


def tensors(folder: str) -> dict[str, torch.Tensor]:
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise SystemExit(f"{folder}: no .safetensors files")
    out: dict[str, torch.Tensor] = {}
    for path in files:
        out.update(load_file(path))
    return out


def report(folder: str) -> dict:
    path = os.path.join(folder, "upq_report.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return json.load(handle)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    args = parser.parse_args()
    a, b = tensors(args.a), tensors(args.b)
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    differ = []
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            differ.append((name, f"{x.dtype}{tuple(x.shape)} against {y.dtype}{tuple(y.shape)}"))
        elif not torch.equal(x, y):
            if x.is_floating_point():
                gap = (x.float() - y.float()).abs().max().item()
                differ.append((name, f"largest difference {gap:.3g}"))
            else:
                differ.append((name, f"{int((x != y).sum())} of {x.numel()} values differ"))
    common = len(set(a) & set(b))
    print(f"{common} tensors in both: {common - len(differ)} bit for bit equal, {len(differ)} differ; "
          f"{len(only_a)} only in {args.a}, {len(only_b)} only in {args.b}")
    for name, why in differ[:20]:
        print(f"  {name}: {why}")
    ra, rb = report(args.a).get("metrics", {}), report(args.b).get("metrics", {})
    same_report = ra == rb
    if ra or rb:
        print(f"report metrics {args.a}: {ra}\nreport metrics {args.b}: {rb}\n"
              f"reports {'equal' if same_report else 'DIFFER'}")
    return 0 if not differ and not only_a and not only_b and same_report else 1


if __name__ == "__main__":
    sys.exit(main())
