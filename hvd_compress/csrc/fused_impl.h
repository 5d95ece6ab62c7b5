/* The kernels for one floating type T (float or double): included by fused.c once per type. */

#define MMASK ((((UT)1) << MBITS) - 1)
#define SIGNBIT (((UT)1) << (8 * sizeof(T) - 1))

static inline T FN(from_bits)(UT b) { T v; memcpy(&v, &b, sizeof(T)); return v; }
static inline UT FN(to_bits)(T v) { UT b; memcpy(&b, &v, sizeof(T)); return b; }
/* Natural's rounding of one element with mantissa bits fr: 1 where it goes up to the next power of two
   (deterministic: mantissa >= 0.75; else element idx's uniform draw < the mantissa fraction) */
static inline UT FN(nat_up)(UT fr, int det, uint32_t idx, uint32_t k1, uint32_t k2) {
    if (det)
        return (UT)(fr >= (((UT)1) << (MBITS - 1)));
    return (UT)(UNIFORM(hash32(idx, k1, k2)) < FN(from_bits)(fr | ONE_BITS) - (T)1);
}

/* x of elements [i, i + m): pass 1 (stored = 0) forms g + e and writes it into xout when there is one;
   pass 2 (stored = 1) reads it back from xout, or forms it again into buf. Without e, x is g itself. */
static inline const T *FN(load)(const T *g, const T *e, T *xout, int64_t i, int64_t m, T *buf, int stored) {
    if (xout && stored) return xout + i;
    T *dst = xout ? xout + i : buf;
    if (e) {
        const T *gi = g + i, *ei = e + i;
        for (int64_t j = 0; j < m; j++) dst[j] = gi[j] + ei[j];
        return dst;
    }
    if (xout) { memcpy(dst, g + i, (size_t)m * sizeof(T)); return dst; }
    return g + i;
}

/* x = g + (e - (e < 0 ? corr[1] : corr[0])) of elements [i, i + m), into xout when given: e holds the x of
   the step before, whose error x - value a ScaledSign or OneBit step left to this one (see kernels.py, _defer) */
static inline const T *FN(load_corrected)(const T *g, const T *e, const T *corr, T *xout, int64_t i, int64_t m,
                                         T *buf) {
    T *dst = xout ? xout + i : buf;
    const T vp = corr[0], vn = corr[1];
    for (int64_t j = 0; j < m; j++) { T ej = e[i + j]; dst[j] = g[i + j] + (ej - (ej < 0 ? vn : vp)); }
    return dst;
}

#define CHUNKS(n) CHUNKS_FROM(0, n)
#define CHUNKS_FROM(i0, n) for (int64_t i = (i0), m; m = (n) - i < CHUNK ? (n) - i : CHUNK, i < (n); i += CHUNK)

/* lanes: the body runs on element j of the chunk, l its lane (j % LANES) */
#define LANE_LOOP(m, BODY) do { int64_t jb = 0; \
    for (; jb + LANES <= (m); jb += LANES) for (int l = 0; l < LANES; l++) { int64_t j = jb + l; BODY; } \
    for (int l = 0; jb + l < (m); l++) { int64_t j = jb + l; BODY; } } while (0)

/* flags x < 0 of a chunk (whose start is a multiple of 8) into bits, 8 per byte, little-endian */
static inline void FN(pack_negative)(const T *x, int64_t m, uint8_t *bits) {
    int64_t j = 0;
#ifdef __AVX2__
#if IS_FLOAT
    for (; j + 8 <= m; j += 8)
        bits[j >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), _mm256_setzero_ps(), _CMP_LT_OQ));
#else
    for (; j + 8 <= m; j += 8) {
        int lo = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + j), _mm256_setzero_pd(), _CMP_LT_OQ));
        int hi = _mm256_movemask_pd(_mm256_cmp_pd(_mm256_loadu_pd(x + j + 4), _mm256_setzero_pd(), _CMP_LT_OQ));
        bits[j >> 3] = (uint8_t)(lo | hi << 4);
    }
#endif
#endif
    for (; j < m; j += 8) {
        unsigned b = 0;
        for (int q = 0; q < 8 && j + q < m; q++) b |= (unsigned)(x[j + q] < 0) << q;
        bits[j >> 3] = (uint8_t)b;
    }
}

#if defined(__AVX2__) && IS_FLOAT
/* the float lanes of sum (x - x) (0, or NaN where some x is not finite) as one double */
static inline double FN(fin_of)(__m256 fin) {
    float f[8]; double s = 0.0;
    _mm256_storeu_ps(f, fin);
    for (int q = 0; q < 8; q++) s += f[q];
    return s;
}
#define FIN16(fin, x0, x1) fin = _mm256_add_ps(fin, _mm256_add_ps(_mm256_sub_ps(x0, x0), _mm256_sub_ps(x1, x1)))
#endif

/* x = g + e (into xout when given); st = [sum x^2, sum (x - x)]; returns 1 when some x is not finite */
int FN(addx)(const T *g, const T *e, T *xout, int64_t n, double *st) {
    double asq[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        const int nt = use_nt(xout, n * 4);
        __m256d q[4]; __m256 fin = _mm256_setzero_ps();
        zero16(q);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 x0 = loadx8(g, e, i0), x1 = loadx8(g, e, i0 + 8);
            if (xout) { put8(xout + i0, x0, nt); put8(xout + i0 + 8, x1, nt); }
            FIN16(fin, x0, x1);
            __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
        }
        nt_done(nt); save16(q, asq); afin[0] = FN(fin_of)(fin);
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, double v = x[j]; asq[l] += v * v; afin[l] += v - v);
    }
    st[0] = sum_lanes(asq); st[1] = sum_lanes(afin);
    return st[1] == 0.0 ? 0 : 1;
}

/* ScaledSign pass 1: st = [sum x^2, sum |x|, finiteness]; bits = x < 0. corr (both pass 1s): NULL, or the
   correction e still owes (see FN(load_corrected)) */
int FN(sign1)(const T *g, const T *e, const T *corr, T *xout, int64_t n, uint8_t *bits, double *st) {
    double asq[LANES] = {0}, aabs[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        const int nt = use_nt(xout, n * 4);
        const __m256d absm = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
        __m256d q[4], a[4]; __m256 fin = _mm256_setzero_ps(), zero = _mm256_setzero_ps();
        zero16(q); zero16(a);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 x0 = loadxc8(g, e, corr, i0), x1 = loadxc8(g, e, corr, i0 + 8);
            if (xout) { put8(xout + i0, x0, nt); put8(xout + i0 + 8, x1, nt); }
            bits[i0 >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(x0, zero, _CMP_LT_OQ));
            bits[(i0 >> 3) + 1] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(x1, zero, _CMP_LT_OQ));
            FIN16(fin, x0, x1);
            __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
            for (int k = 0; k < 4; k++) a[k] = _mm256_add_pd(a[k], _mm256_and_pd(w[k], absm));
        }
        nt_done(nt); save16(q, asq); save16(a, aabs); afin[0] = FN(fin_of)(fin);
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = corr ? FN(load_corrected)(g, e, corr, xout, i, m, buf)
                           : FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, double v = x[j]; asq[l] += v * v; aabs[l] += fabs(v); afin[l] += v - v);
        FN(pack_negative)(x, m, bits + (i >> 3));
    }
    st[0] = sum_lanes(asq); st[1] = sum_lanes(aabs); st[2] = sum_lanes(afin);
    return st[2] == 0.0 ? 0 : 1;
}

/* OneBit pass 1: st = [sum x^2, sum of x >= 0 (and NaN), sum of x < 0, count of x < 0, finiteness] */
int FN(onebit1)(const T *g, const T *e, const T *corr, T *xout, int64_t n, uint8_t *bits, double *st) {
    double asq[LANES] = {0}, apos[LANES] = {0}, aneg[LANES] = {0}, acnt[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        /* the sums of x and of |x| (then: positives (S + A) / 2, negatives (S - A) / 2), the count from the flags */
        const int nt = use_nt(xout, n * 4);
        const __m256d absm = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
        __m256d q[4], sx[4], sa[4]; __m256 fin = _mm256_setzero_ps(), zero = _mm256_setzero_ps();
        int64_t count = 0;
        zero16(q); zero16(sx); zero16(sa);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 x0 = loadxc8(g, e, corr, i0), x1 = loadxc8(g, e, corr, i0 + 8);
            if (xout) { put8(xout + i0, x0, nt); put8(xout + i0 + 8, x1, nt); }
            const unsigned b0 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x0, zero, _CMP_LT_OQ));
            const unsigned b1 = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(x1, zero, _CMP_LT_OQ));
            bits[i0 >> 3] = (uint8_t)b0; bits[(i0 >> 3) + 1] = (uint8_t)b1;
            count += __builtin_popcount(b0 | b1 << 8);
            FIN16(fin, x0, x1);
            __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
            for (int k = 0; k < 4; k++) {
                sx[k] = _mm256_add_pd(sx[k], w[k]);
                sa[k] = _mm256_add_pd(sa[k], _mm256_and_pd(w[k], absm));
            }
        }
        nt_done(nt); save16(q, asq); afin[0] = FN(fin_of)(fin);
        double xs[LANES], as[LANES];
        save16(sx, xs); save16(sa, as);
        const double S = sum_lanes(xs), A = sum_lanes(as);
        apos[0] = (S + A) / 2; aneg[0] = (S - A) / 2; acnt[0] = (double)count;
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = corr ? FN(load_corrected)(g, e, corr, xout, i, m, buf)
                           : FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, double v = x[j]; int neg = x[j] < 0; asq[l] += v * v; apos[l] += neg ? 0.0 : v;
                  aneg[l] += neg ? v : 0.0; acnt[l] += neg ? 1.0 : 0.0; afin[l] += v - v);
        FN(pack_negative)(x, m, bits + (i >> 3));
    }
    st[0] = sum_lanes(asq); st[1] = sum_lanes(apos); st[2] = sum_lanes(aneg); st[3] = sum_lanes(acnt);
    st[4] = sum_lanes(afin);
    return st[4] == 0.0 ? 0 : 1;
}

/* pass 2 of ScaledSign and OneBit: xout = x - (x < 0 ? vneg : vpos); st[0] = sum of its squares */
void FN(select2)(const T *g, const T *e, T *xout, int64_t n, T vpos, T vneg, double *st) {
    double ares[LANES] = {0};
    T buf[CHUNK];
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        const __m256 vp = _mm256_set1_ps(vpos), vn = _mm256_set1_ps(vneg), zero = _mm256_setzero_ps();
        __m256d q[4];
        zero16(q);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 x0 = _mm256_loadu_ps(xout + i0), x1 = _mm256_loadu_ps(xout + i0 + 8);
            __m256 r0 = _mm256_sub_ps(x0, _mm256_blendv_ps(vp, vn, _mm256_cmp_ps(x0, zero, _CMP_LT_OQ)));
            __m256 r1 = _mm256_sub_ps(x1, _mm256_blendv_ps(vp, vn, _mm256_cmp_ps(x1, zero, _CMP_LT_OQ)));
            _mm256_storeu_ps(xout + i0, r0); _mm256_storeu_ps(xout + i0 + 8, r1);
            __m256d w[4]; widen16(r0, r1, w); sq16(q, w);
        }
        save16(q, ares);
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 1);
        T *o = xout + i;
        LANE_LOOP(m, T r = x[j] - (x[j] < 0 ? vneg : vpos); o[j] = r; ares[l] += (double)r * r);
    }
    st[0] = sum_lanes(ares);
}

/* Natural pass 1: up[i] = 1 where x_i rounds up to the next power of two (deterministic: mantissa >= 0.75;
   else a uniform draw < the mantissa fraction), *top = the largest rounded exponent (unbiased; 0 when all
   x are zero). Returns 1 for a subnormal, an inf or a NaN (the caller takes the general path). */
int FN(natural1)(const T *g, const T *e, T *xout, int64_t n, int det, uint32_t k1, uint32_t k2,
                 uint8_t *up, int64_t *top, double *st) {
    double asq[LANES] = {0};
    UT t = 0, bad = 0;       /* integer max / or: exact in any order, so gcc vectorizes them as they are */
    T buf[CHUNK];
    CHUNKS(n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
        uint8_t *u8 = up + i;
        int64_t j0 = 0;
#if defined(__AVX2__) && IS_FLOAT
        {
            const __m256i absm = _mm256_set1_epi32(0x7fffffff), emax = _mm256_set1_epi32(EMAX);
            const __m256i zero = _mm256_setzero_si256();
            __m256i tv = zero, bv = zero;
            for (; j0 + 8 <= m; j0 += 8) {
                __m256i b = _mm256_castps_si256(_mm256_loadu_ps(x + j0));
                __m256i mag = _mm256_and_si256(b, absm), ef = _mm256_srli_epi32(mag, MBITS);
                __m256i upm = nat_up8(mag, det, (uint32_t)(i + j0), k1, k2);
                __m256i u = _mm256_srli_epi32(upm, 31);
                __m256i isz = _mm256_cmpeq_epi32(mag, zero), ef0 = _mm256_cmpeq_epi32(ef, zero);
                tv = _mm256_max_epu32(tv, _mm256_andnot_si256(isz, _mm256_add_epi32(ef, u)));
                bv = _mm256_or_si256(bv, _mm256_or_si256(_mm256_andnot_si256(isz, ef0), _mm256_cmpeq_epi32(ef, emax)));
                store8_u8(u8 + j0, u);
            }
            uint32_t tt[8], bb[8];
            _mm256_storeu_si256((__m256i *)tt, tv); _mm256_storeu_si256((__m256i *)bb, bv);
            for (int q = 0; q < 8; q++) { t = t > tt[q] ? t : tt[q]; bad |= bb[q]; }
        }
#endif
        for (int64_t j = j0; j < m; j++) {
            UT mag = FN(to_bits)(x[j]) & ~SIGNBIT; UT ef = mag >> MBITS;
            UT u = FN(nat_up)(mag & MMASK, det, (uint32_t)(i + j), k1, k2); UT ex = mag == 0 ? 0 : ef + u;
            t = t > ex ? t : ex; bad |= (UT)((ef == 0) & (mag != 0)) | (UT)(ef == EMAX); u8[j] = (uint8_t)u;
        }
        LANE_LOOP(m, double v = x[j]; asq[l] += v * v);
    }
    *top = t ? (int64_t)t - BIAS : 0;
    st[0] = sum_lanes(asq);
    return bad ? 1 : 0;
}

/* Natural pass 2: code[i] (the up flags of pass 1) becomes the byte; xout = x - table[byte]; st[0] = residual */
void FN(natural2)(const T *g, const T *e, T *xout, int64_t n, int64_t top, uint8_t *code, const T *table,
                  double *st) {
    double ares[LANES] = {0};
    T buf[CHUNK], rbuf[CHUNK];
    const IT base = (IT)(top + BIAS + 1);
    CHUNKS(n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 1);
        uint8_t *c8 = code + i;
        T *o = xout ? xout + i : rbuf;
        for (int64_t j = 0; j < m; j++) {
            UT b = FN(to_bits)(x[j]); UT mag = b & ~SIGNBIT; IT ex = (IT)(mag >> MBITS) + (IT)c8[j];
            IT c = base - ex; c = (mag == 0) | (c > 127) ? 0 : c;
            IT s = (IT)((b >> (8 * sizeof(T) - 1)) & (UT)(mag != 0));
            c8[j] = (uint8_t)(c | s << 7);
        }
        for (int64_t j = 0; j < m; j++) o[j] = x[j] - table[c8[j]];
        LANE_LOOP(m, double r = o[j]; ares[l] += r * r);
    }
    st[0] = sum_lanes(ares);
}

/* Natural's step over one whole block (CHUNK floats at i) in registers: x = g + e, its codes against the largest
   rounded exponent so far (*trun, biased), xout = x - value (streamed when nt), the squares into the lanes asq
   (x) and ares (residual). A block that raises the largest exponent is done again with the new one (the lanes
   as they were before it): the same bytes, values and sums as coding it with its own maximum at once. A code
   is valid (not too small) where its exponent ex > max(0, t0 - 127); *bad on an inf, a NaN, a rounding up to
   2^128 (ex >= EMAX) or a subnormal (0 < magnitude < 2^-126, seen in the least magnitude - 1). */
#if defined(__AVX512F__) && IS_FLOAT
static void FN(natural_block)(const T *g, const T *e, T *xout, int64_t i, int det, uint32_t k1, uint32_t k2,
                              uint8_t *c8, int64_t *trun, double *asq, double *ares, UT *bad, int nt) {
    const __m512i absm = _mm512_set1_epi32(0x7fffffff), one = _mm512_set1_epi32(1);
    const __m512i sgn = _mm512_set1_epi32((int)0x80000000U);
    for (;;) {
        const int64_t t0 = *trun;
        const __m512i vbase = _mm512_set1_epi32((int32_t)(t0 + 1));
        const __m512i vlow = _mm512_set1_epi32(t0 > 127 ? (int32_t)(t0 - 127) : 0);
        __m512i tv = _mm512_setzero_si512(), low = _mm512_set1_epi32(-1);
        __m512d q[2] = {_mm512_loadu_pd(asq), _mm512_loadu_pd(asq + 8)};
        __m512d rq[2] = {_mm512_loadu_pd(ares), _mm512_loadu_pd(ares + 8)};
        for (int64_t j = 0; j < CHUNK; j += 16) {
            const int64_t at = i + j;
            _mm_prefetch((const char *)(g + at + CHUNK), _MM_HINT_T0);   /* the next block's lines */
            if (e) _mm_prefetch((const char *)(e + at + CHUNK), _MM_HINT_T0);
            const __m512 xv = e ? _mm512_add_ps(_mm512_loadu_ps(g + at), _mm512_loadu_ps(e + at))
                                : _mm512_loadu_ps(g + at);
            const __m512i b = _mm512_castps_si512(xv), mag = _mm512_and_si512(b, absm);
            const __m512i ex = nat_ex16(mag, det, (uint32_t)at, k1, k2);
            tv = _mm512_max_epu32(tv, ex);
            low = _mm512_min_epu32(low, _mm512_sub_epi32(mag, one));
            const __mmask16 valid = _mm512_cmpgt_epi32_mask(ex, vlow), nz = _mm512_test_epi32_mask(ex, ex);
            const __m512i sbit = _mm512_maskz_and_epi32(nz, b, sgn);
            const __m512i bytes = _mm512_or_si512(_mm512_maskz_sub_epi32(valid, vbase, ex),
                                                  _mm512_srli_epi32(sbit, 24));
            _mm_storeu_si128((__m128i *)(c8 + j), _mm512_cvtepi32_epi8(bytes));
            const __m512i vb = _mm512_maskz_or_epi32(valid, _mm512_slli_epi32(ex, MBITS), sbit);
            const __m512 rs = _mm512_sub_ps(xv, _mm512_castsi512_ps(vb));
            if (xout) put16(xout + at, rs, nt);
            sq16z(q, xv); sq16z(rq, rs);
        }
        const uint32_t t = _mm512_reduce_max_epu32(tv), l = _mm512_reduce_min_epu32(low);
        if (t >= EMAX || l < MMASK) { *bad = 1; return; }
        if ((int64_t)t <= t0) {
            _mm512_storeu_pd(asq, q[0]); _mm512_storeu_pd(asq + 8, q[1]);
            _mm512_storeu_pd(ares, rq[0]); _mm512_storeu_pd(ares + 8, rq[1]);
            return;
        }
        *trun = (int64_t)t;
    }
}
#elif defined(__AVX2__) && IS_FLOAT
static void FN(natural_block)(const T *g, const T *e, T *xout, int64_t i, int det, uint32_t k1, uint32_t k2,
                              uint8_t *c8, int64_t *trun, double *asq, double *ares, UT *bad, int nt) {
    const __m256i absm = _mm256_set1_epi32(0x7fffffff), one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
    const __m256i sgn = _mm256_set1_epi32((int)0x80000000U);
    for (;;) {
        const int64_t t0 = *trun;
        const __m256i vbase = _mm256_set1_epi32((int32_t)(t0 + 1));
        const __m256i vlow = _mm256_set1_epi32(t0 > 127 ? (int32_t)(t0 - 127) : 0);
        __m256i tv = zero, low = _mm256_set1_epi32(-1);
        __m256d q[4], rq[4];
        for (int k = 0; k < 4; k++) { q[k] = _mm256_loadu_pd(asq + 4 * k); rq[k] = _mm256_loadu_pd(ares + 4 * k); }
        for (int64_t j = 0; j < CHUNK; j += 16) {
            _mm_prefetch((const char *)(g + i + CHUNK + j), _MM_HINT_T0);   /* the next block's lines */
            if (e) _mm_prefetch((const char *)(e + i + CHUNK + j), _MM_HINT_T0);
            __m256 xs[2], rs[2];
            __m256i bytes[2];
            for (int h = 0; h < 2; h++) {
                const int64_t at = i + j + 8 * h;
                const __m256 xv = loadx8(g, e, at);
                const __m256i b = _mm256_castps_si256(xv), mag = _mm256_and_si256(b, absm);
                const __m256i ex = nat_ex8(mag, det, (uint32_t)at, k1, k2);
                tv = _mm256_max_epu32(tv, ex);
                low = _mm256_min_epu32(low, _mm256_sub_epi32(mag, one));
                const __m256i c = _mm256_sub_epi32(vbase, ex), valid = _mm256_cmpgt_epi32(ex, vlow);
                const __m256i sbit = _mm256_and_si256(_mm256_and_si256(b, sgn), _mm256_cmpgt_epi32(ex, zero));
                bytes[h] = _mm256_or_si256(_mm256_and_si256(valid, c), _mm256_srli_epi32(sbit, 24));
                const __m256i vb = _mm256_and_si256(valid, _mm256_or_si256(_mm256_slli_epi32(ex, MBITS), sbit));
                xs[h] = xv; rs[h] = _mm256_sub_ps(xv, _mm256_castsi256_ps(vb));
                if (xout) put8(xout + at, rs[h], nt);
            }
            store16_bytes(c8 + j, bytes[0], bytes[1], 0);
            __m256d w[4]; widen16(xs[0], xs[1], w); sq16(q, w);
            widen16(rs[0], rs[1], w); sq16(rq, w);
        }
        uint32_t tt[8], ll[8], t = 0, l = 0xffffffffU;
        _mm256_storeu_si256((__m256i *)tt, tv); _mm256_storeu_si256((__m256i *)ll, low);
        for (int k = 0; k < 8; k++) { t = t > tt[k] ? t : tt[k]; l = l < ll[k] ? l : ll[k]; }
        if (t >= EMAX || l < MMASK) { *bad = 1; return; }
        if ((int64_t)t <= t0) { save16(q, asq); save16(rq, ares); return; }
        *trun = (int64_t)t;
    }
}
#endif

/* Natural in one pass. The value a byte decodes to, +-2^(rounded exponent), does not depend on the largest
   exponent (top), only whether it is too small to code (more than 127 below top) does: each block is coded
   with the largest exponent so far (tops[block], biased), xout = x - value as it is then; at the end the
   blocks coded with a smaller top than the final one get their codes raised, and where one becomes too
   small (code 0, value 0) x is put back in xout. *top = the largest exponent (unbiased; 0 when all x are
   zero); st = [residual, sum x^2]. Returns 1 (and xout = x) on a subnormal, an inf or a NaN. */
int FN(natural_step)(const T *g, const T *e, T *xout, int64_t n, int det, uint32_t k1, uint32_t k2,
                     uint8_t *code, int64_t *top, int64_t *tops, double *st) {
    double asq[LANES] = {0}, ares[LANES] = {0}, fix = 0.0;
    UT bad = 0;
    int64_t trun = 0;
    T buf[CHUNK], obuf[CHUNK];
    int32_t exb[CHUNK];
    const int nt = use_nt(xout, n * (int64_t)sizeof(T));
    CHUNKS(n) {
#if defined(__AVX2__) && IS_FLOAT
        if (m == CHUNK && i + CHUNK < n) {   /* a whole block that is not the last: in registers */
            FN(natural_block)(g, e, xout, i, det, k1, k2, code + i, &trun, asq, ares, &bad, nt);
            tops[i >> 11] = trun;
            continue;
        }
#endif
        const T *x = FN(load)(g, e, NULL, i, m, buf, 0);
        uint8_t *c8 = code + i;
        UT t = 0;
        int64_t j0 = 0;
#if defined(__AVX2__) && IS_FLOAT
        {
            const __m256i absm = _mm256_set1_epi32(0x7fffffff), emax = _mm256_set1_epi32(EMAX);
            const __m256i zero = _mm256_setzero_si256();
            __m256i tv = zero, bv = zero;
            for (; j0 + 8 <= m; j0 += 8) {
                __m256i b = _mm256_castps_si256(_mm256_loadu_ps(x + j0));
                __m256i mag = _mm256_and_si256(b, absm), ef = _mm256_srli_epi32(mag, MBITS);
                __m256i upm = nat_up8(mag, det, (uint32_t)(i + j0), k1, k2);
                __m256i isz = _mm256_cmpeq_epi32(mag, zero), ef0 = _mm256_cmpeq_epi32(ef, zero);
                __m256i ex = _mm256_andnot_si256(isz, _mm256_sub_epi32(ef, upm));     /* upm is -1 where up */
                tv = _mm256_max_epu32(tv, ex);
                bv = _mm256_or_si256(bv, _mm256_or_si256(_mm256_andnot_si256(isz, ef0), _mm256_cmpeq_epi32(ef, emax)));
                _mm256_storeu_si256((__m256i *)(exb + j0), ex);
            }
            uint32_t tt[8], bb[8];
            _mm256_storeu_si256((__m256i *)tt, tv); _mm256_storeu_si256((__m256i *)bb, bv);
            for (int q = 0; q < 8; q++) { t = t > tt[q] ? t : tt[q]; bad |= bb[q]; }
        }
#endif
        for (int64_t j = j0; j < m; j++) {
            UT mag = FN(to_bits)(x[j]) & ~SIGNBIT; UT ef = mag >> MBITS;
            UT u = FN(nat_up)(mag & MMASK, det, (uint32_t)(i + j), k1, k2); UT ex = mag == 0 ? 0 : ef + u;
            t = t > ex ? t : ex; bad |= (UT)((ef == 0) & (mag != 0)) | (UT)(ef == EMAX);
            exb[j] = (int32_t)ex;
        }
        if ((int64_t)t > trun) trun = (int64_t)t;
        tops[i >> 11] = trun;
        const int32_t base = (int32_t)(trun + 1);
        int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
        {
            const __m256i vbase = _mm256_set1_epi32(base), c128 = _mm256_set1_epi32(128), zero = _mm256_setzero_si256();
            const __m256i absm = _mm256_set1_epi32(0x7fffffff), sgn = _mm256_set1_epi32((int)0x80000000U);
            __m256d q[4], rq[4];
            for (int k = 0; k < 4; k++) { q[k] = _mm256_loadu_pd(asq + 4 * k); rq[k] = _mm256_loadu_pd(ares + 4 * k); }
            for (; j + 16 <= m; j += 16) {
                if (i + CHUNK + j < n) {   /* the next block's lines, fetched while this one computes */
                    _mm_prefetch((const char *)(g + i + CHUNK + j), _MM_HINT_T0);
                    if (e) _mm_prefetch((const char *)(e + i + CHUNK + j), _MM_HINT_T0);
                }
                __m256 xs[2], rs[2];
                __m256i bytes[2];
                for (int h = 0; h < 2; h++) {
                    int64_t jj = j + 8 * h;
                    __m256 xv = _mm256_loadu_ps(x + jj);
                    __m256i b = _mm256_castps_si256(xv), ex = _mm256_loadu_si256((const __m256i *)(exb + jj));
                    __m256i c = _mm256_sub_epi32(vbase, ex);
                    __m256i valid = _mm256_andnot_si256(_mm256_cmpeq_epi32(ex, zero), _mm256_cmpgt_epi32(c128, c));
                    __m256i nzx = _mm256_cmpgt_epi32(_mm256_and_si256(b, absm), zero);
                    __m256i sbit = _mm256_and_si256(_mm256_and_si256(b, sgn), nzx);
                    __m256i byte = _mm256_or_si256(_mm256_and_si256(valid, c), _mm256_srli_epi32(sbit, 24));
                    bytes[h] = byte;
                    __m256i vb = _mm256_and_si256(valid, _mm256_or_si256(_mm256_slli_epi32(ex, MBITS), sbit));
                    xs[h] = xv; rs[h] = _mm256_sub_ps(xv, _mm256_castsi256_ps(vb));
                    _mm256_storeu_ps(obuf + jj, rs[h]);
                }
                store16_bytes(c8 + j, bytes[0], bytes[1], 0);
                __m256d w[4]; widen16(xs[0], xs[1], w); sq16(q, w);
                widen16(rs[0], rs[1], w); sq16(rq, w);
            }
            save16(q, asq); save16(rq, ares);
        }
#endif
        for (; j < m; j++) {
            UT b = FN(to_bits)(x[j]); UT magx = b & ~SIGNBIT; int32_t ex = exb[j]; int32_t c = base - ex;
            int valid = ex != 0 && c <= 127;
            UT s = (b & SIGNBIT) && magx != 0 ? SIGNBIT : 0;
            c8[j] = (uint8_t)((valid ? c : 0) | (s ? 128 : 0));
            T v = valid ? FN(from_bits)((((UT)ex) << MBITS) | s) : (T)0;
            T r = x[j] - v;
            obuf[j] = r;
            int l = (int)(j % LANES);
            double xd = x[j], rd = r;
            asq[l] += xd * xd; ares[l] += rd * rd;
        }
        if (xout) {
            int64_t q = 0;
#if defined(__AVX2__) && IS_FLOAT
            if (nt) for (; q + 8 <= m; q += 8) _mm256_stream_ps(xout + i + q, _mm256_loadu_ps(obuf + q));
#endif
            if (q < m) memcpy(xout + i + q, obuf + q, (size_t)(m - q) * sizeof(T));
        }
    }
    nt_done(nt);
    if (bad) {
        if (xout) { CHUNKS(n) FN(load)(g, e, xout, i, m, NULL, 0); }
        return 1;
    }
    /* raise the codes of the blocks coded with a smaller top */
    for (int64_t b = 0; b * CHUNK < n; b++) {
        int64_t delta = trun - tops[b];
        if (delta == 0) continue;
        int64_t i = b * CHUNK, m = n - i < CHUNK ? n - i : CHUNK;
        uint8_t *c8 = code + i;
        for (int64_t j = 0; j < m; j++) {
            int64_t mag = c8[j] & 127;
            if (mag == 0) continue;
            if (mag + delta <= 127) { c8[j] = (uint8_t)(c8[j] + delta); continue; }
            UT s = (c8[j] & 128) ? SIGNBIT : 0;
            c8[j] = (uint8_t)(c8[j] & 128);
            T v = FN(from_bits)((((UT)(tops[b] + 1 - mag)) << MBITS) | s);
            T xv = e ? g[i + j] + e[i + j] : g[i + j], r = xv - v;
            if (xout) xout[i + j] = xv;
            fix += (double)xv * xv - (double)r * r;
        }
    }
    *top = trun ? trun - BIAS : 0;
    st[0] = sum_lanes(ares) + fix; st[1] = sum_lanes(asq);
    return 0;
}

/* QSGD pass 1: st = [sum x^2, max |x|, finiteness] */
int FN(qsgd1)(const T *g, const T *e, T *xout, int64_t n, double *st) {
    double asq[LANES] = {0}, afin[LANES] = {0};
    T peak[LANES] = {0};
    T buf[CHUNK];
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        const int nt = use_nt(xout, n * 4);
        const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256d q[4]; __m256 fin = _mm256_setzero_ps(), pk = _mm256_setzero_ps();
        zero16(q);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 x0 = loadx8(g, e, i0), x1 = loadx8(g, e, i0 + 8);
            if (xout) { put8(xout + i0, x0, nt); put8(xout + i0 + 8, x1, nt); }
            FIN16(fin, x0, x1);
            pk = _mm256_max_ps(pk, _mm256_max_ps(_mm256_and_ps(x0, absm), _mm256_and_ps(x1, absm)));
            __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
        }
        nt_done(nt); save16(q, asq); afin[0] = FN(fin_of)(fin);
        float pp[8]; _mm256_storeu_ps(pp, pk);
        for (int k = 0; k < 8; k++) peak[k] = pp[k];
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, T a = x[j] < 0 ? -x[j] : x[j]; peak[l] = peak[l] > a ? peak[l] : a; double v = x[j];
                  asq[l] += v * v; afin[l] += v - v);
    }
    T p = 0;
    for (int l = 0; l < LANES; l++) p = peak[l] > p ? peak[l] : p;
    st[0] = sum_lanes(asq); st[1] = (double)p; st[2] = sum_lanes(afin);
    return st[2] == 0.0 ? 0 : 1;
}

/* QSGD pass 2: q[i] = the signed level (int8, or int16 when wide); xout = x - ((norm * q) / levels) * lam */
void FN(qsgd2)(const T *g, const T *e, T *xout, int64_t n, T norm, T levels, T lam, uint32_t k1, uint32_t k2,
               void *q, int wide, double *st) {
    double ares[LANES] = {0};
    T buf[CHUNK], rbuf[CHUNK];
    const T den = norm > 0 ? norm : (T)1;
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), zero = _mm256_setzero_ps();
        const __m256 vden = _mm256_set1_ps(den), vlev = _mm256_set1_ps(levels), vnorm = _mm256_set1_ps(norm);
        const __m256 vlam = _mm256_set1_ps(lam), one = _mm256_set1_ps(1.0f);
        int lexp; const int pow2 = frexp(levels, &lexp) == (T)0.5;
        const __m256 vrec = _mm256_set1_ps((T)1 / levels);
#ifdef __AVX512F__
        {   /* the same, 16 at a time */
            const __m512 zden = _mm512_set1_ps(den), zlev = _mm512_set1_ps(levels), znorm = _mm512_set1_ps(norm);
            const __m512 zlam = _mm512_set1_ps(lam), zone = _mm512_set1_ps(1.0f), zrec = _mm512_set1_ps((T)1 / levels);
            const __m512 zz = _mm512_setzero_ps();
            __m512d zacc[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
            for (; i0 + 16 <= n; i0 += 16) {
                const __m512 xv = xout ? _mm512_loadu_ps(xout + i0)
                                       : e ? _mm512_add_ps(_mm512_loadu_ps(g + i0), _mm512_loadu_ps(e + i0))
                                           : _mm512_loadu_ps(g + i0);
                const __m512 s = _mm512_mul_ps(_mm512_div_ps(_mm512_abs_ps(xv), zden), zlev);
                const __m512 lo = _mm512_roundscale_ps(s, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(hash16((uint32_t)i0, k1, k2), 8)),
                                               _mm512_set1_ps(0x1p-24f));
                const __m512 lv = _mm512_add_ps(lo, _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(u, _mm512_sub_ps(s, lo),
                                                                                           _CMP_LT_OQ), zone));
                const __m512 sv = _mm512_mask_sub_ps(lv, _mm512_cmp_ps_mask(xv, zz, _CMP_LT_OQ), zz, lv);
                const __m512i qi = _mm512_cvttps_epi32(sv);
                if (wide) _mm256_storeu_si256((__m256i *)((int16_t *)q + i0), _mm512_cvtsepi32_epi16(qi));
                else _mm_storeu_si128((__m128i *)((int8_t *)q + i0), _mm512_cvtsepi32_epi8(qi));
                const __m512 nq = _mm512_mul_ps(znorm, _mm512_cvtepi32_ps(qi));
                const __m512 dec = _mm512_mul_ps(pow2 ? _mm512_mul_ps(nq, zrec) : _mm512_div_ps(nq, zlev), zlam);
                const __m512 r = _mm512_sub_ps(xv, dec);
                if (xout) _mm512_storeu_ps(xout + i0, r);
                sq16z(zacc, r);
            }
            _mm512_storeu_pd(ares, zacc[0]); _mm512_storeu_pd(ares + 8, zacc[1]);
        }
#endif
        __m256d acc[4];
        for (int k = 0; k < 4; k++) acc[k] = _mm256_loadu_pd(ares + 4 * k);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 r[2];
            __m256i qs[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int h = 0; h < 2; h++) {
                int64_t j0 = i0 + 8 * h;
                __m256 xv = xout ? _mm256_loadu_ps(xout + j0) : loadx8(g, e, j0);
                __m256 s = _mm256_mul_ps(_mm256_div_ps(_mm256_and_ps(xv, absm), vden), vlev);
                __m256 lo = _mm256_floor_ps(s);
                __m256 up = _mm256_and_ps(_mm256_cmp_ps(uniform8_f((uint32_t)j0, k1, k2), _mm256_sub_ps(s, lo),
                                                        _CMP_LT_OQ), one);
                __m256 lv = _mm256_add_ps(lo, up);
                __m256 sv = _mm256_blendv_ps(lv, _mm256_sub_ps(zero, lv), _mm256_cmp_ps(xv, zero, _CMP_LT_OQ));
                __m256i qi = _mm256_cvttps_epi32(sv);
                if (wide) store8_i16((int16_t *)q + j0, qi); else qs[h] = qi;
                __m256 nq = _mm256_mul_ps(vnorm, _mm256_cvtepi32_ps(qi));
                /* / levels, as * (1 / levels) where levels is a power of two: the same rounded quotient */
                __m256 dec = _mm256_mul_ps(pow2 ? _mm256_mul_ps(nq, vrec) : _mm256_div_ps(nq, vlev), vlam);
                r[h] = _mm256_sub_ps(xv, dec);
                if (xout) _mm256_storeu_ps(xout + j0, r[h]);
            }
            if (!wide) store16_bytes((int8_t *)q + i0, qs[0], qs[1], 1);
            __m256d w[4]; widen16(r[0], r[1], w); sq16(acc, w);
        }
        save16(acc, ares);
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 1);
        uint32_t base = (uint32_t)i;
        T *o = xout ? xout + i : rbuf;
#define QS(QT) do { QT *qq = (QT *)q + i; \
            for (int64_t j = 0; j < m; j++) { T a = x[j] < 0 ? -x[j] : x[j]; T s = a / den * levels; T lo = floor(s); \
                T lv = lo + (UNIFORM(hash32(base + (uint32_t)j, k1, k2)) < s - lo ? (T)1 : (T)0); \
                QT qi = (QT)(x[j] < 0 ? -lv : lv); qq[j] = qi; o[j] = x[j] - ((norm * (T)qi) / levels) * lam; } \
        } while (0)
        if (wide) QS(int16_t); else QS(int8_t);
#undef QS
        LANE_LOOP(m, double r = o[j]; ares[l] += r * r);
    }
    st[0] = sum_lanes(ares);
}

/* TopK's one pass: the candidates |x| >= t (indices and values, in increasing index order, at most cap of
   them stored); returns their count. st = [sum x^2, finiteness] */
int64_t FN(topk1)(const T *g, const T *e, T *xout, int64_t n, T t, int64_t *cidx, T *cval, int64_t cap,
                  double *st) {
    double asq[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    int64_t cnt = 0, i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    {
        const int nt = use_nt(xout, n * 4);
        const __m256 tt = _mm256_set1_ps(t), absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256d q[4]; __m256 fin = _mm256_setzero_ps();
        zero16(q);
        for (; i0 + 16 <= n; i0 += 16) {
            __m256 x0 = loadx8(g, e, i0), x1 = loadx8(g, e, i0 + 8);
            if (xout) { put8(xout + i0, x0, nt); put8(xout + i0 + 8, x1, nt); }
            FIN16(fin, x0, x1);
            __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(x0, absm), tt, _CMP_GE_OQ))
                     | _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(x1, absm), tt, _CMP_GE_OQ)) << 8;
            if (mask) {
                float xs[16];
                _mm256_storeu_ps(xs, x0); _mm256_storeu_ps(xs + 8, x1);
                while (mask) {
                    int b = __builtin_ctz(mask); mask &= mask - 1;
                    if (cnt < cap) { cidx[cnt] = i0 + b; cval[cnt] = xs[b]; }
                    cnt++;
                }
            }
        }
        nt_done(nt); save16(q, asq); afin[0] = FN(fin_of)(fin);
    }
#endif
    CHUNKS_FROM(i0, n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, double v = x[j]; asq[l] += v * v; afin[l] += v - v);
        int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
        const __m256 tt = _mm256_set1_ps(t), absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        for (; j + 8 <= m; j += 8) {
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(x + j), absmask), tt, _CMP_GE_OQ));
            while (mask) {
                int q = __builtin_ctz(mask); mask &= mask - 1;
                if (cnt < cap) { cidx[cnt] = i + j + q; cval[cnt] = x[j + q]; }
                cnt++;
            }
        }
#endif
        for (; j < m; j++) {
            T a = x[j] < 0 ? -x[j] : x[j];
            if (a >= t) {
                if (cnt < cap) { cidx[cnt] = i + j; cval[cnt] = x[j]; }
                cnt++;
            }
        }
    }
    st[0] = sum_lanes(asq); st[1] = sum_lanes(afin);
    return cnt;
}

/* The k-th largest of n keys (1 <= k <= n), reordering them: a radix selection, 8 bits at a time from the top,
   keeping only the keys that share the digits chosen so far (histograms: no branch on the data, where a
   quickselect's comparisons mispredict half the time). *ties: how many of the keys equal to it are among the
   k largest (k less those above it, which the histograms counted) */
static UT FN(kth_largest_key)(UT *a, int64_t n, int64_t k, int64_t *ties) {
    UT kth = 0;
    for (int shift = 8 * (int)sizeof(UT) - 8; ; shift -= 8) {
        int64_t hist[256] = {0};
        for (int64_t i = 0; i < n; i++) hist[(a[i] >> shift) & 255]++;
        int b = 255;
        while (hist[b] < k) k -= hist[b--];
        kth |= (UT)b << shift;
        if (shift > 0 && hist[b] < n) {   /* keep the keys of digit b */
            int64_t m = 0;
            for (int64_t i = 0; i < n; i++) { UT v = a[i]; a[m] = v; m += ((v >> shift) & 255) == (UT)b; }
            n = m;
        }
        if (shift == 0 || n == 1) {   /* every digit chosen, or one key left: k counts the ties kept */
            *ties = k;
            return shift == 0 ? kth : a[0];
        }
    }
}

/* A magnitude as a key: the bits without the sign (finite values compare in the same order; -0 = +0) */
static inline UT FN(magnitude_key)(T v) { return FN(to_bits)(v) & ~SIGNBIT; }

/* TopK's selection among its candidates (finite, in increasing index order): the k of largest magnitude,
   among magnitudes equal to the k-th largest the first ones (the torch path's rule: kernels._top), in
   increasing index order: idx (int32), values, and xout[idx] = values - values * lam. keys: count scratch
   keys. st = [sum values^2, sum left^2] */
void FN(topk_pick)(const int64_t *cidx, const T *cval, int64_t count, int64_t k, UT *keys, T *xout, T lam,
                   int32_t *idx, T *values, double *st) {
    for (int64_t s = 0; s < count; s++) keys[s] = FN(magnitude_key)(cval[s]);
    int64_t ties;
    UT t = FN(kth_largest_key)(keys, count, k, &ties);
    int64_t out = 0;
    for (int64_t s = 0; s < count && out < k; s++) {   /* without a branch on the data: out grows by keep */
        UT a = FN(magnitude_key)(cval[s]);
        int64_t tied = a == t, keep = (a > t) | (tied & (ties > 0));
        ties -= tied & keep;
        idx[out] = (int32_t)cidx[s]; values[out] = cval[s];
        out += keep;
    }
    double sv = 0.0, sl = 0.0;
    for (int64_t j = 0; j < k; j++) {
        T v = values[j], dec = lam != (T)1 ? v * lam : v, left = v - dec;
        sv += (double)v * v; sl += (double)left * left;
        if (xout) xout[idx[j]] = left;
    }
    st[0] = sv; st[1] = sl;
}

/* decoders, one payload row: out = v (acc = 0) or out + v (acc = 1), then divided by div when div != 0 */
#define ACC_LOOP(N, VEXPR) do { \
    if (!acc && div == 0) { for (int64_t i = 0; i < (N); i++) { T v = (VEXPR); out[i] = v; } } \
    else if (!acc) { for (int64_t i = 0; i < (N); i++) { T v = (VEXPR); out[i] = v / div; } } \
    else if (div == 0) { for (int64_t i = 0; i < (N); i++) { T v = (VEXPR); out[i] = out[i] + v; } } \
    else { for (int64_t i = 0; i < (N); i++) { T v = (VEXPR); out[i] = (out[i] + v) / div; } } } while (0)

/* 8 values v of one step, combined with out as ACC_LOOP does */
#if defined(__AVX2__) && IS_FLOAT
static inline void FN(acc8)(T *out, __m256 v, int acc, T div) {
    if (acc) v = _mm256_add_ps(_mm256_loadu_ps(out), v);
    if (div != 0) v = _mm256_div_ps(v, _mm256_set1_ps(div));
    _mm256_storeu_ps(out, v);
}
#elif defined(__AVX2__)
static inline void FN(acc4)(T *out, __m256d v, int acc, T div) {
    if (acc) v = _mm256_add_pd(_mm256_loadu_pd(out), v);
    if (div != 0) v = _mm256_div_pd(v, _mm256_set1_pd(div));
    _mm256_storeu_pd(out, v);
}
#endif

void FN(dec_table)(const uint8_t *code, int64_t n, const T *table, T *out, int acc, T div) {
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    for (; i0 + 8 <= n; i0 += 8) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(code + i0)));
        FN(acc8)(out + i0, _mm256_i32gather_ps(table, idx, 4), acc, div);
    }
#endif
    code += i0; out += i0; n -= i0;
    ACC_LOOP(n, table[code[i]]);
}

void FN(dec_bits)(const uint8_t *bits, int64_t n, T vpos, T vneg, T *out, int acc, T div) {
    int64_t i0 = 0;
#if defined(__AVX2__) && IS_FLOAT
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256 vp = _mm256_set1_ps(vpos), vn = _mm256_set1_ps(vneg);
    for (; i0 + 8 <= n; i0 += 8) {
        __m256i m = _mm256_and_si256(_mm256_set1_epi32(bits[i0 >> 3]), sel);
        FN(acc8)(out + i0, _mm256_blendv_ps(vp, vn, _mm256_castsi256_ps(_mm256_cmpeq_epi32(m, sel))), acc, div);
    }
#elif defined(__AVX2__)
    const __m256i lo = _mm256_setr_epi64x(1, 2, 4, 8), hi = _mm256_setr_epi64x(16, 32, 64, 128);
    const __m256d vp = _mm256_set1_pd(vpos), vn = _mm256_set1_pd(vneg);
    for (; i0 + 8 <= n; i0 += 8) {
        __m256i b = _mm256_set1_epi64x(bits[i0 >> 3]);
        __m256i m0 = _mm256_cmpeq_epi64(_mm256_and_si256(b, lo), lo), m1 = _mm256_cmpeq_epi64(_mm256_and_si256(b, hi), hi);
        FN(acc4)(out + i0, _mm256_blendv_pd(vp, vn, _mm256_castsi256_pd(m0)), acc, div);
        FN(acc4)(out + i0 + 4, _mm256_blendv_pd(vp, vn, _mm256_castsi256_pd(m1)), acc, div);
    }
#endif
    const uint8_t *b8 = bits + (i0 >> 3);
    out += i0; n -= i0;
    ACC_LOOP(n, ((b8[i >> 3] >> (i & 7)) & 1) ? vneg : vpos);
}

void FN(dec_qsgd)(const void *q, int wide, int64_t n, T norm, T levels, T lam, T *out, int acc, T div) {
    if (wide) {
        const int16_t *qq = (const int16_t *)q;
        ACC_LOOP(n, ((norm * (T)qq[i]) / levels) * lam);
    } else {
        const int8_t *qq = (const int8_t *)q;
        ACC_LOOP(n, ((norm * (T)qq[i]) / levels) * lam);
    }
}

/* how a sum is divided by div: times 1 / div where div is a power of two (the same correctly rounded
   quotient, cheaper), else divided */
typedef struct { int pow2; T div, rec; } FN(divisor_t);
static inline FN(divisor_t) FN(divisor)(T div) {
    FN(divisor_t) f; int ex;
    f.pow2 = frexp(div, &ex) == (T)0.5 && ex > -60 && ex < 60;
    f.div = div; f.rec = (T)1 / div;
    return f;
}
static inline T FN(divided)(T a, const FN(divisor_t) *f) { return f->pow2 ? a * f->rec : a / f->div; }
#if defined(__AVX2__) && IS_FLOAT
static inline __m256 FN(divided8)(__m256 a, const FN(divisor_t) *f) {
    return f->pow2 ? _mm256_mul_ps(a, _mm256_set1_ps(f->rec)) : _mm256_div_ps(a, _mm256_set1_ps(f->div));
}
#endif

/* ---- decode_mean of n payload rows in one pass: out = (((v_0 + v_1) + ...) + v_{n-1}) / div, element by
   element as torch's elementwise ops give it. Blocks of CHUNK elements are summed in an L1 buffer, then
   divided (times 1/div where div is a power of two: the same correctly rounded quotient) and stored,
   streaming past the caches when out is large. */
static inline void FN(finish)(const T *acc, T *out, int64_t m, T div, int nt) {
    const FN(divisor_t) f = FN(divisor)(div);
    int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
    for (; j + 8 <= m; j += 8) put8(out + j, FN(divided8)(_mm256_loadu_ps(acc + j), &f), nt);
#else
    (void)nt;
#endif
    for (; j < m; j++) out[j] = FN(divided)(acc[j], &f);
}

#if defined(__AVX2__) && IS_FLOAT
/* ---- decode_mean of a few rows in registers: each 8 outputs are summed from the rows (in row order) and
   divided (FN(divisor)) without the L1 buffers, then stored once. For bits rows, up to 4, the 2^rows
   possible means are a table of 16 floats computed once, which each element's flags index. */
#define FEW_ROWS 8

static void FN(mean_bits_few)(const uint8_t *const *rows, const T *vpos, const T *vneg, int nrows, int64_t n,
                              T *out, T div) {
    const FN(divisor_t) f = FN(divisor)(div);
    const int nt = use_nt(out, n * (int64_t)sizeof(T));
    T tab[16] = {0};
    for (int c = 0; c < (1 << nrows); c++) {
        T s = (c & 1) ? vneg[0] : vpos[0];
        for (int r = 1; r < nrows; r++) s = s + (((c >> r) & 1) ? vneg[r] : vpos[r]);
        tab[c] = FN(divided)(s, &f);
    }
    int64_t i = 0;
#ifdef __AVX512F__
    /* 16 at a time: each row's two bytes are a mask that adds its bit to the table index */
    const __m512 table = _mm512_loadu_ps(tab);
    for (; i + 16 <= n; i += 16) {
        __m512i idx = _mm512_setzero_si512();
        for (int r = 0; r < nrows; r++) {
            uint16_t flags;
            memcpy(&flags, rows[r] + (i >> 3), 2);
            idx = _mm512_mask_add_epi32(idx, (__mmask16)flags, idx, _mm512_set1_epi32(1 << r));
        }
        put16(out + i, _mm512_permutexvar_ps(idx, table), nt);
    }
#endif
    const __m256 lo = _mm256_loadu_ps(tab), hi = _mm256_loadu_ps(tab + 8);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; i + 8 <= n; i += 8) {
        __m256i idx = _mm256_setzero_si256();   /* lane l: bit r = flag l of row r */
        for (int r = 0; r < nrows; r++) {
            const __m256i flags = _mm256_srlv_epi32(_mm256_set1_epi32(rows[r][i >> 3] << r), lanes);
            idx = _mm256_or_si256(idx, _mm256_and_si256(flags, _mm256_set1_epi32(1 << r)));
        }
        __m256 v = _mm256_permutevar8x32_ps(lo, idx);
        if (nrows == 4)   /* entries 8-15 where bit 3 (moved to the sign bit) is set */
            v = _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
        put8(out + i, v, nt);
    }
    for (; i < n; i++) {
        int c = 0;
        for (int r = 0; r < nrows; r++) c |= ((rows[r][i >> 3] >> (i & 7)) & 1) << r;
        out[i] = tab[c];
    }
    nt_done(nt);
}

/* out[i .. i + 8) = the finished sum over rows of VAL8(r) (an __m256 of row r's 8 values at i); VAL1(r) one
   value at i for the tail */
#define MEAN_FEW(VAL8, VAL1) do { \
    const FN(divisor_t) f = FN(divisor)(div); \
    const int nt = use_nt(out, n * (int64_t)sizeof(T)); \
    int64_t i = 0; \
    for (; i + 8 <= n; i += 8) { \
        __m256 a = VAL8(0); \
        for (int r = 1; r < nrows; r++) a = _mm256_add_ps(a, VAL8(r)); \
        put8(out + i, FN(divided8)(a, &f), nt); \
    } \
    for (; i < n; i++) { \
        T a = VAL1(0); \
        for (int r = 1; r < nrows; r++) a = a + VAL1(r); \
        out[i] = FN(divided)(a, &f); \
    } \
    nt_done(nt); } while (0)

/* element i of the mean of Natural rows, from their tables (as MEAN_FEW sums them) */
static inline T FN(table_mean1)(const uint8_t *const *rows, const T *tables, int nrows, int64_t i,
                                const FN(divisor_t) *f) {
    T a = tables[rows[0][i]];
    for (int r = 1; r < nrows; r++) a = a + tables[256 * r + rows[r][i]];
    return FN(divided)(a, f);
}

/* Natural rows (lam = 1: every value is +-2^e or +-0), 16 codes at a time in 16-bit lanes, each the top half of
   its value: the sign, then the exponent base - magnitude where the magnitude is not 0 (the bottom half is 0),
   widened by interleaving with zeros. Where a row's code would not give a normal exponent (below 1: a code the
   encoder never writes, from a payload with a low top), those 16 elements are decoded from the tables. The
   sums are those of MEAN_FEW, in lanes permuted (elements 0-3 and 8-11, then 4-7 and 12-15) and put back in
   order before the store. */
static void FN(mean_natural16)(const uint8_t *const *rows, const T *tables, const int64_t *tops, int nrows, int64_t n,
                               T *out, T div) {
    const FN(divisor_t) f = FN(divisor)(div);
    const int nt = use_nt(out, n * (int64_t)sizeof(T));
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi16(1);
    const __m256i m127 = _mm256_set1_epi16(127), m128 = _mm256_set1_epi16(128);
    __m256i base[FEW_ROWS];
    int sure[FEW_ROWS];   /* base - 127 >= 1: every magnitude gives a normal exponent */
    for (int r = 0; r < nrows; r++) {
        base[r] = _mm256_set1_epi16((int16_t)(tops[r] + 1 + BIAS));
        sure[r] = tops[r] + 1 + BIAS - 127 >= 1;
    }
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        int r = 0;
        for (; r < nrows; r++) {
            const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(rows[r] + i)));
            const __m256i mag = _mm256_and_si256(c, m127), be = _mm256_sub_epi16(base[r], mag);
            const __m256i nz = _mm256_cmpgt_epi16(mag, zero);
            if (!sure[r] && _mm256_movemask_epi8(_mm256_and_si256(nz, _mm256_cmpgt_epi16(one, be))))
                break;
            const __m256i top = _mm256_or_si256(_mm256_and_si256(nz, _mm256_slli_epi16(be, MBITS - 16)),
                                                _mm256_slli_epi16(_mm256_and_si256(c, m128), 8));
            const __m256 vlo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, top));
            const __m256 vhi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, top));
            lo = r ? _mm256_add_ps(lo, vlo) : vlo;
            hi = r ? _mm256_add_ps(hi, vhi) : vhi;
        }
        if (r < nrows) {   /* decoded from the tables */
            for (int64_t j = i; j < i + 16; j++) out[j] = FN(table_mean1)(rows, tables, nrows, j, &f);
            continue;
        }
        lo = FN(divided8)(lo, &f); hi = FN(divided8)(hi, &f);
        put8(out + i, _mm256_permute2f128_ps(lo, hi, 0x20), nt);
        put8(out + i + 8, _mm256_permute2f128_ps(lo, hi, 0x31), nt);
    }
    for (; i < n; i++) out[i] = FN(table_mean1)(rows, tables, nrows, i, &f);
    nt_done(nt);
}

/* Natural scaled (lam != 1): the values of 8 code bytes, from the row's table */
static inline __m256 FN(table8)(const uint8_t *c8, const T *table) {
    return _mm256_i32gather_ps(table, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c8)), 4);
}
static void FN(mean_table_few)(const uint8_t *const *rows, const T *tables, const int64_t *tops, int arith, int nrows,
                               int64_t n, T *out, T div) {
    if (arith) { FN(mean_natural16)(rows, tables, tops, nrows, n, out, div); return; }
#define TABLE8(r) FN(table8)(rows[r] + i, tables + 256 * (r))
#define TABLE1(r) tables[256 * (r) + rows[r][i]]
    MEAN_FEW(TABLE8, TABLE1);
#undef TABLE8
#undef TABLE1
}

/* QSGD: ((norm * q) / levels) * lam of 8 levels q */
static inline __m256 FN(qsgd8)(const void *row, int wide, int64_t i, T norm, const FN(divisor_t) *levels,
                               __m256 vlam) {
    __m256i q = wide ? _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i *)((const int16_t *)row + i)))
                     : _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + i)));
    return _mm256_mul_ps(FN(divided8)(_mm256_mul_ps(_mm256_set1_ps(norm), _mm256_cvtepi32_ps(q)), levels), vlam);
}
static void FN(mean_qsgd_few)(const void *const *rows, int wide, const T *norms, T levels, T lam, int nrows, int64_t n,
                              T *out, T div) {
    const FN(divisor_t) lev = FN(divisor)(levels);
    const __m256 vlam = _mm256_set1_ps(lam);
#define Q8(r) FN(qsgd8)(rows[r], wide, i, norms[r], &lev, vlam)
#define QI(r) (T)(wide ? ((const int16_t *)rows[r])[i] : ((const int8_t *)rows[r])[i])
#define Q1(r) (FN(divided)(norms[r] * QI(r), &lev) * lam)
    MEAN_FEW(Q8, Q1);
#undef Q8
#undef QI
#undef Q1
}
#undef MEAN_FEW
#endif

#define MEAN_ROWS(...) do { \
    T acc[CHUNK], tmp[CHUNK]; \
    const int nt = use_nt(out, n * (int64_t)sizeof(T)); \
    CHUNKS(n) { \
        for (int r = 0; r < nrows; r++) { \
            T *dst = r ? tmp : acc; \
            __VA_ARGS__; \
            if (r) for (int64_t j = 0; j < m; j++) acc[j] = acc[j] + tmp[j]; \
        } \
        FN(finish)(acc, out + i, m, div, nt && (((uintptr_t)(out + i)) & 31) == 0); \
    } \
    nt_done(nt); } while (0)

/* bits rows (8 flags per byte): value vneg[r] where the flag is set, else vpos[r] */
static inline void FN(bits_chunk)(const uint8_t *b8, T vp, T vn, int64_t m, T *dst) {
        int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
        const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        const __m256 vpv = _mm256_set1_ps(vp), vnv = _mm256_set1_ps(vn);
        for (; j + 8 <= m; j += 8) {
            __m256i mk = _mm256_and_si256(_mm256_set1_epi32(b8[j >> 3]), sel);
            _mm256_storeu_ps(dst + j, _mm256_blendv_ps(vpv, vnv, _mm256_castsi256_ps(_mm256_cmpeq_epi32(mk, sel))));
        }
#endif
        for (; j < m; j++) dst[j] = ((b8[j >> 3] >> (j & 7)) & 1) ? vn : vp;
}
void FN(mean_bits)(const uint8_t *const *rows, const T *vpos, const T *vneg, int nrows, int64_t n, T *out, T div) {
#if defined(__AVX2__) && IS_FLOAT
    if (nrows >= 1 && nrows <= 4) { FN(mean_bits_few)(rows, vpos, vneg, nrows, n, out, div); return; }
#endif
    MEAN_ROWS(FN(bits_chunk)(rows[r] + (i >> 3), vpos[r], vneg[r], m, dst));
}

/* Natural code rows: tables[256 r + byte]; where arith is set (lam = 1), the power of two of a byte comes
   from its bits (top[r] the largest exponent): the table's value wherever it is a normal number */
static inline void FN(table_chunk)(const uint8_t *c8, const T *table, int64_t top, int arith, int64_t m, T *dst) {
        int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
        if (arith) {
            /* biased exponent of the value: top + 1 - mag + BIAS, normal where 1 <= it <= 254 */
            const __m256i base = _mm256_set1_epi32((int)(top + 1 + BIAS)), m127 = _mm256_set1_epi32(127);
            const __m256i lo = _mm256_setzero_si256(), hi = _mm256_set1_epi32(255);
            for (; j + 8 <= m; j += 8) {
                __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c8 + j)));
                __m256i mag = _mm256_and_si256(c, m127);
                __m256i be = _mm256_sub_epi32(base, mag);
                __m256i nz = _mm256_cmpgt_epi32(mag, lo);
                __m256i okv = _mm256_and_si256(_mm256_cmpgt_epi32(be, lo), _mm256_cmpgt_epi32(hi, be));
                if (_mm256_movemask_epi8(_mm256_andnot_si256(okv, nz))) {   /* a value out of the normal range */
                    _mm256_storeu_ps(dst + j, _mm256_i32gather_ps(table, c, 4));
                    continue;
                }
                __m256i bitsv = _mm256_or_si256(_mm256_and_si256(nz, _mm256_slli_epi32(be, 23)),
                                                _mm256_slli_epi32(_mm256_srli_epi32(c, 7), 31));
                _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(bitsv));
            }
        } else {
            for (; j + 8 <= m; j += 8) {
                __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c8 + j)));
                _mm256_storeu_ps(dst + j, _mm256_i32gather_ps(table, c, 4));
            }
        }
#else
        (void)arith; (void)top;
#endif
        for (; j < m; j++) dst[j] = table[c8[j]];
}
void FN(mean_table)(const uint8_t *const *rows, const T *tables, const int64_t *tops, int arith, int nrows, int64_t n,
                    T *out, T div) {
#if defined(__AVX2__) && IS_FLOAT
    if (nrows >= 1 && nrows <= FEW_ROWS) { FN(mean_table_few)(rows, tables, tops, arith, nrows, n, out, div); return; }
#endif
    MEAN_ROWS(FN(table_chunk)(rows[r] + i, tables + 256 * r, tops[r], arith, m, dst));
}

/* QSGD rows: ((norm[r] * q) / levels) * lam */
static inline void FN(qsgd_chunk)(const void *row, int wide, T norm, T levels, T lam, int64_t i, int64_t m, T *dst) {
        int64_t j = 0;
        if (wide) {
            const int16_t *qq = (const int16_t *)row + i;
            for (; j < m; j++) dst[j] = ((norm * (T)qq[j]) / levels) * lam;
        } else {
            const int8_t *qq = (const int8_t *)row + i;
#if defined(__AVX2__) && IS_FLOAT
            const __m256 vn = _mm256_set1_ps(norm), vl = _mm256_set1_ps(levels), vlam = _mm256_set1_ps(lam);
            int lexp; const int pow2 = frexp(levels, &lexp) == (T)0.5;
            const __m256 vrec = _mm256_set1_ps((T)1 / levels);
            for (; j + 8 <= m; j += 8) {
                __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qq + j))));
                __m256 nq = _mm256_mul_ps(vn, qf);
                _mm256_storeu_ps(dst + j, _mm256_mul_ps(pow2 ? _mm256_mul_ps(nq, vrec) : _mm256_div_ps(nq, vl), vlam));
            }
#endif
            for (; j < m; j++) dst[j] = ((norm * (T)qq[j]) / levels) * lam;
        }
}
void FN(mean_qsgd)(const void *const *rows, int wide, const T *norms, T levels, T lam, int nrows, int64_t n, T *out,
                   T div) {
#if defined(__AVX2__) && IS_FLOAT
    if (nrows >= 1 && nrows <= FEW_ROWS) {
        FN(mean_qsgd_few)(rows, wide, norms, levels, lam, nrows, n, out, div);
        return;
    }
#endif
    MEAN_ROWS(FN(qsgd_chunk)(rows[r], wide, norms[r], levels, lam, i, m, dst));
}
#undef MEAN_ROWS

/* sparse rows (TopK, RandK): out = 0, then out[idx] += values row by row (index_add_), then / div (0 / div is the
   0 there), written once, block by block of CHUNK elements, in order. Rows whose indices do not decrease (TopK's
   and RandK's) are walked block by block with a cursor each; otherwise the entries are first grouped by block (a
   stable counting sort: the row order of entries on one index is kept). sidx / sval: room for all entries;
   start: nb + 1 counters (nb = blocks). Returns 1 on an index out of range (out untouched). */
#define CURSORS 64
int FN(mean_sparse)(const int32_t *const *idx, const T *const *vals, const int64_t *ks, int nrows, int64_t n,
                    T *out, T div, int32_t *sidx, T *sval, int64_t *start) {
    const int64_t nb = (n + CHUNK - 1) / CHUNK;
    const int nt = use_nt(out, n * (int64_t)sizeof(T));
    T acc[CHUNK];
    int ordered = nrows <= CURSORS;
    for (int r = 0; r < nrows; r++)
        for (int64_t t = 0; t < ks[r]; t++) {
            int64_t p = idx[r][t];
            if (p < 0 || p >= n) return 1;
            ordered &= t == 0 || p >= idx[r][t - 1];
        }
    if (ordered) {
        int64_t cursor[CURSORS] = {0};
        CHUNKS(n) {
            memset(acc, 0, (size_t)m * sizeof(T));
            for (int r = 0; r < nrows; r++) {
                const int32_t *ix = idx[r];
                int64_t t = cursor[r];
                for (; t < ks[r] && ix[t] < i + m; t++) acc[ix[t] - i] = acc[ix[t] - i] + vals[r][t];
                cursor[r] = t;
            }
            FN(finish)(acc, out + i, m, div, nt);
        }
        nt_done(nt);
        return 0;
    }
    memset(start, 0, (size_t)(nb + 1) * sizeof(int64_t));
    for (int r = 0; r < nrows; r++)
        for (int64_t t = 0; t < ks[r]; t++) start[(idx[r][t] >> 11) + 1]++;
    for (int64_t b = 0; b < nb; b++) start[b + 1] += start[b];
    for (int r = 0; r < nrows; r++)
        for (int64_t t = 0; t < ks[r]; t++) {
            int64_t p = idx[r][t], q = start[p >> 11]++;
            sidx[q] = (int32_t)p; sval[q] = vals[r][t];
        }
    /* start[b] is now the end of block b (the start of b + 1) */
    int64_t q = 0;
    CHUNKS(n) {
        memset(acc, 0, (size_t)m * sizeof(T));
        for (int64_t end = start[i >> 11]; q < end; q++) { int64_t p = sidx[q] - i; acc[p] = acc[p] + sval[q]; }
        FN(finish)(acc, out + i, m, div, nt);
    }
    nt_done(nt);
    return 0;
}
#undef CURSORS

/* 1 unless idx[0..k) increase strictly and lie in [0, n) (RandK's draws are sorted: see hvdc_first_distinct) */
static int FN(not_sorted)(const int64_t *idx, int64_t k, int64_t n) {
    for (int64_t t = 0; t < k; t++)
        if (idx[t] < (t ? idx[t - 1] + 1 : 0) || idx[t] >= n) return 1;
    return 0;
}

/* RandK with shared indices (sorted): out = 0, out[idx] = (((v_0 + v_1) + ...) + v_{n-1}) / div */
int FN(mean_shared)(const int64_t *idx, int64_t k, const T *const *vals, int nrows, int64_t n, T *out, T div) {
    if (FN(not_sorted)(idx, k, n)) return 1;
    T acc[CHUNK];
    const int nt = use_nt(out, n * (int64_t)sizeof(T));
    int64_t t = 0;
    CHUNKS(n) {
        memset(acc, 0, (size_t)m * sizeof(T));
        for (; t < k && idx[t] < i + m; t++) {
            T s = vals[0][t];
            for (int r = 1; r < nrows; r++) s = s + vals[r][t];
            acc[idx[t] - i] = s;
        }
        FN(finish)(acc, out + i, m, div, nt);
    }
    nt_done(nt);
    return 0;
}

/* x = g + e of a block into buf (g itself without e), with the lanes of sum x^2 and sum (x - x) */
static inline const T *FN(load_sq)(const T *g, const T *e, int64_t i, int64_t m, T *buf, double *asq,
                                   double *afin) {
    const T *x = e ? buf : g + i;
    int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
    __m256d q[4]; __m256 fin = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) q[k] = _mm256_loadu_pd(asq + 4 * k);
    for (; j + 16 <= m; j += 16) {
        __m256 x0 = loadx8(g, e, i + j), x1 = loadx8(g, e, i + j + 8);
        if (e) { _mm256_storeu_ps(buf + j, x0); _mm256_storeu_ps(buf + j + 8, x1); }
        FIN16(fin, x0, x1);
        __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
    }
    save16(q, asq); afin[0] += FN(fin_of)(fin);
#endif
    for (; j < m; j++) {
        double v = e ? (buf[j] = g[i + j] + e[i + j]) : g[i + j];
        int l = (int)(j % LANES); asq[l] += v * v; afin[l] += v - v;
    }
    return x;
}

/* RandK's value for a kept x (times scale when unbiased) into *v; returns what the error keeps, x - v lam */
static inline T FN(randk_keep)(T kept, int unbiased, T scale, T lam, T *v) {
    *v = unbiased ? kept * scale : kept;
    return kept - (lam != (T)1 ? *v * lam : *v);
}

/* RandK's step, its indices sorted: x = g + e (into xout when given), values[t] = x[idx[t]] (times scale when
   unbiased), and xout[idx[t]] = x - values[t] * lam (lam = 1: x - values[t]), block by block while x is in L1.
   st = [sum x^2, finiteness, sum of kept^2, sum of left^2]. Returns 1 (nothing done) unless idx is sorted. */
int FN(randk_step)(const T *g, const T *e, T *xout, int64_t n, const int64_t *idx, int64_t k, int unbiased, T scale,
                   T lam, T *values, double *st) {
    if (FN(not_sorted)(idx, k, n)) return 1;
    double asq[LANES] = {0}, afin[LANES] = {0}, skept = 0.0, sleft = 0.0;
    T buf[CHUNK];
    const int nt = use_nt(xout, n * (int64_t)sizeof(T));
    int64_t t = 0;
#if defined(__AVX2__) && IS_FLOAT
    if (xout) {   /* x goes out as it is formed, 16 at a time; the few groups with a kept index are patched first */
        __m256d q[4]; __m256 fin = _mm256_setzero_ps();
        zero16(q);
        int64_t j = 0;
        for (; j + 16 <= n; j += 16) {
            __m256 x0 = loadx8(g, e, j), x1 = loadx8(g, e, j + 8);
            FIN16(fin, x0, x1);
            __m256d w[4]; widen16(x0, x1, w); sq16(q, w);
            if (t < k && idx[t] < j + 16) {
                T tmp[16];
                _mm256_storeu_ps(tmp, x0); _mm256_storeu_ps(tmp + 8, x1);
                for (; t < k && idx[t] < j + 16; t++) {
                    const int64_t p = idx[t] - j;
                    T kept = tmp[p], left = FN(randk_keep)(kept, unbiased, scale, lam, values + t);
                    tmp[p] = left;
                    skept += (double)kept * kept; sleft += (double)left * left;
                }
                x0 = _mm256_loadu_ps(tmp); x1 = _mm256_loadu_ps(tmp + 8);
            }
            put8(xout + j, x0, nt); put8(xout + j + 8, x1, nt);
        }
        save16(q, asq); afin[0] = FN(fin_of)(fin);
        for (; j < n; j++) {
            T x = e ? g[j] + e[j] : g[j];
            double v = x; int l = (int)(j % LANES); asq[l] += v * v; afin[l] += v - v;
            if (t < k && idx[t] == j) {
                T kept = x, left = FN(randk_keep)(kept, unbiased, scale, lam, values + t++);
                x = left;
                skept += (double)kept * kept; sleft += (double)left * left;
            }
            xout[j] = x;
        }
        nt_done(nt);
        st[0] = sum_lanes(asq); st[1] = sum_lanes(afin); st[2] = skept; st[3] = sleft;
        return 0;
    }
#endif
    CHUNKS(n) {
        const T *x = FN(load_sq)(g, e, i, m, buf, asq, afin);
        if (xout && x != buf) { memcpy(buf, x, (size_t)m * sizeof(T)); x = buf; }
        for (; t < k && idx[t] < i + m; t++) {
            int64_t p = idx[t] - i;
            T kept = x[p], left = FN(randk_keep)(kept, unbiased, scale, lam, values + t);
            if (xout) buf[p] = left;
            skept += (double)kept * kept; sleft += (double)left * left;
        }
        if (xout) {
            int64_t j = 0;
#if defined(__AVX2__) && IS_FLOAT
            if (nt && (((uintptr_t)(xout + i)) & 31) == 0)
                for (; j + 8 <= m; j += 8) _mm256_stream_ps(xout + i + j, _mm256_loadu_ps(buf + j));
#endif
            if (j < m) memcpy(xout + i + j, buf + j, (size_t)(m - j) * sizeof(T));
        }
    }
    nt_done(nt);
    st[0] = sum_lanes(asq); st[1] = sum_lanes(afin); st[2] = skept; st[3] = sleft;
    return 0;
}

#undef MMASK
#undef SIGNBIT
