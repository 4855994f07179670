#!/usr/bin/python3
"""Cross-checks the PyTorch twin against the dilatron binary.

(a) attention: random float32 q, k, v, do (and a bias table) at awkward sizes go through
    `dilatron attention` and through dilated_attention.py (run in float64); o, lse, dq, dk, dv (dbias)
    must agree to 1e-5 in the contract's measure, max |twin - dilatron| / max(max |dilatron|, 1); the float64 cases
    to 1e-12, where rounding cannot hide a small difference in the function. Both branch kinds
    (dilated `w:r` and key-dilated `w:rk`) are covered, with queries no branch covers (lse = -inf on
    both sides, at the same (h, t)).
(b) model: `dilatron train` on a small text file the script writes (configs/tiny.toml, a few steps);
    the twin loads the final checkpoint and scores the validation windows of TextDataset (data.cpp).
    It must match the trainer's own evaluation of that checkpoint (metrics.jsonl's val_loss, printed
    to 1e-6) to 1e-4, and `dilatron eval --text` (printed to 1e-4, so 1e-4 plus half a unit of rounding).

usage: check_twin.py --dilatron PATH [--workdir DIR] [--steps N]
"""
import argparse
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.dont_write_bytecode = True  # no __pycache__ in the source tree
from dilated_attention import dilated_attention  # noqa: E402
from model import load_checkpoint  # noqa: E402

REPO = HERE.parent.parent
LOSS_TOL = 1e-4

# name, B, N, H, D, schedule, causal, bias (num_buckets, max_distance) or None, dtype. N = 97 and 1025 leave
# every segment length ragged; H is not a multiple of most dilations (offset groups of unequal size,
# some empty); "uncovered" has no r = 1 branch, so some (t, h) get o = 0 and lse = -inf.
# Key-dilated branches (`w:rk`, every query, keys on the grid): "uncovered" causal cases leave the
# queries at places u < o of every branch with no key at all (t = 0 for h = 1, 2, ...); the bidir
# one ends in a ragged segment of length 1, which holds no grid key for h = 1, 2.
ATTENTION_CASES = [
    ("N97 causal 3 branches", 2, 97, 3, 16, "16:1,40:2,64:4", True, None, np.float32),
    ("N97 bidir uncovered bias", 2, 97, 3, 16, "24:2,50:3", False, (16, 24), np.float32),
    ("N1025 causal 3 branches bias", 1, 1025, 6, 32, "128:1,512:4,1024:8", True, (32, 128), np.float32),
    ("N1025 bidir 2 branches", 1, 1025, 5, 32, "200:1,1000:3", False, None, np.float32),
    ("N97 causal 3 branches bias float64", 2, 97, 3, 16, "16:1,40:2,64:4", True, (16, 24), np.float64),
    ("N97 causal key-dilated bias", 2, 97, 3, 16, "64:1,97:4k", True, (16, 24), np.float32),
    ("N97 causal key-dilated uncovered", 2, 97, 3, 16, "40:3k,97:4k", True, (16, 24), np.float32),
    ("N97 bidir key-dilated uncovered bias", 2, 97, 3, 16, "32:8k,48:6k", False, (16, 24), np.float32),
    ("N1025 causal key-dilated bias", 1, 1025, 3, 32, "128:1,512:8k,1025:4k", True, (32, 128), np.float32),
    ("N1025 bidir ragged key-dilated bias", 1, 1025, 3, 32, "300:5k,100:1", False, (32, 128), np.float32),
    ("N97 causal mixed kinds uncovered bias float64", 2, 97, 3, 16, "16:2,40:3k,97:4k", True, (16, 24), np.float64),
    ("N97 bidir ragged key-dilated bias float64", 2, 97, 3, 16, "30:5k,20:1", False, (16, 24), np.float64),
]
TOL = {np.float32: 1e-5, np.float64: 1e-12}

# Extra --set overrides of each model run (on top of the text task and the short schedule).
MODEL_RUNS = [
    ("tiny (xpos, tied head)", []),
    ("tiny rotary, untied head, rel bias, layer-1 schedule",
     ["model.positional=rotary", "model.tie_embeddings=false", "model.rel_pos_bias=true",
      "attention.layers.1=32:1,128:4"]),
]


def run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stdout}\n{p.stderr}")
    return p.stdout


def rel_err(got, ref):
    """The contract's measure over finite entries, plus the plain max abs error."""
    fin = np.isfinite(ref)
    if not np.array_equal(fin, np.isfinite(got)):
        return math.inf, math.inf
    if not fin.any():
        return 0.0, 0.0
    diff = np.abs(got[fin].astype(np.float64) - ref[fin])
    return diff.max() / max(np.abs(ref[fin]).max(), 1.0), diff.max()


def check_attention(binary, work, rows):
    for i, (name, B, N, H, D, schedule, causal, bias_cfg, dtype) in enumerate(ATTENTION_CASES):
        rng = np.random.default_rng(i)
        inputs = {n: rng.standard_normal((B, N, H, D), dtype=dtype) for n in ("q", "k", "v", "do")}
        if bias_cfg:
            inputs["bias"] = rng.standard_normal((H, bias_cfg[0]), dtype=dtype)
        src, dst = work / f"attn{i}_in.h5", work / f"attn{i}_out.h5"
        with h5py.File(src, "w") as f:
            for n, x in inputs.items():
                f[n] = x
        cmd = [binary, "attention", "--in", src, "--out", dst, "--schedule", schedule]
        cmd += ["--causal"] if causal else []
        cmd += ["--bias-buckets", bias_cfg[0], "--bias-max-distance", bias_cfg[1]] if bias_cfg else []
        run(cmd)

        # The twin runs in float64: a float32 twin adds its own summation noise, which varies with
        # torch's threading (dbias of N = 1025 reached 1.0e-5 on one run), to dilatron's.
        t = {n: torch.from_numpy(x.astype(np.float64)).requires_grad_(n != "do") for n, x in inputs.items()}
        kw = dict(bias_num_buckets=bias_cfg[0], bias_max_distance=bias_cfg[1]) if bias_cfg else {}
        o, lse = dilated_attention(t["q"], t["k"], t["v"], schedule, causal=causal, bias=t.get("bias"), **kw)
        o.backward(t["do"])
        ours = {"o": o, "lse": lse, "dq": t["q"].grad, "dk": t["k"].grad, "dv": t["v"].grad}
        if bias_cfg:
            ours["dbias"] = t["bias"].grad
        with h5py.File(dst, "r") as f:
            for n, x in ours.items():
                if n not in f:
                    sys.exit(f"'{dst}' has no dataset '{n}'")
                ref, got = f[n][()], x.detach().numpy()
                if ref.shape != got.shape:
                    sys.exit(f"attention '{name}' {n}: dilatron shape {ref.shape}, twin {got.shape}")
                if np.isnan(got).any():
                    rows.append((f"attention {name}", n, math.inf, math.inf, TOL[dtype]))
                    continue
                err, abs_err = rel_err(got, ref)
                rows.append((f"attention {name}", n, err, abs_err, TOL[dtype]))


def write_text(path):
    """~60 KB of deterministic UTF-8 sentences (multi-byte characters included)."""
    words = "the quick brown fox jumps over a lazy dog while café owners sip naïve tea near Zürich 東京 rivers".split()
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))).capitalize() + "." +
                 ("\n" if k % 7 == 6 else "") for k in range(1500)]
    path.write_text(" ".join(sentences), encoding="utf-8")


def validation_windows(path, val_fraction, seq_len, max_windows):
    """TextDataset(path, val_fraction).windows(Validation, seq_len, 0, n): the split is the last
    llround(val_fraction * bytes) bytes; window k is bytes [k T, (k + 1) T] of it."""
    data = path.read_bytes()
    val = data[len(data) - math.floor(val_fraction * len(data) + 0.5):]  # llround (half away from zero)
    n = min((len(val) - 1) // seq_len, max_windows)
    return torch.tensor(np.frombuffer(val[:n * seq_len + 1], dtype=np.uint8).astype(np.int64)).unfold(
        0, seq_len + 1, seq_len)


def check_model(binary, work, steps, rows):
    text = work / "text.txt"
    write_text(text)
    for i, (name, sets) in enumerate(MODEL_RUNS):
        out = work / f"run{i}"
        shutil.rmtree(out, ignore_errors=True)  # a fresh run: train appends to an old metrics.jsonl
        sets = ["data.task=text", f"data.path={text}", f"train.steps={steps}", f"train.eval_every={steps}",
                f"train.checkpoint_every={steps}", "train.eval_samples=8"] + sets
        log = run([binary, "train", REPO / "configs/tiny.toml", "--out", out] + [a for s in sets for a in ("--set", s)])
        ckpt = re.search(r"^checkpoint: (.+)$", log, re.M).group(1)
        val_loss = [json.loads(l)["val_loss"] for l in (out / "metrics.jsonl").read_text().splitlines()
                    if "val_loss" in l][-1]  # the trainer's evaluation of the final checkpoint
        m = re.search(r"validation: loss ([0-9.]+) nats/byte", run([binary, "eval", ckpt, "--text", text]))
        eval_loss = float(m.group(1))

        model, cfg = load_checkpoint(ckpt)
        T, vf = model.config.seq_len, cfg["data"].get("val_fraction", 0.05)
        with torch.no_grad():
            ours8 = model.loss(validation_windows(text, vf, T, cfg["train"]["eval_samples"])).item()
            ours_all = model.loss(validation_windows(text, vf, T, 1 << 30)).item()
            # A control that the comparison has teeth: dense causal attention in layer 0 instead of
            # its dilated schedule must move the loss far beyond the tolerance.
            model.blocks[0].attn.schedule = [(T, 1)]
            control = model.loss(validation_windows(text, vf, T, 8)).item()
        rows.append((f"model {name}", "val_loss (trainer)", abs(ours8 - val_loss), abs(ours8 - val_loss), LOSS_TOL))
        rows.append((f"model {name}", "eval --text (4 dp)", abs(ours_all - eval_loss), abs(ours_all - eval_loss),
                     LOSS_TOL + 5e-5))
        print(f"# {name}: dilatron val_loss {val_loss:.6f}, twin {ours8:.6f}; eval --text {eval_loss:.4f}, twin "
              f"{ours_all:.6f}; control (dense layer 0) {control:.6f}")
        if abs(control - ours8) < 10 * LOSS_TOL:
            sys.exit(f"model {name}: the control loss {control} is within 10x the tolerance of {ours8}: "
                     "the check cannot tell the attention apart (train more steps)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dilatron", required=True, help="the dilatron binary")
    ap.add_argument("--workdir", help="where to write HDF5 files and runs (default: a new temporary directory)")
    ap.add_argument("--steps", type=int, default=30, help="training steps of each model run")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(a.workdir or tempfile.mkdtemp(prefix="torch_twin_"))
    work.mkdir(parents=True, exist_ok=True)

    rows = []
    check_attention(a.dilatron, work, rows)
    check_model(a.dilatron, work, a.steps, rows)

    print(f"{'check':56s} {'tensor':20s} {'error':>10s} {'max abs':>10s} {'bound':>8s}")
    failed = []
    for what, tensor, err, abs_err, tol in rows:
        ok = err <= tol
        print(f"{what:56s} {tensor:20s} {err:10.2e} {abs_err:10.2e} {tol:8.1e} {'ok' if ok else 'FAIL'}")
        if not ok:
            failed.append(f"{what}: {tensor} differs by {err:.3e} (bound {tol:.0e})")
    if failed:
        sys.exit("the torch twin disagrees with dilatron:\n  " + "\n  ".join(failed))
    print(f"torch twin matches dilatron ({len(rows)} comparisons)")


if __name__ == "__main__":
    main()
