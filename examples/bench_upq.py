"""INT2 recipes on the bundled SmolLM2-135M-Instruct: upq against its baselines at the same budget.

Every recipe runs with ``UPQConfig``'s defaults unless a flag changes them (but uniform INT2 unless ``--mix``
names a mix for all), so the same data (``"self"``: the teacher's answers to the built-in seed prompts), the
same calibration set and PTQ budget (``ptq`` is exactly upq's INT2 reconstruction, from the unquantized
weights) and the same training budget (``ntp``, ``distill`` and ``upq`` train for the same steps on the same
sequences). For each model:
fidelity to the teacher (teacher-forced top-1 agreement, KL, JSD) on a split of the held-out prompts,
its own greedy answers to them (how many are not empty, how many the teacher ties to their prompt
(:mod:`upq_hf.evaluation.topicality`); all of them in the JSON), the offline
instruction-following check, wall time and training tokens/s; for the training recipes, fidelity at
chosen training steps (the budget curve; step 0 is where training starts). Writes
``OUT/results.json`` (``examples/plot_budget.py`` draws the budget plot from it) and prints markdown.

    python examples/bench_upq.py --recipes ptq,ntp,distill,upq --split report --out out/bench-upq12
    python examples/bench_upq.py --recipes upq --split validation --train-steps 60 --out out/tune

``--split validation`` (24 prompts) is for choosing settings; ``report`` (16 prompts) for reporting them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from transformers import TrainerCallback

import upq_hf
from upq_hf import UPQConfig
from upq_hf.atomic import write_text
from upq_hf.config import LEGACY_KEYS, MIXES
from upq_hf.evaluation import (FidelityReference, answer_texts, decode_answers, fidelity, instruction_following,
                               topicality)
from upq_hf.models import bundled_model_dir, load_model, load_tokenizer
from upq_hf.prompts import REPORT_PROMPTS, VALIDATION_PROMPTS
from upq_hf.recipes import RECIPES

SPLITS = {"report": REPORT_PROMPTS, "validation": VALIDATION_PROMPTS}
NAMES = {"rtn": "INT2 RTN", "ptq": "INT2 PTQ alone (upq's INT2 reconstruction, from the unquantized weights)",
         "ntp": "INT2 ntp (next-token QAT from RTN, ParetoQ)", "distill": "INT2 distill (Distill-QAT from RTN)",
         "upq": "INT2 upq (INT4 PTQ -> INT2 PTQ -> Distill-QAT)"}


class BudgetCurve(TrainerCallback):
    """Fidelity of the student (in QAT mode its forward pass is the packed model's) at chosen steps."""

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
            self.points.append({**scores, "step": state.global_step, "tokens": state.global_step * self.tokens_per_step})
            print(f"  step {state.global_step}: top-1 {scores['top1']:.3f} KL {scores['kl']:.3f}", file=sys.stderr,
                  flush=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.log = list(state.log_history)


def overrides(args) -> dict:
    """The UPQConfig keyword arguments the command line sets (everything else: the defaults): the format, and the
    stage fields (``{stage: {field: value}}``; each flag is named after its upq_hf 0.1 key, ``LEGACY_KEYS``). No
    mix unless ``--mix`` names one, for every recipe alike (uniform INT2)."""
    names = ("train_steps", "train_batch_size", "train_samples", "ptq_epochs", "int4_ptq_epochs", "nsamples",
             "self_prompts", "learning_rate", "scale_learning_rate", "beta", "teacher_topk")
    out = {"mix": args.mix}
    if args.group_size is not None:
        out["group_size"] = args.group_size
    for name in names:
        if getattr(args, name) is not None:
            stage, field = LEGACY_KEYS[name]
            out.setdefault(stage, {})[field] = getattr(args, name)
    if args.module_bits:
        out["module_bits"] = json.loads(args.module_bits)
    return out


def for_recipe(settings: dict, recipe: str) -> dict:
    """``settings`` without the stages that ``recipe`` does not run."""
    from upq_hf.stages import STAGES

    return {key: value for key, value in settings.items() if key not in STAGES or key in RECIPES[recipe].stages}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="ptq,ntp,distill,upq")
    parser.add_argument("--split", default="report", choices=list(SPLITS))
    parser.add_argument("--eval-at", default=None, help="training steps to score (default: 0, a third, two "
                                                        "thirds and the end)")
    parser.add_argument("--group-size", type=lambda t: None if t == "row" else int(t), default=None)
    for name, kind in (("train-steps", int), ("train-batch-size", int), ("train-samples", int), ("ptq-epochs", int),
                       ("int4-ptq-epochs", int), ("nsamples", int), ("self-prompts", int), ("learning-rate", float),
                       ("scale-learning-rate", float), ("beta", float), ("teacher-topk", int)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--module-bits", default=None, help='mixed precision, JSON: \'{"\\\\.(k|v)_proj$": 4}\'')
    parser.add_argument("--mix", default=None, choices=list(MIXES),
                        help="a named mix for every recipe (UPQConfig.mix), so that all compare at its budget "
                             "(default: none, uniform INT2)")
    parser.add_argument("--no-if", action="store_true", help="skip the instruction-following check")
    parser.add_argument("--out", default="out/bench-upq")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    source = bundled_model_dir()
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, dtype="float32")
    settings = overrides(args)
    base = UPQConfig(bits=2, recipe="upq", **settings)  # upq runs every stage: the settings, resolved
    steps = base.distill.steps
    eval_at = sorted({int(s) for s in args.eval_at.split(",")} if args.eval_at else {0, steps // 3, 2 * steps // 3,
                                                                                      steps})
    prompts = list(SPLITS[args.split])
    started = time.time()
    reference = FidelityReference.build(teacher, tokenizer, prompts, max_new_tokens=64)
    teacher_if = None if args.no_if else instruction_following(teacher, tokenizer)
    print(f"teacher: {len(prompts)} {args.split} prompts, {sum(map(len, reference.answer_ids))} answer tokens "
          f"({time.time() - started:.0f} s)", file=sys.stderr)
    teacher_answers = decode_answers(tokenizer, reference.answer_ids)
    results = {"settings": {**vars(args), "config": base.to_dict()}, "split": args.split,
               "answer_tokens": sum(map(len, reference.answer_ids)),
               "teacher": {"if": None if teacher_if is None else teacher_if["score"],
                           "on_topic": topicality(teacher, tokenizer, prompts, teacher_answers)["on_topic"]}}
    tokens_per_step = base.distill.batch_size * base.distill.seqlen
    for recipe in args.recipes.split(","):
        model = load_model(source, dtype="float32")
        config = UPQConfig(bits=2, recipe=recipe, **for_recipe(settings, recipe))
        curve = BudgetCurve(teacher, reference, eval_at, tokens_per_step)
        print(f"== {recipe}", file=sys.stderr, flush=True)
        start = time.time()
        upq_hf.quantize_model(model, config, tokenizer=tokenizer, callbacks=[curve])
        seconds = time.time() - start
        scores = fidelity(model, teacher, reference)
        answers = answer_texts(model, tokenizer, prompts, max_new_tokens=64)
        follow = None if args.no_if else instruction_following(model, tokenizer)
        runtime = next((e["train_runtime"] for e in curve.log if "train_runtime" in e), None)
        trained = RECIPES[recipe].trains
        results[recipe] = {
            **scores, "seconds": seconds, "curve": curve.points, "if": None if follow is None else follow["score"],
            "answers": dict(zip(prompts, answers)), "non_empty": sum(bool(a) for a in answers),
            "on_topic": topicality(teacher, tokenizer, prompts, answers)["on_topic"],
            "train_tokens": steps * tokens_per_step if trained else 0,
            "train_tokens_per_second": steps * tokens_per_step / runtime if runtime else None,
        }
        print(f"{recipe}: top-1 {scores['top1']:.3f} KL {scores['kl']:.3f}, {results[recipe]['non_empty']}/"
              f"{len(prompts)} answers not empty, {results[recipe]['on_topic']} on topic, {seconds:.0f} s",
              file=sys.stderr, flush=True)
        write_text(os.path.join(args.out, "results.json"), json.dumps(results, indent=2))

    print(f"\n## INT2 recipes on SmolLM2-135M-Instruct ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores)\n")
    print(f"`{' '.join(sys.argv)}`. INT2 SEQ, group size {base.group_size}; PTQ calibration "
          f"{base.data.calibration_samples} x {base.data.calibration_seqlen} tokens of 'self' data, {base.ptq.epochs} "
          f"epochs per block; training {steps} steps x {base.distill.batch_size} x {base.distill.seqlen} = "
          f"{steps * tokens_per_step:,} tokens over {base.distill.samples} distinct sequences; fidelity on the "
          f"{len(prompts)} {args.split} prompts "
          f"({results['answer_tokens']} teacher answer tokens).\n")
    print("| model | top-1 | KL(T‖S) | JSD | answers not empty | on topic | IF | wall s | train tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    t_if = results["teacher"]["if"]
    print(f"| teacher | 1.000 | 0.000 | 0.000 | {len(prompts)}/{len(prompts)} | "
          f"{results['teacher']['on_topic']}/{len(prompts)} | {'' if t_if is None else f'{t_if:.3f}'} | | |")
    for recipe in args.recipes.split(","):
        r = results[recipe]
        tps = r["train_tokens_per_second"]
        r_if = "" if r["if"] is None else f"{r['if']:.3f}"
        print(f"| {NAMES.get(recipe, recipe)} | {r['top1']:.3f} | {r['kl']:.3f} | {r['jsd']:.3f} | "
              f"{r['non_empty']}/{len(prompts)} | {r['on_topic']}/{len(prompts)} | {r_if} | "
              f"{r['seconds']:.0f} | {'' if not tps else f'{tps:.0f}'} |")
    print("\nBudget curve (fidelity inside each training run; step 0 = where training starts):\n")
    print("| recipe | step | training tokens | top-1 | KL |")
    print("|---|---|---|---|---|")
    for recipe in args.recipes.split(","):
        for p in results[recipe]["curve"]:
            print(f"| {recipe} | {p['step']} | {p['tokens']:,} | {p['top1']:.3f} | {p['kl']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
