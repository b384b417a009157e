// Run-time ISA selection and the multi-threaded drivers around the per-range kernels.
#pragma once

#include <string>
#include <vector>

#include "kernels.h"

namespace fastaccum {

// The best kernel table this CPU (and OS) supports, unless overridden by set_isa() or the
// FASTACCUM_ISA environment variable ("avx512", "avx2", "scalar").
const KernelTable& active_table();
// Force an ISA (for tests and benchmarks); throws std::invalid_argument naming the choices
// if it is unknown or not supported here.
void set_isa(const std::string& name);
std::vector<std::string> supported_isas();

// Run the kernels' threads on the OpenMP runtime at `path` if it is already loaded in the
// process (torch's); returns false (keeping our own pool) otherwise. "" selects the pool.
bool use_openmp_runtime(const std::string& path);
// "openmp" or "pool".
std::string threading_mode();

// All drivers split the work into fixed-size chunks (independent of the thread count, so
// sums are combined in the same order whatever the number of threads) and run them on
// `nthreads` threads: the caller plus nthreads-1 pool workers.
double accumulate(float* dst, const void* src, int src_dtype, int64_t n, float alpha, int sumsq_of,
                  int nthreads);
double sumsq(const float* x, int64_t n, int nthreads);
// sum of x_s^2 over `nsegs` fp32 segments, one fp64 total (fixed order of chunks).
double sumsq_segs(const float* const* xs, const int64_t* numels, int64_t nsegs, int nthreads);
void adam(const AdamJob& job, int nthreads);
void sgd(const SgdJob& job, int nthreads);
// Streaming-bound kernel for benchmarks (see kernels_impl.h, stream_entry).
void stream(float* const* arrays, int k, int w, int64_t n, int nthreads);

}  // namespace fastaccum
