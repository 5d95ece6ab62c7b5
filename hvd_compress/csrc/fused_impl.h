/* The kernels for one floating type T (float or double): included by fused.c once per type. */

#define MMASK ((((UT)1) << MBITS) - 1)
#define SIGNBIT (((UT)1) << (8 * sizeof(T) - 1))

static inline T FN(from_bits)(UT b) { T v; memcpy(&v, &b, sizeof(T)); return v; }
static inline UT FN(to_bits)(T v) { UT b; memcpy(&b, &v, sizeof(T)); return b; }

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

#define CHUNKS(n) for (int64_t i = 0, m; m = (n) - i < CHUNK ? (n) - i : CHUNK, i < (n); i += CHUNK)

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

/* x = g + e (into xout when given); st = [sum x^2, sum (x - x)]; returns 1 when some x is not finite */
int FN(addx)(const T *g, const T *e, T *xout, int64_t n, double *st) {
    double asq[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    CHUNKS(n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, double v = x[j]; asq[l] += v * v; afin[l] += v - v);
    }
    st[0] = sum_lanes(asq); st[1] = sum_lanes(afin);
    return st[1] == 0.0 ? 0 : 1;
}

/* ScaledSign pass 1: st = [sum x^2, sum |x|, finiteness]; bits = x < 0 */
int FN(sign1)(const T *g, const T *e, T *xout, int64_t n, uint8_t *bits, double *st) {
    double asq[LANES] = {0}, aabs[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    CHUNKS(n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
        LANE_LOOP(m, double v = x[j]; asq[l] += v * v; aabs[l] += fabs(v); afin[l] += v - v);
        FN(pack_negative)(x, m, bits + (i >> 3));
    }
    st[0] = sum_lanes(asq); st[1] = sum_lanes(aabs); st[2] = sum_lanes(afin);
    return st[2] == 0.0 ? 0 : 1;
}

/* OneBit pass 1: st = [sum x^2, sum of x >= 0 (and NaN), sum of x < 0, count of x < 0, finiteness] */
int FN(onebit1)(const T *g, const T *e, T *xout, int64_t n, uint8_t *bits, double *st) {
    double asq[LANES] = {0}, apos[LANES] = {0}, aneg[LANES] = {0}, acnt[LANES] = {0}, afin[LANES] = {0};
    T buf[CHUNK];
    CHUNKS(n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 0);
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
    CHUNKS(n) {
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
#define NAT1(UP) for (int64_t j = j0; j < m; j++) { UT b = FN(to_bits)(x[j]); UT mag = b & ~SIGNBIT; \
            UT ef = mag >> MBITS; UT fr = mag & MMASK; UT u = (UP); UT ex = mag == 0 ? 0 : ef + u; \
            t = t > ex ? t : ex; bad |= (UT)((ef == 0) & (mag != 0)) | (UT)(ef == EMAX); u8[j] = (uint8_t)u; }
        int64_t j0 = 0;
#if defined(__AVX2__) && IS_FLOAT
        {
            const __m256i absm = _mm256_set1_epi32(0x7fffffff), mm = _mm256_set1_epi32(0x7fffff);
            const __m256i one_bits = _mm256_set1_epi32(0x3f800000), emax = _mm256_set1_epi32(EMAX);
            const __m256i half = _mm256_set1_epi32(0x3fffff), zero = _mm256_setzero_si256();
            __m256i tv = zero, bv = zero;
            for (; j0 + 8 <= m; j0 += 8) {
                __m256i b = _mm256_castps_si256(_mm256_loadu_ps(x + j0));
                __m256i mag = _mm256_and_si256(b, absm), ef = _mm256_srli_epi32(mag, MBITS), fr = _mm256_and_si256(mag, mm);
                __m256i upm;
                if (det) {
                    upm = _mm256_cmpgt_epi32(fr, half);
                } else {
                    __m256 frac = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(fr, one_bits)), _mm256_set1_ps(1.0f));
                    upm = _mm256_castps_si256(_mm256_cmp_ps(uniform8_f((uint32_t)(i + j0), k1, k2), frac, _CMP_LT_OQ));
                }
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
        if (det) {
            NAT1((UT)(fr >= (((UT)1) << (MBITS - 1))))
        } else {
            uint32_t base = (uint32_t)i;
            NAT1((UT)(UNIFORM(hash32(base + (uint32_t)j, k1, k2)) < FN(from_bits)(fr | ONE_BITS) - (T)1))
        }
#undef NAT1
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

/* QSGD pass 1: st = [sum x^2, max |x|, finiteness] */
int FN(qsgd1)(const T *g, const T *e, T *xout, int64_t n, double *st) {
    double asq[LANES] = {0}, afin[LANES] = {0};
    T peak[LANES] = {0};
    T buf[CHUNK];
    CHUNKS(n) {
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
    CHUNKS(n) {
        const T *x = FN(load)(g, e, xout, i, m, buf, 1);
        uint32_t base = (uint32_t)i;
        T *o = xout ? xout + i : rbuf;
        int64_t j0 = 0;
#if defined(__AVX2__) && IS_FLOAT
        {
            const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), zero = _mm256_setzero_ps();
            const __m256 vden = _mm256_set1_ps(den), vlev = _mm256_set1_ps(levels), vnorm = _mm256_set1_ps(norm);
            const __m256 vlam = _mm256_set1_ps(lam), one = _mm256_set1_ps(1.0f);
            for (; j0 + 8 <= m; j0 += 8) {
                __m256 xv = _mm256_loadu_ps(x + j0);
                __m256 s = _mm256_mul_ps(_mm256_div_ps(_mm256_and_ps(xv, absm), vden), vlev);
                __m256 lo = _mm256_floor_ps(s);
                __m256 up = _mm256_and_ps(_mm256_cmp_ps(uniform8_f(base + (uint32_t)j0, k1, k2), _mm256_sub_ps(s, lo),
                                                        _CMP_LT_OQ), one);
                __m256 lv = _mm256_add_ps(lo, up);
                __m256 sv = _mm256_blendv_ps(lv, _mm256_sub_ps(zero, lv), _mm256_cmp_ps(xv, zero, _CMP_LT_OQ));
                __m256i qi = _mm256_cvttps_epi32(sv);
                if (wide) store8_i16((int16_t *)q + i + j0, qi); else store8_u8((int8_t *)q + i + j0, qi);
                __m256 dec = _mm256_mul_ps(_mm256_div_ps(_mm256_mul_ps(vnorm, _mm256_cvtepi32_ps(qi)), vlev), vlam);
                _mm256_storeu_ps(o + j0, _mm256_sub_ps(xv, dec));
            }
        }
#endif
#define QS(QT) do { QT *qq = (QT *)q + i; \
            for (int64_t j = j0; j < m; j++) { T a = x[j] < 0 ? -x[j] : x[j]; T s = a / den * levels; T lo = floor(s); \
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
    int64_t cnt = 0;
    CHUNKS(n) {
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

#undef MMASK
#undef SIGNBIT
