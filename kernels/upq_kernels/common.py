"""What every UPQ kernel shares: the packed-weight view, the exponent-trick dequantization, the
code-tile loads, the scale epilogue, and the host-side rules for fitting a block configuration.

Layout read (see :mod:`upq_hf.packing`): codes packed along K into int32 words, ``P = 32 // bits``
per word, lowest bits first, packed tensor ``(ceil(K / P), N)``; scales ``(G, N)``; INT4 zero points
``(G, N)``. Every kernel computes ``y = x @ W.T`` with ``W[n, k] = s[g, n] * (code[n, k] - z[g, n])``,
``z = 1.5`` for INT2 SEQ. The scale and zero are applied after the reduction, per scale group:
``y = sum_g s_g * (x_g . codes_g - z_g * sum(x_g))``, so the inner loop only turns codes into floats.

Codes become floats without an int-to-float conversion: OR the code into the mantissa of a
constant whose mantissa LSB is 1 (1024.0 in fp16 = 0x6400, 128.0 in bf16 = 0x4300, 2**23 in fp32 =
0x4B000000), bitcast, subtract the constant.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from upq_hf.formats import SEQ_OFFSET, check_bits, check_group_size, effective_group_size, num_groups
from upq_hf.packing import codes_per_word, packed_shape

# Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when this package is imported.
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"

# (bit pattern of the magic constant, its value): ``bitcast(pattern | code) == value + code``.
MAGIC = {
    torch.float32: (0x4B000000, 8388608.0),
    torch.float16: (0x6400, 1024.0),
    torch.bfloat16: (0x4300, 128.0),
}
FP32_MAGIC_BITS = tl.constexpr(MAGIC[torch.float32][0])
FP32_MAGIC = tl.constexpr(MAGIC[torch.float32][1])
FP16_MAGIC_BITS = tl.constexpr(MAGIC[torch.float16][0])
FP16_MAGIC = tl.constexpr(MAGIC[torch.float16][1])
BF16_MAGIC_BITS = tl.constexpr(MAGIC[torch.bfloat16][0])
BF16_MAGIC = tl.constexpr(MAGIC[torch.bfloat16][1])
SEQ_ZERO = tl.constexpr(SEQ_OFFSET)

TORCH_TO_TRITON = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# ----------------------------------------------------------------------------------------------
# Device-side helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def codes_to_float(codes, DTYPE: tl.constexpr):
    """int32 codes in ``[0, 2**bits)`` -> exact ``DTYPE`` values, by the exponent trick."""
    if DTYPE == tl.float16:
        magic_plus_code = (codes | FP16_MAGIC_BITS).to(tl.int16).to(tl.float16, bitcast=True)
        return magic_plus_code - FP16_MAGIC  # a float literal keeps the tensor's dtype
    elif DTYPE == tl.bfloat16:
        magic_plus_code = (codes | BF16_MAGIC_BITS).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return magic_plus_code - BF16_MAGIC
    else:
        magic_plus_code = (codes | FP32_MAGIC_BITS).to(tl.float32, bitcast=True)
        return magic_plus_code - FP32_MAGIC


@triton.jit
def load_code_tile(packed_ptr, offs_k, offs_n, K, N, stride_pk, stride_pn, BITS: tl.constexpr):
    """``[BLOCK_K, BLOCK_N]`` int32 codes of rows ``offs_k`` (0 outside ``K x N``).

    Each word is read once per code it holds (the repeats hit the cache); the shift is masked
    afterwards because ``>>`` on int32 is arithmetic and sign-extends the top field.
    """
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    word_ptrs = packed_ptr + (offs_k // CODES_PER_WORD)[:, None] * stride_pk + offs_n[None, :] * stride_pn
    words = tl.load(word_ptrs, mask=(offs_k < K)[:, None] & (offs_n < N)[None, :], other=0)
    shifts = (offs_k % CODES_PER_WORD) * BITS
    return (words >> shifts[:, None]) & ((1 << BITS) - 1)


@triton.jit
def scale_group(x_dot_codes, x_sum, scale_ptr, zero_ptr, group, offs_n, N,
                stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZERO: tl.constexpr):
    """``s * (x . codes - z * sum(x))`` for one scale group: ``[BLOCK_M, BLOCK_N]`` fp32.

    ``x_dot_codes`` is ``[BLOCK_M, BLOCK_N]``, ``x_sum`` is ``[BLOCK_M]``; INT2 SEQ has ``z = 1.5``.
    """
    n_mask = offs_n < N
    scale = tl.load(scale_ptr + group * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + group * stride_zg + offs_n * stride_zn, mask=n_mask, other=0.0).to(tl.float32)
        return scale[None, :] * (x_dot_codes - zero[None, :] * x_sum[:, None])
    else:
        return scale[None, :] * (x_dot_codes - SEQ_ZERO * x_sum[:, None])


@triton.jit
def dot_k_range(x_ptr, packed_ptr, scale_ptr, zero_ptr, offs_m, offs_n, M, N, K,
                block_start, block_end,
                stride_xm, stride_xk, stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn,
                BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``x @ W.T`` over the K blocks ``[block_start, block_end)`` with ``tl.dot``: fp32 ``[BLOCK_M, BLOCK_N]``.

    ``GROUP_SIZE == 0`` means one scale per row: codes and ``sum(x)`` accumulate over the whole
    range and the scale is applied once. Otherwise each K block lies inside one scale group
    (``BLOCK_K`` divides ``GROUP_SIZE``) and is scaled as it is reduced.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_mask = offs_m < M
    for block in range(block_start, block_end):
        offs_k = block * BLOCK_K + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(COMPUTE_DTYPE)
        codes = codes_to_float(load_code_tile(packed_ptr, offs_k, offs_n, K, N, stride_pk, stride_pn, BITS),
                               COMPUTE_DTYPE)
        x_dot_codes = tl.dot(x, codes, out_dtype=tl.float32, input_precision=DOT_PRECISION)
        block_x_sum = tl.sum(x.to(tl.float32), axis=1)
        if GROUP_SIZE == 0:
            acc += x_dot_codes
            x_sum += block_x_sum
        else:
            acc += scale_group(x_dot_codes, block_x_sum, scale_ptr, zero_ptr, (block * BLOCK_K) // GROUP_SIZE,
                               offs_n, N, stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZERO)
    if GROUP_SIZE == 0:
        acc = scale_group(acc, x_sum, scale_ptr, zero_ptr, 0, offs_n, N,
                          stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZERO)
    return acc


@triton.jit
def split_k_blocks(K, split, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K blocks ``[start, end)`` that split ``split`` of ``SPLIT_K`` reduces (trailing splits may be empty)."""
    num_blocks = tl.cdiv(K, BLOCK_K)
    blocks_per_split = tl.cdiv(num_blocks, SPLIT_K)
    block_start = split * blocks_per_split
    return block_start, tl.minimum(block_start + blocks_per_split, num_blocks)


@triton.jit
def store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, split,
               HAS_BIAS: tl.constexpr):
    """Store ``acc`` cast to the output's dtype, masked; split 0 of a split-K reduction adds the bias."""
    n_mask = offs_n < N
    if HAS_BIAS:
        if split == 0:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_mask[None, :])


# ----------------------------------------------------------------------------------------------
# Host-side helpers
# ----------------------------------------------------------------------------------------------

class PackedWeight(NamedTuple):
    """The tensors and attributes of one packed layer (see :mod:`upq_hf.packing`)."""

    packed: torch.Tensor  # (ceil(K / P), N) int32
    scale: torch.Tensor  # (G, N)
    zero: torch.Tensor | None  # (G, N) for INT4, None for INT2 SEQ
    bits: int
    group_size: int | None  # None: one scale per output row
    in_features: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[1]

    @property
    def codes_per_word(self) -> int:
        return codes_per_word(self.bits)

    @property
    def group_size_arg(self) -> int:
        """The kernels' ``GROUP_SIZE`` constexpr: 0 for one scale per row."""
        return 0 if self.group_size is None else self.group_size

    def zero_args(self) -> tuple:
        """Pointer and strides of the zero points (INT2 has none: the scale stands in, never read)."""
        zero = self.scale if self.zero is None else self.zero
        return zero, zero.stride(0), zero.stride(1)

    @classmethod
    def checked(cls, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                group_size: int | None, in_features: int) -> "PackedWeight":
        """Validated shapes and dtypes; ``group_size == in_features`` becomes None, as in ``UPQLinear``."""
        check_bits(bits)
        check_group_size(in_features, group_size)
        group_size = effective_group_size(in_features, group_size)
        N, groups = packed.shape[-1], num_groups(in_features, group_size)
        if packed.dtype != torch.int32 or tuple(packed.shape) != packed_shape(N, in_features, bits):
            raise ValueError(f"packed codes must be int32 of shape {packed_shape(N, in_features, bits)}, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        if tuple(scale.shape) != (groups, N):
            raise ValueError(f"scale must have shape {(groups, N)}, got {tuple(scale.shape)}")
        if (zero is None) != (bits == 2):
            raise ValueError("INT4 needs a zero-point tensor and INT2 SEQ takes none")
        if zero is not None and tuple(zero.shape) != (groups, N):
            raise ValueError(f"zero must have shape {(groups, N)}, got {tuple(zero.shape)}")
        return cls(packed, scale, zero, bits, group_size, in_features)


def kernel_operands(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor) -> tuple:
    """The arguments every fused kernel starts with: ``x, packed, scale, zero, bias, out`` pointers, ``M, N,
    K``, then the strides of ``x``, of the packed codes, of the scales and of the zero points."""
    zero, stride_zg, stride_zn = weight.zero_args()
    return (x, weight.packed, weight.scale, zero, bias, out, x.shape[0], weight.out_features, weight.in_features,
            x.stride(0), x.stride(1), weight.packed.stride(0), weight.packed.stride(1),
            weight.scale.stride(0), weight.scale.stride(1), stride_zg, stride_zn)


def kernel_flags(weight: PackedWeight, bias: torch.Tensor | None) -> dict:
    """The layout constexprs every fused kernel takes: ``BITS``, ``GROUP_SIZE``, ``HAS_ZERO``, ``HAS_BIAS``."""
    return dict(BITS=weight.bits, GROUP_SIZE=weight.group_size_arg, HAS_ZERO=weight.zero is not None,
                HAS_BIAS=bias is not None)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def compute_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """Operand dtype of the in-register dequantization and ``tl.dot``.

    The activation dtype on a GPU. The Triton interpreter computes bf16 arithmetic wrongly (it
    stores bf16 as uint16), so bf16 inputs are computed in fp32 there.
    """
    if x_dtype in (torch.float16, torch.bfloat16) and not (INTERPRETER and x_dtype == torch.bfloat16):
        return x_dtype
    return torch.float32


def dot_precision(dtype: torch.dtype) -> str | None:
    """``tl.dot`` input precision: exact fp32 for fp32 operands (not TF32), the default otherwise."""
    return "ieee" if dtype == torch.float32 else None


def fit_block_k(block_k: int, weight: PackedWeight, min_block_k: int) -> int | None:
    """The ``BLOCK_K`` a kernel runs with: a power of two, a multiple of the codes per word, at
    least ``min_block_k``, no larger than needed for K, and dividing the group size so that each
    K block lies inside one scale group. None when no such block exists (use "dequant")."""
    smallest = max(weight.codes_per_word, min_block_k)
    if weight.group_size is None:
        return max(smallest, min(block_k, next_power_of_2(weight.in_features)))
    block_k = min(block_k, next_power_of_2(weight.group_size))
    while block_k >= smallest:
        if weight.group_size % block_k == 0:
            return block_k
        block_k //= 2
    return None


def fit_block(block: int, size: int, smallest: int) -> int:
    """A block no larger than the power of two covering ``size`` (and at least ``smallest``)."""
    return max(smallest, min(block, next_power_of_2(size)))


def fit_config(config: dict, M: int, weight: PackedWeight, min_block: int,
               block_m: int | None = None) -> dict | None:
    """The block sizes a kernel runs ``config`` with for this shape: blocks shrunk to the problem,
    ``BLOCK_K`` fitted to the scale groups (:func:`fit_block_k`), ``SPLIT_K`` to the K blocks.
    ``block_m`` overrides ``BLOCK_M``. None when no ``BLOCK_K`` fits (use "dequant")."""
    block_k = fit_block_k(config["BLOCK_K"], weight, min_block)
    if block_k is None:
        return None
    fitted = dict(config, BLOCK_N=fit_block(config["BLOCK_N"], weight.out_features, 16), BLOCK_K=block_k,
                  BLOCK_M=block_m if block_m is not None else fit_block(config["BLOCK_M"], M, min_block))
    if "SPLIT_K" in config:
        fitted["SPLIT_K"] = max(1, min(config["SPLIT_K"], triton.cdiv(weight.in_features, block_k)))
    return fitted


def launch_options(config: dict) -> dict:
    """The launch keywords of a config (warps and pipeline stages) that are not kernel arguments."""
    return {key: config[key] for key in ("num_warps", "num_stages") if key in config}


def split_k_target(out: torch.Tensor, split_k: int) -> tuple[torch.Tensor, int]:
    """Where split-K programs write and the stride between splits: ``out`` itself for one split,
    else a fresh fp32 ``[split_k, M, N]`` buffer of partials (every element is written)."""
    if split_k == 1:
        return out, 0
    partials = torch.empty((split_k, *out.shape), dtype=torch.float32, device=out.device)
    return partials, partials.stride(0)


def reduce_split_k(target: torch.Tensor, out: torch.Tensor) -> None:
    """Sum the fp32 partials of :func:`split_k_target` into ``out`` (deterministic, no atomics)."""
    if target is not out:
        out.copy_(target.sum(dim=0))
