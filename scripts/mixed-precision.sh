#!/usr/bin/env bash
# The bfloat16 (mixed-precision) run of a config against its float32 run from the same seed, and the
# float32 run's own sensitivity: a third, float32 run whose train.lr is scaled by 1 + 2^-9 (one bf16
# rounding). Prints max and mean |loss - float32 loss| over the steps for both, and the losses at
# step 1 and every 50th step (docs/mixed-precision.md).
#   scripts/mixed-precision.sh DILATRON CONFIG OUT_DIR [STEPS]
# STEPS (default 200) of the config's first curriculum stage (or of its single shape), evaluation
# and periodic checkpoints off. The runs go to OUT_DIR/{float32,bfloat16,float32-lr}.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 DILATRON CONFIG OUT_DIR [STEPS]" >&2
  exit 2
fi
dilatron=$1 config=$2 out=$3 steps=${4:-200}
# The first stage cut to STEPS, and lr * (1 + 2^-9), from the config.
read -r stage lr < <(python3 - "$config" "$steps" <<'PY'
import sys, tomllib
c = tomllib.load(open(sys.argv[1], "rb"))
t = c.get("train", {})
stages = t.get("stages", [])
if stages:
    s = dict(stages[0], steps=int(sys.argv[2]))
    stage = "[{" + ",".join(f"{k}={v!r}".replace("'", '"') for k, v in s.items()) + "}]"
else:
    stage = "[]"
if "lr" not in t:
    sys.exit(f"{sys.argv[1]}: set train.lr (the third run scales it)")
print(stage.replace(" ", ""), repr(t["lr"] * (1 + 2**-9)))
PY
)
[[ -n ${stage:-} ]] || exit 1
run() {  # run NAME DTYPE [more --set arguments]
  local name=$1 dtype=$2
  shift 2
  "$dilatron" train "$config" --out "$out/$name" --set "train.steps=$steps" --set "train.stages=$stage" \
    --set train.eval_every=0 --set train.checkpoint_every=0 --set "train.dtype=\"$dtype\"" "$@"
}
run float32 float32
run bfloat16 bfloat16
run float32-lr float32 --set "train.lr=$lr"
python3 - "$out" <<'PY'
import json, sys
def losses(name):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{sys.argv[1]}/{name}/metrics.jsonl")) if "loss" in r}
f, b, p = losses("float32"), losses("bfloat16"), losses("float32-lr")
stats = {}
for name, o in (("bfloat16", b), ("float32, lr * (1 + 2^-9)", p)):
    d = [abs(o[s] - f[s]) for s in sorted(f)]
    stats[name] = (max(d), sum(d) / len(d))
    print(f"{name} - float32 over {len(d)} steps: max |dloss| {stats[name][0]:.4f}, mean |dloss| {stats[name][1]:.4f}")
# The tolerance (docs/mixed-precision.md): twice the perturbed float32 run's max and mean.
within = all(x <= 2 * y for x, y in zip(stats["bfloat16"], stats["float32, lr * (1 + 2^-9)"]))
print("bfloat16 within twice the perturbed float32 run's max and mean:", "yes" if within else "NO")
print("| step | float32 | bfloat16 | bf16 - f32 | float32, lr * (1 + 2^-9) | its - f32 |")
print("| ---: | ---: | ---: | ---: | ---: | ---: |")
for s in sorted(f):
    if s % 50 == 0 or s == 1:
        print(f"| {s} | {f[s]:.4f} | {b[s]:.4f} | {b[s] - f[s]:+.4f} | {p[s]:.4f} | {p[s] - f[s]:+.4f} |")
PY
