"""The prefill kernel: tiled tensor-core (``tl.dot``) GEMM for many rows, one program per output tile.

Each program loops over all of K, dequantizing ``[BLOCK_K, BLOCK_N]`` code tiles in registers
(exponent trick, in the activation dtype) for ``tl.dot`` with fp32 accumulation; scales are
applied per group after the dot (common.dot_k_range). Programs are ordered in groups of
``GROUP_M`` row tiles so that neighbouring programs share weight tiles in L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (TORCH_TO_TRITON, PackedWeight, dot_k_range, dot_precision, kernel_flags, kernel_operands,
                     launch_options, store_tile)

NAME = "tiled"
MIN_BLOCK = 16  # tl.dot needs every block dimension >= 16

# Candidate configurations, tuned per shape on a GPU (kept as data: see tuning.py). Each fits the 163 KiB of
# shared memory of an sm_80 block (checked ahead of time by upq_kernels.aot).
CONFIGS = [
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=2),
]
# modest tiles: it must compile on every GPU (it runs untuned under CUDA-graph capture or UPQ_AUTOTUNE=0)
DEFAULT_CONFIG = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3)


@triton.jit
def dot_tiled_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles walk the column tiles together (row tile fastest)
    programs_per_group = GROUP_M * tiles_n
    first_tile_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_tile_m, GROUP_M)
    pid_m = first_tile_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = dot_k_range(x_ptr, packed_ptr, scale_ptr, zero_ptr, offs_m, offs_n, M, N, K, 0, tl.cdiv(K, BLOCK_K),
                      stride_xm, stride_xk, stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn,
                      BITS, GROUP_SIZE, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_DTYPE, DOT_PRECISION)
    store_tile(acc, out_ptr, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, 0, HAS_BIAS)


def fit_config(config: dict, M: int, weight: PackedWeight) -> dict | None:
    """The block sizes this kernel runs ``config`` with for this shape (see common.fit_config)."""
    return common.fit_config(config, M, weight, MIN_BLOCK)


def launch(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor,
           config: dict, compute_dtype: torch.dtype) -> None:
    """``out = x @ W.T (+ bias)`` for a fitted ``config``, ``tl.dot`` operands in ``compute_dtype``."""
    M, N = out.shape
    grid = (triton.cdiv(M, config["BLOCK_M"]) * triton.cdiv(N, config["BLOCK_N"]),)
    dot_tiled_kernel[grid](
        *kernel_operands(x, weight, bias, out), out.stride(0), out.stride(1),
        **kernel_flags(weight, bias), BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], GROUP_M=config["GROUP_M"],
        COMPUTE_DTYPE=TORCH_TO_TRITON[compute_dtype], DOT_PRECISION=dot_precision(compute_dtype),
        **launch_options(config),
    )
