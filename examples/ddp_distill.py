"""Distill-QAT on several processes with no distribution code of ours: accelerate/torchrun + Trainer.

    accelerate launch --cpu --num_processes 2 examples/ddp_distill.py --out /tmp/ddp
    torchrun --nproc_per_node 2 examples/ddp_distill.py --out /tmp/ddp        # same thing

A tiny random Llama teacher, its INT2 QAT student, random token blocks; each rank writes what it
saw (world size, final loss, a checksum of the trained latent weights) to OUT/rank{N}.json, so
the test can check that DDP kept the replicas identical.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from upq_hf.data import TokenBlockDataset
from upq_hf.distill import UPQDistillTrainer, select_trainable
from upq_hf.qat import qat_layers, to_qat


def tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    teacher, student = tiny(0), tiny(0)
    to_qat(student, bits=2, group_size=32)
    select_trainable(student)
    training_args = TrainingArguments(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=2,
                                      learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[],
                                      use_cpu=True, seed=0, disable_tqdm=True, ddp_backend="gloo")
    blocks = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(0))  # random tokens
    trainer = UPQDistillTrainer(model=student, teacher_model=teacher, args=training_args,
                                train_dataset=TokenBlockDataset(blocks))
    result = trainer.train()
    rank = training_args.process_index
    checksum = sum(float(m.weight.detach().double().sum()) + float(m.weight_scale.detach().double().sum())
                   for m in qat_layers(student).values())
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": training_args.world_size, "train_loss": result.training_loss,
                   "global_step": trainer.state.global_step, "checksum": checksum}, handle)


if __name__ == "__main__":
    main()
