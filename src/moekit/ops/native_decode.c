/* moekit's native decode kernels: y = x @ W_e^T (+ b_e) for a few rows per expert, reading each touched expert's
 * weight once at close to memory bandwidth (CPU decode; BLAS runs such skinny products on one core or through a
 * packing GEMM). Built on first use by moekit/ops/native.py (gcc -O3 -march=native -fopenmp) and called through
 * ctypes; the OpenMP runtime is the one torch already loaded (libgomp.so.1), so the threads are torch's.
 *
 * Groups: group g multiplies rows rows[offs[g]:offs[g+1]] of x by expert experts[g]'s weight and writes the same
 * rows of y (row n of the input gives row n of the output). Expert e's weight element (o, d) is at
 *   rows layout: w[e*sE + o*ldw + d]   (an (out, in) weight, rows contiguous: moekit's banks)
 *   cols layout: w[e*sE + d*ldw + o]   (an (in, out) weight: a transposed view, e.g. HF's gpt-oss gate_up_proj)
 * b (may be NULL): b[e*sbE + o]. At most MAX_ROWS rows per group. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef int64_t i64;
#define MAX_ROWS 16
#define OBLOCK 64 /* output rows per work item (rows layout) */

/* Every entry point first checks its groups and returns, computing nothing: 11 where the offsets do not run from 0
 * to R in order, 12 for an expert id outside [0, E) or a group of more than MAX_ROWS rows, 13 for a row id outside
 * [0, nrows); 1 when a work buffer cannot be allocated; 0 on success. R = offs[G] is passed separately (the number
 * of row ids the caller holds) so a wrong last offset is caught. */
static int check_groups(i64 G, const i64 *experts, const i64 *offs, const i64 *rows, i64 R, i64 E, i64 nrows) {
    if (offs[0] != 0 || offs[G] != R) return 1;
    for (i64 g = 0; g < G; g++) {
        if (offs[g + 1] < offs[g]) return 1;
        if (experts[g] < 0 || experts[g] >= E || offs[g + 1] - offs[g] > MAX_ROWS) return 2;
    }
    for (i64 r = 0; r < R; r++)
        if (rows[r] < 0 || rows[r] >= nrows) return 3;
    return 0;
}

static inline float bias_at(const float *b, i64 o) { return b ? b[o] : 0.0f; }

/* Output rows [o0, o1) of one expert for M input rows: blocks of 4 weight rows x 2 input rows (8 independent
 * accumulators hide the FMA latency; the 4 weight rows stay in L1 across the input rows). */
static void rows_block(const float *x, i64 ldx, const i64 *rows, i64 M, const float *w, i64 ldw, i64 D, i64 o0,
                       i64 o1, const float *b, float *y, i64 ldy) {
    i64 o = o0;
    for (; o + 4 <= o1; o += 4) {
        const float *w0 = w + o * ldw, *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
        i64 m = 0;
        for (; m + 2 <= M; m += 2) {
            const float *xa = x + m * ldx, *xb = x + (m + 1) * ldx;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0, c0 = 0, c1 = 0, c2 = 0, c3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, c0, c1, c2, c3)
            for (i64 d = 0; d < D; d++) {
                float u = xa[d], v = xb[d];
                a0 += w0[d] * u;
                a1 += w1[d] * u;
                a2 += w2[d] * u;
                a3 += w3[d] * u;
                c0 += w0[d] * v;
                c1 += w1[d] * v;
                c2 += w2[d] * v;
                c3 += w3[d] * v;
            }
            float *ya = y + rows[m] * ldy + o, *yb = y + rows[m + 1] * ldy + o;
            ya[0] = a0 + bias_at(b, o), ya[1] = a1 + bias_at(b, o + 1);
            ya[2] = a2 + bias_at(b, o + 2), ya[3] = a3 + bias_at(b, o + 3);
            yb[0] = c0 + bias_at(b, o), yb[1] = c1 + bias_at(b, o + 1);
            yb[2] = c2 + bias_at(b, o + 2), yb[3] = c3 + bias_at(b, o + 3);
        }
        for (; m < M; m++) {
            const float *xm = x + m * ldx;
            float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (i64 d = 0; d < D; d++) {
                float xv = xm[d];
                a0 += w0[d] * xv;
                a1 += w1[d] * xv;
                a2 += w2[d] * xv;
                a3 += w3[d] * xv;
            }
            float *ym = y + rows[m] * ldy + o;
            ym[0] = a0 + bias_at(b, o), ym[1] = a1 + bias_at(b, o + 1);
            ym[2] = a2 + bias_at(b, o + 2), ym[3] = a3 + bias_at(b, o + 3);
        }
    }
    for (; o < o1; o++) {
        const float *w0 = w + o * ldw;
        for (i64 m = 0; m < M; m++) {
            const float *xm = x + m * ldx;
            float a0 = 0;
#pragma omp simd reduction(+ : a0)
            for (i64 d = 0; d < D; d++) a0 += w0[d] * xm[d];
            y[rows[m] * ldy + o] = a0 + bias_at(b, o);
        }
    }
}

/* Output rows: rows_block reads input row m of a group at xp + m * ldp, a packed copy of the group's rows whose
 * stride is padded off a multiple of 4 KiB (rows 4 KiB apart share L1 sets with the weight rows and evict them). */
int moekit_rows_f32(const float *x, i64 ldx, float *y, i64 ldy, i64 G, const i64 *experts, const i64 *offs,
                    const i64 *rows, i64 R, i64 E, i64 nrows, const float *w, i64 sE, i64 ldw, i64 O, i64 D,
                    const float *b, i64 sbE, int threads) {
    int bad = check_groups(G, experts, offs, rows, R, E, nrows);
    if (bad) return 10 + bad;
    i64 ldp = ((D + 15) / 16) * 16 + 16;
    float *xp = (float *)aligned_alloc(64, sizeof(float) * (size_t)(R > 0 ? R : 1) * ldp);
    if (!xp) return 1;
    for (i64 r = 0; r < R; r++) memcpy(xp + r * ldp, x + rows[r] * ldx, sizeof(float) * (size_t)D);
    i64 blocks = (O + OBLOCK - 1) / OBLOCK;
    i64 items = G * blocks;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (i64 it = 0; it < items; it++) {
        i64 g = it / blocks, blk = it % blocks;
        i64 e = experts[g];
        i64 o0 = blk * OBLOCK, o1 = o0 + OBLOCK < O ? o0 + OBLOCK : O;
        rows_block(xp + offs[g] * ldp, ldp, rows + offs[g], offs[g + 1] - offs[g], w + e * sE, ldw, D, o0, o1,
                   b ? b + e * sbE : NULL, y, ldy);
    }
    free(xp);
    return 0;
}

/* cols layout: each thread takes a contiguous slice of the reduction and sweeps it four weight rows at a time (four
 * sequential streams), adding x[m, d..d+3] * W[d..d+3, :] into a full-width partial row per input row (the partial
 * stays in L1/L2; the four weight rows in L2 across the input rows); then the threads add the partials over
 * disjoint output ranges. */
int moekit_cols_f32(const float *x, i64 ldx, float *y, i64 ldy, i64 G, const i64 *experts, const i64 *offs,
                    const i64 *rows, i64 R, i64 E, i64 nrows, const float *w, i64 sE, i64 ldw, i64 O, i64 D,
                    const float *b, i64 sbE, int threads) {
    int bad = check_groups(G, experts, offs, rows, R, E, nrows);
    if (bad) return 10 + bad;
    if (threads < 1) threads = 1;
    float *parts = (float *)malloc(sizeof(float) * (size_t)threads * MAX_ROWS * (size_t)O);
    if (!parts) return 1;
    for (i64 g = 0; g < G; g++) {
        i64 M = offs[g + 1] - offs[g];
        const i64 *rg = rows + offs[g];
        const float *we = w + experts[g] * sE;
        const float *be = b ? b + experts[g] * sbE : NULL;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
            int t = omp_get_thread_num(), T = omp_get_num_threads();
            float *part = parts + (size_t)t * MAX_ROWS * O;
            i64 d0 = D * t / T, d1 = D * (t + 1) / T;
            memset(part, 0, sizeof(float) * (size_t)M * O);
            i64 d = d0;
            for (; d + 4 <= d1; d += 4) {
                const float *r0 = we + d * ldw, *r1 = r0 + ldw, *r2 = r1 + ldw, *r3 = r2 + ldw;
                for (i64 m = 0; m < M; m++) {
                    const float *xm = x + rg[m] * ldx + d;
                    float u0 = xm[0], u1 = xm[1], u2 = xm[2], u3 = xm[3];
                    float *pm = part + m * O;
#pragma omp simd
                    for (i64 o = 0; o < O; o++) pm[o] += u0 * r0[o] + u1 * r1[o] + u2 * r2[o] + u3 * r3[o];
                }
            }
            for (; d < d1; d++) {
                const float *r0 = we + d * ldw;
                for (i64 m = 0; m < M; m++) {
                    float u0 = x[rg[m] * ldx + d];
                    float *pm = part + m * O;
#pragma omp simd
                    for (i64 o = 0; o < O; o++) pm[o] += u0 * r0[o];
                }
            }
#pragma omp barrier
            i64 q0 = O * t / T, q1 = O * (t + 1) / T;
            for (i64 m = 0; m < M; m++) {
                float *ym = y + rg[m] * ldy;
                for (i64 o = q0; o < q1; o++) ym[o] = bias_at(be, o);
                for (int s = 0; s < T; s++) {
                    const float *pm = parts + (size_t)s * MAX_ROWS * O + m * O;
#pragma omp simd
                    for (i64 o = q0; o < q1; o++) ym[o] += pm[o];
                }
            }
        }
    }
    free(parts);
    return 0;
}

/* A whole expert FFN for few rows, fused: h = x @ W_in^T (+ b_in); g = act(h[:, :F]) * h[:, F:] (glu) or act(h);
 * y = g @ W2^T (+ b2). Both weights in the rows layout: W_in (E, H, D) with H = 2F (glu) or F, W2 (E, D', F).
 * act: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu. One parallel region, the phases separated by
 * barriers; h and g live in packed buffers (padded strides). */
static inline float act_fn(float v, int act) {
    switch (act) {
    case 0: return v / (1.0f + expf(-v));
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 2: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
    }
}

static inline i64 padded(i64 n) { return ((n + 15) / 16) * 16 + 16; }

int moekit_ffn_f32(const float *x, i64 ldx, float *y, i64 ldy, i64 G, const i64 *experts, const i64 *offs,
                   const i64 *rows, i64 R, i64 E, i64 nrows, const float *w_in, i64 sE_in, i64 ld_in, i64 H, i64 D, const float *b_in,
                   i64 sb_in, const float *w2, i64 sE2, i64 ld2, i64 Dout, const float *b2, i64 sb2, int glu, int act,
                   int threads) {
    int bad = check_groups(G, experts, offs, rows, R, E, nrows);
    if (bad) return 10 + bad;
    i64 F = glu ? H / 2 : H;
    i64 ldp = padded(D), ldh = padded(H), ldg = padded(F);
    size_t n1 = (size_t)(R > 0 ? R : 1);
    float *xp = (float *)aligned_alloc(64, sizeof(float) * n1 * ldp);
    float *h = (float *)aligned_alloc(64, sizeof(float) * n1 * ldh);
    float *gbuf = (float *)aligned_alloc(64, sizeof(float) * n1 * ldg);
    i64 *pos = (i64 *)malloc(sizeof(i64) * n1);
    if (!xp || !h || !gbuf || !pos) {
        free(xp), free(h), free(gbuf), free(pos);
        return 1;
    }
    for (i64 r = 0; r < R; r++) {
        memcpy(xp + r * ldp, x + rows[r] * ldx, sizeof(float) * (size_t)D);
        pos[r] = r;
    }
    i64 blocks1 = (H + OBLOCK - 1) / OBLOCK, blocks2 = (Dout + OBLOCK - 1) / OBLOCK;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (i64 it = 0; it < G * blocks1; it++) {
            i64 g = it / blocks1, blk = it % blocks1, e = experts[g];
            i64 o0 = blk * OBLOCK, o1 = o0 + OBLOCK < H ? o0 + OBLOCK : H;
            rows_block(xp + offs[g] * ldp, ldp, pos + offs[g], offs[g + 1] - offs[g], w_in + e * sE_in, ld_in, D, o0,
                       o1, b_in ? b_in + e * sb_in : NULL, h, ldh);
        }
        /* (implicit barrier) */
#pragma omp for schedule(static)
        for (i64 r = 0; r < R; r++) {
            const float *hr = h + r * ldh;
            float *gr = gbuf + r * ldg;
            if (glu)
                for (i64 j = 0; j < F; j++) gr[j] = act_fn(hr[j], act) * hr[F + j];
            else
                for (i64 j = 0; j < F; j++) gr[j] = act_fn(hr[j], act);
        }
#pragma omp for schedule(static)
        for (i64 it = 0; it < G * blocks2; it++) {
            i64 g = it / blocks2, blk = it % blocks2, e = experts[g];
            i64 o0 = blk * OBLOCK, o1 = o0 + OBLOCK < Dout ? o0 + OBLOCK : Dout;
            rows_block(gbuf + offs[g] * ldg, ldg, rows + offs[g], offs[g + 1] - offs[g], w2 + e * sE2, ld2, F, o0, o1,
                       b2 ? b2 + e * sb2 : NULL, y, ldy);
        }
    }
    free(xp), free(h), free(gbuf), free(pos);
    return 0;
}
