// The CPU kernel of upq_cpu.c as a torch operator, ``torch.ops.upq_cpu.linear``: what a compiled decode step calls
// for each UPQ layer, through torch's dispatcher, with no Python in between (the ctypes call of upq_hf/avx2.py
// serves eager calls, where it is the cheaper of the two). Built beside the C kernel, once per machine and torch
// (upq_hf/avx2.py, _build_op); its shape function is registered from Python (avx2._register_fake).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>
#include <optional>

#include "upq_cpu.h"

namespace {

int dtype_code(const at::Tensor &t) { return upq_cpu::dtype_code(t, "upq_cpu::linear"); }

at::Tensor linear(const at::Tensor &x_in, const at::Tensor &weight_in, const at::Tensor &scale_in,
                  const std::optional<at::Tensor> &zero_in, const std::optional<at::Tensor> &bias,
                  int64_t bits, int64_t group_size, int64_t in_features, bool int8_activations) {
    TORCH_CHECK(x_in.device().is_cpu() && weight_in.device().is_cpu(), "upq_cpu::linear runs on CPU tensors");
    TORCH_CHECK(x_in.size(-1) == in_features, "upq_cpu::linear: x has ", x_in.size(-1), " features, the layer ",
                in_features);
    TORCH_CHECK(weight_in.scalar_type() == at::kInt && weight_in.dim() == 2, "upq_cpu::linear: packed int32 codes");
    const at::Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), scale = scale_in.contiguous();
    std::optional<at::Tensor> zero;
    if (zero_in) zero = zero_in->contiguous();
    std::optional<at::Tensor> b;
    if (bias) b = bias->contiguous();
    const int64_t n = weight.size(1);
    std::vector<int64_t> sizes = x.sizes().vec();
    sizes.back() = n;
    at::Tensor y = at::empty(sizes, x.options());
    const int rows = static_cast<int>(x.numel() / in_features);
    const int threads = at::get_num_threads();
    auto call = [&](bool a8) {
        return (a8 ? upq_linear_a8 : upq_linear)(
            x.data_ptr(), dtype_code(x), rows, static_cast<int>(in_features),
            static_cast<const int32_t *>(weight.data_ptr()), static_cast<int>(n), static_cast<int>(bits),
            static_cast<int>(group_size), scale.data_ptr(), zero ? zero->data_ptr() : nullptr, dtype_code(scale),
            b ? b->data_ptr() : nullptr, b ? dtype_code(*b) : 0, y.data_ptr(), dtype_code(y), threads);
    };
    int status = call(int8_activations);
    if (int8_activations && (status == 3 || status == 4)) status = call(false);  // no VNNI, or an inf/NaN in x
    TORCH_CHECK(status == 0, "the avx2 kernel failed on UPQLinear(", in_features, ", ", n, ") with status ", status,
                status == 2 ? " (out of memory)" : "");
    return y;
}

}  // namespace

TORCH_LIBRARY(upq_cpu, m) {
    m.def("linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero, Tensor? bias, int bits, int group_size, "
          "int in_features, bool int8_activations) -> Tensor");
}

TORCH_LIBRARY_IMPL(upq_cpu, CPU, m) { m.impl("linear", &linear); }
