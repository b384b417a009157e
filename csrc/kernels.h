// Shared declarations of the fastaccum CPU kernels.
//
// No PyTorch headers anywhere in csrc/: Python passes raw data pointers, element counts,
// dtype codes and scalars, so one build works with any torch version (see DESIGN.md).
//
// Each instruction set (scalar, AVX2, AVX-512) is compiled in its own translation unit
// with its own -m flags and exports one KernelTable; dispatch.cpp picks a table at run
// time from CPUID. Every kernel works on a half-open element range of one segment, so the
// thread pool can split a bucket into chunks without the kernels knowing about threads.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastaccum {

// Must match fastaccum/backends/cpu/ops.py (DTYPE_CODES).
enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// What accumulate() sums the squares of, in the same pass (fp64): nothing, the incoming
// gradient (noise-scale telemetry), or the result dst + alpha*src (the global norm of the
// accumulated buffer, fused into the window's last fold so the step needs no norm pass).
enum SumsqOf : int { kSumsqNone = 0, kSumsqSrc = 1, kSumsqResult = 2 };

// Bump when the Python <-> C++ calling convention changes, so that a stale build is
// refused with a clear message instead of misreading its arguments.
constexpr int kAbiVersion = 4;

struct AdamSeg {
  void* param;           // AdamJob::param_dtype
  float* grad;           // raw accumulated gradient; only read
  void* exp_avg;         // AdamJob::state_dtype
  void* exp_avg_sq;      // AdamJob::state_dtype
  void* max_exp_avg_sq;  // AdamJob::state_dtype; only when AdamJob::amsgrad
  float* master;         // fp32 master weights; only when AdamJob::has_master
  int64_t numel;
  // Step-dependent scalars, computed in double and rounded to float once, the way
  // torch rounds a Python scalar operand of an fp32 op.
  float neg_step_size;  // -lr / (1 - beta1^step)
  float bc2_sqrt;       // sqrt(1 - beta2^step)
  // Stochastic-rounding stream keys (one per rounded tensor), derived from the seed.
  uint64_t key_param, key_m, key_v, key_vmax;  // low half: k0, high half: k1 (hash.h)
};

struct AdamJob {
  const AdamSeg* segs;
  int64_t nsegs;
  int param_dtype;
  int state_dtype;
  bool amsgrad;
  bool has_master;
  bool sr_param;  // stochastic rounding of a bf16 param without master weights
  bool sr_state;  // stochastic rounding of bf16 moments
  bool maximize;
  bool decoupled;
  bool has_weight_decay;
  float grad_multiplier;
  float lerp_weight;  // 1 - beta1
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;  // L2 coefficient (Adam)
  float decay_factor;  // 1 - lr * weight_decay (AdamW)
};

struct SgdSeg {
  void* param;
  float* grad;
  float* momentum_buffer;  // only when SgdJob::has_momentum
  float* master;
  int64_t numel;
  bool first_step;  // torch sets the momentum buffer to the gradient on the first step
  uint64_t key_param;
};

struct SgdJob {
  const SgdSeg* segs;
  int64_t nsegs;
  int param_dtype;
  bool has_master;
  bool has_momentum;
  bool sr_param;
  bool maximize;
  bool nesterov;
  bool has_weight_decay;
  float grad_multiplier;
  float momentum;
  float one_minus_dampening;
  float neg_lr;
  float weight_decay;
};

// One instruction set's kernels. A null `name` means the ISA was not compiled in.
struct KernelTable {
  const char* name;
  // dst[0:n] += alpha * src[0:n]; returns the fp64 sum of squares named by `sumsq_of`
  // (SumsqOf: 0, sum(src^2) or sum(result^2)).
  double (*accumulate)(float* dst, const void* src, int src_dtype, int64_t n, float alpha,
                       int sumsq_of);
  // sum(x^2) in fp64: inf/nan if any element is inf/nan.
  double (*sumsq)(const float* x, int64_t n);
  // Elements [begin, end) of segment `seg`; begin must be a multiple of 64.
  void (*adam)(const AdamJob& job, int64_t seg, int64_t begin, int64_t end);
  void (*sgd)(const SgdJob& job, int64_t seg, int64_t begin, int64_t end);
  // Benchmark helper: read k <= 8 fp32 arrays, write back the first w (streaming bound).
  void (*stream)(float* const* arrays, int k, int w, int64_t begin, int64_t end);
};

extern const KernelTable kScalarTable;
extern const KernelTable kAvx2Table;
extern const KernelTable kAvx512Table;

}  // namespace fastaccum
