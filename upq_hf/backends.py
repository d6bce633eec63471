"""Where a ``UPQLinear`` forward runs: the pure-torch reference, the Triton kernels, or torch's INT4 CPU kernel.

The choice is made here and nowhere else: ``UPQLinear.backend`` (set from
``UPQConfig(backend=...)``), else the ``UPQ_BACKEND`` environment variable (``torch``, ``triton``
or ``cpu``), else Triton on CUDA tensors when Triton imports, ``cpu`` on CPU tensors when this
torch has the kernel (:func:`upq_hf.int4pack.available`), and ``torch`` everywhere else.

* ``torch``: the reference. Dequantize into a temporary in the activation dtype, then ``F.linear``.
* ``triton``: the fused kernels of ``upq_kernels`` (CUDA, or the Triton interpreter).
* ``cpu``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a repacked copy of the weight made once
  per layer (see :mod:`upq_hf.int4pack` for the mapping, its rounding and what it falls back on).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import int4pack

BACKENDS = ("torch", "triton", "cpu")
ENV = "UPQ_BACKEND"


def resolve_backend(x: torch.Tensor, requested: str | None) -> str:
    choice = requested or os.environ.get(ENV) or None
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"UPQ backend must be one of {BACKENDS}, got {choice!r}")
        return choice
    if x.is_cuda and triton_available():
        return "triton"
    if x.is_cpu and cpu_kernel_available():
        return "cpu"
    return "torch"


def triton_available() -> bool:
    try:
        import upq_kernels  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


def cpu_kernel_available() -> bool:
    return int4pack.available()


def torch_linear(x: torch.Tensor, module) -> torch.Tensor:
    """Reference path: dequantize into a temporary in the activation dtype, then ``F.linear``."""
    weight = module.dequantize(x.dtype)
    return F.linear(x, weight, module.bias)


def linear_forward(x: torch.Tensor, module) -> torch.Tensor:
    backend = resolve_backend(x, module.backend)
    if backend == "triton":
        from upq_kernels import upq_linear

        return upq_linear(x, module)
    if backend == "cpu":
        y = int4pack.linear(x, module)
        if y is not None:
            return y
    return torch_linear(x, module)
