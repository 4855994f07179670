#!/usr/bin/env bash
# Packs a CUDA build made on this machine into one tarball that runs on a GPU machine without the
# Debian packages (a lent GPU machine is bare and offline): the test, benchmark and CLI binaries,
# libdilatron, and every shared library they need except glibc, the CUDA driver and the large CUDA
# libraries (cuBLAS, cuRAND), which come from the GPU machine's own toolkit. scripts/gpu-check.sh
# unpacks it when DILATRON_GPU_BUNDLE names it, and skips its own build.
#
#   scripts/gpu-bundle.sh [BUILD_DIR] [TARBALL]
#     BUILD_DIR defaults to build-gpu, configured by this script for sm_90 (H100/H200) when absent.
#     TARBALL defaults to build-gpu-bundle.tar.xz in the repository (ignored by git).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$root/build-gpu}"
tarball="${2:-$root/build-gpu-bundle.tar.xz}"

if [ ! -f "$build/CMakeCache.txt" ]; then
  # Portable CPU code (no -march=native): the GPU machine's processor may differ from this one.
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DDILATRON_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DDILATRON_NATIVE=OFF -DDILATRON_BUILD_TESTS=ON -DDILATRON_BUILD_BENCH=ON -DDILATRON_BUILD_TOOLS=ON
fi
cmake --build "$build" -j "$(nproc)" --target dilatron_tests dilatron_cli

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/bundle/bin" "$stage/bundle/lib"
bins=("$build/tests/dilatron_tests" "$build/dilatron")
cp "${bins[@]}" "$stage/bundle/bin/"
# Libraries resolved here, minus those the GPU machine must supply itself.
skip='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libresolv\.so|libutil\.so|libcuda\.so|libcublas|libcublasLt|libcurand)'
for bin in "${bins[@]}"; do ldd "$bin"; done | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' | sort -u |
  while read -r name path; do
    if ! [[ "$name" =~ $skip ]]; then cp -L "$path" "$stage/bundle/lib/$name"; fi
  done
strip --strip-unneeded "$stage"/bundle/bin/* "$stage"/bundle/lib/* 2>/dev/null || true
tar -C "$stage" -cJf "$tarball" bundle
echo "$tarball: $(du -h "$tarball" | cut -f1) ($(ls "$stage/bundle/lib" | wc -l) libraries)"
