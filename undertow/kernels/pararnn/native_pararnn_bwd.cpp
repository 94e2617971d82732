// ParaRNN's backward on CPU (built by undertow/kernels/native.py; driven by native.py beside this
// file; the forward is native_pararnn.cpp). Float32, layouts as there; g (B, T, S, D) the states'
// gradient, du (B, T, 3, D), da (B, 3, D) and dp (B, 2, D) per row, dinit (B, S, D).
//
// The backward (implicit function theorem, newton.py B1-B2) is one reverse pass: at the solution,
// lam_t = g_t + J_{t+1}^T lam_{t+1} and J_t^T lam_t is the vector-Jacobian product of one cell
// evaluation with respect to its previous state, so each token's VJP (for u, a, p and the previous
// state) also yields the next lam. Plain loops over a block's channels that the compiler vectorizes.
#if defined(__x86_64__) && defined(__AVX512F__)
// 16 floats a vector where the CPU has them (GCC's -march=native prefers 8 on most AVX-512 CPUs);
// these loops are pure arithmetic, so the wider vectors pay (about 1.5x measured).
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_math.h"

namespace {

using namespace undertow_native;  // exp_approx, recip1, sigm1, tanh_approx

// The cells, as tags of vjp_token
struct Gru {
    static constexpr int S = 1;
};
struct Lstm {
    static constexpr int S = 2;
};

struct Unit {
    int64_t T, D, d0, d1;
};

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
        const float z = sigm1(az * h + ut[j]), r = sigm1(ar * h + ut[D + j]);
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
        const float f = sigm1(af * h + ut[j] + pf * c);
        const float ct = tanh_approx(ac * h + ut[D + j]);
        const float cn = f * c + (1.0f - f) * ct;
        const float o = sigm1(ao * h + ut[2 * D + j] + po * cn);
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
