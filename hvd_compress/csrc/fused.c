/* Fused CPU kernels of hvd_compress (see hvd_compress/fused.py, which builds and loads this file).

Plain C, no torch headers: the Python side passes data pointers. One training step per tensor is one or two
passes over memory, in chunks that stay in L1: pass 1 forms x = g + e (stored into the caller's error buffer
when there is one), accumulates the statistics and whatever the encoding needs globally (a scale, a norm, the
largest exponent, TopK's candidates); pass 2, where the encoding needs that global, writes the payload and the
new error x - decode(payload). Compiled with -ffp-contract=off and without fast-math: every float operation is
the IEEE one written here, in the order written, so decode matches torch's elementwise ops bitwise. Sums use
fixed lanes (element i of a chunk goes to lane i % LANES) summed in a fixed order at the end: deterministic.
The float and double versions come from fused_impl.h, included twice. Where the CPU has AVX-512 (-march=native),
the kernels that are bound by their instructions rather than by memory (Natural's step, QSGD's second pass,
sign's and 1-bit's decode) also have a version 16 floats wide, with the same lanes and the same bits as the
AVX2 one (test_fused builds the library without AVX-512 and compares). */
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define LANES 16
#define CHUNK 2048

/* "lowbias32": its two multipliers, for the scalar mix and the vector one (MIX32_LANES) alike */
#define MIX_M1 0x7feb352dU
#define MIX_M2 0x846ca68bU
static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= MIX_M1; x ^= x >> 15; x *= MIX_M2; x ^= x >> 16;
    return x;
}

/* the counter-based random stream: element i of a call with keys (k1, k2) */
static inline uint32_t hash32(uint32_t i, uint32_t k1, uint32_t k2) { return mix32(mix32(i ^ k1) + k2); }

static inline float uniform_f(uint32_t h) { return (float)(int32_t)(h >> 8) * 0x1p-24f; }
static inline double uniform_d(uint32_t h) {
    /* h as a double, exactly (2^52 + h - 2^52), without an unsigned conversion AVX2 lacks */
    uint64_t b = 0x4330000000000000ULL | (uint64_t)h; double v; memcpy(&v, &b, 8);
    return (v - 4503599627370496.0) * 0x1p-32;
}

#ifdef __AVX2__
/* mix32 on every 32-bit lane of x, for one vector width: P the intrinsics' prefix (_mm256, _mm512), S the
   integer vector's suffix (si256, si512) */
#define MIX32_LANES(P, S, x) (x = P##_xor_##S(x, P##_srli_epi32(x, 16)), \
                              x = P##_mullo_epi32(x, P##_set1_epi32((int)MIX_M1)), \
                              x = P##_xor_##S(x, P##_srli_epi32(x, 15)), \
                              x = P##_mullo_epi32(x, P##_set1_epi32((int)MIX_M2)), \
                              P##_xor_##S(x, P##_srli_epi32(x, 16)))
static inline __m256i mix32_v(__m256i x) { return MIX32_LANES(_mm256, si256, x); }

/* hash32 of elements i .. i + 7 */
static inline __m256i hash8(uint32_t i, uint32_t k1, uint32_t k2) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32((int)i), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return mix32_v(_mm256_add_epi32(mix32_v(_mm256_xor_si256(idx, _mm256_set1_epi32((int)k1))),
                                    _mm256_set1_epi32((int)k2)));
}

/* uniform_f of elements i .. i + 7 */
static inline __m256 uniform8_f(uint32_t i, uint32_t k1, uint32_t k2) {
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(hash8(i, k1, k2), 8)), _mm256_set1_ps(0x1p-24f));
}

/* Natural's rounding of 8 floats (their magnitude bits) to a power of two: all ones where it goes up
   (deterministic: mantissa >= 0.75; else the uniform draw of elements i .. i + 7 < the mantissa fraction) */
static inline __m256i nat_up8(__m256i mag, int det, uint32_t i, uint32_t k1, uint32_t k2) {
    const __m256i fr = _mm256_and_si256(mag, _mm256_set1_epi32(0x7fffff));
    if (det)
        return _mm256_cmpgt_epi32(fr, _mm256_set1_epi32(0x3fffff));
    /* the draw (h >> 8) 2^-24 < the fraction fr 2^-23: exactly (h >> 8) < 2 fr, in integers below 2^24 */
    return _mm256_cmpgt_epi32(_mm256_slli_epi32(fr, 1), _mm256_srli_epi32(hash8(i, k1, k2), 8));
}

/* the exponent fields of 8 magnitudes mag rounded to a power of two as nat_up8 rounds: 0 for zero, EMAX or more
   for an inf, a NaN or a rounding past the largest float (deterministic: adding 2^22 carries into the exponent
   exactly where the mantissa is >= 0.75) */
static inline __m256i nat_ex8(__m256i mag, int det, uint32_t i, uint32_t k1, uint32_t k2) {
    if (det) return _mm256_srli_epi32(_mm256_add_epi32(mag, _mm256_set1_epi32(0x400000)), 23);
    return _mm256_sub_epi32(_mm256_srli_epi32(mag, 23), nat_up8(mag, 0, i, k1, k2));   /* nat_up8 is -1 where up */
}

#ifdef __AVX512F__
/* hash8 and nat_ex8 16 at a time (AVX-512): half the instructions, for kernels bound by them rather than memory */
static inline __m512i mix32_z(__m512i x) { return MIX32_LANES(_mm512, si512, x); }
static inline __m512i hash16(uint32_t i, uint32_t k1, uint32_t k2) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32((int)i),
                                         _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    return mix32_z(_mm512_add_epi32(mix32_z(_mm512_xor_si512(idx, _mm512_set1_epi32((int)k1))),
                                    _mm512_set1_epi32((int)k2)));
}
static inline __m512i nat_ex16(__m512i mag, int det, uint32_t i, uint32_t k1, uint32_t k2) {
    if (det) return _mm512_srli_epi32(_mm512_add_epi32(mag, _mm512_set1_epi32(0x400000)), 23);
    const __m512i fr = _mm512_and_si512(mag, _mm512_set1_epi32(0x7fffff));
    const __mmask16 up = _mm512_cmpgt_epi32_mask(_mm512_slli_epi32(fr, 1), _mm512_srli_epi32(hash16(i, k1, k2), 8));
    const __m512i ef = _mm512_srli_epi32(mag, 23);
    return _mm512_mask_add_epi32(ef, up, ef, _mm512_set1_epi32(1));
}
/* 16 floats to o: streamed when nt (use_nt checked 32-byte alignment; one 64-byte stream where o has it) */
static inline void put16(float *o, __m512 v, int nt) {
    if (!nt) _mm512_storeu_ps(o, v);
    else if (((uintptr_t)o & 63) == 0) _mm512_stream_ps(o, v);
    else {
        _mm256_stream_ps(o, _mm512_castps512_ps256(v));
        _mm256_stream_ps(o + 8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    }
}
/* acc[0..1] (lanes 0-7, 8-15) += the squares of 16 floats widened to double (exact, so fused = multiply, add) */
static inline void sq16z(__m512d acc[2], __m512 x) {
    const __m512d w0 = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    const __m512d w1 = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    acc[0] = _mm512_fmadd_pd(w0, w0, acc[0]); acc[1] = _mm512_fmadd_pd(w1, w1, acc[1]);
}
#endif

/* the low bytes of 8 int32 lanes (values that fit) to 8 bytes at out */
static inline void store8_u8(void *out, __m256i v) {
    __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(v, v), _mm256_setzero_si256());
    uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(w));
    uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(w, 1));
    memcpy(out, &lo, 4); memcpy((char *)out + 4, &hi, 4);
}

/* 16 int32 lanes (b0: elements 0-7, b1: 8-15) holding 0..255 (sgn: -128..127) to 16 bytes at out */
static inline void store16_bytes(void *out, __m256i b0, __m256i b1, int sgn) {
    /* words: b0 0-3, b1 0-3 | b0 4-7, b1 4-7; then dwords of 4 bytes: b0 0-3, b1 0-3, .. | b0 4-7, b1 4-7, .. */
    __m256i w = sgn ? _mm256_packs_epi32(b0, b1) : _mm256_packus_epi32(b0, b1);
    __m256i p = sgn ? _mm256_packs_epi16(w, w) : _mm256_packus_epi16(w, w);
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
    _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(p));
}

static inline void store8_i16(void *out, __m256i v) {
    __m256i w = _mm256_packs_epi32(v, v);
    _mm_storel_epi64((__m128i *)out, _mm256_castsi256_si128(w));
    _mm_storel_epi64((__m128i *)((char *)out + 8), _mm256_extracti128_si256(w, 1));
}

/* 16 floats (x0: elements 0-7, x1: 8-15) widened to the 4 double vectors of lanes 0-3, 4-7, 8-11, 12-15 */
static inline void widen16(__m256 x0, __m256 x1, __m256d w[4]) {
    w[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(x0)); w[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(x0, 1));
    w[2] = _mm256_cvtps_pd(_mm256_castps256_ps128(x1)); w[3] = _mm256_cvtps_pd(_mm256_extractf128_ps(x1, 1));
}
/* acc[l] += w[l] * w[l] for the 16 lanes, w widened from floats: the square of a float is exact in double, so
   a fused multiply-add rounds as the scalar lanes' multiply, then add, do */
static inline void sq16(__m256d acc[4], const __m256d w[4]) {
#ifdef __FMA__
    for (int q = 0; q < 4; q++) acc[q] = _mm256_fmadd_pd(w[q], w[q], acc[q]);
#else
    for (int q = 0; q < 4; q++) acc[q] = _mm256_add_pd(acc[q], _mm256_mul_pd(w[q], w[q]));
#endif
}
static inline void zero16(__m256d acc[4]) { for (int q = 0; q < 4; q++) acc[q] = _mm256_setzero_pd(); }
static inline void save16(const __m256d acc[4], double *lanes) {
    for (int q = 0; q < 4; q++) _mm256_storeu_pd(lanes + 4 * q, acc[q]);
}
/* x of elements i .. i + 7: g + e, or g itself */
static inline __m256 loadx8(const float *g, const float *e, int64_t i) {
    return e ? _mm256_add_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(e + i)) : _mm256_loadu_ps(g + i);
}
/* the same where e still owes its correction corr (NULL: none): g + (e - (e < 0 ? corr[1] : corr[0])) */
static inline __m256 loadxc8(const float *g, const float *e, const float *corr, int64_t i) {
    if (!corr) return loadx8(g, e, i);
    const __m256 ev = _mm256_loadu_ps(e + i);
    const __m256 sel = _mm256_blendv_ps(_mm256_set1_ps(corr[0]), _mm256_set1_ps(corr[1]),
                                        _mm256_cmp_ps(ev, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_add_ps(_mm256_loadu_ps(g + i), _mm256_sub_ps(ev, sel));
}
static inline void put8(float *o, __m256 v, int nt) { if (nt) _mm256_stream_ps(o, v); else _mm256_storeu_ps(o, v); }
#endif

/* streaming (non-temporal) stores for outputs far larger than the caches, when aligned for them */
#define NT_MIN_BYTES ((int64_t)8 << 20)
static inline int use_nt(const void *p, int64_t bytes) {
    return p && bytes >= NT_MIN_BYTES && ((uintptr_t)p & 31) == 0;
}
static inline void nt_done(int nt) {
#ifdef __AVX2__
    if (nt) _mm_sfence();
#else
    (void)nt;
#endif
}

static double sum_lanes(const double *a) {
    double s = 0.0;
    for (int l = 0; l < LANES; l++) s += a[l];
    return s;
}

int hvdc_version(void) { return 1; }

/* IEEE subnormals for the calling thread: flush-to-zero and denormals-are-zero off (TensorFlow's threads run with
   them on); returns the control word to give back to hvdc_ieee_end. A no-op without SSE. */
#ifdef __SSE__
#include <xmmintrin.h>
#define HVDC_FTZ_DAZ 0x8040u
unsigned hvdc_ieee_begin(void) { unsigned old = _mm_getcsr(); _mm_setcsr(old & ~HVDC_FTZ_DAZ); return old; }
void hvdc_ieee_end(unsigned old) { _mm_setcsr(old); }
#else
unsigned hvdc_ieee_begin(void) { return 0; }
void hvdc_ieee_end(unsigned old) { (void)old; }
#endif

/* RandK's draws t0 .. t0 + cnt - 1 (cnt <= DRAWS) in [0, n), n < 2^31: with hi, lo the stream's values 2t and
   2t + 1 (hash32), (hi n + (lo n >> 32)) >> 32, which is floor((hi 2^32 + lo) n / 2^64) exactly */
#define DRAWS 64
static void draws_below(int64_t t0, int64_t cnt, int64_t n, uint32_t k1, uint32_t k2, int64_t *out) {
    uint32_t h[2 * DRAWS];
    int64_t j = 0;
#ifdef __AVX2__
    for (; j + 8 <= 2 * cnt; j += 8) _mm256_storeu_si256((__m256i *)(h + j), hash8((uint32_t)(2 * t0 + j), k1, k2));
#endif
    for (; j < 2 * cnt; j++) h[j] = hash32((uint32_t)(2 * t0 + j), k1, k2);
    const uint64_t un = (uint64_t)n;
    for (j = 0; j < cnt; j++)
        out[j] = (int64_t)(((uint64_t)h[2 * j] * un + (((uint64_t)h[2 * j + 1] * un) >> 32)) >> 32);
}

/* the first k distinct values of m draws (RandK's stream with keys k1, k2, see draws_below), in increasing order,
   into out (room for k + 2: the scan writes up to two entries ahead); returns how many there were (up to k).
   mark: n bits, all clear, rounded up to whole 64-bit words (left clear). No branches on the data but the rare
   ones: a mispredicted branch per draw or per word of the bitmap would cost more than the memory it touches. */
int64_t hvdc_first_distinct(int64_t m, int64_t k, int64_t n, uint32_t k1, uint32_t k2, uint8_t *mark, int64_t *out) {
    int64_t c = 0, draws[DRAWS];
    for (int64_t t0 = 0; t0 < m && c < k; t0 += DRAWS) {
        const int64_t cnt = m - t0 < DRAWS ? m - t0 : DRAWS;
        draws_below(t0, cnt, n, k1, k2, draws);
        for (int64_t j = 0; j < cnt; j++) __builtin_prefetch(mark + (draws[j] >> 3), 1);
        for (int64_t j = 0; j < cnt && c < k; j++) {
            const int64_t v = draws[j];
            const uint8_t bit = (uint8_t)(1u << (v & 7)), old = mark[v >> 3];
            mark[v >> 3] = old | bit;
            c += !(old & bit);
        }
    }
    /* the marked values in increasing order: a scan of the bitmap, clearing it as it goes */
    const uint64_t top = (uint64_t)1 << 63;
    int64_t q = 0;
    for (int64_t w = 0; w < (n + 63) / 64; w++) {
        uint64_t b;
        memcpy(&b, mark + 8 * w, 8);
        memset(mark + 8 * w, 0, 8);
        out[q] = 64 * w + __builtin_ctzll(b | top); q += b != 0; b &= b - 1;
        out[q] = 64 * w + __builtin_ctzll(b | top); q += b != 0; b &= b - 1;
        for (; b; b &= b - 1) out[q++] = 64 * w + __builtin_ctzll(b);
    }
    return c;
}

/* a sparsifier's k increasing indices from the wire (see Compressor.wire_layout): index j is its block's start
   plus its low 16 bits, its block b the first whose count below[b] (of indices below the block's end; nbelow of
   them, one per block but the last) exceeds j */
void hvdc_index_expand(const uint16_t *low, int64_t k, const int32_t *below, int64_t nbelow, int32_t *out) {
    int64_t j = 0;
    for (int64_t b = 0; b <= nbelow; b++) {
        const int64_t end = b < nbelow && below[b] < k ? below[b] : k;
        const int32_t start = (int32_t)(b << 16);
        for (; j < end; j++) out[j] = start | low[j];
    }
}

/* a debugging aid: n draws of the stream, as the kernels see them */
void hvdc_hash(uint32_t *out, int64_t n, uint32_t k1, uint32_t k2) {
    for (int64_t i = 0; i < n; i++) out[i] = hash32((uint32_t)i, k1, k2);
}

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(hvdc_##name, SUF)

#define T float
#define IS_FLOAT 1
#define SUF f
#define IT int32_t
#define UT uint32_t
#define MBITS 23
#define BIAS 127
#define EMAX 255
#define ONE_BITS 0x3f800000U
#define UNIFORM uniform_f
#include "fused_impl.h"
#undef T
#undef SUF
#undef IT
#undef UT
#undef MBITS
#undef BIAS
#undef EMAX
#undef ONE_BITS
#undef UNIFORM

#undef IS_FLOAT
#define T double
#define IS_FLOAT 0
#define SUF d
#define IT int64_t
#define UT uint64_t
#define MBITS 52
#define BIAS 1023
#define EMAX 2047
#define ONE_BITS 0x3ff0000000000000ULL
#define UNIFORM uniform_d
#include "fused_impl.h"
