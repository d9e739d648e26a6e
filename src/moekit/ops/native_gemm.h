/* A grouped float32 GEMM for training-sized groups (included once by native_decode.c): every expert's product is one
 * BLAS call, and the calls run side by side, one per thread (OpenMP, dynamic schedule), each on a single core.
 *
 * BLAS is torch's own (the caller passes the address of the sgemm_ its libtorch exports; MKL runs single-threaded
 * inside a parallel region). Splitting each product over all threads, as torch's grouped_mm does, costs each
 * product a fork/join and a worse blocking; one product per core measured ~4% faster on the fine-grained shapes
 * (E=64, ~512 rows per expert) on 2 cores (docs/performance.md). A group of more than `chunk` rows is cut into
 * pieces of at most `chunk` (rows for the products, output rows of the weight gradient), so one large expert does
 * not leave the other threads idle.
 *
 * Rows of expert e are offs[e]..offs[e+1] (row-major matrices, unit stride along a row):
 *   mode 0: Y[rows] = X[rows] @ W[e]^T    X (N, I), W (E, O, I), Y (N, O)     the forward
 *   mode 1: Y[rows] = X[rows] @ W[e]      X (N, O), W (E, O, I), Y (N, I)     the input gradient
 * W[e] is row-major (element (o, i) at o * ldw + i) or, with wt set, stored (in, out) and seen transposed (element
 * (o, i) at i * ldw + o: gpt-oss's and Llama 4's layout); the same products then take the other transposition flag.
 *   mode 2: Y[e] = X[rows]^T @ W[rows]    X (N, O), W (N, I) (the forward's input rows), Y (E, O, I) contiguous:
 *                                                                            the weight gradient (zero for no rows)
 * Returns 1 when the work list cannot be allocated, else 0. */

typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *, const float *,
                         const float *, const int *, const float *, const int *, const float *, float *, const int *);

int moekit_grouped_gemm(void *sgemm_ptr, int mode, i64 E, const i64 *offs, const float *X, i64 ldx, const float *W,
                        i64 sWe, i64 ldw, int wt, float *Y, i64 ldy, i64 O, i64 I, i64 chunk, int threads) {
    const sgemm_fn sgemm = (sgemm_fn)sgemm_ptr;
    i64 items = 0;
    for (i64 e = 0; e < E; e++) {
        const i64 n = offs[e + 1] - offs[e];
        items += n > chunk ? (n + chunk - 1) / chunk : 1;
    }
    i64 *work = malloc(sizeof(i64) * 3 * (items > 0 ? items : 1)); /* (expert, first, count) per item */
    if (!work) return 1;
    i64 w = 0;
    for (i64 e = 0; e < E; e++) {
        const i64 n = offs[e + 1] - offs[e];
        const i64 extent = mode == 2 ? O : n; /* what an item splits: output rows of dW, or the group's rows */
        const i64 pieces = n > chunk ? (n + chunk - 1) / chunk : 1;
        const i64 step = (extent + pieces - 1) / pieces;
        for (i64 p = 0; p < pieces; p++) {
            const i64 first = p * step, count = first >= extent ? 0 : (extent - first < step ? extent - first : step);
            work[3 * w] = e, work[3 * w + 1] = first, work[3 * w + 2] = count;
            w++;
        }
    }
    const float one = 1.0f, zero = 0.0f;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (i64 it = 0; it < items; it++) {
        const i64 e = work[3 * it], first = work[3 * it + 1];
        int cnt = (int)work[3 * it + 2], n = (int)(offs[e + 1] - offs[e]);
        int o = (int)O, in = (int)I, lx = (int)ldx, lw = (int)ldw, ly = (int)ldy;
        if (mode == 2) {
            float *Ye = Y + (e * O + first) * I;
            if (!n) {
                memset(Ye, 0, sizeof(float) * cnt * I);
                continue;
            }
            if (cnt) /* dY rows first..first+cnt: X[rows, first:first+cnt]^T @ W[rows] */
                sgemm("N", "T", &in, &cnt, &n, &one, W + offs[e] * ldw, &lw, X + offs[e] * ldx + first, &lx, &zero,
                      Ye, &in);
        } else if (cnt) {
            const i64 r = offs[e] + first;
            /* column-major view: a row-major W[e] is an (I, O) matrix, a transposed one an (O, I) matrix */
            const char *flag = (mode == 0) != (wt != 0) ? "T" : "N";
            if (mode == 0)
                sgemm(flag, "N", &o, &cnt, &in, &one, W + e * sWe, &lw, X + r * ldx, &lx, &zero, Y + r * ldy, &ly);
            else
                sgemm(flag, "N", &in, &cnt, &o, &one, W + e * sWe, &lw, X + r * ldx, &lx, &zero, Y + r * ldy, &ly);
        }
    }
    free(work);
    return 0;
}
