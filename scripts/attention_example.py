#!/usr/bin/env python3
"""Worked example of `dilatron attention`: random q, k, v, do in an HDF5 file, the op run by the
command, and its o, lse, dq, dk, dv checked against the contract written densely in numpy.

usage: attention_example.py DILATRON_BINARY WORK_DIR
"""
import subprocess
import sys

import h5py
import numpy as np

binary, work = sys.argv[1], sys.argv[2]
B, N, H, D = 2, 37, 3, 8
schedule = [(8, 1), (16, 2), (37, 4)]
rng = np.random.default_rng(0)
q, k, v, do = (rng.standard_normal((B, N, H, D)) for _ in range(4))

with h5py.File(f"{work}/in.h5", "w") as f:
    for name, x in (("q", q), ("k", k), ("v", v), ("do", do)):
        f[name] = x  # float64
subprocess.run([binary, "attention", "--in", f"{work}/in.h5", "--out", f"{work}/out.h5", "--causal",
                "--schedule", ",".join(f"{w}:{r}" for w, r in schedule)], check=True)

# The contract, densely: count[b, h, t, j] = how many branches put key j in query t's set.
count = np.zeros((H, N, N))
for w, r in schedule:
    for h in range(H):
        off = h % r
        on = [(t - (t // w) * w) >= off and ((t - (t // w) * w) - off) % r == 0 for t in range(N)]
        for t in range(N):
            for j in range(t + 1):
                if on[t] and on[j] and t // w == j // w:
                    count[h, t, j] += 1
scale = 1 / np.sqrt(D)
s = np.einsum("bthd,bjhd->bhtj", q, k) * scale
m = np.where(count[None] > 0, s, -np.inf).max(-1, keepdims=True)
e = count[None] * np.exp(s - np.where(np.isfinite(m), m, 0))
z = e.sum(-1, keepdims=True)
p = np.divide(e, z, out=np.zeros_like(e), where=z > 0)  # multiset softmax (a key in two branches counts twice)
o = np.einsum("bhtj,bjhd->bthd", p, v)
lse = np.where(z[..., 0] > 0, np.log(np.where(z[..., 0] > 0, z[..., 0], 1)) + m[..., 0], -np.inf)
dP = np.einsum("bthd,bjhd->bhtj", do, v)
Dt = np.einsum("bthd,bthd->bht", do, o)[..., None]
dS = p * (dP - Dt)
dq = np.einsum("bhtj,bjhd->bthd", dS, k) * scale
dk = np.einsum("bhtj,bthd->bjhd", dS, q) * scale
dv = np.einsum("bhtj,bthd->bjhd", p, do)

with h5py.File(f"{work}/out.h5", "r") as f:
    worst = 0.0
    for name, ref in (("o", o), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        got = f[name][()]
        assert got.shape == ref.shape, f"{name}: shape {got.shape}, expected {ref.shape}"
        err = np.abs(got - ref).max() / max(np.abs(ref[np.isfinite(ref)]).max(), 1)
        worst = max(worst, err)
        print(f"{name:4s} {str(got.dtype):8s} {str(got.shape):18s} max rel error {err:.2e}")
assert worst < 1e-12, f"error {worst} above 1e-12"
print("dilatron attention matches the dense contract")
