#!/usr/bin/env bash
# The float32 and bfloat16 (mixed-precision) runs of a config from the same seed, and how far apart
# their losses are: max and mean |loss_bf16 - loss_f32| over the steps, and both losses at every
# 50th step (docs/mixed-precision.md).
#   scripts/mixed-precision.sh DILATRON CONFIG OUT_DIR [STEPS]
# STEPS (default 200) of the config's first curriculum stage (or of its single shape), evaluation
# and periodic checkpoints off.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 DILATRON CONFIG OUT_DIR [STEPS]" >&2
  exit 2
fi
dilatron=$1 config=$2 out=$3 steps=${4:-200}
# The first stage's shape, cut to STEPS: a config without stages keeps its model's shape.
stage=$(python3 - "$config" "$steps" <<'PY'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
stages = c.get("train", {}).get("stages", [])
if not stages:
    print("[]")
else:
    s = dict(stages[0], steps=int(sys.argv[2]))
    print("[{" + ", ".join(f"{k}={v!r}".replace("'", '"') for k, v in s.items()) + "}]")
PY
)
for dtype in float32 bfloat16; do
  "$dilatron" train "$config" --out "$out/$dtype" --set "train.steps=$steps" --set "train.stages=$stage" \
    --set train.eval_every=0 --set train.checkpoint_every=0 --set "train.dtype=\"$dtype\""
done
python3 - "$out/float32/metrics.jsonl" "$out/bfloat16/metrics.jsonl" <<'PY'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r}
f, b = losses(sys.argv[1]), losses(sys.argv[2])
d = [abs(b[s] - f[s]) for s in sorted(f)]
print(f"steps {len(d)}: max |dloss| {max(d):.4f}, mean |dloss| {sum(d) / len(d):.4f}")
print("| step | float32 | bfloat16 | difference |")
print("| ---: | ---: | ---: | ---: |")
for s in sorted(f):
    if s % 50 == 0 or s == 1:
        print(f"| {s} | {f[s]:.4f} | {b[s]:.4f} | {b[s] - f[s]:+.4f} |")
PY
