"""Per-GPU choice of block configurations, kept as data.

On a CUDA GPU the first call of a (variant, bits, group size, K, N, M bucket, dtype) benchmarks
the variant's candidate configurations (``CONFIGS`` in each kernel file, each run alone on a
scratch output) and keeps the fastest, in memory and in a JSON file per GPU name:
``~/.cache/upq_hf/kernel-configs-<gpu name>.json`` (the directory can be moved with
``UPQ_KERNEL_CACHE``). Later processes on the same GPU model load the file instead of tuning.

Nothing is tuned under the Triton interpreter, while a CUDA graph is being captured (warm every
M bucket up before capturing), or with ``UPQ_AUTOTUNE=0``: the variant's ``DEFAULT_CONFIG`` runs
then, unless a choice was already recorded. ``triton.autotune`` is not used: it cannot run without
a GPU, re-runs kernels on the caller's output, and does not persist per GPU name.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable

import torch

from upq_hf.atomic import write_text

from .common import INTERPRETER, next_power_of_2

CACHE_ENV = "UPQ_KERNEL_CACHE"
AUTOTUNE_ENV = "UPQ_AUTOTUNE"


def m_bucket(M: int) -> int:
    """Rows are tuned by power-of-two buckets: 1, 2, 4, 8, ..."""
    return next_power_of_2(M)


def tuning_key(variant: str, bits: int, group_size: int | None, in_features: int, out_features: int,
               M: int, dtype: torch.dtype) -> str:
    group = "row" if group_size is None else group_size
    return (f"{variant}|bits={bits}|group={group}|K={in_features}|N={out_features}|M<={m_bucket(M)}|"
            f"{str(dtype).removeprefix('torch.')}")


def tuning_enabled() -> bool:
    return (not INTERPRETER and torch.cuda.is_available() and os.environ.get(AUTOTUNE_ENV, "1") != "0"
            and not torch.cuda.is_current_stream_capturing())


def cache_path(gpu_name: str) -> Path:
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "upq_hf")
    return root / f"kernel-configs-{re.sub(r'[^A-Za-z0-9_.-]+', '_', gpu_name)}.json"


class ConfigStore:
    """Chosen configurations per GPU name, loaded from and saved to :func:`cache_path`."""

    def __init__(self):
        self._by_gpu: dict[str, dict[str, dict]] = {}

    def _configs(self, gpu_name: str) -> dict[str, dict]:
        if gpu_name not in self._by_gpu:
            path = cache_path(gpu_name)
            configs = {}
            if path.exists():
                try:
                    configs = json.loads(path.read_text())["configs"]
                except (OSError, ValueError, KeyError) as error:
                    warnings.warn(f"ignoring unreadable UPQ kernel config cache {path}: {error}", stacklevel=3)
            self._by_gpu[gpu_name] = configs
        return self._by_gpu[gpu_name]

    def get(self, gpu_name: str, key: str) -> dict | None:
        return self._configs(gpu_name).get(key)

    def put(self, gpu_name: str, key: str, config: dict) -> None:
        configs = self._configs(gpu_name)
        configs[key] = config
        path = cache_path(gpu_name)
        try:
            write_text(path, json.dumps({"gpu": gpu_name, "configs": configs}, indent=1, sort_keys=True))
        except OSError as error:
            warnings.warn(f"could not save UPQ kernel configs to {path}: {error}", stacklevel=3)


STORE = ConfigStore()


def select_config(key: str, device: torch.device, candidates: list[dict], default: dict,
                  fit: Callable[[dict], dict | None], run: Callable[[dict], None]) -> dict:
    """The configuration to run for ``key``: recorded, else tuned now (when allowed), else ``default``.

    ``fit`` turns a candidate into the block sizes it runs with for this shape (None if it cannot
    run); ``run`` launches a fitted configuration on scratch buffers. Returns a fitted configuration.
    """
    if INTERPRETER or device.type != "cuda":
        return fit(default)
    gpu_name = torch.cuda.get_device_name(device)
    recorded = STORE.get(gpu_name, key)
    if recorded is not None:
        return fit(recorded)
    if not tuning_enabled():
        return fit(default)

    from triton.testing import do_bench

    timings = {}  # fitted config (as a sorted tuple) -> (milliseconds, the candidate it came from)
    for candidate in candidates:
        fitted = fit(candidate)
        if fitted is None:
            continue
        identity = tuple(sorted(fitted.items()))
        if identity in timings:
            continue
        try:
            milliseconds = do_bench(lambda: run(fitted), warmup=5, rep=25)
        except Exception as error:  # noqa: BLE001 - e.g. a config needing more shared memory than this GPU has
            warnings.warn(f"UPQ kernel config {candidate} failed for {key}: {error}", stacklevel=2)
            continue
        timings[identity] = (milliseconds, candidate)
    if not timings:
        raise RuntimeError(f"no UPQ kernel configuration runs for {key}")
    best = min(timings.values(), key=lambda timing: timing[0])[1]
    STORE.put(gpu_name, key, best)
    return fit(best)
