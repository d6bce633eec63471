"""The ``torch.library`` custom ops ``upq::linear`` and ``upq::dequantize_transposed``.

Registered ops are opaque to ``torch.compile`` (traced through their fake implementations, which
only compute shapes) and safe in CUDA graphs (their outputs come from the caching allocator).
``upq::linear`` has a backward for the activations and the bias (the packed weight is frozen), so
adapters such as LoRA can train on top of a UPQ layer.
"""

from __future__ import annotations

import torch

from .common import PackedWeight
from .dequant import dequantize_transposed as _dequantize_transposed
from .dispatch import upq_matmul


@torch.library.custom_op("upq::linear", mutates_args=())
def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
           bias: torch.Tensor | None, bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``[..., in_features]``: ``[..., out_features]`` in ``x.dtype``."""
    rows = x.reshape(-1, in_features)
    y = upq_matmul(rows, packed, scale, zero, bits, group_size, in_features, bias=bias)
    return y.view(*x.shape[:-1], packed.shape[1])


@linear.register_fake
def _linear_fake(x, packed, scale, zero, bias, bits, group_size, in_features):
    torch._check(x.shape[-1] == in_features, lambda: f"x must end in {in_features} features")
    return x.new_empty((*x.shape[:-1], packed.shape[1]))


@torch.library.custom_op("upq::dequantize_transposed", mutates_args=())
def dequantize_transposed(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                          group_size: int | None, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``W.T`` of a packed weight: ``(in_features, out_features)`` contiguous, in ``dtype``."""
    return _dequantize_transposed(PackedWeight.checked(packed, scale, zero, bits, group_size, in_features), dtype)


@dequantize_transposed.register_fake
def _dequantize_transposed_fake(packed, scale, zero, bits, group_size, in_features, dtype):
    return packed.new_empty((in_features, packed.shape[1]), dtype=dtype)


def _linear_setup_context(ctx, inputs, output):
    x, packed, scale, zero, bias, bits, group_size, in_features = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.weight_attributes = (bits, group_size, in_features)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad):
    packed, scale, zero = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        weight_t = torch.ops.upq.dequantize_transposed(packed, scale, zero, *ctx.weight_attributes, grad.dtype)
        grad_x = grad @ weight_t.t()
    if ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
    return grad_x, None, None, None, grad_bias, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)
