// 16-lane AVX-512 (F/BW/VL/DQ) + F16C vector for kernels_impl.h.
// Included inside an anonymous namespace by isa_avx512.cpp.
//
// bf16 stores use integer round-to-nearest-even, not AVX512_BF16's VCVTNEPS2BF16: that
// instruction always flushes subnormal inputs and outputs to zero, while torch (and the
// torch backend these kernels are tested against) keeps them.

struct VecAvx512 {
  static constexpr int W = 16;
  using F = __m512;
  using I = __m512i;
  struct D {
    __m512d a, b;
  };

  static inline F zero() { return _mm512_setzero_ps(); }
  static inline F set1(float x) { return _mm512_set1_ps(x); }
  static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static inline F div(F a, F b) { return _mm512_div_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static inline F sqrt(F a) { return _mm512_sqrt_ps(a); }
  static inline F neg(F a) {
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(a), _mm512_set1_epi32(int(0x80000000u))));
  }
  static inline F maxnan(F a, F b) {
    F m = _mm512_max_ps(a, b);  // second operand when either is NaN
    return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
  }

  static inline F ld32(const float* p) { return _mm512_loadu_ps(p); }
  static inline void st32(float* p, F x) { _mm512_storeu_ps(p, x); }
  static inline F ldbf(const uint16_t* p) {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static inline void st16(uint16_t* p, I r, F x) {
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline void stbf_rne(uint16_t* p, F x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    st16(p, r, x);
  }
  static inline void stbf_sr(uint16_t* p, F x, I rnd) {
    __m512i u = _mm512_add_epi32(_mm512_castps_si512(x), _mm512_srli_epi32(rnd, 16));
    st16(p, _mm512_srli_epi32(u, 16), x);
  }
  static inline F ldh(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static inline void sth(uint16_t* p, F x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static inline I lowbias(I x) {
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(int(0x846ca68bu)));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return x;
  }
  static inline I rand(uint32_t idx_lo, uint32_t k0, uint32_t k1) {
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(int(idx_lo)),
                                   _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i x = lowbias(_mm512_xor_si512(idx, _mm512_set1_epi32(int(k0))));
    return lowbias(_mm512_add_epi32(x, _mm512_set1_epi32(int(k1))));
  }

  static inline I shl16(I x) { return _mm512_slli_epi32(x, 16); }
  static inline D dzero() { return D{_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static inline void dacc(D& d, F x) {
    __m512d lo = _mm512_cvtps_pd(_mm512_castps512_ps256(x));
    __m512d hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    d.a = _mm512_fmadd_pd(lo, lo, d.a);
    d.b = _mm512_fmadd_pd(hi, hi, d.b);
  }
  static inline D dadd(const D& x, const D& y) { return D{_mm512_add_pd(x.a, y.a), _mm512_add_pd(x.b, y.b)}; }
  static inline double dsum(const D& d) {
    alignas(64) double t[8];
    _mm512_store_pd(t, _mm512_add_pd(d.a, d.b));
    return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
  }
};
