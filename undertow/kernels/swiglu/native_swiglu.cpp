// SwiGLU's activation on CPU, forward and backward in one pass each (built by kernels/native.py;
// driven by chunked.py beside this file). Float32, contiguous, n elements in `parts` pieces (over
// torch's threads where the library has OpenMP):
//
//     out = silu(g) u = g s u,  s = sigmoid(g)
//     du  = dy g s
//     dg  = dy u s (1 + g (1 - s))
//
// PyTorch runs this as silu, mul (forward) and mul, mul, silu_backward (backward): five passes over
// (tokens, hidden) tensors, each a fresh allocation; here one pass each way, sigmoid from
// native_math.h's vectorized exp.
#if defined(__x86_64__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cstdint>

#include "native_math.h"

using undertow_native::sigm1;
using undertow_native::split;

extern "C" {

int swiglu_fwd(const float* __restrict g, const float* __restrict u, float* __restrict out, int64_t n, int parts) {
    split(0, n, parts, [=](int64_t begin, int64_t end, int) {
        for (int64_t i = begin; i < end; ++i) {
            const float x = g[i];
            out[i] = x * sigm1(x) * u[i];
        }
    });
    return 0;
}

int swiglu_bwd(const float* __restrict g, const float* __restrict u, const float* __restrict dy,
               float* __restrict dg, float* __restrict du, int64_t n, int parts) {
    split(0, n, parts, [=](int64_t begin, int64_t end, int) {
        for (int64_t i = begin; i < end; ++i) {
            const float x = g[i], s = sigm1(x), d = dy[i];
            const float a = x * s;
            du[i] = d * a;
            dg[i] = d * u[i] * (s + a * (1.0f - s));
        }
    });
    return 0;
}

}  // extern "C"
