// `dilatron bench peak`: the machine's FP32 FMA peak over all threads (a register-only loop),
// the yardstick every attention figure is a fraction of.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DILATRON_BENCH_X86 1
#endif

#include "bench/bench.h"

namespace dilatron::cli::bench {
namespace {

// Each thread runs kChains independent FMA chains acc = acc * a + b on full vectors, all in
// registers: more chains than (FMA latency) x (FMA pipes), so the pipes never wait. The chains
// converge to b / (1 - a) = 1 (no overflow, no denormals); their sum goes to a volatile sink and
// the loop runs until a deadline read from the clock, so none of it can be folded away.
constexpr int kChains = 12;
constexpr int kInner = 512;  // iterations between clock reads (~3 us)
volatile float g_sink = 0.0f;

struct FmaLoop {
  const char* isa;
  int lanes;            // floats per vector
  double flops_per_op;  // 2 for a fused multiply-add or a multiply and an add
  uint64_t (*run)(double deadline, float seed);  // returns the blocks of kInner iterations run
};

#ifdef DILATRON_BENCH_X86
// One loop per ISA, stamped from one body: each needs its own target attribute and intrinsics, which
// a template cannot switch per instantiation.
#define DILATRON_FMA_LOOP(NAME, TARGET, V, SET1, FMADD, ADD, STORE, LANES)                  \
  __attribute__((target(TARGET))) uint64_t NAME(double deadline, float seed) {            \
    const V a = SET1(0.999999f), b = SET1(1e-6f);                                         \
    V acc[kChains];                                                                        \
    for (int c = 0; c < kChains; ++c) acc[c] = SET1(seed + static_cast<float>(c));        \
    uint64_t blocks = 0;                                                                   \
    do {                                                                                   \
      for (int i = 0; i < kInner; ++i) {                                                   \
        _Pragma("GCC unroll 12") for (int c = 0; c < kChains; ++c) acc[c] = FMADD(acc[c], a, b);  \
      }                                                                                    \
      ++blocks;                                                                            \
    } while (now_seconds() < deadline);                                                    \
    V s = acc[0];                                                                          \
    for (int c = 1; c < kChains; ++c) s = ADD(s, acc[c]);                                  \
    alignas(64) float lanes[LANES];                                                        \
    STORE(lanes, s);                                                                       \
    float total = 0.0f;                                                                    \
    for (const float x : lanes) total += x;                                                \
    g_sink = g_sink + total;                                                               \
    return blocks;                                                                         \
  }

DILATRON_FMA_LOOP(fma_loop_avx512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps,
                  _mm512_store_ps, 16)
DILATRON_FMA_LOOP(fma_loop_avx2, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps,
                  _mm256_store_ps, 8)
#undef DILATRON_FMA_LOOP
#endif

// Portable: 128-bit GCC vectors, a multiply and an add (SSE2 on any x86-64, NEON on arm64).
uint64_t fma_loop_generic(double deadline, float seed) {
  typedef float v4 __attribute__((vector_size(16)));
  const v4 a = {0.999999f, 0.999999f, 0.999999f, 0.999999f}, b = {1e-6f, 1e-6f, 1e-6f, 1e-6f};
  v4 acc[kChains];
#pragma GCC unroll 12
  for (int c = 0; c < kChains; ++c) acc[c] = v4{} + (seed + static_cast<float>(c));
  uint64_t blocks = 0;
  do {
    for (int i = 0; i < kInner; ++i) {
#pragma GCC unroll 12
      for (int c = 0; c < kChains; ++c) acc[c] = acc[c] * a + b;
    }
    ++blocks;
  } while (now_seconds() < deadline);
  v4 s = acc[0];
  for (int c = 1; c < kChains; ++c) s += acc[c];
  g_sink = g_sink + s[0] + s[1] + s[2] + s[3];
  return blocks;
}

// The widest loop this CPU runs (the CPU, not the build flags: the library's kernels are built
// with -march=native by default, so this is also the ISA they use).
FmaLoop best_fma_loop() {
#ifdef DILATRON_BENCH_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {"AVX-512F FMA (512-bit)", 16, 2.0, fma_loop_avx512};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return {"AVX2 FMA (256-bit)", 8, 2.0, fma_loop_avx2};
  return {"SSE2 mul+add (128-bit, no FMA)", 4, 2.0, fma_loop_generic};
#else
  return {"generic 128-bit mul+add", 4, 2.0, fma_loop_generic};
#endif
}

struct PeakArgs {
  double seconds = 1.0;
  std::string json;
};

void run_peak(const PeakArgs& a) {
  const Peak p = measure_peak(a.seconds);
  std::printf("| ISA | threads | GFLOP/s (FP32, all threads) | GFLOP/s per thread | seconds |\n");
  std::printf("| --- | ---: | ---: | ---: | ---: |\n");
  std::printf("| %s | %d | %.1f | %.1f | %.2f |\n", p.isa.c_str(), p.threads, p.gflops, p.gflops / p.threads,
              p.seconds);
  JsonLine("peak")
      .add("isa", p.isa)
      .add("threads", p.threads)
      .add("hardware_threads", static_cast<int>(std::thread::hardware_concurrency()))
      .add("gflops", p.gflops)
      .add("gflops_per_thread", p.gflops / p.threads)
      .add("seconds", p.seconds)
      .add("omp_wait_policy", std::getenv("OMP_WAIT_POLICY"))  // main sets PASSIVE unless the user chose
      .append_to(a.json);
}

}  // namespace

Peak measure_peak(double seconds) {
  DILATRON_CHECK(seconds > 0.0 && seconds <= 600.0, "--seconds must be in (0, 600], got ", seconds);
  const FmaLoop loop = best_fma_loop();
  const int threads = omp_get_max_threads();
  const int trials = std::max(1, static_cast<int>(std::lround(seconds / 0.25)));
  std::vector<uint64_t> blocks(static_cast<size_t>(threads), 0);
  double start = 0.0, elapsed = 0.0, best = 0.0;
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    (void)loop.run(now_seconds() + std::min(0.2, 0.25 * seconds), static_cast<float>(t));
    for (int trial = 0; trial < trials; ++trial) {
#pragma omp barrier
#pragma omp single
      start = now_seconds();
      blocks[static_cast<size_t>(t)] = loop.run(start + seconds / trials, static_cast<float>(t));
#pragma omp barrier
#pragma omp single
      {
        const double wall = now_seconds() - start;
        double ops = 0.0;
        for (const uint64_t b : blocks) ops += static_cast<double>(b) * kInner * kChains * loop.lanes;
        best = std::max(best, ops * loop.flops_per_op / wall * 1e-9);
        elapsed += wall;
      }
    }
  }
  return {best, threads, elapsed, loop.isa};
}

void add_peak(CLI::App& bench) {
  auto [peak, p] =
      add_command(bench, "peak", "The machine's FP32 FMA peak over all threads (register-only loop)", run_peak);
  peak->add_option("--seconds", p->seconds, "how long to run the loop (in trials of 0.25 s; the best one counts)");
  peak->add_option("--json", p->json, "append the result as a JSON line to this file");
}

}  // namespace dilatron::cli::bench
