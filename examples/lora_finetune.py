"""LoRA fine-tuning on top of an INT2 UPQ model, with the packed INT2 codes left untouched.

Quantizes the bundled SmolLM2-135M-Instruct to INT2 (round-to-nearest, group size 64) in memory, or
loads an INT2 checkpoint given with ``--model``; puts rank-8 LoRA adapters on every ``UPQLinear``;
trains them for 50 ``transformers.Trainer`` steps on a small instruction set; prints the number of
trainable parameters, the loss on one held-out batch before and after, and whether the packed codes
and scales are bit-identical afterwards (a hash of every packed buffer). Runs offline on a CPU.

The instruction set is the unquantized model's own answers to the first 128 built-in
``upq_hf.prompts.SEED_PROMPTS`` (``upq_hf.data.load_texts("self", ...)``; cached under
``$UPQ_CACHE/self_data``, so only the first run ever generates them, which takes a few minutes on a
CPU): 112 conversations train, the last 16 give the held-out batch. The loss counts answer tokens only.

    python examples/lora_finetune.py [--model out/demo-int2] [--steps 50] [--rank 8] [--out out/lora-int2]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time

import torch

import upq_hf  # registers UPQ layers with PEFT's LoRA; import it before peft
from upq_hf import UPQConfig
from upq_hf.convert import upq_layers
from upq_hf.data import TokenBlockDataset, build_sequences, load_texts
from upq_hf.lora import target_modules
from upq_hf.models import load_model, load_tokenizer

from peft import LoraConfig, get_peft_model  # noqa: E402  (after upq_hf, see above)
from transformers import Trainer, TrainingArguments  # noqa: E402

N_PROMPTS, N_HELD_OUT = 128, 16


def packed_hash(model) -> str:
    """sha256 over every UPQLinear's buffers (packed codes, scales, zero points), in name order."""
    h = hashlib.sha256()
    for name, module in sorted(upq_layers(model).items()):
        name = name.removeprefix("base_model.model.").removesuffix(".base_layer")
        for key, buf in sorted(module.named_buffers()):
            h.update(f"{name}.{key}|{buf.dtype}|{tuple(buf.shape)}|".encode())
            h.update(buf.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def held_out_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="an INT2 UPQ checkpoint (default: quantize the bundled model)")
    parser.add_argument("--teacher", default=None, help="unquantized model that answers the prompts (default: bundled)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--out", default="out/lora-int2", help="where the adapter is saved ('' to skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    start = time.time()

    # --- data: the unquantized model's answers to built-in prompts (cached after the first run)
    log("[1/5] instruction data (SEED_PROMPTS answered by the unquantized model; cached)")
    teacher = load_model(args.teacher)
    tokenizer = load_tokenizer(args.teacher)
    conversations = load_texts("self", model=teacher, tokenizer=tokenizer, n_prompts=N_PROMPTS)
    train_items, held_items = conversations[:-N_HELD_OUT], conversations[-N_HELD_OUT:]
    # ~100 blocks of answer-bearing text from the 112 training conversations (no block repeats inside an epoch)
    ids, mask = build_sequences(train_items, tokenizer, args.seqlen, nsamples=max(args.batch, 12_800 // args.seqlen),
                                seed=args.seed, return_loss_mask=True)
    train_set = TokenBlockDataset(ids, mask)
    held_ids, held_mask = build_sequences(held_items, tokenizer, args.seqlen, nsamples=args.batch, seed=args.seed,
                                          return_loss_mask=True)
    held_batch = {"input_ids": held_ids, "attention_mask": torch.ones_like(held_ids),
                  "labels": held_ids.masked_fill(~held_mask, -100)}

    # --- the INT2 model
    if args.model is None:
        log("[2/5] quantizing the bundled model to INT2 (RTN, group size 64) in memory")
        model = upq_hf.quantize_model(teacher, UPQConfig(bits=2, group_size=64, recipe="rtn"), progress=False)
    else:
        log(f"[2/5] loading the INT2 checkpoint {args.model}")
        del teacher
        model = load_model(args.model)
    layers = upq_layers(model)
    bits = {m.bits for m in layers.values()}
    codes_before = packed_hash(model)
    loss_before = held_out_loss(model, held_batch)

    # --- LoRA on every UPQLinear
    names = target_modules(model)
    peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05,
                                                  target_modules=names, task_type="CAUSAL_LM"))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log(f"[3/5] LoRA r={args.rank} on {len(layers)} UPQLinear layers ({', '.join(names)})")

    # --- train
    log(f"[4/5] training {args.steps} steps, batch {args.batch} x {args.seqlen} tokens, lr {args.lr}")
    targs = TrainingArguments(output_dir=os.path.join(args.out or "out/lora-int2", "trainer"), max_steps=args.steps,
                              per_device_train_batch_size=args.batch, learning_rate=args.lr, warmup_steps=5,
                              lr_scheduler_type="linear", logging_steps=10, save_strategy="no", report_to=[],
                              use_cpu=True, seed=args.seed, disable_tqdm=True)
    train_start = time.time()
    trainer = Trainer(model=peft_model, args=targs, train_dataset=train_set)
    trainer.train()
    train_time = time.time() - train_start
    train_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    loss_after = held_out_loss(peft_model, held_batch)
    codes_after = packed_hash(peft_model)
    if args.out:
        log(f"[5/5] saving the adapter to {args.out}")
        peft_model.save_pretrained(args.out)

    print(f"model: {'bundled SmolLM2-135M-Instruct, INT2 RTN g64' if args.model is None else args.model} "
          f"(INT{'/'.join(map(str, sorted(bits)))}, {len(layers)} UPQLinear layers)")
    print(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%; packed codes are "
          "buffers and not counted)")
    print(f"held-out loss ({args.batch} x {args.seqlen} tokens, answer tokens only): "
          f"before {loss_before:.4f} -> after {args.steps} steps {loss_after:.4f}")
    print(f"training loss (every 10 steps): {', '.join(f'{x:.3f}' for x in train_losses)}")
    print(f"INT2 codes/scales sha256 before {codes_before[:16]}... after {codes_after[:16]}... "
          f"unchanged: {codes_before == codes_after}")
    print(f"training time {train_time:.0f} s ({train_time / args.steps:.1f} s/step), total {time.time() - start:.0f} s")
    return 0 if codes_before == codes_after else 1


if __name__ == "__main__":
    sys.exit(main())
