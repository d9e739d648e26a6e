/* SwiGLU on the fused gate/up rows for training (included by native_decode.c once per storage type, like
 * native_kernels.h): h (N, 2F) holds gate h[:, :F] and up h[:, F:], or (interleaved, gpt-oss's layout) gate
 * h[:, 0::2] and up h[:, 1::2].
 *
 *   forward:  out = silu(gate) * up                                       one pass over h; nothing else is saved
 *   backward: d_up = grad * silu(gate), d_gate = grad * up * s * (1 + gate * (1 - s)),  s = sigmoid(gate)
 *             recomputed from h, written into one (N, 2F) buffer in h's layout
 *
 * clamped (gpt-oss): g = min(gate, limit), u = clamp(up, -limit, limit), out = (u + 1) * g * sigmoid(alpha g);
 * the gradient of a clamp passes where its input lies within the bounds, ends included (as torch's clamp).
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

#if defined(__AVX2__) && defined(__FMA__)
/* gate and up of columns f..f+7 of one row */
static inline void FN(load_gu8)(const WT *row, i64 f, i64 F, int interleaved, __m256 *g, __m256 *u) {
    if (!interleaved) {
        *g = VLD(row + f), *u = VLD(row + F + f);
        return;
    }
    const __m256 a = VLD(row + 2 * f), b = VLD(row + 2 * f + 8); /* g0 u0 g1 u1 ... g7 u7 */
    *g = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    *u = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}
#endif

int FN(moekit_swiglu)(const WT *h, i64 ldh, i64 N, i64 F, WT *out, i64 ldo, int interleaved, int clamped,
                      float alpha, float limit, int threads) {
    const i64 gs = interleaved ? 2 : 1, uo = interleaved ? 1 : F; /* gate of column f at f*gs, up at f*gs + uo */
    const float off = clamped ? 1.0f : 0.0f, al = clamped ? alpha : 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const WT *row = h + n * ldh;
        WT *o = out + n * ldo;
        i64 f = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 lim = _mm256_set1_ps(limit), nlim = _mm256_set1_ps(-limit), av = _mm256_set1_ps(al),
                     ov = _mm256_set1_ps(off);
        for (; f + 8 <= F; f += 8) {
            __m256 gv, uv;
            FN(load_gu8)(row, f, F, interleaved, &gv, &uv);
            if (clamped) gv = _mm256_min_ps(gv, lim), uv = _mm256_max_ps(_mm256_min_ps(uv, lim), nlim);
            float v[8];
            const __m256 act = _mm256_mul_ps(gv, sigmoid8(_mm256_mul_ps(gv, av)));
            _mm256_storeu_ps(v, _mm256_mul_ps(act, _mm256_add_ps(uv, ov)));
            FN(store8)(o + f, v);
        }
#endif
        for (; f < F; f++) {
            float gf = LD(row + f * gs), uf = LD(row + f * gs + uo);
            if (clamped) gf = gf < limit ? gf : limit, uf = uf < -limit ? -limit : (uf > limit ? limit : uf);
            ST(o + f, gf / (1.0f + expf(-al * gf)) * (uf + off));
        }
    }
    return 0;
}

int FN(moekit_swiglu_backward)(const WT *grad, i64 ldg, const WT *h, i64 ldh, i64 N, i64 F, WT *gh, i64 ldgh,
                               int interleaved, int clamped, float alpha, float limit, int threads) {
    const i64 gs = interleaved ? 2 : 1, uo = interleaved ? 1 : F;
    const float off = clamped ? 1.0f : 0.0f, al = clamped ? alpha : 1.0f;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const WT *gr = grad + n * ldg, *row = h + n * ldh;
        WT *grow = gh + n * ldgh;
        i64 f = 0;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f), lim = _mm256_set1_ps(limit),
                     nlim = _mm256_set1_ps(-limit), av = _mm256_set1_ps(al), ov = _mm256_set1_ps(off);
        for (; f + 8 <= F; f += 8) {
            __m256 gv, uv;
            FN(load_gu8)(row, f, F, interleaved, &gv, &uv);
            const __m256 rv = VLD(gr + f);
            __m256 gpass = one, upass = one; /* where each clamp passes the gradient */
            if (clamped) {
                gpass = _mm256_and_ps(_mm256_cmp_ps(gv, lim, _CMP_LE_OQ), one);
                upass = _mm256_and_ps(_mm256_and_ps(_mm256_cmp_ps(uv, lim, _CMP_LE_OQ),
                                                    _mm256_cmp_ps(uv, nlim, _CMP_GE_OQ)), one);
                gv = _mm256_min_ps(gv, lim), uv = _mm256_max_ps(_mm256_min_ps(uv, lim), nlim);
            }
            const __m256 ag = _mm256_mul_ps(gv, av), s = sigmoid8(ag);
            /* d_up = grad * g s; d_gate = grad * (u + off) * s * (1 + alpha g (1 - s)) */
            __m256 du = _mm256_mul_ps(_mm256_mul_ps(rv, _mm256_mul_ps(gv, s)), upass);
            const __m256 ds = _mm256_mul_ps(s, _mm256_fmadd_ps(ag, _mm256_sub_ps(one, s), one));
            __m256 dg = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(rv, _mm256_add_ps(uv, ov)), ds), gpass);
            float a[8], b[8];
            if (!interleaved) {
                _mm256_storeu_ps(a, du), _mm256_storeu_ps(b, dg);
                FN(store8)(grow + F + f, a);
                FN(store8)(grow + f, b);
            } else { /* back to g0 u0 g1 u1 ... */
                const __m256 lo = _mm256_unpacklo_ps(dg, du), hi = _mm256_unpackhi_ps(dg, du);
                _mm256_storeu_ps(a, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(b, _mm256_permute2f128_ps(lo, hi, 0x31));
                FN(store8)(grow + 2 * f, a);
                FN(store8)(grow + 2 * f + 8, b);
            }
        }
#endif
        for (; f < F; f++) {
            float gf = LD(row + f * gs), uf = LD(row + f * gs + uo), rf = LD(gr + f), gp = 1.0f, up = 1.0f;
            if (clamped) {
                gp = gf <= limit ? 1.0f : 0.0f, up = (uf <= limit && uf >= -limit) ? 1.0f : 0.0f;
                gf = gf < limit ? gf : limit, uf = uf < -limit ? -limit : (uf > limit ? limit : uf);
            }
            const float s = 1.0f / (1.0f + expf(-al * gf));
            ST(grow + f * gs + uo, rf * gf * s * up);
            ST(grow + f * gs, rf * (uf + off) * s * (1.0f + al * gf * (1.0f - s)) * gp);
        }
    }
    return 0;
}

#undef FN
#undef CAT
#undef CAT_
