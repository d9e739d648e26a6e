/* SwiGLU on the fused gate/up rows for training (included by native_decode.c once per storage type, like
 * native_kernels.h): h (N, 2F) holds gate h[:, :F] and up h[:, F:].
 *
 *   forward:  out = silu(gate) * up                                       one pass over h; nothing else is saved
 *   backward: d_up = grad * silu(gate), d_gate = grad * up * s * (1 + gate * (1 - s)),  s = sigmoid(gate)
 *             recomputed from h, written into the two halves of one (N, 2F) buffer
 *
 * torch's form of the same step (moekit.experts.glu_fn) makes two passes forward (silu, product) and saves silu's
 * output, and three backward plus a strided copy. exp is an 8-wide polynomial (a few ulp from expf) where the build
 * has AVX2 and FMA, expf elsewhere and in the row tails. */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(CAT(name, _), SUF)

#ifndef MOEKIT_EXP8
#define MOEKIT_EXP8
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) { /* e^x: x = n ln2 + r, |r| <= ln2/2, e^r by a degree-6 polynomial */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static inline __m256 sigmoid8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}
#endif
#endif

static inline void FN(store8)(WT *p, const float *v) {
    for (int i = 0; i < 8; i++) ST(p + i, v[i]);
}

int FN(moekit_swiglu)(const WT *h, i64 ldh, i64 N, i64 F, WT *out, i64 ldo, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const WT *g = h + n * ldh, *u = g + F;
        WT *o = out + n * ldo;
        i64 f = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; f + 8 <= F; f += 8) {
            const __m256 gv = VLD(g + f);
            float v[8];
            _mm256_storeu_ps(v, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid8(gv)), VLD(u + f)));
            FN(store8)(o + f, v);
        }
#endif
        for (; f < F; f++) {
            const float gf = LD(g + f);
            ST(o + f, gf / (1.0f + expf(-gf)) * LD(u + f));
        }
    }
    return 0;
}

int FN(moekit_swiglu_backward)(const WT *grad, i64 ldg, const WT *h, i64 ldh, i64 N, i64 F, WT *gh, i64 ldgh,
                               int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const WT *gr = grad + n * ldg, *g = h + n * ldh, *u = g + F;
        WT *dg = gh + n * ldgh, *du = dg + F;
        i64 f = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; f + 8 <= F; f += 8) {
            const __m256 gv = VLD(g + f), uv = VLD(u + f), rv = VLD(gr + f), s = sigmoid8(gv);
            float a[8], b[8];
            _mm256_storeu_ps(a, _mm256_mul_ps(rv, _mm256_mul_ps(gv, s)));
            /* d_gate = grad * up * s * (1 + gate * (1 - s)) */
            const __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(gv, _mm256_sub_ps(one, s), one));
            _mm256_storeu_ps(b, _mm256_mul_ps(_mm256_mul_ps(rv, uv), ds));
            FN(store8)(du + f, a);
            FN(store8)(dg + f, b);
        }
#endif
        for (; f < F; f++) {
            const float gf = LD(g + f), uf = LD(u + f), rf = LD(gr + f), s = 1.0f / (1.0f + expf(-gf));
            ST(du + f, rf * gf * s);
            ST(dg + f, rf * uf * s * (1.0f + gf * (1.0f - s)));
        }
    }
    return 0;
}

#undef FN
#undef CAT
#undef CAT_
