/* Training-path row movement around the experts of a top-k grid (included by native_decode.c once per storage type,
 * like native_kernels.h). The T tokens' K choices form a grid: pair j = k*T + t; the experts see the pairs sorted by
 * expert, pair j at sorted row inv[j] (and sorted row n is pair order[n]). Both kernels read every sorted row once
 * and accumulate in float32, where the torch form of the same step (a gather into grid order, a product with the
 * weights, a sum over K; its backward a second gather, two products and a row sum) makes 3-5 passes over the
 * (K*T, D) rows (docs/performance.md).
 *
 *   gather_sum:       out[t] = sum_k w[k*T+t] * y[inv[k*T+t]]    (w NULL: an unweighted sum)
 *                     the combine's forward, and (unweighted) the backward of the dispatch's gather of K copies
 *   combine_backward: gy[n] = w[order[n]] * g[t],  gw[order[n]] = <g[t], y[n]>   with t = order[n] mod T
 *                     (w NULL: gy[n] = g[t] and gw is not written)
 *
 * Weights and their gradient are float32 whatever the storage type. Both return 14 (computing nothing) when an
 * index lies outside [0, K*T), else 0. */

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(CAT(name, _), SUF)
#define CHUNK 512
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2
#endif /* columns accumulated at a time (a float32 row block on the stack) */

static int FN(index_range)(const i64 *idx, i64 N) {
    for (i64 i = 0; i < N; i++)
        if (idx[i] < 0 || idx[i] >= N) return 14;
    return 0;
}

int FN(moekit_gather_sum)(const WT *y, i64 ldy, const i64 *inv, const float *w, i64 K, i64 T, i64 D, WT *out,
                          i64 ldo, int threads) {
    if (FN(index_range)(inv, K * T)) return 14;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 t = 0; t < T; t++) {
        float acc[CHUNK];
        if (t + PREFETCH_AHEAD < T) /* the rows of a later token: random rows defeat the hardware prefetcher */
            for (i64 k = 0; k < K; k++) {
                const char *r = (const char *)(y + inv[k * T + t + PREFETCH_AHEAD] * ldy);
                for (i64 b = 0; b < D * (i64)sizeof(WT); b += 64) __builtin_prefetch(r + b);
            }
        for (i64 d0 = 0; d0 < D; d0 += CHUNK) {
            const i64 nd = D - d0 < CHUNK ? D - d0 : CHUNK;
            for (i64 d = 0; d < nd; d++) acc[d] = 0.0f;
            for (i64 k = 0; k < K; k++) {
                const i64 j = k * T + t;
                const float wk = w ? w[j] : 1.0f;
                const WT *row = y + inv[j] * ldy + d0;
                for (i64 d = 0; d < nd; d++) acc[d] += wk * LD(row + d);
            }
            WT *o = out + t * ldo + d0;
            for (i64 d = 0; d < nd; d++) ST(o + d, acc[d]);
        }
    }
    return 0;
}

int FN(moekit_combine_backward)(const WT *g, i64 ldg, const WT *y, i64 ldy, const i64 *order, const float *w, i64 K,
                                i64 T, i64 D, WT *gy, i64 ldgy, float *gw, int threads) {
    const i64 N = K * T;
    if (FN(index_range)(order, N)) return 14;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (i64 n = 0; n < N; n++) {
        const i64 j = order[n], t = j % T;
        const WT *gt = g + t * ldg;
        WT *o = gy + n * ldgy;
        if (!w) {
            for (i64 d = 0; d < D; d++) o[d] = gt[d];
            continue;
        }
        const WT *yn = y + n * ldy;
        const float wj = w[j];
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (i64 d = 0; d < D; d++) {
            const float gd = LD(gt + d);
            dot += gd * LD(yn + d);
            ST(o + d, wj * gd);
        }
        gw[j] = dot;
    }
    return 0;
}

#undef CHUNK
#undef FN
#undef CAT
#undef CAT_
