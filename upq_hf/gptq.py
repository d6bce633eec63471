"""GPTQ's error feedback (Frantar et al., 2022) in upq_hf's formats: a start for the block-wise reconstruction.

Round to nearest quantizes each weight on its own. GPTQ quantizes a layer's input columns one after the other
and feeds each column's rounding error forward into the columns not yet quantized, weighted by the inverse
Hessian of the layer's inputs ``H = X^T X`` (optimal brain compression): the later columns absorb what the
earlier ones lost, on the inputs the layer actually sees. For upq_hf it is a start, not a method of its own: the
block-wise reconstruction (:mod:`upq_hf.ptq`, ``PTQConfig.init="gptq"``) then trains from it as it trains from
round to nearest.

:func:`gptq_quantize` takes a dense weight and its Hessian and returns the latent weight (each column as it was
when its turn came, error fed in: rounding it gives GPTQ's codes), the scales and the INT4 zero points. A group's
scale (and zero point) is searched as round to nearest searches it (:func:`upq_hf.qat.init_quant_params`), on the
group's columns as they stand when its first column comes up. With a Hessian that is a multiple of the identity
(inputs with no correlation) nothing is fed forward and the result is round to nearest's, bit for bit.
:class:`HessianCollector` sums ``X^T X`` over a layer's inputs with a forward pre-hook.
"""

from __future__ import annotations

import torch
from torch import nn

from . import formats

#: the damping added to the Hessian's diagonal, as a share of its mean (GPTQ's default)
DAMP = 0.01
#: columns quantized between two lazy updates of the rest of the weight (a multiple of the group size)
_BLOCK = 128


class HessianCollector:
    """``H = sum x^T x`` over every input row a module receives while :meth:`attach`-ed (float64)."""

    def __init__(self, module: nn.Module):
        self.hessian = torch.zeros(module.in_features, module.in_features, dtype=torch.float64)
        self.rows = 0
        self._handle = None
        self._module = module

    def _hook(self, module, args):
        x = args[0].detach().reshape(-1, self.hessian.shape[0]).to(torch.float64)
        self.hessian += (x.T @ x).cpu()
        self.rows += x.shape[0]

    def attach(self) -> "HessianCollector":
        self._handle = self._module.register_forward_pre_hook(self._hook)
        return self

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _group_params(w: torch.Tensor, bits: int, scale_init: str, scale_dtype: torch.dtype,
                  scale_grid: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round to nearest's ``(scale, zero)`` of the columns ``w`` ``(N, gs)`` as one group: ``(N,)`` each."""
    from .qat import init_quant_params

    scale, zero = init_quant_params(w, bits, None, scale_init, scale_dtype, scale_grid)
    return scale[:, 0], None if zero is None else zero[:, 0]


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """The column ``w`` ``(N,)`` quantized and dequantized with its group's ``scale`` (and INT4 ``zero``), exactly
    as the stored format computes it."""
    column = w[:, None]
    if zero is None:
        return formats.dequantize_seq(formats.seq_codes(column, scale[:, None], None), scale[:, None], None)[:, 0]
    codes = formats.int4_codes(column, scale[:, None], zero[:, None], None)
    return formats.dequantize_int4(codes, scale[:, None], zero[:, None], None)[:, 0]


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                  scale_init: str = "mse", scale_dtype: torch.dtype = torch.float16, scale_grid: str | None = None,
                  damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ of ``weight`` ``(N, K)`` given the Hessian ``hessian`` ``(K, K)`` of its inputs, in ``bits`` (2: SEQ,
    4: asymmetric) with ``group_size`` columns per scale (None: one per row). Returns ``(latent, scale, zero)``:
    the float32 latent weight (round it with ``scale``/``zero`` for GPTQ's codes), the ``(N, G)`` scales and INT4
    zero points (None for INT2), ready for :class:`upq_hf.qat.QATLinear`. Columns whose input is always zero
    keep their weight (they cost nothing either way)."""
    formats.check_bits(bits)
    n_out, n_in = weight.shape
    if tuple(hessian.shape) != (n_in, n_in):
        raise ValueError(f"hessian must be ({n_in}, {n_in}) for a weight of {n_in} input columns, "
                         f"got {tuple(hessian.shape)}")
    formats.check_group_size(n_in, group_size)
    gs = formats.effective_group_size(n_in, group_size) or n_in
    w = weight.detach().to(torch.float64).clone()
    h = hessian.detach().to(torch.float64).clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # the upper Cholesky factor of H^-1: row j holds how column j's error spreads over the columns after it
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)
    latent = torch.empty(n_out, n_in, dtype=torch.float32)
    n_groups = n_in // gs
    scales = torch.empty(n_out, n_groups, dtype=torch.float32)
    zeros = torch.empty(n_out, n_groups, dtype=torch.float32) if bits == 4 else None
    block = gs * max(1, _BLOCK // gs)
    for b0 in range(0, n_in, block):
        b1 = min(b0 + block, n_in)
        part = w[:, b0:b1].clone()
        errors = torch.zeros_like(part)
        for j in range(b1 - b0):
            col = b0 + j
            if col % gs == 0:  # the group's columns as they stand now (the whole group lies in this block)
                s, z = _group_params(part[:, j:j + gs].float(), bits, scale_init, scale_dtype, scale_grid)
                scales[:, col // gs] = s
                if zeros is not None:
                    zeros[:, col // gs] = z
            current = part[:, j].float()
            latent[:, col] = current
            error = (part[:, j] - _round_column(current, s, z).double()) / upper[col, col]
            part[:, j:] -= error[:, None] * upper[col, col:b1][None, :]
            errors[:, j] = error
        w[:, b1:] -= errors @ upper[b0:b1, b1:]
    latent[:, dead] = weight.detach().float()[:, dead]
    return latent, scales, zeros
