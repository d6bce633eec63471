"""The small-batch kernel: tensor-core (``tl.dot``) split-K GEMM for a few dozen rows.

Few rows leave few output tiles, too few to fill the GPU; splitting K multiplies the programs.
Each program dequantizes its ``[BLOCK_K, BLOCK_N]`` code tiles in registers (exponent trick, in
the activation dtype) and feeds ``tl.dot`` with fp32 accumulation; scales are applied per group
after the dot (common.dot_k_range). With ``SPLIT_K > 1`` each split writes fp32 partials that the
wrapper sums (deterministic: no atomics, no zero-fill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (TORCH_TO_TRITON, PackedWeight, dot_k_range, dot_precision, kernel_flags, kernel_operands,
                     launch_options, reduce_split_k, split_k_blocks, split_k_target, store_tile)

NAME = "splitk"
MIN_BLOCK = 16  # tl.dot needs every block dimension >= 16

# Candidate configurations, tuned per shape on a GPU (kept as data: see tuning.py). Each fits the 163 KiB of
# shared memory of an sm_80 block (checked ahead of time by upq_kernels.aot).
CONFIGS = [
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=256, SPLIT_K=8, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, SPLIT_K=2, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=128, SPLIT_K=8, num_warps=8, num_stages=2),
    dict(BLOCK_M=16, BLOCK_N=256, BLOCK_K=64, SPLIT_K=4, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=64, SPLIT_K=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, SPLIT_K=2, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, SPLIT_K=4, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=8, num_stages=2),
]
# modest tiles: it must compile on every GPU (it runs untuned under CUDA-graph capture or UPQ_AUTOTUNE=0)
DEFAULT_CONFIG = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=4, num_warps=4, num_stages=2)


@triton.jit
def dot_splitk_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    block_start, block_end = split_k_blocks(K, split, BLOCK_K, SPLIT_K)
    acc = dot_k_range(x_ptr, packed_ptr, scale_ptr, zero_ptr, offs_m, offs_n, M, N, K, block_start, block_end,
                      stride_xm, stride_xk, stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn,
                      BITS, GROUP_SIZE, HAS_ZERO, BLOCK_M, BLOCK_N, BLOCK_K, COMPUTE_DTYPE, DOT_PRECISION)
    store_tile(acc, out_ptr + split * stride_os, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, split,
               HAS_BIAS)


def fit_config(config: dict, M: int, weight: PackedWeight) -> dict | None:
    """The block sizes this kernel runs ``config`` with for this shape (see common.fit_config)."""
    return common.fit_config(config, M, weight, MIN_BLOCK)


def launch(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor,
           config: dict, compute_dtype: torch.dtype) -> None:
    """``out = x @ W.T (+ bias)`` for a fitted ``config``, ``tl.dot`` operands in ``compute_dtype``."""
    M, N = out.shape
    target, stride_split = split_k_target(out, config["SPLIT_K"])
    grid = (triton.cdiv(N, config["BLOCK_N"]), triton.cdiv(M, config["BLOCK_M"]), config["SPLIT_K"])
    dot_splitk_kernel[grid](
        *kernel_operands(x, weight, bias, target), stride_split, target.stride(-2), target.stride(-1),
        **kernel_flags(weight, bias), BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], SPLIT_K=config["SPLIT_K"],
        COMPUTE_DTYPE=TORCH_TO_TRITON[compute_dtype], DOT_PRECISION=dot_precision(compute_dtype),
        **launch_options(config),
    )
    reduce_split_k(target, out)
