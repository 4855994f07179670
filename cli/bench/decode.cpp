// `dilatron bench decode`: generation tokens/s and KV-cache memory against the context length.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "bench/bench.h"
#include "commands.h"
#include "dilatron/autograd.h"
#include "dilatron/config.h"
#include "dilatron/kernels/backend.h"
#include "dilatron/random.h"
#include "dilatron/trainer.h"

namespace dilatron::cli::bench {
namespace {
namespace fs = std::filesystem;

struct DecodeBenchArgs {
  std::string source, json;  // a config (.toml: random weights) or a checkpoint / run directory
  std::vector<std::string> set;
  std::vector<int64_t> contexts{1024, 4096, 16384, 65536};
  int64_t tokens = 0;  // 0: one period of the largest segment
  int64_t no_cache_max = 8192;
};

// Generation speed with the KV cache at several context lengths: a prompt of `context` random bytes
// (prefill), then `tokens` decode steps (the median step counts); without the cache one token costs
// a forward over the whole context, timed once for the contexts up to --no-cache-max. A step's cost
// depends on where the token falls in its segments (how many grid keys precede it), not on the
// context, so by default each context decodes one whole period of the largest segment: contexts
// that are multiples of it would otherwise time only cheap early-segment steps.
void run_decode_bench(const DecodeBenchArgs& a) {
  DILATRON_CHECK(a.tokens >= 0, "--tokens must be >= 0 (0: one period of the largest segment), got ", a.tokens);
  for (const int64_t c : a.contexts) DILATRON_CHECK(c >= 1, "--contexts: each must be >= 1, got ", c);
  Loaded l;
  if (fs::path(a.source).extension() == ".toml") {
    l.config = load_config(a.source, a.set);
    l.model = build_model(l.config, std::make_shared<Generator>(0));
    l.model->eval();
  } else {
    DILATRON_CHECK(a.set.empty(), "--set applies to a config, not to the checkpoint '", a.source, "'");
    l = load_model(a.source);
  }
  TransformerLM& model = *l.model;
  int64_t tokens = a.tokens;
  if (tokens == 0)
    for (const Schedule& schedule : model.config().layer_schedules)
      for (const AttentionBranch& b : schedule) tokens = std::max(tokens, b.segment);
  const Device device = model.tok->weight.device();
  kernels::Backend& backend = kernels::backend(device);
  autograd::NoGradGuard no_grad;
  Generator gen(0);
  const auto random_tokens = [&](int64_t n) {
    std::vector<int64_t> ids(static_cast<size_t>(n));
    for (int64_t& id : ids) id = static_cast<int64_t>(gen.next_below(256));
    return Tensor::from_vector(ids, {1, n}).to(device);
  };
  // Seconds of f(), the device finished.
  const auto timed = [&](auto&& f) {
    const double t0 = now_seconds();
    f();
    backend.synchronize();
    return now_seconds() - t0;
  };
  std::printf("| context | prefill s | decode tokens/s | ms per token | cache MiB | no-cache s per token | speed-up |\n");
  std::printf("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
  for (const int64_t context : a.contexts) {
    KVCache cache;
    const Tensor prompt = random_tokens(context);
    const double prefill_s = timed([&] { model.forward(prompt, cache); });
    std::vector<double> steps;
    for (int64_t i = 0; i < tokens; ++i) {
      const Tensor next = random_tokens(1);
      steps.push_back(timed([&] { model.forward(next, cache); }));
    }
    const double step_s = median(steps);
    double no_cache_s = NAN;
    if (context <= a.no_cache_max) {
      const Tensor whole = random_tokens(context + 1);
      no_cache_s = timed([&] { model.forward(whole); });
    }
    const double mib = static_cast<double>(cache.bytes()) / (1 << 20);
    std::printf("| %lld | %.3f | %.1f | %.3f | %.3f | %s | %s |\n", static_cast<long long>(context), prefill_s,
                1.0 / step_s, 1e3 * step_s, mib,
                std::isfinite(no_cache_s) ? std::to_string(no_cache_s).c_str() : "-",
                std::isfinite(no_cache_s) ? (std::to_string(static_cast<int64_t>(no_cache_s / step_s)) + "x").c_str()
                                          : "-");
    JsonLine("decode")
        .add("source", a.source)
        .add("device", device.str())
        .add("threads", omp_get_max_threads())
        .add("context", context)
        .add("prefill_s", prefill_s)
        .add("tokens_per_s", 1.0 / step_s)
        .add("tokens", tokens)
        .add("step_s", step_s)
        .add("cache_bytes", cache.bytes())
        .add("no_cache_step_s", no_cache_s)
        .append_to(a.json);
  }
}

}  // namespace

void add_decode(CLI::App& bench) {
  auto [decode, de] = add_command(
      bench, "decode",
      "Generation tokens/s and KV-cache memory at several context lengths, against recomputing without the cache",
      run_decode_bench);
  decode->add_option("source", de->source, "a config (.toml, random weights) or a checkpoint / run directory")->required();
  decode->add_option("--contexts", de->contexts, "context lengths (prompt tokens), e.g. 1024,4096,16384,65536")
      ->delimiter(',');
  decode->add_option("--tokens", de->tokens,
                     "decode steps per context (the median counts; default 0: one period of the largest segment)");
  decode->add_option("--no-cache-max", de->no_cache_max, "time the uncached token only up to this context");
  decode->add_option("--set", de->set, "override a config key: section.key=value (repeatable; configs only)");
  decode->add_option("--json", de->json, "append one JSON line per context to this file");
}

}  // namespace dilatron::cli::bench
