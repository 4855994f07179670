#!/usr/bin/env bash
# A current PyTorch from PyPI in a virtual environment, for the benchmarks' PyTorch twin (Debian's
# python3-torch, which the tests use, is 1.13). Idempotent; prints the environment's python.
#
#   scripts/torch-venv.sh        -> .venv-torch/bin/python (about 3 GB: PyPI's torch brings its CUDA
#                                   libraries, unused on a CPU-only machine)
#
# DILATRON_TORCH_VENV picks another directory; DILATRON_TORCH_SPEC another version (default "torch>=2.2").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DILATRON_TORCH_VENV:-$root/.venv-torch}"
spec="${DILATRON_TORCH_SPEC:-torch>=2.2}"
if ! "$venv/bin/python" -c "import torch, numpy, h5py" 2>/dev/null; then
  echo "torch-venv: installing $spec, numpy, h5py from PyPI into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$spec" numpy h5py >&2
fi
echo "$venv/bin/python"
