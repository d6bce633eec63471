"""The ``upq`` command line: ``upq quantize``, ``upq info``, ``upq push``, ``upq eval``.

Argument parsing and printing only: quantizing is :func:`upq_hf.quantize_model`, the fidelity report
:func:`upq_hf.evaluation.measure_fidelity`, evaluating :func:`upq_hf.evaluation.evaluate_model`,
describing a checkpoint :func:`upq_hf.checkpoint.checkpoint_info`, uploading
:func:`upq_hf.publish.push_folder`; choices and defaults come from ``UPQConfig`` and the recipe registry.
Every error a user can cause (bad bits, unknown dataset or task, missing GPU, corrupt checkpoint,
existing output) ends with one line on stderr and exit status 2, and never leaves a half-written
checkpoint.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import sys
import time

from .formats import SCALE_INITS, SUPPORTED_BITS
from .recipes import RECIPES


def _group_size(text: str):
    if text.lower() in ("row", "none", "per-row", "channel"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be an integer or 'row', got {text!r}") from None


def _module_bits(text: str) -> tuple[str, object]:
    """``--module-bits PATTERN=BITS[:GROUP]``: one mixed-precision override (``UPQConfig.module_bits``)."""
    pattern, sep, spec = text.rpartition("=")
    bits, _, group = spec.partition(":")
    if not sep or not pattern or not bits.isdigit():
        raise argparse.ArgumentTypeError(f"--module-bits takes PATTERN=BITS or PATTERN=BITS:GROUP (e.g. "
                                         f"'k_proj=4', 'v_proj=4:32'), got {text!r}")
    if not group:
        return pattern, int(bits)
    return pattern, {"bits": int(bits), "group_size": _group_size(group)}


_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def _limit(text: str) -> int | float:
    """``--limit``: an integer count per task, or a fraction below 1."""
    if not _NUMBER.match(text):
        raise argparse.ArgumentTypeError(f"--limit must be a number, got {text!r}")
    value = float(text)
    return int(value) if value >= 1 else value


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


DEFAULT_INT2_MIX = "kv4"


def default_mix(args) -> str | None:
    """``--mix``, where ``none`` is uniform bits; unset, ``upq`` at INT2 takes ``kv4`` (k/v at INT4 at the bit
    budget of uniform INT2: docs/BENCHMARKS.md measured it far ahead of uniform INT2 at the same size)."""
    if args.mix is None:
        return DEFAULT_INT2_MIX if args.bits == 2 and args.recipe == "upq" else None
    return None if args.mix == "none" else args.mix


def cmd_quantize(args) -> int:
    import torch

    from . import UPQConfig, quantize_model
    from .models import default_device, load_model, load_tokenizer
    from .publish import REPORT_FILE, base_model_of, save_atomic
    from .quantizer import attach

    training = RECIPES[args.recipe].trains
    work_dir = args.work_dir or (f"{args.out.rstrip('/')}.work" if training else None)
    options = dict(bits=args.bits, group_size=args.group_size, recipe=args.recipe, scale_init=args.scale_init,
                   backend=args.backend, dataset=args.dataset, self_prompts=args.self_prompts,
                   nsamples=args.nsamples, seqlen=args.seqlen, ptq_algorithm=args.ptq_algorithm,
                   ptq_epochs=args.ptq_epochs, int4_group_size=args.int4_group_size,
                   int4_checkpoint=(args.keep_int4 or f"{args.out.rstrip('/')}-int4") if args.recipe == "upq" else None,
                   int2_ptq=not args.no_int2_ptq, train_steps=args.train_steps,
                   train_batch_size=args.train_batch_size, train_seqlen=args.train_seqlen,
                   learning_rate=args.lr, scale_learning_rate=args.scale_lr, beta=args.beta,
                   train_norms=False if args.no_train_norms else None,
                   temperature=args.temperature, work_dir=work_dir, resume=args.resume,
                   device=args.device or default_device(), seed=args.seed, ptq_loss=args.ptq_loss,
                   ptq_batch_size=args.ptq_batch_size, int4_ptq_epochs=args.int4_ptq_epochs,
                   train_samples=args.train_samples, teacher_topk=args.teacher_topk,
                   mixed_precision=args.mixed_precision, e2e_qp_steps=args.e2e_qp_steps,
                   train_codes=True if args.train_codes else None,
                   e2e_qp_learning_rate=args.e2e_qp_lr,
                   module_bits=dict(args.module_bits) if args.module_bits else None, mix=default_mix(args))
    config = UPQConfig(**{k: v for k, v in options.items() if v is not None or k in ("group_size", "backend")})
    source = _check_before_work(args, config)
    start = time.time()
    print(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ({source}) on {config.device}",
          file=sys.stderr)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as error:  # a bare weights folder: round-to-nearest needs no tokenizer
        if config.recipe != "rtn":
            raise ValueError(f"recipe {config.recipe!r} needs the model's tokenizer: {error}") from error
        print(f"upq: warning: no tokenizer loaded from {source}; the checkpoint is saved without one",
              file=sys.stderr)
        tokenizer = None
    if config.recipe == "rtn":  # quantized tensor by tensor as the weights load, no dense copy (upq_hf.streaming)
        model = attach(load_model(source, dtype="float32", quantization_config=config, device_map=config.device),
                       config)
    else:  # the other recipes need the dense model (calibration through its blocks, the teacher)
        model = load_model(source, dtype="float32")
        model.to(config.device)
        quantize_model(model, config, tokenizer=tokenizer, progress=True)
    save_dtype = getattr(torch, args.dtype)
    for param in model.parameters():  # the unquantized rest (embeddings, norms, biases); codes/scales untouched
        param.data = param.data.to(save_dtype)
    model.config.dtype = args.dtype
    report = {"base_model": base_model_of(args.model or "bundled"),
              "quantize_seconds": round(time.time() - start, 1)}
    if args.fidelity_prompts and tokenizer is not None:
        report["metrics"], report["answers"] = _fidelity_report(model, source, tokenizer, args.fidelity_prompts)
        print(f"fidelity on {args.fidelity_prompts} held-out prompts: {report['metrics']}", file=sys.stderr)
    # the saved config records the recipe, not where this run kept its scratch files
    config.work_dir = config.resume = config.device = None
    target = save_atomic(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                         extra_files={REPORT_FILE: json.dumps(report, indent=2)})
    if work_dir and os.path.isdir(work_dir) and not args.keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"saved {target} in {time.time() - start:.0f} s", file=sys.stderr)
    return cmd_info(argparse.Namespace(path=str(target), json=False, layers=False))


def _check_before_work(args, config) -> str:
    """Everything that can be checked before any expensive work: a GPU-only option without a GPU, the output,
    the model's source (a folder, or a Hub id within reach), its tokenizer, every layer against the format
    (on the architecture built without weights). Returns what to load the model from."""
    from .models import check_backend, check_device, check_layers_of, check_source, has_tokenizer
    from .publish import prepare_target

    check_device(config.device, f"--device {config.device}", "use --device cpu")
    check_backend(args.backend, f"--backend {args.backend}", "leave --backend unset (the automatic choice)")
    prepare_target(args.out, args.overwrite)
    source = check_source(args.model)
    if config.recipe != "rtn" and not has_tokenizer(source):
        raise ValueError(f"recipe {config.recipe!r} needs the model's tokenizer and {source} has none (no "
                         f"tokenizer.json or tokenizer_config.json): save it into the folder "
                         f"(tokenizer.save_pretrained) or use --recipe rtn")
    check_layers_of(source, config)
    return source


def _fidelity_report(model, source: str, tokenizer, n_prompts: int) -> tuple[dict, dict]:
    """The model card's fidelity numbers (:func:`upq_hf.evaluation.measure_fidelity` against ``source``) and the
    quantized model's greedy answers to the same held-out prompts."""
    from .evaluation import measure_fidelity, report_metrics
    from .models import load_model

    teacher = load_model(source, dtype="float32").to(next(model.parameters()).device)
    scores = measure_fidelity(model, teacher, tokenizer, n_prompts, max_new_tokens=64, progress=True, answers=True)
    return report_metrics(scores), scores["answers"]


def cmd_push(args) -> int:
    from .publish import push_folder

    commit = push_folder(args.path, args.repo_id, token=args.token, private=args.private or None)
    print(f"pushed {args.path} to {commit.commit_url}")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import checkpoint_info

    info = checkpoint_info(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    q = info["quantization_config"]
    groups = "per-row" if q.get("group_size") is None else f"group_size {q['group_size']}"
    print(f"{info['path']}: UPQ INT{q['bits']} ({'SEQ' if q['bits'] == 2 else 'asymmetric'}), {groups}, "
          f"recipe {q.get('recipe')}, format v{q.get('format_version')}")
    by_bits: dict[int, int] = {}
    for entry in info["layers"].values():
        by_bits[entry["bits"]] = by_bits.get(entry["bits"], 0) + 1
    mixed = ", ".join(f"{count} at INT{b}" for b, count in sorted(by_bits.items()))
    preset = f", preset {q['mix']}" if q.get("mix") else ""
    print(f"  quantized layers      {len(info['layers'])}{f'  (mixed: {mixed}{preset})' if len(by_bits) > 1 else ''}")
    print(f"  quantized weights     {info['quantized_weights']:,}")
    routers = sum(1 for reason in info["decoder_dense_weights"].values() if reason == "router")
    others = len(info["decoder_dense_weights"]) - routers
    kept = ", ".join(part for part in (f"{routers} routers" if routers else "", f"{others} other" if others else "")
                     if part)
    print(f"  decoder quantized     {info['decoder_quantized_fraction']:.1%} of its weights"
          f"{f'  (dense: {kept})' if kept else ''}")
    zeros = " + zeros" if 4 in by_bits else ""
    print(f"  bits per weight       {info['bits_per_weight']:.3f}  (average: codes + scales{zeros})")
    print(f"  packed tensors        {_human_bytes(info['quantized_bytes'])}")
    print(f"  other tensors         {_human_bytes(info['other_tensor_bytes'])}  (embeddings, norms, unquantized layers)")
    print(f"  on disk               {_human_bytes(info['disk_bytes'])}")
    if args.layers:
        for name, entry in info["layers"].items():
            print(f"  {name:48s} INT{entry['bits']} {entry['out_features']:>6} x {entry['in_features']:<6} "
                  f"groups {entry['groups']}")
    return 0


def cmd_eval(args) -> int:
    """``upq eval``: lm-eval tasks (offline from local files if need be) and our fidelity report."""
    from .evaluation import evaluate_model, summary_table

    results = evaluate_model(
        args.model, args.tasks, data_files=args.data_files, output=args.output, batch_size=args.batch_size,
        limit=args.limit, num_fewshot=args.num_fewshot, apply_chat_template=args.apply_chat_template,
        gen_kwargs=args.gen_kwargs, max_gen_toks=args.max_gen_toks, teacher=args.teacher,
        device=args.device, dtype=args.dtype, log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters, fidelity_max_new_tokens=args.fidelity_tokens, seed=args.seed,
        threads=args.threads)
    print(summary_table(results))
    print(f"upq: evaluated in {results['upq']['wall_seconds']:.0f} s"
          + (f"; results written to {args.output}" if args.output else ""), file=sys.stderr)
    return 0


class _Parser(argparse.ArgumentParser):
    """A usage error is one line too (argparse prints the whole usage first), exit status 2."""

    def error(self, message):
        self.exit(2, f"upq: error: {message} (see {self.prog} --help)\n")


def one_line(error: BaseException) -> str:
    """An error's message on one line (some libraries' messages span several)."""
    return " ".join(str(error).split()) or type(error).__name__


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .config import MIXED_PRECISIONS, MIXES, PTQ_LOSSES, UPQConfig
    from .ptq import ALGORITHMS

    default = {name: p.default for name, p in inspect.signature(UPQConfig.__init__).parameters.items()}
    parser = _Parser(prog="upq", description="Unified Progressive Quantization for transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a UPQ checkpoint")
    q.add_argument("model", nargs="?", default=None,
                   help="Hub id or local folder (default: the bundled SmolLM2-135M-Instruct)")
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, required=True)
    q.add_argument("--group-size", type=_group_size, default=default["group_size"],
                   help=f"input columns per scale, or 'row' (default {default['group_size']})")
    q.add_argument("--recipe", default="rtn", choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    data = q.add_argument_group("data (ptq, upq, ntp, distill)")
    data.add_argument("--dataset", default=None,
                      help="'self' (default: the model's own answers to built-in prompts), a Hub dataset, "
                           "or a local .txt/.jsonl/.parquet file or folder")
    data.add_argument("--self-prompts", type=int, default=None, help="built-in prompts answered for 'self'")
    data.add_argument("--nsamples", type=int, default=None, help=f"PTQ calibration sequences (default {default['nsamples']})")
    data.add_argument("--seqlen", type=int, default=None, help=f"PTQ calibration length (default {default['seqlen']})")
    ptq = q.add_argument_group("block-wise PTQ")
    ptq.add_argument("--ptq-algorithm", default=None, choices=ALGORITHMS)
    ptq.add_argument("--ptq-epochs", type=int, default=None,
                     help=f"passes over the calibration data per block (default {default['ptq_epochs']})")
    ptq.add_argument("--ptq-batch-size", type=int, default=None,
                     help=f"calibration sequences per step (default {default['ptq_batch_size']})")
    ptq.add_argument("--ptq-loss", default=None, choices=PTQ_LOSSES,
                     help=f"block reconstruction error (default {default['ptq_loss']})")
    ptq.add_argument("--int4-ptq-epochs", type=int, default=None,
                     help=f"epochs of upq's INT4 stage (default {default['int4_ptq_epochs']})")
    ptq.add_argument("--int4-group-size", type=_group_size, default=default["int4_group_size"],
                     help="group size of the INT4 stage (upq)")
    ptq.add_argument("--keep-int4", default=None, help="where upq keeps the INT4 model (default OUT-int4); "
                                                      "a later run restarts from it")
    ptq.add_argument("--no-int2-ptq", action="store_true",
                     help="upq: skip the block-wise INT2 reconstruction between the INT4 model and distillation")
    train = q.add_argument_group("training (upq, ntp, distill)")
    train.add_argument("--train-steps", type=int, default=None, help=f"optimizer steps (default {default['train_steps']})")
    train.add_argument("--train-batch-size", type=int, default=None, help=f"sequences per step (default {default['train_batch_size']})")
    train.add_argument("--train-seqlen", type=int, default=None, help=f"tokens per sequence (default {default['train_seqlen']})")
    train.add_argument("--lr", type=float, default=None, help=f"latent weights' learning rate: fraction of a quantization step per update (default {default['learning_rate']})")
    train.add_argument("--scale-lr", type=float, default=None, help=f"scales' learning rate: relative change per update (default {default['scale_learning_rate']})")
    train.add_argument("--beta", type=float, default=None, help=f"generalized JSD beta (default {default['beta']}; 0: forward KL(teacher || student), 0.5: symmetric JSD)")
    train.add_argument("--no-train-norms", action="store_true",
                       help="keep the normalisation layers frozen (default: trained with the quantized layers)")
    train.add_argument("--temperature", type=float, default=None)
    train.add_argument("--train-samples", type=int, default=None,
                       help=f"distinct training sequences, cycled for several epochs (default {default['train_samples']})")
    train.add_argument("--teacher-topk", type=int, default=None,
                       help=f"cache the teacher's top-k distributions once (default {default['teacher_topk']}; "
                            "0: run the teacher at every step)")
    train.add_argument("--mixed-precision", default=None, choices=MIXED_PRECISIONS,
                       help=f"autocast of PTQ and QAT (default {default['mixed_precision']}: bf16 where the device "
                            "multiplies bf16 natively)")
    train.add_argument("--train-codes", action="store_true",
                       help="upq: Distill-QAT trains the latent weights too, so codes may flip (default: the INT2 "
                            "reconstruction's codes stay fixed and the scales and norms train)")
    train.add_argument("--e2e-qp-steps", type=int, default=None,
                       help=f"upq, ptq: a last stage of this many steps with the codes fixed, training the scales "
                            f"only (EfficientQAT's E2E-QP; default {default['e2e_qp_steps']}: none)")
    train.add_argument("--e2e-qp-lr", type=float, default=None,
                       help=f"the E2E-QP stage's scale learning rate (default {default['e2e_qp_learning_rate']})")
    train.add_argument("--work-dir", default=None, help="trainer checkpoints (default OUT.work, removed on success)")
    train.add_argument("--resume", action="store_true", help="continue from the last trainer checkpoint")
    train.add_argument("--keep-work", action="store_true", help="keep the trainer checkpoints after success")
    q.add_argument("--module-bits", type=_module_bits, action="append", default=None, metavar="PATTERN=BITS[:GROUP]",
                   help="mixed precision: layers whose name matches the regular expression PATTERN get BITS "
                        "(and GROUP); repeatable, the first match decides (e.g. --module-bits '(k|v)_proj=4')")
    q.add_argument("--mix", default=None, choices=[*MIXES, "none"],
                   help="a named mixed-precision preset (INT2 only): kv4 (the default of --recipe upq at --bits 2) "
                        "keeps attention k/v at INT4 and widens the other layers' groups to pay for it (2.23 bits "
                        "per weight on the bundled model, against 2.25 for uniform INT2 g64); kv-edge also keeps the "
                        "first and last blocks' down_proj at INT4 (2.48); none: every layer at --bits. "
                        "--module-bits patterns come before it")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--fidelity-prompts", type=int, default=16,
                   help="held-out prompts for the fidelity numbers in the model card (0: skip)")
    q.add_argument("--scale-init", default=default["scale_init"], choices=SCALE_INITS)
    q.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the tensors left unquantized in the saved checkpoint")
    q.add_argument("--device", default=None,
                   help="where to run the quantization (cpu, cuda, cuda:1; default cuda if a GPU is visible, else cpu)")
    q.add_argument("--backend", default=None, choices=BACKENDS)
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.set_defaults(func=cmd_quantize)

    p = sub.add_parser("push", help="upload a saved UPQ checkpoint (with its model card) to the Hub")
    p.add_argument("path")
    p.add_argument("repo_id")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    i = sub.add_parser("info", help="describe a saved UPQ checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.set_defaults(func=cmd_info)

    e = sub.add_parser("eval", help="benchmark a model with lm-evaluation-harness (pip install upq_hf[eval]) "
                                    "and/or its fidelity to the unquantized teacher")
    e.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder or UPQ checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    e.add_argument("--tasks", required=True,
                   help="comma-separated: mmlu, ifeval, fidelity (ours: top-1/KL/JSD against the teacher) "
                        "or any other lm-eval task name")
    e.add_argument("--data-files", action="append", default=None, metavar="TASK=PATH",
                   help="run TASK from a local .jsonl/.json/.parquet file or folder in the benchmark's own "
                        "format instead of the Hub: --data-files mmlu=mmlu/ --data-files ifeval=ifeval.jsonl")
    e.add_argument("--output", default=None, help="JSON file for the results (written atomically)")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--limit", type=_limit, default=None,
                   help="examples per task (lm-eval's --limit; each MMLU subject is a task), and the number "
                        "of fidelity prompts; a fraction below 1 takes that share")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's own)")
    e.add_argument("--apply-chat-template", action="store_true", help="format prompts with the chat template")
    e.add_argument("--gen-kwargs", default=None,
                   help="generation settings for generative tasks, lm-eval style: max_gen_toks=256,temperature=0")
    e.add_argument("--max-gen-toks", type=int, default=None,
                   help="cap on generated tokens (IFEval's own is 1280)")
    e.add_argument("--teacher", default=None,
                   help="unquantized model for fidelity (default: the checkpoint's base model, else the bundled one)")
    e.add_argument("--fidelity-tokens", type=int, default=64, help="teacher answer length for fidelity")
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 (default cpu)")
    e.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the model's unquantized tensors while evaluating")
    e.add_argument("--log-samples", action="store_true", help="keep every prompt and answer in the JSON")
    e.add_argument("--bootstrap-iters", type=int, default=100000, help="lm-eval's stderr bootstrap iterations")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's; 1 is much faster on an oversubscribed machine)")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("upq: interrupted; no checkpoint was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError, OSError) as error:
        print(f"upq: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
