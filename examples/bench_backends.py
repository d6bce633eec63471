"""Fidelity of one saved UPQ checkpoint on each CPU inference backend: what the ``a8`` backend's int8 activations
cost against the exact kernels.

    python examples/bench_backends.py out/runs/default-kv4 [--split validation] [--backends torch,avx2,a8]
                                      [--dtype bfloat16] [--json out.json]

The checkpoint loads once; for each backend every ``UPQLinear`` is set to it and the model is scored against the
bundled unquantized model on a split of the held-out prompts: teacher-forced top-1 agreement, KL and JSD on the
teacher's greedy answers, and the model's own greedy answers (not empty, on topic by
:mod:`upq_hf.evaluation.topicality`, and how many are word for word the exact kernel's). Teacher-forced scoring runs
one prompt at a time (at most ~100 rows a call), so every call stays under the kernels' ``MAX_ROWS`` and runs on
the backend measured; answers are generated 8 prompts at a time, as ``upq quantize`` does (prefill then takes the
reference path, each decode step the backend).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import upq_hf
from upq_hf import UPQLinear
from upq_hf.atomic import write_text
from upq_hf.evaluation import FidelityReference, answer_texts, fidelity, topicality
from upq_hf.models import bundled_model_dir, load_model, load_tokenizer
from upq_hf.prompts import REPORT_PROMPTS, VALIDATION_PROMPTS

SPLITS = {"report": REPORT_PROMPTS, "validation": VALIDATION_PROMPTS}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--split", choices=sorted(SPLITS), default="validation")
    parser.add_argument("--backends", default="torch,avx2,a8")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    prompts = list(SPLITS[args.split])
    tokenizer = load_tokenizer(bundled_model_dir())
    teacher = load_model(bundled_model_dir(), dtype="float32").eval()
    reference = FidelityReference.build(teacher, tokenizer, prompts)
    model = load_model(args.checkpoint, dtype=args.dtype).eval()
    layers = [m for m in model.modules() if isinstance(m, UPQLinear)]
    rows = []
    for backend in args.backends.split(","):
        for layer in layers:
            layer.backend = backend
        started = time.perf_counter()
        with torch.no_grad():
            scores = fidelity(model, teacher, reference, batch_size=1)
            texts = answer_texts(model, tokenizer, prompts)
        on_topic = topicality(teacher, tokenizer, prompts, texts)["on_topic"]
        row = dict(backend=backend, top1=scores["top1"], kl=scores["kl"], jsd=scores["jsd"], tokens=scores["tokens"],
                   non_empty=sum(bool(t) for t in texts), on_topic=on_topic, answers=dict(zip(prompts, texts)),
                   seconds=time.perf_counter() - started)
        rows.append(row)
        print(f"  {backend}: top-1 {row['top1']:.4f}, KL {row['kl']:.4f}, JSD {row['jsd']:.4f}, "
              f"{row['non_empty']}/{len(prompts)} not empty, {on_topic}/{len(prompts)} on topic", file=sys.stderr,
              flush=True)
    exact = next((r for name in ("avx2", "torch") for r in rows if r["backend"] == name), None)
    for row in rows:
        if exact is not None:  # the exact kernel's answers (avx2, else the reference)
            row["same_answers_as_exact"] = sum(row["answers"][p] == exact["answers"][p] for p in prompts)
    lines = [f"{args.checkpoint}, {args.split} split ({len(prompts)} prompts, {rows[0]['tokens']} teacher answer "
             f"tokens), {args.dtype}; upq_hf {upq_hf.__version__}, torch {torch.__version__}", "",
             "| backend | top-1 | KL(T‖S) | JSD | not empty | on topic | answers word for word the exact kernel's |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['top1']:.4f} | {r['kl']:.4f} | {r['jsd']:.4f} | {r['non_empty']}/{len(prompts)} | "
              f"{r['on_topic']}/{len(prompts)} | {r.get('same_answers_as_exact', '-')}/{len(prompts)} |" for r in rows]
    print("\n".join(lines))
    if args.json:
        write_text(args.json, json.dumps({"checkpoint": args.checkpoint, "split": args.split, "dtype": args.dtype,
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
