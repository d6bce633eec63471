"""The public API of ``upq_kernels`` (re-exported by the package)."""

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
