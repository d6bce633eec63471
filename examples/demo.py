"""`make demo`: quantize the bundled SmolLM2-135M-Instruct to INT2 and print a before/after report.

Default: the `upq` recipe with the `kv4` mix (attention k/v at INT4, the other layers INT2 with groups wide
enough to keep uniform INT2 g64's 2.25 bits per weight: 2.23 on this model), on a budget that ends in about
12 minutes on a 2-core AVX512-BF16 CPU: the model's own answers to 64 built-in prompts as data, INT2 block
reconstruction from the unquantized weights (6 epochs over 56 sequences of 128 tokens; upq's INT4 stage is off by
default), then 20 steps of Distill-QAT of the scales and norms, codes fixed, from the teacher's
cached top-64 distributions: the `demo` budget of upq_hf.stages.BUDGETS (docs/BENCHMARKS.md).
`upq quantize --bits 2 --recipe upq --budget demo` makes the same model; without `--budget` it runs the full
default budget (30 minutes there); `--mix none` gives uniform INT2, `--recipe rtn` shows what plain rounding
does.

Size on disk, fidelity to the unquantized model (teacher-forced top-1 agreement and KL on held-out
chat prompts) and one sample answer from each model. Runs offline on a CPU.

    python examples/demo.py [--recipe rtn] [--budget default] [--out out/demo-int2] [--prompts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import upq_hf
from upq_hf import UPQConfig
from upq_hf.checkpoint import checkpoint_info
from upq_hf.chat import generate_answers
from upq_hf.config import MIXES, budget
from upq_hf.evaluation import measure_fidelity, report_metrics
from upq_hf.models import BUNDLED_NAME, autocast_dtype, bundled_model_dir, load_model, load_tokenizer
from upq_hf.publish import REPORT_FILE, record_report, save_atomic
from upq_hf.recipes import RECIPES
from upq_hf.stages import BUDGETS

SAMPLE_PROMPT = "Give me three tips for staying focused while studying."


def answer(model, tokenizer, prompt: str, max_new_tokens: int = 60) -> str:
    ids, = generate_answers(model, tokenizer, [prompt], max_new_tokens=max_new_tokens, batch_size=1)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="upq", choices=list(RECIPES))
    parser.add_argument("--budget", default="demo", choices=list(BUDGETS),
                        help="the stage settings (upq_hf.stages.BUDGETS; default demo: smaller than the library's "
                             "defaults so that `make demo` ends in minutes)")
    parser.add_argument("--bits", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--mix", default="auto", choices=["auto", *MIXES, "none"],
                        help="a named mixed-precision preset (UPQConfig.mix); auto, as `upq quantize`: kv4 for upq "
                             "at INT2")
    parser.add_argument("--rotation", default="auto", choices=["auto", "hadamard", "none"],
                        help="the residual stream turned by a Hadamard matrix fused into the weights "
                             "(UPQConfig.rotation); auto (the default, as `upq quantize`): for upq at INT2; none: "
                             "unrotated")
    parser.add_argument("--out", default="out/demo-int2")
    parser.add_argument("--prompts", type=int, default=16, help="held-out prompts for the fidelity report")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()

    source = bundled_model_dir()
    tokenizer = load_tokenizer(source)
    teacher = load_model(source, dtype="float32")
    n_params = sum(p.numel() for p in teacher.parameters())

    print(f"[1/4] quantizing {os.path.basename(source)} to INT{args.bits} "
          f"(recipe {args.recipe}, group size {args.group_size})", file=sys.stderr)
    if autocast_dtype("cpu") is None and not torch.cuda.is_available():
        print("      this CPU has no native bf16 (AVX512-BF16 or AMX): PTQ and training run in float32, which "
              "took 1.7-2.5x as long as with it in our runs (24-35 minutes against 14; docs/BENCHMARKS.md)", file=sys.stderr)
    student = load_model(source, dtype="float32")
    config = UPQConfig(bits=args.bits, group_size=args.group_size, recipe=args.recipe,
                       mix=None if args.mix == "none" else args.mix,
                       rotation=None if args.rotation == "none" else args.rotation, **budget(args.budget, args.recipe))
    upq_hf.quantize_model(student, config, tokenizer=tokenizer)
    for param in student.parameters():
        param.data = param.data.to(torch.bfloat16)
    report = {"base_model": f"HuggingFaceTB/{BUNDLED_NAME}", "quantize_seconds": round(time.time() - start, 1)}
    save_atomic(student, args.out, tokenizer=tokenizer, overwrite=True,
                extra_files={REPORT_FILE: json.dumps(report, indent=2)})
    del student

    print("[2/4] reloading the saved checkpoint with plain from_pretrained", file=sys.stderr)
    student = load_model(args.out, dtype="float32")

    print(f"[3/4] fidelity on {args.prompts} held-out chat prompts", file=sys.stderr)
    scores = measure_fidelity(student, teacher, tokenizer, args.prompts, max_new_tokens=args.max_new_tokens,
                              progress=True, answers=True)
    # the numbers go into the checkpoint's upq_report.json and model card, as `upq quantize` records them
    record_report(args.out, metrics={**report_metrics(scores), "fidelity_prompts": args.prompts},
                  answers=scores["answers"])

    print("[4/4] sample answers", file=sys.stderr)
    teacher_answer = answer(teacher, tokenizer, SAMPLE_PROMPT)
    student_answer = answer(student, tokenizer, SAMPLE_PROMPT)

    info = checkpoint_info(args.out)
    fp16_bytes = 2 * n_params
    print()
    print(f"UPQ demo: SmolLM2-135M-Instruct -> INT{args.bits} ({args.recipe}), {time.time() - start:.0f} s")
    print()
    print("| | unquantized | quantized |")
    print("|---|---|---|")
    print(f"| checkpoint size | {fp16_bytes / 2**20:.1f} MiB (fp16) | {dir_bytes(args.out) / 2**20:.1f} MiB |")
    print(f"| bits per quantized weight | 16 | {info['bits_per_weight']:.3f} |")
    print(f"| top-1 agreement with the unquantized model | 1.000 | {scores['top1']:.3f} |")
    print(f"| KL(teacher \u2016 student), nats/token | 0.000 | {scores['kl']:.3f} |")
    print(f"| tokens scored | {scores['tokens']} | {scores['tokens']} |")
    print(f"| greedy answers not empty | {scores['prompts']}/{scores['prompts']} | "
          f"{scores['non_empty']}/{scores['prompts']} |")
    print(f"| greedy answers on their prompt's subject (the unquantized model picks the prompt) | "
          f"{scores['teacher_on_topic']}/{scores['prompts']} | {scores['on_topic']}/{scores['prompts']} |")
    print()
    print(f"Prompt: {SAMPLE_PROMPT}")
    print(f"  unquantized: {teacher_answer}")
    print(f"  INT{args.bits}:        {student_answer or '(empty: the model ends its answer at once)'}")
    print()
    if args.bits == 2 and config.mix is None:
        print("Uniform INT2 at this size drifts off the prompt's subject in about half its answers; the default mix "
              "kv4 (k/v at INT4, the other layers' groups widened to the same 2.25-bit budget) stays on it far more "
              "often: drop --mix none (docs/BENCHMARKS.md).")
    print(f"Saved to {args.out}; reload with AutoModelForCausalLM.from_pretrained({args.out!r}) after `import upq_hf`.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
