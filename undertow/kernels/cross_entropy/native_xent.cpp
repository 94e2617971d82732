// The LM head loss's per-chunk work on CPU (built by kernels/native.py; driven by native.py beside
// this file for models/common/fused_loss.py): for each row of a chunk's float32 logits z (rows, V),
// in place,
//
//     y = cap tanh(z / cap)            (no cap: y = z)
//     loss = logsumexp(y) - y[label]   (0 where label == ignore)
//     z <- (softmax(y) - onehot(label)) (1 - (y / cap)^2)   (0 where label == ignore; with `grad`)
//
// Three passes over a row (V floats, in L1/L2) instead of PyTorch's dozen over the whole chunk, one
// tanh and one exp per logit (native_math.h). Rows [begin, end).
#if defined(__x86_64__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_math.h"

using undertow_native::exp_approx;
using undertow_native::split;
using undertow_native::tanh_precise;
using undertow_native::vf;
using undertow_native::vload;
using undertow_native::VLANES;

namespace {

// 0, or 1 + the first row whose label is outside [0, V) and not `ignore` (nothing after it written).
// buf: V floats (the soft-cap's 1 - t^2 of a row, so the gradient pass needs no second tanh).
int64_t xent_rows_range(float* __restrict z, const int64_t* __restrict labels, double* __restrict loss,
                        float* __restrict buf, int64_t V, float cap, int64_t ignore, int grad, int64_t begin, int64_t end) {
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (int64_t row = begin; row < end; ++row) {
        float* __restrict y = z + row * V;
        const int64_t label = labels[row];
        const bool valid = label != ignore;
        if (valid && (label < 0 || label >= V)) return row + 1;
        if (cap > 0.0f) {
            for (int64_t j = 0; j < V; ++j) {
                const float t = tanh_precise(y[j] * inv_cap);
                y[j] = cap * t;
                buf[j] = 1.0f - t * t;
            }
        }
        // the row's max, 16 lanes at a time (a NaN logit makes the sum, hence the loss, NaN below)
        vf lanes = vf{} - INFINITY;
        int64_t j = 0;
        for (; j + VLANES <= V; j += VLANES) {
            const vf x = vload(y + j);
            lanes = x > lanes ? x : lanes;
        }
        float top = -INFINITY;
        for (; j < V; ++j) top = y[j] > top ? y[j] : top;
        for (int k = 0; k < VLANES; ++k) top = lanes[k] > top ? lanes[k] : top;
        const float target = valid ? y[label] : 0.0f;
        // e = exp(y - max) in place of y, and its sum
        float acc[VLANES] = {};
        for (j = 0; j + VLANES <= V; j += VLANES)
            for (int k = 0; k < VLANES; ++k) acc[k] += (y[j + k] = exp_approx(y[j + k] - top));
        float sum = 0.0f;
        for (; j < V; ++j) sum += (y[j] = exp_approx(y[j] - top));
        for (int k = 0; k < VLANES; ++k) sum += acc[k];
        loss[row] = valid ? double(std::log(sum) + top) - double(target) : 0.0;
        if (!grad) continue;
        if (!valid) {
            std::memset(y, 0, sizeof(float) * V);
            continue;
        }
        const float inv = 1.0f / sum;
        y[label] -= sum;  // softmax - onehot: (e - sum) / sum at the label
        if (cap > 0.0f) {
            for (j = 0; j < V; ++j) y[j] = y[j] * inv * buf[j];
        } else {
            for (j = 0; j < V; ++j) y[j] *= inv;
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// xent_rows_range over rows [0, rows) in `parts` pieces (buf: parts x V floats); the first bad row's
// 1 + index, or 0
int64_t xent_rows(float* z, const int64_t* labels, double* loss, float* buf, int64_t V, float cap, int64_t ignore,
                  int grad, int64_t rows, int parts) {
    std::vector<int64_t> bad(parts, 0);
    split(0, rows, parts, [&](int64_t b, int64_t e, int p) {
        bad[p] = xent_rows_range(z, labels, loss, buf + p * V, V, cap, ignore, grad, b, e);
    });
    for (int64_t row : bad)
        if (row) return row;
    return 0;
}
}  // extern "C"
