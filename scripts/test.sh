#!/usr/bin/env bash
# The README's test command: install, build, run the whole suite with ctest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
build="${DILATRON_BUILD_DIR:-$root/build}"
# Parallel test processes share the cores: idle OpenMP threads sleep instead of spinning.
OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}" ctest --test-dir "$build" --output-on-failure -j "$(nproc)"
