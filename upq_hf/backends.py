"""Where a ``UPQLinear`` forward runs: the pure-torch path or the Triton kernels.

The choice is made here and nowhere else: ``UPQLinear.backend`` (set from
``UPQConfig(backend=...)``), else the ``UPQ_BACKEND`` environment variable (``torch`` or
``triton``), else Triton on CUDA tensors when Triton imports and torch everywhere else.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

BACKENDS = ("torch", "triton")


def resolve_backend(x: torch.Tensor, requested: str | None) -> str:
    choice = requested or os.environ.get("UPQ_BACKEND") or None
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"UPQ backend must be one of {BACKENDS}, got {choice!r}")
        return choice
    if x.is_cuda and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    try:
        import upq_kernels  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def torch_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Reference path: dequantize into a temporary in the activation dtype, then ``F.linear``."""
    weight = module.dequantize(x.dtype)
    return F.linear(x, weight, module.bias)


def linear_forward(x: torch.Tensor, module) -> torch.Tensor:
    backend = resolve_backend(x, module.backend)
    if backend == "triton":
        from upq_kernels import upq_linear

        return upq_linear(x, module)
    return torch_linear(x, module)
