// AVX2 + FMA + F16C kernels. setup.py compiles this file alone with -mavx2 -mfma -mf16c;
// dispatch.cpp only calls it after CPUID (and the OS) confirm those features.
#include <cstdint>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace fastaccum {
namespace {
#include "hash.h"
#include "vec_avx2.h"
#include "kernels_impl.h"
}  // namespace

const KernelTable kAvx2Table = make_table<VecAvx2>("avx2");

}  // namespace fastaccum
#else
// Built without the flags (non-x86 target, or a compiler that lacks them): not available.
namespace fastaccum {
const KernelTable kAvx2Table = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}
#endif
