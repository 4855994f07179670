#!/usr/bin/env bash
# Fault-injection campaigns against a built dilatron (issue 11): SIGKILLs during training then
# --resume auto, flipped bytes and truncations in checkpoints, training on a full disk (a small tmpfs;
# skipped without root). Prints a summary table (runs, crashes, hangs, silently accepted corruptions,
# lost or duplicated metrics lines, other failures) and exits 1 when any of them is not 0.
#
#   scripts/fault-check.sh [build/dilatron] [--kill-runs N] [--flips N] [--truncations N]
#                          [--disk-sizes 200k,700k] [--steps N] [--seed S] [--workdir DIR] [--help]
#
# The defaults take about 5-10 minutes on 2 cores; raise the counts to search longer. Builds nothing.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# One thread: runs are then deterministic, so a resumed run must match the reference bit for bit.
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
# Debian's python3-h5py installs for /usr/bin/python3 (without h5py, final parameters are not compared).
python=/usr/bin/python3
[[ -x $python ]] || python=python3
exec "$python" "$here/fault_check.py" "$@"
