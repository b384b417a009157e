// ISA selection, the thread pool and the chunked drivers. Compiled without ISA flags, so
// nothing here can execute an instruction the CPU lacks.
//
// Threads. The kernels run on *torch's own* OpenMP thread team when torch uses one:
// fastaccum/backends/cpu/ops.py finds the OpenMP runtime torch has loaded (the wheels bundle a
// renamed libgomp) and passes its path to use_openmp_runtime(), which binds to it with
// dlopen(RTLD_NOLOAD) - never loading a second runtime - and calls its GOMP_parallel
// entry point (the ABI `#pragma omp parallel` compiles to). Why not a pool of our own:
// after every parallel torch op, libgomp's workers spin-wait for the next region; on a
// 2-core machine a separate pool then fights them for the cores (measured: the 5M-param
// step took 12 ms right after torch ops instead of 2.5 ms). Torch's spinning workers
// pick our work up at once instead. Linking OpenMP into the extension directly would
// load the system libgomp next to torch's renamed copy: two teams of ncores threads.
//
// Fallback (no OpenMP runtime in the process, e.g. a TBB or native-threads torch
// build, or FASTACCUM_THREADS=pool): a small persistent pool of std::threads that block
// on a condition variable between calls. Python passes torch.get_num_threads() either way.
#include "dispatch.h"

#include <dlfcn.h>
#include <pthread.h>

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

namespace fastaccum {

// ------------------------------------------------------------------------------------
// CPU features

namespace {

struct Features {
  bool avx2 = false;
  bool avx512 = false;
};

#if defined(__x86_64__) || defined(_M_X64)
uint64_t xgetbv0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (uint64_t(edx) << 32) | eax;
}

Features detect() {
  Features f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c & (1u << 12), osxsave = c & (1u << 27), avx = c & (1u << 28), f16c = c & (1u << 29);
  if (!(osxsave && avx)) return f;
  // The OS must save the YMM (bits 1-2) and, for AVX-512, the opmask/ZMM (bits 5-7) state.
  const uint64_t xcr0 = xgetbv0();
  const bool os_ymm = (xcr0 & 0x6) == 0x6, os_zmm = (xcr0 & 0xE6) == 0xE6;
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512dq = b & (1u << 17),
             avx512bw = b & (1u << 30), avx512vl = b & (1u << 31);
  f.avx2 = os_ymm && avx2 && fma && f16c;
  f.avx512 = f.avx2 && os_zmm && avx512f && avx512dq && avx512bw && avx512vl;
  return f;
}
#else
Features detect() { return Features{}; }
#endif

const Features& features() {
  static const Features f = detect();
  return f;
}

bool isa_usable(const KernelTable& t, bool cpu_has) { return t.name != nullptr && cpu_has; }

const KernelTable* table_for(const std::string& name) {
  if (name == "avx512" && isa_usable(kAvx512Table, features().avx512)) return &kAvx512Table;
  if (name == "avx2" && isa_usable(kAvx2Table, features().avx2)) return &kAvx2Table;
  if (name == "scalar") return &kScalarTable;
  return nullptr;
}

const KernelTable* best_table() {
  if (const char* env = std::getenv("FASTACCUM_ISA")) {
    if (*env) {
      if (const KernelTable* t = table_for(env)) return t;
      // An unusable request falls back to the best ISA rather than failing import;
      // set_isa() is the strict interface.
    }
  }
  for (const char* n : {"avx512", "avx2", "scalar"}) {
    if (const KernelTable* t = table_for(n)) return t;
  }
  return &kScalarTable;
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& active_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (!t) {
    t = best_table();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* n : {"avx512", "avx2", "scalar"}) {
    if (table_for(n)) out.emplace_back(n);
  }
  return out;
}

void set_isa(const std::string& name) {
  const KernelTable* t = table_for(name);
  if (!t) {
    std::string choices;
    for (const auto& s : supported_isas()) choices += (choices.empty() ? "" : ", ") + s;
    throw std::invalid_argument("fastaccum: ISA '" + name + "' is not available on this CPU/build; choose one of: " +
                                choices);
  }
  g_table.store(t, std::memory_order_release);
}

// ------------------------------------------------------------------------------------
// Thread pool

namespace {

class Pool {
 public:
  // Runs fn(0..n-1) with fn(0) on the calling thread; returns when all have finished.
  void run(int n, const std::function<void(int)>& fn) {
    if (n <= 1) {
      fn(0);
      return;
    }
    std::lock_guard<std::mutex> serial(run_mu_);  // two Python threads may call at once
    {
      std::unique_lock<std::mutex> lk(mu_);
      while (int(workers_) < n - 1) {
        const int id = int(workers_++);
        // Started before ++gen_ below, so the new worker also joins this call.
        std::thread([this, id, g = gen_] { loop(id, g); }).detach();
      }
      fn_ = &fn;
      want_ = n - 1;
      remaining_ = n - 1;
      ++gen_;
    }
    cv_work_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lk(mu_);
    cv_done_.wait(lk, [this] { return remaining_ == 0; });
    fn_ = nullptr;
  }

 private:
  void loop(int id, uint64_t seen) {
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_work_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (id >= want_) continue;
      const std::function<void(int)>* fn = fn_;
      lk.unlock();
      (*fn)(id + 1);
      lk.lock();
      if (--remaining_ == 0) cv_done_.notify_one();
    }
  }

  std::mutex run_mu_;
  std::mutex mu_;
  std::condition_variable cv_work_, cv_done_;
  const std::function<void(int)>* fn_ = nullptr;
  uint64_t gen_ = 0;
  int want_ = 0;
  int remaining_ = 0;
  unsigned workers_ = 0;
};

// Leaked on purpose: detached workers may still be blocked in it at interpreter exit, and
// a forked child (DataLoader workers) gets a fresh pool because the parent's threads do
// not exist there.
Pool* g_pool = nullptr;
std::once_flag g_atfork_once;

Pool& pool() {
  std::call_once(g_atfork_once, [] { pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; }); });
  if (!g_pool) g_pool = new Pool();
  return *g_pool;
}

// Work is cut into fixed chunks (a multiple of 64 elements so that the kernels' vector
// blocks, and the stochastic-rounding counters, line up whatever the ISA). 64K elements
// is 2 MiB of fp32 Adam traffic: large enough to amortise scheduling, small enough to
// balance two to a few dozen threads when another process steals a core.
constexpr int64_t kChunk = 1 << 16;
// Below this many elements per thread, waking a worker costs more than it saves.
constexpr int64_t kMinPerThread = 1 << 15;

// torch's OpenMP runtime, when bound (see the top of this file).
using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);
using OmpThreadNumFn = int (*)();
std::atomic<GompParallelFn> g_gomp_parallel{nullptr};
std::atomic<OmpThreadNumFn> g_omp_thread_num{nullptr};

struct OmpCtx {
  const std::function<void(int)>* fn;
  OmpThreadNumFn tid;
};

void omp_trampoline(void* data) {
  const OmpCtx* ctx = static_cast<const OmpCtx*>(data);
  (*ctx->fn)(ctx->tid());
}

// Runs fn(0..n-1) on n threads: torch's OpenMP team when bound, else our pool.
void run_parallel(int n, const std::function<void(int)>& fn) {
  const GompParallelFn par = g_gomp_parallel.load(std::memory_order_acquire);
  if (par != nullptr) {
    OmpCtx ctx{&fn, g_omp_thread_num.load(std::memory_order_acquire)};
    par(&omp_trampoline, &ctx, unsigned(n), 0u);
    return;
  }
  pool().run(n, fn);
}

int effective_threads(int nthreads, int64_t total) {
  if (nthreads < 1) nthreads = 1;
  const int64_t useful = (total + kMinPerThread - 1) / kMinPerThread;
  return int(useful < nthreads ? (useful < 1 ? 1 : useful) : nthreads);
}

// Runs body(c) for c in [0, nchunks) on up to nthreads threads, dynamically scheduled.
void for_chunks(int64_t nchunks, int64_t total_elems, int nthreads, const std::function<void(int64_t)>& body) {
  const int n = effective_threads(nthreads, total_elems);
  if (n <= 1 || nchunks <= 1) {
    for (int64_t c = 0; c < nchunks; ++c) body(c);
    return;
  }
  std::atomic<int64_t> next{0};
  run_parallel(n, [&](int) {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < nchunks;) body(c);
  });
}

struct Chunk {
  int64_t seg, begin, end;
};

template <class Seg>
std::vector<Chunk> make_chunks(const Seg* segs, int64_t nsegs, int64_t* total) {
  std::vector<Chunk> chunks;
  *total = 0;
  for (int64_t s = 0; s < nsegs; ++s) {
    const int64_t n = segs[s].numel;
    *total += n;
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({s, b, b + kChunk < n ? b + kChunk : n});
  }
  return chunks;
}

}  // namespace

bool use_openmp_runtime(const std::string& path) {
  if (path.empty()) {  // back to our own pool
    g_gomp_parallel.store(nullptr, std::memory_order_release);
    return false;
  }
  // RTLD_NOLOAD: only a runtime that is already loaded (torch's); the handle is kept for
  // the life of the process, like the library itself.
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (h == nullptr) return false;
  void* par = dlsym(h, "GOMP_parallel");
  void* tid = dlsym(h, "omp_get_thread_num");
  if (par == nullptr || tid == nullptr) return false;
  g_omp_thread_num.store(reinterpret_cast<OmpThreadNumFn>(tid), std::memory_order_release);
  g_gomp_parallel.store(reinterpret_cast<GompParallelFn>(par), std::memory_order_release);
  return true;
}

std::string threading_mode() {
  return g_gomp_parallel.load(std::memory_order_acquire) != nullptr ? "openmp" : "pool";
}

// ------------------------------------------------------------------------------------
// Drivers

double accumulate(float* dst, const void* src, int src_dtype, int64_t n, float alpha, int sumsq_of,
                  int nthreads) {
  const KernelTable& t = active_table();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  const int64_t esz = src_dtype == kF32 ? 4 : 2;
  std::vector<double> partial(size_t(nchunks), 0.0);
  for_chunks(nchunks, n, nthreads, [&](int64_t c) {
    const int64_t b = c * kChunk, e = b + kChunk < n ? b + kChunk : n;
    partial[size_t(c)] =
        t.accumulate(dst + b, static_cast<const char*>(src) + b * esz, src_dtype, e - b, alpha, sumsq_of);
  });
  double s = 0.0;
  for (double p : partial) s += p;  // fixed order: the same sum for any thread count
  return s;
}

double sumsq(const float* x, int64_t n, int nthreads) {
  const KernelTable& t = active_table();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(size_t(nchunks), 0.0);
  for_chunks(nchunks, n, nthreads, [&](int64_t c) {
    const int64_t b = c * kChunk, e = b + kChunk < n ? b + kChunk : n;
    partial[size_t(c)] = t.sumsq(x + b, e - b);
  });
  double s = 0.0;
  for (double p : partial) s += p;
  return s;
}

double sumsq_segs(const float* const* xs, const int64_t* numels, int64_t nsegs, int nthreads) {
  const KernelTable& t = active_table();
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t s = 0; s < nsegs; ++s) {
    total += numels[s];
    for (int64_t b = 0; b < numels[s]; b += kChunk) {
      chunks.push_back({s, b, b + kChunk < numels[s] ? b + kChunk : numels[s]});
    }
  }
  std::vector<double> partial(chunks.size(), 0.0);
  for_chunks(int64_t(chunks.size()), total, nthreads, [&](int64_t c) {
    const Chunk& ch = chunks[size_t(c)];
    partial[size_t(c)] = t.sumsq(xs[ch.seg] + ch.begin, ch.end - ch.begin);
  });
  double s = 0.0;
  for (double p : partial) s += p;
  return s;
}

void adam(const AdamJob& job, int nthreads) {
  const KernelTable& t = active_table();
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(job.segs, job.nsegs, &total);
  for_chunks(int64_t(chunks.size()), total, nthreads, [&](int64_t c) {
    const Chunk& ch = chunks[size_t(c)];
    t.adam(job, ch.seg, ch.begin, ch.end);
  });
}

void sgd(const SgdJob& job, int nthreads) {
  const KernelTable& t = active_table();
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(job.segs, job.nsegs, &total);
  for_chunks(int64_t(chunks.size()), total, nthreads, [&](int64_t c) {
    const Chunk& ch = chunks[size_t(c)];
    t.sgd(job, ch.seg, ch.begin, ch.end);
  });
}

void stream(float* const* arrays, int k, int w, int64_t n, int nthreads) {
  const KernelTable& t = active_table();
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  for_chunks(nchunks, n, nthreads, [&](int64_t c) {
    const int64_t b = c * kChunk, e = b + kChunk < n ? b + kChunk : n;
    t.stream(arrays, k, w, b, e);
  });
}

}  // namespace fastaccum
