// upq_cpu.c's entry points as the torch-linked libraries call them (upq_op.cpp, upq_decode.cpp; upq_cpu.c includes
// this file too, so a signature that drifts fails to compile), and for C++ against ATen the dtype codes they take.
#ifndef UPQ_CPU_H
#define UPQ_CPU_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// y[M, N] = x[M, K] @ W^T (+ bias), W read from UPQ's packed codes and scales; dtypes as upq_cpu::dtype_code below.
// 0 on success, nonzero for arguments the kernel does not take (upq_cpu.c says which).
int upq_linear(const void *x, int x_dtype, int M, int K, const int32_t *codes, int N, int bits, int group,
               const void *scale, const void *zero, int scale_dtype, const void *bias, int bias_dtype, void *y,
               int y_dtype, int threads);
// the same with the activations rounded to int8 per row (AVX512-VNNI)
int upq_linear_a8(const void *x, int x_dtype, int M, int K, const int32_t *codes, int N, int bits, int group,
                  const void *scale, const void *zero, int scale_dtype, const void *bias, int bias_dtype, void *y,
                  int y_dtype, int threads);

#ifdef __cplusplus
}

#include <ATen/core/Tensor.h>

namespace upq_cpu {

// the kernel's dtype code of a tensor (upq_hf/avx2.py's _DTYPES): 0 float32, 1 bfloat16, 2 float16; ``op`` names
// the caller in the error for any other dtype
inline int dtype_code(const at::Tensor &t, const char *op) {
    switch (t.scalar_type()) {
        case at::kFloat: return 0;
        case at::kBFloat16: return 1;
        case at::kHalf: return 2;
        default: TORCH_CHECK(false, op, ": float32, bfloat16 or float16 tensors, got ", t.scalar_type());
    }
    return -1;
}

}  // namespace upq_cpu
#endif

#endif  // UPQ_CPU_H
