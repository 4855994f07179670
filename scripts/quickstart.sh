#!/usr/bin/env bash
# The README's first command: install, build, train the default config (configs/passkey.toml), plot
# it and print its passkey accuracy table. Extra arguments go to `dilatron train` (e.g. --set train.steps=100).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
build="${DILATRON_BUILD_DIR:-$root/build}"
cd "$root"
"$build/dilatron" train configs/passkey.toml --out runs/passkey "$@"
"$build/dilatron" plot runs/passkey
"$build/dilatron" eval runs/passkey
