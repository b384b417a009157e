// 8-lane AVX2 + FMA + F16C vector for kernels_impl.h.
// Included inside an anonymous namespace by isa_avx2.cpp (compiled with -mavx2 -mfma -mf16c).

struct VecAvx2 {
  static constexpr int W = 8;
  using F = __m256;
  using I = __m256i;
  struct D {
    __m256d a, b;
  };

  static inline F zero() { return _mm256_setzero_ps(); }
  static inline F set1(float x) { return _mm256_set1_ps(x); }
  static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  static inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static inline F div(F a, F b) { return _mm256_div_ps(a, b); }
  static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static inline F sqrt(F a) { return _mm256_sqrt_ps(a); }
  static inline F neg(F a) { return _mm256_xor_ps(a, _mm256_set1_ps(-0.0f)); }
  static inline F maxnan(F a, F b) {
    // max_ps returns its second operand when either is NaN; patch NaN `a` back in.
    F m = _mm256_max_ps(a, b);
    return _mm256_blendv_ps(m, a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  }

  static inline F ld32(const float* p) { return _mm256_loadu_ps(p); }
  static inline void st32(float* p, F x) { _mm256_storeu_ps(p, x); }
  static inline F ldbf(const uint16_t* p) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline void st16(uint16_t* p, I r) {
    // r holds 8 values < 2^16 in 32-bit lanes: pack (per 128-bit lane) and gather the halves.
    __m256i packed = _mm256_packus_epi32(r, r);
    packed = _mm256_permute4x64_epi64(packed, 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static inline I nan_fix(I r, F x) {
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    return _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
  }
  static inline void stbf_rne(uint16_t* p, F x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    st16(p, nan_fix(r, x));
  }
  static inline void stbf_sr(uint16_t* p, F x, I rnd) {
    __m256i u = _mm256_add_epi32(_mm256_castps_si256(x), _mm256_srli_epi32(rnd, 16));
    st16(p, nan_fix(_mm256_srli_epi32(u, 16), x));
  }
  static inline F ldh(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline void sth(uint16_t* p, F x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }

  static inline I lowbias(I x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7feb352d));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32(int(0x846ca68bu)));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    return x;
  }
  static inline I rand(uint32_t idx_lo, uint32_t k0, uint32_t k1) {
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(int(idx_lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256i x = lowbias(_mm256_xor_si256(idx, _mm256_set1_epi32(int(k0))));
    return lowbias(_mm256_add_epi32(x, _mm256_set1_epi32(int(k1))));
  }

  static inline I shl16(I x) { return _mm256_slli_epi32(x, 16); }
  static inline D dzero() { return D{_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static inline void dacc(D& d, F x) {
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(x));
    __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1));
    d.a = _mm256_fmadd_pd(lo, lo, d.a);
    d.b = _mm256_fmadd_pd(hi, hi, d.b);
  }
  static inline D dadd(const D& x, const D& y) { return D{_mm256_add_pd(x.a, y.a), _mm256_add_pd(x.b, y.b)}; }
  static inline double dsum(const D& d) {
    alignas(32) double t[4];
    _mm256_store_pd(t, _mm256_add_pd(d.a, d.b));
    return (t[0] + t[1]) + (t[2] + t[3]);
  }
};
