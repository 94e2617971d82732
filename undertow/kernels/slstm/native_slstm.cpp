// sLSTM's CPU loops (built by undertow/kernels/native.py; driven by native.py beside this file).
//
// The forward's unit is one head (all batch entries together, sharing the head's block of R); the
// backward's is one (batch entry, head). The state (y, c, n, m), Dh floats each, stays in cache
// across the time loop; each step is a Dh x 4Dh matrix-vector product with the head's block of R
// plus the pointwise cell (reference.py's eqs. 8-17). Units are independent; the caller splits
// them over threads. Layouts (float32, contiguous):
//   gates (B, T, 4, H, D)   R (4, H, D, D)   state (4, B, H, D): y, c, n, m
//   y / c / n / m per step (B, T, H, D)      starts (B, T) uint8: a document starts at t (t > 0)
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// The cell's transcendentals as branch-free inline arithmetic, so that the loops over a head's
// channels vectorize (libm's expf/log1pf/tanhf are calls the compiler cannot vectorize without
// -ffast-math, which GCC links with code that flushes denormals for the whole process).

// e^x: 2^k times a degree-6 polynomial of 2^f, f in [-0.5, 0.5]; k rounded by adding 1.5 * 2^23.
// Relative error < 2e-7; x clamped to [-87, 88] (0 and inf are never needed here).
inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float t = x * 1.44269504089f;
    const float r = (t + 12582912.0f) - 12582912.0f;
    const float f = t - r;
    float p = 1.5403530393e-4f;
    p = p * f + 1.3333558146e-3f;
    p = p * f + 9.6181291076e-3f;
    p = p * f + 5.5504108665e-2f;
    p = p * f + 2.4022650696e-1f;
    p = p * f + 6.9314718056e-1f;
    p = p * f + 1.0f;
    const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return p * scale;
}

// log(1 + e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3], its odd series to s^17.
inline float log1p_unit(float e) {
    const float s = e / (2.0f + e), s2 = s * s;
    float p = 1.0f / 17.0f;
    p = p * s2 + 1.0f / 15.0f;
    p = p * s2 + 1.0f / 13.0f;
    p = p * s2 + 1.0f / 11.0f;
    p = p * s2 + 1.0f / 9.0f;
    p = p * s2 + 1.0f / 7.0f;
    p = p * s2 + 1.0f / 5.0f;
    p = p * s2 + 1.0f / 3.0f;
    p = p * s2 + 1.0f;
    return 2.0f * s * p;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
// log sigmoid(x) = min(x, 0) - log(1 + e^-|x|)
inline float logsigmoid(float x) { return (x < 0.0f ? x : 0.0f) - log1p_unit(exp_poly(x < 0.0f ? x : -x)); }
inline float tanh_poly(float z) { return 1.0f - 2.0f / (exp_poly(2.0f * z) + 1.0f); }

struct Shape {
    int64_t B, T, H, D;
    int64_t gate(int64_t b, int64_t t, int64_t g, int64_t h) const { return (((b * T + t) * 4 + g) * H + h) * D; }
    int64_t step(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * D; }
    int64_t state(int64_t s, int64_t b, int64_t h) const { return ((s * B + b) * H + h) * D; }
    int64_t rblock(int64_t g, int64_t h) const { return (g * H + h) * D * D; }
};

// raw[g * D + j] = gates[b, t, g, h, j] + sum_k y[k] R[g, h, k, j]
void preactivations(const float* gates, const float* R, const float* y, const Shape& s, int64_t b, int64_t t,
                    int64_t h, float* raw) {
    const int64_t D = s.D;
    for (int64_t g = 0; g < 4; ++g) {
        float* out = raw + g * D;
        std::memcpy(out, gates + s.gate(b, t, g, h), D * sizeof(float));
        const float* block = R + s.rblock(g, h);
        for (int64_t k = 0; k < D; ++k) {
            const float yk = y[k];
            if (yk == 0.0f) continue;
            const float* row = block + k * D;
            for (int64_t j = 0; j < D; ++j) out[j] += yk * row[j];
        }
    }
}

}  // namespace

extern "C" {

// Forward of heads [begin, end): every batch entry of a head steps together, so the head's block
// of R (4 D^2 floats, more than L1 holds at D = 64) is read once per step for all of them rather
// than once per (entry, step). init: (4, B, H, D) or null (zero state). Writes y of every step,
// and c, n, m of every step when their pointers are not null (what the backward reads; inference
// skips them), and the final state (4, B, H, D).
int slstm_fwd(const float* gates, const float* R, const float* init, const uint8_t* starts, float* y_all,
              float* c_all, float* n_all, float* m_all, float* final_state, int64_t B, int64_t T, int64_t H,
              int64_t D, int64_t begin, int64_t end) {
    const Shape s{B, T, H, D};
    std::vector<float> raw(B * 4 * D), st(4 * B * D);  // st: y, c, n, m of every entry
    for (int64_t h = begin; h < end; ++h) {
        for (int64_t q = 0; q < 4; ++q)
            for (int64_t b = 0; b < B; ++b) {
                float* dst = st.data() + (q * B + b) * D;
                if (init) std::memcpy(dst, init + s.state(q, b, h), D * sizeof(float));
                else std::fill(dst, dst + D, 0.0f);
            }
        for (int64_t t = 0; t < T; ++t) {
            for (int64_t b = 0; b < B; ++b) {
                if (t > 0 && starts[b * T + t])
                    for (int64_t q = 0; q < 4; ++q) std::fill(st.data() + (q * B + b) * D, st.data() + (q * B + b + 1) * D, 0.0f);
                for (int64_t g = 0; g < 4; ++g)
                    std::memcpy(raw.data() + (b * 4 + g) * D, gates + s.gate(b, t, g, h), D * sizeof(float));
            }
            // raw[b, g, :] += sum_k y[b, k] R[g, h, k, :], one pass over R for all entries
            for (int64_t g = 0; g < 4; ++g) {
                const float* block = R + s.rblock(g, h);
                for (int64_t k = 0; k < D; ++k) {
                    const float* row = block + k * D;
                    for (int64_t b = 0; b < B; ++b) {
                        const float yk = st[b * D + k];
                        if (yk == 0.0f) continue;
                        float* out = raw.data() + (b * 4 + g) * D;
                        for (int64_t j = 0; j < D; ++j) out[j] += yk * row[j];
                    }
                }
            }
            for (int64_t b = 0; b < B; ++b) {
                float *y = st.data() + b * D, *c = st.data() + (B + b) * D;
                float *n = st.data() + (2 * B + b) * D, *m = st.data() + (3 * B + b) * D;
                const float* r = raw.data() + b * 4 * D;
                for (int64_t j = 0; j < D; ++j) {
                    const float ir = r[j], fr = r[D + j], zr = r[2 * D + j], orr = r[3 * D + j];
                    const float log_f = logsigmoid(fr) + m[j];
                    const float m_new = ir > log_f ? ir : log_f;
                    const float ig = exp_poly(ir - m_new), fg = exp_poly(log_f - m_new);
                    c[j] = fg * c[j] + ig * tanh_poly(zr);
                    n[j] = fg * n[j] + ig;
                    m[j] = m_new;
                    y[j] = sigmoid(orr) * c[j] / n[j];
                }
                const int64_t o = s.step(b, t, h);
                std::memcpy(y_all + o, y, D * sizeof(float));
                if (c_all) {
                    std::memcpy(c_all + o, c, D * sizeof(float));
                    std::memcpy(n_all + o, n, D * sizeof(float));
                    std::memcpy(m_all + o, m, D * sizeof(float));
                }
            }
        }
        for (int64_t q = 0; q < 4; ++q)
            for (int64_t b = 0; b < B; ++b)
                std::memcpy(final_state + s.state(q, b, h), st.data() + (q * B + b) * D, D * sizeof(float));
    }
    return 0;
}

// Backward of rows [begin, end) from the forward's per-step states: the exact adjoint of
// slstm_fwd (torch.maximum's rule at ties: half to each side). dy: (B, T, H, D); dfinal: (4, B, H, D)
// or null. Writes dgates (B, T, 4, H, D) and dinit (4, B, H, D); adds y_{t-1}^T draw into dR
// (4, H, D, D), this part's own accumulator.
int slstm_bwd(const float* gates, const float* R, const float* init, const uint8_t* starts, const float* y_all,
              const float* c_all, const float* n_all, const float* m_all, const float* dy, const float* dfinal,
              float* dgates, float* dinit, float* dR, int64_t B, int64_t T, int64_t H, int64_t D, int64_t begin,
              int64_t end) {
    const Shape s{B, T, H, D};
    std::vector<float> raw(4 * D), draw(4 * D), zero(D, 0.0f);
    std::vector<float> gy(D), gc(D), gn(D), gm(D);  // gradients of the state after step t
    for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / H, h = row % H;
        float* g[4] = {gy.data(), gc.data(), gn.data(), gm.data()};
        for (int q = 0; q < 4; ++q) {
            if (dfinal) std::memcpy(g[q], dfinal + s.state(q, b, h), D * sizeof(float));
            else std::fill(g[q], g[q] + D, 0.0f);
        }
        for (int64_t t = T - 1; t >= 0; --t) {
            const bool reset = t > 0 && starts[b * T + t];
            const float *yp, *cp, *np, *mp;  // the state before step t
            if (reset || (t == 0 && !init)) {
                yp = cp = np = mp = zero.data();
            } else if (t == 0) {
                yp = init + s.state(0, b, h), cp = init + s.state(1, b, h);
                np = init + s.state(2, b, h), mp = init + s.state(3, b, h);
            } else {
                const int64_t o = s.step(b, t - 1, h);
                yp = y_all + o, cp = c_all + o, np = n_all + o, mp = m_all + o;
            }
            preactivations(gates, R, yp, s, b, t, h, raw.data());
            const int64_t o = s.step(b, t, h);
            const float* dyt = dy + o;
            for (int64_t j = 0; j < D; ++j) {
                const float ir = raw[j], fr = raw[D + j], zr = raw[2 * D + j], orr = raw[3 * D + j];
                const float lsf = logsigmoid(fr), log_f = lsf + mp[j];
                const float m_new = ir > log_f ? ir : log_f;
                const float ig = exp_poly(ir - m_new), fg = exp_poly(log_f - m_new);
                const float zt = tanh_poly(zr), og = sigmoid(orr);
                const float c_new = c_all[o + j], n_new = n_all[o + j];
                const float dyj = gy[j] + dyt[j];
                const float dog = dyj * c_new / n_new;
                const float dc = gc[j] + dyj * og / n_new;
                const float dn = gn[j] - dyj * og * c_new / (n_new * n_new);
                const float dig = (dc * zt + dn) * ig;    // d(i~ - m_new)
                const float dfg = (dc * cp[j] + dn * np[j]) * fg;  // d(log_f - m_new)
                const float dm_new = gm[j] - dig - dfg;
                float di = dig, dlog_f = dfg;
                if (ir > log_f) di += dm_new;
                else if (ir < log_f) dlog_f += dm_new;
                else { di += 0.5f * dm_new; dlog_f += 0.5f * dm_new; }
                draw[j] = di;
                draw[D + j] = dlog_f * sigmoid(-fr);
                draw[2 * D + j] = dc * ig * (1.0f - zt * zt);
                draw[3 * D + j] = dog * og * (1.0f - og);
                gc[j] = dc * fg;
                gn[j] = dn * fg;
                gm[j] = dlog_f;
            }
            for (int64_t q = 0; q < 4; ++q)
                std::memcpy(dgates + s.gate(b, t, q, h), draw.data() + q * D, D * sizeof(float));
            // dy_{t-1}[k] = sum_g sum_j R[g, h, k, j] draw_g[j];  dR[g, h, k, :] += y_{t-1}[k] draw_g
            for (int64_t k = 0; k < D; ++k) {
                float acc = 0.0f;
                const float yk = yp[k];
                for (int64_t q = 0; q < 4; ++q) {
                    const float* rrow = R + s.rblock(q, h) + k * D;
                    float* drow = dR + s.rblock(q, h) + k * D;
                    const float* dq = draw.data() + q * D;
                    for (int64_t j = 0; j < D; ++j) {
                        acc += rrow[j] * dq[j];
                        drow[j] += yk * dq[j];
                    }
                }
                gy[k] = acc;
            }
            if (reset)  // the state before a document start is the constant zero state
                for (int q = 0; q < 4; ++q) std::fill(g[q], g[q] + D, 0.0f);
        }
        for (int q = 0; q < 4; ++q) std::memcpy(dinit + s.state(q, b, h), g[q], D * sizeof(float));
    }
    return 0;
}

}  // extern "C"
