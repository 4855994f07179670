#!/usr/bin/env python3
"""Projects LongNet's sequence-parallel dilated attention (docs/distributed.md) to many GPUs: per rank
and attention layer, forward+backward compute time from a measured kernel rate, and communication
time from the bytes the algorithm sends and an all-gather bandwidth.

  scripts/sp_projection.py [--tokens 2**30] [--gpus 64] [--heads 16] [--dim 64] [--w0 2048]
                           [--ratio 4] [--rate-tflops 21.9] [--bytes 4] [--bandwidth-gbs 50]
                           [--check]

The model of the algorithm is the one lib/dist/sequence_parallel.cpp implements for communication:
the sequence is cut into S = --gpus contiguous parts of n = N/S tokens; a branch (w, r) with w <= n
runs locally; a branch with w > n is shared by the w/n ranks of each segment, and each of them
all-gathers the grid keys and values of the others (ceil(n/r) rows per head and part, k and v) and,
backward, reduce-scatters as many gradient bytes. Compute is projected as LongNet's algorithm does
it, each rank for its own queries (the library today computes a spanning branch over its whole
segment on every rank: see docs/distributed.md). The schedule is LongNet's geometric one: branch i
has w = w0 * ratio^i and r = ratio^i (w capped at N), so every branch has w0 grid keys per segment.

Visited pairs are counted as the library counts them (attention_flops: 4 * D flops per causal pair
forward, 3.5x that forward+backward). --check recomputes the bytes docs/distributed.md measured under
mpirun (B = 1, H = 8, D = 16, float32, n = 1024) and exits 1 if the formula disagrees.
"""
import argparse
import math
import sys


def schedule(n_tokens, w0, ratio):
    out, w, r = [], w0, 1
    while True:
        out.append((min(w, n_tokens), r))
        if w >= n_tokens:
            return out
        w, r = w * ratio, r * ratio


def pairs_per_head(n_tokens, branches):
    """Causal (query, key) pairs of the whole sequence per head: per segment and head, m grid rows
    with m (m + 1) / 2 pairs (the last segment may be ragged; here w divides N or w = N)."""
    total = 0
    for w, r in branches:
        m = -(-w // r)
        total += (n_tokens // w) * m * (m + 1) // 2
    return total


def bytes_per_rank(n_tokens, ranks, branches, heads, dim, elem, batch=1):
    """Forward all-gather bytes a rank sends (the backward's reduce-scatter sends as much again)."""
    n = n_tokens // ranks
    total = 0
    for w, r in branches:
        if w <= n:
            continue
        span = w // n  # ranks per segment
        total += (span - 1) * 2 * batch * heads * (-(-n // r)) * dim * elem
    return total


def count(text):
    """An integer, or a power written base**exponent."""
    base, _, exp = text.partition("**")
    return int(base) ** int(exp) if exp else int(base)


def check():
    # docs/distributed.md, "Sequence-parallel attention": S, N, schedule, measured forward bytes.
    measured = [(2, 2048, [(1024, 1), (2048, 8)], 131072), (4, 4096, [(1024, 1), (4096, 16)], 196608),
                (8, 8192, [(1024, 1), (8192, 32)], 229376), (16, 16384, [(1024, 1), (16384, 64)], 245760),
                (16, 16384, [(1024, 1), (2048, 4)], 262144)]
    bad = [(s, n, sch, got, want) for s, n, sch, want in measured
           if (got := bytes_per_rank(n, s, sch, heads=8, dim=16, elem=4)) != want]
    for s, n, sch, got, want in bad:
        print(f"S = {s}, N = {n}, {sch}: formula {got} bytes, measured {want}")
    print(f"sp_projection --check: {len(measured) - len(bad)} of {len(measured)} measured rows match the formula")
    return not bad


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=count, default=2 ** 30, help="N, e.g. 1073741824 or 2**30")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--w0", type=int, default=2048)
    p.add_argument("--ratio", type=int, default=4)
    p.add_argument("--rate-tflops", type=float, default=21.9,
                   help="attention forward+backward rate per GPU (default: float32 on an H200, docs/gpu-runs.md)")
    p.add_argument("--bytes", type=int, default=4, help="bytes per element (4 float32, 2 bfloat16)")
    p.add_argument("--bandwidth-gbs", type=float, default=50.0,
                   help="all-gather bandwidth per GPU in GB/s (default: one 400 Gb/s InfiniBand link per GPU)")
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    if a.check:
        sys.exit(0 if check() else 1)
    if a.tokens % a.gpus:
        p.error(f"--tokens {a.tokens} is not a multiple of --gpus {a.gpus}")
    branches = schedule(a.tokens, a.w0, a.ratio)
    pairs = pairs_per_head(a.tokens, branches) * a.heads
    flops_rank = pairs * 4 * a.dim * 3.5 / a.gpus
    compute_s = flops_rank / (a.rate_tflops * 1e12)
    comm = 2 * bytes_per_rank(a.tokens, a.gpus, branches, a.heads, a.dim, a.bytes)  # forward + backward
    comm_s = comm / (a.bandwidth_gbs * 1e9)
    n = a.tokens // a.gpus
    print(f"N = {a.tokens:,} tokens on {a.gpus} GPUs ({n:,} per GPU), H = {a.heads}, D = {a.dim}, "
          f"{len(branches)} branches: " + ", ".join(f"{w}:{r}" for w, r in branches))
    print(f"  spanning branches (w > {n:,}): " + (", ".join(f"{w}:{r} ({w // n} ranks)" for w, r in branches
                                                          if w > n) or "none"))
    print(f"  per GPU and attention layer, forward+backward:")
    print(f"    compute: {flops_rank:.3g} flop at {a.rate_tflops} TFLOP/s = {compute_s:.3g} s")
    print(f"    communication: {comm / 2**20:.1f} MiB at {a.bandwidth_gbs} GB/s = {1e3 * comm_s:.3g} ms "
          f"({100 * comm_s / compute_s:.2g}% of compute)")
    print(f"    q, k, v, o of the GPU's part: {4 * n * a.heads * a.dim * a.bytes / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
