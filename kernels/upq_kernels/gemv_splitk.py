"""The decode kernel: split-K matrix-vector product for a handful of rows (M <= 4), CUDA-core fp32.

Each program owns ``BLOCK_N`` outputs and a contiguous range of K blocks. Per K block it loads the
``[BLOCK_K / P, BLOCK_N]`` tile of packed words once and walks the ``P`` code fields with a static
loop: field ``j`` of word row ``w`` is input column ``w * P + j``, multiplied with the activations
gathered at that stride. Products and sums are fp32. With ``SPLIT_K > 1`` each split writes fp32
partials that the wrapper sums (deterministic: no atomics, no zero-fill).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import (PackedWeight, codes_to_float, kernel_flags, kernel_operands, launch_options, next_power_of_2,
                     reduce_split_k, scale_group, split_k_blocks, split_k_target, store_tile)

NAME = "gemv"
MAX_BLOCK_M = 4  # rows per program; more rows run as more programs

# Candidate configurations, tuned per shape on a GPU (kept as data: see tuning.py).
CONFIGS = [
    dict(BLOCK_N=32, BLOCK_K=256, SPLIT_K=16, num_warps=2),
    dict(BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, num_warps=2),
    dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=4, num_warps=4),
    dict(BLOCK_N=64, BLOCK_K=512, SPLIT_K=8, num_warps=4),
    dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, num_warps=4),
    dict(BLOCK_N=128, BLOCK_K=128, SPLIT_K=4, num_warps=4),
    dict(BLOCK_N=128, BLOCK_K=256, SPLIT_K=2, num_warps=4),
    dict(BLOCK_N=128, BLOCK_K=256, SPLIT_K=8, num_warps=4),
    dict(BLOCK_N=128, BLOCK_K=512, SPLIT_K=4, num_warps=8),
    dict(BLOCK_N=256, BLOCK_K=128, SPLIT_K=2, num_warps=4),
    dict(BLOCK_N=256, BLOCK_K=256, SPLIT_K=4, num_warps=8),
    dict(BLOCK_N=256, BLOCK_K=256, SPLIT_K=8, num_warps=8),
]
# what runs untuned (under CUDA-graph capture or UPQ_AUTOTUNE=0)
DEFAULT_CONFIG = dict(BLOCK_N=128, BLOCK_K=256, SPLIT_K=4, num_warps=4)


@triton.jit
def gemv_splitk_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr, bias_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_pk, stride_pn, stride_sg, stride_sn, stride_zg, stride_zn,
    stride_os, stride_om, stride_on,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    CODES_PER_WORD: tl.constexpr = 32 // BITS
    BLOCK_WORDS: tl.constexpr = BLOCK_K // CODES_PER_WORD
    CODE_MASK: tl.constexpr = (1 << BITS) - 1

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    num_words = tl.cdiv(K, CODES_PER_WORD)
    block_start, block_end = split_k_blocks(K, split, BLOCK_K, SPLIT_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # one scale per row: sum(x) over the range
    for block in range(block_start, block_end):
        offs_w = block * BLOCK_WORDS + tl.arange(0, BLOCK_WORDS)
        word_ptrs = packed_ptr + offs_w[:, None] * stride_pk + offs_n[None, :] * stride_pn
        words = tl.load(word_ptrs, mask=(offs_w < num_words)[:, None] & n_mask[None, :], other=0)
        x_dot_codes = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for field in tl.static_range(CODES_PER_WORD):
            offs_k = offs_w * CODES_PER_WORD + field
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
            x = tl.load(x_ptrs, mask=m_mask[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
            codes = codes_to_float((words >> (field * BITS)) & CODE_MASK, tl.float32)
            x_dot_codes += tl.sum(x[:, :, None] * codes[None, :, :], axis=1)
            x_sum += tl.sum(x, axis=1)
        if GROUP_SIZE == 0:
            acc += x_dot_codes
            row_x_sum += x_sum
        else:
            acc += scale_group(x_dot_codes, x_sum, scale_ptr, zero_ptr, (block * BLOCK_K) // GROUP_SIZE, offs_n, N,
                               stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZERO)
    if GROUP_SIZE == 0:
        acc = scale_group(acc, row_x_sum, scale_ptr, zero_ptr, 0, offs_n, N,
                          stride_sg, stride_sn, stride_zg, stride_zn, HAS_ZERO)
    store_tile(acc, out_ptr + split * stride_os, bias_ptr, offs_m, offs_n, M, N, stride_om, stride_on, split,
               HAS_BIAS)


def fit_config(config: dict, M: int, weight: PackedWeight) -> dict | None:
    """The block sizes this kernel runs ``config`` with for this shape (see common.fit_config)."""
    return common.fit_config(config, M, weight, min_block=weight.codes_per_word,
                             block_m=min(next_power_of_2(M), MAX_BLOCK_M))


def launch(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, out: torch.Tensor,
           config: dict, compute_dtype: torch.dtype) -> None:
    """``out = x @ W.T (+ bias)`` for a fitted ``config``; the arithmetic is fp32 whatever ``compute_dtype``."""
    M, N = out.shape
    target, stride_split = split_k_target(out, config["SPLIT_K"])
    grid = (triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"], triton.cdiv(M, config["BLOCK_M"]))
    gemv_splitk_kernel[grid](
        *kernel_operands(x, weight, bias, target), stride_split, target.stride(-2), target.stride(-1),
        **kernel_flags(weight, bias), BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"],
        BLOCK_K=config["BLOCK_K"], SPLIT_K=config["SPLIT_K"], **launch_options(config),
    )
    reduce_split_k(target, out)
