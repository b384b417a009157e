// pybind11 bindings of fastaccum._C. Arguments are plain integers (data pointers, element
// counts, dtype codes) and Python scalars: fastaccum/backends/cpu/ops.py extracts them from tensors and
// validates dtypes, devices, contiguity and sizes before any pointer reaches this file.
// The GIL is released while kernels run.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dispatch.h"

namespace py = pybind11;
using fastaccum::AdamJob;
using fastaccum::AdamSeg;
using fastaccum::SgdJob;
using fastaccum::SgdSeg;

namespace {

using Ptrs = std::vector<uintptr_t>;
using Ints = std::vector<int64_t>;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Independent stochastic-rounding stream key for (seed, segment, tensor role).
uint64_t stream_key(uint64_t seed, int64_t seg, int role) {
  return splitmix64(seed ^ splitmix64(uint64_t(seg) * 8u + uint64_t(role) + 1u));
}

void check_dtype(int code, const char* what, bool allow_f16 = true) {
  if (code != fastaccum::kF32 && code != fastaccum::kBF16 && !(allow_f16 && code == fastaccum::kF16)) {
    throw std::invalid_argument(std::string("fastaccum._C: unsupported dtype code ") + std::to_string(code) +
                                " for " + what + " (expected 0=float32, 1=bfloat16" +
                                (allow_f16 ? ", 2=float16)" : ")"));
  }
}

void check_len(size_t got, size_t want, const char* what) {
  if (got != want) {
    throw std::invalid_argument(std::string("fastaccum._C: ") + what + " has " + std::to_string(got) +
                                " entries but there are " + std::to_string(want) + " segments");
  }
}

int threads_arg(int n) { return n < 1 ? 1 : n; }

double py_accumulate(uintptr_t dst, uintptr_t src, int src_dtype, int64_t n, double alpha, int sumsq_of,
                     int nthreads) {
  check_dtype(src_dtype, "src");
  if (sumsq_of < fastaccum::kSumsqNone || sumsq_of > fastaccum::kSumsqResult) {
    throw std::invalid_argument("fastaccum._C.accumulate: sumsq_of must be 0 (none), 1 (src) or 2 (result)");
  }
  if (n < 0) throw std::invalid_argument("fastaccum._C.accumulate: n must be >= 0");
  if (n == 0) return 0.0;
  py::gil_scoped_release nogil;
  return fastaccum::accumulate(reinterpret_cast<float*>(dst), reinterpret_cast<const void*>(src), src_dtype, n,
                               float(alpha), sumsq_of, threads_arg(nthreads));
}

double py_sumsq(uintptr_t x, int64_t n, int nthreads) {
  if (n < 0) throw std::invalid_argument("fastaccum._C.sumsq: n must be >= 0");
  if (n == 0) return 0.0;
  py::gil_scoped_release nogil;
  return fastaccum::sumsq(reinterpret_cast<const float*>(x), n, threads_arg(nthreads));
}

double py_sumsq_segs(const Ptrs& xs, const Ints& numels, int nthreads) {
  check_len(numels.size(), xs.size(), "numels");
  for (int64_t n : numels) {
    if (n < 0) throw std::invalid_argument("fastaccum._C.sumsq_segs: numels must be >= 0");
  }
  std::vector<const float*> p(xs.size());
  for (size_t i = 0; i < xs.size(); ++i) p[i] = reinterpret_cast<const float*>(xs[i]);
  py::gil_scoped_release nogil;
  return fastaccum::sumsq_segs(p.data(), numels.data(), int64_t(p.size()), threads_arg(nthreads));
}

// The pointers and sizes of an Adam update, checked and laid out once. A bucket whose
// tensors do not move (the flat buffer and state, the parameters) reuses it every step, so
// a step crosses into C++ with a list of step counts and the scalars only: converting six
// lists of pointers cost more than the whole update of a 1M-parameter model's small tensors.
struct AdamPlan {
  std::vector<AdamSeg> segs;
  int param_dtype = 0, state_dtype = 0;
  bool amsgrad = false, has_master = false;
};

AdamPlan make_adam_plan(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avgs, const Ptrs& exp_avg_sqs,
                        const Ptrs& max_exp_avg_sqs, const Ptrs& masters, const Ints& numels, int param_dtype,
                        int state_dtype) {
  const size_t n = params.size();
  check_len(grads.size(), n, "grads");
  check_len(exp_avgs.size(), n, "exp_avgs");
  check_len(exp_avg_sqs.size(), n, "exp_avg_sqs");
  check_len(numels.size(), n, "numels");
  AdamPlan plan;
  plan.amsgrad = !max_exp_avg_sqs.empty();
  plan.has_master = !masters.empty();
  if (plan.amsgrad) check_len(max_exp_avg_sqs.size(), n, "max_exp_avg_sqs");
  if (plan.has_master) check_len(masters.size(), n, "masters");
  check_dtype(param_dtype, "params");
  check_dtype(state_dtype, "exp_avgs/exp_avg_sqs", /*allow_f16=*/false);
  plan.param_dtype = param_dtype;
  plan.state_dtype = state_dtype;
  plan.segs.resize(n);
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] < 0) throw std::invalid_argument("fastaccum._C.adam: numels must be >= 0");
    AdamSeg& s = plan.segs[i];
    s.param = reinterpret_cast<void*>(params[i]);
    s.grad = reinterpret_cast<float*>(grads[i]);
    s.exp_avg = reinterpret_cast<void*>(exp_avgs[i]);
    s.exp_avg_sq = reinterpret_cast<void*>(exp_avg_sqs[i]);
    s.max_exp_avg_sq = plan.amsgrad ? reinterpret_cast<void*>(max_exp_avg_sqs[i]) : nullptr;
    s.master = plan.has_master ? reinterpret_cast<float*>(masters[i]) : nullptr;
    s.numel = numels[i];
  }
  return plan;
}

void run_adam_plan(AdamPlan& plan, const Ints& steps, double lr, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, bool maximize, double grad_multiplier,
                   bool stochastic_rounding, uint64_t seed, int nthreads) {
  const size_t n = plan.segs.size();
  check_len(steps.size(), n, "steps");
  const int param_dtype = plan.param_dtype, state_dtype = plan.state_dtype;
  const bool amsgrad = plan.amsgrad, has_master = plan.has_master;
  std::vector<AdamSeg>& segs = plan.segs;
  for (size_t i = 0; i < n; ++i) {
    if (steps[i] < 1) {
      throw std::invalid_argument("fastaccum._C.adam: steps are counted after the increment and must be >= 1, got " +
                                  std::to_string(steps[i]));
    }
    AdamSeg& s = segs[i];
    // Same double-precision scalars as reference.adam_math, rounded to float once.
    const double step = double(steps[i]);
    const double bc1 = 1.0 - std::pow(beta1, step);
    const double bc2 = 1.0 - std::pow(beta2, step);
    s.neg_step_size = float(-(lr / bc1));
    s.bc2_sqrt = float(std::sqrt(bc2));
    s.key_param = stream_key(seed, int64_t(i), 0);
    s.key_m = stream_key(seed, int64_t(i), 1);
    s.key_v = stream_key(seed, int64_t(i), 2);
    s.key_vmax = stream_key(seed, int64_t(i), 3);
  }
  AdamJob job{};
  job.segs = segs.data();
  job.nsegs = int64_t(n);
  job.param_dtype = param_dtype;
  job.state_dtype = state_dtype;
  job.amsgrad = amsgrad;
  job.has_master = has_master;
  job.sr_param = stochastic_rounding && param_dtype == fastaccum::kBF16 && !has_master;
  job.sr_state = stochastic_rounding && state_dtype == fastaccum::kBF16;
  job.maximize = maximize;
  job.decoupled = decoupled;
  job.has_weight_decay = weight_decay != 0.0;
  job.grad_multiplier = float(grad_multiplier);
  job.lerp_weight = float(1.0 - beta1);
  job.beta2 = float(beta2);
  job.one_minus_beta2 = float(1.0 - beta2);
  job.eps = float(eps);
  job.weight_decay = float(weight_decay);
  job.decay_factor = float(1.0 - lr * weight_decay);
  py::gil_scoped_release nogil;
  fastaccum::adam(job, threads_arg(nthreads));
}

// The same update with the step counts kept where the optimizer keeps them: the bucket's
// float32 step tensor (one entry per segment, torch's state["step"] views point into it).
// Each count goes up by one here, so a step crosses into C++ with one address instead of a
// list of counts read out of that tensor and a separate pass adding one to it.
// ``grads``, when given, replaces the planned gradient pointers for this call only (a user's
// p.grad read in place instead of the buffer segment); the other pointers are the plan's.
void run_adam_plan_counted(AdamPlan& plan, uintptr_t step_counts, double lr, double beta1, double beta2,
                           double eps, double weight_decay, bool decoupled, bool maximize, double grad_multiplier,
                           bool stochastic_rounding, uint64_t seed, int nthreads, const Ptrs& grads) {
  float* counts = reinterpret_cast<float*>(step_counts);
  const size_t n = plan.segs.size();
  if (!grads.empty()) check_len(grads.size(), n, "grads");
  Ints steps(n);
  for (size_t i = 0; i < n; ++i) steps[i] = int64_t(counts[i]) + 1;
  std::vector<float*> planned;
  if (!grads.empty()) {
    planned.resize(n);
    for (size_t i = 0; i < n; ++i) {
      planned[i] = plan.segs[i].grad;
      plan.segs[i].grad = reinterpret_cast<float*>(grads[i]);
    }
  }
  struct Restore {  // the plan keeps its own pointers, whatever happens below
    AdamPlan& plan;
    std::vector<float*>& planned;
    ~Restore() {
      for (size_t i = 0; i < planned.size(); ++i) plan.segs[i].grad = planned[i];
    }
  } restore{plan, planned};
  run_adam_plan(plan, steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_multiplier,
                stochastic_rounding, seed, nthreads);
  for (size_t i = 0; i < n; ++i) counts[i] = float(steps[i]);  // only once the update has run
}

void py_adam(const Ptrs& params, const Ptrs& grads, const Ptrs& exp_avgs, const Ptrs& exp_avg_sqs,
             const Ptrs& max_exp_avg_sqs, const Ptrs& masters, const Ints& numels, const Ints& steps,
             int param_dtype, int state_dtype, double lr, double beta1, double beta2, double eps,
             double weight_decay, bool decoupled, bool maximize, double grad_multiplier, bool stochastic_rounding,
             uint64_t seed, int nthreads) {
  AdamPlan plan = make_adam_plan(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, numels,
                                 param_dtype, state_dtype);
  run_adam_plan(plan, steps, lr, beta1, beta2, eps, weight_decay, decoupled, maximize, grad_multiplier,
                stochastic_rounding, seed, nthreads);
}

void py_sgd(const Ptrs& params, const Ptrs& grads, const Ptrs& momentum_buffers, const Ptrs& masters,
            const Ints& numels, const Ints& steps, int param_dtype, double lr, double momentum, double dampening,
            bool nesterov, double weight_decay, bool maximize, double grad_multiplier, bool stochastic_rounding,
            uint64_t seed, int nthreads) {
  const size_t n = params.size();
  check_len(grads.size(), n, "grads");
  check_len(numels.size(), n, "numels");
  check_len(steps.size(), n, "steps");
  const bool has_momentum = momentum != 0.0, has_master = !masters.empty();
  if (has_momentum) check_len(momentum_buffers.size(), n, "momentum_buffers (required when momentum != 0)");
  if (has_master) check_len(masters.size(), n, "masters");
  check_dtype(param_dtype, "params");
  std::vector<SgdSeg> segs(n);
  for (size_t i = 0; i < n; ++i) {
    if (numels[i] < 0) throw std::invalid_argument("fastaccum._C.sgd: numels must be >= 0");
    SgdSeg& s = segs[i];
    s.param = reinterpret_cast<void*>(params[i]);
    s.grad = reinterpret_cast<float*>(grads[i]);
    s.momentum_buffer = has_momentum ? reinterpret_cast<float*>(momentum_buffers[i]) : nullptr;
    s.master = has_master ? reinterpret_cast<float*>(masters[i]) : nullptr;
    s.numel = numels[i];
    s.first_step = steps[i] <= 1;
    s.key_param = stream_key(seed, int64_t(i), 0);
  }
  SgdJob job{};
  job.segs = segs.data();
  job.nsegs = int64_t(n);
  job.param_dtype = param_dtype;
  job.has_master = has_master;
  job.has_momentum = has_momentum;
  job.sr_param = stochastic_rounding && param_dtype == fastaccum::kBF16 && !has_master;
  job.maximize = maximize;
  job.nesterov = nesterov;
  job.has_weight_decay = weight_decay != 0.0;
  job.grad_multiplier = float(grad_multiplier);
  job.momentum = float(momentum);
  job.one_minus_dampening = float(1.0 - dampening);
  job.neg_lr = float(-lr);
  job.weight_decay = float(weight_decay);
  py::gil_scoped_release nogil;
  fastaccum::sgd(job, threads_arg(nthreads));
}

void py_stream(const Ptrs& arrays, int nwrite, int64_t n, int nthreads) {
  if (arrays.empty() || arrays.size() > 8 || nwrite < 0 || size_t(nwrite) > arrays.size() || n < 0) {
    throw std::invalid_argument("fastaccum._C.stream: needs 1..8 arrays, 0 <= nwrite <= len(arrays), n >= 0");
  }
  std::vector<float*> a;
  for (uintptr_t p : arrays) a.push_back(reinterpret_cast<float*>(p));
  py::gil_scoped_release nogil;
  fastaccum::stream(a.data(), int(a.size()), nwrite, n, threads_arg(nthreads));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastaccum CPU kernels (SIMD + threads); called through fastaccum.backends.cpu.ops";
  m.attr("ABI_VERSION") = fastaccum::kAbiVersion;
  m.def("isa", [] { return std::string(fastaccum::active_table().name); }, "ISA the kernels run with");
  m.def("set_isa", &fastaccum::set_isa, py::arg("name"), "Force 'avx512', 'avx2' or 'scalar' (tests, benchmarks)");
  m.def("supported_isas", &fastaccum::supported_isas);
  m.def("use_openmp_runtime", &fastaccum::use_openmp_runtime, py::arg("path"),
        "Run kernel threads on the already-loaded OpenMP runtime at path (torch's); '' = own pool");
  m.def("threading", &fastaccum::threading_mode, "'openmp' (torch's team) or 'pool'");
  m.def("accumulate", &py_accumulate, py::arg("dst"), py::arg("src"), py::arg("src_dtype"), py::arg("n"),
        py::arg("alpha"), py::arg("sumsq_of"), py::arg("nthreads"),
        "dst[:n] += alpha * src[:n] (dst fp32); returns in fp64 sum(src^2) when sumsq_of=1, sum(result^2) when 2");
  m.def("sumsq_segs", &py_sumsq_segs, py::arg("xs"), py::arg("numels"), py::arg("nthreads"),
        "sum of squares (fp64) over several fp32 arrays: one total, combined in a fixed order");
  py::class_<AdamPlan>(m, "AdamPlan", "the pointers of one Adam update, laid out once (see AdamPlan in module.cpp)")
      .def(py::init(&make_adam_plan), py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
           py::arg("exp_avg_sqs"), py::arg("max_exp_avg_sqs"), py::arg("masters"), py::arg("numels"),
           py::arg("param_dtype"), py::arg("state_dtype"))
      .def("run", &run_adam_plan, py::arg("steps"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
           py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"),
           py::arg("grad_multiplier"), py::arg("stochastic_rounding"), py::arg("seed"), py::arg("nthreads"))
      .def("run_counted", &run_adam_plan_counted, py::arg("step_counts"), py::arg("lr"), py::arg("beta1"),
           py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"),
           py::arg("grad_multiplier"), py::arg("stochastic_rounding"), py::arg("seed"), py::arg("nthreads"),
           py::arg("grads") = Ptrs{},
           "run() with the counts read from, and written back (plus one) to, a float32 array of nsegs entries; "
           "grads (nsegs addresses of fp32 arrays), when given, instead of the planned gradients for this call")
      .def_property_readonly("nsegs", [](const AdamPlan& p) { return p.segs.size(); });
  m.def("sumsq", &py_sumsq, py::arg("x"), py::arg("n"), py::arg("nthreads"),
        "sum(x^2) of an fp32 array in fp64 (non-finite when any element is)");
  m.def("adam", &py_adam, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("max_exp_avg_sqs"), py::arg("masters"), py::arg("numels"), py::arg("steps"),
        py::arg("param_dtype"), py::arg("state_dtype"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"), py::arg("maximize"),
        py::arg("grad_multiplier"), py::arg("stochastic_rounding"), py::arg("seed"), py::arg("nthreads"));
  m.def("stream", &py_stream, py::arg("arrays"), py::arg("nwrite"), py::arg("n"), py::arg("nthreads"),
        "benchmark helper: read every fp32 array (n elements each), write back the first nwrite; "
        "the streaming bound of an update with that access pattern");
  m.def("sgd", &py_sgd, py::arg("params"), py::arg("grads"), py::arg("momentum_buffers"), py::arg("masters"),
        py::arg("numels"), py::arg("steps"), py::arg("param_dtype"), py::arg("lr"), py::arg("momentum"),
        py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"), py::arg("maximize"),
        py::arg("grad_multiplier"), py::arg("stochastic_rounding"), py::arg("seed"), py::arg("nthreads"));
}
