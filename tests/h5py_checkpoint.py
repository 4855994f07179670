"""Reads a dilatron checkpoint with h5py and checks it against `dilatron inspect`'s listing.

usage: h5py_checkpoint.py CKPT INSPECT_OUTPUT
"""
import re
import sys

import h5py
import numpy as np

ckpt, inspect_path = sys.argv[1], sys.argv[2]
listed = {}
with open(inspect_path) as f:
    for line in f:
        m = re.match(r"^  (\S+)\s+\[([0-9, ]*)\]$", line.rstrip("\n"))
        if m:
            listed[m.group(1)] = tuple(int(x) for x in m.group(2).split(",") if x.strip())

with h5py.File(ckpt, "r") as f:
    names = []
    f["model"].visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    assert sorted(names) == sorted(listed), f"h5py sees {sorted(names)}, inspect lists {sorted(listed)}"
    total = 0
    for name in names:
        data = f["model"][name][()]
        assert data.shape == listed[name], f"{name}: h5py shape {data.shape}, inspect {listed[name]}"
        assert np.all(np.isfinite(data)), f"{name}: non-finite values"
        for state in ("m", "v"):
            opt = f["optimizer"][name][state]
            assert opt.shape == data.shape, f"optimizer/{name}/{state}: shape {opt.shape}"
        total += data.size
    step = int(f.attrs["step"])
    config = f.attrs["config"]
    config = config.decode() if isinstance(config, bytes) else config  # a fixed-length string: bytes
    assert isinstance(config, str) and "[model]" in config, "config attribute is not the TOML text"
    assert step == 2, f"step attribute {step}"
print(f"ok: {len(names)} parameters, {total} values, step {step}")
