"""Writing a quantized model out: an atomic ``save_pretrained`` (and, later, the model card and push).

Writes go to a hidden temporary folder beside the target, which is renamed into place only once
everything is written: an interrupted or failed run never leaves a half-written checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class CheckpointExistsError(FileExistsError):
    pass


def prepare_target(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that ``out`` can be written (before any expensive work starts)."""
    target = Path(out)
    if target.exists() and not overwrite:
        raise CheckpointExistsError(f"{target} already exists: choose another --out or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise CheckpointExistsError(f"{target} exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def save_atomic(model, out: str | os.PathLike, tokenizer=None, overwrite: bool = False,
                extra_files: dict[str, str] | None = None) -> Path:
    """``save_pretrained`` into ``out`` through a temporary folder renamed into place at the end."""
    target = prepare_target(out, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
