/* The memory floor of a worker step with error feedback + the decode of 2 payloads: kernels that move the
   bytes of a payload layout (and form x = g + e) with no other arithmetic. The kernels benchmark times them
   beside the real ones (scripts/benchmarks/floor.py builds this file). */
#include <stdint.h>
#include <string.h>
#include <immintrin.h>

static void bytes8(uint8_t *out, __m256i v) {   /* the low bytes of 8 int32 lanes */
    __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(v, v), _mm256_setzero_si256());
    uint32_t lo = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(w));
    uint32_t hi = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(w, 1));
    memcpy(out, &lo, 4); memcpy(out + 4, &hi, 4);
}

/* one pass: x = g + e streamed into eout, and a code of `bits` (0, 1 or 8) bits per element: x's top bits */
void floor_pass(const float *g, const float *e, float *eout, uint8_t *code, int64_t n, int bits) {
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        __m256 x = _mm256_add_ps(_mm256_loadu_ps(g + i), _mm256_loadu_ps(e + i));
        _mm256_stream_ps(eout + i, x);
        if (bits == 8) bytes8(code + i, _mm256_srli_epi32(_mm256_castps_si256(x), 24));
        else if (bits == 1) code[i >> 3] = (uint8_t)_mm256_movemask_ps(x);
    }
    _mm_sfence();
}

/* a second pass over x (in eout): a byte per element written, eout rewritten in place */
void floor_second_pass(float *eout, uint8_t *code, int64_t n) {
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(eout + i);
        bytes8(code + i, _mm256_srli_epi32(_mm256_castps_si256(x), 24));
        _mm256_storeu_ps(eout + i, _mm256_mul_ps(x, _mm256_set1_ps(0.5f)));
    }
}

/* out = the sum of 2 rows of codes of `bits` (1 or 8) bits per element, streamed */
void floor_decode(const uint8_t *a, const uint8_t *b, float *out, int64_t n, int bits) {
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    for (int64_t i = 0; i + 8 <= n; i += 8) {
        __m256i v;
        if (bits == 8)
            v = _mm256_add_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a + i))),
                                 _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + i))));
        else
            v = _mm256_and_si256(_mm256_set1_epi32(a[i >> 3] + 256 * b[i >> 3]), lanes);
        _mm256_stream_ps(out + i, _mm256_cvtepi32_ps(v));
    }
    _mm_sfence();
}
