"""Triton kernels for UPQ INT2/INT4 linear layers: the package ``upq_kernels``.

Its source root is the repository's ``kernels/`` folder, which holds this package and nothing else
importable (no ``__init__.py``): ``kernels`` is the name of Hugging Face's package, which transformers
probes for, and a bare folder of that name reads to it as "not installed".

Public API:

* :func:`upq_linear` ``(x, module)``: the forward of a ``UPQLinear`` through the ``upq::linear``
  custom op (any leading shape, bias added, result in ``x.dtype``);
* :func:`upq_matmul`: the same on raw tensors for a 2-D ``x``, with ``variant``/``config``/``out``
  to force a kernel, its block sizes and its output buffer;
* :func:`dequantize_packed`: the dense ``(out_features, in_features)`` weight, by a Triton kernel;
* ``RULES``: the row-count thresholds between the variants; ``VARIANTS``: the kernel modules.

See ``kernels/README.md`` (the source root) for the variants, the dispatch rules and the interpreter.
"""

from __future__ import annotations

import torch

from . import op
from .dispatch import RULES, VARIANTS, DispatchRules, choose_variant, upq_matmul


def upq_linear(x: torch.Tensor, module) -> torch.Tensor:
    """``module(x)`` for a ``upq_hf.UPQLinear``: ``x`` is ``[..., in_features]``, the result
    ``[..., out_features]`` in ``x.dtype`` with the bias added."""
    return torch.ops.upq.linear(x, module.weight, module.weight_scale, module.weight_zero, module.bias,
                                module.bits, module.group_size, module.in_features)


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                      group_size: int | None, in_features: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The ``(out_features, in_features)`` weight a packed layer stands for, in ``dtype``: the values
    of :func:`upq_hf.formats.dequantize`, as a transposed view of a contiguous ``(K, N)`` tensor."""
    return torch.ops.upq.dequantize_transposed(packed, scale, zero, bits, group_size, in_features, dtype).t()


__all__ = ["upq_linear", "upq_matmul", "dequantize_packed", "choose_variant", "RULES", "DispatchRules",
           "VARIANTS", "op"]
