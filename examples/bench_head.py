"""The output head under the ``a8`` backend (upq_hf/head.py): what its int8 weights cost in fidelity and buy in
decode speed.

* fidelity (``--fidelity``): on the bundled model's greedy answers to the first ``--prompts`` validation prompts, the
  head's logits at every position against an fp32 head: the bf16 dense head as models run it, and the int8 head
  (per-row int8 weights, bf16 activations, torch's int8 kernel); top-1 agreement and KL(fp32 || head);
* speed: ``generate`` of ``--tokens`` greedy tokens on CHECKPOINT with ``UPQ_BACKEND=a8``, the int8 head and the
  dense head interleaved in one process (``--runs`` rounds; the same layers, the same machine state), eager or with
  a static cache and a compiled step (``--compiled``).

    python examples/bench_head.py --fidelity
    python examples/bench_head.py CHECKPOINT [--dense DIR] [--tokens 64] [--runs 3] [--compiled] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F


def fidelity(prompts: int) -> None:
    from transformers import AutoModelForCausalLM

    from upq_hf.chat import chat_prompt_ids
    from upq_hf.head import int8_rows
    from upq_hf.models import bundled_model_dir, load_tokenizer
    from upq_hf.prompts import VALIDATION_PROMPTS

    source = bundled_model_dir()
    tokenizer = load_tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).eval()
    weight = model.get_output_embeddings().weight.detach()
    q, scale = int8_rows(weight)
    stats, positions = {}, 0
    with torch.no_grad():
        for prompt in VALIDATION_PROMPTS[:prompts]:
            ids = torch.tensor([chat_prompt_ids(tokenizer, prompt)])
            out = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            hidden = model.model(out).last_hidden_state[0]
            reference = F.linear(hidden.float(), weight.float()).log_softmax(-1)
            for name, logits in (("dense bf16 head (as models run it)", F.linear(hidden, weight)),
                                 ("int8 head (a8: per-row int8, bf16)",
                                  torch._weight_int8pack_mm(hidden.contiguous(), q, scale.bfloat16()))):
                agree, kl = stats.get(name, (0, 0.0))
                logp = logits.float().log_softmax(-1)
                stats[name] = (agree + (reference.argmax(-1) == logp.argmax(-1)).sum().item(),
                               kl + F.kl_div(logp, reference, log_target=True, reduction="sum").item())
            positions += hidden.shape[0]
    print(f"| against an fp32 head ({positions} positions, {prompts} validation answers) | top-1 | KL |\n|---|---:|---:|")
    for name, (agree, kl) in stats.items():
        print(f"| {name} | {agree / positions:.4f} | {kl / positions:.5f} |")


def speed(args) -> None:
    from transformers import AutoModelForCausalLM

    import upq_hf  # noqa: F401
    from upq_hf.chat import chat_prompt_ids
    from upq_hf.head import UPQHead
    from upq_hf.models import bundled_model_dir, load_tokenizer

    tokenizer = load_tokenizer(args.dense or bundled_model_dir())
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16).eval()
    ids = torch.tensor([chat_prompt_ids(tokenizer, "Write a short poem about the sea.")])
    settings = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                    pad_token_id=tokenizer.eos_token_id)
    if args.compiled:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_decode import compiled_settings

        settings.update(compiled_settings("default"))
    takes = UPQHead.takes
    arms = {"int8 head": takes, "dense head": lambda self, x: False}
    rates = {name: [] for name in arms}
    with torch.no_grad():
        for name, rule in arms.items():  # warm-up (and compile) each arm once
            UPQHead.takes = rule
            model.generate(ids, **settings)
        for _ in range(args.runs):
            for name, rule in arms.items():
                UPQHead.takes = rule
                started = time.perf_counter()
                model.generate(ids, **settings)
                rates[name].append(args.tokens / (time.perf_counter() - started))
    UPQHead.takes = takes
    mode = "static cache + compiled step" if args.compiled else "eager"
    print(f"| {args.checkpoint}, a8, {mode}, {args.threads} threads | tokens/s, each run |\n|---|---|")
    for name, values in rates.items():
        print(f"| {name} | {' / '.join(f'{v:.1f}' for v in values)} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", default=None)
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--dense", default=None, help="where the tokenizer is (default: the bundled model)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.fidelity:
        fidelity(args.prompts)
    if args.checkpoint:
        os.environ["UPQ_BACKEND"] = "a8"
        speed(args)
    if not (args.fidelity or args.checkpoint):
        parser.error("give a CHECKPOINT to time, --fidelity, or both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
