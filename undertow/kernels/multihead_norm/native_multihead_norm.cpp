// xLSTM's per-head LayerNorm with its sigmoid output gate on CPU, forward and backward in one pass
// over each token (built by kernels/native.py; driven by chunked.py beside this file). Float32.
// h (rows, H * Dv) contiguous, gate o (rows, H * Dv) with row stride ld_o, weight w (H * Dv), mean
// and rstd (rows, H), dw (H * Dv) per thread, accumulated. Rows [begin, end).
//
//     n = (h - mean) rstd     over each head's Dv channels (biased variance, as F.layer_norm)
//     y = n w s,  s = sigmoid(o)
//
// Backward, with g = dy s w (the gradient of n):
//     dh = rstd (g - mean(g) - n mean(g n)),  do = dy n w s (1 - s),  dw += dy s n
#if defined(__x86_64__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cmath>
#include <cstdint>

#include "native_math.h"

using undertow_native::sigm1;
using undertow_native::total;
using undertow_native::split;

namespace {

int mhnorm_fwd_range(const float* __restrict h, const float* __restrict o, int64_t ld_o, const float* __restrict w,
                     float* __restrict y, float* __restrict mean, float* __restrict rstd, float* __restrict buf,
                     int64_t H, int64_t Dv, float eps, int64_t begin, int64_t end) {
    const int64_t width = H * Dv;
    for (int64_t row = begin; row < end; ++row) {
        const float* hr = h + row * width;
        const float* orow = o + row * ld_o;
        float* yr = y + row * width;
        for (int64_t k = 0; k < H; ++k) {
            const float* x = hr + k * Dv;
            const float mu = total(x, Dv) / float(Dv);
            for (int64_t j = 0; j < Dv; ++j) buf[j] = (x[j] - mu) * (x[j] - mu);
            const float r = 1.0f / std::sqrt(total(buf, Dv) / float(Dv) + eps);
            mean[row * H + k] = mu;
            rstd[row * H + k] = r;
            const float* wk = w + k * Dv;
            const float* ok = orow + k * Dv;
            float* yk = yr + k * Dv;
            for (int64_t j = 0; j < Dv; ++j) yk[j] = (x[j] - mu) * r * wk[j] * sigm1(ok[j]);
        }
    }
    return 0;
}

// buf: 2 Dv floats. dh or d_o nullptr: not wanted.
int mhnorm_bwd_range(const float* __restrict h, const float* __restrict o, int64_t ld_o, const float* __restrict w,
                     const float* __restrict mean, const float* __restrict rstd, const float* __restrict dy,
                     float* __restrict dh, float* __restrict d_o, float* __restrict dw, float* __restrict buf, int64_t H,
                     int64_t Dv, int64_t begin, int64_t end) {
    const int64_t width = H * Dv;
    float* __restrict g = buf;
    float* __restrict gn = buf + Dv;
    for (int64_t row = begin; row < end; ++row) {
        for (int64_t k = 0; k < H; ++k) {
            const int64_t at = row * width + k * Dv;
            const float* x = h + at;
            const float* ok = o + row * ld_o + k * Dv;
            const float* d = dy + at;
            const float* wk = w + k * Dv;
            float* dwk = dw + k * Dv;
            const float mu = mean[row * H + k], r = rstd[row * H + k];
            for (int64_t j = 0; j < Dv; ++j) {
                const float n = (x[j] - mu) * r, s = sigm1(ok[j]), ds = d[j] * s;
                g[j] = ds * wk[j];
                gn[j] = g[j] * n;
                dwk[j] += ds * n;
                if (d_o != nullptr) d_o[at + j] = ds * n * wk[j] * (1.0f - s);
            }
            if (dh == nullptr) continue;
            const float mg = total(g, Dv) / float(Dv), mgn = total(gn, Dv) / float(Dv);
            for (int64_t j = 0; j < Dv; ++j) dh[at + j] = r * (g[j] - mg - (x[j] - mu) * r * mgn);
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// mhnorm_fwd_range over rows [0, rows) in `parts` pieces; buf: parts x Dv floats
int mhnorm_fwd(const float* h, const float* o, int64_t ld_o, const float* w, float* y, float* mean, float* rstd,
               float* buf, int64_t H, int64_t Dv, float eps, int64_t rows, int parts) {
    split(0, rows, parts, [&](int64_t b, int64_t e, int p) {
        mhnorm_fwd_range(h, o, ld_o, w, y, mean, rstd, buf + p * Dv, H, Dv, eps, b, e);
    });
    return 0;
}

// mhnorm_bwd_range over rows [0, rows) in `parts` pieces; dw: parts x H Dv, buf: parts x 2 Dv floats
int mhnorm_bwd(const float* h, const float* o, int64_t ld_o, const float* w, const float* mean, const float* rstd,
               const float* dy, float* dh, float* d_o, float* dw, float* buf, int64_t H, int64_t Dv, int64_t rows,
               int parts) {
    split(0, rows, parts, [&](int64_t b, int64_t e, int p) {
        mhnorm_bwd_range(h, o, ld_o, w, mean, rstd, dy, dh, d_o, dw + p * H * Dv, buf + p * 2 * Dv, H, Dv, b, e);
    });
    return 0;
}
}  // extern "C"
