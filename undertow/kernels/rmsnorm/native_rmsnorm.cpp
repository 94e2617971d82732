// RMSNorm on CPU, forward and backward in one pass over each row (built by kernels/native.py; driven
// by chunked.py beside this file, whose docstring has the math). Float32, contiguous: x, z (optional,
// the silu gate; nullptr without) and out/dout/dx/dz (rows, dim), weight (dim), rstd (rows, dim /
// group), dw (dim) per thread, accumulated. Rows [begin, end); the caller splits them over threads.
//
// PyTorch's form walks each (rows, dim) tensor once per op (about ten ops forward and backward,
// each a fresh float32 temporary); here every row is read and written once each way, in cache.
#if defined(__x86_64__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cmath>
#include <cstdint>

#include "native_math.h"

using undertow_native::dot;
using undertow_native::sigm1;
using undertow_native::split;

namespace {

// g = x silu(z) (or x); per group r = 1 / sqrt(mean(g^2) + eps); out = g r w. `buf` (dim floats)
// holds g when gated.
int rmsnorm_fwd_range(const float* __restrict x, const float* __restrict z, const float* __restrict w,
                      float* __restrict out, float* __restrict rstd, float* __restrict buf, int64_t dim, int64_t group,
                      float eps, int64_t begin, int64_t end) {
    const int64_t groups = dim / group;
    for (int64_t row = begin; row < end; ++row) {
        const float* g = x + row * dim;
        if (z != nullptr) {
            const float* zr = z + row * dim;
            for (int64_t j = 0; j < dim; ++j) buf[j] = g[j] * zr[j] * sigm1(zr[j]);
            g = buf;
        }
        float* o = out + row * dim;
        for (int64_t k = 0; k < groups; ++k) {
            const float* gk = g + k * group;
            const float r = 1.0f / std::sqrt(dot(gk, gk, group) / float(group) + eps);
            rstd[row * groups + k] = r;
            const float* wk = w + k * group;
            float* ok = o + k * group;
            for (int64_t j = 0; j < group; ++j) ok[j] = gk[j] * r * wk[j];
        }
    }
    return 0;
}

// dg = r (dout w - g^ mean(dout w g^)) with g^ = g r; dw += dout g^; dx = dg silu(z) (or dg),
// dz = dg x s (1 + z (1 - s)), s = sigmoid(z). dx or dz nullptr: not wanted. `buf`: 2 dim floats.
int rmsnorm_bwd_range(const float* __restrict x, const float* __restrict z, const float* __restrict w,
                      const float* __restrict dout, const float* __restrict rstd, float* __restrict dx,
                      float* __restrict dz, float* __restrict dw, float* __restrict buf, int64_t dim, int64_t group,
                      int64_t begin, int64_t end) {
    const int64_t groups = dim / group;
    float* __restrict gh = buf;         // g^
    float* __restrict dwp = buf + dim;  // dout w
    for (int64_t row = begin; row < end; ++row) {
        const float* xr = x + row * dim;
        const float* zr = z != nullptr ? z + row * dim : nullptr;
        const float* d = dout + row * dim;
        for (int64_t k = 0; k < groups; ++k) {
            const float r = rstd[row * groups + k];
            const int64_t o = k * group;
            if (zr != nullptr) {
                for (int64_t j = o; j < o + group; ++j) gh[j] = xr[j] * zr[j] * sigm1(zr[j]) * r;
            } else {
                for (int64_t j = o; j < o + group; ++j) gh[j] = xr[j] * r;
            }
            for (int64_t j = o; j < o + group; ++j) {
                dw[j] += d[j] * gh[j];
                dwp[j] = d[j] * w[j];
            }
            const float mean = dot(dwp + o, gh + o, group) / float(group);
            for (int64_t j = o; j < o + group; ++j) dwp[j] = r * (dwp[j] - gh[j] * mean);  // dg
        }
        if (zr == nullptr) {
            if (dx != nullptr)
                for (int64_t j = 0; j < dim; ++j) dx[row * dim + j] = dwp[j];
            continue;
        }
        for (int64_t j = 0; j < dim; ++j) {
            const float s = sigm1(zr[j]), dg = dwp[j];
            if (dx != nullptr) dx[row * dim + j] = dg * zr[j] * s;
            if (dz != nullptr) dz[row * dim + j] = dg * xr[j] * s * (1.0f + zr[j] * (1.0f - s));
        }
    }
    return 0;
}

}  // namespace

extern "C" {

// rmsnorm_fwd_range over rows [0, rows) in `parts` pieces; buf: parts x dim floats
int rmsnorm_fwd(const float* x, const float* z, const float* w, float* out, float* rstd, float* buf, int64_t dim,
                int64_t group, float eps, int64_t rows, int parts) {
    split(0, rows, parts, [&](int64_t b, int64_t e, int p) {
        rmsnorm_fwd_range(x, z, w, out, rstd, buf + p * dim, dim, group, eps, b, e);
    });
    return 0;
}

// rmsnorm_bwd_range over rows [0, rows) in `parts` pieces; dw: parts x dim (each piece's sum), buf:
// parts x 2 dim floats
int rmsnorm_bwd(const float* x, const float* z, const float* w, const float* dout, const float* rstd, float* dx,
                float* dz, float* dw, float* buf, int64_t dim, int64_t group, int64_t rows, int parts) {
    split(0, rows, parts, [&](int64_t b, int64_t e, int p) {
        rmsnorm_bwd_range(x, z, w, dout, rstd, dx, dz, dw + p * dim, buf + p * 2 * dim, dim, group, b, e);
    });
    return 0;
}
}  // extern "C"
