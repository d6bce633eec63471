"""Distill-QAT training throughput (tokens/s) for a model of a given shape, random weights.

The student is in INT2 QAT mode (latent weights + scales, SEQ fake-quant), the teacher is the same
model unquantized (bf16 by default, to fit a 1B shape next to the student's fp32 latent weights and
Adam state in 24 GiB); the loss is the chunked generalized JSD; the optimizer StepAdam. Random tokens:
throughput does not depend on the text. The first ``--warmup`` steps are not timed.

    python examples/bench_train.py --shape 1b --steps 4 --batch 1 --seqlen 128          # CPU
    python examples/bench_train.py --shape 1b --steps 12 --batch 8 --seqlen 512 --device cuda

Shapes: ``1b`` is TinyLlama-1.1B's (hidden 2048, 22 layers, MLP 5632, 32 heads / 4 KV heads, vocab
32000); ``135m`` the bundled SmolLM2's; ``tiny`` a 2-layer toy for dry runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from upq_hf.atomic import write_text
from upq_hf.data import TokenBlockDataset
from upq_hf.distill import UPQDistillTrainer, select_trainable
from upq_hf.qat import to_qat

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),  # for dry runs of the code path
}


class StepTimer(TrainerCallback):
    def __init__(self, verbose: bool = True):
        self.times = []
        self.verbose = verbose

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)
        if self.verbose:
            print(f"  step {state.global_step}: {self.times[-1]:.1f} s", file=sys.stderr, flush=True)


def random_tokens(n: int, seqlen: int, vocab: int) -> TokenBlockDataset:
    return TokenBlockDataset(torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(0)))


def measure(shape: str = "1b", steps: int = 4, warmup: int = 1, batch: int = 1, seqlen: int = 128,
            group_size: int = 64, teacher_dtype: str = "bfloat16", device: str = "cpu", verbose: bool = True) -> dict:
    """Distill-QAT training tokens/s: the result dict printed by ``main`` (importable: gpu_check.py uses it)."""
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(2048, seqlen), tie_word_embeddings=False)
    student = LlamaForCausalLM(config)
    teacher = copy.deepcopy(student).to(getattr(torch, teacher_dtype)).eval().requires_grad_(False)
    to_qat(student, bits=2, group_size=group_size)
    trainable = select_trainable(student)
    n_params = sum(p.numel() for p in student.parameters())
    if verbose:
        print(f"{shape}: {n_params / 1e9:.2f} B parameters, {trainable / 1e9:.2f} B trainable (INT2 QAT), "
              f"teacher {teacher_dtype}", file=sys.stderr)
    timer = StepTimer(verbose)
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                                     learning_rate=0.02, lr_scheduler_type="constant", save_strategy="no",
                                     report_to=[], logging_steps=1, use_cpu=device == "cpu",
                                     dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
                                     bf16=device != "cpu")
        trainer = UPQDistillTrainer(model=student, teacher_model=teacher, args=training,
                                    train_dataset=random_tokens(steps * batch, seqlen, config.vocab_size),
                                    scale_learning_rate=1e-2, callbacks=[timer])
        trainer.train()
    timed = timer.times[warmup:]
    tokens = batch * seqlen
    result = {
        "shape": shape, "device": torch.cuda.get_device_name() if device != "cpu" else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
        "params_b": n_params / 1e9, "batch": batch, "seqlen": seqlen, "timed_steps": len(timed),
        "seconds_per_step": sum(timed) / len(timed), "tokens_per_second": tokens * len(timed) / sum(timed),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }
    if device != "cpu":
        result["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--teacher-dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    result = measure(args.shape, args.steps, args.warmup, args.batch, args.seqlen, args.group_size,
                     args.teacher_dtype, args.device)
    n_params = result["params_b"] * 1e9
    print(json.dumps(result, indent=1))
    print(f"\n| shape | device | batch x seqlen | s/step | tokens/s | peak memory |\n|---|---|---|---|---|---|\n"
          f"| {args.shape} ({n_params / 1e9:.2f} B) | {result['device']} | {args.batch} x {args.seqlen} | "
          f"{result['seconds_per_step']:.1f} | {result['tokens_per_second']:.1f} | "
          f"{result.get('peak_gpu_gib', result['peak_rss_gib']):.1f} GiB |")
    if args.json:
        write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
