// Mamba-1 selective scan on CPU: the chunked form's native loops (see native.py, ../native.py).
// selective_scan_fwd below; selective_scan_bwd, its backward, at the end of the file.
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
#include <stdlib.h>
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

template <bool GROW>  // GROW: x may exceed 126 (a growing state: A > 0 or dt < 0), so clamp it
inline vf exp2_or_zero(vf x, vf lo) {
    // round-to-nearest by the 1.5 * 2^23 shift: t's low mantissa bits hold round(c) + 127
    const float shift = 12582912.0f + 127.0f;
    vf c = x;
    if constexpr (GROW) c = select(x > 126.0f, splat(126.0f), x);  // NaN compares false and stays NaN
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

inline vf exp2_any(vf x) { return exp2_or_zero<true>(x, splat(-125.0f)); }  // 0 below 2^-125: no subnormals

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

inline float sum_lanes(vf v) {
    float s = 0.0f;
    for (int64_t i = 0; i < LANES; i++) s += v[i];
    return s;
}

}  // namespace

// u, delta, y: (Bt, T, Dc); bias, D: (Dc,) or null; z: (Bt, T, Dc) or null; A2: (N, Dc);
// B, C: (Bt, T, N); h0, h_final: (Bt, N, Dc); starts: (Bt, T) bytes, 1 where a document starts;
// states: (ceil(T / chunk), Bt, N, Dc) or null. Rows are (batch entry, block of W channels),
// row = b * ceil(Dc / W) + block; this call computes rows [row_begin, row_end). All float32,
// contiguous. Returns 0, or 1 if N > MAX_N.
template <bool GROW>
static int scan_fwd(
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
                const vf h00 = exp2_or_zero<GROW>(dv[0] * a2[n][0], lo) * h[n][0] + du0 * b0;
                const vf h01 = exp2_or_zero<GROW>(dv[1] * a2[n][1], lo) * h[n][1] + du1 * b0;
                const vf h10 = exp2_or_zero<GROW>(dv[0] * a2[n + 1][0], lo) * h[n + 1][0] + du0 * b1;
                const vf h11 = exp2_or_zero<GROW>(dv[1] * a2[n + 1][1], lo) * h[n + 1][1] + du1 * b1;
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
                h[n][0] = exp2_or_zero<GROW>(dv[0] * a2[n][0], lo) * h[n][0] + du0 * b0;
                h[n][1] = exp2_or_zero<GROW>(dv[1] * a2[n][1], lo) * h[n][1] + du1 * b0;
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

// The backward of the training path (dt given, no bias, softplus, D or z), from the states before
// every chunk that selective_scan_fwd wrote. Per row, chunks run last to first: the chunk's decays
// and states are recomputed from its incoming state (the forward's arithmetic), then the
// adjoint g_t = dL/dh_t = C_t dy_t + a_{t+1} g_{t+1} runs backwards through it, and
//     dC_t[n] = sum_d h_t dy_t,   dB_t[n] = sum_d g_t dt_t u_t,   G_t[d] = sum_n g_t B_t[n],
//     s_t = g_t a_t h_{t-1} (d loss / d(dt_t A)),  du = G dt,  ddt = G u + sum_n s A,
//     dA += s dt,   dh0 = a_0 g_0.
// Resets and tiny decays have a = 0, so nothing flows through them. dy, du, ddt: (Bt, T, Dc);
// dh_final: (Bt, N, Dc) or null; dh0: (Bt, N, Dc); dA_acc (N, Dc), dB_acc and dC_acc (Bt, T, N) are
// this call's accumulators (+=: rows of other calls may share their entries). A2: A^T log2(e).
// Returns 0, 1 if N > MAX_N, 2 if out of memory.
template <bool GROW>
static int scan_bwd(
    const float *u, const float *dt, const float *A2, const float *B, const float *C, const uint8_t *starts,
    const float *states, const float *dy, const float *dh_final, float *du, float *ddt, float *dh0,
    float *dA_acc, float *dB_acc, float *dC_acc, int64_t Bt, int64_t T, int64_t Dc, int64_t N, int64_t chunk,
    float lo_exponent, int64_t row_begin, int64_t row_end) {
    if (N > MAX_N) return 1;
    const int64_t blocks = (Dc + W - 1) / W;
    const vf lo = splat(lo_exponent);
    const float ln2 = 0.6931471806f;
    // the chunk's decays and states, (chunk, N, 2) vectors each; vf needs 32-byte alignment
    void *decay_mem = nullptr, *H_mem = nullptr;
    const size_t bytes = sizeof(vf) * 2 * chunk * N;
    if (posix_memalign(&decay_mem, 64, bytes) || posix_memalign(&H_mem, 64, bytes)) {
        free(decay_mem);
        free(H_mem);
        return 2;
    }
    vf *decay = (vf *)decay_mem, *H = (vf *)H_mem;
    vf g[MAX_N][2], a2[MAX_N][2], dA[MAX_N][2], h_in[MAX_N][2];
    const vf zero[2] = {splat(0.0f), splat(0.0f)};
    for (int64_t r = row_begin; r < row_end; r++) {
        const int64_t b = r / blocks, d0 = (r % blocks) * W;
        const int64_t w = Dc - d0 < W ? Dc - d0 : W;
        for (int64_t n = 0; n < N; n++) {
            load_lanes(a2[n], A2 + n * Dc + d0, w);
            if (dh_final) load_lanes(g[n], dh_final + (b * N + n) * Dc + d0, w);
            else g[n][0] = g[n][1] = splat(0.0f);
            dA[n][0] = dA[n][1] = splat(0.0f);
        }
        const int64_t chunks = (T + chunk - 1) / chunk;
        for (int64_t c = chunks - 1; c >= 0; c--) {
            const int64_t t0 = c * chunk, L = T - t0 < chunk ? T - t0 : chunk;
            const float *s_in = states + (c * Bt + b) * N * Dc + d0;
            for (int64_t n = 0; n < N; n++) load_lanes(h_in[n], s_in + n * Dc, w);
            // recompute the chunk's decays and states with the forward's arithmetic
            for (int64_t i = 0; i < L; i++) {
                const int64_t row = b * T + t0 + i;
                vf dv[2], uv[2];
                load_lanes(dv, dt + row * Dc + d0, w);
                load_lanes(uv, u + row * Dc + d0, w);
                const bool reset = starts[row];
                const float *Bt_ = B + row * N;
                for (int64_t n = 0; n < N; n++) {
                    // after a reset the state restarts from zero (as the forward's, even past a NaN)
                    const vf *prev = reset ? zero : i ? H + ((i - 1) * N + n) * 2 : h_in[n];
                    vf *a = decay + (i * N + n) * 2, *h = H + (i * N + n) * 2;
                    for (int k = 0; k < 2; k++) {
                        a[k] = reset ? splat(0.0f) : exp2_or_zero<GROW>(dv[k] * a2[n][k], lo);
                        h[k] = a[k] * prev[k] + dv[k] * uv[k] * Bt_[n];
                    }
                }
            }
            // the adjoint, last step first
            for (int64_t i = L - 1; i >= 0; i--) {
                const int64_t row = b * T + t0 + i;
                vf dv[2], uv[2], dyv[2];
                load_lanes(dv, dt + row * Dc + d0, w);
                load_lanes(uv, u + row * Dc + d0, w);
                load_lanes(dyv, dy + row * Dc + d0, w);
                const vf duv[2] = {dv[0] * uv[0], dv[1] * uv[1]};
                const float *Bt_ = B + row * N, *Ct = C + row * N;
                float *dBt = dB_acc + row * N, *dCt = dC_acc + row * N;
                vf G[2] = {splat(0.0f), splat(0.0f)}, sA[2] = {splat(0.0f), splat(0.0f)};
                const bool reset = starts[row];
                for (int64_t n = 0; n < N; n++) {
                    const vf *prev = reset ? zero : i ? H + ((i - 1) * N + n) * 2 : h_in[n];
                    const vf *a = decay + (i * N + n) * 2, *h = H + (i * N + n) * 2;
                    const float bn = Bt_[n], cn = Ct[n];
                    vf dc = splat(0.0f), db = splat(0.0f);
                    for (int k = 0; k < 2; k++) {
                        const vf gk = g[n][k] + dyv[k] * cn;
                        dc += h[k] * dyv[k];
                        db += gk * duv[k];
                        G[k] += gk * bn;
                        const vf sk = gk * a[k] * prev[k];
                        sA[k] += sk * a2[n][k];
                        dA[n][k] += sk * dv[k];
                        g[n][k] = a[k] * gk;  // carried to step t - 1
                    }
                    dCt[n] += sum_lanes(dc);
                    dBt[n] += sum_lanes(db);
                }
                const vf out_du[2] = {G[0] * dv[0], G[1] * dv[1]};
                const vf out_ddt[2] = {G[0] * uv[0] + sA[0] * ln2, G[1] * uv[1] + sA[1] * ln2};
                store_lanes(du + row * Dc + d0, out_du, w);
                store_lanes(ddt + row * Dc + d0, out_ddt, w);
            }
        }
        for (int64_t n = 0; n < N; n++) {
            store_lanes(dh0 + (b * N + n) * Dc + d0, g[n], w);
            float acc[W];
            store_lanes(acc, dA[n], W);
            for (int64_t j = 0; j < w; j++) dA_acc[n * Dc + d0 + j] += acc[j];
        }
    }
    free(decay);
    free(H);
    return 0;
}

// The entry points: `may_grow` = 0 promises every dt * A <= 0 (A <= 0 and dt >= 0, as in Mamba),
// which drops exp2's upper clamp from the inner loop (~7%).
extern "C" int selective_scan_fwd(
    const float *u, const float *delta, const float *bias, int32_t use_softplus, const float *A2,
    const float *B, const float *C, const float *D, const float *z, const float *h0, const uint8_t *starts,
    float *y, float *states, float *h_final, int64_t Bt, int64_t T, int64_t Dc, int64_t N, int64_t chunk,
    float lo_exponent, int32_t may_grow, int64_t row_begin, int64_t row_end) {
    auto run = may_grow ? scan_fwd<true> : scan_fwd<false>;
    return run(u, delta, bias, use_softplus, A2, B, C, D, z, h0, starts, y, states, h_final, Bt, T, Dc, N, chunk,
               lo_exponent, row_begin, row_end);
}

extern "C" int selective_scan_bwd(
    const float *u, const float *dt, const float *A2, const float *B, const float *C, const uint8_t *starts,
    const float *states, const float *dy, const float *dh_final, float *du, float *ddt, float *dh0,
    float *dA_acc, float *dB_acc, float *dC_acc, int64_t Bt, int64_t T, int64_t Dc, int64_t N, int64_t chunk,
    float lo_exponent, int32_t may_grow, int64_t row_begin, int64_t row_end) {
    auto run = may_grow ? scan_bwd<true> : scan_bwd<false>;
    return run(u, dt, A2, B, C, starts, states, dy, dh_final, du, ddt, dh0, dA_acc, dB_acc, dC_acc, Bt, T, Dc, N,
               chunk, lo_exponent, row_begin, row_end);
}
