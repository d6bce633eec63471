"""A benchmark helper: run `upq quantize` with upq's INT2 block-wise PTQ result cached on disk, keyed by
everything it depends on, so that distillation variants at one seed share one reconstruction. The cached state is
the whole prepared model after PTQ (pickled); a later run with the same key puts its children into the model in
place and skips the reconstruction. Usage:

    python examples/quantize_shared_ptq.py quantize --bits 2 --recipe upq --seed 0 --config V.json --out DIR
"""
import dataclasses
import hashlib
import json
import os
import sys

import torch

from upq_hf import recipes

CACHE = os.environ.get("UPQ_PTQ_CACHE", "/tmp/ptq-cache")
_real = recipes._ptq


def _key(model, calibration, config, bits, group_size, ptq) -> str:
    weights = sum(float(p.double().sum()) for p in model.parameters())
    what = {"bits": bits, "group_size": group_size, "seed": config.seed, "rotation": config.rotation,
            "mix": config.mix, "module_bits": repr(config.module_bits), "ptq": dataclasses.asdict(ptq or config.ptq),
            "data": config.stages_dict()["data"], "scale_dtype": config.scale_dtype,
            "calibration": [list(calibration.shape), int(calibration.long().sum())], "weights": repr(weights)}
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _cached(model, calibration, config, run, bits, group_size, ptq=None, **options):
    if bits != 2:
        return _real(model, calibration, config, run, bits, group_size, ptq=ptq, **options)
    path = os.path.join(CACHE, _key(model, calibration, config, bits, group_size, ptq) + ".pt")
    if os.path.isfile(path):
        loaded = torch.load(path, weights_only=False)
        for name, child in loaded.named_children():
            setattr(model, name, child)
        print(f"[probe] INT2 PTQ restored from {path}", file=sys.stderr, flush=True)
        return None
    report = _real(model, calibration, config, run, bits, group_size, ptq=ptq, **options)
    os.makedirs(CACHE, exist_ok=True)
    torch.save(model, path + ".tmp")
    os.replace(path + ".tmp", path)
    print(f"[probe] INT2 PTQ kept in {path}", file=sys.stderr, flush=True)
    return report


recipes._ptq = _cached

if __name__ == "__main__":
    from upq_hf.cli import main

    sys.exit(main(sys.argv[1:]))
