// AVX-512 (F, BW, VL, DQ) + FMA + F16C kernels. setup.py compiles this file alone with the
// matching -m flags; dispatch.cpp only calls it after CPUID (and XCR0) confirm them.
#include <cstdint>

#include "kernels.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace fastaccum {
namespace {
#include "hash.h"
#include "vec_avx512.h"
#include "kernels_impl.h"
}  // namespace

const KernelTable kAvx512Table = make_table<VecAvx512>("avx512");

}  // namespace fastaccum
#else
namespace fastaccum {
const KernelTable kAvx512Table = {nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
}
#endif
