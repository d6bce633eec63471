"""``UPQLinear``: a linear layer whose weight is stored as packed INT2 (SEQ) or INT4 codes.

Buffers (see :mod:`upq_hf.packing` for the layout): ``weight`` (packed int32 codes),
``weight_scale`` and, for INT4, ``weight_zero``; ``bias`` stays a floating parameter. The forward
pass dequantizes into a temporary that dies with the call (torch backend), runs a Triton kernel, or
runs torch's INT4 CPU kernel on a 4-bit copy of the codes made once (see :mod:`upq_hf.backends` and
:mod:`upq_hf.int4pack`): no dequantized copy of the weight is kept between calls.
"""

from __future__ import annotations

import torch
from torch import nn

from . import formats, int4pack, packing
from .backends import linear_forward


class UPQLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 2,
                 group_size: int | None = None, scale_dtype: torch.dtype = torch.float16,
                 dtype: torch.dtype | None = None, device=None, backend: str | None = None):
        super().__init__()
        formats.check_bits(bits)
        formats.check_group_size(in_features, group_size)
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = formats.effective_group_size(in_features, group_size)
        self.backend = backend
        n_groups = formats.num_groups(in_features, self.group_size)
        self.register_buffer("weight", torch.zeros(packing.packed_shape(out_features, in_features, bits),
                                                   dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(n_groups, out_features, dtype=scale_dtype, device=device))
        if bits == 4:
            self.register_buffer("weight_zero", torch.zeros(n_groups, out_features, dtype=scale_dtype, device=device))
        else:
            self.weight_zero = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_quantized(cls, qw: formats.QuantizedWeight, bias: torch.Tensor | None = None,
                       backend: str | None = None) -> "UPQLinear":
        """Build from natural-orientation codes/scales (the output of :func:`formats.quantize`)."""
        n_out, n_in = qw.codes.shape
        module = cls(n_in, n_out, bias=bias is not None, bits=qw.bits, group_size=qw.group_size,
                     scale_dtype=qw.scale.dtype, dtype=None if bias is None else bias.dtype,
                     device=qw.codes.device, backend=backend)
        module.weight = packing.pack_codes(qw.codes, qw.bits)
        module.weight_scale = qw.scale.t().contiguous()
        if qw.bits == 4:
            module.weight_zero = qw.zero.t().contiguous()
        if bias is not None:
            module.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, group_size: int | None = None,
                    scale_init: str = "max", scale_dtype: torch.dtype = torch.float16,
                    backend: str | None = None, scale_grid: str | None = None) -> "UPQLinear":
        """Round-to-nearest quantization of an ``nn.Linear`` (SEQ scales on ``scale_grid`` if given)."""
        with torch.no_grad():
            qw = formats.quantize(linear.weight.detach(), bits, group_size, scale_init, scale_dtype, scale_grid)
        return cls.from_quantized(qw, linear.bias, backend=backend)

    # ------------------------------------------------------------------ views of the weight
    def codes(self) -> torch.Tensor:
        """Unpacked ``(out_features, in_features)`` uint8 codes."""
        return packing.unpack_codes(self.weight, self.bits, self.in_features)

    def quantized_weight(self) -> formats.QuantizedWeight:
        zero = None if self.weight_zero is None else self.weight_zero.t()
        return formats.QuantizedWeight(self.codes(), self.weight_scale.t(), zero, self.bits, self.group_size)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight these codes stand for (a fresh tensor)."""
        dtype = dtype or self.weight_scale.dtype
        return formats.dequantize(self.quantized_weight(), dtype)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` / ``.half()`` must not round the stored scales: they keep their dtype
        # and only follow the device of the codes. The CPU backend's repacked copy is dropped.
        int4pack.drop_cache(self)
        scale, zero = self.weight_scale, self.weight_zero
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight.device)
        if zero is not None:
            self.weight_zero = zero.to(self.weight.device)
        return self

    def __getstate__(self):
        # pickling and deepcopy leave the CPU backend's repacked copy behind: it is derived from the buffers
        # and rebuilt on the copy's first forward, not worth its bytes in a pickle
        state = super().__getstate__()
        state = dict(state)
        state.pop(int4pack.CACHE_ATTRIBUTE, None)
        return state

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self)

    @property
    def bits_per_weight(self) -> float:
        return packing.bits_per_weight(self.bits, self.group_size, self.in_features,
                                       self.weight_scale.element_size(), self.weight_zero is not None)

    def extra_repr(self) -> str:
        fmt = "INT2 SEQ" if self.bits == 2 else "INT4 asym"
        groups = "per-row" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={fmt}, {groups}, scale_dtype={str(self.weight_scale.dtype).removeprefix('torch.')}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, backend={self.backend or 'auto'}")
