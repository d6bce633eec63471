"""``QATLinear``: the trainable (fake-quant) mode of a UPQ layer, and the swaps in and out of it.

A ``QATLinear`` holds what training needs and a ``UPQLinear`` holds what inference needs:

* ``weight``: the latent full-precision weight, a ``Parameter`` of shape ``(N, K)``;
* ``weight_scale``: the learnable scale, a float32 ``Parameter`` of shape ``(N, G)`` (natural
  orientation, one value per output row and input group; ``UPQLinear`` stores it transposed);
* ``weight_zero``: INT4 only, the learnable zero point ``(N, G)``, rounded (straight through)
  wherever it is used, so that the stored zero is an integer;
* ``bias``: copied from the source layer.

Forward: ``F.linear(x, fake_quant(weight), bias)`` with :func:`formats.fake_quant_seq` (INT2 SEQ) or
:func:`formats.fake_quant_int4` (INT4). The scale enters the forward pass already rounded to its
storage dtype (``scale_dtype``, straight-through), so :meth:`QATLinear.freeze` is exact: the frozen
``UPQLinear`` holds the very codes and scales the forward pass used, and its output equals the QAT
layer's output (bit for bit on the torch backend). Gradients: straight through the rounding to the
weight inside the clipping range, LSQ-style to the scale (see :mod:`upq_hf.formats`). The INT2 forward
pass keeps no weight-sized tensor for the backward pass (it recomputes the fake-quantized weight
there, :class:`_SEQLinear`), so training memory is the latent weight, its gradient and the optimizer
state: 16 bytes per parameter with Adam.

Which tensors train is the caller's choice (``requires_grad_``): block-wise PTQ trains scales only or
weights and scales (:mod:`upq_hf.ptq`), distillation QAT trains everything.

Codes frozen (:meth:`QATLinear.freeze_codes`, EfficientQAT's E2E-QP): the layer keeps its current integer
codes (and INT4 zero points) in a ``codes`` buffer and computes ``w = s * (k - 1.5)`` (INT2) or
``s * (k - z)`` (INT4) from them, so that only the scales move: their gradient is ``k - 1.5`` (``k - z``)
times the weight's, with no rounding in between. The latent weight no longer enters the forward pass.

Constructors: :meth:`QATLinear.from_linear` (a dense ``nn.Linear``) and :meth:`QATLinear.from_upq`
(a packed ``UPQLinear``: the latent weight is its dequantized weight, which is how the INT4 model
becomes the start of INT2 training). :func:`to_qat` and :func:`freeze_model` swap every layer of a
model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import nn

from . import formats, packing
from .convert import linear_layers, replace_module
from .nn import UPQLinear


_INIT_ROWS = 256


@torch.no_grad()
def init_quant_params(weight: torch.Tensor, bits: int, group_size: int | None, scale_init: str = "mse",
                      scale_dtype: torch.dtype = torch.float16,
                      scale_grid: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest ``(scale, zero)`` of a ``(N, K)`` weight, as :func:`formats.quantize` finds them
    (``zero`` is None for SEQ INT2). Computed a few hundred rows at a time: the ``"mse"`` search makes
    some thirty passes over the weight, and row blocks that stay in cache make it about twice as fast
    on a CPU, with identical results (groups never span rows)."""
    formats.check_bits(bits)
    w = weight.detach().float()
    scales, zeros = [], []
    for start in range(0, w.shape[0], _INIT_ROWS):
        rows = w[start:start + _INIT_ROWS]
        if bits == 2:
            scales.append(formats.seq_init_scale(rows, group_size, scale_init, scale_dtype, scale_grid))
        else:
            scale, zero = formats.int4_init_params(rows, group_size, scale_init, scale_dtype)
            scales.append(scale)
            zeros.append(zero)
    return torch.cat(scales), (torch.cat(zeros) if zeros else None)


class _StorageRoundSTE(torch.autograd.Function):
    """Round a scale to the dtype it is stored in (clamped to that dtype's smallest normal) in the
    forward pass; identity in the backward pass."""

    @staticmethod
    def forward(ctx, scale, scale_dtype, grid):
        return formats._round_scale(scale, scale_dtype, grid).to(scale.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def stored_scale(scale: torch.Tensor, scale_dtype: torch.dtype, grid: str | None = None) -> torch.Tensor:
    """The value ``scale`` takes once stored in ``scale_dtype`` (on ``grid`` where given), with a straight-through
    gradient."""
    return _StorageRoundSTE.apply(scale, scale_dtype, grid)


class _SEQLinear(torch.autograd.Function):
    """``F.linear(x, fake_quant_seq(w, s), b)`` that keeps no weight-sized tensor for the backward pass.

    Through plain autograd the SEQ fake-quant saves three weight-sized intermediates per layer (the
    clamp's input, the rounded levels and the fake-quantized weight that ``F.linear`` keeps), 12 bytes
    per parameter held from the forward to the backward pass: for a 1B model, 12 GB on top of the
    16 bytes per parameter of the latent weight, its gradient and Adam's moments. This function saves
    only ``x`` and references to ``w`` and ``s`` (which exist anyway) and recomputes the fake-quantized
    weight in the backward pass, one layer at a time. Forward output is bit-identical to the autograd
    path; gradients are the same STE/LSQ gradients (:func:`formats.fake_quant_seq`).
    """

    @staticmethod
    def forward(ctx, x, weight, scale, bias, group_size, eps):
        ctx.save_for_backward(x, weight, scale)
        ctx.group_size, ctx.eps, ctx.has_bias = group_size, eps, bias is not None
        s = scale.unsqueeze(-1).to(weight.dtype)
        ratio = formats._grouped(weight, group_size) / s
        wq = formats.seq_level(ratio, eps, out=ratio).mul_(s).reshape(weight.shape).to(x.dtype)
        return F.linear(x, wq, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, scale = ctx.saved_tensors
        n_out, n_in = weight.shape
        s = scale.unsqueeze(-1).to(weight.dtype)
        # every weight-sized temporary is computed in place where it can be (see formats.seq_level)
        ratio = formats._grouped(weight, ctx.group_size) / s  # w / s
        level = formats.seq_level(ratio, ctx.eps)
        bound = formats.seq_clip(ctx.eps)
        inside = (ratio >= -bound) & (ratio <= bound)  # where the clipping passes the gradient
        grad_x = grad_w = grad_s = grad_b = None
        if ctx.needs_input_grad[2]:
            # dq/ds = (k - 1.5) - w / s inside the clipping range, k - 1.5 outside
            ds = ratio.mul_(inside).neg_().add_(level)
        # under autocast the forward matmul ran in the autocast dtype (that of grad_out), which x may not have
        g2 = grad_out.reshape(-1, n_out)
        if ctx.needs_input_grad[0]:
            grad_x = (g2 @ level.mul_(s).reshape(n_out, n_in).to(g2.dtype)).reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gq = formats._grouped((g2.t() @ x.reshape(-1, n_in).to(g2.dtype)).to(weight.dtype), ctx.group_size)
            if ctx.needs_input_grad[2]:
                grad_s = ds.mul_(gq).sum(-1).to(scale.dtype)
            if ctx.needs_input_grad[1]:
                grad_w = gq.mul_(inside).reshape(n_out, n_in)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_s, grad_b, None, None


class QATLinear(nn.Module):
    """Fake-quantized linear layer with a latent weight and learnable scales (see module doc).

    Args:
        weight: ``(out_features, in_features)`` initial latent weight (copied, float32).
        scale: ``(out_features, G)`` initial scale (copied, float32).
        zero: ``(out_features, G)`` initial INT4 zero point, ``None`` for INT2.
        bias: optional bias (copied).
        bits: 2 (SEQ) or 4 (asymmetric).
        group_size: input columns per scale, ``None`` for one scale per output row.
        scale_dtype: dtype the scales (and zero points) are stored in after :meth:`freeze`.
        scale_grid: the grid the SEQ scales are stored on (:data:`upq_hf.formats.SCALE_GRIDS`), or None.
    """

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group_size: int | None,
                 scale_dtype: torch.dtype = torch.float16, scale_grid: str | None = None):
        super().__init__()
        formats.check_bits(bits)
        if (zero is None) != (bits == 2):
            raise ValueError("INT4 needs a zero point and INT2 (SEQ) takes none")
        self.out_features, self.in_features = weight.shape
        formats.check_group_size(self.in_features, group_size)
        self.bits = bits
        self.group_size = formats.effective_group_size(self.in_features, group_size)
        self.scale_dtype = scale_dtype
        self.scale_grid = scale_grid if bits == 2 else None
        n_groups = formats.num_groups(self.in_features, self.group_size)
        if tuple(scale.shape) != (self.out_features, n_groups):
            raise ValueError(f"scale must have shape {(self.out_features, n_groups)}, got {tuple(scale.shape)}")
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.weight_scale = nn.Parameter(scale.detach().float().clone().to(weight.device))
        if zero is not None:
            self.weight_zero = nn.Parameter(zero.detach().float().clone().to(weight.device))
        else:
            self.register_parameter("weight_zero", None)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        else:
            self.register_parameter("bias", None)
        self.register_buffer("codes", None)  # set by freeze_codes(); packed int32 after drop_latent()
        self.codes_packed = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int | None,
                    scale_init: str = "mse", scale_dtype: torch.dtype = torch.float16,
                    scale_grid: str | None = None) -> "QATLinear":
        """Start from a dense weight with the round-to-nearest scales of :mod:`upq_hf.formats`."""
        formats.check_group_size(weight.shape[1], group_size)
        w = weight.detach().float()
        scale, zero = init_quant_params(w, bits, group_size, scale_init, scale_dtype, scale_grid)
        return cls(w, scale, zero, bias, bits, group_size, scale_dtype, scale_grid)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 2, group_size: int | None = None,
                    scale_init: str = "mse", scale_dtype: torch.dtype = torch.float16,
                    scale_grid: str | None = None) -> "QATLinear":
        """A dense ``nn.Linear`` as the latent weight; scales from ``scale_init`` (``"max"`` or ``"mse"``).
        At initialisation the forward pass equals round-to-nearest (``UPQLinear.from_linear``)."""
        return cls.from_weight(linear.weight, linear.bias, bits, group_size, scale_init, scale_dtype, scale_grid)

    @classmethod
    def from_upq(cls, upq: UPQLinear, bits: int = 2, group_size: int | None = None, scale_init: str = "mse",
                 scale_dtype: torch.dtype | None = None) -> "QATLinear":
        """A packed ``UPQLinear`` as the start: latent weight = its dequantized weight (float32), new
        scales for ``bits``/``group_size`` initialised from that latent weight. With ``bits`` and
        ``group_size`` equal to the layer's and its own scales kept instead, use
        :meth:`from_upq_exact`. This is the INT4 -> INT2 step of UPQ."""
        latent = upq.dequantize(torch.float32)
        return cls.from_weight(latent, upq.bias, bits, group_size, scale_init,
                               scale_dtype or upq.weight_scale.dtype)

    @classmethod
    def from_upq_exact(cls, upq: UPQLinear) -> "QATLinear":
        """Resume training of a packed layer in its own format: latent weight, scales and zero points are
        the stored ones, so the forward pass equals the ``UPQLinear``'s."""
        qw = upq.quantized_weight()
        latent = formats.dequantize(qw, torch.float32)
        zero = None if qw.zero is None else qw.zero.float()
        return cls(latent, qw.scale.float(), zero, upq.bias, upq.bits, upq.group_size, upq.weight_scale.dtype)

    @torch.no_grad()
    def freeze_codes(self) -> None:
        """Fix the current codes (and INT4 zero points); from here on only the scales train (E2E-QP). The
        forward pass is unchanged at this point: the same codes and scales give the same weight. The latent
        weight and the zero point stop requiring gradients. Codes fixed already stay as they are (packed ones
        too, with the latent weight dropped)."""
        if self.codes is None:
            self.codes = self.quantized_weight().codes.to(torch.uint8)
        if self.weight is not None:
            self.weight.requires_grad_(False)
        if self.weight_zero is not None:
            self.weight_zero.copy_(torch.round(self.weight_zero))
            self.weight_zero.requires_grad_(False)

    @torch.no_grad()
    def snap(self) -> None:
        """Fix the codes where the latent weights round now (:meth:`freeze_codes`) and put the scales on their
        storage grid: the layer now computes exactly what its packed form (:meth:`freeze`) does, and training goes
        on from there with the codes fixed. (What packing the layer and unpacking it again did, without the round
        trip.)"""
        self.freeze_codes()
        self.weight_scale.copy_(self._scale())

    @torch.no_grad()
    def drop_latent(self) -> None:
        """With the codes fixed (:meth:`freeze_codes`), keep them packed (``bits`` bits each instead of a float32
        latent weight and a byte per code) and drop the latent weight: the layer computes the same, trains its
        scales the same, and holds a sixteenth of the memory (what a model larger than memory needs while its
        scales are distilled, :mod:`upq_hf.streamed`)."""
        if self.codes is None:
            raise ValueError("drop_latent needs the codes fixed first (freeze_codes or snap)")
        if not self.codes_packed:
            self.codes = packing.pack_codes(self.codes, self.bits)
            self.codes_packed = True
        self.register_parameter("weight", None)

    def _codes(self) -> torch.Tensor:
        """The fixed codes ``(out, in)`` as bytes (unpacked on the fly after :meth:`drop_latent`)."""
        if self.codes_packed:
            return packing.unpack_codes(self.codes, self.bits, self.in_features)
        return self.codes

    # ------------------------------------------------------------------ quantization
    def _scale(self) -> torch.Tensor:
        return stored_scale(self.weight_scale, self.scale_dtype, self.scale_grid)

    def _zero(self) -> torch.Tensor:
        # the zero point is stored in scale_dtype too; integers 0..15 are exact there
        return formats.round_ste(self.weight_zero)

    def fake_quant_weight(self) -> torch.Tensor:
        """The quantized weight the forward pass uses (float32, differentiable)."""
        if self.codes is not None:  # codes frozen: the dequantization of the stored format, differentiable in s
            if self.bits == 2:
                return formats.dequantize_seq(self._codes(), self._scale(), self.group_size)
            return formats.dequantize_int4(self._codes(), self._scale(), self.weight_zero.detach(), self.group_size)
        if self.bits == 2:
            return formats.fake_quant_seq(self.weight, self._scale(), self.group_size)
        return formats.fake_quant_int4(self.weight, self._scale(), self._zero(), self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 2 and self.codes is None:
            return _SEQLinear.apply(x, self.weight, self._scale(), self.bias, self.group_size, formats.SEQ_EPS)
        if self.codes is None and torch.is_grad_enabled():
            # INT4 latents in training: the fake-quant's weight-sized intermediates (12 bytes per parameter through
            # autograd) are recomputed in the backward pass instead of kept; the gradients are the same
            weight = checkpoint(self._fake_quant_as, x.dtype, use_reentrant=False)
        else:
            weight = self._fake_quant_as(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def _fake_quant_as(self, dtype: torch.dtype) -> torch.Tensor:
        return self.fake_quant_weight().to(dtype)

    @torch.no_grad()
    def quantized_weight(self) -> formats.QuantizedWeight:
        """Codes and stored scales, computed with the same operations as the forward pass."""
        scale = formats._round_scale(self.weight_scale.detach().float(), self.scale_dtype, self.scale_grid)
        if self.codes is not None:
            zero = None if self.bits == 2 else torch.round(self.weight_zero.detach().float()).to(self.scale_dtype)
            return formats.QuantizedWeight(self._codes().clone(), scale.to(self.scale_dtype), zero, self.bits,
                                           self.group_size)
        w = self.weight.detach().float()
        if self.bits == 2:
            codes = formats.seq_codes(w, scale, self.group_size)
            return formats.QuantizedWeight(codes, scale.to(self.scale_dtype), None, 2, self.group_size)
        zero = torch.round(self.weight_zero.detach().float())
        wg = formats._grouped(w, self.group_size)
        codes = formats.int4_code_rule(wg / scale.unsqueeze(-1), zero.unsqueeze(-1))  # as fake_quant_int4
        codes = codes.reshape(w.shape).to(torch.uint8)
        return formats.QuantizedWeight(codes, scale.to(self.scale_dtype), zero.to(self.scale_dtype), 4,
                                       self.group_size)

    @torch.no_grad()
    def freeze(self, scale_dtype: torch.dtype | None = None, backend: str | None = None) -> UPQLinear:
        """The packed ``UPQLinear`` of the current state. ``scale_dtype`` defaults to the one the forward
        pass rounds to (``self.scale_dtype``); only then is the frozen output exactly the QAT output."""
        if scale_dtype is not None and scale_dtype != self.scale_dtype:
            latent = self.weight if self.weight is not None else self.fake_quant_weight().detach()
            qat = QATLinear(latent, self.weight_scale, self.weight_zero, self.bias, self.bits, self.group_size,
                            scale_dtype, self.scale_grid)
            qat.codes, qat.codes_packed = self.codes, self.codes_packed
            return qat.freeze(backend=backend)
        bias = None if self.bias is None else self.bias.detach()
        frozen = UPQLinear.from_quantized(self.quantized_weight(), bias, backend=backend)
        if frozen.bias is not None:
            frozen.bias.requires_grad_(False)
        return frozen

    def extra_repr(self) -> str:
        fmt = "INT2 SEQ" if self.bits == 2 else "INT4 asym"
        groups = "per-row" if self.group_size is None else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={fmt}, {groups}, scale_dtype={str(self.scale_dtype).removeprefix('torch.')}"
                + (", codes frozen" if self.codes is not None else ""))


# ----------------------------------------------------------------------------------------------
# Whole-model swaps
# ----------------------------------------------------------------------------------------------

def to_qat(model: nn.Module, bits: int | None = None, group_size: int | None = None, scale_init: str = "mse",
           scale_dtype: torch.dtype | None = None, modules_to_not_convert: Iterable[str] | None = None,
           scale_grid: str | None = None,
           layer_formats: dict[str, tuple[int, int | None]] | None = None) -> list[str]:
    """Swap every ``UPQLinear`` of ``model`` for a ``QATLinear``, in place; returns the names swapped.

    ``bits=None``: each layer keeps its format, codes and scales (:meth:`QATLinear.from_upq_exact`), so
    training resumes where the packed model stands. ``bits`` (and ``group_size``) given: each layer
    restarts in that format from its dequantized weight with ``scale_init`` scales
    (:meth:`QATLinear.from_upq`; the INT4 -> INT2 step). A model without any ``UPQLinear`` needs ``bits``:
    its linear layers (the output embedding excepted, see :func:`upq_hf.convert.linear_layers`) start
    from their dense weights (:meth:`QATLinear.from_linear`).
    sets the format of the layers that differ from ``bits``/``group_size`` (mixed precision).
    """
    from .convert import _canonical, _format, _skipped

    skip = tuple(modules_to_not_convert or ())
    upq = {name: m for name, m in model.named_modules() if isinstance(m, UPQLinear) and not _skipped(name, skip)}
    if upq:
        for name, module in upq.items():
            if bits is None:
                new = QATLinear.from_upq_exact(module)
            else:
                new = QATLinear.from_upq(module, *_format(name, bits, group_size, layer_formats), scale_init,
                                         scale_dtype)
            replace_module(model, name, new)
        return list(upq)
    if bits is None:
        raise ValueError("to_qat found no UPQLinear in the model; pass bits (and group_size) to start from its "
                         "dense linear layers")
    _canonical(model, bits, group_size, skip, layer_formats)  # Conv1D, fused experts: as nn.Linear layers
    dense = linear_layers(model, skip)
    for name, linear in dense.items():
        replace_module(model, name, QATLinear.from_linear(linear, *_format(name, bits, group_size, layer_formats),
                                                          scale_init, scale_dtype or torch.float16, scale_grid))
    return list(dense)


def snap(model: nn.Module) -> list[str]:
    """:meth:`QATLinear.snap` every QAT layer of ``model`` (codes fixed, scales on their storage grid); returns the
    names."""
    layers = qat_layers(model)
    for layer in layers.values():
        layer.snap()
    return list(layers)


def release_latents(model: nn.Module) -> list[str]:
    """Replace every ``QATLinear`` of ``model`` by an ``nn.Linear`` holding its latent weight (float32): the INT4
    stage's result, from which the INT2 stage starts. Returns the names."""
    layers = qat_layers(model)
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=torch.float32)
        with torch.no_grad():
            linear.weight.copy_(layer.weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        replace_module(model, name, linear)
    return list(layers)


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def freeze_model(model: nn.Module, scale_dtype: torch.dtype | None = None, backend: str | None = None) -> list[str]:
    """Swap every ``QATLinear`` of ``model`` for its packed ``UPQLinear``, in place; returns the names."""
    layers = qat_layers(model)
    for name, module in layers.items():
        replace_module(model, name, module.freeze(scale_dtype, backend=backend))
    return list(layers)
