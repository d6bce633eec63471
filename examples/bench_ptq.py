"""Benchmark block-wise PTQ against round-to-nearest on the bundled SmolLM2-135M-Instruct.

For each format (INT4 g64, INT2 SEQ per-row, INT2 SEQ g64 by default) and each method (RTN with
``scale_init="max"`` and ``"mse"``, block-wise PTQ: Block-AP), a fresh copy of the model is quantized in
its own process, so that the reported peak memory (``ru_maxrss``) is that of quantizing alone
(Python, torch, the float32 model, calibration activations and the optimizer state). Fidelity to the
unquantized model is then measured on the held-out ``EVAL_PROMPTS`` (never used for calibration) with
:func:`upq_hf.evaluation.fidelity`: top-1 next-token agreement and KL(teacher || student) on the teacher's
greedy answers. Calibration is ``upq_hf.data.calibration_data("self", ...)``: the teacher's own answers
to ``SEED_PROMPTS`` (generated once and cached). PTQ: 2 epochs of batch 4, no hold-out, unless flags say otherwise.
No ``lwc`` method nor plain-MSE loss any more: upq_hf keeps Block-AP and the token-relative reconstruction loss.

    python examples/bench_ptq.py                          # everything (about an hour on 2 CPU cores)
    python examples/bench_ptq.py --bits 4 --group-size 64 --algorithm rtn-mse blockap
    python examples/bench_ptq.py --bits 2 --group-size row --algorithm rtn-mse blockap
    python examples/bench_ptq.py --random-1b              # seconds per block of a 1B-shaped Llama (CUDA)

Prints a markdown table; ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import time

import torch

from upq_hf.formats import SUPPORTED_BITS

METHODS = ("rtn-max", "rtn-mse", "blockap")


def _group(value: str):
    return None if value.lower() in ("row", "none", "per-row") else int(value)


def ptq_config(args):
    """The block-wise PTQ settings of the command line, over this benchmark's own defaults (2 epochs of batch 4,
    no hold-out) and ``PTQConfig``'s learning rates."""
    from upq_hf.stages import PTQConfig

    rates = {"learning_rate": args.lr, "scale_learning_rate": args.scale_lr}
    return PTQConfig(epochs=args.epochs or 2, steps=args.steps, batch_size=args.batch_size or 4, holdout=0.0,
                     **{k: v for k, v in rates.items() if v is not None})


def _fmt(bits: int, group_size) -> str:
    return f"INT{bits} " + ("per-row" if group_size is None else f"g{group_size}")


def load_reference(teacher, tokenizer, max_new_tokens: int):
    """The teacher's greedy answers to EVAL_PROMPTS, cached next to the model cache."""
    from upq_hf.evaluation import FidelityReference
    from upq_hf.models import cache_dir
    from upq_hf.prompts import EVAL_PROMPTS

    path = cache_dir() / f"bench_reference_{len(EVAL_PROMPTS)}_{max_new_tokens}.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if data["prompts"] == list(EVAL_PROMPTS):
            return FidelityReference(data["prompts"], data["prompt_ids"], data["answer_ids"])
    ref = FidelityReference.build(teacher, tokenizer, list(EVAL_PROMPTS), max_new_tokens=max_new_tokens,
                                  progress=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompts": ref.prompts, "prompt_ids": ref.prompt_ids, "answer_ids": ref.answer_ids}))
    return ref


def _cpu_seconds() -> float:
    """CPU time of this process (all threads): on a shared machine the honest measure of work done."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_one(job: dict) -> dict:
    """Quantize a fresh model with one method (in a child process) and measure its fidelity."""
    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    from upq_hf import convert
    from upq_hf.evaluation import fidelity
    from upq_hf.models import load_model

    model = load_model(None)
    started = time.perf_counter()
    cpu_started = _cpu_seconds()
    report = None
    if job["method"].startswith("rtn-"):
        convert.quantize_linears_rtn(model, job["bits"], job["group_size"], scale_init=job["method"][4:])
    else:
        from upq_hf.ptq import blockwise_ptq

        report = blockwise_ptq(model, job["input_ids"], job["bits"], job["group_size"], job["ptq"],
                               scale_init=job["scale_init"], progress=job["progress"])
    seconds = time.perf_counter() - started
    cpu_seconds = _cpu_seconds() - cpu_started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    teacher = load_model(None)
    scores = fidelity(model, teacher, job["reference"])
    row = {"format": _fmt(job["bits"], job["group_size"]), "method": job["method"], "top1": scores["top1"],
           "kl": scores["kl"], "jsd": scores["jsd"], "tokens": scores["tokens"], "seconds": seconds,
           "cpu_seconds": cpu_seconds,
           "peak_mib": peak_mib}
    if report is not None:
        row["rtn_loss_sum"] = sum(report.rtn_loss)
        row["ptq_loss_sum"] = sum(report.final_loss)
        row["reverted"] = sum(b.reverted for b in report.blocks)
        row["capture_seconds"] = report.capture_seconds
        row["blocks"] = report.table()
    return row


def bench_model(args) -> None:
    from upq_hf.data import calibration_data
    from upq_hf.models import load_model, load_tokenizer
    from upq_hf.stages import DataConfig

    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(None)
    teacher = load_model(None)
    reference = load_reference(teacher, tokenizer, args.eval_tokens)
    defaults = DataConfig()
    nsamples = args.nsamples or defaults.calibration_samples
    seqlen = args.seqlen or defaults.calibration_seqlen
    input_ids = calibration_data("self", tokenizer, model=teacher, nsamples=nsamples, seqlen=seqlen)
    del teacher

    formats = [(b, g) for b in args.bits for g in args.group_size] if args.bits else \
        [(4, 64), (2, None), (2, 64)]
    ptq = ptq_config(args)
    rows = []
    context = mp.get_context("spawn")
    for bits, group_size in formats:
        for method in args.algorithm:
            job = {"bits": bits, "group_size": group_size, "method": method, "input_ids": input_ids,
                   "reference": reference, "ptq": ptq, "scale_init": args.scale_init or "mse",
                   "threads": args.threads, "progress": args.progress}
            with context.Pool(1) as pool:
                row = pool.apply(run_one, (job,))
            rows.append(row)
            print(f"{row['format']} {method}: top1 {row['top1']:.4f} KL {row['kl']:.4f} "
                  f"{row['seconds']:.1f} s ({row['cpu_seconds']:.1f} CPU s) peak {row['peak_mib']:.0f} MiB", flush=True)
            if "blocks" in row and args.blocks:
                print(row["blocks"], flush=True)

    print(f"\nBundled SmolLM2-135M-Instruct, calibration 'self' {nsamples} x {seqlen}, "
          f"{len(reference.prompts)} held-out EVAL_PROMPTS ({rows[0]['tokens'] if rows else 0} answer tokens), "
          f"{args.threads} CPU threads\n")
    print("| format | method | top-1 | KL(T‖S) | JSD | block loss RTN → PTQ (sum) | wall s | CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        losses = (f"{row['rtn_loss_sum']:.4g} → {row['ptq_loss_sum']:.4g}" if "ptq_loss_sum" in row else "")
        print(f"| {row['format']} | {row['method']} | {row['top1']:.4f} | {row['kl']:.4f} | {row['jsd']:.4f} | "
              f"{losses} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['peak_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "blocks"} for r in rows], f, indent=1)


def bench_random_1b(args) -> None:
    """Seconds per block of block-wise PTQ on a 1B-shaped random Llama (Llama-3.2-1B block shapes)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from upq_hf.ptq import blockwise_ptq

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("--random-1b times PTQ of a 1B-shaped Llama block on CUDA, and no CUDA device is available here. "
              "Run it on a GPU machine, or pass --device cpu to time it on the CPU anyway (slow; use small "
              "--nsamples/--seqlen).")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=args.layers, max_position_embeddings=4096,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()  # stays on the CPU: blocks visit the device one at a time
    nsamples = args.nsamples or 128
    seqlen = args.seqlen or 512
    input_ids = torch.randint(0, config.vocab_size, (nsamples, seqlen))
    bits = args.bits[0] if args.bits else 4
    group_size = args.group_size[0] if args.group_size else 64
    for method in [m for m in args.algorithm if not m.startswith("rtn")] or ["blockap"]:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        report = blockwise_ptq(model, input_ids, bits, group_size, ptq_config(args), device=device,
                               progress=args.progress)
        per_block = [b.seconds for b in report.blocks]
        gpu = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
               if device.startswith("cuda") else "")
        name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU"
        print(f"random 1B-shaped Llama block, {method} {_fmt(bits, group_size)}, {nsamples} x {seqlen} tokens, "
              f"{report.steps_per_block} steps: {sum(per_block) / len(per_block):.1f} s per block on {name} "
              f"(x16 blocks = {16 * sum(per_block) / len(per_block) / 60:.1f} min for Llama-3.2-1B){gpu}")
        print(report.table())
        model = LlamaForCausalLM(config).eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithm", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", nargs="+", type=int, choices=SUPPORTED_BITS)
    parser.add_argument("--group-size", nargs="+", type=_group, default=[64],
                        help="input columns per scale; 'row' for one scale per output row")
    parser.add_argument("--nsamples", type=int, help="calibration sequences (default: UPQConfig's)")
    parser.add_argument("--seqlen", type=int, help="calibration sequence length (default: UPQConfig's)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--scale-lr", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--scale-init", choices=("max", "mse"))
    parser.add_argument("--eval-tokens", type=int, default=64, help="teacher answer length on EVAL_PROMPTS")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--progress", action="store_true", help="tqdm bars per block")
    parser.add_argument("--blocks", action="store_true", help="print the per-block loss tables")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--random-1b", action="store_true", help="time one 1B-shaped random Llama block per block")
    parser.add_argument("--layers", type=int, default=2, help="--random-1b: blocks in the random model")
    parser.add_argument("--device", help="--random-1b: device (default: cuda if available)")
    args = parser.parse_args(argv)
    if args.random_1b:
        bench_random_1b(args)
    else:
        bench_model(args)


if __name__ == "__main__":
    sys.exit(main())
