"""What this machine offers the package: its CPU's instruction-set flags and the user cache folder.

Nothing here imports the rest of the package, so the modules that choose a code path (:mod:`upq_hf.backends`,
:mod:`upq_hf.avx2`, :mod:`upq_hf.models`) can all ask it.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


def cache_dir() -> Path:
    """``$UPQ_CACHE``, default ``~/.cache/upq_hf``: the converted bundled model, ``"self"`` data, the compiled
    CPU kernel."""
    return Path(os.environ.get("UPQ_CACHE", Path.home() / ".cache" / "upq_hf"))


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags as Linux lists them in ``/proc/cpuinfo`` (``avx2``, ``avx512_bf16``, ...), or
    None where that file cannot be read (not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


@torch.compiler.assume_constant_result
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): there bf16 matrix products
    run much faster than fp32 (docs/BENCHMARKS.md); elsewhere they are emulated."""
    flags = cpu_flags() or frozenset()
    return "avx512_bf16" in flags or "amx_bf16" in flags
