#!/usr/bin/env python3
"""Fault-injection campaigns against a built `dilatron` (issue 11); run through scripts/fault-check.sh.

kill:       train runs SIGKILLed at random times, then resumed with --resume auto: the resume must
            succeed and end exactly as an uninterrupted reference run (metrics lines of every step,
            and the final parameters bit for bit when h5py is available), each step logged once, and no
            temporaries left.
corruption: single flipped bytes and truncations at random offsets of a checkpoint; inspect, eval and a
            resume from each must refuse it (nonzero exit, a message naming the file) or, when the byte
            is unused, give exactly the original results. An exit 0 with other results is a silently
            accepted corruption.
disk-full:  training on small tmpfs mounts (skipped when mount fails: needs root or CAP_SYS_ADMIN): a
            clean error (exit 1 naming the cause) or success, no crash, no temporaries, no metrics line
            cut short, and the `latest` checkpoint still loads.

Every run is also checked for crashes (ended by a signal other than the intended kill) and hangs (past
the per-run timeout). A summary table ends the output; the exit status is 1 when any count that must be
0 is not.
"""
import argparse
import glob
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What AddressSanitizer, LeakSanitizer and UndefinedBehaviorSanitizer print when they find something.
SANITIZER = re.compile(r"ERROR: (Address|Leak)Sanitizer: [^\n]*|runtime error: [^\n]*")

# metrics.jsonl fields that depend on the machine's speed, left out when lines are compared.
TIMING = re.compile(r', "(tokens_per_s|elapsed_s)": [0-9.eE+-]+')


class Campaign:
    def __init__(self, name):
        self.name = name
        self.runs = self.crashes = self.hangs = self.silent = self.metric_lines = self.other = 0
        self.notes = []  # one line per problem found
        self.skipped = ""
        self.seconds = 0.0

    def problem(self, kind, text):
        setattr(self, kind, getattr(self, kind) + 1)
        self.notes.append(f"{self.name}: {kind}: {text}")
        print(f"  PROBLEM ({kind}): {text}", flush=True)


class Runner:
    def __init__(self, args):
        self.dilatron = os.path.abspath(args.dilatron)
        self.timeout = args.timeout
        self.env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")

    def run(self, campaign, argv, timeout=None):
        """Runs dilatron to completion; returns (returncode, stdout, stdout and stderr). Results are
        compared on stdout alone (a sanitizer's statistics go to stderr). Crashes and hangs are counted;
        their returncode is None (a hang) or negative."""
        campaign.runs += 1
        try:
            p = subprocess.run([self.dilatron] + argv, env=self.env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout or self.timeout)
        except subprocess.TimeoutExpired as e:
            campaign.problem("hangs", f"{' '.join(argv)}: still running after {e.timeout} s")
            return None, "", ""
        out = p.stdout.decode(errors="replace")
        both = out + p.stderr.decode(errors="replace")
        if p.returncode < 0:
            campaign.problem("crashes", f"{' '.join(argv)}: killed by signal {-p.returncode}\n{tail(both)}")
            return p.returncode, out, both
        # A sanitized build reports a memory error or undefined behaviour and exits nonzero: a crash too.
        report = SANITIZER.search(both)
        if report:
            campaign.problem("crashes", f"{' '.join(argv)}: {report.group(0).strip()}\n{tail(both)}")
            return -1, out, both
        return p.returncode, out, both

    def start(self, argv):
        return subprocess.Popen([self.dilatron] + argv, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)


def tail(text, lines=6):
    return "\n".join("    " + l for l in text.strip().splitlines()[-lines:])


def step_lines(run_dir):
    """The metrics.jsonl lines of training steps, timings left out, and each line's step."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        text = f.read()
    return [TIMING.sub("", l) for l in text.splitlines() if '"loss"' in l]


def line_step(line):
    return int(line.split(",", 1)[0].split(":")[1])


def temporaries(run_dir):
    return [p for p in glob.glob(os.path.join(run_dir, "**", "*.tmp*"), recursive=True)]


def parameters(ckpt):
    """Every dataset's bytes, or None without h5py."""
    try:
        import h5py
    except ImportError:
        return None
    out = {}
    with h5py.File(ckpt, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()].tobytes()) if isinstance(obj, h5py.Dataset) else None)
    return out


def latest(run_dir):
    path = os.path.join(run_dir, "checkpoints", "latest")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return os.path.join(run_dir, "checkpoints", f.read().strip())


# ---------------------------------------------------------------- kill

def kill_campaign(r, args, rng, work, train_args, ref):
    c = Campaign("kill")
    ref_lines, ref_seconds, ref_params = ref
    # What the kills left for the resumes to deal with.
    seen = {"kills": 0, "with temporaries": 0, "with steps past the checkpoint": 0, "before any checkpoint": 0}
    for i in range(args.kill_runs):
        run_dir = os.path.join(work, "kill", str(i))
        kills = rng.randint(1, args.max_kills)
        done = False
        for k in range(kills):
            # Anywhere from start-up to past the end of an uninterrupted run.
            delay = rng.uniform(0.0, 1.1 * ref_seconds)
            p = r.start(train_args + ["--out", run_dir, "--resume", "auto"])
            c.runs += 1
            try:
                code = p.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                code = p.wait()
                seen["kills"] += 1
                seen["with temporaries"] += bool(temporaries(run_dir))
                ckpt = latest(run_dir)
                if ckpt is None:
                    seen["before any checkpoint"] += 1
                steps = [line_step(l) for l in step_lines(run_dir)]
                at = int(re.search(r"ckpt-(\d+)", ckpt).group(1)) if ckpt else 0
                seen["with steps past the checkpoint"] += bool(steps and steps[-1] > at)
            if code == 0:
                done = True
                break
            if code < 0 and code != -signal.SIGKILL:
                c.problem("crashes", f"run {i}: ended by signal {-code}")
            elif code > 0:
                c.problem("other", f"run {i} (start {k + 1}): exit {code} before the kill")
        if not done:
            code, _, out = r.run(c, train_args + ["--out", run_dir, "--resume", "auto"])
            if code != 0:
                if code is not None and code > 0:
                    c.problem("other", f"run {i}: the final resume failed (exit {code})\n{tail(out)}")
                continue
        lines = step_lines(run_dir)
        steps = [line_step(l) for l in lines]
        expected = [line_step(l) for l in ref_lines]
        if steps != expected:
            missing = sorted(set(expected) - set(steps))
            dup = sorted({s for s in steps if steps.count(s) > 1})
            c.problem("metric_lines", f"run {i}: steps missing {missing}, duplicated {dup}")
        elif lines != ref_lines:
            first = next(j for j, (a, b) in enumerate(zip(lines, ref_lines)) if a != b)
            c.problem("other", f"run {i}: metrics differ from the reference at step {first + 1}:\n"
                               f"    {lines[first]}\n    {ref_lines[first]}")
        left = temporaries(run_dir)
        if left:
            c.problem("other", f"run {i}: temporaries left after the resume: {left}")
        if ref_params is not None:
            final = latest(run_dir)
            if final is None or parameters(final) != ref_params:
                c.problem("other", f"run {i}: the final checkpoint differs from the reference's")
        if args.verbose:
            print(f"  run {i}: {kills} start(s), {'finished before a kill' if done else 'resumed'}: "
                  f"{len(lines)} step lines", flush=True)
    print("  " + ", ".join(f"{v} {k}" for k, v in seen.items()).replace("kills,", "kills:", 1), flush=True)
    return c


# ---------------------------------------------------------------- corruption

def corruption_campaign(r, args, rng, work, train_args, ref_dir):
    c = Campaign("corruption")
    ckpts = sorted(glob.glob(os.path.join(ref_dir, "checkpoints", "ckpt-*.h5")))
    source = ckpts[-2]  # one before the last, so a resume has steps to run
    name = os.path.basename(source)
    with open(source, "rb") as f:
        clean = f.read()

    def results(ckpt, out_dir):
        """(command, exit code, comparable result, messages) of inspect, eval and a resume from ckpt."""
        got = []
        code, out, both = r.run(c, ["inspect", ckpt])
        got.append(("inspect", code, out.replace(ckpt, "CKPT"), both))
        code, out, both = r.run(c, ["eval", ckpt, "--samples", "4"])
        got.append(("eval", code, out, both))
        code, _, both = r.run(c, train_args + ["--resume", ckpt, "--out", out_dir])
        final = latest(out_dir) if code == 0 else None
        got.append(("resume", code, (step_lines(out_dir), parameters(final) if final else None), both))
        return got

    base = results(source, os.path.join(work, "corruption", "base"))
    for cmd, code, _, out in base:
        if code != 0:
            c.problem("other", f"{cmd} of the clean checkpoint failed (exit {code})\n{tail(out)}")
            return c
    kinds = ["flip"] * args.flips + ["truncate"] * args.truncations
    counts = {"refused": 0, "unaffected": 0}
    for j, kind in enumerate(kinds):
        case = os.path.join(work, "corruption", str(j))
        os.makedirs(case)
        ckpt = os.path.join(case, name)
        data = bytearray(clean)
        if kind == "flip":
            at = rng.randrange(len(data))
            data[at] ^= rng.randrange(1, 256)
            what = f"byte {at} flipped"
        else:
            at = rng.randrange(len(data))
            del data[at:]
            what = f"truncated to {at} bytes"
        with open(ckpt, "wb") as f:
            f.write(data)
        for (cmd, code, result, out), (_, _, want, _) in zip(results(ckpt, os.path.join(case, "resumed")), base):
            if code is None or code < 0:
                continue  # counted as a hang or a crash
            if code != 0:
                if ckpt in out:
                    counts["refused"] += 1
                else:
                    c.problem("other", f"{what}: {cmd} refused it without naming the file\n{tail(out)}")
            elif result == want:
                counts["unaffected"] += 1
            else:
                c.problem("silent", f"{what}: {cmd} exited 0 with results other than the original's")
        shutil.rmtree(case)
    print(f"  {len(kinds)} corrupted copies of {name}: {counts['refused']} refusals naming the file, "
          f"{counts['unaffected']} runs with the original results (unused bytes)", flush=True)
    return c


# ---------------------------------------------------------------- disk full

def disk_full_campaign(r, args, work, train_args_small):
    c = Campaign("disk-full")
    failures = 0
    for size in args.disk_sizes:
        mnt = os.path.join(work, "disk", size)
        os.makedirs(mnt)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
            c.skipped = "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN)"
            print(f"  skipped: {c.skipped}", flush=True)
            return c
        try:
            run_dir = os.path.join(mnt, "run")
            # A first run, then a resume on the same full disk: both must end cleanly.
            for attempt in ("train", "resume"):
                extra = ["--resume", "auto"] if attempt == "resume" else []
                code, _, out = r.run(c, train_args_small + ["--out", run_dir] + extra)
                if code is None or code < 0:
                    continue
                if code == 1:
                    failures += 1
                    if "dilatron: error: " not in out or "No space left on device" not in out:
                        c.problem("other", f"{size} {attempt}: exit 1 without naming the full disk\n{tail(out)}")
                elif code != 0:
                    c.problem("other", f"{size} {attempt}: exit {code}\n{tail(out)}")
                left = temporaries(run_dir)
                if left:
                    c.problem("other", f"{size} {attempt}: temporaries left: {left}")
                metrics = os.path.join(run_dir, "metrics.jsonl")
                if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
                    with open(metrics, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            c.problem("metric_lines", f"{size} {attempt}: metrics.jsonl cut short")
                steps = [line_step(l) for l in step_lines(run_dir)]
                if steps != sorted(set(steps)):
                    c.problem("metric_lines", f"{size} {attempt}: steps out of order or repeated: {steps}")
                if latest(run_dir) is not None:
                    code, _, out = r.run(c, ["inspect", run_dir])
                    if code is not None and code != 0:
                        c.problem("other", f"{size} {attempt}: the latest checkpoint does not load\n{tail(out)}")
        finally:
            subprocess.run(["umount", mnt])
    print(f"  {len(args.disk_sizes)} sizes: {failures} runs stopped by the full disk", flush=True)
    if failures == 0:
        c.problem("other", "no size was small enough to fill the disk")
    return c


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dilatron", nargs="?", default=os.path.join(REPO, "build", "dilatron"),
                    help="the dilatron binary (default: build/dilatron)")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each kill-campaign run")
    ap.add_argument("--kill-runs", type=int, default=250, help="runs killed and resumed")
    ap.add_argument("--max-kills", type=int, default=3, help="kills per run, at most (each run draws 1..this)")
    ap.add_argument("--flips", type=int, default=1200, help="checkpoint copies with one flipped byte")
    ap.add_argument("--truncations", type=int, default=200, help="checkpoint copies truncated")
    ap.add_argument("--disk-sizes", default="100k,200k,300k,400k,500k,700k,900k,1200k,1500k,2000k",
                    help="tmpfs sizes for the disk-full campaign (comma-separated; empty: skip it)")
    ap.add_argument("--campaigns", default="kill,corruption,disk-full", help="which campaigns to run")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds before a run counts as hung")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock, printed)")
    ap.add_argument("--verbose", action="store_true", help="a line per kill-campaign run")
    ap.add_argument("--workdir", default=None, help="where runs go (default: a temporary directory, removed)")
    args = ap.parse_args()
    args.disk_sizes = [s for s in args.disk_sizes.split(",") if s]
    campaigns = args.campaigns.split(",")
    if not os.access(args.dilatron, os.X_OK):
        sys.exit(f"fault-check: '{args.dilatron}' is not an executable (build dilatron first, or give its path)")
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    rng = random.Random(seed)
    work = args.workdir or tempfile.mkdtemp(prefix="dilatron-fault-")
    os.makedirs(work, exist_ok=True)
    print(f"fault-check: {args.dilatron}, seed {seed}, work in {work}", flush=True)
    r = Runner(args)
    t0 = time.time()

    config = os.path.join(REPO, "configs", "tiny.toml")
    # Frequent checkpoints, so kills land before, during and after writes.
    train_args = ["train", config, "--set", f"train.steps={args.steps}", "--set", "train.checkpoint_every=2",
                  "--set", "train.keep_checkpoints=3"]
    setup = Campaign("reference")
    ref_dir = os.path.join(work, "reference")
    start = time.time()
    code, _, out = r.run(setup, train_args + ["--out", ref_dir])
    if code != 0:
        sys.exit(f"fault-check: the reference run failed (exit {code}):\n{out}")
    ref = (step_lines(ref_dir), time.time() - start, parameters(latest(ref_dir)))
    print(f"reference run: {args.steps} steps in {ref[1]:.1f} s"
          + ("" if ref[2] is not None else " (no h5py: final parameters not compared)"), flush=True)

    results = []

    def timed(campaign, *a):
        start = time.time()
        c = campaign(*a)
        c.seconds = time.time() - start
        results.append(c)

    if "kill" in campaigns:
        print(f"kill campaign: {args.kill_runs} runs, 1-{args.max_kills} SIGKILLs each", flush=True)
        timed(kill_campaign, r, args, rng, work, train_args, ref)
    if "corruption" in campaigns:
        print(f"corruption campaign: {args.flips} flipped bytes, {args.truncations} truncations", flush=True)
        timed(corruption_campaign, r, args, rng, work, train_args, ref_dir)
    if "disk-full" in campaigns and args.disk_sizes:
        print(f"disk-full campaign: tmpfs of {', '.join(args.disk_sizes)}", flush=True)
        timed(disk_full_campaign, r, args, work,
              ["train", config, "--set", "train.steps=8", "--set", "train.checkpoint_every=2",
               "--set", "train.keep_checkpoints=3"])

    print(f"\n{'campaign':<12} {'runs':>5} {'crashes':>8} {'hangs':>6} {'silent corruptions':>19} "
          f"{'lost/dup metric lines':>22} {'other failures':>15} {'time':>7}")
    for c in results:
        row = (f"{c.name:<12} {c.runs:>5} {c.crashes:>8} {c.hangs:>6} {c.silent:>19} {c.metric_lines:>22} "
               f"{c.other:>15} {c.seconds:>6.0f}s")
        print(row + (f"  (skipped: {c.skipped})" if c.skipped else ""))
    print(f"time: {time.time() - t0:.0f} s")
    notes = [n for c in results for n in c.notes]
    if notes:
        print("\nproblems:\n" + "\n".join(notes))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if notes else 0)


if __name__ == "__main__":
    main()
