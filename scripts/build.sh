#!/usr/bin/env bash
# Installs missing packages, then configures and builds dilatron into build/ (CUDA sources too when nvcc exists).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install-deps.sh"
build="${DILATRON_BUILD_DIR:-$root/build}"
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release ${DILATRON_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)"
