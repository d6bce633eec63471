"""Probe: how much would the teacher's own key/value cache for the fixed chat prefix (IntactKV) lift a student?

Every chat prompt of the bundled model starts with the same tokens (the template's default system turn and the
user turn's opening). IntactKV (Liu et al., 2024) keeps the unquantized model's cache for such a prefix and lets
the quantized model attend to it, so the attention sink the quantized model builds badly at position 0 is the
teacher's own. This probe measures the ceiling of that lever on a checkpoint without changing it: teacher-forced
top-1 and KL on the teacher's answers, the student run once as usual and once with the teacher's cache for the
shared prefix (prompts one at a time).

    python examples/probe_intactkv.py out/int4-stage/more-data-rotated-s0 --split validation
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from upq_hf.evaluation import FidelityReference
from upq_hf.evaluation.fidelity import token_divergences
from upq_hf.models import bundled_model_dir, load_model, load_tokenizer
from upq_hf.prompts import REPORT_PROMPTS, VALIDATION_PROMPTS


def shared_prefix(rows: list[list[int]]) -> int:
    length = min(len(r) for r in rows)
    for i in range(length):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return length


@torch.no_grad()
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="validation", choices=["validation", "report"])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prefix", type=int, default=None, help="cached prefix length (default: the shared one)")
    args = parser.parse_args()
    prompts = list(VALIDATION_PROMPTS if args.split == "validation" else REPORT_PROMPTS)
    tokenizer = load_tokenizer(bundled_model_dir())
    teacher = load_model(bundled_model_dir(), dtype="float32").eval()
    reference = FidelityReference.build(teacher, tokenizer, prompts)
    student = load_model(args.checkpoint, dtype=args.dtype).eval()
    width = shared_prefix(reference.prompt_ids) if args.prefix is None else args.prefix
    print(f"shared prefix: {width} tokens: {tokenizer.decode(reference.prompt_ids[0][:width])!r}", flush=True)
    prefix = torch.tensor([reference.prompt_ids[0][:width]])
    cache = teacher(input_ids=prefix, use_cache=True).past_key_values
    dtype = getattr(torch, args.dtype)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)
    sums = {"plain": {"top1": 0.0, "kl": 0.0}, "intact": {"top1": 0.0, "kl": 0.0}}
    count = 0
    for p, a in zip(reference.prompt_ids, reference.answer_ids):
        if not a:
            continue
        seq = torch.tensor([p + a])
        rows = slice(len(p) - 1, len(p) + len(a) - 1)
        t = teacher(input_ids=seq).logits[0, rows].float()
        plain = student(input_ids=seq).logits[0, rows].float()
        intact = student(input_ids=seq[:, width:], past_key_values=copy.deepcopy(cache)).logits[0]
        intact = intact[rows.start - width:rows.stop - width].float()
        for name, logits in (("plain", plain), ("intact", intact)):
            d = token_divergences(t, logits)
            sums[name]["top1"] += float(d["top1"].sum())
            sums[name]["kl"] += float(d["kl"].sum())
        count += len(a)
    out = {name: {k: v / count for k, v in s.items()} for name, s in sums.items()} | {
        "tokens": count, "prefix": width, "checkpoint": args.checkpoint, "split": args.split, "dtype": args.dtype}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
