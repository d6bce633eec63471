"""Numbers for the core plugin on the bundled SmolLM2-135M-Instruct (CPU).

* bits per quantized weight on disk (from the safetensors headers, `upq info`);
* whole-checkpoint size: fp16 vs INT4 vs INT2;
* peak resident memory of a process that loads the INT2 checkpoint (and runs one forward) vs fp32;
* fidelity of round-to-nearest INT4 g64 and INT2 (per-row, g64) to the unquantized model.

    python examples/bench_core.py [--prompts 40] [--max-new-tokens 64] [--out out/bench-core]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

import upq_hf
from upq_hf import UPQConfig
from upq_hf.checkpoint import checkpoint_info
from upq_hf.evaluation import FidelityReference, fidelity, held_out_prompts
from upq_hf.models import bundled_model_dir, load_model, load_tokenizer
from upq_hf.publish import save_atomic

# VmHWM (the peak resident set of this process's memory map) rather than ru_maxrss, which a child
# created by fork + exec inherits from its parent on Linux.
PEAK_RSS = r"""
import sys, torch, upq_hf
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32 if sys.argv[2] == "float32" else "auto")
with torch.no_grad():
    model(torch.randint(0, 1000, (1, 64)))
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def peak_rss(path: str, dtype: str) -> int:
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, path, dtype], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default="out/bench-core")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source = bundled_model_dir()
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, dtype="float32")

    fp16_dir = os.path.join(args.out, "fp16")
    fp16 = load_model(source, dtype="float16")
    save_atomic(fp16, fp16_dir, overwrite=True)
    del fp16

    variants = {"INT4 g64": UPQConfig(bits=4, group_size=64), "INT2 g64": UPQConfig(bits=2, group_size=64),
                "INT2 per-row": UPQConfig(bits=2, group_size=None)}
    start = time.time()
    reference = FidelityReference.build(teacher, tokenizer, held_out_prompts(args.prompts),
                                        max_new_tokens=args.max_new_tokens, progress=True)
    print(f"teacher answers: {sum(map(len, reference.answer_ids))} tokens in {time.time() - start:.0f} s",
          file=sys.stderr)
    rows = []
    for name, config in variants.items():
        model = load_model(source, dtype="float32")
        upq_hf.quantize_model(model, config, progress=False)
        scores = fidelity(model, teacher, reference)
        for param in model.parameters():
            param.data = param.data.to(torch.float16)
        path = os.path.join(args.out, name.replace(" ", "-").lower())
        save_atomic(model, path, overwrite=True)
        info = checkpoint_info(path)
        rows.append((name, info["bits_per_weight"], folder_bytes(path), scores))
        print(name, json.dumps(scores), file=sys.stderr)

    # a 1B-class layer shape takes groups of 128: the INT4 g128 storage cost
    layer = upq_hf.UPQLinear.from_linear(torch.nn.Linear(4096, 4096, bias=False), 4, 128)
    int4_g128_bits = 8 * sum(b.numel() * b.element_size() for b in layer.buffers()) / (4096 * 4096)

    rss_fp32 = peak_rss(source, "float32")
    rss_int2 = peak_rss(os.path.join(args.out, "int2-g64"), "float32")

    fp16_bytes = folder_bytes(fp16_dir)
    print(f"\n## Core numbers (bundled SmolLM2-135M-Instruct, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPU cores, torch {torch.__version__})\n")
    print("| checkpoint | bits / quantized weight | safetensors size | vs fp16 | top-1 agreement | KL(T‖S) | JSD |")
    print("|---|---|---|---|---|---|---|")
    print(f"| fp16 (unquantized) | 16 | {fp16_bytes / 2**20:.1f} MiB | 1.00 | 1.000 | 0.000 | 0.000 |")
    for name, bpw, nbytes, s in rows:
        print(f"| RTN {name} | {bpw:.3f} | {nbytes / 2**20:.1f} MiB | {nbytes / fp16_bytes:.2f} | "
              f"{s['top1']:.3f} | {s['kl']:.3f} | {s['jsd']:.3f} |")
    print(f"\nINT4 g128 on a 4096x4096 layer: {int4_g128_bits:.3f} bits per weight (codes + fp16 scale + fp16 zero).")
    print(f"Fidelity: {reference and len(reference.prompts)} held-out chat prompts, {rows[0][3]['tokens']} "
          f"teacher-forced answer tokens (greedy teacher answers, up to {args.max_new_tokens} tokens).")
    print(f"\nPeak resident memory, load + one forward of 64 tokens on CPU: fp32 model {rss_fp32 / 2**20:.0f} MiB, "
          f"INT2 g64 checkpoint (fp16 embeddings, loaded as float32) {rss_int2 / 2**20:.0f} MiB "
          f"({rss_int2 / rss_fp32:.2f}x).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
