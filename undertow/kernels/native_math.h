// Scalar float math for the native loops (kernels/native.py builds every .cpp that includes this
// with the kernels folder on the include path, and hashes this file into the library's name):
// inline, branch-free forms of e^x, 1/x, sigmoid and tanh that GCC and Clang vectorize inside plain
// loops (libm's expf is a call; -ffast-math would change the whole process's denormal handling).
#pragma once
#include <cstdint>
#include <cstring>

namespace undertow_native {

// e^x: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for the subtraction's exactness), e^r by
// its Taylor series to r^6 (relative error ~1e-7), 2^n from the exponent bits. x clamped to
// [-87, 87] (1 + e^87 stays inside `recip1`'s range); a NaN stays NaN.
inline float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
    float q = 1.0f / 720.0f;
    q = q * r + 1.0f / 120.0f;
    q = q * r + 1.0f / 24.0f;
    q = q * r + 1.0f / 6.0f;
    q = q * r + 0.5f;
    q = q * r + 1.0f;
    q = q * r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return q * scale;
}

// 1 / x for x in [1, 1.5e38]: a first guess from the bits (a shift of the exponent's sign), then three
// Newton steps y <- y (2 - x y), each squaring the relative error (0.12 -> 1.5e-2 -> 2e-4 -> 5e-8):
// seven multiply-adds that vectorize instead of a division (the loops' most expensive instruction).
inline float recip1(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    bits = 0x7EF311C7 - bits;
    float y;
    std::memcpy(&y, &bits, sizeof(y));
    y = y * (2.0f - x * y);
    y = y * (2.0f - x * y);
    return y * (2.0f - x * y);
}

inline float sigm1(float x) { return recip1(1.0f + exp_approx(-x)); }
inline float tanh_approx(float x) { return 2.0f * recip1(1.0f + exp_approx(-2.0f * x)) - 1.0f; }

// tanh with a small relative error everywhere: tanh_approx's 2 / (1 + e^-2x) - 1 loses the digits of
// 1 - e^-2x near 0 (absolute error ~1e-7, so relative 1e-7 / |x|); below |x| = 1/4 the odd Taylor
// polynomial to x^9 (truncation < 1e-9 relative) takes over. Both are computed and one kept, so the
// loops still vectorize.
inline float tanh_precise(float x) {
    const float x2 = x * x;
    float p = 62.0f / 2835.0f;
    p = p * x2 - 17.0f / 315.0f;
    p = p * x2 + 2.0f / 15.0f;
    p = p * x2 - 1.0f / 3.0f;
    p = p * x2 + 1.0f;
    const float small = x * p, large = tanh_approx(x);
    return x2 < 0.0625f ? small : large;
}

// 16 floats as one value (GCC/Clang vector extensions: one AVX-512 register where the CPU has them,
// else the compiler's own width), loaded and stored through memcpy (no alignment asked), and summed
// by a tree of halves (4 dependent adds, not 15).
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors without AVX-512: all inlined, no ABI crosses
constexpr int VLANES = 16;
typedef float vf __attribute__((vector_size(64)));
inline vf vload(const float* p) {
    vf x;
    std::memcpy(&x, p, sizeof(x));
    return x;
}
inline void vstore(float* p, vf x) { std::memcpy(p, &x, sizeof(x)); }
inline float hsum(vf x) {
    typedef float h8 __attribute__((vector_size(32)));
    typedef float h4 __attribute__((vector_size(16)));
    h8 lo, hi;
    std::memcpy(&lo, &x, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&x) + sizeof(lo), sizeof(hi));
    const h8 a = lo + hi;
    h4 l4, h4v;
    std::memcpy(&l4, &a, sizeof(l4));
    std::memcpy(&h4v, reinterpret_cast<const char*>(&a) + sizeof(l4), sizeof(h4v));
    const h4 b = l4 + h4v;
    return (b[0] + b[2]) + (b[1] + b[3]);
}

// out[i] = hsum(x[i]) for i < n, sixteen vectors at a time by a transposing tree: each level adds the
// halves of pairs of vectors (15 adds and 30 shuffles give 16 sums, where 16 hsums take 4 dependent
// adds each and a reduction's shuffles); the rest one by one.
inline void hsums(const vf* x, int64_t n, float* out) {
    int64_t i = 0;
    for (; i + VLANES <= n; i += VLANES) {
        vf y[8], z[4], w[2];
        for (int p = 0; p < 8; ++p) {  // y[p]: x[i+2p] folded to lanes 0-7, x[i+2p+1] to 8-15
            const vf a = x[i + 2 * p], b = x[i + 2 * p + 1];
            y[p] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
        }
        for (int p = 0; p < 4; ++p) {  // z[p]: x[i+4p+r] folded to lanes 4r..4r+3
            const vf a = y[2 * p], b = y[2 * p + 1];
            z[p] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
                   __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
        }
        for (int p = 0; p < 2; ++p) {  // w[p]: x[i+8p+r] folded to lanes 2r, 2r+1
            const vf a = z[2 * p], b = z[2 * p + 1];
            w[p] = __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
                   __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
        }
        const vf r = __builtin_shufflevector(w[0], w[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
                     __builtin_shufflevector(w[0], w[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        vstore(out + i, r);
    }
    for (; i < n; ++i) out[i] = hsum(x[i]);
}

// sum of a[j] (times b[j] in `dot`) over j < n, in VLANES independent partial sums (a plain loop
// would not vectorize: the compiler may not reorder a float sum)
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
    float acc[VLANES] = {};
    int64_t j = 0;
    for (; j + VLANES <= n; j += VLANES)
        for (int k = 0; k < VLANES; ++k) acc[k] += a[j + k] * b[j + k];
    float s = 0.0f;
    for (; j < n; ++j) s += a[j] * b[j];
    for (int k = 0; k < VLANES; ++k) s += acc[k];
    return s;
}
inline float total(const float* __restrict a, int64_t n) {
    float acc[VLANES] = {};
    int64_t j = 0;
    for (; j + VLANES <= n; j += VLANES)
        for (int k = 0; k < VLANES; ++k) acc[k] += a[j + k];
    float s = 0.0f;
    for (; j < n; ++j) s += a[j];
    for (int k = 0; k < VLANES; ++k) s += acc[k];
    return s;
}

// body(b, e, part) over [begin, end) cut into `parts` contiguous pieces: in an OpenMP region where the
// library is built with OpenMP (torch's own runtime, kernels/native.py), else one after the other.
template <class Body>
inline void split(int64_t begin, int64_t end, int parts, Body body) {
#pragma omp parallel for num_threads(parts) schedule(static, 1)
    for (int p = 0; p < parts; ++p) body(begin + (end - begin) * p / parts, begin + (end - begin) * (p + 1) / parts, p);
}

}  // namespace undertow_native
