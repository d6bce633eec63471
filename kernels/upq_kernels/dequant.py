"""The large-batch path: dequantize the packed weight with a Triton kernel, then ``torch.matmul``.

For long prompts the GEMM is compute-bound and cuBLAS beats an in-register dequantizing kernel;
writing the dense weight once costs little next to it. The dequantization kernel turns codes
into floats with the exponent trick, applies ``(code - zero) * scale`` in fp32 (bit-identical to
:func:`upq_hf.formats.dequantize`) and writes the transposed weight ``W.T`` of shape ``(K, N)``.
It handles any group size, so it is also the fallback of the fused kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import PackedWeight, SEQ_ZERO, codes_to_float, fit_block, launch_options, load_code_tile

NAME = "dequant"

# Candidate configurations of the dequantization kernel (memory-bound: large tiles do).
CONFIGS = [
    dict(BLOCK_K=32, BLOCK_N=128, num_warps=4),
    dict(BLOCK_K=64, BLOCK_N=128, num_warps=4),
    dict(BLOCK_K=64, BLOCK_N=256, num_warps=8),
    dict(BLOCK_K=128, BLOCK_N=128, num_warps=8),
]
DEFAULT_CONFIG = dict(BLOCK_K=64, BLOCK_N=128, num_warps=4)


@triton.jit
def dequantize_kernel(
    packed_ptr, scale_ptr, zero_ptr, out_ptr,
    N, K,
    stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn, stride_ok, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_k < K)[:, None] & (offs_n < N)[None, :]
    codes = codes_to_float(load_code_tile(packed_ptr, offs_k, offs_n, K, N, stride_pk, stride_pn, BITS), tl.float32)
    if GROUP_SIZE == 0:
        groups = tl.zeros_like(offs_k)
    else:
        groups = offs_k // GROUP_SIZE
    param_offsets = groups[:, None] * stride_sg + offs_n[None, :] * stride_sn
    scale = tl.load(scale_ptr + param_offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        zero = tl.load(zero_ptr + groups[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=mask,
                       other=0.0).to(tl.float32)
        weight = (codes - zero) * scale
    else:
        weight = (codes - SEQ_ZERO) * scale
    out_ptrs = out_ptr + offs_k[:, None] * stride_ok + offs_n[None, :] * stride_on
    tl.store(out_ptrs, weight.to(out_ptr.dtype.element_ty), mask=mask)


def fit_config(config: dict, weight: PackedWeight) -> dict:
    """Blocks shrunk to the problem; ``BLOCK_K`` a multiple of the codes per word."""
    return dict(config, BLOCK_K=fit_block(config["BLOCK_K"], weight.in_features, weight.codes_per_word),
                BLOCK_N=fit_block(config["BLOCK_N"], weight.out_features, 16))


def dequantize_transposed(weight: PackedWeight, dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """The dense ``W.T``, shape ``(K, N)`` contiguous, in ``dtype``."""
    config = fit_config(config or DEFAULT_CONFIG, weight)
    K, N = weight.in_features, weight.out_features
    out = torch.empty((K, N), dtype=dtype, device=weight.packed.device)
    if out.numel() == 0:
        return out
    zero, stride_zg, stride_zn = weight.zero_args()
    grid = (triton.cdiv(K, config["BLOCK_K"]), triton.cdiv(N, config["BLOCK_N"]))
    dequantize_kernel[grid](
        weight.packed, weight.scale, zero, out, N, K,
        weight.packed.stride(0), weight.packed.stride(1), weight.scale.stride(0), weight.scale.stride(1),
        stride_zg, stride_zn, out.stride(0), out.stride(1),
        BITS=weight.bits, GROUP_SIZE=weight.group_size_arg, HAS_ZERO=weight.zero is not None,
        BLOCK_K=config["BLOCK_K"], BLOCK_N=config["BLOCK_N"], **launch_options(config),
    )
    return out


def launch(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor,
           config: dict | None = None) -> None:
    """``out = x @ W.T (+ bias)`` through a dense temporary and ``torch.matmul`` in ``x.dtype``."""
    weight_t = dequantize_transposed(weight, x.dtype, config)
    if bias is None:
        torch.matmul(x, weight_t, out=out)
    else:
        torch.addmm(bias.to(x.dtype), x, weight_t, out=out)
