"""h5py side of test_hdf5.cpp (H5Py suite): checks a file dilatron wrote, then writes one for dilatron to read.

usage: h5py_roundtrip.py OURS.h5 THEIRS.h5   (exits non-zero with a message on the first mismatch)
"""
import sys

import h5py
import numpy as np


def expect(cond, what):
    if not cond:
        sys.exit(f"h5py_roundtrip.py: {what}")


def check_ours(path):
    with h5py.File(path, "r") as f:
        x = f["tensors/x"]
        expect(x.dtype == np.float32 and x.shape == (2, 3, 4), f"tensors/x is {x.dtype} {x.shape}")
        want = np.arange(24, dtype=np.float32).reshape(2, 3, 4) * 0.25 - 3.0
        expect(np.array_equal(x[()], want), f"tensors/x values {x[()]}")
        expect(x.fletcher32 and x.chunks is not None, "tensors/x is not written with the Fletcher32 checksum")
        mask = f["mask"]
        expect(mask.dtype == np.bool_, f"mask dtype {mask.dtype}")
        expect(mask[()].tolist() == [True, False, False, True, True], f"mask values {mask[()]}")
        ids = f["ids"]
        expect(ids.dtype == np.int64 and ids[()].tolist() == [-(2**63), 0, 2**63 - 1], f"ids {ids.dtype} {ids[()]}")
        scale = f["scale"]
        expect(scale.shape == () and scale.dtype == np.float64 and scale[()] == 0.125, f"scale {scale[()]}")
        empty = f["empty"]
        expect(empty.shape == (0, 4) and empty.dtype == np.float32, f"empty {empty.dtype} {empty.shape}")

        attrs = f.attrs
        expect(isinstance(attrs["name"], str) and attrs["name"] == "dilatron \u2713", f"name attr {attrs['name']!r}")
        expect(attrs["step"] == 7 and attrs["step"].dtype == np.int64, f"step attr {attrs['step']!r}")
        expect(attrs["lr"] == 3e-4, f"lr attr {attrs['lr']!r}")
        expect(attrs["dims"].tolist() == [2, 3, 4], f"dims attr {attrs['dims']!r}")
        expect(f["tensors/x"].attrs["unit"] == "m/s", "tensors/x unit attr")


def write_theirs(path):
    with h5py.File(path, "w") as f:
        f["f32"] = np.array([[1.5, -2.0], [0.0, 3.25], [1e-3, -7.0]], dtype=np.float32)
        f["f64"] = np.array([np.pi, -np.e, 1e300], dtype=np.float64)
        f["i64"] = np.array([[-(2**62), 5], [7, 2**62]], dtype=np.int64)
        f["i32"] = np.array([-(2**31), 2**31 - 1, 0], dtype=np.int32)
        f["u8"] = np.array([0, 200, 255], dtype=np.uint8)
        f["f16"] = np.array([0.5, -1.25, 2048.0], dtype=np.float16)
        f["flags"] = np.array([True, False, True])
        f["group/nested"] = np.float32(2.5)
        f["u64"] = np.array([2**64 - 1], dtype=np.uint64)
        f["words"] = np.array([b"a", b"b"])
        f.attrs["note"] = "written by h5py \u00e9"
        f.attrs.create("fixed", b"fixed-length", dtype="S20")  # NUL-padded to 20 bytes
        f.attrs["count"] = np.int32(12)
        f.attrs["ratio"] = 0.75
        f.attrs["sizes"] = np.array([3, 1, 4], dtype=np.int64)


if __name__ == "__main__":
    check_ours(sys.argv[1])
    write_theirs(sys.argv[2])
