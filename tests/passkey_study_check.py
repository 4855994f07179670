#!/usr/bin/env python3
"""Checks that scripts/passkey_study.py's shared first stages change nothing: a study run that resumes
from the shared stage's checkpoint has the same training losses, gradient norms and final evaluation
as the same config trained from scratch. A tiny model, a few steps.

Usage: passkey_study_check.py DILATRON WORKDIR
"""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = """[model]
seq_len = 2048
d_model = 16
n_layers = 4
n_heads = 8
d_ff = 32
positional = "xpos"
[attention]
schedule = "256:1,2048:8k"
[data]
task = "passkey"
batch_size = 1
[train]
lr = 2e-3
eval_every = 2
eval_samples = 2
checkpoint_every = 0
seed = 3
[[train.stages]]
steps = 3
seq_len = 512
batch_size = 2
schedule = "512:1"
[[train.stages]]
steps = 2
seq_len = 512
batch_size = 2
schedule = "128:1,512:8k"
[[train.stages]]
steps = 2
[eval]
samples = 4
min_distance = 256
"""


def rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def main():
    dilatron, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    config = os.path.join(work, "tiny.toml")
    with open(config, "w") as f:
        f.write(CONFIG)
    study = os.path.join(work, "study")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "passkey_study.py"), "--config", config,
                    "--out", study, "--only", "mixed-global", "--dilatron", dilatron], check=True)
    with open(os.path.join(study, "shared-stage-1", "checkpoints", "latest")) as f:
        if f.read().strip() != "ckpt-000000005.h5":  # both stages with their own schedule: 3 + 2 steps
            sys.exit("the shared stage did not end after the two stages with their own schedule (step 5)")
    run = os.path.join(study, "mixed-global")
    if not os.path.exists(os.path.join(run, "config-changes.log")):
        sys.exit("the study run did not resume from the shared stage (no config-changes.log)")
    scratch = os.path.join(work, "scratch")
    subprocess.run([dilatron, "train", os.path.join(run, "study.toml"), "--out", scratch], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = rows(os.path.join(run, "metrics.jsonl")), rows(os.path.join(scratch, "metrics.jsonl"))
    steps = lambda rs: [(r["step"], r["stage"], r["loss"], r["grad_norm"]) for r in rs if "loss" in r]
    evals = lambda rs: [r for r in rs if r.get("eval") and r["step"] > 5]
    if steps(a) != steps(b):
        sys.exit(f"training rows differ:\n  shared stage: {steps(a)}\n  from scratch: {steps(b)}")
    if not evals(a) or evals(a) != evals(b):
        sys.exit(f"evaluations differ:\n  shared stage: {evals(a)}\n  from scratch: {evals(b)}")
    print(f"passkey_study_check: {len(steps(a))} steps and {len(evals(a))} evaluations identical")


if __name__ == "__main__":
    main()
