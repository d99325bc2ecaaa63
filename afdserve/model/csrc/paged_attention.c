/* Paged attention on a CPU, reading the KV cache in place, with a fixed arithmetic order.

Why a kernel of our own: the torch path gathers every sequence's KV blocks into a padded copy
each layer (two extra passes over the cache, the largest memory traffic of a decode step) and
its matmuls round according to the padded shapes. Here every query row is computed from its own
q vector and its own sequence's keys and values only, in an order fixed by nothing but its
position:
- score(j) = (dot product of q and k_j in 8 lanes: lane i sums q[d] * k_j[d] over d = i, i + 8,
  i + 16, ... in order, each term one fused multiply-add; the 8 lanes added in a fixed tree)
  * scale;
- softmax over positions 0 .. p: the maximum, a fixed polynomial exp (no libm), and the sum in
  KB lanes by position (lane j % KB) added in a fixed tree;
- out[d] = (sum over j = 0 .. p, in order, of p_j * v_j[d], fused multiply-adds) / sum.
So a row's result is independent of the other rows of the batch, of whether it is computed in a
prefill chunk (of any length) or a decode step, of the thread count and of the CPU: fmaf() is
correctly rounded everywhere (one instruction on AVX2, AVX-512 and NEON), the build forbids any
other contraction or reassociation (native.py), and the vector lanes (the 8 partial sums of a
score, Dh features in the value loop) are independent, so SIMD code computes exactly what
scalar code would.

A quantised cache (kv_kind 3: int8 codes, 4: fp8 e4m3 bytes; model/kv_quant.py) carries a float32
scale per (KV head, position), k_scale and v_scale [Hkv, NB, BS]: a key or value row is read as
code * scale in float32 (one correctly rounded product per element) and then used exactly as a
float32 row would be, so the order of the arithmetic, and with it every invariance above, is
unchanged.

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

/* The 256 values of an fp8 e4m3 (float8_e4m3fn) byte: sign, 4 exponent bits (bias 7), 3
   mantissa bits; exponent 0 is subnormal (mantissa * 2^-9), S.1111.111 is NaN, there is no
   infinity. Every value is exact in float32. */
static void fp8_e4m3_table(float *lut) {
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        float x = e == 0 ? ldexpf((float)m, -9) : ldexpf((float)(8 + m), e - 10);
        if (e == 15 && m == 7) x = NAN;
        lut[b] = (b & 128) ? -x : x;
    }
}

/* KIND: 0 float32, 1 bfloat16, 2 float16, 3 int8 codes, 4 fp8 e4m3 codes (3 and 4 times
   `scale`, the row's scale; `lut` the fp8 table). One loop per kind, so that each vectorises. */
static inline void load_row(float *dst, const void *src, int64_t base, int64_t n, int kind,
                            float scale, const float *lut) {
    if (kind == 3) {
        const int8_t *p = (const int8_t *)src + base;
        for (int64_t i = 0; i < n; i++) dst[i] = (float)p[i] * scale;
    } else if (kind == 4) {
        const uint8_t *p = (const uint8_t *)src + base;
        for (int64_t i = 0; i < n; i++) dst[i] = lut[p[i]] * scale;
    } else if (kind == 0) {
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

/* Row pointers (float32) to keys or values j0 .. j0 + KB - 1 (at element offsets `offs`): into
   the cache itself for float32, into `stage` ([KB, Dh]) converted (dequantised with the row's
   entry of `scales`, offset offs / Dh) otherwise; `zeros` past jmax. */
static inline void rows_of(const float **rows, float *stage, const float *zeros, const void *cache,
                           const int64_t *offs, int64_t j0, int64_t jmax, int64_t Dh, int kind,
                           const float *scales, const float *lut) {
    for (int l = 0; l < KB; l++) {
        const int64_t j = j0 + l;
        if (j >= jmax) {
            rows[l] = zeros;
        } else if (kind == 0) {
            rows[l] = (const float *)cache + offs[j];
        } else {
            const float sc = kind >= 3 ? scales[offs[j] / Dh] : 1.0f;
            load_row(stage + l * Dh, cache, offs[j], Dh, kind, sc, lut);
            rows[l] = stage + l * Dh;
        }
    }
}

/* Ask for rows j0 .. j0 + KB - 1 to be on their way to the cache (the blocks of a sequence lie
   anywhere in memory, so the hardware prefetcher cannot guess the next one). */
static inline void prefetch_rows(const void *cache, const int64_t *offs, int64_t j0, int64_t jmax,
                                 int64_t Dh, int kind) {
    const int64_t elem = kind == 0 ? 4 : kind >= 3 ? 1 : 2;
    for (int64_t j = j0; j < j0 + KB && j < jmax; j++) {
        const char *p = (const char *)cache + offs[j] * elem;
        for (int64_t b = 0; b < Dh * elem; b += 64) __builtin_prefetch(p + b);
    }
}

/* The fixed tree every lane sum uses: ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)). sum8(a)
   returns it for each of the eight vectors a[l], as lane l of one vector (pairwise even/odd
   shuffles: 14 shuffles and 7 adds for 8 sums, no horizontal add of one vector at a time). */
static inline v8f sum8(const v8f *a) {
#if defined(__clang__) || __GNUC__ >= 12
#define EV(x, y) __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14)
#define OD(x, y) __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15)
    /* b01 = (a0_01, a0_23, a1_01, a1_23 | a0_45, a0_67, a1_45, a1_67), xi_jk = xi_j + xi_k */
    const v8f b01 = EV(a[0], a[1]) + OD(a[0], a[1]), b23 = EV(a[2], a[3]) + OD(a[2], a[3]);
    const v8f b45 = EV(a[4], a[5]) + OD(a[4], a[5]), b67 = EV(a[6], a[7]) + OD(a[6], a[7]);
    /* c0 = (a0_0123, a1_0123, a2_0123, a3_0123 | a0_4567, ..., a3_4567) */
    const v8f c0 = EV(b01, b23) + OD(b01, b23), c1 = EV(b45, b67) + OD(b45, b67);
#undef EV
#undef OD
    return __builtin_shufflevector(c0, c1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(c0, c1, 4, 5, 6, 7, 12, 13, 14, 15);
#else
    v8f r;
    for (int l = 0; l < 8; l++)
        r[l] = ((a[l][0] + a[l][1]) + (a[l][2] + a[l][3])) + ((a[l][4] + a[l][5]) + (a[l][6] + a[l][7]));
    return r;
#endif
}

/* scores[row, j0 + l] for the KB keys `rows` and query rows row0 .. R - 1. A score is a dot
   product in 8 lanes: lane i sums q[d] * k[d] over d = i, i + 8, i + 16, ... in order, one fused
   multiply-add per term, and the lanes are added in sum8's tree; times scale. The KB keys' 8
   accumulators are 8 independent chains; the keys stay in L1 across the rows. */
static void score_block(float *scores, int64_t jpad, int64_t j0, const float *qf,
                        const float **rows, int64_t row0, int64_t R, int64_t Dh, float scale) {
    const v8f sc = v8_splat(scale);
    const int64_t dv = Dh / 8 * 8;
    for (int64_t row = row0; row < R; row++) {
        const float *qr = qf + row * Dh;
        v8f a[KB];
        for (int l = 0; l < KB; l++) a[l] = v8_splat(0.0f);
        for (int64_t d = 0; d < dv; d += 8) {
            const v8f qv = v8_load(qr + d);
            for (int l = 0; l < KB; l++) a[l] = v8_fma(qv, v8_load(rows[l] + d), a[l]);
        }
        for (int64_t d = dv; d < Dh; d++) /* Dh % 8 features: lane d % 8, same order */
            for (int l = 0; l < KB; l++) a[l][d - dv] = fmaf(qr[d], rows[l][d], a[l][d - dv]);
        const v8f s = sum8(a) * sc;
        memcpy(scores + row * jpad + j0, &s, sizeof s);
    }
}

/* acc[row + r, d .. d + 8 * NV) += sum over the KB keys j0.. (rows `vrows`), in key order, of
   p[row + r, j] * v_j, for NR rows: NR * NV accumulators in registers over the group (stored
   and reloaded exactly between groups, so the order is a plain loop over j). Called with
   constants, so that the loops unroll and the arrays live in registers. */
static inline __attribute__((always_inline)) void value_tile(float *acc, const float *probs,
                                                             int64_t jpad, int64_t j0,
                                                             const float **vrows, int64_t row,
                                                             int64_t d, int64_t Dh, const int NR,
                                                             const int NV) {
    v8f a[3][4];
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++) a[r][v] = v8_load(acc + (row + r) * Dh + d + 8 * v);
    for (int j = 0; j < KB; j++) {
        const float *vr = vrows[j] + d;
        for (int r = 0; r < NR; r++) {
            const v8f p = v8_splat(probs[(row + r) * jpad + j0 + j]);
            for (int v = 0; v < NV; v++) a[r][v] = v8_fma(p, v8_load(vr + 8 * v), a[r][v]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int v = 0; v < NV; v++) memcpy(acc + (row + r) * Dh + d + 8 * v, &a[r][v], sizeof(v8f));
}

/* value_tile over features d .. Dh - 1 for NR rows: 32 features at a time, then 8, then one */
static inline __attribute__((always_inline)) void value_rows(float *acc, const float *probs,
                                                             int64_t jpad, int64_t j0,
                                                             const float **vrows, int64_t row,
                                                             int64_t Dh, const int NR) {
    int64_t d = 0;
    for (; d + 32 <= Dh; d += 32) value_tile(acc, probs, jpad, j0, vrows, row, d, Dh, NR, 4);
    for (; d + 8 <= Dh; d += 8) value_tile(acc, probs, jpad, j0, vrows, row, d, Dh, NR, 1);
    for (; d < Dh; d++) /* Dh % 8 features, one at a time (same order) */
        for (int r = 0; r < NR; r++)
            for (int j = 0; j < KB; j++)
                acc[(row + r) * Dh + d] =
                    fmaf(probs[(row + r) * jpad + j0 + j], vrows[j][d], acc[(row + r) * Dh + d]);
}

/* acc[row, :] += sum over the KB keys j0.., in key order, of p[row, j] * v_j, rows row0 .. R - 1
   three at a time. A row's probabilities past its own position are 0 (see the softmax), so
   adding them changes nothing. */
static void value_block(float *acc, const float *probs, int64_t jpad, int64_t j0,
                        const float **vrows, int64_t row0, int64_t R, int64_t Dh) {
    int64_t row = row0;
    for (; row + 3 <= R; row += 3) value_rows(acc, probs, jpad, j0, vrows, row, Dh, 3);
    if (R - row == 2) value_rows(acc, probs, jpad, j0, vrows, row, Dh, 2);
    if (R - row == 1) value_rows(acc, probs, jpad, j0, vrows, row, Dh, 1);
}

static void work_item(const void *q, const void *kc, const void *vc, const int64_t *table,
                      int64_t row0, int64_t q0, int64_t nq, int64_t start, int64_t g, int64_t H,
                      int64_t rep, int64_t Dh, int64_t NB, int64_t BS, float scale, void *out,
                      int kind, int kv_kind, const float *ks, const float *vs, const float *lut,
                      float *scratch) {
    const int64_t R = nq * rep; /* query rows of this item: (query, head in group) */
    const int64_t jmax = start + q0 + nq;  /* keys 0 .. jmax - 1 are read by some row */
    const int64_t jpad = (jmax + KB - 1) / KB * KB;
    float *qf = scratch;                   /* [R, Dh] the queries, in float32 */
    float *stage = qf + R * Dh;            /* [KB, Dh] converted rows (all but float32) */
    float *zeros = stage + KB * Dh;        /* [Dh] the row past the last key */
    float *acc = zeros + Dh;               /* [R, Dh] value sums */
    float *sums = acc + R * Dh;            /* [R] softmax denominators */
    float *scores = sums + R;              /* [R, jpad] scores, then probabilities */
    int64_t *offs = (int64_t *)(scores + R * jpad); /* [jmax] element offset of each position */
    const float *rows[KB];
    for (int64_t j = 0, jb = 0; j < jmax; jb++) /* one block-table lookup per block */
        for (int64_t o = 0; o < BS && j < jmax; o++, j++)
            offs[j] = ((g * NB + table[jb]) * BS + o) * Dh;
    memset(zeros, 0, sizeof(float) * Dh);
    for (int64_t t = 0; t < nq; t++)
        for (int64_t r = 0; r < rep; r++) {
            const int64_t base = ((row0 + q0 + t) * H + g * rep + r) * Dh;
            load_row(qf + (t * rep + r) * Dh, q, base, Dh, kind, 1.0f, lut);
        }
    /* pass 1, scores: the 8-lane dot products of score_block, KB keys at a time */
    for (int64_t j0 = 0; j0 < jmax; j0 += KB) {
        /* keys PREFETCH groups ahead (the blocks of a sequence lie anywhere in memory) */
        prefetch_rows(kc, offs, j0 + PREFETCH * KB, jmax, Dh, kv_kind);
        rows_of(rows, stage, zeros, kc, offs, j0, jmax, Dh, kv_kind, ks, lut);
        /* rows that see a key of this group: query t sees positions <= start + q0 + t */
        const int64_t t_first = j0 - start - q0 > 0 ? j0 - start - q0 : 0;
        score_block(scores, jpad, j0, qf, rows, t_first * rep, R, Dh, scale);
    }
    /* softmax over the row's own positions 0 .. n - 1: the maximum (order-free), exp, and the
       sum in KB lanes by position (lane j % KB), added up in a fixed tree */
    for (int64_t row = 0; row < R; row++) {
        float *s = scores + row * jpad;
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
        prefetch_rows(vc, offs, j0 + PREFETCH * KB, jmax, Dh, kv_kind);
        rows_of(rows, stage, zeros, vc, offs, j0, jmax, Dh, kv_kind, vs, lut);
        const int64_t t_first = j0 - start - q0 > 0 ? j0 - start - q0 : 0;
        value_block(acc, scores, jpad, j0, rows, t_first * rep, R, Dh);
    }
    for (int64_t t = 0; t < nq; t++)
        for (int64_t r = 0; r < rep; r++) {
            const int64_t row = t * rep + r;
            const int64_t base = ((row0 + q0 + t) * H + g * rep + r) * Dh;
            store_row(out, base, acc + row * Dh, sums[row], Dh, kind);
        }
}

/* Returns 0, -1 if scratch memory could not be allocated, -2 if Dh > MAX_DH, -3 if a quantised
   kv_kind comes without its scales. kind: q and out; kv_kind: the cache (= kind unquantised). */
int afd_paged_attention(const void *q, const void *k_cache, const void *v_cache,
                        const int64_t *block_tables, int64_t max_blocks, const int64_t *row0,
                        const int64_t *qlen, const int64_t *start, int64_t S, int64_t H,
                        int64_t Hkv, int64_t Dh, int64_t NB, int64_t BS, float scale, void *out,
                        int kind, int nthreads, int kv_kind, const float *k_scale,
                        const float *v_scale) {
    const int64_t rep = H / Hkv;
    if (Dh > MAX_DH) return -2;
    if (kv_kind >= 3 && (!k_scale || !v_scale)) return -3;
    float lut[256]; /* fp8 e4m3 values, read-only in the parallel region */
    fp8_e4m3_table(lut);
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
        const int64_t R = nq * rep, jmax = start[s] + q0 + nq;
        const int64_t jpad = (jmax + KB - 1) / KB * KB;
        float *scratch = (float *)malloc(sizeof(float) * (2 * R * Dh + (KB + 1) * Dh + R + R * jpad) +
                                         sizeof(int64_t) * jmax);
        if (!scratch) {
            failed = 1;
            continue;
        }
        work_item(q, k_cache, v_cache, block_tables + s * max_blocks, row0[s], q0, nq, start[s],
                  g, H, rep, Dh, NB, BS, scale, out, kind, kv_kind, k_scale, v_scale, lut, scratch);
        free(scratch);
    }
    free(items);
    return failed ? -1 : 0;
}
