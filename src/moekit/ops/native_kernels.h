/* The kernels of native_decode.c for one storage type, included once per type with
 *   WT      the storage type of x, y, weights and biases (float, or uint16_t for bfloat16)
 *   SUF     the name suffix of this instance (f32, bf16)
 *   LD(p)   *p as a float
 *   ST(p,v) store the float v at p (rounding to nearest even for bfloat16)
 * Arithmetic and every work buffer are float32; only loads and stores see WT. */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(CAT(name, _), SUF)

static inline float FN(bias_at)(const WT *b, i64 o) { return b ? LD(b + o) : 0.0f; }

#ifdef VLD
/* The vector form of FN(dot_rows): AVX-512 (VLD16: 16 WT at p as float; 32 registers, so four vectors a step for
 * one weight row, two for a pair, at every R) where the build has it, else AVX2 (8 columns a vector, U vectors a
 * step as the caller asks). */
#ifdef VLD16
#define DR_VEC __m512
#define DR_W 16
#define DR_U(NW, U) ((NW) == 1 ? 4 : 2)
#define DR_LDW VLD16
#define DR_LDX _mm512_loadu_ps
#define DR_FMA _mm512_fmadd_ps
#define DR_ADD _mm512_add_ps
#define DR_ZERO _mm512_setzero_ps
#define DR_HSUM _mm512_reduce_add_ps
#else
#define DR_VEC __m256
#define DR_W 8
#define DR_U(NW, U) (U)
#define DR_LDW VLD
#define DR_LDX _mm256_loadu_ps
#define DR_FMA _mm256_fmadd_ps
#define DR_ADD _mm256_add_ps
#define DR_ZERO _mm256_setzero_ps
#define DR_HSUM hsum8
#endif
/* v stays in a register: without it GCC folds the load into every FMA that uses v, reloading each weight vector
 * once per input row and each input vector once per weight row (2 loads an FMA, as with one row) */
#define KEEP(v) ({ __asm__("" : "+v"(v)); })
/* NW (1 or 2, a constant after inlining) adjacent weight rows (ldw apart) dotted with R (1..4) input rows, U
 * vectors a step (NW * R * U <= 16, with the weight vectors): s[w * 4 + r] = W[w] . x[r]. NW * R * U independent
 * sums hide the FMA latency; each weight vector is loaded once for the R rows and each input vector once for the
 * NW weight rows. A step loads NW + R vectors for NW * R FMAs: with one weight row at 3-4 input rows the loads, not
 * the memory, bound a Zen 4 core (1.3-1.4x a cold read), and a pair brings that to 1.05-1.2x (2026-12-07, in one
 * process after a cache sweep). pf (elements, 0 for none): the pair's rows pf ahead are prefetched into L2. A pair
 * is two streams a page apart, each one page long at D = 1024 float32, and the hardware prefetcher, which starts
 * again on every page, leaves a core at ~10 GB/s on a VM whose memory latency is high: prefetching the rows four
 * ahead took 2-4 rows per expert from 1.7-2.4x to 1.2-1.5x a cold read, and decode-8 from 1.53x to 1.26x the
 * memory floor (2026-12-07, one-process A/B; a prefetch within the row, 256 elements ahead into L1, had gained ~4%
 * on a faster host). */
static inline __attribute__((always_inline)) void FN(dot_rows)(const WT *w0, i64 ldw, int NW,
                                                               const float *const *xs, i64 D, int R, int U,
                                                               i64 pf, float *s) {
    const int UU = DR_U(NW, U);
    const WT *w1 = w0 + ldw;
    DR_VEC acc[2][4][4];
#pragma GCC unroll 2
    for (int w = 0; w < NW; w++)
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int u = 0; u < UU; u++) acc[w][r][u] = DR_ZERO();
    const float *x0 = xs[0], *x1 = xs[1], *x2 = xs[2], *x3 = xs[3];
    const i64 step = DR_W * UU, Dv = D - D % step;
    for (i64 d = 0; d < Dv; d += step) {
#pragma GCC unroll 4
        for (int u = 0; u < UU; u++) {
            const i64 c = d + DR_W * u;
            if (NW > 1 && u == 0 && pf) {
                _mm_prefetch((const char *)(w0 + c + pf), _MM_HINT_T1);
                _mm_prefetch((const char *)(w1 + c + pf), _MM_HINT_T1);
            }
            DR_VEC p = DR_LDW(w0 + c), q = NW > 1 ? DR_LDW(w1 + c) : p;
            KEEP(p), KEEP(q);
            DR_VEC v = DR_LDX(x0 + c);
            KEEP(v);
            acc[0][0][u] = DR_FMA(p, v, acc[0][0][u]);
            if (NW > 1) acc[1][0][u] = DR_FMA(q, v, acc[1][0][u]);
            if (R > 1) {
                v = DR_LDX(x1 + c), KEEP(v), acc[0][1][u] = DR_FMA(p, v, acc[0][1][u]);
                if (NW > 1) acc[1][1][u] = DR_FMA(q, v, acc[1][1][u]);
            }
            if (R > 2) {
                v = DR_LDX(x2 + c), KEEP(v), acc[0][2][u] = DR_FMA(p, v, acc[0][2][u]);
                if (NW > 1) acc[1][2][u] = DR_FMA(q, v, acc[1][2][u]);
            }
            if (R > 3) {
                v = DR_LDX(x3 + c), KEEP(v), acc[0][3][u] = DR_FMA(p, v, acc[0][3][u]);
                if (NW > 1) acc[1][3][u] = DR_FMA(q, v, acc[1][3][u]);
            }
        }
    }
#pragma GCC unroll 2
    for (int w = 0; w < NW; w++) {
        const WT *wr = w ? w1 : w0;
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            DR_VEC t = acc[w][r][0];
#pragma GCC unroll 4
            for (int u = 1; u < UU; u++) t = DR_ADD(t, acc[w][r][u]);
            float v = DR_HSUM(t);
            for (i64 d = Dv; d < D; d++) v += LD(wr + d) * xs[r][d];
            s[w * 4 + r] = v;
        }
    }
}
#undef DR_VEC
#undef DR_W
#undef DR_U
#undef DR_LDW
#undef DR_LDX
#undef DR_FMA
#undef DR_ADD
#undef DR_ZERO
#undef DR_HSUM
#undef KEEP

/* U (vectors a step, AVX2) for R input rows and NW weight rows: NW * R * U independent sums */
#define FEW_U(R, NW) \
    ((R) == 1 ? 4 : (R) == 2 ? ((NW) == 1 ? 4 : 2) : (R) == 3 ? ((NW) == 1 ? 4 : 1) : ((NW) == 1 ? 2 : 1))

#ifdef VLD16
/* 16 weight rows from o (NW at a time) for one chunk of R <= 4 input rows xs: each row's dot products go into lane j
 * of a register (one per input row), written with one 16-wide store per input row at the end. A scalar store after
 * every weight row stalls the next row's loads: its address matches one of them in the low 12 bits (a 4 KiB row
 * covers every offset), which the core takes for a dependence until the store's data is ready, at the end of the
 * reduction (measured in C on the development VM: 5-12% of a cold one-row pass).
 * pf: the pair's rows 4 on are prefetched while j + 6 <= pf_rows. */
static inline __attribute__((always_inline)) void FN(group16)(const float *const *xs, int R, int NW, const WT *w,
                                                              i64 ldw, i64 D, i64 pf_rows, const WT *b, i64 o,
                                                              float *y, i64 ldy, const i64 *out) {
    __m512 r0 = _mm512_setzero_ps(), r1 = r0, r2 = r0, r3 = r0;
    for (int j = 0; j < 16; j += NW) {
        float s[8];
        FN(dot_rows)(w + j * ldw, ldw, NW, xs, D, R, FEW_U(R, NW), NW > 1 && j + 6 <= pf_rows ? 4 * ldw : 0, s);
#pragma GCC unroll 2
        for (int q = 0; q < NW; q++) {
            const __mmask16 lane = (__mmask16)(1u << (j + q));
            r0 = _mm512_mask_broadcastss_ps(r0, lane, _mm_set_ss(s[q * 4]));
            if (R > 1) r1 = _mm512_mask_broadcastss_ps(r1, lane, _mm_set_ss(s[q * 4 + 1]));
            if (R > 2) r2 = _mm512_mask_broadcastss_ps(r2, lane, _mm_set_ss(s[q * 4 + 2]));
            if (R > 3) r3 = _mm512_mask_broadcastss_ps(r3, lane, _mm_set_ss(s[q * 4 + 3]));
        }
    }
    const __m512 bv = b ? VLD16(b + o) : _mm512_setzero_ps();
    _mm512_storeu_ps(y + out[0] * ldy + o, _mm512_add_ps(r0, bv));
    if (R > 1) _mm512_storeu_ps(y + out[1] * ldy + o, _mm512_add_ps(r1, bv));
    if (R > 2) _mm512_storeu_ps(y + out[2] * ldy + o, _mm512_add_ps(r2, bv));
    if (R > 3) _mm512_storeu_ps(y + out[3] * ldy + o, _mm512_add_ps(r3, bv));
}

/* R (1 to 4) input rows xs against 16 weight rows in each of four streams q rows apart (rows o + s * q + [0, 16) of
 * the weight, s < 4, from wr = its row o): each stream's results go into lane j of a register per input row, stored
 * with one 16-wide write per stream and input row. A core keeps four sequential streams in flight where one row at a
 * time (or an adjacent pair) is one or two page-long ones: the hardware prefetcher runs each stream's pages in turn.
 * With pf (elements, 0 for none) each stream's lines pf ahead are prefetched into L2, the lines STREAM_PF_MASK picks
 * (native_decode.c). On the AMD (Zen 4) VM, one line in four 4 KiB ahead (measured in C, two threads, after a cache
 * sweep: one input row 22.7 -> 29.0 GB/s at 4 KiB rows, 25.9 -> 29.3 at 11 KiB rows, four streams without the
 * prefetch 26.7, two streams 27.3; two input rows 34.6 -> 40.7 against adjacent pairs that prefetch four rows on,
 * four rows 27.5 -> 35.4). On the Intel Xeon VM, every line 2 KiB ahead (moe_decode in one process, huge pages,
 * against one line in four 4 KiB ahead: 0.84-0.90x the time at 1 to 16 float32 tokens, 0.80-0.90x bfloat16; 3 KiB
 * the same, 4 and 6 KiB 0.88-0.95x, one or two streams 0.92-0.96x). U vectors a step per stream: 2 for one input
 * row, 1 for more (at four rows the 16 result registers, written once per weight row, do not all stay in
 * registers: still 0.74-0.79x the previous kernel's time at 4 rows). */
static inline __attribute__((always_inline)) void FN(streams16)(const float *const *xs, int R, const WT *wr, i64 ldw,
                                                                i64 D, i64 q, i64 pf, const WT *b, i64 o, float *y,
                                                                i64 ldy, const i64 *out) {
    const int U = R == 1 ? 2 : 1;
    const i64 step = 16 * U, Dv = D - D % step;
    const WT *ws[4] = {wr, wr + q * ldw, wr + 2 * q * ldw, wr + 3 * q * ldw};
    __m512 r[4][4];
#pragma GCC unroll 4
    for (int s = 0; s < 4; s++) r[s][0] = r[s][1] = r[s][2] = r[s][3] = _mm512_setzero_ps();
    for (int j = 0; j < 16; j++) {
        __m512 a[4][4][2];
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++)
#pragma GCC unroll 4
            for (int m = 0; m < 4; m++) a[s][m][0] = a[s][m][1] = _mm512_setzero_ps();
        for (i64 d = 0; d < Dv; d += step) {
            __m512 x[4][2];
#pragma GCC unroll 4
            for (int m = 0; m < R; m++)
#pragma GCC unroll 2
                for (int u = 0; u < U; u++) {
                    x[m][u] = _mm512_loadu_ps(xs[m] + d + 16 * u);
                    __asm__("" : "+v"(x[m][u]));
                }
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                const WT *p = ws[s] + j * ldw + d;
#pragma GCC unroll 2
                for (int u = 0; u < U; u++) {
                    if (pf && !((d + 16 * u) * (i64)sizeof(WT) & STREAM_PF_MASK))
                        _mm_prefetch((const char *)(p + 16 * u + pf), _MM_HINT_T1);
                    __m512 v = VLD16(p + 16 * u);
                    __asm__("" : "+v"(v));
#pragma GCC unroll 4
                    for (int m = 0; m < R; m++) a[s][m][u] = _mm512_fmadd_ps(v, x[m][u], a[s][m][u]);
                }
            }
        }
        const __mmask16 lane = (__mmask16)(1u << j);
#pragma GCC unroll 4
        for (int s = 0; s < 4; s++)
#pragma GCC unroll 4
            for (int m = 0; m < R; m++) {
                float v = _mm512_reduce_add_ps(U > 1 ? _mm512_add_ps(a[s][m][0], a[s][m][1]) : a[s][m][0]);
                for (i64 d = Dv; d < D; d++) v += LD(ws[s] + j * ldw + d) * xs[m][d];
                r[s][m] = _mm512_mask_broadcastss_ps(r[s][m], lane, _mm_set_ss(v));
            }
    }
#pragma GCC unroll 4
    for (int s = 0; s < 4; s++) {
        const __m512 bv = b ? VLD16(b + o + s * q) : _mm512_setzero_ps();
#pragma GCC unroll 4
        for (int m = 0; m < R; m++) _mm512_storeu_ps(y + out[m] * ldy + o + s * q, _mm512_add_ps(r[s][m], bv));
    }
}
#endif

/* The forms of FN(few_chunk) (a constant after inlining) */
#define FEW_ROWS 0    /* NW weight rows from o */
#define FEW_G16 1     /* 16 weight rows from o, NW at a time (FN(group16), AVX-512) */
#define FEW_STREAMS 2 /* 16 weight rows from o + s * q for each s < 4 (FN(streams16), AVX-512) */

/* One chunk of R <= 4 input rows xs against the weight rows of form (FEW_*) from o (wr: row o); results to rows
 * out[0..R) of y. pf_rows: rows from o that may be prefetched (the rest of the work item: the next one is another
 * thread's); a pair prefetches the pair four rows on, the streams (pf_rows nonzero) their lines STREAM_PF_BYTES
 * ahead. */
static inline __attribute__((always_inline)) void FN(few_chunk)(const float *const *xs, int R, int NW, int form,
                                                                i64 q, const WT *wr, i64 ldw, i64 D, i64 pf_rows,
                                                                const WT *b, i64 o, float *y, i64 ldy,
                                                                const i64 *out) {
#ifdef VLD16
    if (form == FEW_G16) {
        FN(group16)(xs, R, NW, wr, ldw, D, pf_rows, b, o, y, ldy, out);
        return;
    }
    if (form == FEW_STREAMS) {
        FN(streams16)(xs, R, wr, ldw, D, q, pf_rows ? STREAM_PF_BYTES / (i64)sizeof(WT) : 0, b, o, y, ldy, out);
        return;
    }
#endif
    float s[8];
    FN(dot_rows)(wr, ldw, NW, xs, D, R, FEW_U(R, NW), NW > 1 && 6 <= pf_rows ? 4 * ldw : 0, s);
    for (int q = 0; q < NW; q++) {
        const float bo = FN(bias_at)(b, o + q);
        for (int m = 0; m < R; m++) y[out[m] * ldy + o + q] = s[q * 4 + m] + bo;
    }
}

/* The weight rows from o of FN(few_chunk) (NW, form constants after inlining) for M <= ROWS_FEW_MAX input rows, in
 * chunks of up to 4 (the weight rows are in cache after the first: L1 or L2). */
static inline __attribute__((always_inline)) void FN(few_out)(const float *x, i64 ldx, const i64 *out, i64 M,
                                                              const WT *w, i64 ldw, i64 D, i64 o, int NW, int form,
                                                              i64 q, i64 pf_rows, const WT *b, float *y, i64 ldy) {
    const WT *wr = w + o * ldw;
    for (i64 m0 = 0; m0 < M; m0 += 4) {
        const float *xs[4] = {x + m0 * ldx, x + (m0 + 1) * ldx, x + (m0 + 2) * ldx, x + (m0 + 3) * ldx};
        const i64 p = m0 ? 0 : pf_rows, *om = out + m0;
        switch (M - m0 < 4 ? M - m0 : 4) {
        case 1: FN(few_chunk)(xs, 1, NW, form, q, wr, ldw, D, p, b, o, y, ldy, om); break;
        case 2: FN(few_chunk)(xs, 2, NW, form, q, wr, ldw, D, p, b, o, y, ldy, om); break;
        case 3: FN(few_chunk)(xs, 3, NW, form, q, wr, ldw, D, p, b, o, y, ldy, om); break;
        default: FN(few_chunk)(xs, 4, NW, form, q, wr, ldw, D, p, b, o, y, ldy, om); break;
        }
    }
}
#undef FEW_U

/* Output rows [o0, o1) for M <= ROWS_FEW_MAX input rows (VLD(p): 8 WT at p as float, AVX2). A block of four
 * adjacent weight rows is four streams, each one page long where a row is 4 KiB (D = 1024 float32), and the
 * hardware prefetcher restarts on every page: ~20% below a streaming read. With AVX-512, a range of 64 rows or more
 * is read as four long streams (FN(streams16), input rows four at a time: 0.74-0.97x the time of what follows, at 1
 * to 16 float32 rows, 5632 x 1024 and 1024 x 2816 weights; bfloat16 0.6-1.0x); the rest, and every range without
 * AVX-512: one input row takes one weight row at a time (consecutive rows one sequential stream), two or more take
 * pairs of weight rows (FN(dot_rows)), each pair prefetching the pair four rows on. */
static void FN(rows_few)(const float *x, i64 ldx, const i64 *out, i64 M, const WT *w, i64 ldw, i64 D, i64 o0, i64 o1,
                         const WT *b, float *y, i64 ldy) {
    i64 o = o0;
#ifdef VLD16
    if (o1 - o0 >= 64) { /* four streams of q rows (a multiple of 16), then the rest */
        const i64 q = (o1 - o0) / 64 * 16;
        for (i64 j = 0; j < q; j += 16) FN(few_out)(x, ldx, out, M, w, ldw, D, o0 + j, 1, FEW_STREAMS, q, 1, b, y, ldy);
        o = o0 + 4 * q;
    }
    for (; o + 16 <= o1; o += 16) {
        if (M > 1) FN(few_out)(x, ldx, out, M, w, ldw, D, o, 2, FEW_G16, 0, o1 - o, b, y, ldy);
        else FN(few_out)(x, ldx, out, M, w, ldw, D, o, 1, FEW_G16, 0, 0, b, y, ldy);
    }
#endif
    if (M > 1)
        for (; o + 2 <= o1; o += 2) FN(few_out)(x, ldx, out, M, w, ldw, D, o, 2, FEW_ROWS, 0, o1 - o, b, y, ldy);
    for (; o < o1; o++) FN(few_out)(x, ldx, out, M, w, ldw, D, o, 1, FEW_ROWS, 0, 0, b, y, ldy);
}
#undef FEW_ROWS
#undef FEW_G16
#undef FEW_STREAMS
#endif

/* Output rows [o0, o1) of one expert for M packed float rows x (row m at x + m * ldx), into the float rows
 * out[m] of y: blocks of 4 weight rows x 2 input rows (8 independent accumulators hide the FMA latency; the 4 weight
 * rows stay in L1 across the input rows). */
static void FN(rows_block)(const float *x, i64 ldx, const i64 *out, i64 M, const WT *w, i64 ldw, i64 D, i64 o0,
                           i64 o1, const WT *b, float *y, i64 ldy) {
#ifdef VLD
    if (M <= ROWS_FEW_MAX) {
        FN(rows_few)(x, ldx, out, M, w, ldw, D, o0, o1, b, y, ldy);
        return;
    }
#endif
    i64 o = o0;
    for (; o + 4 <= o1; o += 4) {
        const WT *w0 = w + o * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        float b0 = FN(bias_at)(b, o), b1 = FN(bias_at)(b, o + 1), b2 = FN(bias_at)(b, o + 2),
              b3 = FN(bias_at)(b, o + 3);
        i64 m = 0;
#ifdef BLOCK4X2
        if (BLOCK4X2(x, ldx, out, M, w0, ldw, D, o, b0, b1, b2, b3, y, ldy)) continue;
#endif
        for (; m + 2 <= M; m += 2) {
            const float *xa = x + m * ldx, *xb = x + (m + 1) * ldx;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, c0, c1, c2, c3)
            for (i64 d = 0; d < D; d++) {
                float u = xa[d], v = xb[d];
                float p0 = LD(w0 + d), p1 = LD(w1 + d), p2 = LD(w2 + d), p3 = LD(w3 + d);
                a0 += p0 * u;
                a1 += p1 * u;
                a2 += p2 * u;
                a3 += p3 * u;
                c0 += p0 * v;
                c1 += p1 * v;
                c2 += p2 * v;
                c3 += p3 * v;
            }
            float *ya = y + out[m] * ldy + o, *yb = y + out[m + 1] * ldy + o;
            ya[0] = a0 + b0, ya[1] = a1 + b1, ya[2] = a2 + b2, ya[3] = a3 + b3;
            yb[0] = c0 + b0, yb[1] = c1 + b1, yb[2] = c2 + b2, yb[3] = c3 + b3;
        }
        for (; m < M; m++) {
            const float *xm = x + m * ldx;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (i64 d = 0; d < D; d++) {
                float xv = xm[d];
                a0 += LD(w0 + d) * xv;
                a1 += LD(w1 + d) * xv;
                a2 += LD(w2 + d) * xv;
                a3 += LD(w3 + d) * xv;
            }
            float *ym = y + out[m] * ldy + o;
            ym[0] = a0 + b0, ym[1] = a1 + b1, ym[2] = a2 + b2, ym[3] = a3 + b3;
        }
    }
    for (; o < o1; o++) {
        const WT *w0 = w + o * ldw;
        float b0 = FN(bias_at)(b, o);
        for (i64 m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            float a0 = 0;
#pragma omp simd reduction(+ : a0)
            for (i64 d = 0; d < D; d++) a0 += LD(w0 + d) * xm[d];
            y[out[m] * ldy + o] = a0 + b0;
        }
    }
}

/* The group's rows of x, as float, into a packed buffer whose row stride is padded off a multiple of 4 KiB (rows
 * 4 KiB apart share L1 sets with the weight rows and evict them). */
static void FN(pack)(const WT *x, i64 ldx, const i64 *rows, i64 R, i64 D, float *xp, i64 ldp) {
    for (i64 r = 0; r < R; r++) {
        const WT *src = x + rows[r] * ldx;
        float *dst = xp + r * ldp;
        for (i64 d = 0; d < D; d++) dst[d] = LD(src + d);
    }
}

/* Packed float result rows r -> rows rows[r] of y, stored as WT. */
static void FN(unpack)(const float *yp, i64 ldp, const i64 *rows, i64 R, i64 O, WT *y, i64 ldy) {
    for (i64 r = 0; r < R; r++) {
        const float *src = yp + r * ldp;
        WT *dst = y + rows[r] * ldy;
        for (i64 o = 0; o < O; o++) ST(dst + o, src[o]);
    }
}

/* cols layout, one expert, the reduction slice [d0, d1): part[m, :O] += x[m, d0:d1] @ W[d0:d1, :O] for its M input
 * rows (W[d, o] at w + d*ld + o), four weight rows at a time (four sequential streams), each block applied to every
 * input row while it is in L2, so the weights are read once whatever M. */
static void FN(cols_sweep)(const float *x, i64 ldx, i64 M, const WT *w, i64 ld, i64 O, i64 d0, i64 d1, float *part) {
    i64 d = d0;
    for (; d + 4 <= d1; d += 4) {
        const WT *r0 = w + d * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        for (i64 m = 0; m < M; m++) {
            const float *xm = x + m * ldx + d;
            float u0 = xm[0], u1 = xm[1], u2 = xm[2], u3 = xm[3];
            float *pm = part + m * O;
#pragma omp simd
            for (i64 o = 0; o < O; o++) pm[o] += u0 * LD(r0 + o) + u1 * LD(r1 + o) + u2 * LD(r2 + o) + u3 * LD(r3 + o);
        }
    }
    for (; d < d1; d++) {
        const WT *r0 = w + d * ld;
        for (i64 m = 0; m < M; m++) {
            float u0 = x[m * ldx + d];
            float *pm = part + m * O;
#pragma omp simd
            for (i64 o = 0; o < O; o++) pm[o] += u0 * LD(r0 + o);
        }
    }
}

/* One projection of every group inside a parallel region: out row pos[r] = in row r @ W_e^T (+ b_e), r over the
 * group's rows. rows layout (cols == 0): W_e[o, d] at w + e*sE + o*ld + d, work items of OBLOCK outputs. cols layout
 * (an (in, out) weight seen transposed, e.g. HF's gpt-oss gate_up_proj): W_e[o, d] at w + e*sE + d*ld + o; each thread
 * sweeps its slice of d over every group (FN(cols_sweep)) into its own float partials (R rows of O in parts), then
 * the partials are summed over disjoint (row, output) ranges. rexp[r]: the expert of row r (cols). */
static void FN(project)(const float *in, i64 ldi, i64 G, const i64 *experts, const i64 *offs, const i64 *pos, i64 R,
                        const i64 *rexp, const WT *w, i64 sE, i64 ld, int cols, i64 O, i64 D, const WT *b, i64 sb,
                        float *out, i64 ldo, float *parts) {
    if (!cols) {
        i64 blocks = (O + OBLOCK - 1) / OBLOCK;
#pragma omp for schedule(static, 1)
        for (i64 it = 0; it < G * blocks; it++) {
            i64 g = it / blocks, blk = it % blocks, e = experts[g];
            i64 o0 = blk * OBLOCK, o1 = o0 + OBLOCK < O ? o0 + OBLOCK : O;
            FN(rows_block)(in + offs[g] * ldi, ldi, pos + offs[g], offs[g + 1] - offs[g], w + e * sE, ld, D, o0, o1,
                           b ? b + e * sb : NULL, out, ldo);
        }
        return; /* (the implicit barrier of the loop) */
    }
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    float *part = parts + (size_t)t * (size_t)R * O;
    memset(part, 0, sizeof(float) * (size_t)R * O);
    i64 d0 = D * t / T, d1 = D * (t + 1) / T;
    for (i64 g = 0; g < G; g++)
        FN(cols_sweep)(in + offs[g] * ldi, ldi, offs[g + 1] - offs[g], w + experts[g] * sE, ld, O, d0, d1,
                       part + offs[g] * O);
#pragma omp barrier
    i64 chunks = (O + 255) / 256;
#pragma omp for schedule(static)
    for (i64 it = 0; it < R * chunks; it++) {
        i64 r = it / chunks, o0 = (it % chunks) * 256, o1 = o0 + 256 < O ? o0 + 256 : O;
        const WT *be = b ? b + rexp[r] * sb : NULL;
        float *dst = out + pos[r] * ldo;
        for (i64 o = o0; o < o1; o++) {
            float acc = FN(bias_at)(be, o);
            for (int q = 0; q < T; q++) acc += parts[(size_t)q * R * O + r * O + o];
            dst[o] = acc;
        }
    }
}

int FN(moekit_rows)(const WT *x, i64 ldx, WT *y, i64 ldy, i64 G, const i64 *experts, const i64 *offs,
                    const i64 *rows, i64 R, i64 E, i64 nrows, const WT *w, i64 sE, i64 ldw, i64 O, i64 D,
                    const WT *b, i64 sbE, int threads) {
    int bad = check_groups(G, experts, offs, rows, R, E, nrows);
    if (bad) return 10 + bad;
    i64 ldp = padded(D), ldo = padded(O);
    size_t n1 = (size_t)(R > 0 ? R : 1);
    float *xp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldp);
    float *yp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldo);
    i64 *pos = (i64 *)malloc(sizeof(i64) * n1);
    if (!xp || !yp || !pos) {
        free(xp), free(yp), free(pos);
        return 1;
    }
    FN(pack)(x, ldx, rows, R, D, xp, ldp);
    for (i64 r = 0; r < R; r++) pos[r] = r;
#pragma omp parallel num_threads(threads) if (threads > 1)
    FN(project)(xp, ldp, G, experts, offs, pos, R, NULL, w, sE, ldw, 0, O, D, b, sbE, yp, ldo, NULL);
    FN(unpack)(yp, ldo, rows, R, O, y, ldy);
    free(xp), free(yp), free(pos);
    return 0;
}

/* cols layout: each thread takes a contiguous slice of the reduction and sweeps it four weight rows at a time (four
 * sequential streams), adding x[m, d..d+3] * W[d..d+3, :] into a full-width float partial row per input row (the
 * partial stays in L1/L2; the four weight rows in L2 across the input rows); then the threads add the partials over
 * disjoint output ranges. */
int FN(moekit_cols)(const WT *x, i64 ldx, WT *y, i64 ldy, i64 G, const i64 *experts, const i64 *offs,
                    const i64 *rows, i64 R, i64 E, i64 nrows, const WT *w, i64 sE, i64 ldw, i64 O, i64 D,
                    const WT *b, i64 sbE, int threads) {
    int bad = check_groups(G, experts, offs, rows, R, E, nrows);
    if (bad) return 10 + bad;
    if (threads < 1) threads = 1;
    i64 ldp = padded(D);
    float *parts = (float *)malloc(sizeof(float) * (size_t)threads * MAX_ROWS * (size_t)O);
    float *xp = (float *)aligned_alloc(64, sizeof(float) * (size_t)(R > 0 ? R : 1) * ldp);
    if (!parts || !xp) {
        free(parts), free(xp);
        return 1;
    }
    FN(pack)(x, ldx, rows, R, D, xp, ldp);
    for (i64 g = 0; g < G; g++) {
        i64 M = offs[g + 1] - offs[g];
        const i64 *rg = rows + offs[g];
        const float *xg = xp + offs[g] * ldp;
        const WT *we = w + experts[g] * sE;
        const WT *be = b ? b + experts[g] * sbE : NULL;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            float *part = parts + (size_t)t * MAX_ROWS * O;
            i64 d0 = D * t / T, d1 = D * (t + 1) / T;
            memset(part, 0, sizeof(float) * (size_t)M * O);
            FN(cols_sweep)(xg, ldp, M, we, ldw, O, d0, d1, part);
#pragma omp barrier
            i64 q0 = O * t / T, q1 = O * (t + 1) / T;
            for (i64 m = 0; m < M; m++) {
                WT *ym = y + rg[m] * ldy;
                for (i64 o = q0; o < q1; o++) {
                    float s = FN(bias_at)(be, o);
                    for (int k = 0; k < T; k++) s += parts[(size_t)k * MAX_ROWS * O + m * O + o];
                    ST(ym + o, s);
                }
            }
        }
    }
    free(parts), free(xp);
    return 0;
}

/* The gating of one row (ffn_packed's): g[j] from the input projection's row h (see ffn_packed for glu, limit). */
static inline void FN(gate_row)(const float *hr, float *gr, i64 F, int glu, int act, float alpha, float limit) {
    if (!glu) {
        for (i64 j = 0; j < F; j++) gr[j] = act_fn(hr[j], act);
    } else if (limit > 0) { /* comparisons keep NaN, as torch.clamp */
        i64 step = glu == 2 ? 2 : 1, up = glu == 2 ? 1 : F;
        for (i64 j = 0; j < F; j++) {
            float gv = hr[j * step], uv = hr[j * step + up];
            gv = gv > limit ? limit : gv;
            uv = uv > limit ? limit : (uv < -limit ? -limit : uv);
            gr[j] = (uv + 1.0f) * (gv / (1.0f + expf(-alpha * gv)));
        }
    } else if (glu == 2) {
        for (i64 j = 0; j < F; j++) gr[j] = act_fn(hr[2 * j], act) * hr[2 * j + 1];
    } else {
        for (i64 j = 0; j < F; j++) gr[j] = act_fn(hr[j], act) * hr[F + j];
    }
}

/* The expert FFN phases on rows already packed as float (row r of xp at xp + r * ldp), outputs into packed float
 * rows yp (row r of the group layout -> row r of yp): h = x @ W_in^T (+ b_in); the gating g; y = g @ W2^T (+ b2).
 * W_in (E, H, D) with H = 2F (glu) or F, W2 (E, D', F), each in the rows or the cols layout (cols_in, cols2; ld_in,
 * ld2 the stride of the layout's outer dim). Gating: glu 0: act(h); 1: act(gate) * up with gate = h[:, :F],
 * up = h[:, F:]; 2: the same with gate and up interleaved (h[:, 0::2], h[:, 1::2]). limit > 0 (with glu): gpt-oss's
 * clamped SwiGLU, (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g) with g = clamp(gate, max=limit).
 * One parallel region: the phases separated by barriers, or whole experts per thread where they divide evenly.
 * h, g: work buffers of R rows (strides ldh, ldg).
 * Returns 0, or 1 when a work buffer cannot be allocated. */
static int FN(ffn_packed)(const float *xp, i64 ldp, i64 G, const i64 *experts, const i64 *offs, const i64 *pos,
                          i64 R, const WT *w_in, i64 sE_in, i64 ld_in, int cols_in, i64 H, i64 D, const WT *b_in,
                          i64 sb_in, const WT *w2, i64 sE2, i64 ld2, int cols2, i64 Dout, const WT *b2, i64 sb2,
                          int glu, int act, float alpha, float limit, float *h, i64 ldh, float *gbuf, i64 ldg,
                          float *yp, i64 ldo, int threads) {
    i64 F = glu ? H / 2 : H;
    if (threads < 1) threads = 1;
    float *parts = NULL;
    i64 *rexp = NULL;
    if (cols_in || cols2) {
        i64 widest = H > Dout ? H : Dout;
        parts = (float *)malloc(sizeof(float) * (size_t)threads * (size_t)(R > 0 ? R : 1) * (size_t)widest);
        rexp = (i64 *)malloc(sizeof(i64) * (size_t)(R > 0 ? R : 1));
        if (!parts || !rexp) {
            free(parts), free(rexp);
            return 1;
        }
        for (i64 g = 0; g < G; g++)
            for (i64 r = offs[g]; r < offs[g + 1]; r++) rexp[r] = experts[g];
    }
    /* Whole experts to each thread where they divide evenly (the same rows each, e.g. one token's k experts over the
     * threads): each thread's input projection, gating and output projection in turn, no barrier between them,
     * one stream over each of its weights. */
    int whole = !cols_in && !cols2 && threads > 1 && G >= threads && G % threads == 0;
    for (i64 g = 1; whole && g < G; g++) whole = offs[g + 1] - offs[g] == offs[1] - offs[0];
    if (whole) {
#pragma omp parallel num_threads(threads)
        for (i64 g = omp_get_thread_num(); g < G; g += threads) {
            const i64 r0 = offs[g], M = offs[g + 1] - r0, e = experts[g];
            FN(rows_block)(xp + r0 * ldp, ldp, pos + r0, M, w_in + e * sE_in, ld_in, D, 0, H,
                           b_in ? b_in + e * sb_in : NULL, h, ldh);
            for (i64 r = r0; r < r0 + M; r++) FN(gate_row)(h + pos[r] * ldh, gbuf + r * ldg, F, glu, act, alpha, limit);
            FN(rows_block)(gbuf + r0 * ldg, ldg, pos + r0, M, w2 + e * sE2, ld2, F, 0, Dout, b2 ? b2 + e * sb2 : NULL,
                           yp, ldo);
        }
        return 0;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        FN(project)(xp, ldp, G, experts, offs, pos, R, rexp, w_in, sE_in, ld_in, cols_in, H, D, b_in, sb_in, h, ldh,
                    parts);
#pragma omp for schedule(static)
        for (i64 r = 0; r < R; r++) FN(gate_row)(h + r * ldh, gbuf + r * ldg, F, glu, act, alpha, limit);
        FN(project)(gbuf, ldg, G, experts, offs, pos, R, rexp, w2, sE2, ld2, cols2, Dout, F, b2, sb2, yp, ldo, parts);
    }
    free(parts), free(rexp);
    return 0;
}

/* A whole expert FFN for few rows (ffn_packed on the group's rows of x, results to the same rows of y). */
int FN(moekit_ffn)(const WT *x, i64 ldx, WT *y, i64 ldy, i64 G, const i64 *experts, const i64 *offs,
                   const i64 *rows, i64 R, i64 E, i64 nrows, const WT *w_in, i64 sE_in, i64 ld_in, int cols_in,
                   i64 H, i64 D, const WT *b_in, i64 sb_in, const WT *w2, i64 sE2, i64 ld2, int cols2, i64 Dout,
                   const WT *b2, i64 sb2, int glu, int act, float alpha, float limit, int threads) {
    int bad = check_groups(G, experts, offs, rows, R, E, nrows);
    if (bad) return 10 + bad;
    i64 F = glu ? H / 2 : H;
    i64 ldp = padded(D), ldh = padded(H), ldg = padded(F), ldo = padded(Dout);
    size_t n1 = (size_t)(R > 0 ? R : 1);
    float *xp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldp);
    float *h = (float *)aligned_alloc(64, sizeof(float) * n1 * ldh);
    float *gbuf = (float *)aligned_alloc(64, sizeof(float) * n1 * ldg);
    float *yp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldo);
    i64 *pos = (i64 *)malloc(sizeof(i64) * n1);
    if (!xp || !h || !gbuf || !yp || !pos) {
        free(xp), free(h), free(gbuf), free(yp), free(pos);
        return 1;
    }
    FN(pack)(x, ldx, rows, R, D, xp, ldp);
    for (i64 r = 0; r < R; r++) pos[r] = r;
    int status = FN(ffn_packed)(xp, ldp, G, experts, offs, pos, R, w_in, sE_in, ld_in, cols_in, H, D, b_in, sb_in, w2,
                                sE2, ld2, cols2, Dout, b2, sb2, glu, act, alpha, limit, h, ldh, gbuf, ldg, yp, ldo,
                                threads);
    if (!status) FN(unpack)(yp, ldo, rows, R, Dout, y, ldy);
    free(xp), free(h), free(gbuf), free(yp), free(pos);
    return status;
}

/* A whole MoE layer's routed part for T <= MAX_ROWS tokens, in one call (moekit.ops.native.moe_decode):
 *   logits = x @ Wr^T (+ br)                       float32 accumulation, E experts
 *   score 0: s = softmax(logits); choose top-k of s (+ sel_bias); w = s at the choice; normalize: w / sum(w)
 *   score 1: s = sigmoid(logits); as score 0 (normalize: w / (sum(w) + 1e-20))
 *   score 2: choose top-k of logits (+ sel_bias); w = softmax over the k chosen logits (gpt-oss)
 *   n_group > 0: only the experts of the topk_group best groups of E / n_group are eligible (group score: the
 *   sum of its two largest choice values, or its largest with group_max), as DeepSeek-V2/V3
 *   w *= scale; y[t] = sum_j w[t, j] * FFN_{idx[t, j]}(x[t])
 * Ties choose the lower expert id. The chosen ids and weights are written to idx_out (T x k) and w_out (T x k),
 * the float32 logits to logits_out (T x E), when given. Returns 0, 1 (no memory) or 14 (k outside [1, E], T outside
 * [0, MAX_ROWS]). */
static int FN(moekit_moe_decode)(const WT *x, i64 ldx, WT *y, i64 ldy, i64 T, i64 D, const WT *wr, i64 ldr,
                                 const WT *br, i64 E, i64 k, int score, int normalize, float scale,
                                 const float *sel_bias, i64 n_group, i64 topk_group, int group_max,
                                 const WT *w_in, i64 sE_in, i64 ld_in, int cols_in, i64 H, const WT *b_in, i64 sb_in,
                                 const WT *w2, i64 sE2, i64 ld2, int cols2, i64 Dout, const WT *b2, i64 sb2, int glu,
                                 int act, float alpha, float limit, int threads, int64_t *idx_out, float *w_out,
                                 float *logits_out) {
    if (k < 1 || k > E || T < 0 || T > MAX_ROWS) return 14;
    if (n_group > 0 && (E % n_group || topk_group < 1 || topk_group > n_group)) return 14;
    i64 R = T * k, F = glu ? H / 2 : H;
    i64 ldp = padded(D), ldh = padded(H), ldg = padded(F), ldo = padded(Dout);
    size_t n1 = (size_t)(R > 0 ? R : 1);
    float *xp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldp);
    float *h = (float *)aligned_alloc(64, sizeof(float) * n1 * ldh);
    float *gbuf = (float *)aligned_alloc(64, sizeof(float) * n1 * ldg);
    float *yp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldo);
    float *xt = (float *)aligned_alloc(64, sizeof(float) * (size_t)(T > 0 ? T : 1) * ldp);
    float *lg = (float *)malloc(sizeof(float) * (size_t)E * 2 + sizeof(float) * (size_t)(n_group > 0 ? n_group : 1));
    char *used = (char *)malloc((size_t)E + (size_t)(n_group > 0 ? n_group : 1));
    i64 *ints = (i64 *)malloc(sizeof(i64) * (3 * n1 + 2 * (size_t)E + 2));
    float *wk = (float *)malloc(sizeof(float) * n1);
    if (!xp || !h || !gbuf || !yp || !xt || !lg || !ints || !wk || !used) {
        free(xp), free(h), free(gbuf), free(yp), free(xt), free(lg), free(ints), free(wk), free(used);
        return 1;
    }
    float *gs = lg + 2 * E; /* group scores */
    char *gkeep = used + E;
    i64 *idx = ints, *pos = ints + n1, *slot = ints + 2 * n1;
    i64 *count = ints + 3 * n1, *experts = count + E + 1; /* count: E + 1 entries (offsets), experts: <= E */
    float *ch = lg + E;
    /* routing, token by token */
    for (i64 t = 0; t < T; t++) {
        const WT *xr = x + t * ldx;
        float *xf = xt + t * ldp;
        for (i64 d = 0; d < D; d++) xf[d] = LD(xr + d);
        for (i64 e = 0; e < E; e++) {
            const WT *we = wr + e * ldr;
            float a = 0;
#pragma omp simd reduction(+ : a)
            for (i64 d = 0; d < D; d++) a += LD(we + d) * xf[d];
            lg[e] = a + FN(bias_at)(br, e);
        }
        if (logits_out) memcpy(logits_out + t * E, lg, sizeof(float) * (size_t)E);
        if (score == 0) {
            float m = lg[0], z = 0;
            for (i64 e = 1; e < E; e++) m = lg[e] > m ? lg[e] : m;
            for (i64 e = 0; e < E; e++) z += (lg[e] = expf(lg[e] - m));
            for (i64 e = 0; e < E; e++) lg[e] /= z;
        } else if (score == 1) {
            for (i64 e = 0; e < E; e++) lg[e] = 1.0f / (1.0f + expf(-lg[e]));
        }
        for (i64 e = 0; e < E; e++) ch[e] = lg[e] + (sel_bias ? sel_bias[e] : 0.0f), used[e] = 0;
        if (n_group > 0) { /* group limit (DeepSeek): score each group, keep the best topk_group, mask the rest */
            i64 S = E / n_group;
            for (i64 g = 0; g < n_group; g++) {
                float m1 = -INFINITY, m2 = -INFINITY;
                for (i64 e = g * S; e < (g + 1) * S; e++) {
                    float v = ch[e];
                    if (v > m1) m2 = m1, m1 = v;
                    else if (v > m2) m2 = v;
                }
                gs[g] = group_max || S < 2 ? m1 : m1 + m2;
                gkeep[g] = 0;
            }
            for (i64 j = 0; j < topk_group; j++) {
                i64 best = -1;
                for (i64 g = 0; g < n_group; g++)
                    if (!gkeep[g] && (best < 0 || gs[g] > gs[best])) best = g;
                gkeep[best] = 1;
            }
            for (i64 e = 0; e < E; e++)
                if (!gkeep[e / S]) ch[e] = -INFINITY;
        }
        float sum = 0, top = 0;
        for (i64 j = 0; j < k; j++) { /* the k largest choice values, distinct experts; ties: the lower id */
            i64 best = -1;
            for (i64 e = 0; e < E; e++)
                if (!used[e] && (best < 0 || ch[e] > ch[best] || (ch[best] != ch[best] && ch[e] == ch[e]))) best = e;
            used[best] = 1;
            idx[t * k + j] = best;
            if (j == 0) top = lg[best];
            wk[t * k + j] = lg[best];
        }
        if (score == 2) {
            for (i64 j = 0; j < k; j++) sum += (wk[t * k + j] = expf(wk[t * k + j] - top));
            for (i64 j = 0; j < k; j++) wk[t * k + j] /= sum;
        } else if (normalize) {
            for (i64 j = 0; j < k; j++) sum += wk[t * k + j];
            float den = score == 0 ? sum : sum + 1e-20f;
            for (i64 j = 0; j < k; j++) wk[t * k + j] /= den;
        }
        for (i64 j = 0; j < k; j++) wk[t * k + j] *= scale;
    }
    /* group the pairs by expert (counting sort: experts in id order, pairs in token order within one) */
    for (i64 e = 0; e <= E; e++) count[e] = 0;
    for (i64 r = 0; r < R; r++) count[idx[r] + 1]++;
    for (i64 e = 0; e < E; e++) count[e + 1] += count[e];
    i64 G = 0;
    for (i64 e = 0; e < E; e++)
        if (count[e + 1] > count[e]) experts[G++] = e;
    /* slot[r]: the packed row of pair r; offsets of the G groups into offs (reusing count's prefix sums) */
    {
        i64 *next = (i64 *)malloc(sizeof(i64) * (size_t)E);
        i64 *offs = (i64 *)malloc(sizeof(i64) * (size_t)(G + 1));
        if (!next || !offs) {
            free(next), free(offs);
            free(xp), free(h), free(gbuf), free(yp), free(xt), free(lg), free(ints), free(wk), free(used);
            return 1;
        }
        for (i64 e = 0; e < E; e++) next[e] = count[e];
        for (i64 r = 0; r < R; r++) slot[r] = next[idx[r]]++;
        for (i64 g = 0; g < G; g++) offs[g] = count[experts[g]];
        offs[G] = R;
        for (i64 r = 0; r < R; r++) memcpy(xp + slot[r] * ldp, xt + (r / k) * ldp, sizeof(float) * (size_t)D);
        for (i64 r = 0; r < R; r++) pos[r] = r;
        int status = FN(ffn_packed)(xp, ldp, G, experts, offs, pos, R, w_in, sE_in, ld_in, cols_in, H, D, b_in, sb_in,
                                    w2, sE2, ld2, cols2, Dout, b2, sb2, glu, act, alpha, limit, h, ldh, gbuf, ldg, yp,
                                    ldo, threads);
        free(next), free(offs);
        if (status) {
            free(xp), free(h), free(gbuf), free(yp), free(xt), free(lg), free(ints), free(wk), free(used);
            return status;
        }
    }
    /* combine: y[t] = sum_j w[t, j] * yp[slot[t, j]] */
    for (i64 t = 0; t < T; t++) {
        WT *yt = y + t * ldy;
        for (i64 o = 0; o < Dout; o++) {
            float acc = 0;
            for (i64 j = 0; j < k; j++) acc += wk[t * k + j] * yp[slot[t * k + j] * ldo + o];
            ST(yt + o, acc);
        }
    }
    if (idx_out)
        for (i64 r = 0; r < R; r++) idx_out[r] = idx[r];
    if (w_out)
        for (i64 r = 0; r < R; r++) w_out[r] = wk[r];
    free(xp), free(h), free(gbuf), free(yp), free(xt), free(lg), free(ints), free(wk), free(used);
    return 0;
}

/* FN(moekit_moe_decode) with its weights' arguments in one struct (struct decode_args) */
int FN(moekit_moe_decode_args)(const struct decode_args *a, const WT *x, i64 ldx, WT *y, i64 ldy, i64 T, int threads,
                               int64_t *idx_out, float *w_out, float *logits_out) {
    return FN(moekit_moe_decode)(x, ldx, y, ldy, T, a->D, (const WT *)a->wr, a->ldr, (const WT *)a->br, a->E, a->k,
                                 a->score, a->normalize, a->scale, a->sel_bias, a->n_group, a->topk_group,
                                 a->group_max, (const WT *)a->w_in, a->sE_in, a->ld_in, a->cols_in, a->H,
                                 (const WT *)a->b_in, a->sb_in, (const WT *)a->w2, a->sE2, a->ld2, a->cols2, a->Dout,
                                 (const WT *)a->b2, a->sb2, a->glu, a->act, a->alpha, a->limit, threads, idx_out,
                                 w_out, logits_out);
}

#undef FN
#undef CAT
#undef CAT_
