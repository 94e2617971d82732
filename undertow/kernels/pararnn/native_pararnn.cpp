// ParaRNN's Newton solver on CPU, forward, fused (built by undertow/kernels/native.py; driven by
// native.py beside this file; the backward is native_pararnn_bwd.cpp). Float32. Layouts
// (contiguous): u (B, T, 3, D), states (B, T, S, D) with S = 1 (GRU: h) or 2 (LSTM: c, h), init
// (B, S, D), keep (B, T) uint8 (0 where a document starts), a (3, D), p (2, D). The unit of work is
// one (row, block of BLOCK channels); units are independent (the cells are diagonal) and the
// caller splits them over threads.
//
// Why one pass: Newton step k at token t reads only step k-1's states at t-1 and t and its own
// update at t-1 (newton.py, eqs. N1-N2: delta_t = J_t delta_{t-1} + r_t). So all K steps advance
// together token by token — the guess, step 1, ..., step K and the final residual at token t — with
// the per-step states of the previous token in a small buffer. The iterates are the chunked form's
// (the same linear systems, solved in token order instead of by chunks); memory is read and written
// once instead of once per step.
//
// Speed (docs/benchmarks.md, ParaRNN): a GRU Newton step is ~75 arithmetic vector instructions per
// 16 channels (sigmoid and tanh from one exp each: degree-5 polynomial, AVX-512's scalef and its
// reciprocal estimate with one Newton-Raphson step), written on packs of 4 independent vectors,
// with the rows of the token 8 ahead prefetched.
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

// ---- The forward pass on vectors. `vf`: 16 floats (GCC/Clang vector extensions: AVX-512 instructions
// where the CPU has them, else the compiler's own width). `Pack`: a unit's 64 channels as 4 vectors,
// every operation written as 4 independent instructions in a row: a cell evaluation is one long
// dependency chain (~170 cycles), and the CPU's scheduler holds too few instructions to find 4
// chains on its own (measured: ~0.7 vector instructions a cycle with one vector at a time).
#pragma GCC diagnostic ignored "-Wpsabi"  // 64-byte vectors without AVX-512: all inlined, no ABI crosses
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int L = 16, NP = 4, BLOCK = L * NP, PREFETCH = 8;

#define UT_INLINE inline __attribute__((always_inline))
UT_INLINE vf splat(float x) { return vf{} + x; }
// a * b + c in one rounding where the CPU has it (-std=c++17 turns GCC's contraction off)
UT_INLINE vf fma1(vf a, vf b, vf c) {
#if defined(__AVX512F__)
    return _mm512_fmadd_ps(a, b, c);
#else
    return a * b + c;
#endif
}
// min(x, hi) and max(x, lo) that let a NaN in x through (the residual must say NaN)
UT_INLINE vf upto1(vf x, vf hi) {
#if defined(__AVX512F__)
    return _mm512_min_ps(hi, x);  // hi < x ? hi : x, x when either is NaN
#else
    return x > hi ? hi : x;
#endif
}
UT_INLINE vf atleast1(vf x, vf lo) {
#if defined(__AVX512F__)
    return _mm512_max_ps(lo, x);
#else
    return x < lo ? lo : x;
#endif
}
// max(w, |x|) for w >= 0; NaN once x is NaN, and then for good (the residual must say NaN)
UT_INLINE vf worst1(vf w, vf x) {
#if defined(__AVX512F__)
    const vf m = _mm512_abs_ps(x);
    const __mmask16 take = _mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(w, w, _CMP_ORD_Q), m, w, _CMP_NLE_UQ);
    return _mm512_mask_mov_ps(w, take, m);  // w not NaN and (m > w or m NaN)
#else
    const vf m = x < 0.0f ? -x : x;
    return (m > w) | (m != m) ? m : w;
#endif
}
UT_INLINE vf round1(vf x) {
#if defined(__AVX512F__)
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    return (x + 12582912.0f) - 12582912.0f;  // round to nearest (no -ffast-math)
#endif
}
// q 2^n for integral n
UT_INLINE vf scale1(vf q, vf n) {
#if defined(__AVX512F__)
    return _mm512_scalef_ps(q, n);
#else
    const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf s;
    std::memcpy(&s, &bits, sizeof(s));
    return q * s;
#endif
}
// 1 / x for x in [1, 1e38]: AVX-512's estimate (relative error < 2^-14) and one Newton-Raphson step
// y + y (1 - x y), which squares the error (< 4e-9 before rounding); a division elsewhere.
UT_INLINE vf recip1(vf x) {
#if defined(__AVX512F__)
    const vf y = _mm512_rcp14_ps(x);
    return fma1(y, _mm512_fnmadd_ps(x, y, splat(1.0f)), y);
#else
    return 1.0f / x;
#endif
}

struct Pack {
    vf v[NP];
};
#define UT_EACH(expr)                             \
    Pack r;                                       \
    for (int i = 0; i < NP; ++i) r.v[i] = (expr); \
    return r
UT_INLINE Pack operator+(Pack a, Pack b) { UT_EACH(a.v[i] + b.v[i]); }
UT_INLINE Pack operator-(Pack a, Pack b) { UT_EACH(a.v[i] - b.v[i]); }
UT_INLINE Pack operator*(Pack a, Pack b) { UT_EACH(a.v[i] * b.v[i]); }
UT_INLINE Pack operator+(Pack a, float b) { UT_EACH(a.v[i] + b); }
UT_INLINE Pack operator-(float a, Pack b) { UT_EACH(a - b.v[i]); }
UT_INLINE Pack operator*(Pack a, float b) { UT_EACH(a.v[i] * b); }
UT_INLINE Pack fma(Pack a, Pack b, Pack c) { UT_EACH(fma1(a.v[i], b.v[i], c.v[i])); }
UT_INLINE Pack fma(Pack a, float b, float c) { UT_EACH(fma1(a.v[i], splat(b), splat(c))); }
UT_INLINE Pack fma(Pack a, float b, Pack c) { UT_EACH(fma1(a.v[i], splat(b), c.v[i])); }
UT_INLINE Pack worst(Pack w, Pack x) { UT_EACH(worst1(w.v[i], x.v[i])); }
UT_INLINE Pack splat_pack(float x) { UT_EACH(splat(x)); }
UT_INLINE Pack load(const float* p) {
    Pack r;
    std::memcpy(&r, p, sizeof(r));
    return r;
}
UT_INLINE void store(float* p, const Pack& x) { std::memcpy(p, &x, sizeof(x)); }

// e^(-K x), K = 1 or 2 (sigmoid, tanh). -K x = n ln2 + r with |r| <= ln2 / 2, n = round(-K x log2 e),
// computed as t = x + n ln2 / K (ln2 in two parts, both exact when halved) with r = -K t folded
// into the polynomial's coefficients. e^r by a degree-5 polynomial fitted on Chebyshev nodes of
// [-ln2/2, ln2/2] (relative error 1.0e-7 in exact arithmetic), 2^n by AVX-512's scalef (else
// from the exponent bits). x clamped so that e^(-K x) stays in [e^-87, e^87] (normal floats; 1 +
// e^87 is inside `recip1`'s range).
template <int K>
UT_INLINE Pack exp_neg(Pack x) {
    constexpr float k = float(K), lim = 87.0f / float(K);
    Pack n, t, q;
    for (int i = 0; i < NP; ++i) x.v[i] = atleast1(upto1(x.v[i], splat(lim)), splat(-lim));
    for (int i = 0; i < NP; ++i) n.v[i] = round1(x.v[i] * (-k * 1.44269504f));
    t = fma(n, 0.693145752f / k, x);
    t = fma(n, 1.42860677e-6f / k, t);
    q = fma(t, 0.0082615310f * -k * k * k * k * k, 0.0418987320f * k * k * k * k);
    q = fma(q, t, splat_pack(0.1666811427f * -k * k * k));
    q = fma(q, t, splat_pack(0.4999914103f * k * k));
    q = fma(q, t, splat_pack(0.9999995317f * -k));
    q = fma(q, t, splat_pack(1.0f));
    for (int i = 0; i < NP; ++i) q.v[i] = scale1(q.v[i], n.v[i]);
    return q;
}

UT_INLINE Pack sigm(Pack x) {
    Pack e = exp_neg<1>(x);
    UT_EACH(recip1(e.v[i] + 1.0f));
}
UT_INLINE Pack tanh_p(Pack x) {
    Pack e = exp_neg<2>(x);
    UT_EACH(fma1(splat(2.0f), recip1(e.v[i] + 1.0f), splat(-1.0f)));
}

// The cells on packs: f(prev, u) (eqs. G1-G4 / L1-L5 of reference.py) and with JAC J = df/dprev
// (row-major S x S, as newton.py's step_and_jacobian); `guess` is f(0, u) (eq. N0), whose zero
// state drops terms.
struct GruV {
    static constexpr int S = 1;
    template <bool JAC>
    static UT_INLINE void eval(const Pack* prev, const Pack* u, const Pack* a, const Pack*, Pack* next, Pack* J) {
        const Pack h = prev[0];
        const Pack z = sigm(fma(a[0], h, u[0])), r = sigm(fma(a[1], h, u[1]));
        const Pack ht = tanh_p(fma(a[2], r * h, u[2]));
        const Pack d = ht - h;
        next[0] = fma(z, d, h);
        if constexpr (JAC) {
            const Pack omz = 1.0f - z;
            const Pack dz = z * omz * a[0], dr = r * (1.0f - r) * a[1];
            const Pack dht = (1.0f - ht * ht) * a[2] * fma(h, dr, r);
            J[0] = fma(dz, d, fma(z, dht, omz));
        }
    }
    static UT_INLINE void guess(const Pack* u, const Pack*, const Pack*, Pack* next) {
        next[0] = sigm(u[0]) * tanh_p(u[2]);
    }
};

struct LstmV {
    static constexpr int S = 2;
    template <bool JAC>
    static UT_INLINE void eval(const Pack* prev, const Pack* u, const Pack* a, const Pack* p, Pack* next, Pack* J) {
        const Pack c = prev[0], h = prev[1];
        const Pack f = sigm(fma(a[0], h, fma(p[0], c, u[0])));
        const Pack ct = tanh_p(fma(a[1], h, u[1]));
        const Pack cn = fma(f, c - ct, ct);
        const Pack o = sigm(fma(a[2], h, fma(p[1], cn, u[2])));
        const Pack tc = tanh_p(cn);
        next[0] = cn;
        next[1] = o * tc;
        if constexpr (JAC) {
            const Pack df = f * (1.0f - f), dct = (c - ct) * df;
            const Pack jcc = fma(dct, p[0], f);
            const Pack jch = fma(dct, a[0], (1.0f - f) * (1.0f - ct * ct) * a[1]);
            const Pack dout = o * (1.0f - o);
            const Pack dtc = dout * tc;
            const Pack via = fma(dtc, p[1], o * (1.0f - tc * tc));
            J[0] = jcc;
            J[1] = jch;
            J[2] = via * jcc;
            J[3] = fma(dtc, a[2], via * jch);
        }
    }
    static UT_INLINE void guess(const Pack* u, const Pack*, const Pack* p, Pack* next) {
        const Pack cn = (1.0f - sigm(u[0])) * tanh_p(u[1]);
        next[0] = cn;
        next[1] = sigm(fma(p[1], cn, u[2])) * tanh_p(cn);
    }
};

struct Unit {
    int64_t T, D, d0, d1;
};

// `rows` rows of W <= BLOCK floats (row stride `stride`) into zero-padded packs
inline void pad_rows(const float* src, int64_t stride, int rows, int64_t W, Pack* dst) {
    for (int r = 0; r < rows; ++r) {
        std::memset(&dst[r], 0, sizeof(Pack));
        std::memcpy(&dst[r], src + r * stride, W * sizeof(float));
    }
}

// The guess (or iterate 0 read from `states`), K Newton steps and the final residual for one unit of
// BLOCK channels or fewer (pointers offset to its row and first channel), all of them at token t
// before token t + 1. The K + 1 cell evaluations at a token read only the iterates at t - 1, so they
// are independent of one another; only the cheap update (N1-N2) chains them. Writes the last
// iterate into `states` and max |F| at iterate k into res[k], k = 0..K (NaN where any residual is NaN).
template <class Cell>
void forward_unit(const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                  float* states, int K, bool from_guess, const Unit& s, float* res) {
    constexpr int S = Cell::S;
    const int64_t W = s.d1 - s.d0, D = s.D;
    const bool ragged = W != BLOCK;  // a partial unit: its tokens go through zero-padded copies
    // old (k, r) = iterate k at t-1, dl (k, r) = step k's update at t-1 (k >= 1), worst k = the largest
    // |F| of iterate k so far (per channel); then a, p and the padded rows of a token
    std::vector<Pack> buf((2 * S + 1) * (K + 1) + 5 + 3 + S);
    std::memset(buf.data(), 0, buf.size() * sizeof(Pack));
    Pack *old = buf.data(), *dl = old + (K + 1) * S, *wst = dl + (K + 1) * S;
    Pack *av = wst + (K + 1), *pv = av + 3, *upad = pv + 2, *spad = upad + 3;
    pad_rows(a, D, 3, W, av);
    pad_rows(p, D, 2, W, pv);
    pad_rows(init, D, S, W, old);
    for (int k = 1; k <= K; ++k) std::memcpy(old + k * S, old, S * sizeof(Pack));
    for (int64_t t = 0; t < s.T; ++t) {
        if (t > 0 && !keep[t])  // a document starts: the state before it is zero (old and dl, adjacent)
            std::memset(old, 0, 2 * (K + 1) * S * sizeof(Pack));
        const float* ut = u + t * 3 * D;
        float* st = states + t * S * D;
        Pack ut3[3], cur[S];
        if (t + PREFETCH < s.T) {  // tokens are 12 D bytes apart (6 KB at D = 512): the hardware prefetcher misses them
            const float* un = ut + PREFETCH * 3 * D;
            float* sn = st + PREFETCH * S * D;
            for (int g = 0; g < 3; ++g)
                for (int64_t j = 0; j < W; j += L) __builtin_prefetch(un + g * D + j);
            for (int r = 0; r < S; ++r)
                for (int64_t j = 0; j < W; j += L) __builtin_prefetch(sn + r * D + j, 1);
        }
        if (ragged) {
            pad_rows(ut, D, 3, W, upad);
            for (int g = 0; g < 3; ++g) ut3[g] = upad[g];
        } else {
            for (int g = 0; g < 3; ++g) ut3[g] = load(ut + g * D);
        }
        if (from_guess) {
            Cell::guess(ut3, av, pv, cur);
        } else if (ragged) {
            pad_rows(st, D, S, W, spad);
            for (int r = 0; r < S; ++r) cur[r] = spad[r];
        } else {
            for (int r = 0; r < S; ++r) cur[r] = load(st + r * D);
        }
        for (int k = 0; k <= K; ++k) {
            Pack prev[S], next[S], J[S * S], resid[S];
            for (int r = 0; r < S; ++r) prev[r] = old[k * S + r];
            if (k < K)
                Cell::template eval<true>(prev, ut3, av, pv, next, J);
            else
                Cell::template eval<false>(prev, ut3, av, pv, next, J);
            for (int r = 0; r < S; ++r) {
                resid[r] = next[r] - cur[r];
                wst[k] = worst(wst[k], resid[r]);
                old[k * S + r] = cur[r];
            }
            if (k == K) break;
            Pack dprev[S];
            for (int r = 0; r < S; ++r) dprev[r] = dl[(k + 1) * S + r];
            for (int r = 0; r < S; ++r) {
                Pack delta = resid[r];
                for (int q = 0; q < S; ++q) delta = fma(J[r * S + q], dprev[q], delta);
                dl[(k + 1) * S + r] = delta;
                cur[r] = cur[r] + delta;
            }
        }
        for (int r = 0; r < S; ++r) {
            if (ragged)
                std::memcpy(st + r * D, &cur[r], W * sizeof(float));
            else
                store(st + r * D, cur[r]);
        }
    }
    for (int k = 0; k <= K; ++k) {
        const float* wk = reinterpret_cast<const float*>(&wst[k]);
        float m = 0.0f;
        for (int64_t j = 0; j < W; ++j) m = (wk[j] > m || wk[j] != wk[j]) ? wk[j] : m;  // NaN wins
        res[k] = m;
    }
}

// One Newton step on a context-parallel slice (context.py, C1) for one unit: at every token the cell
// and its Jacobian at the previous iterate, r_t = f - s_t, the slice's own update from a zero carry
// x~_t = r_t + J_t x~_{t-1} (`states` becomes s + x~) and the cumulative transitions P_t = J_t ...
// J_0 (`trans`, rows (t, i, j)). keep[0] counts here (a document may start at the slice's first
// token, where init is the state after the rank before). x~ at the last token into xlast (S rows),
// max |r| into res[0] (NaN where any r is NaN).
template <class Cell>
void cp_step_unit(const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                  float* states, float* trans, float* xlast, const Unit& s, float* res) {
    constexpr int S = Cell::S;
    const int64_t W = s.d1 - s.d0, D = s.D;
    const bool ragged = W != BLOCK;
    // old = iterate at t-1, x = x~_{t-1}, P = P_{t-1}, worst, a, p, padded token rows
    std::vector<Pack> buf(S + S + S * S + 1 + 5 + 3 + S);
    std::memset(buf.data(), 0, buf.size() * sizeof(Pack));
    Pack *old = buf.data(), *x = old + S, *P = x + S, *wst = P + S * S, *av = wst + 1, *pv = av + 3;
    Pack *upad = pv + 2, *spad = upad + 3;
    pad_rows(a, D, 3, W, av);
    pad_rows(p, D, 2, W, pv);
    pad_rows(init, D, S, W, old);
    auto put = [&](float* dst, const Pack& v) {
        if (ragged)
            std::memcpy(dst, &v, W * sizeof(float));
        else
            store(dst, v);
    };
    for (int64_t t = 0; t < s.T; ++t) {
        const bool kp = keep[t] != 0;
        const float* ut = u + t * 3 * D;
        float* st = states + t * S * D;
        Pack ut3[3], cur[S], prev[S], next[S], J[S * S], xn[S], Pn[S * S];
        if (ragged) {
            pad_rows(ut, D, 3, W, upad);
            pad_rows(st, D, S, W, spad);
            for (int g = 0; g < 3; ++g) ut3[g] = upad[g];
            for (int r = 0; r < S; ++r) cur[r] = spad[r];
        } else {
            for (int g = 0; g < 3; ++g) ut3[g] = load(ut + g * D);
            for (int r = 0; r < S; ++r) cur[r] = load(st + r * D);
        }
        for (int r = 0; r < S; ++r) prev[r] = kp ? old[r] : splat_pack(0.0f);
        Cell::template eval<true>(prev, ut3, av, pv, next, J);
        if (!kp)  // the state before a document start is the constant zero
            for (int q = 0; q < S * S; ++q) J[q] = splat_pack(0.0f);
        for (int r = 0; r < S; ++r) {
            const Pack resid = next[r] - cur[r];
            wst[0] = worst(wst[0], resid);
            xn[r] = resid;
            for (int q = 0; q < S; ++q) xn[r] = fma(J[r * S + q], x[q], xn[r]);
            for (int c = 0; c < S; ++c) {
                Pn[r * S + c] = t == 0 ? J[r * S + c] : J[r * S] * P[c];
                for (int q = 1; q < S && t > 0; ++q) Pn[r * S + c] = fma(J[r * S + q], P[q * S + c], Pn[r * S + c]);
            }
        }
        for (int r = 0; r < S; ++r) {
            old[r] = cur[r], x[r] = xn[r];
            put(st + r * D, cur[r] + xn[r]);
        }
        for (int q = 0; q < S * S; ++q) {
            P[q] = Pn[q];
            put(trans + (t * S * S + q) * D, Pn[q]);
        }
    }
    for (int r = 0; r < S; ++r) put(xlast + r * D, x[r]);
    const float* wk = reinterpret_cast<const float*>(wst);
    float m = 0.0f;
    for (int64_t j = 0; j < W; ++j) m = (wk[j] > m || wk[j] != wk[j]) ? wk[j] : m;  // NaN wins
    res[0] = m;
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
    if (block != BLOCK) return 1;  // the forward's packs hold exactly BLOCK channels
    const int S = lstm ? 2 : 1;
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b;
        Unit s;
        locate(unit, D, block, b, s, T);
        const float* ub = u + b * T * 3 * D + s.d0;
        const float* ib = init + b * S * D + s.d0;
        float* sb = states + b * T * S * D + s.d0;
        if (lstm)
            forward_unit<LstmV>(ub, a + s.d0, p + s.d0, ib, keep + b * T, sb, int(K), from_guess != 0, s,
                               res + unit * (K + 1));
        else
            forward_unit<GruV>(ub, a + s.d0, p + s.d0, ib, keep + b * T, sb, int(K), from_guess != 0, s,
                              res + unit * (K + 1));
    }
    return 0;
}
// Units [begin, end) of cp_step_unit: trans (B, T, S, S, D), xlast (B, S, D), res (units,); init (B, S, D)
// the state before each row's first token, p as pararnn_fwd.
int pararnn_cp_step(int lstm, const float* u, const float* a, const float* p, const float* init, const uint8_t* keep,
                    float* states, float* trans, float* xlast, float* res, int64_t B, int64_t T, int64_t D,
                    int64_t block, int64_t begin, int64_t end) {
    if (block != BLOCK) return 1;
    const int S = lstm ? 2 : 1;
    for (int64_t unit = begin; unit < end; ++unit) {
        int64_t b;
        Unit s;
        locate(unit, D, block, b, s, T);
        const float* ub = u + b * T * 3 * D + s.d0;
        const float* ib = init + b * S * D + s.d0;
        float* sb = states + b * T * S * D + s.d0;
        float* pb = trans + b * T * S * S * D + s.d0;
        float* xb = xlast + b * S * D + s.d0;
        if (lstm)
            cp_step_unit<LstmV>(ub, a + s.d0, p + s.d0, ib, keep + b * T, sb, pb, xb, s, res + unit);
        else
            cp_step_unit<GruV>(ub, a + s.d0, p + s.d0, ib, keep + b * T, sb, pb, xb, s, res + unit);
    }
    return 0;
}
}  // extern "C"
