#!/usr/bin/env bash
# The GPU check: builds dilatron for the GPU it finds, runs every CUDA test, compute-sanitizer
# memcheck (and racecheck, for shared-memory races) on the attention tests, and the attention
# benchmark, then writes a Markdown report to OUTDIR/gpu-check.md (a summary table last, also
# printed). Designed to finish within 8 minutes on an H100: the steps' time limits add up to less.
#
#   scripts/gpu-check.sh OUTDIR
#
# Needs nvcc, CMake and the Debian packages of scripts/install-deps.sh. A machine that cannot reach
# a package registry can take them as .deb files: DILATRON_DEB_DIR=dir installs dir/*.deb first.
# DILATRON_GPU_BUILD_DIR overrides the build directory (default: build-gpu in the repository).
# Files in OUTDIR: gpu-check.md, build.log, tests.log, tests.xml, memcheck.log, racecheck.log, bench.md.
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

# ---- dependencies and build ----
if [ -n "${DILATRON_DEB_DIR:-}" ]; then
  echo "== installing $DILATRON_DEB_DIR/*.deb"
  dpkg -i --force-depends "$DILATRON_DEB_DIR"/*.deb >"$out/build.log" 2>&1 || true
fi
step "configure and build" 200 "$out/build.log.tmp" bash -c "
  cmake -S '$root' -B '$build' -DCMAKE_BUILD_TYPE=Release -DDILATRON_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native \
        -DDILATRON_BUILD_TESTS=ON -DDILATRON_BUILD_BENCH=ON -DDILATRON_BUILD_TOOLS=OFF &&
  cmake --build '$build' -j \$(nproc) --target dilatron_tests bench_attention_cuda"
cat "$out/build.log.tmp" >>"$out/build.log" && rm -f "$out/build.log.tmp"
build_rc=$step_rc
if [ $build_rc -eq 0 ]; then
  add_row "build (CMAKE_CUDA_ARCHITECTURES=native)" "ok" "$step_seconds" "ptxas: $(grep -c 'spill stores' "$out/build.log") kernels reported, $(grep 'spill stores' "$out/build.log" | grep -vc ' 0 bytes spill stores') with spills"
else
  add_row "build (CMAKE_CUDA_ARCHITECTURES=native)" "FAILED (rc $build_rc)" "$step_seconds" "see build.log; missing packages can be carried as .deb files (DILATRON_DEB_DIR)"
  { echo "## Build failed"; echo; echo '```'; tail -n 40 "$out/build.log"; echo '```'; echo; } >>"$report"
fi

if [ $build_rc -eq 0 ]; then
  tests="$build/tests/dilatron_tests"

  # ---- every CUDA test ----
  step "CUDA tests" 90 "$out/tests.log" "$tests" --gtest_filter='Cuda*' --gtest_output="xml:$out/tests.xml"
  passed=$(grep -c '^\[       OK \]' "$out/tests.log")
  failed=$(grep -c '^\[  FAILED  \].*(' "$out/tests.log")
  skipped=$(grep -c '^\[  SKIPPED \]' "$out/tests.log")
  add_row "tests --gtest_filter='Cuda*'" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" "$step_seconds" \
    "$passed passed, $failed failed, $skipped skipped"
  {
    echo "## CUDA tests"
    echo
    echo '```'
    grep -E '^\[ +(OK|FAILED|SKIPPED) +\]|Failure|error:|Expected|Which is|^\[==========\]|^\[  PASSED  \]' "$out/tests.log" | tail -n 120
    echo '```'
    echo
  } >>"$report"

  # ---- compute-sanitizer memcheck on the attention kernels (the short case list) ----
  # No leak check: the caching allocator keeps its blocks until the process exits, by design.
  if command -v compute-sanitizer >/dev/null 2>&1; then
    step "memcheck" 70 "$out/memcheck.log" env DILATRON_CUDA_TEST_QUICK=1 compute-sanitizer --tool memcheck \
      --error-exitcode 3 "$tests" --gtest_filter='CudaAttention*:Cuda/CudaAttention.*'
    errors=$(grep -Eo 'ERROR SUMMARY: [0-9]+' "$out/memcheck.log" | tail -n 1 | grep -Eo '[0-9]+' || echo '?')
    add_row "compute-sanitizer memcheck (attention tests)" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" \
      "$step_seconds" "$errors errors"
    { echo "## compute-sanitizer memcheck"; echo; echo '```'; grep -E 'ERROR SUMMARY|Invalid|Address|at 0x|\[  FAILED  \]' "$out/memcheck.log" | head -n 40; echo '```'; echo; } >>"$report"
    # racecheck: shared-memory hazards between the threads of a block (a missing __syncthreads).
    step "racecheck" 45 "$out/racecheck.log" env DILATRON_CUDA_TEST_QUICK=1 compute-sanitizer --tool racecheck \
      --error-exitcode 3 "$tests" --gtest_filter='Cuda/CudaAttention.*/two_branches_causal_bias:Cuda/CudaAttention.*/r_above_h_dropout_bias'
    hazards=$(grep -Eo 'RACECHECK SUMMARY: [0-9]+' "$out/racecheck.log" | tail -n 1 | grep -Eo '[0-9]+' || echo '?')
    add_row "compute-sanitizer racecheck (2 attention cases)" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" \
      "$step_seconds" "$hazards hazards"
    { echo "## compute-sanitizer racecheck"; echo; echo '```'; grep -E 'RACECHECK SUMMARY|ERROR SUMMARY|Race|hazard|\[  FAILED  \]' "$out/racecheck.log" | head -n 40; echo '```'; echo; } >>"$report"
  else
    add_row "compute-sanitizer" "not run" 0 "compute-sanitizer not on PATH"
  fi

  # ---- attention benchmark ----
  step "attention benchmark" 68 "$out/bench.md" "$build/bench/bench_attention_cuda" --device cuda --budget-seconds 60
  rows=$(grep -c '^| [0-9]' "$out/bench.md")
  last=$(grep '^| [0-9]' "$out/bench.md" | tail -n 1 | awk -F'|' '{gsub(/ /, "", $2); gsub(/ /, "", $5); gsub(/ /, "", $7); print "largest N " $2 ": forward " $5 ", fwd+bwd " $7 " TFLOP/s"}')
  add_row "bench_attention_cuda --device cuda" "$([ $step_rc -eq 0 ] && echo ok || echo "FAILED (rc $step_rc)")" "$step_seconds" \
    "$rows sizes; ${last:-no rows}"
  { echo "## Attention benchmark"; echo; cat "$out/bench.md"; echo; } >>"$report"

  # TODO(training): add the training-run step here once training exists (a short `dilatron train`
  # on the GPU: loss curve, tokens/s, peak memory), with its own time limit and summary row.
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
