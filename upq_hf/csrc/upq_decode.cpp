// A Llama-style decoder stack run whole in C++: what upq_hf/native.py calls once per decoded token (or once per
// prompt chunk), instead of the Python forward of transformers, whose per-layer calls cost more than the INT2
// kernels themselves on small models (docs/BENCHMARKS.md, "A faster decode loop").
//
// The model's tensors are handed over once (``upq_cpu::decoder_new``) and kept here by reference; the KV cache
// (fp32) lives here too. One step (``upq_cpu::decoder_step``) takes the embeddings of M new tokens at positions
// [pos, pos + M) and returns the final norm's output for them; the Python side applies the output head. All
// arithmetic is fp32; the UPQ layers run upq_cpu.c's kernels (exact, or int8 activations: the "a8" trade), any
// other linear layer (a dense one, or a format the kernel does not read) a dense fp32 product.
//
// Per layer, as transformers' Llama, Mistral, Qwen2 and Qwen3 compute it:
//   h = rmsnorm(x) * w_in;  q, k, v = h Wq (+b), h Wk (+b), h Wv (+b);  [Qwen3: per-head rmsnorm of q and k]
//   rope(q, k) with the model's own cos/sin tables (rotate-half);  k, v -> cache;
//   a = softmax(q k^T * scaling over keys j <= p [and p - j < window]) v  (grouped-query heads);
//   x += a Wo (+b);  h = rmsnorm(x) * w_post;  x += (silu(h Wgate) * h Wup) Wdown.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/matmul.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "upq_cpu.h"

namespace {

int dtype_code(const at::Tensor &t) { return upq_cpu::dtype_code(t, "upq_cpu::decoder"); }

// One linear layer: packed UPQ codes (the kernel's layout), or a dense fp32 weight (N, K).
struct Linear {
    at::Tensor codes, scale, zero, bias, dense;
    int bits = 0, group = 0, K = 0, N = 0;

    void run(const float *x, int M, float *y, bool a8, int threads) const {
        if (codes.defined()) {
            auto call = [&](bool int8) {
                return (int8 ? upq_linear_a8 : upq_linear)(
                    x, 0, M, K, static_cast<const int32_t *>(codes.data_ptr()), N, bits, group, scale.data_ptr(),
                    zero.defined() ? zero.data_ptr() : nullptr, dtype_code(scale),
                    bias.defined() ? bias.data_ptr() : nullptr, bias.defined() ? dtype_code(bias) : 0, y, 0, threads);
            };
            int status = call(a8);
            if (a8 && (status == 3 || status == 4)) status = call(false);  // no VNNI, or an inf/NaN in x
            TORCH_CHECK(status == 0, "upq_cpu::decoder: the kernel failed on a (", K, ", ", N, ") layer with status ",
                        status);
            return;
        }
        at::Tensor X = at::from_blob(const_cast<float *>(x), {M, K}, at::kFloat);
        at::Tensor Y = at::from_blob(y, {M, N}, at::kFloat);
        at::matmul_out(Y, X, dense.t());
        if (bias.defined()) {
            const float *b = bias.data_ptr<float>();
            for (int m = 0; m < M; ++m)
                for (int n = 0; n < N; ++n) y[(size_t)m * N + n] += b[n];
        }
    }
};

struct Layer {
    at::Tensor in_norm, post_norm, q_norm, k_norm;  // fp32; q_norm / k_norm (head_dim) only for Qwen3
    Linear q, k, v, o, gate, up, down;
    int window = 0;  // sliding window (keys with p - j < window), 0 for none
};

struct Decoder {
    std::vector<Layer> layers;
    at::Tensor final_norm, cos, sin;  // cos / sin: (max_len, head_dim) fp32
    int hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0, max_len = 0;
    float eps = 1e-5f, scaling = 1.0f;
    std::vector<float> kcache, vcache;  // [layer][kv head][max_len][head_dim]
    std::mutex lock;
};

std::mutex registry_lock;
std::vector<std::shared_ptr<Decoder>> registry;

std::shared_ptr<Decoder> find(int64_t handle) {
    std::lock_guard<std::mutex> guard(registry_lock);
    TORCH_CHECK(handle >= 0 && handle < (int64_t)registry.size() && registry[handle],
                "upq_cpu::decoder: no decoder ", handle, " (freed, or never made)");
    return registry[handle];
}

void rmsnorm(const float *x, const float *w, float *y, int n, float eps) {
    double total = 0;  // fp32 products summed in double: the mean square of up to a few thousand values
    for (int i = 0; i < n; ++i) total += (double)x[i] * x[i];
    const float inv = 1.0f / std::sqrt((float)(total / n) + eps);
    for (int i = 0; i < n; ++i) y[i] = w[i] * (x[i] * inv);
}

void rope(float *v, const float *cos, const float *sin, int head_dim) {
    const int half = head_dim / 2;
    for (int d = 0; d < half; ++d) {
        const float a = v[d], b = v[d + half];
        v[d] = a * cos[d] - b * sin[d];
        v[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

Linear take_linear(const std::vector<std::optional<at::Tensor>> &t, size_t at, const std::vector<int64_t> &ints,
                   size_t iat) {
    // tensors: codes, scale, zero, bias, dense; ints: bits, group, K, N
    Linear l;
    auto get = [&](size_t i) { return t[at + i] ? t[at + i]->contiguous() : at::Tensor(); };
    l.codes = get(0); l.scale = get(1); l.zero = get(2); l.bias = get(3); l.dense = get(4);
    l.bits = (int)ints[iat]; l.group = (int)ints[iat + 1]; l.K = (int)ints[iat + 2]; l.N = (int)ints[iat + 3];
    TORCH_CHECK(l.codes.defined() != l.dense.defined(), "upq_cpu::decoder: a layer is packed codes or a dense weight");
    if (l.codes.defined()) {
        TORCH_CHECK(l.codes.scalar_type() == at::kInt && l.codes.size(1) == l.N, "upq_cpu::decoder: bad packed layer");
    } else {
        TORCH_CHECK(l.dense.scalar_type() == at::kFloat && l.dense.size(0) == l.N && l.dense.size(1) == l.K,
                    "upq_cpu::decoder: a dense layer is an fp32 (N, K) weight");
    }
    if (l.bias.defined() && !l.codes.defined()) l.bias = l.bias.to(at::kFloat);
    return l;
}

constexpr size_t PER_LAYER = 4 + 7 * 5;   // norms (in, post, q, k), then 7 linears of 5 tensors
constexpr size_t INTS_PER_LAYER = 1 + 7 * 4;  // window, then 7 linears of 4 ints

int64_t decoder_new(const std::vector<std::optional<at::Tensor>> &tensors, const std::vector<int64_t> &ints,
                    double eps, double scaling) {
    // tensors: final_norm, cos, sin, then per layer PER_LAYER; ints: hidden, heads, kv_heads, head_dim, inter,
    // max_len, layers, then per layer INTS_PER_LAYER
    TORCH_CHECK(ints.size() >= 7, "upq_cpu::decoder_new: bad arguments");
    auto d = std::make_shared<Decoder>();
    d->hidden = (int)ints[0]; d->heads = (int)ints[1]; d->kv_heads = (int)ints[2]; d->head_dim = (int)ints[3];
    d->inter = (int)ints[4]; d->max_len = (int)ints[5];
    const int n_layers = (int)ints[6];
    TORCH_CHECK(tensors.size() == 3 + PER_LAYER * n_layers && ints.size() == 7 + INTS_PER_LAYER * n_layers,
                "upq_cpu::decoder_new: bad arguments");
    TORCH_CHECK(d->heads % d->kv_heads == 0 && d->head_dim % 2 == 0, "upq_cpu::decoder_new: bad head counts");
    d->eps = (float)eps; d->scaling = (float)scaling;
    auto f32 = [](const std::optional<at::Tensor> &t) { return t ? t->to(at::kFloat).contiguous() : at::Tensor(); };
    d->final_norm = f32(tensors[0]); d->cos = f32(tensors[1]); d->sin = f32(tensors[2]);
    TORCH_CHECK(d->cos.size(0) >= d->max_len && d->cos.size(1) == d->head_dim, "upq_cpu::decoder_new: rope tables");
    for (int l = 0; l < n_layers; ++l) {
        const size_t at = 3 + PER_LAYER * l, iat = 7 + INTS_PER_LAYER * l;
        Layer layer;
        layer.in_norm = f32(tensors[at]); layer.post_norm = f32(tensors[at + 1]);
        layer.q_norm = f32(tensors[at + 2]); layer.k_norm = f32(tensors[at + 3]);
        layer.window = (int)ints[iat];
        Linear *lins[7] = {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down};
        for (int i = 0; i < 7; ++i) *lins[i] = take_linear(tensors, at + 4 + 5 * i, ints, iat + 1 + 4 * i);
        d->layers.push_back(std::move(layer));
    }
    const size_t cache = (size_t)n_layers * d->kv_heads * d->max_len * d->head_dim;
    d->kcache.assign(cache, 0.0f);
    d->vcache.assign(cache, 0.0f);
    std::lock_guard<std::mutex> guard(registry_lock);
    registry.push_back(d);
    return (int64_t)registry.size() - 1;
}

void decoder_free(int64_t handle) {
    std::lock_guard<std::mutex> guard(registry_lock);
    if (handle >= 0 && handle < (int64_t)registry.size()) registry[handle].reset();
}

// x: (M, hidden) fp32 embeddings of the tokens at positions [pos, pos + M); returns the final norm's output for
// the last `last` rows (M when last <= 0).
at::Tensor decoder_step(int64_t handle, const at::Tensor &x_in, int64_t pos, bool int8_activations, int64_t last) {
    auto d = find(handle);
    std::lock_guard<std::mutex> guard(d->lock);
    TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == d->hidden, "upq_cpu::decoder_step: x is (tokens, ", d->hidden, ")");
    const int M = (int)x_in.size(0), H = d->hidden, hd = d->head_dim, nh = d->heads, nkv = d->kv_heads;
    TORCH_CHECK(M > 0 && pos >= 0 && pos + M <= d->max_len, "upq_cpu::decoder_step: positions ", pos, "..",
                pos + M, " outside the cache of ", d->max_len);
    const int threads = at::get_num_threads();
    at::Tensor xt = x_in.to(at::kFloat).contiguous().clone();
    float *x = xt.data_ptr<float>();
    const int qn = nh * hd, kn = nkv * hd;
    std::vector<float> h((size_t)M * H), q((size_t)M * qn), k((size_t)M * kn), v((size_t)M * kn), att((size_t)M * qn),
        o((size_t)M * H), g((size_t)M * d->inter), u((size_t)M * d->inter);
    const float *cos = d->cos.data_ptr<float>(), *sin = d->sin.data_ptr<float>();
    const int group = nh / nkv;
    const size_t per_layer_cache = (size_t)nkv * d->max_len * hd;
    for (size_t l = 0; l < d->layers.size(); ++l) {
        const Layer &L = d->layers[l];
        for (int m = 0; m < M; ++m)
            rmsnorm(x + (size_t)m * H, L.in_norm.data_ptr<float>(), h.data() + (size_t)m * H, H, d->eps);
        L.q.run(h.data(), M, q.data(), int8_activations, threads);
        L.k.run(h.data(), M, k.data(), int8_activations, threads);
        L.v.run(h.data(), M, v.data(), int8_activations, threads);
        float *kc = d->kcache.data() + l * per_layer_cache, *vc = d->vcache.data() + l * per_layer_cache;
        for (int m = 0; m < M; ++m) {
            const int p = (int)pos + m;
            for (int head = 0; head < nh; ++head) {
                float *qh = q.data() + (size_t)m * qn + (size_t)head * hd;
                if (L.q_norm.defined()) rmsnorm(qh, L.q_norm.data_ptr<float>(), qh, hd, d->eps);
                rope(qh, cos + (size_t)p * hd, sin + (size_t)p * hd, hd);
            }
            for (int head = 0; head < nkv; ++head) {
                float *kh = k.data() + (size_t)m * kn + (size_t)head * hd;
                if (L.k_norm.defined()) rmsnorm(kh, L.k_norm.data_ptr<float>(), kh, hd, d->eps);
                rope(kh, cos + (size_t)p * hd, sin + (size_t)p * hd, hd);
                std::copy(kh, kh + hd, kc + ((size_t)head * d->max_len + p) * hd);
                const float *vh = v.data() + (size_t)m * kn + (size_t)head * hd;
                std::copy(vh, vh + hd, vc + ((size_t)head * d->max_len + p) * hd);
            }
        }
        // attention, one (row, head) at a time; rows of a prompt chunk see the keys up to their own position
        const int pairs = M * nh;
        const int end = (int)pos + M;
        at::parallel_for(0, pairs, (size_t)M * end * hd * nh > 262144 ? 1 : pairs, [&](int64_t b, int64_t e) {
            std::vector<float> w(end);
            for (int64_t pair = b; pair < e; ++pair) {
                const int m = (int)(pair / nh), head = (int)(pair % nh), p = (int)pos + m;
                const int first = L.window > 0 && p - L.window + 1 > 0 ? p - L.window + 1 : 0;
                const float *qh = q.data() + (size_t)m * qn + (size_t)head * hd;
                const float *kh = kc + (size_t)(head / group) * d->max_len * hd;
                const float *vh = vc + (size_t)(head / group) * d->max_len * hd;
                float top = -INFINITY;
                for (int j = first; j <= p; ++j) {
                    float s = 0;
                    const float *kj = kh + (size_t)j * hd;
                    for (int i = 0; i < hd; ++i) s += qh[i] * kj[i];
                    w[j] = s * d->scaling;
                    top = w[j] > top ? w[j] : top;
                }
                float total = 0;
                for (int j = first; j <= p; ++j) { w[j] = std::exp(w[j] - top); total += w[j]; }
                float *out = att.data() + (size_t)m * qn + (size_t)head * hd;
                for (int i = 0; i < hd; ++i) out[i] = 0;
                const float inv = 1.0f / total;
                for (int j = first; j <= p; ++j) {
                    const float wj = w[j] * inv;
                    const float *vj = vh + (size_t)j * hd;
                    for (int i = 0; i < hd; ++i) out[i] += wj * vj[i];
                }
            }
        });
        L.o.run(att.data(), M, o.data(), int8_activations, threads);
        for (size_t i = 0; i < (size_t)M * H; ++i) x[i] += o[i];
        for (int m = 0; m < M; ++m)
            rmsnorm(x + (size_t)m * H, L.post_norm.data_ptr<float>(), h.data() + (size_t)m * H, H, d->eps);
        L.gate.run(h.data(), M, g.data(), int8_activations, threads);
        L.up.run(h.data(), M, u.data(), int8_activations, threads);
        for (size_t i = 0; i < (size_t)M * d->inter; ++i) g[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
        L.down.run(g.data(), M, o.data(), int8_activations, threads);
        for (size_t i = 0; i < (size_t)M * H; ++i) x[i] += o[i];
    }
    const int rows = last > 0 && last < M ? (int)last : M;
    at::Tensor y = at::empty({rows, H}, at::kFloat);
    for (int r = 0; r < rows; ++r)
        rmsnorm(x + (size_t)(M - rows + r) * H, d->final_norm.data_ptr<float>(), y.data_ptr<float>() + (size_t)r * H,
                H, d->eps);
    return y;
}

}  // namespace

// schemas with their kernels (catch-all: decoder_new and decoder_free take no tensor to dispatch on)
TORCH_LIBRARY_FRAGMENT(upq_cpu, m) {
    m.def("decoder_new(Tensor?[] tensors, int[] ints, float eps, float scaling) -> int", &decoder_new);
    m.def("decoder_step(int handle, Tensor x, int pos, bool int8_activations, int last) -> Tensor", &decoder_step);
    m.def("decoder_free(int handle) -> ()", &decoder_free);
}
