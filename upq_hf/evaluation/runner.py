"""``upq eval``: benchmark a model (dense or UPQ) with lm-evaluation-harness and/or its fidelity.

The model -- a Hub id, a local folder, a UPQ checkpoint or the bundled SmolLM2-135M-Instruct -- is
loaded with plain ``from_pretrained`` (``import upq_hf`` has registered the quantizer, so a UPQ
checkpoint comes back packed) and handed to lm-eval as ``HFLM(pretrained=model, tokenizer=...)``;
``lm_eval.simple_evaluate`` then runs the tasks (:mod:`upq_hf.evaluation.harness`, offline from local
files through :mod:`upq_hf.evaluation.local_tasks`) and does all of the scoring. ``fidelity`` is ours,
not lm-eval's: top-1 agreement, KL and JSD against the unquantized teacher on held-out chat prompts
(:func:`upq_hf.evaluation.fidelity.measure_fidelity`); it needs neither lm-eval nor data files.
Everything about tasks and data is checked before any model is loaded; the results go to one JSON
file, written atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .fidelity import measure_fidelity
from .harness import EvalSetupError, lm_eval_version, load_tasks, merge_gen_kwargs
from .local_tasks import build_task_specs

FIDELITY = "fidelity"


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"mmlu,ifeval"`` or ``["mmlu", "ifeval"]`` -> ``["mmlu", "ifeval"]`` (order kept, no repeats)."""
    items = tasks.split(",") if isinstance(tasks, str) else [t for part in tasks for t in str(part).split(",")]
    names: list[str] = []
    for item in (t.strip() for t in items):
        if item and item not in names:
            names.append(item)
    if not names:
        raise EvalSetupError("no task given: pass --tasks, e.g. --tasks mmlu,ifeval,fidelity")
    return names


def parse_data_files(specs: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """``["mmlu=rows.jsonl", "ifeval=dir/"]`` (or a dict) -> ``{"mmlu": "rows.jsonl", ...}``."""
    if not specs:
        return {}
    if isinstance(specs, Mapping):
        return {str(k).strip(): str(v) for k, v in specs.items()}
    found: dict[str, str] = {}
    for spec in specs:
        for part in str(spec).split(","):
            if not part.strip():
                continue
            task, sep, path = part.partition("=")
            if not sep or not task.strip() or not path.strip():
                raise EvalSetupError(f"--data-files expects TASK=PATH (e.g. mmlu=data/mmlu.jsonl), got {part!r}")
            found[task.strip()] = path.strip()
    return found


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def quantization_of(source: str) -> dict | None:
    """The UPQ ``quantization_config`` of a local checkpoint folder, else None."""
    config = _read_json(Path(source) / "config.json")
    q = config.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "upq" else None


def default_teacher(source: str) -> str | None:
    """The unquantized model a checkpoint came from (its ``upq_report.json`` or ``_name_or_path``); None
    (the bundled model) when that is unknown or the model is not a UPQ checkpoint."""
    if quantization_of(source) is None:
        return None
    from ..publish import REPORT_FILE

    folder = Path(source)
    base = _read_json(folder / REPORT_FILE).get("base_model") or _read_json(folder / "config.json").get(
        "_name_or_path")
    if not base:
        return None
    if Path(base).expanduser().exists() and Path(base).expanduser().resolve() == folder.resolve():
        return None
    return base


def _load(source: str, dtype: str, device: str):
    from ..models import load_model

    try:
        return load_model(source, dtype=dtype).to(device)
    except OSError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"cannot load model {source}: {first}") from error


def _same_model(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def write_json(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON to ``path``, atomically (lm-eval's results hold a few non-JSON values)."""
    from ..atomic import write_text

    def fallback(value):
        try:
            from lm_eval.utils import handle_non_serializable

            return handle_non_serializable(value)
        except ImportError:
            return str(value)

    return write_text(path, json.dumps(data, indent=2, default=fallback, ensure_ascii=False) + "\n")


def evaluate_model(model: str | None = None, tasks: str | Sequence[str] = ("fidelity",), *,
             data_files: Mapping[str, str] | Sequence[str] | None = None, output: str | None = None,
             batch_size: int = 8, limit: int | float | None = None, num_fewshot: int | None = None,
             apply_chat_template: bool = False, gen_kwargs: str | dict | None = None,
             max_gen_toks: int | None = None, teacher: str | None = None, device: str = "cpu",
             dtype: str = "float32", log_samples: bool = False, bootstrap_iters: int = 100000,
             fidelity_max_new_tokens: int = 64, seed: int = 0, threads: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Run ``tasks`` on ``model`` and return lm-eval's results dict, with ``results["fidelity"]`` added
    when asked and a ``"upq"`` entry describing the run; also written to ``output`` if given."""
    start = time.time()
    names = parse_tasks(tasks)
    files = parse_data_files(data_files)
    stray = [t for t in files if t not in names]
    if stray:
        raise EvalSetupError(f"--data-files names task(s) {', '.join(stray)} not in --tasks {','.join(names)}")
    if limit is not None and limit <= 0:
        raise EvalSetupError(f"--limit must be positive, got {limit}")
    if output:  # find out now, not after the run, that the results cannot be written
        folder = Path(output).expanduser().resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EvalSetupError(f"cannot create the folder of --output {output}: {error.strerror}") from error
        if Path(output).is_dir() or not os.access(folder, os.W_OK):
            raise EvalSetupError(f"cannot write --output {output}: give a writable file path")
    if threads is not None:
        if threads < 1:
            raise EvalSetupError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    from ..models import check_device

    check_device(device, f"--device {device}", "use --device cpu")
    lm_tasks = [t for t in names if t != FIDELITY]
    manager = built = None
    local: dict[str, Any] = {}
    if lm_tasks:  # everything about tasks and data is checked before any model is loaded
        manager, specs, local = build_task_specs(lm_tasks, files, num_fewshot)
        built = load_tasks(manager, specs)

    from ..models import load_tokenizer, resolve_model

    source = resolve_model(model)
    print(f"upq: loading {model or 'the bundled SmolLM2-135M-Instruct'} ({source})", file=sys.stderr)
    student = _load(source, dtype, device)
    teacher_name = teacher if teacher is not None else default_teacher(source)
    try:
        tokenizer = load_tokenizer(source)
    except (OSError, ValueError, TypeError):
        teacher_source = resolve_model(teacher_name)
        print(f"upq: no tokenizer in {source}; using the teacher's ({teacher_source})", file=sys.stderr)
        tokenizer = load_tokenizer(teacher_source)

    results: dict[str, Any] = {"results": {}}
    if built:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        if max_gen_toks is not None:
            gen_kwargs = merge_gen_kwargs(gen_kwargs, max_gen_toks)
        lm = HFLM(pretrained=student, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=built, task_manager=manager, num_fewshot=num_fewshot, batch_size=batch_size,
            limit=limit, apply_chat_template=apply_chat_template, gen_kwargs=gen_kwargs,
            log_samples=log_samples, bootstrap_iters=bootstrap_iters, random_seed=seed,
            numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
        results = dict(out or {})
        results.setdefault("results", {})

    if FIDELITY in names:
        teacher_source = resolve_model(teacher_name)
        if quantization_of(source) is None and _same_model(teacher_source, source):
            teacher_model = student  # an unquantized model against itself: no second copy
        else:
            teacher_model = _load(teacher_source, "float32", device)
        t_vocab = teacher_model.get_output_embeddings().weight.shape[0]
        s_vocab = student.get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise EvalSetupError(f"fidelity: teacher {teacher_source} has {t_vocab} output tokens, the model "
                                 f"{s_vocab}: pass --teacher with the model this checkpoint was quantized from")
        print(f"upq: fidelity against {teacher_name or 'the bundled SmolLM2-135M-Instruct'}", file=sys.stderr)
        scores = measure_fidelity(student, teacher_model, tokenizer, limit, batch_size=batch_size,
                                  max_new_tokens=fidelity_max_new_tokens, progress=progress)
        results["results"][FIDELITY] = {"alias": FIDELITY, **scores,
                                        "teacher": teacher_name or "bundled SmolLM2-135M-Instruct"}
        results.setdefault("higher_is_better", {})[FIDELITY] = {"top1": True, "kl": False, "jsd": False}

    lm_eval_found = lm_eval_version()
    from .. import __version__

    results["upq"] = {
        "model": model or "bundled", "source": source, "quantization": quantization_of(source),
        "tasks": names, "local_data": local, "teacher": teacher_name if FIDELITY in names else None,
        "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "apply_chat_template": apply_chat_template, "gen_kwargs": gen_kwargs, "device": device, "dtype": dtype,
        "threads": threads,
        "wall_seconds": round(time.time() - start, 1), "upq_hf_version": __version__,
        "lm_eval_version": lm_eval_found,
    }
    if output:
        write_json(results, output)
    return results


def summary_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the results (and groups), plus a fidelity line."""
    lines = []
    lm_results = {k: v for k, v in results.get("results", {}).items() if k != FIDELITY}
    if lm_results:
        from lm_eval.utils import make_table

        view = {**results, "results": lm_results}
        lines.append(make_table(view))
        if view.get("groups"):
            lines.append(make_table(view, "groups"))
    fid = results.get("results", {}).get(FIDELITY)
    if fid:
        lines.append(f"fidelity vs {fid['teacher']}: top-1 agreement {fid['top1']:.4f}, KL {fid['kl']:.4f} nats, "
                     f"JSD {fid['jsd']:.4f} nats over {fid['tokens']} tokens of {fid['prompts']} prompts")
    return "\n".join(lines)
