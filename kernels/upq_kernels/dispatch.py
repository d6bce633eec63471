"""Which kernel runs a UPQ matmul and with which blocks: :func:`upq_matmul`.

Rules by the number of rows M (``RULES``, adjustable at run time):

* ``M <= RULES.gemv_max_m`` (4): ``"gemv"``, the split-K CUDA-core matrix-vector kernel (decode);
* ``M <= RULES.splitk_max_m`` (64): ``"splitk"``, the split-K ``tl.dot`` kernel (small batches);
* ``M < RULES.dequant_min_m`` (1024): ``"tiled"``, the tiled ``tl.dot`` kernel (prefill);
* otherwise ``"dequant"``: dequantize with a Triton kernel, then ``torch.matmul``.

The fused kernels need a ``BLOCK_K`` that divides the group size and is a multiple of the codes
per word (and at least 16 for ``tl.dot``); where none exists (e.g. INT2 with group 8) the layer
goes to the next variant that fits, down to ``"dequant"``, which takes any group size.
Block sizes: a forced ``config``, else the tuned choice for this GPU and shape (tuning.py), else
the variant's ``DEFAULT_CONFIG``; every choice is fitted to the shape (common.fit_config).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import dequant, dot_splitk, dot_tiled, gemv_splitk, tuning
from .common import INTERPRETER, PackedWeight, compute_dtype

VARIANTS = {module.NAME: module for module in (gemv_splitk, dot_splitk, dot_tiled, dequant)}
FUSED_VARIANTS = ("gemv", "splitk", "tiled")
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass
class DispatchRules:
    """Row-count thresholds between the variants (see the module docstring)."""

    gemv_max_m: int = 4
    splitk_max_m: int = 64
    dequant_min_m: int = 1024


RULES = DispatchRules()


def fused_config_fits(variant: str, M: int, weight: PackedWeight) -> bool:
    module = VARIANTS[variant]
    return module.fit_config(module.DEFAULT_CONFIG, M, weight) is not None


def choose_variant(M: int, weight: PackedWeight) -> str:
    """The variant :func:`upq_matmul` runs for ``M`` rows of this layer (see the module docstring)."""
    if M >= RULES.dequant_min_m:
        return "dequant"
    if M <= RULES.gemv_max_m:
        preferred = ("gemv", "splitk", "tiled")
    elif M <= RULES.splitk_max_m:
        preferred = ("splitk", "tiled")
    else:
        preferred = ("tiled",)
    return next((variant for variant in preferred if fused_config_fits(variant, M, weight)), "dequant")


def _check_inputs(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must have shape (M, {weight.in_features}), got {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"activations must be one of {ACTIVATION_DTYPES}, got {x.dtype}")
    if not (x.is_cuda or INTERPRETER):
        raise RuntimeError("the UPQ Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before import); "
                           "use backend='torch' on this device")
    tensors = [weight.packed, weight.scale, weight.zero, bias, out]
    if any(t is not None and t.device != x.device for t in tensors):
        raise ValueError("x, the packed weight, its scales and zeros, bias and out must be on one device")
    if bias is not None and tuple(bias.shape) != (weight.out_features,):
        raise ValueError(f"bias must have shape ({weight.out_features},), got {tuple(bias.shape)}")
    if out is not None and (tuple(out.shape) != (x.shape[0], weight.out_features) or out.dtype != x.dtype):
        raise ValueError(f"out must be {x.dtype} of shape {(x.shape[0], weight.out_features)}, "
                         f"got {out.dtype} {tuple(out.shape)}")


def upq_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
               group_size: int | None, in_features: int, variant: str | None = None, config: dict | None = None,
               bias: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for a 2-D ``x`` of shape ``(M, in_features)`` and a packed UPQ weight.

    Returns ``(M, out_features)`` in ``x.dtype``, written into ``out`` when given. ``variant`` (one
    of ``"gemv"``, ``"splitk"``, ``"tiled"``, ``"dequant"``) and ``config`` (block sizes, a dict like
    the entries of that variant's ``CONFIGS``) force the choice; both are for tests and benchmarks.
    """
    weight = PackedWeight.checked(packed, scale, zero, bits, group_size, in_features)
    _check_inputs(x, weight, bias, out)
    M = x.shape[0]
    if out is None:
        out = torch.empty((M, weight.out_features), dtype=x.dtype, device=x.device)
    if M == 0 or weight.out_features == 0:
        return out
    variant = variant or choose_variant(M, weight)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    module = VARIANTS[variant]

    if variant == "dequant":
        module.launch(x, weight, bias, out, config)
        return out

    def fit(candidate: dict) -> dict | None:
        return module.fit_config(candidate, M, weight)

    if config is not None:
        fitted = fit(config)
    else:
        key = tuning.tuning_key(variant, bits, weight.group_size, in_features, weight.out_features, M, x.dtype)
        fitted = tuning.select_config(
            key, x.device, module.CONFIGS, module.DEFAULT_CONFIG, fit,
            run=lambda candidate: module.launch(x, weight, bias, torch.empty_like(out), candidate,
                                                compute_dtype(x.dtype)))
    if fitted is None:
        raise ValueError(f"variant {variant!r} has no BLOCK_K for {bits}-bit codes with group_size={weight.group_size} "
                         f"(config {config}); use variant='dequant'")
    module.launch(x, weight, bias, out, fitted, compute_dtype(x.dtype))
    return out
