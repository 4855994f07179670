#!/usr/bin/env python3
"""Checks sdpa_attention.dilated_attention_sdpa (PyTorch's fused kernel per gathered branch) against
dilated_attention.dilated_attention (the einsum twin, which tests/ checks against dilatron): outputs,
lse and the gradients of q, k, v in float64 (to 1e-12) and float32 (to 2e-5) on odd sizes, ragged
segments, offsets (H not a multiple of r), both branch kinds, causal or not. scripts/bench-report.sh
runs it before it times the sdpa twin. Needs PyTorch >= 2.2. Exit 1 on the first mismatch.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True
from dilated_attention import dilated_attention  # noqa: E402
from sdpa_attention import dilated_attention_sdpa  # noqa: E402

CASES = [  # N, H, D, schedule
    (97, 5, 16, "32:1,64:4"),
    (97, 3, 8, "40:1,97:4k"),
    (1025, 8, 16, "256:1,1024:8k"),
    (64, 4, 16, "16:1,64:2k,128:4"),
    (50, 6, 4, "7:3,50:5k,20:2"),
    (33, 2, 4, "33:1"),
]


def main():
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        for N, H, D, schedule in CASES:
            for causal in (False, True):
                q, k, v, do = (torch.randn(2, N, H, D, generator=g, dtype=dtype) for _ in range(4))
                results = []
                for op in (dilated_attention, dilated_attention_sdpa):
                    x = [t.clone().requires_grad_() for t in (q, k, v)]
                    o, lse = op(*x, schedule, causal=causal)
                    results.append((o, lse, *torch.autograd.grad(o, x, do)))
                (o1, l1, *g1), (o2, l2, *g2) = results
                covered = torch.isfinite(l1)
                what = f"{dtype} N={N} H={H} D={D} {schedule} causal={causal}"
                if not torch.equal(covered, torch.isfinite(l2)):
                    sys.exit(f"check_sdpa: {what}: the rows without keys differ")
                errs = [(o1 - o2).abs().max(), (l1[covered] - l2[covered]).abs().max()]
                errs += [(a - b).abs().max() for a, b in zip(g1, g2)]
                err = max(e.item() for e in errs)
                if not err <= tol:
                    sys.exit(f"check_sdpa: {what}: max difference {err:.2e} > {tol:.0e} (o, lse, dq, dk, dv: "
                             + ", ".join(f"{e.item():.1e}" for e in errs) + ")")
                worst = max(worst, err / tol)
    print(f"check_sdpa: {2 * 2 * len(CASES)} cases agree (largest difference {worst:.2f} of the tolerance)")


if __name__ == "__main__":
    main()
