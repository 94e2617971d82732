// ParaRNN's Newton solver on CPU, fused (built by undertow/kernels/native.py; driven by native.py
// beside this file). Float32. Layouts (contiguous): u (B, T, 3, D), states (B, T, S, D) with S = 1
// (GRU: h) or 2 (LSTM: c, h), init (B, S, D), keep (B, T) uint8 (0 where a document starts), a (3, D),
// p (2, D). The unit of work is one (row, block of channels); units are independent (the cells are
// diagonal) and the caller splits them over threads.
//
// Why one pass: Newton step k at token t reads only step k-1's states at t-1 and t and its own
// update at t-1 (newton.py, eqs. N1-N2: delta_t = J_t delta_{t-1} + r_t). So all K steps advance
// together token by token — the guess, step 1, ..., step K and the final residual at token t — each
// a loop over the block's channels that vectorizes, with the per-step states of the previous token
// in a small buffer. The iterates are the chunked form's (the same linear systems, solved in
// token order instead of by chunks); memory is read and written once instead of once per step.
//
// The backward (implicit function theorem, newton.py B1-B2) is one reverse pass: at the solution,
// lam_t = g_t + J_{t+1}^T lam_{t+1} and J_t^T lam_t is the vector-Jacobian product of one cell
// evaluation with respect to its previous state, so each token's VJP (for u, a, p and the previous
// state) also yields the next lam.
#if defined(__x86_64__) && defined(__AVX512F__)
// 16 floats a vector where the CPU has them (GCC's -march=native prefers 8 on most AVX-512 CPUs);
// these loops are pure arithmetic, so the wider vectors pay (about 1.5x measured).
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// e^x for the cells' sigmoid and tanh, inline and branch-free so that the channel loops vectorize
// (libm's expf is a call; -ffast-math would change the whole process's denormal handling). x =
// n ln2 + r with |r| <= ln2 / 2 (ln2 split in two for the subtraction's exactness), e^r by its
// Taylor series to r^6 (relative error ~1e-7), 2^n from the exponent bits. x clamped to [-87, 87]
// (1 + e^87 stays inside `recip`'s range).
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
inline float recip(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof(bits));
    bits = 0x7EF311C7 - bits;
    float y;
    std::memcpy(&y, &bits, sizeof(y));
    y = y * (2.0f - x * y);
    y = y * (2.0f - x * y);
    return y * (2.0f - x * y);
}

inline float sigm(float x) { return recip(1.0f + exp_approx(-x)); }
inline float tanh_approx(float x) { return 2.0f * recip(1.0f + exp_approx(-2.0f * x)) - 1.0f; }

// One cell evaluation per channel: the next state f(prev, u) and, with JAC, J = df/dprev
// (row-major S x S). Equations G1-G4 / L1-L5 of reference.py; derivatives as newton.py's
// step_and_jacobian.
struct Gru {
    static constexpr int S = 1;
    template <bool JAC>
    static inline void eval(const float* prev, float uz, float ur, float uh, const float* a, const float*,
                            float* next, float* J) {
        const float h = prev[0];
        const float z = sigm(a[0] * h + uz), r = sigm(a[1] * h + ur);
        const float ht = tanh_approx(a[2] * (r * h) + uh);
        next[0] = h + z * (ht - h);
        if constexpr (JAC) {
            const float dz = z * (1.0f - z) * a[0], dr = r * (1.0f - r) * a[1];
            const float dht = (1.0f - ht * ht) * a[2] * (r + h * dr);
            J[0] = dz * (ht - h) + z * dht + (1.0f - z);
        }
    }
};

struct Lstm {
    static constexpr int S = 2;
    template <bool JAC>
    static inline void eval(const float* prev, float uf, float uc, float uo, const float* a, const float* p,
                            float* next, float* J) {
        const float c = prev[0], h = prev[1];
        const float f = sigm(a[0] * h + uf + p[0] * c);
        const float ct = tanh_approx(a[1] * h + uc);
        const float cn = f * c + (1.0f - f) * ct;
        const float o = sigm(a[2] * h + uo + p[1] * cn);
        const float tc = tanh_approx(cn);
        next[0] = cn;
        next[1] = o * tc;
        if constexpr (JAC) {
            const float df = f * (1.0f - f);
            const float jcc = f + (c - ct) * df * p[0];
            const float jch = (c - ct) * df * a[0] + (1.0f - f) * (1.0f - ct * ct) * a[1];
            const float dout = o * (1.0f - o);
            const float via = dout * p[1] * tc + o * (1.0f - tc * tc);
            J[0] = jcc;
            J[1] = jch;
            J[2] = via * jcc;
            J[3] = dout * a[2] * tc + via * jch;
        }
    }
};

struct Unit {
    int64_t T, D, d0, d1;
};

// Iterate 0 at token t for channels [0, W): f(0, u_t) (the guess N0) into cur.
template <class Cell>
inline void guess(const float* __restrict ut, const float* __restrict a, const float* __restrict p, int64_t D,
                  int64_t W, float* __restrict cur) {
    constexpr int S = Cell::S;
    for (int64_t j = 0; j < W; ++j) {
        const float zero[S] = {}, av[3] = {a[j], a[D + j], a[2 * D + j]}, pv[2] = {p[j], p[D + j]};
        float next[S], J[S * S];
        Cell::template eval<false>(zero, ut[j], ut[D + j], ut[2 * D + j], av, pv, next, J);
        for (int r = 0; r < S; ++r) cur[r * W + j] = next[r];
    }
}

// Newton step k + 1 at token t from iterate k (JAC), or only the residual at the last iterate (not
// JAC): old = iterate k at t-1 (replaced by iterate k at t for the next token), ck = iterate k at t,
// cn = iterate k + 1 at t, dk = step k + 1's update at t-1 (replaced by its update at t); worst
// (W) the largest |F| per channel so far, NaN once one was NaN (per channel, not a reduction across
// the loop, which would not vectorize without -ffast-math).
template <class Cell, bool JAC>
inline void newton_step(const float* __restrict ut, const float* __restrict a, const float* __restrict p,
                        int64_t D, int64_t W, float kp, float* __restrict old, const float* __restrict ck,
                        float* __restrict cn, float* __restrict dk, float* __restrict worst) {
    constexpr int S = Cell::S;
    for (int64_t j = 0; j < W; ++j) {
        float prev[S], next[S], J[S * S];
        for (int r = 0; r < S; ++r) prev[r] = kp * old[r * W + j];
        const float av[3] = {a[j], a[D + j], a[2 * D + j]}, pv[2] = {p[j], p[D + j]};
        Cell::template eval<JAC>(prev, ut[j], ut[D + j], ut[2 * D + j], av, pv, next, J);
        float resid[S];
        for (int r = 0; r < S; ++r) {
            resid[r] = next[r] - ck[r * W + j];
            const float m = resid[r] < 0.0f ? -resid[r] : resid[r];
            worst[j] = (m > worst[j] || m != m) ? m : worst[j];
        }
        if constexpr (JAC) {
            float dprev[S];
            for (int r = 0; r < S; ++r) dprev[r] = kp * dk[r * W + j];
            for (int r = 0; r < S; ++r) {
                float delta = resid[r];
                for (int q = 0; q < S; ++q) delta += J[r * S + q] * dprev[q];
                dk[r * W + j] = delta;
                cn[r * W + j] = ck[r * W + j] + delta;
            }
        }
        for (int r = 0; r < S; ++r) old[r * W + j] = ck[r * W + j];
    }
}

// Runs the guess (or reads `states`), K Newton steps and the final residual for one unit (a, p, init
// already offset to its channels); writes the last iterate into `states` and max |F| at iterate k
// into res[k], k = 0..K (NaN where any residual is NaN).
template <class Cell>
void forward_unit(const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                  float* states, int K, bool from_guess, const Unit& s, float* res) {
    constexpr int S = Cell::S;
    const int64_t W = s.d1 - s.d0, D = s.D;
    // per iterate k = 0..K: old = iterate k at t-1, cur = iterate k at t; dl (k >= 1) = step k's update at t-1
    std::vector<float> buf(3 * (K + 1) * S * W, 0.0f), worst((K + 1) * W, 0.0f);
    float *old = buf.data(), *cur = old + (K + 1) * S * W, *dl = cur + (K + 1) * S * W;
    for (int k = 0; k <= K; ++k)
        for (int r = 0; r < S; ++r) std::memcpy(old + (k * S + r) * W, init + r * D, W * sizeof(float));
    for (int64_t t = 0; t < s.T; ++t) {
        const float kp = (t == 0 || keep[t]) ? 1.0f : 0.0f;
        const float* ut = u + t * 3 * D;
        float* st = states + t * S * D;
        if (from_guess)
            guess<Cell>(ut, a, p, D, W, cur);
        else
            for (int r = 0; r < S; ++r) std::memcpy(cur + r * W, st + r * D, W * sizeof(float));
        for (int k = 0; k < K; ++k)
            newton_step<Cell, true>(ut, a, p, D, W, kp, old + k * S * W, cur + k * S * W, cur + (k + 1) * S * W,
                                    dl + (k + 1) * S * W, worst.data() + k * W);
        newton_step<Cell, false>(ut, a, p, D, W, kp, old + K * S * W, cur + K * S * W, nullptr, nullptr,
                                 worst.data() + K * W);
        for (int r = 0; r < S; ++r) std::memcpy(st + r * D, cur + (K * S + r) * W, W * sizeof(float));
    }
    for (int k = 0; k <= K; ++k) {
        float m = 0.0f;
        for (int64_t j = 0; j < W; ++j) {
            const float x = worst[k * W + j];
            m = (x > m || x != x) ? x : m;  // NaN wins
        }
        res[k] = m;
    }
}

// One token of the reverse pass for channels [0, W): the VJP of f(prev, u_t) with lam = g_t + carry
// (lam_t of B1): du_t, the a and p gradients accumulated into acc (3 + 2 rows of W), and carry <-
// keep_t * d prev (= J_t^T lam_t, what lam_{t-1} adds).
template <class Cell>
inline void vjp_token(const float* __restrict sp, const float* __restrict ut, const float* __restrict gt,
                      const float* __restrict a, const float* __restrict p, int64_t D, int64_t W, float kp,
                      float* __restrict dut, float* __restrict acc, float* __restrict carry);

template <>
inline void vjp_token<Gru>(const float* __restrict sp, const float* __restrict ut, const float* __restrict gt,
                           const float* __restrict a, const float* __restrict, int64_t D, int64_t W, float kp,
                           float* __restrict dut, float* __restrict acc, float* __restrict carry) {
    for (int64_t j = 0; j < W; ++j) {
        const float az = a[j], ar = a[D + j], ah = a[2 * D + j];
        const float h = kp * sp[j];
        const float lam = gt[j] + carry[j];
        const float z = sigm(az * h + ut[j]), r = sigm(ar * h + ut[D + j]);
        const float ht = tanh_approx(ah * (r * h) + ut[2 * D + j]);
        const float pz = lam * (ht - h) * z * (1.0f - z);   // d pre_z (G1)
        const float ph = lam * z * (1.0f - ht * ht);         // d pre_h (G3)
        const float pr = ph * ah * h * r * (1.0f - r);       // d pre_r (G2, through G3's r * h)
        dut[j] = pz, dut[D + j] = pr, dut[2 * D + j] = ph;
        acc[j] += pz * h, acc[W + j] += pr * h, acc[2 * W + j] += ph * r * h;
        carry[j] = kp * (lam * (1.0f - z) + pz * az + ph * ah * r + pr * ar);
    }
}

template <>
inline void vjp_token<Lstm>(const float* __restrict sp, const float* __restrict ut, const float* __restrict gt,
                            const float* __restrict a, const float* __restrict p, int64_t D, int64_t W, float kp,
                            float* __restrict dut, float* __restrict acc, float* __restrict carry) {
#pragma GCC ivdep  // the row pointers never overlap (restrict alone is not enough for GCC here)
    for (int64_t j = 0; j < W; ++j) {
        const float af = a[j], ac = a[D + j], ao = a[2 * D + j], pf = p[j], po = p[D + j];
        const float c = kp * sp[j], h = kp * sp[D + j];
        const float lc = gt[j] + carry[j], lh = gt[D + j] + carry[W + j];
        const float f = sigm(af * h + ut[j] + pf * c);
        const float ct = tanh_approx(ac * h + ut[D + j]);
        const float cn = f * c + (1.0f - f) * ct;
        const float o = sigm(ao * h + ut[2 * D + j] + po * cn);
        const float tc = tanh_approx(cn);
        const float pre_o = lh * tc * o * (1.0f - o);                   // L5 -> L4
        const float gcn = lc + lh * o * (1.0f - tc * tc) + pre_o * po;  // d c' (L5 and L4's peephole)
        const float pre_f = gcn * (c - ct) * f * (1.0f - f);            // L3 -> L1
        const float pre_c = gcn * (1.0f - f) * (1.0f - ct * ct);        // L3 -> L2
        dut[j] = pre_f, dut[D + j] = pre_c, dut[2 * D + j] = pre_o;
        acc[j] += pre_f * h, acc[W + j] += pre_c * h, acc[2 * W + j] += pre_o * h;
        acc[3 * W + j] += pre_f * c, acc[4 * W + j] += pre_o * cn;
        carry[j] = kp * (gcn * f + pre_f * pf);
        carry[W + j] = kp * (pre_o * ao + pre_c * ac + pre_f * af);
    }
}

// The reverse pass at the solution for one unit (pointers offset to its row and channels): du (T, 3, D),
// da (3, D) and dp (2, D) accumulated, dinit (S, D).
template <class Cell>
void backward_unit(const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                   const float* states, const float* g, float* du, float* da, float* dp, float* dinit,
                   const Unit& s) {
    constexpr int S = Cell::S;
    const int64_t W = s.d1 - s.d0, D = s.D;
    std::vector<float> carry(S * W, 0.0f), acc(5 * W, 0.0f);
    for (int64_t t = s.T - 1; t >= 0; --t) {
        const float kp = (t == 0 || keep[t]) ? 1.0f : 0.0f;
        const float* sp = t == 0 ? init : states + (t - 1) * S * D;
        vjp_token<Cell>(sp, u + t * 3 * D, g + t * S * D, a, p, D, W, kp, du + t * 3 * D, acc.data(), carry.data());
    }
    for (int64_t j = 0; j < W; ++j) {
        for (int q = 0; q < 3; ++q) da[q * D + j] += acc[q * W + j];
        for (int q = 0; q < 2; ++q) dp[q * D + j] += acc[(3 + q) * W + j];
        for (int r = 0; r < S; ++r) dinit[r * D + j] = carry[r * W + j];
    }
}

// unit index -> (row, channel block)
inline void locate(int64_t unit, int64_t D, int64_t block, int64_t& b, Unit& s, int64_t T) {
    const int64_t blocks = (D + block - 1) / block;
    b = unit / blocks;
    const int64_t d0 = (unit % blocks) * block;
    s = Unit{T, D, d0, d0 + block < D ? d0 + block : D};
}

}  // namespace

extern "C" {

// Units [begin, end); res (units, K + 1). init (B, S, D) and p (2, D) always given (zeros, and any
// (2, D) for the GRU, which never reads it).
int pararnn_fwd(int lstm, const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                float* states, float* res, int64_t K, int64_t from_guess, int64_t B, int64_t T, int64_t D,
                int64_t block, int64_t begin, int64_t end) {
    const int S = lstm ? 2 : 1;
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b;
        Unit s;
        locate(unit, D, block, b, s, T);
        const float* ub = u + b * T * 3 * D + s.d0;
        const float* ib = init + b * S * D + s.d0;
        float* sb = states + b * T * S * D + s.d0;
        if (lstm)
            forward_unit<Lstm>(ub, a + s.d0, p + s.d0, ib, keep + b * T, sb, int(K), from_guess != 0, s,
                               res + unit * (K + 1));
        else
            forward_unit<Gru>(ub, a + s.d0, p + s.d0, ib, keep + b * T, sb, int(K), from_guess != 0, s,
                              res + unit * (K + 1));
    }
    return 0;
}

// Units [begin, end); da (B, 3, D), dp (B, 2, D) per row (zeroed by the caller; the GRU's dp is
// written but unused), dinit (B, S, D); init and p as pararnn_fwd.
int pararnn_bwd(int lstm, const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                const float* states, const float* g, float* du, float* da, float* dp, float* dinit, int64_t B,
                int64_t T, int64_t D, int64_t block, int64_t begin, int64_t end) {
    const int S = lstm ? 2 : 1;
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b;
        Unit s;
        locate(unit, D, block, b, s, T);
        const int64_t row = b * T, c = s.d0;
        if (lstm)
            backward_unit<Lstm>(u + row * 3 * D + c, a + c, p + c, init + b * S * D + c, keep + row,
                                states + row * S * D + c, g + row * S * D + c, du + row * 3 * D + c,
                                da + b * 3 * D + c, dp + b * 2 * D + c, dinit + b * S * D + c, s);
        else
            backward_unit<Gru>(u + row * 3 * D + c, a + c, p + c, init + b * S * D + c, keep + row,
                               states + row * S * D + c, g + row * S * D + c, du + row * 3 * D + c,
                               da + b * 3 * D + c, dp + b * 2 * D + c, dinit + b * S * D + c, s);
    }
    return 0;
}

}  // extern "C"
