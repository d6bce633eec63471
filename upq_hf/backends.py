"""Where a ``UPQLinear`` forward runs: the pure-torch reference, the Triton kernels, torch's INT4 CPU kernel,
or upq_hf's own AVX2 CPU kernel.

The choice is made here and nowhere else: ``UPQLinear.backend`` (set from ``UPQConfig(backend=...)``), else the
``UPQ_BACKEND`` environment variable (``torch``, ``triton``, ``cpu``, ``avx2`` or ``a8``), else automatically:

* CUDA tensors: Triton when it imports, else the reference;
* CPU tensors (:func:`cpu_backend`): ``avx2`` for calls of up to :data:`AVX2_FIRST_ROWS` rows (a decode step),
  and for bf16 calls of up to :data:`AVX2_BF16_ROWS` rows where the avx2 kernel runs them on AVX512-BF16;
  then, where the CPU multiplies bf16 natively (AVX512-BF16, AMX) and torch has its INT4 kernel, ``cpu`` for
  more rows (there torch's kernel, on bf16 units, beats fp32 FMAs); elsewhere ``avx2`` for every call it takes;
  and ``torch`` where neither kernel exists. Each kernel hands the calls it does not take (too many rows, a
  gradient; ``torch.compile`` for torch's INT4 kernel, while the avx2 one is a custom op there) to the reference
  path. The thresholds are measured (docs/BENCHMARKS.md).

* ``torch``: the reference. Dequantize into a temporary in the activation dtype, then ``F.linear``.
* ``triton``: the fused kernels of ``upq_kernels`` (CUDA, or the Triton interpreter).
* ``cpu``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on a repacked copy of the weight made once
  per layer (see :mod:`upq_hf.int4pack` for the mapping, its rounding and what it falls back on).
* ``avx2``: ``upq_hf/csrc/upq_cpu.c`` on the stored buffers, compiled once per machine (:mod:`upq_hf.avx2`).
* ``a8``: the same file's int8-activation kernel (AVX512-VNNI): activations quantized to int8 per row and weight
  group on the fly, integer dot products. Faster, **not exact**, so only ever chosen by the user; where the CPU
  lacks AVX512-VNNI its calls run on the exact ``avx2`` kernel.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import avx2, int4pack
from .machine import cpu_has_fast_bf16

BACKENDS = ("torch", "triton", "cpu", "avx2", "a8")
ENV = "UPQ_BACKEND"


def resolve_backend(x: torch.Tensor, requested: str | None) -> str:
    choice = requested or os.environ.get(ENV) or None
    if choice is not None:
        if choice not in BACKENDS:
            raise ValueError(f"UPQ backend must be one of {BACKENDS}, got {choice!r}")
        return choice
    if x.is_cuda and triton_available():
        return "triton"
    if x.is_cpu:
        return cpu_backend(x)
    return "torch"


# Calls of up to this many rows go to the avx2 kernel even where torch's INT4 kernel has bf16 units to run on
# (measured on an AVX512-BF16 EPYC: docs/BENCHMARKS.md, "upq_hf's own CPU kernel") ...
AVX2_FIRST_ROWS = 1
# ... and bf16 calls of up to this many, where the avx2 kernel has its AVX512-BF16 several-rows kernel
# (docs/BENCHMARKS.md, "The AVX512-BF16 several-rows kernel"); past avx2.MAX_ROWS it takes none
AVX2_BF16_ROWS = avx2.MAX_ROWS


def cpu_backend(x: torch.Tensor) -> str:
    """The automatic choice for a call on CPU tensors (see the module docstring)."""
    if avx2.available():
        if not cpu_has_fast_bf16() or not cpu_kernel_available():
            return "avx2"
        rows = x.numel() // x.shape[-1] if x.dim() else 1
        limit = AVX2_BF16_ROWS if x.dtype == torch.bfloat16 and avx2.has_bf16() else AVX2_FIRST_ROWS
        return "avx2" if rows <= limit else "cpu"
    avx2.say_why_once()
    return "cpu" if cpu_kernel_available() else "torch"


@torch.compiler.assume_constant_result
def triton_available() -> bool:
    try:
        import upq_kernels  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return False
    return True


@torch.compiler.assume_constant_result
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
    elif backend in ("avx2", "a8"):
        # a8 where this CPU lacks AVX512-VNNI (or the call is not taken) runs the exact avx2 kernel instead
        y = avx2.linear(x, module, int8_activations=True) if backend == "a8" else None
        if y is None:
            y = avx2.linear(x, module)
        if y is not None:
            return y
    return torch_linear(x, module)
