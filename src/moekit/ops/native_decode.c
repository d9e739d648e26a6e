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

#define WT float
#define SUF f32
#define LD(p) (*(p))
#define ST(p, v) (*(p) = (v))
#include "native_kernels.h"
#undef WT
#undef SUF
#undef LD
#undef ST

#define WT uint16_t
#define SUF bf16
#define LD(p) bf16_load(p)
#define ST(p, v) bf16_store((p), (v))
#include "native_kernels.h"
#undef WT
#undef SUF
#undef LD
#undef ST
