"""Resuming training after a run was interrupted or killed: the last *complete* trainer checkpoint.

``transformers.Trainer`` writes ``checkpoint-N`` in place, file after file, and ``trainer_state.json``
last (model, optimizer, scheduler, RNG states, then the state); older checkpoints are rotated away only
after that. A run killed with SIGKILL while saving leaves a ``checkpoint-N`` without (or with a
truncated) ``trainer_state.json``, which ``transformers.trainer_utils.get_last_checkpoint`` would pick
and fail on. :func:`last_complete_checkpoint` picks the newest checkpoint whose state file parses and
names its own step, and removes the incomplete ones after it, so that the resumed run writes them
again from scratch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def _complete(folder: Path, step: int) -> bool:
    try:
        state = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == step


def last_complete_checkpoint(output_dir: str | os.PathLike, remove_incomplete: bool = True) -> str | None:
    """The newest complete ``checkpoint-N`` folder in ``output_dir`` (``None`` if there is none, or no
    ``output_dir``). Incomplete checkpoints newer than it are removed with ``remove_incomplete``."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))),
                   reverse=True)
    for step, folder in steps:
        if _complete(folder, step):
            return str(folder)
        if remove_incomplete:
            shutil.rmtree(folder, ignore_errors=True)
    return None
