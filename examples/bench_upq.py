"""Issue-5 numbers: RTN INT2, PTQ INT2, ntp, distill and upq on the bundled SmolLM2-135M-Instruct.

Same data ("self": the teacher's answers to built-in seed prompts) and the same training budget for
every training recipe; fidelity (top-1 agreement, KL, JSD) on held-out chat prompts and the offline
instruction-following check, for the teacher and each student; fidelity after several budgets
(evaluated inside each run at the given steps); training throughput. Writes a JSON that
`examples/plot_budget.py` turns into the budget plot.

    python examples/bench_upq.py --steps 80 --eval-at 0,20,40,80 --out out/bench-upq
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from transformers import TrainerCallback

import upq_hf
from upq_hf import UPQConfig, convert
from upq_hf.evaluation import FidelityReference, fidelity, held_out_prompts, instruction_following
from upq_hf.models import bundled_model_dir, load_model, load_tokenizer
from upq_hf.qat import freeze_model, to_qat


class BudgetCurve(TrainerCallback):
    """Fidelity of the student (in QAT mode: its forward is the frozen model's) at chosen steps."""

    def __init__(self, teacher, reference, steps, tokens_per_step):
        self.teacher, self.reference, self.steps, self.tokens_per_step = teacher, reference, set(steps), tokens_per_step
        self.points, self.log = [], []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if 0 in self.steps and state.global_step == 0:
            self.on_step_end(args, state, control, model=model, **kwargs)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            was_training = model.training
            model.eval()
            scores = fidelity(model, self.teacher, self.reference)
            model.train(was_training)
            self.points.append({**scores, "answer_tokens": scores["tokens"], "step": state.global_step,
                                "tokens": state.global_step * self.tokens_per_step})
            print(f"  step {state.global_step}: {scores}", file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.log = list(state.log_history)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", default="rtn,ptq,ntp,distill,upq")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-at", default="0,20,40,80")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--group-size", default="64")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--scale-lr", type=float, default=None)
    parser.add_argument("--beta", type=float, default=None, help="generalized JSD beta (default: UPQConfig's)")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--nsamples", type=int, default=None, help="PTQ calibration sequences")
    parser.add_argument("--ptq-seqlen", type=int, default=None, help="PTQ calibration length")
    parser.add_argument("--out", default="out/bench-upq")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    group_size = None if args.group_size == "row" else int(args.group_size)
    source = bundled_model_dir()
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, dtype="float32")
    started = time.time()
    reference = FidelityReference.build(teacher, tokenizer, held_out_prompts(args.prompts), max_new_tokens=64)
    teacher_if = instruction_following(teacher, tokenizer)
    print(f"teacher: {len(reference.prompts)} prompts, IF {teacher_if['score']:.3f} ({time.time() - started:.0f} s)",
          file=sys.stderr)
    results = {"teacher": {"if": teacher_if["score"], "if_checks": teacher_if["checks"]}, "settings": vars(args)}
    extra = {k: v for k, v in (("learning_rate", args.lr), ("scale_learning_rate", args.scale_lr),
                               ("nsamples", args.nsamples), ("seqlen", args.ptq_seqlen), ("beta", args.beta))
             if v is not None}
    int4_dir = os.path.join(args.out, "int4")
    for recipe in args.recipes.split(","):
        model = load_model(source, dtype="float32")
        config = UPQConfig(bits=2, group_size=group_size, recipe=recipe, train_steps=args.steps,
                           train_batch_size=args.batch, train_seqlen=args.seqlen,
                           int4_checkpoint=int4_dir if recipe == "upq" else None, **extra)
        curve = BudgetCurve(teacher, reference, [int(s) for s in args.eval_at.split(",")],
                            args.batch * args.seqlen)
        print(f"== {recipe}", file=sys.stderr, flush=True)
        start = time.time()
        upq_hf.quantize_model(model, config, tokenizer=tokenizer, callbacks=[curve])
        seconds = time.time() - start
        scores = fidelity(model, teacher, reference)
        follow = instruction_following(model, tokenizer)
        runtime = next((e["train_runtime"] for e in curve.log if "train_runtime" in e), None)
        results[recipe] = {**scores, "if": follow["score"], "if_checks": follow["checks"], "seconds": seconds,
                           "curve": curve.points,
                           "train_tokens_per_second": (args.steps * args.batch * args.seqlen / runtime) if runtime else None}
        print(f"{recipe}: {json.dumps({k: v for k, v in results[recipe].items() if k not in ('if_checks',)})}",
              file=sys.stderr, flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as handle:
            json.dump(results, handle, indent=2)
    if os.path.isdir(int4_dir):
        int4 = load_model(int4_dir, dtype="float32")
        results["int4_ptq"] = {**fidelity(int4, teacher, reference), "if": instruction_following(int4, tokenizer)["score"]}
        # INT2 scale initialisation (no training): ParetoQ's max |w| vs the error-minimising search, from the
        # unquantized weights and from the INT4 PTQ model's
        results["int2_init"] = {}
        for scale_init in ("max", "mse"):
            fp = load_model(source, dtype="float32")
            convert.quantize_linears_rtn(fp, 2, group_size, scale_init=scale_init)
            from4 = load_model(int4_dir, dtype="float32")
            to_qat(from4, bits=2, group_size=group_size, scale_init=scale_init)
            freeze_model(from4)
            results["int2_init"][scale_init] = {"from_fp": fidelity(fp, teacher, reference),
                                                "from_int4": fidelity(from4, teacher, reference)}
    with open(os.path.join(args.out, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)

    tokens = args.steps * args.batch * args.seqlen
    print(f"\n## INT2 recipes on SmolLM2-135M-Instruct ({time.strftime('%Y-%m-%d')}, CPU, {os.cpu_count()} cores)\n")
    print(f"Group size {args.group_size}; training budget {args.steps} steps x {args.batch} x {args.seqlen} = "
          f"{tokens:,} tokens of 'self' data; fidelity on {len(reference.prompts)} held-out prompts "
          f"({reference and sum(map(len, reference.answer_ids))} answer tokens); IF = share of "
          f"{len(teacher_if['checks'])} verifiable instructions obeyed. Learning rates (StepAdam): weights "
          f"{args.lr or UPQConfig().learning_rate} of a quantization step per update, scales "
          f"{args.scale_lr or UPQConfig().scale_learning_rate} relative per update; JSD beta "
          f"{UPQConfig().beta if args.beta is None else args.beta}.\n")
    print("| model | top-1 | KL(T‖S) | JSD | IF | wall s | train tokens/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| teacher (unquantized) | 1.000 | 0.000 | 0.000 | {teacher_if['score']:.3f} | | |")
    names = {"rtn": "INT2 RTN", "ptq": "INT2 PTQ", "ntp": "INT2 ntp", "distill": "INT2 distill", "upq": "INT2 upq",
             "int4_ptq": "INT4 PTQ (upq's stage 1)"}
    for key in ["int4_ptq"] + args.recipes.split(","):
        if key in results:
            r = results[key]
            tps = r.get("train_tokens_per_second")
            print(f"| {names[key]} | {r['top1']:.3f} | {r['kl']:.3f} | {r['jsd']:.3f} | {r['if']:.3f} | "
                  f"{r.get('seconds', 0):.0f} | {'' if not tps else f'{tps:.0f}'} |")
    if "int2_init" in results:
        print("\nINT2 scale initialisation, round to nearest, no training:\n")
        print("| scale init | from the unquantized weights: top-1 / KL | from the INT4 PTQ model: top-1 / KL |")
        print("|---|---|---|")
        for name, r in results["int2_init"].items():
            print(f"| {name} | {r['from_fp']['top1']:.3f} / {r['from_fp']['kl']:.3f} | "
                  f"{r['from_int4']['top1']:.3f} / {r['from_int4']['kl']:.3f} |")
    print("\nBudget curve (fidelity inside each run; step 0 = the recipe's starting point):\n")
    print("| recipe | step | tokens | top-1 | KL |")
    print("|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        for p in results.get(recipe, {}).get("curve", []):
            print(f"| {recipe} | {p['step']} | {p['tokens']:,} | {p['top1']:.3f} | {p['kl']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
