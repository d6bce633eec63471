"""Distill-QAT's student, loss and optimizer sharded by torch's FSDP2 (``fully_shard``) on CPU processes (gloo).

accelerate turns FSDP on for accelerators only (several CPU processes run as DDP), so on CPUs the Trainer cannot be
asked for FSDP. This script drives the Trainer's own pieces instead, a step at a time: ``UPQDistillTrainer``'s
optimizer (``create_optimizer``: StepAdam over the scales and norms) and loss (``compute_loss``: the JSD to the
teacher's cached top-k), on the student of ``examples/distributed_distill.py`` with the same data, global batch,
clipping (1.0) and constant learning rate. With ``WORLD_SIZE`` > 1 every decoder block and the model are
``fully_shard``-ed (their parameters become DTensors, gathered for each forward); each process takes its share of
the global batch in order. Rank 0 writes the trained parameters (gathered) to ``OUT/trained.safetensors``.

    python tests/fsdp2_cpu.py --out /tmp/one
    torchrun --nproc_per_node 2 tests/fsdp2_cpu.py --out /tmp/fsdp2
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainingArguments

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

from distributed_distill import tiny  # noqa: E402

from upq_hf.data import TokenBlockDataset  # noqa: E402
from upq_hf.distill import TeacherTargetsDataset, UPQDistillTrainer, select_trainable  # noqa: E402
from upq_hf.qat import snap, to_qat  # noqa: E402

TRAINED = ("weight_scale", "norm.weight", "layernorm.weight")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    args = parser.parse_args()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    teacher, student = tiny(0), tiny(0)
    to_qat(student, bits=2, group_size=32)
    snap(student)
    select_trainable(student, train_norms=True)
    blocks = TokenBlockDataset(torch.randint(0, 128, (args.steps * args.global_batch, 24),
                                             generator=torch.Generator().manual_seed(0)))
    dataset = TeacherTargetsDataset.build(blocks, teacher, k=16)
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)
    training_args = TrainingArguments(output_dir=args.out, learning_rate=0.02, use_cpu=True, report_to=[],
                                      save_strategy="no", disable_tqdm=True)
    trainer = UPQDistillTrainer(model=student, args=training_args, train_dataset=dataset, scale_learning_rate=0.01)
    optimizer = trainer.create_optimizer()
    local = args.global_batch // world
    losses = []
    student.train()
    for step in range(args.steps):
        first = step * args.global_batch + rank * local
        rows = [dataset[i] for i in range(first, first + local)]
        batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in rows[0]}
        loss = trainer.compute_loss(student, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in student.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    trained, sharded = {}, False
    for name, param in student.named_parameters():
        if name.endswith(TRAINED):
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            sharded |= full is not param
            trained[name] = full.detach().float().contiguous()
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        save_file(trained, os.path.join(args.out, "trained.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": world, "losses": losses, "sharded": sharded, "trained": len(trained)}, handle)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
