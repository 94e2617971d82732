// Mamba-1 selective scan forward on CPU: the chunked form's native loop (see ../native.py).
//
// For each row (one batch entry, W = 16 consecutive channels) the (N, W) state stays in a small
// array in L1 while the loop walks through time:
//     dt[t, d] = softplus(delta[t, d] + bias[d])        (bias and softplus optional)
//     h[n, d]  = exp2(dt[t, d] * A2[n, d]) * h[n, d] + dt[t, d] * u[t, d] * B[t, n]
//     y[t, d]  = (sum_n C[t, n] * h[n, d] + D[d] * u[t, d]) * silu(z[t, d])   (D, z optional)
// with A2 = A^T log2(e). The state is zeroed where a document starts, decays under 2^lo are 0
// (lo = log2 of the chunked form's TINY_DECAY: no subnormal floats), and, if `states` is given,
// the state before every chunk of `chunk` steps is written out for the backward, which
// recomputes a chunk from it. The training path passes dt itself (no bias, no softplus) and no
// D or z: those go through autograd there; inference passes everything.
//
// exp2 is a degree-6 polynomial on [-0.5, 0.5] times 2^k, with k rounded by adding 1.5 * 2^23
// (relative error under 1e-7, about one float32 ulp); log is the atanh series on
// [sqrt(1/2), sqrt(2)] (2e-7); softplus and silu are built from them (3e-7). NaN inputs give
// NaN. GCC/Clang vector extensions make every step two 8-lane vectors of channels; the n loop is
// unrolled by two for independent dependency chains.

#include <stdint.h>
#include <string.h>

namespace {

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
constexpr int64_t LANES = 8;
constexpr int64_t W = 2 * LANES;
constexpr int64_t MAX_N = 256;

inline vf splat(float v) { return vf{v, v, v, v, v, v, v, v}; }

inline vf select(vi mask, vf a, vf b) {  // mask ? a : b, lane by lane (mask lanes are 0 or -1)
    vi ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    vi r = (ai & mask) | (bi & ~mask);
    vf out;
    memcpy(&out, &r, sizeof out);
    return out;
}

inline vf exp2_or_zero(vf x, vf lo) {
    // round-to-nearest by the 1.5 * 2^23 shift: t's low mantissa bits hold round(c) + 127
    const float shift = 12582912.0f + 127.0f;
    vf c = select(x > 126.0f, splat(126.0f), x);  // NaN compares false and stays NaN
    const vf t = c + shift;
    const vf f = c - (t - shift);
    vf p = splat(1.5337577e-4f);
    p = p * f + 1.3399860e-3f;
    p = p * f + 9.6185198e-3f;
    p = p * f + 5.5503290e-2f;
    p = p * f + 2.4022646e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    vi bits;
    memcpy(&bits, &t, sizeof bits);
    bits = bits << 23;  // 2^round(c); lanes under lo (where this is garbage) are zeroed below
    vf scale;
    memcpy(&scale, &bits, sizeof scale);
    return select(x < lo, splat(0.0f), p * scale);
}

inline vf exp2_any(vf x) { return exp2_or_zero(x, splat(-125.0f)); }  // 0 below 2^-125: no subnormals

inline vf log_positive(vf v) {  // natural log of v > 0 (normal floats)
    vi bits;
    memcpy(&bits, &v, sizeof bits);
    vi e = (bits >> 23) - 127;
    vi mbits = (bits & 0x7fffff) | 0x3f800000;
    vf m;
    memcpy(&m, &mbits, sizeof m);
    const vi big = m > 1.41421356f;  // m in [1, 2) -> [sqrt(1/2), sqrt(2))
    m = select(big, m * 0.5f, m);
    e = e - big;  // big lanes are -1
    const vf s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    vf p = splat(1.0f / 9.0f);
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return __builtin_convertvector(e, vf) * 0.6931471806f + 2.0f * s * p;
}

inline vf softplus(vf x) {  // log(1 + e^x), and x above 20 (as torch's threshold)
    const vf e = exp2_any(x * 1.4426950409f);
    const vf v = 1.0f + e;
    // log(v) * e / (v - 1) corrects the rounding of 1 + e; where v rounds to 1, log1p(e) = e
    const vf small = select(v == 1.0f, e, log_positive(v) * e / (v - 1.0f));
    return select(x > 20.0f, x, small);
}

inline vf silu(vf z) { return z / (1.0f + exp2_any(z * -1.4426950409f)); }

inline void load_lanes(vf *dst, const float *src, int64_t w) {  // w <= W floats, zero-padded
    if (w == W) {
        memcpy(dst, src, W * sizeof(float));
        return;
    }
    float tmp[W] = {};
    for (int64_t j = 0; j < w; j++) tmp[j] = src[j];
    memcpy(dst, tmp, sizeof tmp);
}

inline void store_lanes(float *dst, const vf *src, int64_t w) {
    if (w == W) {
        memcpy(dst, src, W * sizeof(float));
        return;
    }
    float tmp[W];
    memcpy(tmp, src, sizeof tmp);
    for (int64_t j = 0; j < w; j++) dst[j] = tmp[j];
}

}  // namespace

// u, delta, y: (Bt, T, Dc); bias, D: (Dc,) or null; z: (Bt, T, Dc) or null; A2: (N, Dc);
// B, C: (Bt, T, N); h0, h_final: (Bt, N, Dc); starts: (Bt, T) bytes, 1 where a document starts;
// states: (ceil(T / chunk), Bt, N, Dc) or null. Rows are (batch entry, block of W channels),
// row = b * ceil(Dc / W) + block; this call computes rows [row_begin, row_end). All float32,
// contiguous. Returns 0, or 1 if N > MAX_N.
extern "C" int selective_scan_fwd(
    const float *u, const float *delta, const float *bias, int32_t use_softplus, const float *A2,
    const float *B, const float *C, const float *D, const float *z, const float *h0, const uint8_t *starts,
    float *y, float *states, float *h_final, int64_t Bt, int64_t T, int64_t Dc, int64_t N, int64_t chunk,
    float lo_exponent, int64_t row_begin, int64_t row_end) {
    if (N > MAX_N) return 1;
    const int64_t blocks = (Dc + W - 1) / W;
    const vf lo = splat(lo_exponent);
    vf h[MAX_N][2], a2[MAX_N][2];
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / blocks, d0 = (r % blocks) * W;
        const int64_t w = Dc - d0 < W ? Dc - d0 : W;
        for (int64_t n = 0; n < N; n++) {
            load_lanes(h[n], h0 + (b * N + n) * Dc + d0, w);
            load_lanes(a2[n], A2 + n * Dc + d0, w);
        }
        vf bias_v[2] = {}, D_v[2] = {};
        if (bias) load_lanes(bias_v, bias + d0, w);
        if (D) load_lanes(D_v, D + d0, w);
        for (int64_t t = 0; t < T; t++) {
            if (states && t % chunk == 0) {
                float *s = states + ((t / chunk) * Bt + b) * N * Dc + d0;
                for (int64_t n = 0; n < N; n++) store_lanes(s + n * Dc, h[n], w);
            }
            if (starts[b * T + t]) memset(h, 0, N * sizeof h[0]);
            const int64_t row = b * T + t;
            vf dv[2], uv[2];
            load_lanes(dv, delta + row * Dc + d0, w);
            load_lanes(uv, u + row * Dc + d0, w);
            for (int k = 0; k < 2; k++) {
                dv[k] += bias_v[k];
                if (use_softplus) dv[k] = softplus(dv[k]);
            }
            const vf du0 = dv[0] * uv[0], du1 = dv[1] * uv[1];
            const float *Bt_ = B + row * N, *Ct = C + row * N;
            vf acc0 = splat(0.0f), acc1 = splat(0.0f), acc2 = splat(0.0f), acc3 = splat(0.0f);
            int64_t n = 0;
            for (; n + 1 < N; n += 2) {
                const float b0 = Bt_[n], c0 = Ct[n], b1 = Bt_[n + 1], c1 = Ct[n + 1];
                const vf h00 = exp2_or_zero(dv[0] * a2[n][0], lo) * h[n][0] + du0 * b0;
                const vf h01 = exp2_or_zero(dv[1] * a2[n][1], lo) * h[n][1] + du1 * b0;
                const vf h10 = exp2_or_zero(dv[0] * a2[n + 1][0], lo) * h[n + 1][0] + du0 * b1;
                const vf h11 = exp2_or_zero(dv[1] * a2[n + 1][1], lo) * h[n + 1][1] + du1 * b1;
                h[n][0] = h00;
                h[n][1] = h01;
                h[n + 1][0] = h10;
                h[n + 1][1] = h11;
                acc0 += h00 * c0;
                acc1 += h01 * c0;
                acc2 += h10 * c1;
                acc3 += h11 * c1;
            }
            if (n < N) {
                const float b0 = Bt_[n], c0 = Ct[n];
                h[n][0] = exp2_or_zero(dv[0] * a2[n][0], lo) * h[n][0] + du0 * b0;
                h[n][1] = exp2_or_zero(dv[1] * a2[n][1], lo) * h[n][1] + du1 * b0;
                acc0 += h[n][0] * c0;
                acc1 += h[n][1] * c0;
            }
            vf out[2] = {acc0 + acc2 + D_v[0] * uv[0], acc1 + acc3 + D_v[1] * uv[1]};
            if (z) {
                vf zv[2];
                load_lanes(zv, z + row * Dc + d0, w);
                out[0] *= silu(zv[0]);
                out[1] *= silu(zv[1]);
            }
            store_lanes(y + row * Dc + d0, out, w);
        }
        for (int64_t n = 0; n < N; n++) store_lanes(h_final + (b * N + n) * Dc + d0, h[n], w);
    }
    return 0;
}
