#!/usr/bin/env bash
# The benchmark report: FMA peak, attention against the PyTorch twins, scaling in N, training
# throughput against the twins. The twins run on a current PyTorch from PyPI (scripts/torch-venv.sh,
# installed on first use): the einsum twin (bench/torch/dilated_attention.py, scores materialised per
# segment) and the SDPA twin (bench/torch/sdpa_attention.py, PyTorch's fused flash kernel per gathered
# branch, checked against the einsum twin by bench/torch/check_sdpa.py before it is timed).
# Writes OUTDIR/report.md (Markdown tables), OUTDIR/scaling.png (time per token and peak memory
# against N) and OUTDIR/results.jsonl (every measurement, and the machine and run they come from,
# one JSON object a line: what report.md is made from).
#
#   scripts/bench-report.sh OUTDIR
#
# Environment:
#   DILATRON_BUILD_DIR   the build to use (default build/; built by scripts/build.sh only when it has
#                        no dilatron command yet)
#   BENCH_QUICK=1        small sizes (attention 2K, 8K; scaling 16K..64K; 4 training steps): about
#                        1.5 minutes on 2 cores. The default is the full report (attention 16K, 64K,
#                        256K; scaling 64K..1M; 20 training steps): about 10 minutes on 2 quiet cores
#                        (17 on a busy machine), most of it the twin.
#   BENCH_REPORT_ONLY=1  run nothing: remake report.md and scaling.png from OUTDIR/results.jsonl
#   BENCH_ATTENTION_N, BENCH_SCALING_N, BENCH_TRAIN_STEPS   override the sizes (comma lists) / steps
#   BENCH_TWIN_BUDGET    seconds one twin attention size may take (default 600): a size whose
#                        estimate (from the previous size) is over it is not run, one that runs
#                        over it is stopped; either is said so in the table
#   BENCH_TWIN_MEM_GB    address-space limit of a twin run in GiB (default: 3/4 of the available
#                        memory), so that a size that does not fit fails alone instead of
#                        pushing the machine into swap or the OOM killer
#   BENCH_SCALING_BUDGET seconds for the whole scaling sweep (default 0: no limit)
#   BENCH_TWIN_PYTHON    the python (with torch) that runs the twins, instead of scripts/torch-venv.sh's;
#                        e.g. /usr/bin/python3 for Debian's torch 1.13 (which has no SDPA twin)
#   OMP_NUM_THREADS      threads for dilatron and the twins alike (default: all cores)
#
# The figures are only as good as the machine is quiet: the report records the load average at the
# start and the end of the run.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -eq 1 ] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
mkdir -p "$1"
out="$(cd "$1" && pwd)"
py=/usr/bin/python3  # the report's own scripting (json only)
command -v gnuplot >/dev/null || { echo "bench-report: needs gnuplot (scripts/install-deps.sh)" >&2; exit 1; }
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
json="$out/results.jsonl"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log="$work/log.txt"
note() { echo "[$(date +%T)] $*" | tee -a "$log" >&2; }
# One JSON object from KEY=TEXT and KEY:=NUMBER arguments, appended to results.jsonl.
record() { "$py" -c 'import json, sys
r = {}
for a in sys.argv[1:]:
    k, v = a.split("=", 1)
    if k.endswith(":"): r[k[:-1]] = json.loads(v)
    else: r[k] = v
print(json.dumps(r))' "$@" >> "$json"; }

schedule="1024:1,4096:4,16384:16"
config="configs/passkey.toml"

if [ "${BENCH_REPORT_ONLY:-0}" != 1 ]; then
build="${DILATRON_BUILD_DIR:-$root/build}"
dilatron="$build/dilatron"
[ -x "$dilatron" ] || DILATRON_BUILD_DIR="$build" "$root/scripts/build.sh"
quick="${BENCH_QUICK:-0}"
if [ "$quick" = 1 ]; then
  att_n="${BENCH_ATTENTION_N:-2048,8192}"
  scale_n="${BENCH_SCALING_N:-16384,32768,65536}"
  train_steps="${BENCH_TRAIN_STEPS:-4}"
else
  att_n="${BENCH_ATTENTION_N:-16384,65536,262144}"
  scale_n="${BENCH_SCALING_N:-65536,131072,262144,524288,1048576}"
  train_steps="${BENCH_TRAIN_STEPS:-20}"
fi
twin_budget="${BENCH_TWIN_BUDGET:-600}"
avail_kb=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
twin_mem_gb="${BENCH_TWIN_MEM_GB:-$((avail_kb * 3 / 4 / 1024 / 1024))}"
scaling_budget="${BENCH_SCALING_BUDGET:-0}"

: > "$json"
twin_py="${BENCH_TWIN_PYTHON:-}"
[ -n "$twin_py" ] || twin_py=$("$root/scripts/torch-venv.sh") || twin_py=/usr/bin/python3
twin_impls=""
if "$twin_py" -c "import torch" 2>/dev/null; then
  twin_impls="einsum"
  if "$twin_py" "$root/bench/torch/check_sdpa.py" >> "$log" 2>&1; then twin_impls="einsum sdpa"
  else note "the SDPA twin is left out: bench/torch/check_sdpa.py failed (PyTorch < 2.2?): $(tail -1 "$log")"; fi
else
  note "no torch for $twin_py: the twins are left out"
fi
commit=$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git -C "$root" --no-optional-locks status --porcelain --untracked-files=no 2>/dev/null)" ] &&
  commit="$commit (+ uncommitted changes)"
record bench=machine cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)" \
  threads:="$OMP_NUM_THREADS" nproc:="$(nproc)" memory_gib:="$(awk '/^MemTotal:/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)" \
  date="$(date -u '+%Y-%m-%d %H:%M UTC')" commit="$commit" \
  torch="$("$twin_py" -c "import torch; print(torch.__version__)" 2>/dev/null || echo "not installed")" \
  mode="$([ "$quick" = 1 ] && echo "quick (BENCH_QUICK=1)" || echo full)" \
  load_start="$(cut -d' ' -f1-3 /proc/loadavg)" schedule="$schedule" config="$config"
started=$(date +%s)
cd "$root"

# The peak is measured three times (start, middle, end) and the best counts: on a shared machine
# another process can only lower a measurement.
note "peak"
"$dilatron" bench peak --seconds 2 --json "$json" | tee -a "$log"
peak=$("$py" -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1])][-1]["gflops"])' "$json")

# Attention: dilatron, then the twin on the same shape (B = 1, H = 8, D = 64, causal, the schedule),
# one size at a time. The twin's inputs are torch.randn of the same shape (its own generator): the
# same distribution, not the same bits, which a timing does not depend on.
declare -A twin_last_s twin_last_n twin_failed
for n in ${att_n//,/ }; do
  note "attention N = $n"
  "$dilatron" bench attention --n "$n" --heads 8 --dim 64 --schedule "$schedule" --causal --peak "$peak" \
    --json "$json" | tee -a "$log"
  for impl in $twin_impls; do
    skip=""
    last_s=${twin_last_s[$impl]:-0} last_n=${twin_last_n[$impl]:-0}
    if [ -n "${twin_failed[$impl]:-}" ]; then
      skip="not run: a smaller N was ${twin_failed[$impl]}"
    elif [ "$last_n" -gt 0 ] && [ $((last_s * n / last_n)) -gt "$twin_budget" ]; then
      # A twin's cost grows linearly in N (attention per segment): estimated from the previous size.
      skip="not run: estimated $((last_s * n / last_n)) s, over the $twin_budget s budget"
    fi
    if [ -n "$skip" ]; then
      note "$impl twin attention N = $n: $skip"
      record bench=twin_attention impl="$impl" n:="$n" skipped="$skip"
      continue
    fi
    note "$impl twin attention N = $n"
    t0=$(date +%s)
    set +e
    timeout "$twin_budget" prlimit --as=$((twin_mem_gb * 1024 * 1024 * 1024)) \
      "$twin_py" bench/torch/bench_twin.py --impl "$impl" --threads "$OMP_NUM_THREADS" attention --n "$n" \
      --heads 8 --dim 64 --schedule "$schedule" --causal --reps 1 > "$work/twin.out" 2> "$work/twin.err"
    rc=$?
    set -e
    twin_last_s[$impl]=$(($(date +%s) - t0))
    twin_last_n[$impl]=$n
    cat "$work/twin.err" >> "$log"
    tee -a "$log" < "$work/twin.out" >> "$json"
    if [ $rc -ne 0 ]; then
      if [ $rc -eq 124 ]; then failed="stopped after the $twin_budget s budget"
      elif grep -qiE "out of memory|can't allocate|cannot allocate|MemoryError|bad_alloc" "$work/twin.err"; then
        failed="out of memory (limit $twin_mem_gb GiB)"
      else failed="failed (exit $rc): $(tail -1 "$work/twin.err" | tr -d '"\\')"; fi
      twin_failed[$impl]=$failed
      note "$impl twin attention N = $n: $failed"
      record bench=twin_attention impl="$impl" n:="$n" skipped="$failed"
    fi
  done
done

note "peak"
"$dilatron" bench peak --seconds 2 --json "$json" | tee -a "$log"

note "scaling N = $scale_n"
"$dilatron" bench scaling --n "$scale_n" --heads 4 --dim 64 --schedule "$schedule" --causal \
  --budget "$scaling_budget" --json "$json" | tee -a "$log"

note "train $config, $train_steps steps"
"$dilatron" bench train "$config" --steps "$train_steps" --warmup 2 --json "$json" 2>> "$log" | tee -a "$log"
for impl in $twin_impls; do
  note "$impl twin train $config, $train_steps steps"
  "$twin_py" bench/torch/bench_twin.py --impl "$impl" --threads "$OMP_NUM_THREADS" train --config "$config" \
    --steps "$train_steps" 2>> "$log" | tee -a "$log" >> "$json"
done
note "peak"
"$dilatron" bench peak --seconds 2 --json "$json" | tee -a "$log"
record bench=run elapsed_s:=$(($(date +%s) - started)) load_end="$(cut -d' ' -f1-3 /proc/loadavg)"
fi

# ---- report.md and scaling.png, from results.jsonl alone
[ -s "$json" ] || { echo "bench-report: no $json" >&2; exit 1; }
"$py" - "$json" "$out" "$work/scaling.dat" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
out = sys.argv[2]
def of(bench): return [r for r in rows if r["bench"] == bench]
M = (of("machine") or [{}])[-1]
run = (of("run") or [{}])[-1]
peaks = of("peak")
peak = max(peaks, key=lambda r: r["gflops"])
for r in of("attention"):  # as a fraction of the best peak measurement, not the one passed at the time
    if "skipped" not in r:
        r["forward_fraction_of_peak"] = r["forward_gflops"] / peak["gflops"]
        r["forward_backward_fraction_of_peak"] = r["forward_backward_gflops"] / peak["gflops"]
P = []
P.append("# dilatron benchmark report\n")
P.append("Made by `scripts/bench-report.sh` (the raw measurements: results.jsonl).\n")
P.append("| machine | |\n| --- | --- |")
P.append(f"| CPU | {M.get('cpu', '?')} |")
P.append(f"| cores (nproc) / threads used | {M.get('nproc', 0):.0f} / {M.get('threads', 0):.0f} |")
P.append(f"| memory | {M.get('memory_gib', '?')} GiB |")
P.append(f"| ISA of the peak loop | {peak['isa']} |")
P.append(f"| date | {M.get('date', '?')} |")
P.append(f"| commit | {M.get('commit', '?')} |")
P.append(f"| PyTorch (the twins) | {M.get('torch', '?')} |")
P.append(f"| load average (1, 5, 15 min) | {M.get('load_start', '?')} at the start, "
         f"{run.get('load_end', '?')} at the end |")
P.append(f"| mode | {M.get('mode', '?')}, {run.get('elapsed_s', 0):.0f} s of benchmarks |")
P.append("")
P.append("## FP32 peak\n")
measured = ", ".join(f"{r['gflops']:.1f}" for r in peaks)
P.append(f"`dilatron bench peak`: {peak['threads']} threads of a register-only loop of independent vector FMA "
         f"chains: **{peak['gflops']:.1f} GFLOP/s** ({peak['gflops_per_thread']:.1f} per thread), the best of "
         f"{len(peaks)} measurements ({measured}) spread over the run. "
         "Every fraction of peak below divides by it.\n")

P.append("## Attention\n")
P.append(f"B = 1, H = 8, D = 64, float32, causal, schedule `{M.get('schedule', '?')}`. GFLOP/s are effective: 4·D flops per "
         "visited (query, key) pair forward, 3.5x that forward+backward (attention_flops).\n")
P.append("| N | fwd ms | fwd GFLOP/s | fwd of peak | fwd+bwd ms | fwd+bwd GFLOP/s | fwd+bwd of peak |")
P.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
mine = {}
for r in of("attention"):
    if "skipped" in r:
        P.append(f"| {r['n']} | skipped: {r['skipped']} | | | | | |"); continue
    mine[r["n"]] = r
    P.append(f"| {r['n']} | {1e3 * r['forward_s']:.1f} | {r['forward_gflops']:.2f} | "
             f"{100 * r['forward_fraction_of_peak']:.1f}% | {1e3 * r['forward_backward_s']:.1f} | "
             f"{r['forward_backward_gflops']:.2f} | {100 * r['forward_backward_fraction_of_peak']:.1f}% |")
P.append("\ndilatron's times are medians of 3 runs after a warm-up run, or the first run alone when it takes "
         "over 5 s.\n")
IMPLS = {"einsum": "einsum twin (scores per segment)", "sdpa": "SDPA twin (fused flash kernel)"}
twin = {}
for r in of("twin_attention"):
    twin.setdefault((r.get("impl", "einsum"), r["n"]), {})[r.get("pass", "skipped")] = r
if twin:
    P.append(f"Against the PyTorch twins (PyTorch {M.get('torch', '?')}, same shape and threads, same run): the "
             "einsum twin is bench/torch/dilated_attention.py (dense softmax attention per segment, scores "
             "materialised, autograd); the SDPA twin is bench/torch/sdpa_attention.py (each branch's grid rows "
             "gathered per head offset, PyTorch's fused CPU flash kernel with its log-sum-exp, merge, scatter; "
             "autograd, the lse gradient included). *twin / dilatron* > 1 means dilatron is faster. One run "
             "after a warm-up run (its own); a size that would not fit the time budget (BENCH_TWIN_BUDGET) or "
             "the memory limit (BENCH_TWIN_MEM_GB) says so instead.\n")
    P.append("| N | twin | fwd ms | fwd+bwd ms | twin / dilatron fwd | twin / dilatron fwd+bwd |")
    P.append("| ---: | --- | ---: | ---: | ---: | ---: |")
    for (impl, n), t in sorted(twin.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        tf, tb, r = t.get("forward"), t.get("forward_backward"), mine.get(n)
        if not (tf or tb):
            P.append(f"| {n} | {IMPLS.get(impl, impl)} | {t['skipped']['skipped']} | | | |"); continue
        ms = lambda x: f"{1e3 * x['median_s']:.1f}" if x else "-"
        ratio = lambda x, key: f"**{x['median_s'] / r[key]:.2f}**" if x and r else "-"
        P.append(f"| {n} | {IMPLS.get(impl, impl)} | {ms(tf)} | {ms(tb)} | {ratio(tf, 'forward_s')} | "
                 f"{ratio(tb, 'forward_backward_s')} |")
    P.append("")

P.append("## Scaling in N\n")
P.append("B = 1, H = 4, D = 64, causal, the same schedule, forward+backward; each N in a fresh process. Peak RSS is "
         "the process's high-water mark (inputs q, k, v, do included); attention memory is what the library "
         "allocated for the forward+backward beyond its inputs (o, lse, dq, dk, dv, scratch).\n")
P.append("| N | fwd+bwd s | µs per token | GFLOP/s | of peak | peak RSS MiB | RSS bytes per token | attention MiB |")
P.append("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
pts = []
for r in of("scaling"):
    if "skipped" in r:
        P.append(f"| {r['n']} | skipped: {r['skipped']} | | | | | | |"); continue
    pts.append(r)
    P.append(f"| {r['n']} | {r['forward_backward_s']:.2f} | {r['us_per_token']:.2f} | {r['forward_backward_gflops']:.2f} "
             f"| {100 * r['forward_backward_gflops'] / peak['gflops']:.1f}% | {r['peak_rss_bytes'] / 2**20:.0f} "
             f"| {r['peak_rss_bytes'] / r['n']:.0f} | {r['attention_peak_bytes'] / 2**20:.0f} |")
P.append("\n![time per token and peak memory against N](scaling.png)\n")

P.append("## Training\n")
P.append(f"`{M.get('config', '?')}`, the same batch (batch_size x seq_len) and threads for both; tokens/s is the median over the "
         "steps after 2 warm-up steps. dilatron runs its trainer's loop (passkey batches, AdamW, clipping); the twins "
         "run the same model in PyTorch with torch.optim.AdamW on random-token batches (which have nothing "
         "to learn: the losses say the runs are sane, they do not compare).\n")
P.append("| | parameters | batch x seq_len | steps | median step s | tokens/s | loss first -> last |")
P.append("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
tr = (of("train") or [None])[-1]
twins = {r.get("impl", "einsum"): r for r in of("twin_train")}
for name, r in [("dilatron", tr)] + [(f"PyTorch {IMPLS.get(i, i)}", twins[i]) for i in sorted(twins)]:
    if r:
        P.append(f"| {name} | {r['parameters']} | {r['batch']} x {r['seq_len']} | {r['steps']} | {r['median_step_s']:.3f} "
                 f"| {r['tokens_per_s']:.0f} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} |")
for impl, tt in sorted(twins.items()):
    if tr:
        P.append(f"\ndilatron / {IMPLS.get(impl, impl)} tokens/s: **{tr['tokens_per_s'] / tt['tokens_per_s']:.2f}**"
                 + ("" if tr["parameters"] == tt["parameters"] else
                    f" (parameter counts differ: {tr['parameters']} vs {tt['parameters']})"))
open(f"{out}/report.md", "w").write("\n".join(P) + "\n")
with open(sys.argv[3], "w") as f:
    f.write("# N us_per_token peak_rss_MiB attention_MiB\n")
    for r in pts:
        f.write(f"{r['n']} {r['us_per_token']} {r['peak_rss_bytes'] / 2**20} {r['attention_peak_bytes'] / 2**20}\n")
EOF

# The plot's title: the machine and threads of the run (not of this shell, under BENCH_REPORT_ONLY).
title=$("$py" -c 'import json, sys
m = ([r for r in map(json.loads, open(sys.argv[1])) if r["bench"] == "machine"] or [{}])[-1]
print(m.get("threads", "?"), "threads (" + m.get("cpu", "?") + ")")' "$json")
if [ -s "$work/scaling.dat" ] && [ "$(grep -vc '^#' "$work/scaling.dat")" -gt 0 ]; then
  gnuplot <<EOF
set terminal pngcairo size 1200,480 noenhanced font ",11"
set output "$out/scaling.png"
set multiplot layout 1,2 title "dilated attention forward+backward, B=1 H=4 D=64 causal $schedule, $title"
set logscale x 2
set xlabel "N (K tokens, K = 1024)"
set grid
set key bottom right
set title "time per token"
set ylabel "microseconds per token"
set yrange [0:*]
plot "$work/scaling.dat" using (\$1/1024):2 with linespoints lw 2 pt 7 title "fwd+bwd"
set title "peak memory"
set ylabel "MiB"
set logscale y 2
set yrange [*:*]
set key top left
plot "$work/scaling.dat" using (\$1/1024):3 with linespoints lw 2 pt 7 title "peak RSS (process)", \
     "" using (\$1/1024):4 with linespoints lw 2 pt 5 title "attention fwd+bwd (library)"
unset multiplot
EOF
fi
note "wrote $out/report.md and $out/scaling.png"
