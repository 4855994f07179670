#!/usr/bin/env python3
"""The passkey study: which attention schedules retrieve a key across a 2048-token context?

Trains every schedule of STUDY with the same model, data, curriculum and budget (the default run's
config, configs/passkey.toml, with only its [attention] tables replaced), evaluates each with
`dilatron eval --json`, and writes a Markdown report and a plot: accuracy by needle distance,
accuracy by residue alignment ((answer - 1 - needle) mod the largest dilation: from the position that
outputs the first digit to the needle's first digit), and the attention cost
(visited query-key pairs per token and head) of each schedule.

  scripts/passkey_study.py [--out runs/passkey-study] [--report OUT/report.md]
                           [--jobs 1] [--only NAME,...] [--set section.key=value ...]

`--set` goes to every run (e.g. --set train.device=\"cuda\" on a GPU). Runs that already have an
evaluation (OUT/NAME/eval.json) are not run again, so an interrupted study resumes where it stopped.

When the config's first curriculum stages set their own attention schedules (configs/passkey.toml's
dense and key-dilated 512-token stages), those stages are the same in every run: they are trained
once (OUT/shared-stage-1, `dilatron train --stop-at-step`) and every run resumes from their checkpoint
with its own schedule (`--allow-config-change`, recorded in the run's config-changes.log). A run's
train time counts the shared stages too.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name, what it is, attention schedule of every layer, per-layer overrides {layer: schedule}.
STUDY = [
    ("dense", "dense attention, the quadratic baseline", "2048:1", {}),
    ("local", "local attention only (one 256-token segment)", "256:1", {}),
    ("longnet", "LongNet branches in every layer, the paper's geometric style", "256:1,1024:4,2048:8", {}),
    ("longnet-r2", "LongNet branches, low dilation", "256:1,2048:2", {}),
    ("mixed-global", "LongNet branches, the last layer dense", "256:1,1024:4,2048:8", {3: "2048:1"}),
    ("keydil-r8", "local + key-dilated r = 8 (1 head per residue)", "256:1,2048:8k", {}),
    ("keydil-r4", "local + key-dilated r = 4 (2 heads per residue)", "256:1,2048:4k", {}),
    ("keydil-r2", "local + key-dilated r = 2 (4 heads per residue)", "256:1,2048:2k", {}),
    ("keydil-r8-top2", "local in layers 0-1, local + key-dilated r = 8 in layers 2-3", "256:1",
     {2: "256:1,2048:8k", 3: "256:1,2048:8k"}),
]


def config_without_attention(text):
    """The config text without its [attention] and [attention.*] tables."""
    out, skipping = [], False
    for line in text.splitlines():
        header = re.match(r"\s*\[\[?\s*([A-Za-z0-9_.\"]+)\s*\]\]?", line)
        if header:
            skipping = header.group(1) == "attention" or header.group(1).startswith("attention.")
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def run_config(base, schedule, layers):
    text = config_without_attention(base) + f'\n[attention]\nschedule = "{schedule}"\n'
    if layers:
        text += "\n[attention.layers]\n" + "".join(f'{l} = "{s}"\n' for l, s in sorted(layers.items()))
    return text


def shared_stage_steps(base):
    """Steps of the leading curriculum stages that set their own schedule (no run's [attention] reaches them)."""
    steps = 0
    for stage in tomllib.loads(base).get("train", {}).get("stages", []):
        if "schedule" not in stage:
            break
        steps += stage["steps"]
    return steps


def train_shared_stage(args, base, steps):
    """Trains the shared first stage once; returns (its last checkpoint, its seconds)."""
    run_dir = os.path.join(args.out, "shared-stage-1")
    done = os.path.join(run_dir, "seconds")
    if not os.path.exists(done):
        os.makedirs(run_dir, exist_ok=True)
        config = os.path.join(run_dir, "study.toml")
        with open(config, "w") as f:
            f.write(base)
        t0 = time.time()
        with open(os.path.join(run_dir, "train.log"), "w") as f:
            subprocess.run([args.dilatron, "train", config, "--out", run_dir, "--resume", "auto",
                            "--stop-at-step", str(steps), *args.sets], stdout=f, stderr=subprocess.STDOUT, check=True)
        with open(done, "w") as f:
            f.write(f"{time.time() - t0:.1f}\n")
    with open(os.path.join(run_dir, "checkpoints", "latest")) as f:
        checkpoint = os.path.join(run_dir, "checkpoints", f.read().strip())
    with open(done) as f:
        return checkpoint, float(f.read())


def run_one(args, name, schedule, layers, base, shared):
    run_dir = os.path.join(args.out, name)
    result = os.path.join(run_dir, "eval.json")
    if os.path.exists(result):
        return name, "kept"
    os.makedirs(run_dir, exist_ok=True)
    config = os.path.join(run_dir, "study.toml")
    with open(config, "w") as f:
        f.write(run_config(base, schedule, layers))
    log = os.path.join(run_dir, "train.log")
    resume, seconds = ["--resume", "auto"], 0.0
    if shared and not os.path.exists(os.path.join(run_dir, "checkpoints", "latest")):
        checkpoint, seconds = shared
        # The shared stage's training rows; not its evaluations, which used the base config's schedule.
        with open(os.path.join(os.path.dirname(os.path.dirname(checkpoint)), "metrics.jsonl")) as src, \
                open(os.path.join(run_dir, "metrics.jsonl"), "w") as dst:
            dst.writelines(line for line in src if "tokens_per_s" in json.loads(line))
        resume = ["--resume", checkpoint, "--allow-config-change"]
    t0 = time.time()
    with open(log, "w") as f:
        subprocess.run([args.dilatron, "train", config, "--out", run_dir, *resume, *args.sets],
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    seconds += time.time() - t0
    with open(log, "a") as f:
        subprocess.run([args.dilatron, "eval", run_dir, "--json", result + ".tmp", *args.eval_args],
                       stdout=f, stderr=subprocess.STDOUT, check=True)
    with open(result + ".tmp") as f:
        report = json.load(f)
    report["train_seconds"] = seconds
    report["tokens_per_second"] = tokens_per_second(os.path.join(run_dir, "metrics.jsonl"))
    with open(result + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(result + ".tmp", result)
    return name, f"{seconds:.0f} s"


def tokens_per_second(metrics):
    """Median tokens/s over the run's training steps (metrics.jsonl)."""
    rates = []
    with open(metrics) as f:
        for line in f:
            row = json.loads(line)
            if "tokens_per_s" in row:
                rates.append(row["tokens_per_s"])
    rates.sort()
    return rates[len(rates) // 2] if rates else float("nan")


def pct(x):
    return f"{100 * x:.0f}%"


def write_report(args, entries):
    lines = ["# The passkey study", "",
             "Which attention schedules let a small byte-level LM retrieve a 5-digit key across a 2048-token",
             "context? Every row trains the same model (configs/passkey.toml: 4 layers, d_model 128, 8 heads,",
             "its curriculum, data and budget) with only the attention schedule changed, and evaluates with",
             "`dilatron eval` (greedy decoding of all digits, one needle, needles at least `eval.min_distance`",
             "tokens from the answer). Made by `scripts/passkey_study.py`"
             + (f" with `{' '.join('--set ' + s for s in args.set)}`" if args.set else "") + ".", ""]
    lines += ["| run | schedule | visited pairs / token / head, all layers | accuracy | digit acc | aligned | unaligned | tokens/s | train time |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, what, schedule, layers, rep in entries:
        length = rep["lengths"][-1]
        by_res = length.get("by_residue", [])
        mod = length.get("residue_modulus", 1)
        aligned = [r for r in by_res if r["residue"] == 0]
        unaligned = [r for r in by_res if r["residue"] != 0]
        def acc(rows):
            n = sum(r["samples"] for r in rows)
            return f"{pct(sum(r['accuracy'] * r['samples'] for r in rows) / n)} of {n}" if n else "-"
        sched = schedule + "".join(f"; layer {l}: {s}" for l, s in sorted(layers.items()))
        lines.append(f"| {name} | `{sched}` | {rep['visited_pairs_per_token']:.0f} | {pct(length['accuracy'])} | "
                     f"{pct(length['digit_accuracy'])} | {acc(aligned)} | {acc(unaligned) if mod > 1 else '-'} | "
                     f"{rep['tokens_per_second']:.0f} | {rep['train_seconds']:.0f} s |")
    lines += ["", "Aligned: (answer position - 1 - needle position) = 0 mod the largest dilation of the run's schedules:",
              "the position that outputs digit d (answer - 1 + d) and the needle's digit d share a residue, so a",
              "LongNet branch links them in one hop; unaligned: all others.", ""]
    lines += ["## Accuracy by needle distance", ""]
    buckets = sorted({(b["lo"], b["hi"]) for *_, rep in entries for b in rep["lengths"][-1]["by_distance"]})
    lines += ["| run | " + " | ".join(f"[{lo}, {hi})" for lo, hi in buckets) + " |",
              "|---|" + "---:|" * len(buckets)]
    for name, *_, rep in entries:
        got = {(b["lo"], b["hi"]): b for b in rep["lengths"][-1]["by_distance"]}
        lines.append(f"| {name} | " + " | ".join(
            f"{pct(got[b]['accuracy'])} ({got[b]['samples']})" if b in got else "-" for b in buckets) + " |")
    lines += ["", "## The runs", ""]
    for name, what, *_ in entries:
        lines.append(f"- **{name}**: {what}.")
    lines += ["", f"![accuracy by needle distance]({os.path.basename(args.plot)})", ""]
    with open(args.report + ".tmp", "w") as f:
        f.write("\n".join(lines))
    os.replace(args.report + ".tmp", args.report)
    write_plot(args, entries, buckets)


def write_plot(args, entries, buckets):
    if not shutil.which("gnuplot"):
        print("gnuplot not found: no plot", file=sys.stderr)
        return
    data = os.path.join(args.out, "by_distance.dat")
    with open(data, "w") as f:
        for name, *_, rep in entries:
            got = {(b["lo"], b["hi"]): b for b in rep["lengths"][-1]["by_distance"]}
            f.write(f'"{name}"\n')
            for i, b in enumerate(buckets):
                if b in got:
                    f.write(f"{i} {100 * got[b]['accuracy']}\n")
            f.write("\n\n")
    labels = ", ".join(f'"[{lo},{hi})" {i}' for i, (lo, hi) in enumerate(buckets))
    script = f"""set terminal pngcairo size 900,520 noenhanced
set output "{args.plot}"
set title "passkey accuracy at 2048 by needle distance"
set xlabel "needle distance (tokens)"
set ylabel "accuracy (%)"
set yrange [-5:105]
set xtics ({labels})
set key outside right
plot for [i=0:{len(entries) - 1}] "{data}" index i using 1:2 with linespoints title columnheader(1)
"""
    subprocess.run(["gnuplot"], input=script, text=True, check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "passkey-study"))
    p.add_argument("--report", default=None, help="default: OUT/report.md")
    p.add_argument("--plot", default=None, help="default: the report's name with .png")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "passkey.toml"))
    p.add_argument("--dilatron", default=os.path.join(os.environ.get("DILATRON_BUILD_DIR", os.path.join(ROOT, "build")), "dilatron"))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (a GPU takes several)")
    p.add_argument("--only", default="", help="comma-separated run names")
    p.add_argument("--set", action="append", default=[], help="section.key=value for every run")
    p.add_argument("--eval-args", default="", help="extra arguments for dilatron eval, e.g. '--samples 200'")
    args = p.parse_args()
    args.report = args.report or os.path.join(args.out, "report.md")
    args.plot = args.plot or os.path.splitext(args.report)[0] + ".png"
    args.eval_args = args.eval_args.split()
    args.sets = [x for s in args.set for x in ("--set", s)]
    only = set(filter(None, args.only.split(",")))
    unknown = only - {s[0] for s in STUDY}
    if unknown:
        p.error(f"--only names no study run: {', '.join(sorted(unknown))} (runs: {', '.join(s[0] for s in STUDY)})")
    study = [s for s in STUDY if not only or s[0] in only]
    with open(args.config) as f:
        base = f.read()
    os.makedirs(args.out, exist_ok=True)
    shared_steps = shared_stage_steps(base)
    pending = [s for s in study if not os.path.exists(os.path.join(args.out, s[0], "eval.json"))]
    shared = train_shared_stage(args, base, shared_steps) if shared_steps and pending else None
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, args, name, schedule, layers, base, shared): name
                   for name, _, schedule, layers in study}
        for fut in concurrent.futures.as_completed(futures):
            try:
                name, how = fut.result()
                print(f"{name}: {how}", flush=True)
            except subprocess.CalledProcessError as e:
                print(f"{futures[fut]}: failed ({e}); see {os.path.join(args.out, futures[fut], 'train.log')}",
                      file=sys.stderr, flush=True)
    entries = []
    for name, what, schedule, layers in study:
        result = os.path.join(args.out, name, "eval.json")
        if os.path.exists(result):
            with open(result) as f:
                entries.append((name, what, schedule, layers, json.load(f)))
    if not entries:
        sys.exit("no run finished")
    write_report(args, entries)
    print(f"wrote {args.report} and {args.plot} ({len(entries)} of {len(study)} runs)")
    if len(entries) < len(study):
        sys.exit(1)


if __name__ == "__main__":
    main()
