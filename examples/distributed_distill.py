"""Distill-QAT on several processes with no distribution code of ours: torchrun / accelerate + Trainer.

    python examples/distributed_distill.py --out /tmp/one                                   # one process
    torchrun --nproc_per_node 2 examples/distributed_distill.py --out /tmp/ddp               # DDP (gloo on a CPU)
    accelerate launch --cpu --num_processes 2 examples/distributed_distill.py --out /tmp/ddp # the same
    torchrun --nproc_per_node 2 examples/distributed_distill.py --out /tmp/fsdp --fsdp       # FSDP2

A tiny random Llama teacher, its INT2 QAT student, random token blocks with the teacher's cached top-k
distributions (what ``upq`` trains on). ``--train`` picks what trains: ``scales`` (upq's default Distill-QAT and
E2E-QP: the codes fixed, the scales and norm weights) or ``weights`` (the latent weights too). The global batch is
``--global-batch`` sequences per step whatever the number of processes (each takes its share, in order), so a run
on two processes can be compared with a run on one: each process writes its world size and loss to
``OUT/rank{N}.json`` and rank 0 the trained parameters to ``OUT/trained.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from torch.utils.data import SequentialSampler
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from upq_hf.data import TokenBlockDataset
from upq_hf.distill import TeacherTargetsDataset, UPQDistillTrainer, select_trainable
from upq_hf.qat import snap, to_qat


def tiny(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1))


class InOrder(UPQDistillTrainer):
    """The sequences in their order (the global batch of a step is the same on any number of processes)."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--train", choices=["scales", "weights"], default="scales")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    args = parser.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} does not split over {world} processes")
    teacher, student = tiny(0), tiny(0)
    to_qat(student, bits=2, group_size=32)
    if args.train == "scales":
        snap(student)
    select_trainable(student, train_norms=True)
    fsdp = {"fsdp": "full_shard", "fsdp_config": {"version": 2, "reshard_after_forward": True}} if args.fsdp else {}
    training_args = TrainingArguments(output_dir=args.out, max_steps=args.steps,
                                      per_device_train_batch_size=args.global_batch // world, learning_rate=0.02,
                                      lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
                                      use_cpu=True, seed=0, disable_tqdm=True,
                                      ddp_backend="gloo" if world > 1 else None, **fsdp)
    blocks = TokenBlockDataset(torch.randint(0, 128, (args.steps * args.global_batch, 24),
                                             generator=torch.Generator().manual_seed(0)))
    dataset = TeacherTargetsDataset.build(blocks, teacher, k=16)
    trainer = InOrder(model=student, args=training_args, train_dataset=dataset, scale_learning_rate=0.01)
    result = trainer.train()
    # how the model was distributed: DTensor parameters under FSDP2, a DistributedDataParallel wrapper under DDP
    sharded = any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    wrapper = type(trainer.model_wrapped).__name__
    if args.fsdp and not sharded:  # accelerate turns FSDP on for accelerators only: on CPUs it runs DDP
        raise SystemExit(f"--fsdp: the model was not sharded ({wrapper}); accelerate enables FSDP on GPUs (and "
                         f"other accelerators) only, and runs several CPU processes as DDP")
    state = trainer.accelerator.get_state_dict(trainer.model)  # gathered from the shards under FSDP
    trained = {name: tensor.detach().float().cpu().contiguous() for name, tensor in state.items()
               if name.endswith(("weight_scale", "norm.weight", "layernorm.weight"))
               or (args.train == "weights" and name.endswith("proj.weight"))}
    rank = training_args.process_index
    os.makedirs(args.out, exist_ok=True)
    if rank == 0:
        save_file(trained, os.path.join(args.out, "trained.safetensors"))
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump({"world_size": training_args.world_size, "train_loss": result.training_loss,
                   "global_step": trainer.state.global_step, "trained": len(trained),
                   "sharded": sharded, "wrapper": wrapper}, handle)


if __name__ == "__main__":
    main()
