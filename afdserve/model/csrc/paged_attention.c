/* Paged attention on a CPU, reading the KV cache in place, with a fixed arithmetic order.

Why a kernel of our own: the torch path gathers every sequence's KV blocks into a padded copy
each layer (two extra passes over the cache, the largest memory traffic of a decode step) and
its matmuls round according to the padded shapes. Here every query row is computed from its own
q vector and its own sequence's keys and values only, in an order fixed by nothing but its
position:
- score(j) = (sum over d = 0 .. Dh-1, in order, of q[d] * k_j[d], each term one fused
  multiply-add) * scale;
- softmax over positions 0 .. p: the maximum, a fixed polynomial exp (no libm), and the sum in
  KB lanes by position (lane j % KB) added in a fixed tree;
- out[d] = (sum over j = 0 .. p, in order, of p_j * v_j[d], fused multiply-adds) / sum.
So a row's result is independent of the other rows of the batch, of whether it is computed in a
prefill chunk (of any length) or a decode step, of the thread count and of the CPU: fmaf() is
correctly rounded everywhere (one instruction on AVX2, AVX-512 and NEON), the build forbids any
other contraction or reassociation (native.py), and the vector lanes (KB keys in the score
loop, Dh features in the value loop) are independent, so SIMD code computes exactly what scalar
code would.

Layout (model/attention.py): q, out [T, H, Dh]; k_cache, v_cache [Hkv, NB, BS, Dh] (head-major),
block_tables [S, MB] int64, per sequence s its first row in q (row0), query count (qlen) and the
position of its first query (start); query i of s sits at position start + i and attends to
positions 0 .. start + i. Query head h reads KV head h / rep, rep = H / Hkv; Dh <= MAX_DH.

One work item is (sequence, KV head, a block of up to QT queries): every key is loaded once for
the QT * rep query rows that share it. Items are spread over OpenMP threads (torch's own
runtime, loaded before this library); which thread runs an item does not change its result.
*/
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX__) && defined(__FMA__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON)
#include <arm_neon.h>
#endif

#define KB 8       /* keys per score block (the vector lanes of the score loop) */
#define QT 8       /* queries per work item */
#define PREFETCH 8 /* key groups the score pass asks for ahead of the one it computes */
#define MAX_DH 512 /* largest head dim (checked by the caller) */

typedef uint16_t u16;

static inline float bf16_to_f32(u16 h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline u16 f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

static inline float f16_to_f32(u16 h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}

static inline u16 f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    u16 h;
    memcpy(&h, &x, 2);
    return h;
}

/* exp(x) for x <= 0 (scores minus their maximum): Cody-Waite range reduction and Cephes'
   degree-6 polynomial, about 1 ulp; pure arithmetic, so the same bits on every CPU. */
/* 8 float lanes (GCC/Clang vector extension: one AVX register, two SSE or NEON ones). Lane-wise
   IEEE arithmetic, so the bits are the scalar code's whatever the vector width. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f v8_load(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline v8f v8_splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* a * b + c, correctly rounded once per lane (fmaf's result) */
static inline v8f v8_fma(v8f a, v8f b, v8f c) {
#if defined(__AVX__) && defined(__FMA__)
    return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#elif defined(__ARM_NEON) && defined(__aarch64__)
    float32x4_t a0, a1, b0, b1, c0, c1;
    memcpy(&a0, &a, 16), memcpy(&a1, (char *)&a + 16, 16);
    memcpy(&b0, &b, 16), memcpy(&b1, (char *)&b + 16, 16);
    memcpy(&c0, &c, 16), memcpy(&c1, (char *)&c + 16, 16);
    c0 = vfmaq_f32(c0, a0, b0), c1 = vfmaq_f32(c1, a1, b1);
    v8f r;
    memcpy(&r, &c0, 16), memcpy((char *)&r + 16, &c1, 16);
    return r;
#else
    v8f r;
    for (int l = 0; l < 8; l++) r[l] = fmaf(a[l], b[l], c[l]);
    return r;
#endif
}

/* exp(x) for x <= 0 (scores minus their maximum), 8 at a time: Cody-Waite range reduction and
   Cephes' degree-6 polynomial, about 1 ulp; pure arithmetic, the same bits on every CPU. Below
   -87 the result is 0. */
static inline v8f v8_exp_nonpos(v8f x) {
    const v8i under = x < v8_splat(-87.0f); /* lanes of -1 where x < -87 */
    const v8f xc = (v8f)((v8i)x & ~under) + (v8f)((v8i)v8_splat(-87.0f) & under);
    const v8f fx = xc * v8_splat(1.44269504088896341f);
    const v8f n = (fx + v8_splat(12582912.0f)) - v8_splat(12582912.0f); /* nearest integer */
    v8f r = xc - n * v8_splat(0.693359375f);
    r = r - n * v8_splat(-2.12194440e-4f);
    v8f p = v8_splat(1.9875691500e-4f);
    p = p * r + v8_splat(1.3981999507e-3f);
    p = p * r + v8_splat(8.3334519073e-3f);
    p = p * r + v8_splat(4.1665795894e-2f);
    p = p * r + v8_splat(1.6666665459e-1f);
    p = p * r + v8_splat(5.0000001201e-1f);
    p = p * (r * r) + r + v8_splat(1.0f);
    const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return (v8f)((v8i)(p * (v8f)bits) & ~under);
}

/* KIND: 0 float32, 1 bfloat16, 2 float16. One loop per kind, so that each vectorises. */
static inline void load_row(float *dst, const void *src, int64_t base, int64_t n, int kind) {
    if (kind == 0) {
        const float *p = (const float *)src + base;
        for (int64_t i = 0; i < n; i++) dst[i] = p[i];
    } else if (kind == 1) {
        const u16 *p = (const u16 *)src + base;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(p[i]);
    } else {
        const u16 *p = (const u16 *)src + base;
        for (int64_t i = 0; i < n; i++) dst[i] = f16_to_f32(p[i]);
    }
}

static inline void store_row(void *dst, int64_t base, const float *src, float div, int64_t n,
                             int kind) {
    if (kind == 0) {
        float *p = (float *)dst + base;
        for (int64_t i = 0; i < n; i++) p[i] = src[i] / div;
    } else if (kind == 1) {
        u16 *p = (u16 *)dst + base;
        for (int64_t i = 0; i < n; i++) p[i] = f32_to_bf16(src[i] / div);
    } else {
        u16 *p = (u16 *)dst + base;
        for (int64_t i = 0; i < n; i++) p[i] = f32_to_f16(src[i] / div);
    }
}

/* The KV cache slot of position j of a sequence (its block table `table`), for KV head g. */
static inline int64_t slot_of(const int64_t *table, int64_t j, int64_t g, int64_t NB, int64_t BS,
                              int64_t Dh) {
    return ((g * NB + table[j / BS]) * BS + j % BS) * Dh;
}

/* Row pointers (float32) to keys or values j0 .. j0 + KB - 1 (at element offsets `offs`): into
   the cache itself for float32, into `stage` ([KB, Dh]) converted otherwise; `zeros` past
   jmax. */
static inline void rows_of(const float **rows, float *stage, const float *zeros, const void *cache,
                           const int64_t *offs, int64_t j0, int64_t jmax, int64_t Dh, int kind) {
    for (int l = 0; l < KB; l++) {
        const int64_t j = j0 + l;
        if (j >= jmax) {
            rows[l] = zeros;
        } else if (kind == 0) {
            rows[l] = (const float *)cache + offs[j];
        } else {
            load_row(stage + l * Dh, cache, offs[j], Dh, kind);
            rows[l] = stage + l * Dh;
        }
    }
}

/* Ask for rows j0 .. j0 + KB - 1 to be on their way to the cache (the blocks of a sequence lie
   anywhere in memory, so the hardware prefetcher cannot guess the next one). */
static inline void prefetch_rows(const void *cache, const int64_t *offs, int64_t j0, int64_t jmax,
                                 int64_t Dh, int kind) {
    const int64_t elem = kind == 0 ? 4 : 2;
    for (int64_t j = j0; j < j0 + KB && j < jmax; j++) {
        const char *p = (const char *)cache + offs[j] * elem;
        for (int64_t b = 0; b < Dh * elem; b += 64) __builtin_prefetch(p + b);
    }
}

/* kt[d * KB + l] = rows[l][d]: eight 8x8 transposes per 64 features, in registers */
static inline void transpose_rows(float *kt, const float **rows, int64_t Dh) {
    int64_t d0 = 0;
#if defined(__clang__) || __GNUC__ >= 12
    for (; d0 + 8 <= Dh; d0 += 8) {
        const v8f r0 = v8_load(rows[0] + d0), r1 = v8_load(rows[1] + d0);
        const v8f r2 = v8_load(rows[2] + d0), r3 = v8_load(rows[3] + d0);
        const v8f r4 = v8_load(rows[4] + d0), r5 = v8_load(rows[5] + d0);
        const v8f r6 = v8_load(rows[6] + d0), r7 = v8_load(rows[7] + d0);
#define LO(a, b) __builtin_shufflevector(a, b, 0, 8, 1, 9, 4, 12, 5, 13)
#define HI(a, b) __builtin_shufflevector(a, b, 2, 10, 3, 11, 6, 14, 7, 15)
#define LO2(a, b) __builtin_shufflevector(a, b, 0, 1, 8, 9, 4, 5, 12, 13)
#define HI2(a, b) __builtin_shufflevector(a, b, 2, 3, 10, 11, 6, 7, 14, 15)
#define LO4(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11)
#define HI4(a, b) __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15)
        const v8f t0 = LO(r0, r1), t1 = HI(r0, r1), t2 = LO(r2, r3), t3 = HI(r2, r3);
        const v8f t4 = LO(r4, r5), t5 = HI(r4, r5), t6 = LO(r6, r7), t7 = HI(r6, r7);
        const v8f u0 = LO2(t0, t2), u1 = HI2(t0, t2), u2 = LO2(t1, t3), u3 = HI2(t1, t3);
        const v8f u4 = LO2(t4, t6), u5 = HI2(t4, t6), u6 = LO2(t5, t7), u7 = HI2(t5, t7);
        const v8f c[8] = {LO4(u0, u4), LO4(u1, u5), LO4(u2, u6), LO4(u3, u7),
                          HI4(u0, u4), HI4(u1, u5), HI4(u2, u6), HI4(u3, u7)};
#undef LO
#undef HI
#undef LO2
#undef HI2
#undef LO4
#undef HI4
        memcpy(kt + d0 * KB, c, sizeof c);
    }
#endif
    for (; d0 < Dh; d0++)
        for (int l = 0; l < KB; l++) kt[d0 * KB + l] = rows[l][d0];
}

/* scores[row, j0 + l] for the KB keys kt (transposed, [Dh, KB]) and rows row0 .. R - 1: a plain
   loop over d per row, four rows at a time so that four accumulator chains run in parallel */
static void score_block(float *scores, int64_t jpad, int64_t j0, const float *qf, const float *kt,
                        int64_t row0, int64_t R, int64_t Dh, float scale) {
    const v8f sc = v8_splat(scale);
    int64_t row = row0;
    for (; row + 4 <= R; row += 4) {
        const float *q0 = qf + row * Dh, *q1 = q0 + Dh, *q2 = q1 + Dh, *q3 = q2 + Dh;
        v8f a0 = v8_splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t d = 0; d < Dh; d++) {
            const v8f k = v8_load(kt + d * KB);
            a0 = v8_fma(v8_splat(q0[d]), k, a0);
            a1 = v8_fma(v8_splat(q1[d]), k, a1);
            a2 = v8_fma(v8_splat(q2[d]), k, a2);
            a3 = v8_fma(v8_splat(q3[d]), k, a3);
        }
        a0 = a0 * sc, a1 = a1 * sc, a2 = a2 * sc, a3 = a3 * sc;
        memcpy(scores + (row + 0) * jpad + j0, &a0, sizeof a0);
        memcpy(scores + (row + 1) * jpad + j0, &a1, sizeof a1);
        memcpy(scores + (row + 2) * jpad + j0, &a2, sizeof a2);
        memcpy(scores + (row + 3) * jpad + j0, &a3, sizeof a3);
    }
    for (; row < R; row++) {
        const float *qr = qf + row * Dh;
        v8f a = v8_splat(0.0f);
        for (int64_t d = 0; d < Dh; d++) a = v8_fma(v8_splat(qr[d]), v8_load(kt + d * KB), a);
        a = a * sc;
        memcpy(scores + row * jpad + j0, &a, sizeof a);
    }
}

/* acc[row, :] += sum over the KB keys j0.. (rows `vrows`), in key order, of p[row, j] * v_j:
   rows four at a time, 8 features at a time, the accumulators in registers over the keys
   (stored and reloaded exactly between groups, so the order is a plain loop over j). A row's
   probabilities past its own position are 0 (see the softmax), so adding them changes
   nothing. */
static void value_block(float *acc, const float *probs, int64_t jpad, int64_t j0,
                        const float **vrows, int64_t row0, int64_t R, int64_t Dh) {
    int64_t row = row0;
    for (; row + 4 <= R; row += 4) {
        const float *p0 = probs + row * jpad + j0, *p1 = p0 + jpad, *p2 = p1 + jpad,
                    *p3 = p2 + jpad;
        int64_t d = 0;
        for (; d + 8 <= Dh; d += 8) {
            float *c0 = acc + row * Dh + d, *c1 = c0 + Dh, *c2 = c1 + Dh, *c3 = c2 + Dh;
            v8f a0 = v8_load(c0), a1 = v8_load(c1), a2 = v8_load(c2), a3 = v8_load(c3);
            for (int j = 0; j < KB; j++) {
                const v8f v = v8_load(vrows[j] + d);
                a0 = v8_fma(v8_splat(p0[j]), v, a0);
                a1 = v8_fma(v8_splat(p1[j]), v, a1);
                a2 = v8_fma(v8_splat(p2[j]), v, a2);
                a3 = v8_fma(v8_splat(p3[j]), v, a3);
            }
            memcpy(c0, &a0, sizeof a0), memcpy(c1, &a1, sizeof a1);
            memcpy(c2, &a2, sizeof a2), memcpy(c3, &a3, sizeof a3);
        }
        for (; d < Dh; d++) /* Dh % 8 features, one at a time (same order) */
            for (int64_t r = 0; r < 4; r++)
                for (int j = 0; j < KB; j++)
                    acc[(row + r) * Dh + d] =
                        fmaf(probs[(row + r) * jpad + j0 + j], vrows[j][d], acc[(row + r) * Dh + d]);
    }
    for (; row < R; row++) {
        const float *pr = probs + row * jpad + j0;
        int64_t d = 0;
        for (; d + 32 <= Dh; d += 32) { /* 32 features in four registers */
            float *c = acc + row * Dh + d;
            v8f a0 = v8_load(c), a1 = v8_load(c + 8), a2 = v8_load(c + 16), a3 = v8_load(c + 24);
            for (int j = 0; j < KB; j++) {
                const v8f p = v8_splat(pr[j]);
                a0 = v8_fma(p, v8_load(vrows[j] + d), a0);
                a1 = v8_fma(p, v8_load(vrows[j] + d + 8), a1);
                a2 = v8_fma(p, v8_load(vrows[j] + d + 16), a2);
                a3 = v8_fma(p, v8_load(vrows[j] + d + 24), a3);
            }
            memcpy(c, &a0, sizeof a0), memcpy(c + 8, &a1, sizeof a1);
            memcpy(c + 16, &a2, sizeof a2), memcpy(c + 24, &a3, sizeof a3);
        }
        for (; d < Dh; d++)
            for (int j = 0; j < KB; j++) acc[row * Dh + d] = fmaf(pr[j], vrows[j][d], acc[row * Dh + d]);
    }
}

static void work_item(const void *q, const void *kc, const void *vc, const int64_t *table,
                      int64_t row0, int64_t q0, int64_t nq, int64_t start, int64_t g, int64_t H,
                      int64_t rep, int64_t Dh, int64_t NB, int64_t BS, float scale, void *out,
                      int kind, float *scratch) {
    /* query rows of this item, (query, head in group), padded to a multiple of 4 with zero
       rows so that every score and value loop runs four independent accumulator chains (the
       padding rows' results are computed and dropped; no real row depends on them) */
    const int64_t R = (nq * rep + 3) / 4 * 4;
    const int64_t jmax = start + q0 + nq;  /* keys 0 .. jmax - 1 are read by some row */
    const int64_t jpad = (jmax + KB - 1) / KB * KB;
    float *qf = scratch;                   /* [R, Dh] the queries, in float32 */
    float *stage = qf + R * Dh;            /* [KB, Dh] converted rows (bfloat16, float16) */
    float *zeros = stage + KB * Dh;        /* [Dh] the row past the last key */
    float *kt = zeros + Dh;                /* [Dh, KB] KB keys, transposed */
    float *acc = kt + Dh * KB;             /* [R, Dh] value sums */
    float *sums = acc + R * Dh;            /* [R] softmax denominators */
    float *scores = sums + R;              /* [R, jpad] scores, then probabilities */
    int64_t *offs = (int64_t *)(scores + R * jpad); /* [jmax] element offset of each position */
    const float *rows[KB];
    for (int64_t j = 0, jb = 0; j < jmax; jb++) /* one block-table lookup per block */
        for (int64_t o = 0; o < BS && j < jmax; o++, j++)
            offs[j] = ((g * NB + table[jb]) * BS + o) * Dh;
    memset(zeros, 0, sizeof(float) * Dh);
    memset(qf, 0, sizeof(float) * R * Dh);
    for (int64_t t = 0; t < nq; t++)
        for (int64_t r = 0; r < rep; r++) {
            const int64_t base = ((row0 + q0 + t) * H + g * rep + r) * Dh;
            load_row(qf + (t * rep + r) * Dh, q, base, Dh, kind);
        }
    /* pass 1, scores: score(row, j) = (sum over d in order of q[d] * k_j[d]) * scale, one fused
       multiply-add per term; a group's KB lanes are KB independent keys */
    for (int64_t j0 = 0; j0 < jmax; j0 += KB) {
        /* keys PREFETCH groups ahead (the blocks of a sequence lie anywhere in memory) */
        prefetch_rows(kc, offs, j0 + PREFETCH * KB, jmax, Dh, kind);
        rows_of(rows, stage, zeros, kc, offs, j0, jmax, Dh, kind);
        transpose_rows(kt, rows, Dh);
        /* rows that see a key of this group: query t sees positions <= start + q0 + t */
        const int64_t t_first = j0 - start - q0 > 0 ? j0 - start - q0 : 0;
        score_block(scores, jpad, j0, qf, kt, t_first * rep / 4 * 4, R, Dh, scale);
    }
    /* softmax over the row's own positions 0 .. n - 1: the maximum (order-free), exp, and the
       sum in KB lanes by position (lane j % KB), added up in a fixed tree */
    for (int64_t row = 0; row < R; row++) {
        float *s = scores + row * jpad;
        if (row >= nq * rep) { /* a padding row: probabilities 0, never stored */
            memset(s, 0, sizeof(float) * jpad);
            sums[row] = 1.0f;
            continue;
        }
        const int64_t n = start + q0 + row / rep + 1;
        float m = s[0];
        for (int64_t j = 1; j < n; j++) m = s[j] > m ? s[j] : m;
        /* positions n .. jpad - 1 are not this row's: -inf there makes their exp 0 */
        for (int64_t j = n; j < jpad; j++) s[j] = -INFINITY;
        v8f lane = v8_splat(0.0f);
        for (int64_t j = 0; j < jpad; j += KB) {
            const v8f e = v8_exp_nonpos(v8_load(s + j) - v8_splat(m));
            memcpy(s + j, &e, sizeof e);
            lane = lane + e;
        }
        sums[row] = ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                    ((lane[4] + lane[5]) + (lane[6] + lane[7]));
    }
    /* pass 2, values: acc[d] = fma(p_j, v_j[d], acc[d]) over j in order, for each feature d */
    memset(acc, 0, sizeof(float) * R * Dh);
    for (int64_t j0 = 0; j0 < jmax; j0 += KB) {
        prefetch_rows(vc, offs, j0 + PREFETCH * KB, jmax, Dh, kind);
        rows_of(rows, stage, zeros, vc, offs, j0, jmax, Dh, kind);
        const int64_t t_first = j0 - start - q0 > 0 ? j0 - start - q0 : 0;
        value_block(acc, scores, jpad, j0, rows, t_first * rep / 4 * 4, R, Dh);
    }
    for (int64_t t = 0; t < nq; t++)
        for (int64_t r = 0; r < rep; r++) {
            const int64_t row = t * rep + r;
            const int64_t base = ((row0 + q0 + t) * H + g * rep + r) * Dh;
            store_row(out, base, acc + row * Dh, sums[row], Dh, kind);
        }
}

/* Returns 0, -1 if scratch memory could not be allocated, -2 if Dh > MAX_DH. */
int afd_paged_attention(const void *q, const void *k_cache, const void *v_cache,
                        const int64_t *block_tables, int64_t max_blocks, const int64_t *row0,
                        const int64_t *qlen, const int64_t *start, int64_t S, int64_t H,
                        int64_t Hkv, int64_t Dh, int64_t NB, int64_t BS, float scale, void *out,
                        int kind, int nthreads) {
    const int64_t rep = H / Hkv;
    if (Dh > MAX_DH) return -2;
    /* work items (s, g, q0): list the query blocks first, then pair each with every KV head */
    int64_t nblocks = 0;
    for (int64_t s = 0; s < S; s++) nblocks += (qlen[s] + QT - 1) / QT;
    int64_t *items = (int64_t *)malloc(sizeof(int64_t) * 2 * (nblocks > 0 ? nblocks : 1));
    if (!items) return -1;
    int64_t at = 0;
    for (int64_t s = 0; s < S; s++)
        for (int64_t q0 = 0; q0 < qlen[s]; q0 += QT) {
            items[2 * at] = s;
            items[2 * at + 1] = q0;
            at++;
        }
    int failed = 0;
    const int64_t total = nblocks * Hkv;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1)
    for (int64_t w = 0; w < total; w++) {
        const int64_t b = w / Hkv, g = w % Hkv;
        const int64_t s = items[2 * b], q0 = items[2 * b + 1];
        const int64_t nq = qlen[s] - q0 < QT ? qlen[s] - q0 : QT;
        const int64_t R = (nq * rep + 3) / 4 * 4, jmax = start[s] + q0 + nq;
        const int64_t jpad = (jmax + KB - 1) / KB * KB;
        float *scratch = (float *)malloc(sizeof(float) * (2 * R * Dh + (2 * KB + 1) * Dh + R + R * jpad) +
                                         sizeof(int64_t) * jmax);
        if (!scratch) {
            failed = 1;
            continue;
        }
        work_item(q, k_cache, v_cache, block_tables + s * max_blocks, row0[s], q0, nq, start[s],
                  g, H, rep, Dh, NB, BS, scale, out, kind, scratch);
        free(scratch);
    }
    free(items);
    return failed ? -1 : 0;
}
