"""The lm-evaluation-harness glue: version gate, task lookup, building lm-eval tasks.

lm-eval is an optional extra (``pip install upq_hf[eval]``) and is imported only inside functions, so
``import upq_hf`` never needs it. Tasks are lm-eval's own: names, or lm-eval's own configs pointed at
local files (:mod:`upq_hf.evaluation.local_tasks`); lm-eval does all of the scoring.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXTRA = "'upq_hf[eval]'"
INSTALL_HINT = f"pip install {EXTRA}"
MIN_LM_EVAL = "0.4.12"
# lm-eval's own task folders for the tasks that run from local files; indexing just these takes a fraction
# of a second, where indexing all of lm-eval's ~14,000 YAML files takes most of a minute.
TASK_FOLDERS = {"mmlu": ("mmlu", "default"), "ifeval": ("ifeval",)}
# the row formats of those tasks' local files
ROW_FORMATS = {
    "mmlu": "rows {question, subject, choices: [4 strings], answer: 0-3} (cais/mmlu); a folder may add "
            "dev.jsonl for few-shot examples",
    "ifeval": "rows {key, prompt, instruction_id_list, kwargs} (google/IFEval)",
}


class EvalSetupError(ValueError):
    """A task, data file or option that cannot work; the message says how to fix it (one line)."""


def lm_eval_version() -> str | None:
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


def require_lm_eval():
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(f"lm-eval is not installed ({error}): {INSTALL_HINT} "
                          "(the fidelity task alone needs no lm-eval)") from None
    except Exception as error:  # noqa: BLE001 - e.g. lm-eval < 0.4.12 under transformers 5
        raise ImportError(f"lm-eval cannot be imported ({type(error).__name__}: {error}): upq eval needs "
                          f"lm-eval>={MIN_LM_EVAL}: pip install -U {EXTRA}") from None
    from packaging.version import InvalidVersion, Version

    found = lm_eval_version()
    try:
        too_old = Version(found) < Version(MIN_LM_EVAL)
    except InvalidVersion:
        too_old = False
    if too_old:  # the TaskManager.load / Group API used here arrived in lm-eval 0.4.12
        raise ImportError(f"upq eval needs lm-eval>={MIN_LM_EVAL}, found {found}: pip install -U {EXTRA}")
    return lm_eval


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
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    root = _lm_eval_tasks_dir()
    if all(name in TASK_FOLDERS for name in names):
        folders = [str(root.joinpath(*TASK_FOLDERS[name])) for name in names]
        return TaskManager(include_defaults=False, include_path=folders)
    for name in names:
        if name not in TASK_FOLDERS and not _known_elsewhere(name):
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
            hint = f"pass --data-files {name}=FILE_OR_DIR" + (f" with {ROW_FORMATS[name]}" if name in ROW_FORMATS else "")
            raise RuntimeError(f"task {name!r}: cannot load its data ({type(error).__name__}: {first}); "
                               f"offline, {hint}") from error
    return built


def merge_gen_kwargs(gen_kwargs: str | dict | None, max_gen_toks: int) -> dict:
    if isinstance(gen_kwargs, str):
        from lm_eval.utils import simple_parse_args_string

        gen_kwargs = simple_parse_args_string(gen_kwargs)
    return {**(gen_kwargs or {}), "max_gen_toks": max_gen_toks}
