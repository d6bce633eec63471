"""Atomic writes: the one way this package writes a file or a folder that others may read.

Everything is written under a hidden temporary name beside the target and renamed into place only
once complete, so a reader (or an interrupted run) never sees a half-written checkpoint, cache file or
results file. An existing target is replaced: an old folder is moved aside first and removed after.

A run killed with SIGKILL cannot clean up after itself: it leaves its hidden temporary
(``.NAME.tmp-PID-XXXX``) and, if it died in the middle of replacing a folder, the old folder moved
aside (``.NAME.old-PID-XXXX/NAME``). The temporaries carry the writer's process id, and the next
write of the same target (and :func:`clean_stale`) removes those whose process is gone; an old folder
moved aside is put back where it was when the target is missing, so a kill never loses the previous
checkpoint either. Temporaries of a live process (a concurrent writer) are left alone.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def stale_entries(target: str | os.PathLike) -> list[Path]:
    """The hidden temporaries beside ``target`` left by writers that are no longer running."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    found = []
    for entry in target.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(2))):
            found.append(entry)
    return sorted(found)


def clean_stale(target: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it (see the module docstring); an old folder that
    was moved aside is restored when ``target`` does not exist. Returns the entries handled."""
    target = Path(target)
    handled = stale_entries(target)
    for entry in handled:
        aside = entry / target.name
        if ".old-" in entry.name and aside.exists() and not target.exists():
            os.replace(aside, target)  # the kill came between moving the old folder aside and the new one in
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
    return handled


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``target`` (an empty folder with ``folder=True``, else an empty file) to
    write into; renamed onto ``target`` when the block ends without an error, removed when it raises.
    The result gets the permissions a plain ``open``/``mkdir`` would give (``0o666`` / ``0o777`` less the
    umask), not ``mkstemp``'s ``0o600`` or ``mkdtemp``'s ``0o700``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    if folder:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(target, "tmp"), dir=target.parent))
    else:
        handle, name = tempfile.mkstemp(prefix=_prefix(target, "tmp"), dir=target.parent)
        os.close(handle)
        tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())
        if folder:
            _replace_folder(tmp, target)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _replace_folder(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
    os.replace(target, old / target.name)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / target.name, target)  # the old folder back where it was
        old.rmdir()
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding) as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)
