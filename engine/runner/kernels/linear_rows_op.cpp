// The engine's CPU matrix products (linear_rows.c, linear_blocked.c) as torch operators, so
// that Python and compiled graphs reach them through the dispatcher in about 3 us instead of
// through ctypes (engine/runner/cpu_kernel.py builds and loads this file; it is optional there).
//
//   coconut_kernels::linear_rows(x, weight, bias?, add?) -> x @ W^T (+ bias) (+ add)
//     weight: W itself [out, in], or W in blocks of 16 outputs [out / 16, in, 16]
//   coconut_kernels::set_table(weights, biases) -> handle     a table of layers, by index
//   coconut_kernels::activate(handle)                          this thread's table (0: none)
//   coconut_kernels::drop_table(handle)
//   coconut_kernels::table_linear(x, index), table_linear_add(x, residual, index)
//   coconut_kernels::decode_attention(query, keys, values, mask, scaling) -> [n, H, G, D]
//     one decode step's attention (decode_attention.c) on the cache's keys and values in place
//
// A table lets a compiled graph name a layer by an integer, so that the graph holds no
// weight and every engine of a model shares it. Float32 on CPU only; nothing here knows
// about models or autograd.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>
#include <vector>

extern "C" void coconut_linear_rows(const float *W, const float *X, float *Y, const float *bias, const float *add,
                                    long rows, long m, long n, int threads);
extern "C" int coconut_decode_attention(const float *Q, const float *K, const float *V, const float *mask, float *O,
                                        long n, long H, long G, long D, long L, long row_stride, long head_stride,
                                        float scaling, int threads);
extern "C" void coconut_linear_blocked(const float *P, const float *X, float *Y, const float *bias, const float *add,
                                       long rows, long m, long n, int threads);

namespace {

at::Tensor product(const at::Tensor &x, const at::Tensor &weight, const float *bias, const at::Tensor *add) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                "coconut_kernels: float32 expected, got ", x.scalar_type(), " by ", weight.scalar_type());
    const bool blocked = weight.dim() == 3;
    TORCH_CHECK((weight.dim() == 2 || (blocked && weight.size(2) == 16)) && weight.is_contiguous(),
                "coconut_kernels: weight must be a contiguous [out, in] or [out / 16, in, 16] tensor");
    const int64_t n = weight.size(1), m = blocked ? weight.size(0) * 16 : weight.size(0);
    TORCH_CHECK(x.dim() >= 1 && x.size(-1) == n, "coconut_kernels: expected [..., ", n, "] input, got ", x.sizes());
    at::Tensor rows_in = x.reshape({-1, n}).contiguous();
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = m;
    at::Tensor out = at::empty(shape, x.options());
    const float *add_ptr = nullptr;
    at::Tensor add_contiguous;
    if (add != nullptr) {
        TORCH_CHECK(add->sizes() == out.sizes() && add->scalar_type() == at::kFloat,
                    "coconut_kernels: add must be float32 ", out.sizes(), ", got ", add->sizes());
        add_contiguous = add->contiguous();
        add_ptr = add_contiguous.data_ptr<float>();
    }
    (blocked ? coconut_linear_blocked : coconut_linear_rows)(weight.data_ptr<float>(), rows_in.data_ptr<float>(),
                                                            out.data_ptr<float>(), bias, add_ptr, rows_in.size(0), m, n,
                                                            at::get_num_threads());
    return out;
}

const float *bias_pointer(const std::optional<at::Tensor> &bias, int64_t m) {
    if (!bias.has_value() || !bias->defined() || bias->numel() == 0) return nullptr;
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == m,
                "coconut_kernels: bias must be a contiguous float32 [", m, "]");
    return bias->data_ptr<float>();
}

int64_t out_features(const at::Tensor &weight) {
    return weight.dim() == 3 ? weight.size(0) * weight.size(2) : weight.size(0);
}

at::Tensor linear_rows(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias,
                       const std::optional<at::Tensor> &add) {
    return product(x, weight, bias_pointer(bias, out_features(weight)), add.has_value() ? &*add : nullptr);
}

struct Layer {
    at::Tensor weight, bias;    // bias: empty where the layer has none
};

std::mutex tables_lock;
std::unordered_map<int64_t, std::shared_ptr<std::vector<Layer>>> tables;
int64_t next_handle = 1;
thread_local std::shared_ptr<std::vector<Layer>> active;

int64_t set_table(std::vector<at::Tensor> weights, std::vector<at::Tensor> biases) {
    TORCH_CHECK(weights.size() == biases.size(), "coconut_kernels: one bias (or an empty tensor) per weight");
    auto table = std::make_shared<std::vector<Layer>>();
    for (size_t i = 0; i < weights.size(); i++) {
        if (weights[i].numel() > 0) {
            const at::Tensor &w = weights[i];
            TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() &&
                            (w.dim() == 2 || (w.dim() == 3 && w.size(2) == 16)),
                        "coconut_kernels: weight ", i, " must be a contiguous float32 [out, in] or [out / 16, in, 16] tensor");
            bias_pointer(biases[i], out_features(w));
        }
        table->push_back({weights[i], biases[i]});
    }
    std::lock_guard<std::mutex> guard(tables_lock);
    tables[next_handle] = table;
    return next_handle++;
}

void drop_table(int64_t handle) {
    std::lock_guard<std::mutex> guard(tables_lock);
    tables.erase(handle);
}

void activate(int64_t handle) {
    if (handle == 0) {
        active.reset();
        return;
    }
    std::lock_guard<std::mutex> guard(tables_lock);
    auto found = tables.find(handle);
    TORCH_CHECK(found != tables.end(), "coconut_kernels: no table ", handle);
    active = found->second;
}

const Layer &layer(int64_t index) {
    TORCH_CHECK(active && index >= 0 && index < (int64_t)active->size() && (*active)[index].weight.numel() > 0,
                "coconut_kernels: no layer ", index, " in this thread's table");
    return (*active)[index];
}

at::Tensor table_linear(const at::Tensor &x, int64_t index) {
    const Layer &l = layer(index);
    return product(x, l.weight, l.bias.numel() ? l.bias.data_ptr<float>() : nullptr, nullptr);
}

at::Tensor table_linear_add(const at::Tensor &x, const at::Tensor &residual, int64_t index) {
    const Layer &l = layer(index);
    return product(x, l.weight, l.bias.numel() ? l.bias.data_ptr<float>() : nullptr, &residual);
}

at::Tensor decode_attention(const at::Tensor &query, const at::Tensor &keys, const at::Tensor &values,
                            const at::Tensor &mask, double scaling) {
    // query [n, H, G, D]; keys, values [n, H, L, D] (views of the cache: rows and heads strided,
    // each head's positions contiguous); mask [n, 1, 1, L] additive
    TORCH_CHECK(query.dim() == 4 && keys.dim() == 4 && values.dim() == 4 && mask.dim() == 4,
                "coconut_kernels::decode_attention: query, keys, values and mask must be 4-D");
    TORCH_CHECK(query.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat &&
                    values.scalar_type() == at::kFloat && mask.scalar_type() == at::kFloat,
                "coconut_kernels::decode_attention: float32 expected");
    const int64_t n = query.size(0), H = query.size(1), G = query.size(2), D = query.size(3), L = keys.size(2);
    TORCH_CHECK(keys.sizes() == values.sizes() && keys.size(0) == n && keys.size(1) == H && keys.size(3) == D,
                "coconut_kernels::decode_attention: keys and values must be [", n, ", ", H, ", L, ", D, "], got ",
                keys.sizes(), " and ", values.sizes());
    TORCH_CHECK(keys.strides() == values.strides() && keys.stride(3) == 1 && keys.stride(2) == D,
                "coconut_kernels::decode_attention: keys and values need one layout, each head's positions contiguous");
    TORCH_CHECK(mask.numel() == n * L, "coconut_kernels::decode_attention: mask must be [", n, ", 1, 1, ", L, "]");
    at::Tensor q = query.contiguous(), m = mask.reshape({n, L}).contiguous();
    at::Tensor out = at::empty({n, H, G, D}, query.options());
    int status = coconut_decode_attention(q.data_ptr<float>(), keys.data_ptr<float>(), values.data_ptr<float>(),
                                          m.data_ptr<float>(), out.data_ptr<float>(), n, H, G, D, L, keys.stride(0),
                                          keys.stride(1), (float)scaling, at::get_num_threads());
    TORCH_CHECK(status == 0, "decode_attention: out of memory for the scores of ", G, " x ", L, " keys");
    return out;
}

}  // namespace

TORCH_LIBRARY(coconut_kernels, m) {
    m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor mask, float scaling) -> Tensor");
    m.def("linear_rows(Tensor x, Tensor weight, Tensor? bias=None, Tensor? add=None) -> Tensor");
    m.def("set_table(Tensor[] weights, Tensor[] biases) -> int", set_table);
    m.def("drop_table(int handle) -> ()", drop_table);
    m.def("activate(int handle) -> ()", activate);
    m.def("table_linear(Tensor x, int index) -> Tensor");
    m.def("table_linear_add(Tensor x, Tensor residual, int index) -> Tensor");
}

TORCH_LIBRARY_IMPL(coconut_kernels, CPU, m) {
    m.impl("linear_rows", linear_rows);
    m.impl("table_linear", table_linear);
    m.impl("table_linear_add", table_linear_add);
    m.impl("decode_attention", decode_attention);
}
