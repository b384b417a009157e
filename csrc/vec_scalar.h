// One-lane "vector" for the portable fallback: the same kernel templates (kernels_impl.h)
// run on it, so the scalar path computes exactly the same operations in the same order
// as the SIMD paths (tests compare them bit for bit).
//
// Included inside an anonymous namespace by isa_scalar.cpp only.

struct VecScalar {
  static constexpr int W = 1;
  using F = float;
  using I = uint32_t;
  struct D {
    double a;
  };

  static inline uint32_t bits(float x) {
    uint32_t u;
    __builtin_memcpy(&u, &x, 4);
    return u;
  }
  static inline float from_bits(uint32_t u) {
    float x;
    __builtin_memcpy(&x, &u, 4);
    return x;
  }

  static inline F zero() { return 0.0f; }
  static inline F set1(float x) { return x; }
  static inline F add(F a, F b) { return a + b; }
  static inline F sub(F a, F b) { return a - b; }
  static inline F mul(F a, F b) { return a * b; }
  static inline F div(F a, F b) { return a / b; }
  // a * b + c with a single rounding, like the SIMD paths' FMA instructions.
  static inline F fma(F a, F b, F c) { return __builtin_fmaf(a, b, c); }
  static inline F sqrt(F a) { return __builtin_sqrtf(a); }
  static inline F neg(F a) { return -a; }
  // NaN-propagating maximum (torch.maximum semantics).
  static inline F maxnan(F a, F b) { return (a != a) ? a : ((b != b) ? b : (a > b ? a : b)); }

  static inline F ld32(const float* p) { return *p; }
  static inline void st32(float* p, F x) { *p = x; }
  static inline F ldbf(const uint16_t* p) { return from_bits(uint32_t(*p) << 16); }
  static inline void stbf_rne(uint16_t* p, F x) { *p = bf16_rne(x); }
  static inline void stbf_sr(uint16_t* p, F x, I rnd) {
    *p = (x != x) ? uint16_t(0x7FC0) : uint16_t((bits(x) + (rnd >> 16)) >> 16);
  }
  static inline F ldh(const uint16_t* p) { return half_to_float(*p); }
  static inline void sth(uint16_t* p, F x) { *p = float_to_half(x); }

  static inline I rand(uint32_t idx_lo, uint32_t k0, uint32_t k1) { return hash2(idx_lo, k0, k1); }

  static inline I shl16(I x) { return x << 16; }
  static inline D dzero() { return D{0.0}; }
  static inline void dacc(D& d, F x) {
    double y = x;
    d.a = __builtin_fma(y, y, d.a);
  }
  static inline D dadd(const D& x, const D& y) { return D{x.a + y.a}; }
  static inline double dsum(const D& d) { return d.a; }

  // Round-to-nearest-even, NaN -> quiet NaN: the same result as c10::BFloat16(float).
  static inline uint16_t bf16_rne(float x) {
    if (x != x) return 0x7FC0;
    uint32_t u = bits(x);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }

  // IEEE binary16 <-> binary32 without F16C, with subnormals and round-to-nearest-even,
  // by the float-arithmetic method of the FP16 library (also what c10::Half uses): the
  // scaling multiplications let the FPU do the rounding. Needs IEEE float arithmetic
  // without flush-to-zero, which is the x86-64/aarch64 default.
  static inline float half_to_float(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float normalized = from_bits((two_w >> 4) + exp_offset) * 0x1.0p-112f;
    const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result =
        sign | (two_w < (1u << 27) ? bits(denormalized) : bits(normalized));
    return from_bits(result);
  }
  static inline uint16_t float_to_half(float f) {
    float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t b = bits(base);
    const uint32_t exp_bits = (b >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = b & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};
