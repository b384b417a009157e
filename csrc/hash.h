// Counter-based random bits for stochastic rounding.
//
// The noise for element i of a tensor is a pure function of (i, key): no generator state,
// so results do not depend on the thread count, the chunking or the ISA, and a step can
// be replayed. `lowbias32` is a well-tested 32-bit integer hash (Chris Wellons,
// "Prospecting for Hash Functions"); it is applied twice with two independent 32-bit keys
// so that streams with different keys are not shifted or permuted copies of each other
// (a single keyed round makes stream(key_a)[i] == stream(key_b)[i ^ (key_a ^ key_b)]).
//
// Included inside an anonymous namespace by each ISA translation unit.

static inline uint32_t lowbias32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

static inline uint32_t hash2(uint32_t idx, uint32_t k0, uint32_t k1) {
  return lowbias32(lowbias32(idx ^ k0) + k1);
}

// Segments above 2^32 elements: fold the high half of the index into the second key.
// Kernel blocks start at multiples of the vector width, so a block never straddles 2^32.
static inline uint32_t fold_hi(uint32_t k1, uint64_t idx) {
  return k1 + uint32_t(idx >> 32) * 0x85EBCA6Bu;
}
