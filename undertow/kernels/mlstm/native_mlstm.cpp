// The mLSTM on CPU as its recurrence, forward and exact backward (built by kernels/native.py; driven
// by native.py beside this file). Float32. Layouts (contiguous): q, k (B, T, H, K), v and h (B, T, H, V),
// i, f (B, T, H) (the gate pre-activations), reset (B, T) uint8 or nullptr (1 where a document starts:
// the zero state before that token), C0 (B, H, K, V), n0 (B, H, K), m0 (B, H) or nullptr (the zero
// state). One unit of work is one (row, head); units [u0, u1), u = b H + head, split over `threads`
// in an OpenMP region where the library is built with OpenMP (torch's runtime, kernels/native.py),
// else run in order (the caller splits them over Python threads).
//
// Per token (reference.py, the spec; s = 1 / sqrt(K)):
//     a = logsigmoid(f) + m_prev;  m = max(a, i);  F = exp(a - m);  I = exp(i - m)
//     C = F C_prev + I k v^T;  n = F n_prev + I k
//     num = C^T (s q);  d = n . (s q);  den = max(|d|, exp(-m)) + eps;  h = num / den
// Why a recurrence on CPU: a token's work is a few (K, V) passes over a state that stays in the
// cache, where the chunkwise form walks (L, L) tiles through memory dozens of times in PyTorch ops.
//
// The backward is autograd's of the reference, written out (the maxima split the gradient at ties as
// torch.maximum's does; |d| has gradient sign(d)). It runs token by token in reverse with the
// gradients of the state after the token (gC, gn, gm): the forward stores the state before every
// R-th token (`ckpt`), and the backward replays each span of R tokens from its checkpoint to recover
// the states it needs, so memory is (T / R) states per unit, not T.
#if defined(__x86_64__) && defined(__AVX512F__)
#pragma GCC target("prefer-vector-width=512")
#endif
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "native_math.h"

namespace {

using undertow_native::hsum;
using undertow_native::vf;
using undertow_native::vload;
using undertow_native::VLANES;
using undertow_native::vstore;

struct Shape {
    int64_t B, T, H, K, V, R;
    int64_t slot() const { return K * V + K + 1; }       // one checkpoint: C, n, m
    int64_t spans() const { return (T + R - 1) / R; }     // checkpoints per unit
};

inline float logsigmoid(float x) { return (x < 0.0f ? x : 0.0f) - std::log1p(std::exp(-std::fabs(x))); }
inline float sigmoid_neg(float x) {  // sigmoid(-x) = d logsigmoid(x) / dx
    return x >= 0.0f ? std::exp(-x) / (1.0f + std::exp(-x)) : 1.0f / (1.0f + std::exp(x));
}
inline float win(float a, float b) { return a > b ? 1.0f : (a == b ? 0.5f : 0.0f); }  // torch.maximum's share

// One token forward from (C, n, m) in place; writes num (V) and returns the scalars the backward needs.
struct Step {
    float a, m, F, I, d, e, den;
};

inline Step step(float* __restrict C, float* __restrict n, float& m, const float* __restrict q,
                 const float* __restrict k, const float* __restrict v, float ig, float fg, float s, float eps,
                 int64_t K, int64_t V, float* __restrict num) {
    Step r;
    r.a = logsigmoid(fg) + m;
    r.m = r.a > ig ? r.a : ig;
    r.F = std::exp(r.a - r.m);
    r.I = std::exp(ig - r.m);
    const float F = r.F, I = r.I;
    // C's columns VLANES at a time, every row of a block before the next block: num's block is summed
    // in registers (two chains, even and odd rows), not through memory row after row
    int64_t j = 0;
    for (; j + VLANES <= V; j += VLANES) {
        const vf vv = vload(v + j);
        vf acc0 = {}, acc1 = {};
        int64_t x = 0;
        for (; x + 1 < K; x += 2) {
            float* r0 = C + x * V + j;
            float* r1 = r0 + V;
            const vf c0 = F * vload(r0) + (I * k[x]) * vv;
            const vf c1 = F * vload(r1) + (I * k[x + 1]) * vv;
            vstore(r0, c0);
            vstore(r1, c1);
            acc0 += c0 * (s * q[x]);
            acc1 += c1 * (s * q[x + 1]);
        }
        if (x < K) {
            float* r0 = C + x * V + j;
            const vf c0 = F * vload(r0) + (I * k[x]) * vv;
            vstore(r0, c0);
            acc0 += c0 * (s * q[x]);
        }
        vstore(num + j, acc0 + acc1);
    }
    for (; j < V; ++j) {  // the channels left over
        float acc = 0.0f;
        for (int64_t x = 0; x < K; ++x) {
            const float c = F * C[x * V + j] + I * k[x] * v[j];
            C[x * V + j] = c;
            acc += c * (s * q[x]);
        }
        num[j] = acc;
    }
    float d = 0.0f;
    for (int64_t x = 0; x < K; ++x) {
        n[x] = F * n[x] + I * k[x];
        d += n[x] * (s * q[x]);
    }
    m = r.m;
    r.d = d;
    r.e = std::exp(-r.m);
    r.den = (std::fabs(d) > r.e ? std::fabs(d) : r.e) + eps;
    return r;
}

inline void load_state(const float* C0, const float* n0, const float* m0, int64_t u, const Shape& S, float* C,
                       float* n, float& m) {
    if (C0 == nullptr) {
        std::memset(C, 0, sizeof(float) * S.K * S.V);
        std::memset(n, 0, sizeof(float) * S.K);
        m = 0.0f;
        return;
    }
    std::memcpy(C, C0 + u * S.K * S.V, sizeof(float) * S.K * S.V);
    std::memcpy(n, n0 + u * S.K, sizeof(float) * S.K);
    m = m0[u];
}

inline int64_t at(const Shape& S, int64_t b, int64_t t, int64_t h) { return (b * S.T + t) * S.H + h; }

}  // namespace

extern "C" {

int mlstm_fwd(const float* q, const float* k, const float* v, const float* ig, const float* fg, const uint8_t* reset,
              const float* C0, const float* n0, const float* m0, float* h, float* CT, float* nT, float* mT, float* ckpt,
              int64_t B, int64_t T, int64_t H, int64_t K, int64_t V, int64_t R, float eps, int64_t u0, int64_t u1,
              int threads) {
    const Shape S{B, T, H, K, V, R};
    const float s = 1.0f / std::sqrt(float(K));
#pragma omp parallel num_threads(threads)
    {
    std::vector<float> C(K * V), n(K), num(V);
#pragma omp for schedule(static)
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / H, hh = u % H;
        float m;
        load_state(C0, n0, m0, u, S, C.data(), n.data(), m);
        for (int64_t t = 0; t < T; ++t) {
            if (ckpt != nullptr && t % R == 0) {
                float* slot = ckpt + (u * S.spans() + t / R) * S.slot();
                std::memcpy(slot, C.data(), sizeof(float) * K * V);
                std::memcpy(slot + K * V, n.data(), sizeof(float) * K);
                slot[K * V + K] = m;
            }
            if (reset != nullptr && reset[b * T + t]) {
                std::memset(C.data(), 0, sizeof(float) * K * V);
                std::memset(n.data(), 0, sizeof(float) * K);
                m = 0.0f;
            }
            const int64_t x = at(S, b, t, hh);
            const Step r = step(C.data(), n.data(), m, q + x * K, k + x * K, v + x * V, ig[x], fg[x], s, eps, K, V,
                                num.data());
            float* out = h + x * V;
            const float inv = 1.0f / r.den;
            for (int64_t j = 0; j < V; ++j) out[j] = num[j] * inv;
        }
        if (CT != nullptr) {
            std::memcpy(CT + u * K * V, C.data(), sizeof(float) * K * V);
            std::memcpy(nT + u * K, n.data(), sizeof(float) * K);
            mT[u] = m;
        }
    }
    }  // omp parallel
    return 0;
}

// gh (B, T, H, V); gCT, gnT, gmT: the final state's gradients or nullptr (zero). Writes gq, gk, gv,
// gi, gf (the inputs' layouts) and, where gC0 is not nullptr, the initial state's gradients.
int mlstm_bwd(const float* q, const float* k, const float* v, const float* ig, const float* fg, const uint8_t* reset,
              const float* ckpt, const float* gh, const float* gCT, const float* gnT, const float* gmT, float* gq,
              float* gk, float* gv, float* gi, float* gf, float* gC0, float* gn0, float* gm0, int64_t B, int64_t T,
              int64_t H, int64_t K, int64_t V, int64_t R, float eps, int64_t u0, int64_t u1, int threads) {
    const Shape S{B, T, H, K, V, R};
    const float s = 1.0f / std::sqrt(float(K));
    const int64_t KV = K * V;
#pragma omp parallel num_threads(threads)
    {
    // per span: the state before each token (after any reset), its step's scalars and num
    std::vector<float> Cs(R * KV), ns(R * K), nums(R * V), C(KV), n(K), num(V);
    std::vector<Step> steps(R);
    std::vector<float> gC(KV), gn(K), gnum(V), gqs(K), cpg(K), rv(K), tails(2 * K);
    std::vector<vf> P1(K), P2(K);  // per row of the state: the lanes of two dot products
#pragma omp for schedule(static)
    for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / H, hh = u % H;
        if (gCT != nullptr) {
            std::memcpy(gC.data(), gCT + u * KV, sizeof(float) * KV);
            std::memcpy(gn.data(), gnT + u * K, sizeof(float) * K);
        } else {
            std::fill(gC.begin(), gC.end(), 0.0f);
            std::fill(gn.begin(), gn.end(), 0.0f);
        }
        float gm = gmT != nullptr ? gmT[u] : 0.0f;
        for (int64_t span = S.spans() - 1; span >= 0; --span) {
            const int64_t t0 = span * R, t1 = t0 + R < T ? t0 + R : T;
            const float* slot = ckpt + (u * S.spans() + span) * S.slot();
            std::memcpy(C.data(), slot, sizeof(float) * KV);
            std::memcpy(n.data(), slot + KV, sizeof(float) * K);
            float m = slot[KV + K];
            for (int64_t t = t0; t < t1; ++t) {  // replay
                if (reset != nullptr && reset[b * T + t]) {
                    std::fill(C.begin(), C.end(), 0.0f);
                    std::fill(n.begin(), n.end(), 0.0f);
                    m = 0.0f;
                }
                const int64_t j = t - t0, x = at(S, b, t, hh);
                std::memcpy(&Cs[j * KV], C.data(), sizeof(float) * KV);
                std::memcpy(&ns[j * K], n.data(), sizeof(float) * K);
                steps[j] = step(C.data(), n.data(), m, q + x * K, k + x * K, v + x * V, ig[x], fg[x], s, eps, K, V,
                                &nums[j * V]);
            }
            for (int64_t t = t1 - 1; t >= t0; --t) {  // reverse
                const int64_t j = t - t0, x = at(S, b, t, hh);
                const Step& r = steps[j];
                const float* Cp = &Cs[j * KV];
                const float* np = &ns[j * K];
                const float* nm = &nums[j * V];
                const float* qt = q + x * K;
                const float* kt = k + x * K;
                const float* vt = v + x * V;
                const float* g = gh + x * V;
                // h = num / den
                const float inv_den = 1.0f / r.den;
                for (int64_t c = 0; c < V; ++c) gnum[c] = g[c] * inv_den;
                const float gh_num = undertow_native::dot(g, nm, V);
                const float gden = -gh_num / (r.den * r.den);
                const float absd = std::fabs(r.d), wd = win(absd, r.e);
                const float sign = r.d > 0.0f ? 1.0f : (r.d < 0.0f ? -1.0f : 0.0f);
                const float gd = gden * wd * sign;
                float gmt = gm - gden * (1.0f - wd) * r.e;  // den's exp(-m) branch
                const float v_gnum = undertow_native::dot(vt, gnum.data(), V);
                // through C = F Cp + I k v^T and num = C^T (s q); n = F np + I k and d = n . (s q)
                // the gradient to the state before the token: gC_t F, zero where a document starts
                // (the zero state was used), written over gC_t's row once its row is done with
                const bool cut = reset != nullptr && reset[b * T + t];
                const float carry = cut ? 0.0f : r.F;
                float gF = 0.0f, gI = 0.0f;
                vf pF = {};  // gC_t's rows . Cp's rows, summed over the rows: one horizontal sum per token
                float* gvt = gv + x * V;
                for (int64_t c = 0; c < V; ++c) gvt[c] = 0.0f;
                for (int64_t a = 0; a < K; ++a) {
                    const float qs = s * qt[a], ka = kt[a];
                    float* row = &gC[a * V];
                    const float* cp = Cp + a * V;
                    // gC_t's row and three dot products, VLANES channels at a time in vectors (a float
                    // sum in a plain loop would not vectorize); the per-row sums are summed across
                    // their lanes for all rows at once below (hsums), the third over all rows here
                    vf p1 = {}, p2 = {};
                    int64_t c = 0;
                    for (; c + VLANES <= V; c += VLANES) {
                        const vf gr = vload(row + c) + qs * vload(gnum.data() + c), cpv = vload(cp + c);
                        vstore(row + c, gr * carry);
                        p1 += cpv * vload(gnum.data() + c);
                        p2 += gr * vload(vt + c);
                        pF += gr * cpv;
                        vstore(gvt + c, vload(gvt + c) + ka * gr);
                    }
                    float t1 = 0.0f, t2 = 0.0f;
                    for (; c < V; ++c) {
                        const float gr = row[c] + qs * gnum[c];
                        row[c] = gr * carry;
                        t1 += cp[c] * gnum[c];
                        t2 += gr * vt[c];
                        gF += gr * cp[c];
                        gvt[c] += ka * gr;
                    }
                    P1[a] = p1;
                    P2[a] = p2;
                    tails[2 * a] = t1;
                    tails[2 * a + 1] = t2;
                }
                undertow_native::hsums(P1.data(), K, cpg.data());
                undertow_native::hsums(P2.data(), K, rv.data());
                for (int64_t a = 0; a < K; ++a) {
                    const float qs = s * qt[a], ka = kt[a];
                    const float cp_gnum = cpg[a] + tails[2 * a], row_v = rv[a] + tails[2 * a + 1];
                    const float gna = gn[a] + gd * qs;
                    gn[a] = gna * carry;
                    const float n_t = r.F * np[a] + r.I * ka;
                    // gqs = C_t gnum + gd n_t, C_t gnum = F (Cp gnum) + I k (v . gnum)
                    gqs[a] = r.F * cp_gnum + r.I * ka * v_gnum + gd * n_t;
                    gF += gna * np[a];
                    gI += ka * row_v + gna * ka;
                    gk[x * K + a] = r.I * (row_v + gna);
                }
                gF += hsum(pF);
                for (int64_t c = 0; c < V; ++c) gvt[c] *= r.I;
                for (int64_t a = 0; a < K; ++a) gq[x * K + a] = s * gqs[a];
                // F = exp(a - m), I = exp(i - m); m = max(a, i); a = logsigmoid(f) + m_prev
                const float ga_direct = gF * r.F, gi_direct = gI * r.I;
                gmt -= ga_direct + gi_direct;
                const float wa = win(r.a, ig[x]);
                const float ga = ga_direct + gmt * wa;
                gi[x] = gi_direct + gmt * (1.0f - wa);
                gf[x] = ga * sigmoid_neg(fg[x]);
                gm = cut ? 0.0f : ga;
            }
        }
        if (gC0 != nullptr) {
            std::memcpy(gC0 + u * KV, gC.data(), sizeof(float) * KV);
            std::memcpy(gn0 + u * K, gn.data(), sizeof(float) * K);
            gm0[u] = gm;
        }
    }
    }  // omp parallel
    return 0;
}

}  // extern "C"
