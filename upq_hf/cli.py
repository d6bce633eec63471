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
import json
import os
import re
import shutil
import sys
import time

from .formats import SUPPORTED_BITS
from .recipes import RECIPES
from .stages import BUDGET_HELP


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


def read_config_file(path: str) -> dict:
    """``--config FILE``: ``UPQConfig`` keyword arguments, the stage configs as nested mappings
    (``{"ptq": {"epochs": 6}, "distill": {"steps": 20}}``), in YAML (``.yaml``/``.yml``) or JSON."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as error:  # noqa: BLE001 - yaml and json raise their own types
        raise ValueError(f"--config {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}: "
                         f"{one_line(error)}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a mapping of UPQConfig fields, got {type(values).__name__}")
    return values


def build_config(args):
    """The ``UPQConfig`` of ``upq quantize``: the defaults, then ``--budget``, then ``--config FILE``, then the
    flags given."""
    from .config import UPQConfig, budget

    from_file = read_config_file(args.config) if args.config else {}
    flags = {key: getattr(args, key) for key in ("bits", "recipe", "backend", "seed") if getattr(args, key) is not None}
    if args.group_size is not _UNSET:
        flags["group_size"] = args.group_size
    if args.mix is not _UNSET:
        flags["mix"] = None if args.mix == "none" else args.mix
    if args.rotation is not _UNSET:
        flags["rotation"] = None if args.rotation == "none" else args.rotation
    if args.module_bits:
        flags["module_bits"] = dict(args.module_bits)
    values = budget(args.budget, flags.get("recipe", from_file.get("recipe", "rtn")))
    for key, value in {**from_file, **flags}.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) \
            else value
    if args.dataset is not None:
        values["data"] = {**values.get("data", {}), "dataset": args.dataset}
    return UPQConfig(**values)


_UNSET = object()


def cmd_quantize(args) -> int:
    import torch

    from . import quantize_model
    from .models import default_device, load_model, load_tokenizer
    from .publish import REPORT_FILE, base_model_of, save_atomic
    from .quantizer import attach
    from .recipes import Run
    from .streamed import choose, quantize_streamed

    config = build_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if not args.out:
        raise ValueError("upq quantize needs --out DIR, the folder to write the checkpoint to")
    training = RECIPES[config.recipe].trains
    work_dir = args.work_dir or (f"{args.out.rstrip('/')}.work" if training else None)
    keep_int4 = args.keep_int4 or (os.path.join(work_dir, "int4") if config.recipe == "upq" else None)
    device = args.device or default_device()
    source = _check_before_work(args, config, device)
    stream, why = choose(source, config, device, args.stream) if config.recipe != "rtn" else (False, "")
    if why:
        print(f"upq: {why}", file=sys.stderr)
    start = time.time()
    print(f"loading {args.model or 'the bundled SmolLM2-135M-Instruct'} ({source}) on {device}", file=sys.stderr)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError) as error:  # a bare weights folder: round-to-nearest needs no tokenizer
        if config.recipe != "rtn":
            raise ValueError(f"recipe {config.recipe!r} needs the model's tokenizer: {error}") from error
        print(f"upq: warning: no tokenizer loaded from {source}; the checkpoint is saved without one",
              file=sys.stderr)
        tokenizer = None
    if config.recipe == "rtn":  # quantized tensor by tensor as the weights load, no dense copy (upq_hf.streaming)
        model = attach(load_model(source, dtype="float32", quantization_config=config, device_map=device), config)
    elif stream:  # the dense weights stay on disk, a block at a time in memory (upq_hf.streamed)
        model, teacher = quantize_streamed(source, config, Run(tokenizer, device, work_dir, args.resume,
                                                               progress=True))
        attach(model, config)
    else:  # the other recipes need the dense model (calibration through its blocks, the teacher)
        model = load_model(source, dtype="float32")
        model.to(device)
        quantize_model(model, config, tokenizer=tokenizer, device=device, work_dir=work_dir, resume=args.resume,
                       keep_int4=keep_int4, progress=True)
    save_dtype = getattr(torch, args.dtype)
    for param in model.parameters():  # the unquantized rest (embeddings, norms, biases); codes/scales untouched
        param.data = param.data.to(save_dtype)
    model.config.dtype = args.dtype
    report = {"base_model": base_model_of(args.model or "bundled"),
              "quantize_seconds": round(time.time() - start, 1)}
    if args.fidelity_prompts and tokenizer is not None:
        if stream:
            with teacher._upq_block_store.streaming():
                report["metrics"], report["answers"] = _fidelity_report(model, source, tokenizer,
                                                                        args.fidelity_prompts, teacher)
        else:
            report["metrics"], report["answers"] = _fidelity_report(model, source, tokenizer, args.fidelity_prompts)
        print(f"fidelity on {args.fidelity_prompts} held-out prompts: {report['metrics']}", file=sys.stderr)
    target = save_atomic(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite,
                         extra_files={REPORT_FILE: json.dumps(report, indent=2)})
    if work_dir and os.path.isdir(work_dir) and not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(f"saved {target} in {time.time() - start:.0f} s", file=sys.stderr)
    return cmd_info(argparse.Namespace(path=str(target), json=False, layers=False))


def _check_before_work(args, config, device: str) -> str:
    """Everything that can be checked before any expensive work: a GPU-only option without a GPU, the output,
    the model's source (a folder, or a Hub id within reach), its tokenizer, every layer against the format
    (on the architecture built without weights). Returns what to load the model from."""
    from .models import check_backend, check_device, check_layers_of, check_source, has_tokenizer
    from .publish import prepare_target

    check_device(device, f"--device {device}", "use --device cpu")
    check_backend(args.backend, f"--backend {args.backend}", "leave --backend unset (the automatic choice)")
    prepare_target(args.out, args.overwrite)
    source = check_source(args.model)
    if config.recipe != "rtn" and not has_tokenizer(source):
        raise ValueError(f"recipe {config.recipe!r} needs the model's tokenizer and {source} has none (no "
                         f"tokenizer.json or tokenizer_config.json): save it into the folder "
                         f"(tokenizer.save_pretrained) or use --recipe rtn")
    check_layers_of(source, config)
    return source


def _fidelity_report(model, source: str, tokenizer, n_prompts: int, teacher=None) -> tuple[dict, dict]:
    """The model card's fidelity numbers (:func:`upq_hf.evaluation.measure_fidelity` against ``source``, or the
    ``teacher`` given) and the quantized model's greedy answers to the same held-out prompts."""
    from .evaluation import measure_fidelity, report_metrics
    from .models import load_model

    if teacher is None:
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


def cmd_export(args) -> int:
    from .gguf_export import export_gguf

    report = export_gguf(args.path, args.gguf, fallback=args.fallback, dense_type=args.dense_type)
    for layer, why in report.fallbacks.items():
        print(f"upq: {layer} written dense: {why}", file=sys.stderr)
    print(report.summary())
    return 0


def cmd_generate(args) -> int:
    """``upq generate``: answer one chat prompt, streamed, with the native decoder where it runs."""
    import time

    import torch

    from .chat import chat_prompt_ids, end_token_ids
    from .models import load_model, load_tokenizer

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.backend:  # the layers and the output head read it when they run
        os.environ["UPQ_BACKEND"] = args.backend
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import TextStreamer

    from .native import NativeDecoder, native_problem

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=args.dtype)
    problem = native_problem(model)
    if args.engine == "native" and problem:
        raise ValueError(f"--engine native: {problem}")
    native = args.engine != "transformers" and problem is None
    ids = torch.tensor([chat_prompt_ids(tokenizer, args.prompt)])
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = end_token_ids(model, tokenizer)
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p)
    generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()
    with torch.no_grad():
        if native:
            decoder = NativeDecoder(model, max_length=ids.shape[1] + args.max_new_tokens)
            out = decoder.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=stops, streamer=streamer,
                                   generator=generator, **sampling)
            t = decoder.timings
            how = f"native decode{', int8 activations' if decoder.int8_activations else ''}"
            speed = (f"prompt {t['prompt_tokens']} tokens in {t['prompt_s']:.2f} s, {t['new_tokens']} new in "
                     f"{t['decode_s'] + t['prompt_s']:.2f} s ({max(t['new_tokens'] - 1, 1) / max(t['decode_s'], 1e-9):.1f}"
                     " tokens/s after the first)")
        else:
            torch.manual_seed(args.seed)
            out = model.generate(ids, max_new_tokens=args.max_new_tokens, eos_token_id=stops, streamer=streamer,
                                 pad_token_id=tokenizer.pad_token_id, **(sampling if sampling["do_sample"] else
                                                                         {"do_sample": False}))
            how = "transformers generate" + (f" (native decode does not run here: {problem})" if problem else "")
            elapsed = time.perf_counter() - started
            speed = f"{out.shape[1] - ids.shape[1]} new tokens in {elapsed:.2f} s"
    print(f"upq: {how}; {speed}", file=sys.stderr)
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
    from .config import MIXES
    from .rotation import ROTATIONS
    from .stages import BUDGETS

    parser = _Parser(prog="upq", description="Unified Progressive Quantization for transformers")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a UPQ checkpoint",
                       description="Quantize a model and save a UPQ checkpoint. The format and the recipe take flags; "
                                   "every stage setting (upq_hf/stages.py) takes --config FILE; --print-config shows "
                                   "them all, resolved.")
    q.add_argument("model", nargs="?", default=None,
                   help="Hub id or local folder (default: the bundled SmolLM2-135M-Instruct)")
    q.add_argument("--bits", type=int, choices=SUPPORTED_BITS, required=True)
    q.add_argument("--group-size", type=_group_size, default=_UNSET,
                   help="input columns per scale, or 'row' for one scale per output row (default 64)")
    q.add_argument("--recipe", default=None, choices=list(RECIPES),
                   help="; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()))
    q.add_argument("--mix", default=_UNSET, choices=["auto", *MIXES, "none"],
                   help="mixed precision: auto (the default) is kv4 for --recipe upq at --bits 2 and none otherwise; "
                        + "; ".join(f"{name}: {text}" for name, text in MIXES.items()))
    q.add_argument("--rotation", default=_UNSET, choices=["auto", *ROTATIONS, "none"],
                   help="turn the residual stream by a Hadamard matrix fused into the weights before quantizing: "
                        "hadamard, auto (the default: where --recipe upq at --bits 2 on a model that rotates in "
                        "memory) or none")
    q.add_argument("--module-bits", type=_module_bits, action="append", default=None, metavar="PATTERN=BITS[:GROUP]",
                   help="per-module format by name pattern (a regular expression; repeatable, the first match "
                        "wins, before the mix's): --module-bits 'k_proj=4' --module-bits 'down_proj=4:32'")
    q.add_argument("--dataset", default=None,
                   help="calibration/training text: self (the model's own answers to built-in prompts, the "
                        "default), a Hub dataset, a .txt/.jsonl/.parquet file or folder")
    q.add_argument("--budget", default="default", choices=list(BUDGETS),
                   help="; ".join(f"{name}: {text}" for name, text in BUDGET_HELP.items()))
    q.add_argument("--config", default=None, metavar="FILE",
                   help="YAML or JSON of UPQConfig fields and stage configs ({ptq: {epochs: 6}, distill: {steps: "
                        "20}, ...}); flags given override it")
    q.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    q.add_argument("--seed", type=int, default=None)
    q.add_argument("--device", default=None,
                   help="where to run the quantization (cpu, cuda, cuda:1; default cuda if a GPU is visible, else cpu)")
    q.add_argument("--backend", default=None, choices=BACKENDS)
    q.add_argument("--out", default=None, help="output folder (written atomically; required but with --print-config)")
    q.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    q.add_argument("--stream", default="auto", choices=["auto", "on", "off"],
                   help="recipe upq: read the dense weights from disk a block at a time, for a model larger than "
                        "memory (auto: when the in-memory path would not fit; a safetensors checkpoint)")
    q.add_argument("--resume", action="store_true", help="continue from the last trainer checkpoint in --work-dir")
    q.add_argument("--work-dir", default=None,
                   help="trainer checkpoints and upq's INT4 stage (default OUT.work, removed once the checkpoint is "
                        "saved; kept if given)")
    q.add_argument("--keep-int4", default=None, metavar="DIR",
                   help="where upq keeps its INT4 stage (default WORK/int4); a later run with the same settings "
                        "restarts from it")
    q.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                   help="dtype of the tensors left unquantized in the saved checkpoint")
    q.add_argument("--fidelity-prompts", type=int, default=16,
                   help="held-out chat prompts for the fidelity report in the model card (0: none)")
    q.set_defaults(func=cmd_quantize)

    p = sub.add_parser("push", help="upload a saved UPQ checkpoint (with its model card) to the Hub")
    p.add_argument("path")
    p.add_argument("repo_id")
    p.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    x = sub.add_parser("export", help="write a UPQ checkpoint as a GGUF file that llama.cpp runs with the same weights")
    x.add_argument("path", help="a saved UPQ checkpoint folder (with its tokenizer)")
    x.add_argument("--gguf", required=True, metavar="OUT", help="the GGUF file to write (atomically)")
    x.add_argument("--fallback", default="error", choices=["error", "dense"],
                   help="a layer no llama.cpp type holds exactly: an error (default), or written dense")
    x.add_argument("--dense-type", default=None, choices=["F32", "F16", "BF16"],
                   help="type of the embeddings and other dense tensors (default: their own dtype)")
    x.set_defaults(func=cmd_export)

    i = sub.add_parser("info", help="describe a saved UPQ checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("generate", help="answer a chat prompt with a model or UPQ checkpoint (the native decoder "
                                        "where it runs: the fastest CPU decode)")
    g.add_argument("model", nargs="?", default=None,
                   help="Hub id, local folder or UPQ checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    g.add_argument("--prompt", required=True, help="the user's message (the chat template wraps it)")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--engine", default="auto", choices=["auto", "native", "transformers"],
                   help="native: the decoder stack in C++ (upq_hf.native; Llama, Mistral, Qwen2, Qwen3 on the CPU); "
                        "transformers: model.generate; auto: native where it runs")
    g.add_argument("--backend", default=None, choices=BACKENDS,
                   help="kernel of the UPQ layers (a8: int8 activations and head, fastest, not exact)")
    g.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the model's unquantized tensors")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g.set_defaults(func=cmd_generate)

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
