#!/usr/bin/env bash
# The GPU check: builds dilatron for the GPU it finds (or unpacks a prebuilt bundle), runs every
# CUDA test, compute-sanitizer memcheck (and racecheck, for shared-memory races) on the attention
# tests, the attention benchmark, and 50 training steps on the GPU against the same 50 on the CPU,
# then writes a Markdown report to OUTDIR/gpu-check.md (a summary table last, also printed). The
# bf16 tensor-core attention tests and their memcheck have steps of their own.
# Designed to finish within 8 minutes on an H100: the steps' time limits add up to less.
#
#   scripts/gpu-check.sh OUTDIR
#
# A lent GPU machine is bare and offline, so the usual way is to build here and carry the result:
#   scripts/gpu-bundle.sh                      # -> build-gpu-bundle.tar.xz (binaries + their libraries)
#   DILATRON_GPU_BUNDLE=build-gpu-bundle.tar.xz scripts/gpu-check.sh OUTDIR   # on the GPU machine
# Shorter runs: DILATRON_GPU_BENCH_SECONDS (60), DILATRON_GPU_TRAIN_SECONDS (100 per config),
# DILATRON_GPU_TRAIN_CONFIGS ("passkey passkey-local").
# Without a bundle it needs nvcc, CMake and the Debian packages of scripts/install-deps.sh.
# DILATRON_GPU_BUILD_DIR overrides the build directory (default: build-gpu in the repository).
# Files in OUTDIR: gpu-check.md, build.log, tests.log, tests.xml, tests-bf16.log, tests-bf16.xml,
# memcheck.log, memcheck-bf16.log, racecheck.log, bench.md, train.log.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
out="$1"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${DILATRON_GPU_BUILD_DIR:-$root/build-gpu}"
report="$out/gpu-check.md"
summary=()  # rows of the summary table

# step NAME LIMIT_SECONDS LOG COMMAND...: runs the command under a time limit with its output in LOG;
# sets step_rc and step_seconds.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  step_rc=$?
  step_seconds=$((SECONDS - t0))
  if [ $step_rc -eq 124 ] || [ $step_rc -eq 137 ]; then echo "   timed out after ${limit}s"; fi
}
add_row() { summary+=("| $1 | $2 | $3 s | $4 |"); }

{
  echo "# dilatron GPU check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo 'nvidia-smi failed')"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo 'not found')"
  echo "- cmake: $(cmake --version 2>/dev/null | head -n 1 || echo 'not found')"
  echo
} >"$report"

# ---- build, or unpack a bundle built elsewhere (scripts/gpu-bundle.sh) ----
if [ -n "${DILATRON_GPU_BUNDLE:-}" ]; then
  bundle_dir="$(mktemp -d)"
  step "unpack bundle" 60 "$out/build.log" tar -C "$bundle_dir" -xJf "$DILATRON_GPU_BUNDLE"
  build_rc=$step_rc
  bin="$bundle_dir/bundle/bin"
  # cuBLAS and cuRAND come from this machine's CUDA: the toolkit's lib64 or the Python wheels.
  cuda_libs="$(find /usr/local /usr/lib /opt \( -name 'libcublas.so.1*' -o -name 'libcurand.so.1*' \) \
               -printf '%h\n' 2>/dev/null | awk '!seen[$0]++' | paste -sd:)"
  export LD_LIBRARY_PATH="$bundle_dir/bundle/lib:$cuda_libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if [ $build_rc -eq 0 ] && ! "$bin/dilatron_tests" --gtest_list_tests >/dev/null 2>>"$out/build.log"; then
    build_rc=1
  fi
  if command -v cuobjdump >/dev/null 2>&1; then
    cuobjdump --dump-resource-usage "$bundle_dir/bundle/lib/libdilatron.so" >>"$out/build.log" 2>&1
  fi
  build_name="prebuilt bundle $(basename "$DILATRON_GPU_BUNDLE")"
  build_details="cuBLAS/cuRAND from ${cuda_libs:-nowhere}; $(grep -c 'REG:' "$out/build.log") kernels, $(grep 'REG:' "$out/build.log" | grep -vc 'STACK:0 ') with a stack frame"
else
  step "configure and build" 200 "$out/build.log" bash -c "
    cmake -S '$root' -B '$build' -DCMAKE_BUILD_TYPE=Release -DDILATRON_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native \
          -DDILATRON_BUILD_TESTS=ON -DDILATRON_BUILD_BENCH=ON -DDILATRON_BUILD_TOOLS=ON &&
    cmake --build '$build' -j \$(nproc) --target dilatron_tests dilatron_cli"
  build_rc=$step_rc
  mkdir -p "$build/bin-links"
  ln -sf "$build/tests/dilatron_tests" "$build/dilatron" "$build/bin-links/"
  bin="$build/bin-links"
  build_name="build (CMAKE_CUDA_ARCHITECTURES=native)"
  build_details="ptxas: $(grep -c 'spill stores' "$out/build.log") kernels compiled, $(grep 'spill stores' "$out/build.log" | grep -vc ' 0 bytes spill stores') with spills"
fi
if [ $build_rc -eq 0 ]; then
  add_row "$build_name" "ok" "$step_seconds" "$build_details"
else
  add_row "$build_name" "FAILED (rc $build_rc)" "$step_seconds" "see build.log"
  { echo "## Build failed"; echo; echo '```'; tail -n 40 "$out/build.log"; echo '```'; echo; } >>"$report"
fi

if [ $build_rc -eq 0 ]; then
  tests="$bin/dilatron_tests"

  # ---- every CUDA test (the bf16 tensor-core accuracy suite in its own step below) ----
  step "CUDA tests" 90 "$out/tests.log" "$tests" --gtest_filter='Cuda*:-Cuda/CudaAttentionBf16.*' \
    --gtest_output="xml:$out/tests.xml"
  passed=$(grep -c '^\[       OK \]' "$out/tests.log")
  failed=$(grep -c '^\[  FAILED  \].*(' "$out/tests.log")
  skipped=$(grep -c '^\[  SKIPPED \].*(' "$out/tests.log")
  add_row "tests --gtest_filter='Cuda*:-Cuda/CudaAttentionBf16.*'" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" \
    "$step_seconds" "$passed passed, $failed failed, $skipped skipped"
  {
    echo "## CUDA tests"
    echo
    echo '```'
    grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|Failure|error:|Expected|Which is|^\[==========\]|^\[  PASSED  \]' "$out/tests.log" | tail -n 120
    echo '```'
    echo
  } >>"$report"

  # ---- bf16 attention on tensor cores against the float64 oracle and the naive bf16 code (every
  # case of the shared table; the host oracle and naive code take most of the time) ----
  step "bf16 tensor-core attention tests" 150 "$out/tests-bf16.log" "$tests" --gtest_filter='Cuda/CudaAttentionBf16.*' \
    --gtest_output="xml:$out/tests-bf16.xml"
  passed=$(grep -c '^\[       OK \]' "$out/tests-bf16.log")
  failed=$(grep -c '^\[  FAILED  \].*(' "$out/tests-bf16.log")
  add_row "tests --gtest_filter='Cuda/CudaAttentionBf16.*' (bf16 within 2x naive bf16)" \
    "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" "$step_seconds" "$passed passed, $failed failed"
  {
    echo "## bf16 tensor-core attention tests"
    echo
    echo '```'
    grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|Failure|error|naive bf16|Expected|Which is|^\[==========\]' "$out/tests-bf16.log" | tail -n 120
    echo '```'
    echo
  } >>"$report"

  # ---- compute-sanitizer memcheck on the attention kernels (every case of the shared table) ----
  # No leak check: the caching allocator keeps its blocks until the process exits, by design. The
  # oracle check runs the same kernels on a subset of the cases, so it is left out here.
  if command -v compute-sanitizer >/dev/null 2>&1; then
    step "memcheck" 200 "$out/memcheck.log" compute-sanitizer --tool memcheck --error-exitcode 3 "$tests" \
      --gtest_filter='CudaAttention*:Cuda/CudaAttention.MatchesCpuFloat64/*'
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$out/memcheck.log" | tail -n 1 | grep -Eo '[0-9]+' || echo '?')
    add_row "compute-sanitizer memcheck (attention tests)" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" \
      "$step_seconds" "$errors errors"
    { echo "## compute-sanitizer memcheck"; echo; echo '```'; grep -E 'ERROR SUMMARY|Invalid|Address|at 0x|\[  FAILED  \]' "$out/memcheck.log" | head -n 40; echo '```'; echo; } >>"$report"
    # The bf16 tensor-core kernels on four cases: D = 64 with bias gradient, key-dilated with
    # dropout, queries on no grid, and D = 128 (two column passes in the backward).
    bf16_cases="two_branches_causal_bias:key_dilated_causal_dropout_bias_d32:uncovered_queries:d128_causal_dropout_bias_1025"
    bf16_filter="$(tr ':' '\n' <<<"$bf16_cases" | sed 's|^|Cuda/CudaAttentionBf16.WithinTwiceTheNaiveBf16Error/|' | paste -sd:)"
    step "memcheck bf16" 90 "$out/memcheck-bf16.log" compute-sanitizer --tool memcheck --error-exitcode 3 "$tests" \
      --gtest_filter="$bf16_filter"
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$out/memcheck-bf16.log" | tail -n 1 | grep -Eo '[0-9]+' || echo '?')
    add_row "compute-sanitizer memcheck (bf16 tensor-core attention, 4 cases)" \
      "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" "$step_seconds" "$errors errors"
    { echo "## compute-sanitizer memcheck, bf16"; echo; echo '```'; grep -E 'ERROR SUMMARY|Invalid|Address|at 0x|\[  FAILED  \]' "$out/memcheck-bf16.log" | head -n 40; echo '```'; echo; } >>"$report"
    # racecheck: shared-memory hazards between the threads of a block (a missing __syncthreads).
    step "racecheck" 60 "$out/racecheck.log" env DILATRON_CUDA_TEST_QUICK=1 compute-sanitizer --tool racecheck \
      --error-exitcode 3 "$tests" --gtest_filter='Cuda/CudaAttention.MatchesCpuFloat64/two_branches_causal_bias:Cuda/CudaAttention.MatchesCpuFloat64/r_above_h_dropout_bias:Cuda/CudaAttentionBf16.WithinTwiceTheNaiveBf16Error/two_branches_causal_bias'
    hazards=$(grep -Eo 'RACECHECK SUMMARY: [0-9]+' "$out/racecheck.log" | tail -n 1 | grep -Eo '[0-9]+' || echo '?')
    add_row "compute-sanitizer racecheck (2 attention cases, 1 bf16)" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" \
      "$step_seconds" "$hazards hazards"
    { echo "## compute-sanitizer racecheck"; echo; echo '```'; grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|Race|hazard|\[  FAILED  \]' "$out/racecheck.log" | head -n 40; echo '```'; echo; } >>"$report"
  else
    add_row "compute-sanitizer" "not run" 0 "compute-sanitizer not on PATH"
  fi

  # ---- attention benchmark ----
  bench_s=${DILATRON_GPU_BENCH_SECONDS:-60}
  step "attention benchmark" $((bench_s + 8)) "$out/bench.md" "$bin/dilatron" bench attention --device cuda \
    --dtype float32,bfloat16 --n 4096,8192,16384,32768,65536,131072,262144,524288,1048576,2097152,4194304 \
    --budget "$bench_s" --long-seconds 1
  rows=$(grep '^| [0-9]' "$out/bench.md" | grep -vc skipped)
  # Columns: N, dtype, visited pairs, forward ms, forward GFLOP/s, of peak, fwd+bwd ms, fwd+bwd GFLOP/s, ...
  last=$(grep '^| [0-9]' "$out/bench.md" | grep -v skipped | tail -n 2 | awk -F'|' '{gsub(/ /, "", $2); gsub(/ /, "", $3); gsub(/ /, "", $6); gsub(/ /, "", $9); printf "%sN %s %s: forward %s, fwd+bwd %s GFLOP/s", (NR > 1 ? "; " : "largest "), $2, $3, $6, $9}')
  add_row "dilatron bench attention --device cuda" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" "$step_seconds" \
    "$rows sizes; ${last:-no rows}"
  { echo "## Attention benchmark"; echo; cat "$out/bench.md"; echo; } >>"$report"

  # ---- training: the same 50 steps of configs/tiny.toml on the CPU and on the GPU ----
  train_cmd() {  # DEVICE RUN_DIR
    "$bin/dilatron" train "$root/configs/tiny.toml" --set train.steps=50 --set train.checkpoint_every=0 \
      --set "train.device=\"$1\"" --out "$2"
  }
  rm -rf "$out/train-cpu" "$out/train-cuda"
  step "training, 50 steps on cpu and cuda" 60 "$out/train.log" bash -c \
    "$(declare -f train_cmd); bin='$bin'; root='$root'; train_cmd cpu '$out/train-cpu' && train_cmd cuda '$out/train-cuda'"
  train_rc=$step_rc
  compare=$(python3 - "$out/train-cpu/metrics.jsonl" "$out/train-cuda/metrics.jsonl" <<'PY' 2>&1
import json, sys
def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r]
cpu, gpu = losses(sys.argv[1]), losses(sys.argv[2])
worst = max(abs(a - b) for a, b in zip(cpu, gpu)) if cpu and len(cpu) == len(gpu) else float("inf")
print(f"{len(cpu)} cpu / {len(gpu)} cuda steps, loss {cpu[0]:.4f} -> {cpu[-1]:.4f}, max |cpu - cuda| = {worst:.2e}")
sys.exit(0 if worst <= 1e-4 else 1)
PY
  )
  compare_rc=$?
  compare=$(tail -n 1 <<<"$compare")  # the verdict line, or the error's last line
  [ $train_rc -eq 0 ] && train_rc=$compare_rc
  add_row "train configs/tiny.toml 50 steps, cpu vs cuda (losses within 1e-4)" \
    "$([ $train_rc -eq 0 ] && echo ok || echo "FAILED (rc $train_rc)")" "$step_seconds" "$compare"
  { echo "## Training, cpu vs cuda"; echo; echo '```'; echo "$compare"; tail -n 12 "$out/train.log"; echo '```'; echo; } >>"$report"

  # ---- the default run (configs/passkey.toml, then the local-only ablation) on the GPU: tokens/s and
  # passkey accuracy, which tells apart "the config cannot learn the task" from "the CPU is too slow".
  for cfg in ${DILATRON_GPU_TRAIN_CONFIGS:-passkey passkey-local}; do
    rm -rf "$out/train-$cfg"
    step "train configs/$cfg.toml on cuda" "${DILATRON_GPU_TRAIN_SECONDS:-100}" "$out/train-$cfg.log" \
      "$bin/dilatron" train "$root/configs/$cfg.toml" --set 'train.device="cuda"' --out "$out/train-$cfg"
    rc=$step_rc
    summary_line=$(python3 - "$out/train-$cfg/metrics.jsonl" <<'PY' 2>&1
import json, statistics, sys
rows = list(map(json.loads, open(sys.argv[1])))
steps = [r for r in rows if "tokens_per_s" in r]
evals = [r for r in rows if r.get("eval") == "passkey"]
acc = ", ".join(f"step {e['step']}: {e['by_length']}" for e in evals) or "no eval reached"
print(f"{len(steps)} steps, median {statistics.median(r['tokens_per_s'] for r in steps[5:] or steps):.0f} tokens/s, "
      f"loss {steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f}, passkey accuracy {acc}")
PY
    )
    summary_line=$(tail -n 1 <<<"$summary_line")
    add_row "train configs/$cfg.toml on cuda" "$([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)")" "$step_seconds" \
      "$summary_line"
    { echo "## configs/$cfg.toml on cuda"; echo; echo '```'; tail -n 30 "$out/train-$cfg.log"; echo '```'; echo; } >>"$report"
  done
fi

{
  echo "## Summary"
  echo
  echo "| step | result | time | details |"
  echo "| --- | --- | ---: | --- |"
  printf '%s\n' "${summary[@]}"
} >>"$report"
echo
sed -n '/^## Summary/,$p' "$report"
grep -q 'FAILED' <(printf '%s\n' "${summary[@]}") && exit 1
exit 0
