/* moekit's native decode kernels: y = x @ W_e^T (+ b_e) for a few rows per expert, reading each touched expert's
 * weight once at close to memory bandwidth (CPU decode; BLAS runs such skinny products on one core or through a
 * packing GEMM). Built on first use by moekit/ops/native.py (gcc -O3 -march=native -fopenmp) and called through
 * ctypes; the OpenMP runtime is the one torch already loaded (libgomp.so.1), so the threads are torch's.
 *
 * Groups: group g multiplies rows rows[offs[g]:offs[g+1]] of x by expert experts[g]'s weight and writes the same
 * rows of y (row n of the input gives row n of the output). Expert e's weight element (o, d) is at
 *   rows layout: w[e*sE + o*ldw + d]   (an (out, in) weight, rows contiguous: moekit's banks)
 *   cols layout: w[e*sE + d*ldw + o]   (an (in, out) weight: a transposed view, e.g. HF's gpt-oss gate_up_proj)
 * b (may be NULL): b[e*sbE + o]. At most MAX_ROWS rows per group.
 *
 * Each entry point exists for float32 (suffix _f32) and bfloat16 (_bf16) storage: native_kernels.h is included once
 * per type; arithmetic is float32 throughout (bfloat16 results are rounded once, to nearest even). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>

typedef int64_t i64;

/* moekit_moe_decode's arguments that describe the weights and the routing rule, laid out once by the caller
 * (moekit.ops.native.prepare_moe_decode, a ctypes Structure with these fields in this order) and handed to
 * moekit_moe_decode_args: a decode call then passes ten arguments instead of forty (ctypes converts each one:
 * ~7 us for forty on the development VM, more once a layer's weights have swept the caches). */
struct decode_args {
    i64 D;
    const void *wr;
    i64 ldr;
    const void *br;
    i64 E, k;
    int score, normalize;
    float scale;
    const float *sel_bias;
    i64 n_group, topk_group;
    int group_max;
    const void *w_in;
    i64 sE_in, ld_in;
    int cols_in;
    i64 H;
    const void *b_in;
    i64 sb_in;
    const void *w2;
    i64 sE2, ld2;
    int cols2;
    i64 Dout;
    const void *b2;
    i64 sb2;
    int glu, act;
    float alpha, limit;
};

/* sizeof(struct decode_args), checked against the ctypes Structure when the library loads */
i64 moekit_decode_args_size(void) { return (i64)sizeof(struct decode_args); }
#define MAX_ROWS 16
#define OBLOCK 64 /* output rows per work item (rows layout) */
/* Groups of up to ROWS_FEW_MAX rows take rows_few, per storage type: measured (one expert after a cache sweep, huge
 * pages) faster than the 4-row block up to 4 float32 rows (2026-12-07, AVX2 and AVX-512 alike then) and up to 6
 * bfloat16 rows. With the AVX-512 form's loads kept in registers, the L2 prefetch and the 16-row groups, float32
 * takes it at every group size: 5 / 8 / 16 rows at 1.46 / 1.52 / 2.23x a cold read of the expert, against 1.59 /
 * 1.92 / 2.86x for the 4-row block (2026-12-07, night, one-process A/B). */
#ifndef ROWS_FEW_MAX_F32
#if defined(__AVX512F__) && !defined(MOEKIT_NO_AVX512)
#define ROWS_FEW_MAX_F32 MAX_ROWS
#else
#define ROWS_FEW_MAX_F32 4
#endif
#endif
#ifndef ROWS_FEW_MAX_BF16
#define ROWS_FEW_MAX_BF16 6
#endif
/* The four-stream read's prefetch into L2 (native_kernels.h, FN(streams16)): how far ahead, and which lines (a
 * line at byte offset b of a row is prefetched where !(b & STREAM_PF_MASK)). Measured best, in one process on each
 * host (2026-12-08): every line 2 KiB ahead on the Intel Xeon VM (moe_decode 0.84-0.90x the time of one line in
 * four, 4 KiB ahead), one line in four 4 KiB ahead on the AMD EPYC (Zen 4) VM, where the other was not measured
 * (bfloat16 rows there: one line in four too, where the kernel before took one in two).
 * native.py defines MOEKIT_CPU_AMD from /proc/cpuinfo's vendor. */
#ifndef STREAM_PF_BYTES
#ifdef MOEKIT_CPU_AMD
#define STREAM_PF_BYTES 4096
#define STREAM_PF_MASK 255
#else
#define STREAM_PF_BYTES 2048
#define STREAM_PF_MASK 63
#endif
#endif

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

/* act: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu */
static inline float act_fn(float v, int act) {
    switch (act) {
    case 0: return v / (1.0f + expf(-v));
    case 1: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
    case 2: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
    }
}

static inline i64 padded(i64 n) { return ((n + 15) / 16) * 16 + 16; }

static inline float bf16_load(const uint16_t *p) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)*p << 16;
    return c.f;
}

static inline void bf16_store(uint16_t *p, float v) {
    union { float f; uint32_t u; } c;
    c.f = v;
    uint32_t u = c.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) { /* NaN: keep it a quiet NaN */
        *p = (uint16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest, ties to even */
    *p = (uint16_t)(u >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline __m256 bf16x8(const uint16_t *p) { /* 8 bfloat16 -> 8 float: widen, shift into the high half */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_shuffle_ps(a, a, 1)));
}
#define VLD_F32(p) _mm256_loadu_ps(p)
#define VLD_BF16(p) bf16x8(p)
/* AVX-512 builds read the few-row kernel's weights 16 columns at a time (FN(dot_rows); 4-11% faster at 2-4 rows
 * per expert after a cache sweep on Zen 4, level at 1 and 8). -DMOEKIT_NO_AVX512 builds the AVX2 form instead
 * (tests/test_native.py builds it so that form stays tested on AVX-512 machines). */
#if defined(__AVX512F__) && !defined(MOEKIT_NO_AVX512)
static inline __m512 bf16x16(const uint16_t *p) { /* 16 bfloat16 -> 16 float */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#define VLD16_F32(p) _mm512_loadu_ps(p)
#define VLD16_BF16(p) bf16x16(p)
#endif
#endif

#define WT float
#define SUF f32
#define LD(p) (*(p))
#define ST(p, v) (*(p) = (v))
#ifdef VLD_F32
#define VLD VLD_F32
#define ROWS_FEW_MAX ROWS_FEW_MAX_F32
#endif
#ifdef VLD16_F32
#define VLD16 VLD16_F32
#endif
#include "native_kernels.h"
#include "native_combine.h"
#include "native_glu.h"
#undef WT
#undef SUF
#undef LD
#undef ST
#undef BLOCK4X2
#undef VLD
#undef VLD16
#undef ROWS_FEW_MAX

#if defined(__AVX2__) && defined(__FMA__)
/* The 4-weight-row block of rows_block for bfloat16 weights with explicit AVX2 (gcc's own vectorisation of the
 * widening loads spilled its accumulators): every input row, pairs first; returns 1 (the block is done). */
static int block4_bf16(const float *x, i64 ldx, const i64 *out, i64 M, const uint16_t *w0, i64 ldw, i64 D, i64 o,
                       float b0, float b1, float b2, float b3, float *y, i64 ldy) {
    const uint16_t *w1 = w0 + ldw, *w2 = w1 + ldw, *w3 = w2 + ldw;
    i64 D8 = D & ~(i64)7;
    i64 m = 0;
    for (; m + 2 <= M; m += 2) {
        const float *xa = x + m * ldx, *xb = xa + ldx;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
        for (i64 d = 0; d < D8; d += 8) {
            __m256 u = _mm256_loadu_ps(xa + d), v = _mm256_loadu_ps(xb + d), p;
            p = bf16x8(w0 + d), a0 = _mm256_fmadd_ps(p, u, a0), c0 = _mm256_fmadd_ps(p, v, c0);
            p = bf16x8(w1 + d), a1 = _mm256_fmadd_ps(p, u, a1), c1 = _mm256_fmadd_ps(p, v, c1);
            p = bf16x8(w2 + d), a2 = _mm256_fmadd_ps(p, u, a2), c2 = _mm256_fmadd_ps(p, v, c2);
            p = bf16x8(w3 + d), a3 = _mm256_fmadd_ps(p, u, a3), c3 = _mm256_fmadd_ps(p, v, c3);
        }
        float s[8] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3), hsum8(c0), hsum8(c1), hsum8(c2), hsum8(c3)};
        for (i64 d = D8; d < D; d++) {
            float p0 = bf16_load(w0 + d), p1 = bf16_load(w1 + d), p2 = bf16_load(w2 + d), p3 = bf16_load(w3 + d);
            s[0] += p0 * xa[d], s[1] += p1 * xa[d], s[2] += p2 * xa[d], s[3] += p3 * xa[d];
            s[4] += p0 * xb[d], s[5] += p1 * xb[d], s[6] += p2 * xb[d], s[7] += p3 * xb[d];
        }
        float *ya = y + out[m] * ldy + o, *yb = y + out[m + 1] * ldy + o;
        ya[0] = s[0] + b0, ya[1] = s[1] + b1, ya[2] = s[2] + b2, ya[3] = s[3] + b3;
        yb[0] = s[4] + b0, yb[1] = s[5] + b1, yb[2] = s[6] + b2, yb[3] = s[7] + b3;
    }
    for (; m < M; m++) {
        const float *xm = x + m * ldx;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (i64 d = 0; d < D8; d += 8) {
            __m256 u = _mm256_loadu_ps(xm + d);
            a0 = _mm256_fmadd_ps(bf16x8(w0 + d), u, a0);
            a1 = _mm256_fmadd_ps(bf16x8(w1 + d), u, a1);
            a2 = _mm256_fmadd_ps(bf16x8(w2 + d), u, a2);
            a3 = _mm256_fmadd_ps(bf16x8(w3 + d), u, a3);
        }
        float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
        for (i64 d = D8; d < D; d++) {
            s[0] += bf16_load(w0 + d) * xm[d], s[1] += bf16_load(w1 + d) * xm[d];
            s[2] += bf16_load(w2 + d) * xm[d], s[3] += bf16_load(w3 + d) * xm[d];
        }
        float *ym = y + out[m] * ldy + o;
        ym[0] = s[0] + b0, ym[1] = s[1] + b1, ym[2] = s[2] + b2, ym[3] = s[3] + b3;
    }
    return 1;
}
#define BLOCK4X2 block4_bf16
#endif

#define WT uint16_t
#define SUF bf16
#define LD(p) bf16_load(p)
#define ST(p, v) bf16_store((p), (v))
#ifdef VLD_BF16
#define VLD VLD_BF16
#define ROWS_FEW_MAX ROWS_FEW_MAX_BF16
#endif
#ifdef VLD16_BF16
#define VLD16 VLD16_BF16
#endif
#include "native_kernels.h"
#include "native_combine.h"
#include "native_glu.h"
#undef WT
#undef SUF
#undef LD
#undef ST
#undef BLOCK4X2
#undef VLD
#undef VLD16
#undef ROWS_FEW_MAX

#include "native_gemm.h"
