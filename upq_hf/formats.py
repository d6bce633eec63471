"""Number formats: SEQ INT2 and asymmetric INT4 (quantize, dequantize, fake-quant with STE).

Everything here works on a weight in ``nn.Linear`` orientation, ``w`` of shape
``(out_features, in_features) = (N, K)``, with per-group parameters of shape ``(N, G)`` where
``G = K // group_size`` groups run along the input dimension (``group_size=None`` means one group
per output row, the UPQ paper's choice for INT2). No transformers import: usable on any tensor.

INT2, SEQ (stretched elastic quant, ParetoQ): codes ``k`` in ``{0, 1, 2, 3}``,
``w = s * (k - 1.5)``; four levels ``s * {-1.5, -0.5, 0.5, 1.5}`` and no zero level. With
``Delta = 2 s`` this is ParetoQ's ``Delta * (round(2 clip(w / Delta, -1 + eps, 1 - eps) - 0.5) + 0.5) / 2``.

INT4: codes ``k`` in ``0..15``, ``w = s * (k - z)`` with a per-group scale ``s`` and zero point ``z``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SUPPORTED_BITS = (2, 4)
SEQ_EPS = 0.01
SEQ_OFFSET = 1.5
SCALE_INITS = ("max", "mse")
_MSE_GRID = torch.linspace(0.25, 1.0, 31)


class QuantizedWeight(NamedTuple):
    """Codes ``(N, K)`` uint8, scale ``(N, G)``, zero ``(N, G)`` or None (SEQ INT2)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int | None


def check_bits(bits) -> int:
    """``bits`` if it is a supported width (2: SEQ INT2, 4: INT4), else ``ValueError``."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {list(SUPPORTED_BITS)}, got {bits!r}")
    return bits


def effective_group_size(in_features: int, group_size: int | None) -> int | None:
    """The group size a layer stores: ``None`` (one scale per output row) also when one group spans the
    whole row (``group_size == in_features``)."""
    return None if group_size in (None, in_features) else group_size


def num_groups(in_features: int, group_size: int | None) -> int:
    return 1 if group_size is None else in_features // group_size


def check_group_size(in_features: int, group_size: int | None, layer: str = "layer") -> None:
    """Raise ``ValueError`` naming the layer and the allowed values if ``group_size`` does not fit."""
    if group_size is None:
        return
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or None (one scale per row), got {group_size!r}")
    if in_features % group_size:
        allowed = [g for g in (16, 32, 64, 128, 256, 512, 1024) if in_features % g == 0]
        raise ValueError(
            f"group_size={group_size} does not divide in_features={in_features} of {layer}; "
            f"allowed group sizes for this layer: {allowed} or None (one scale per output row)"
        )


def _grouped(w: torch.Tensor, group_size: int | None) -> torch.Tensor:
    n_out, n_in = w.shape
    gs = n_in if group_size is None else group_size
    return w.reshape(n_out, n_in // gs, gs)


def _expand(param: torch.Tensor, group_size: int | None, n_in: int) -> torch.Tensor:
    """(N, G) -> (N, K) by repeating each group's value over its columns."""
    gs = n_in if group_size is None else group_size
    return param.repeat_interleave(gs, dim=1)


def _round_scale(scale: torch.Tensor, scale_dtype: torch.dtype, grid: str | None = None) -> torch.Tensor:
    """Scales are stored in ``scale_dtype`` (on ``grid`` if one is given, :data:`SCALE_GRIDS`): compute codes with
    the value that will be stored."""
    if grid is not None:
        return q2_k_grid(scale.float())
    tiny = torch.finfo(scale_dtype).tiny
    return scale.clamp_min(tiny).to(scale_dtype).to(torch.float32)


# ----------------------------------------------------------------------------------------------
# The Q2_K scale grid
# ----------------------------------------------------------------------------------------------

#: scale grids a SEQ INT2 layer can be trained on (``UPQConfig.scale_grid``)
SCALE_GRIDS = ("q2_k",)
Q2_K_GROUP = 16  # columns per scale
Q2_K_SUPER = 256  # columns per super-block: 16 scales sharing one d
_Q2_K_BITS = 6  # significant bits of d: d * c (c <= 15, 4 bits) and 1.5 d then fit fp16's 11 exactly


def q2_k_super_scale(scale: torch.Tensor) -> torch.Tensor:
    """``d`` per super-block of 16 consecutive scales (``(N, G)`` -> ``(N, G / 16)``): the largest scale over 15,
    rounded up to a number of 6 significant bits (``m 2^e``, m in 32..63) no smaller than fp16's smallest normal,
    so that every ``d c`` (c in 1..15) and ``1.5 d`` are exact in fp16."""
    top = scale.reshape(*scale.shape[:-1], -1, Q2_K_GROUP).amax(-1).float()
    raw = (top / 15).clamp_min(torch.finfo(torch.float16).tiny)
    exponent = torch.floor(torch.log2(raw)) - (_Q2_K_BITS - 1)
    mantissa = torch.ceil(raw / torch.exp2(exponent))  # in 32..64: 64 carries into the next exponent
    return mantissa * torch.exp2(exponent)


def q2_k_grid(scale: torch.Tensor) -> torch.Tensor:
    """SEQ scales ``(N, G)`` (groups of 16 columns, G a multiple of 16) on llama.cpp's Q2_K grid: each scale an
    integer multiple ``c`` (1..15) of its super-block's ``d`` (:func:`q2_k_super_scale`), the nearest one. A
    ``Q2_K`` block then stores the layer exactly: ``sc = m = c``, ``dmin = 1.5 d``."""
    d = q2_k_super_scale(scale).repeat_interleave(Q2_K_GROUP, dim=-1)
    return torch.clamp(torch.round(scale.float() / d), 1, 15) * d


# ----------------------------------------------------------------------------------------------
# SEQ INT2
# ----------------------------------------------------------------------------------------------

def seq_clip(eps: float = SEQ_EPS) -> float:
    """The clipping bound of ``w / s``: ``2 (1 - eps)`` (ParetoQ's ``|w / Delta| <= 1 - eps``, ``Delta = 2 s``)."""
    return 2 * (1 - eps)


def seq_level(ratio: torch.Tensor, eps: float = SEQ_EPS, out: torch.Tensor | None = None) -> torch.Tensor:
    """The SEQ rounding rule: the level ``k - 1.5`` in ``{-1.5, -0.5, 0.5, 1.5}`` that ``ratio = w / s`` rounds
    to, ``round(clip(w / s, -2 (1 - eps), 2 (1 - eps)) - 0.5) + 0.5`` (no gradient). The weight is inside the
    clipping range (and passes a straight-through gradient) where ``|w / s| <= 2 (1 - eps)``.

    ``out=ratio`` computes it in place. Every operation after the clip is in place: on a CPU, allocating
    weight-sized temporaries costs more than the arithmetic (fresh pages from the kernel)."""
    bound = seq_clip(eps)
    return torch.clamp(ratio, -bound, bound, out=out).sub_(0.5).round_().add_(0.5)


def seq_codes(w: torch.Tensor, scale: torch.Tensor, group_size: int | None, eps: float = SEQ_EPS) -> torch.Tensor:
    """Round-to-nearest SEQ codes of ``w`` for a given ``(N, G)`` scale ``s = Delta / 2``."""
    ratio = _grouped(w.float(), group_size) / scale.float().unsqueeze(-1)
    return seq_level(ratio, eps, out=ratio).add_(1.5).reshape(w.shape).to(torch.uint8)


def seq_init_scale(w: torch.Tensor, group_size: int | None, scale_init: str = "max",
                   scale_dtype: torch.dtype = torch.float16, grid: str | None = None) -> torch.Tensor:
    """Initial SEQ scale ``s`` per group: ``max|w| / 2`` (ParetoQ) or the MSE-minimising shrink of it; on ``grid``,
    the per-group choice put on the grid."""
    if scale_init not in SCALE_INITS:
        raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {scale_init!r}")
    if grid is not None:
        return _round_scale(seq_init_scale(w, group_size, scale_init, scale_dtype), scale_dtype, grid)
    wg = _grouped(w.float(), group_size)
    delta = wg.abs().amax(dim=-1)
    if scale_init == "max":
        return _round_scale(delta / 2, scale_dtype)
    best_err = torch.full_like(delta, float("inf"))
    best = delta / 2
    work = torch.empty_like(wg)  # one weight-sized buffer for every candidate (see _search_error)
    for alpha in _MSE_GRID.tolist():
        s = _round_scale(alpha * delta / 2, scale_dtype)
        err = _search_error(wg, s, None, work)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def _search_error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, work: torch.Tensor) -> torch.Tensor:
    """Squared error per group of round-to-nearest with ``scale`` (and INT4 ``zero``; None: SEQ INT2) on the
    grouped fp32 weight ``wg`` ``(N, G, gs)``, computed in ``work`` in place. The same operations, in the same
    order and layout, as quantizing then dequantizing with :func:`seq_codes` / :func:`int4_codes` (the codes are
    small integers or half-integers, exact in fp32), so the chosen scales are bit for bit those of that
    round trip, without its weight-sized temporaries (the cost of the ``"mse"`` search on a CPU)."""
    s = scale.unsqueeze(-1)
    torch.div(wg, s, out=work)
    if zero is None:
        seq_level(work, out=work)
    else:
        z = zero.unsqueeze(-1)
        work.add_(z).round_().clamp_(0, INT4_MAX).sub_(z)
    return work.mul_(s).sub_(wg).square_().sum(-1)


def quantize_seq(w: torch.Tensor, group_size: int | None = None, scale: torch.Tensor | None = None,
                 scale_init: str = "max", scale_dtype: torch.dtype = torch.float16,
                 grid: str | None = None) -> QuantizedWeight:
    if scale is None:
        scale = seq_init_scale(w, group_size, scale_init, scale_dtype, grid)
    else:
        scale = _round_scale(scale.detach().float(), scale_dtype, grid)
    codes = seq_codes(w, scale, group_size)
    return QuantizedWeight(codes, scale.to(scale_dtype), None, 2, group_size)


def dequantize_seq(codes: torch.Tensor, scale: torch.Tensor, group_size: int | None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n_in = codes.shape[1]
    w = (codes.float() - SEQ_OFFSET) * _expand(scale.float(), group_size, n_in)
    return w.to(dtype)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round`` in the forward pass, identity in the backward pass."""
    return _RoundSTE.apply(x)


def fake_quant_seq(w: torch.Tensor, scale: torch.Tensor, group_size: int | None, eps: float = SEQ_EPS) -> torch.Tensor:
    """SEQ fake-quant with straight-through gradients.

    Forward: ``s * (k - 1.5)`` with the RTN code ``k``. Backward: ``dq/dw = 1`` where
    ``|w| / (2 s) < 1 - eps`` and 0 outside; ``dq/ds = (k - 1.5) - w / s`` inside and
    ``k - 1.5 = +-1.5`` outside (LSQ-style, as in ParetoQ).
    """
    n_out, n_in = w.shape
    wg = _grouped(w, group_size)
    s = scale.unsqueeze(-1).to(w.dtype)
    u = torch.clamp(wg / (2 * s), -1 + eps, 1 - eps)
    q = s * (round_ste(2 * u - 0.5) + 0.5)
    return q.reshape(n_out, n_in)


# ----------------------------------------------------------------------------------------------
# Asymmetric INT4
# ----------------------------------------------------------------------------------------------

INT4_MAX = 15


def int4_params_from_range(lo: torch.Tensor, hi: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point that map ``[lo, hi]`` (containing 0) onto codes 0..15."""
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    scale = _round_scale((hi - lo) / INT4_MAX, scale_dtype)
    zero = torch.round(-lo / scale).clamp(0, INT4_MAX)
    return scale, zero


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    wg = _grouped(w.float(), group_size)
    codes = torch.round(wg / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)).clamp(0, INT4_MAX)
    return codes.reshape(w.shape).to(torch.uint8)


def int4_init_params(w: torch.Tensor, group_size: int | None, scale_init: str = "max",
                     scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max range (``"max"``) or the MSE-minimising shrink of it (``"mse"``)."""
    if scale_init not in SCALE_INITS:
        raise ValueError(f"scale_init must be one of {SCALE_INITS}, got {scale_init!r}")
    wg = _grouped(w.float(), group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    if scale_init == "max":
        return int4_params_from_range(lo, hi, scale_dtype)
    best_err = torch.full_like(lo, float("inf"))
    best_s, best_z = int4_params_from_range(lo, hi, scale_dtype)
    work = torch.empty_like(wg)
    for alpha in _MSE_GRID.tolist():
        s, z = int4_params_from_range(alpha * lo, alpha * hi, scale_dtype)
        err = _search_error(wg, s, z, work)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s, best_z


def quantize_int4(w: torch.Tensor, group_size: int | None = 128, scale: torch.Tensor | None = None,
                  zero: torch.Tensor | None = None, scale_init: str = "max",
                  scale_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    if scale is None:
        scale, zero = int4_init_params(w, group_size, scale_init, scale_dtype)
    else:
        if zero is None:
            raise ValueError("INT4 needs a zero point with an explicit scale")
        scale = _round_scale(scale.detach().float(), scale_dtype)
        zero = zero.detach().float().to(scale_dtype).float()
    codes = int4_codes(w, scale, zero, group_size)
    return QuantizedWeight(codes, scale.to(scale_dtype), zero.to(scale_dtype), 4, group_size)


def dequantize_int4(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n_in = codes.shape[1]
    w = (codes.float() - _expand(zero.float(), group_size, n_in)) * _expand(scale.float(), group_size, n_in)
    return w.to(dtype)


def fake_quant_int4(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """INT4 fake-quant: STE through the rounding; gradients reach ``w``, ``scale`` and ``zero``
    (clamped codes pass no gradient to ``w``)."""
    n_out, n_in = w.shape
    wg = _grouped(w, group_size)
    s = scale.unsqueeze(-1).to(w.dtype)
    z = zero.unsqueeze(-1).to(w.dtype)
    codes = int4_code_rule(wg / s, z, round_ste)
    return ((codes - round_ste(z)) * s).reshape(n_out, n_in)


def int4_code_rule(w_over_s: torch.Tensor, zero: torch.Tensor, rounding=torch.round) -> torch.Tensor:
    """The INT4 codes of fake-quant and of freezing a QAT layer: ``clamp(round(w / s) + round(z), 0, 15)``,
    in that order (ties included); ``rounding`` is :func:`round_ste` where gradients flow."""
    return torch.clamp(rounding(w_over_s) + rounding(zero), 0, INT4_MAX)


# ----------------------------------------------------------------------------------------------
# Dispatch by bit width
# ----------------------------------------------------------------------------------------------

def quantize(w: torch.Tensor, bits: int, group_size: int | None, scale_init: str = "max",
             scale_dtype: torch.dtype = torch.float16, grid: str | None = None) -> QuantizedWeight:
    """Round-to-nearest quantization of a ``(N, K)`` weight to INT2 SEQ (its scales on ``grid`` if given) or
    INT4."""
    check_bits(bits)
    check_group_size(w.shape[1], group_size)
    if bits == 2:
        return quantize_seq(w, group_size, scale_init=scale_init, scale_dtype=scale_dtype, grid=grid)
    return quantize_int4(w, group_size, scale_init=scale_init, scale_dtype=scale_dtype)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if qw.bits == 2:
        return dequantize_seq(qw.codes, qw.scale, qw.group_size, dtype)
    return dequantize_int4(qw.codes, qw.scale, qw.zero, qw.group_size, dtype)
