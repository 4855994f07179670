#!/usr/bin/python3
"""Timings of the PyTorch twin, the baseline dilatron is compared with. One JSON line per result.

  bench_twin.py [--impl einsum|sdpa] attention --n 16384 [--heads 8 --dim 64 --schedule ... --causal]
      forward (no grad) and forward+backward of the op, median of --reps, float32
  bench_twin.py [--impl einsum|sdpa] train --config configs/passkey.toml [--steps 20]
      the twin model trained with torch.optim.AdamW (dilatron's decay groups, betas and gradient
      clipping) on random-token batches of the config's batch_size x seq_len; tokens/s is the median
      over the steps after 2 warm-up steps

--impl einsum (the default) is dilated_attention.py (scores materialised per segment, any PyTorch);
--impl sdpa is sdpa_attention.py (PyTorch's fused flash kernel per gathered branch, PyTorch >= 2.2).
"""
import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.dont_write_bytecode = True
from dilated_attention import dilated_attention  # noqa: E402
from model import TransformerLM, config_from_toml  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def attention_op(impl):
    if impl == "sdpa":
        from sdpa_attention import dilated_attention_sdpa
        return dilated_attention_sdpa
    return dilated_attention


def bench_attention(a, device):
    op = attention_op(a.impl)
    shape = (a.batch, a.n, a.heads, a.dim)
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(shape, generator=g).to(device) for _ in range(4))

    def forward():
        with torch.no_grad():
            op(q, k, v, a.schedule, causal=a.causal)

    def forward_backward():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        o, _ = op(qq, kk, vv, a.schedule, causal=a.causal)
        o.backward(do)

    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
        fn()  # warm-up (allocator, threads)
        times = [timed(fn, device) for _ in range(a.reps)]
        print(json.dumps({"bench": "twin_attention", "impl": a.impl, "torch": torch.__version__, "pass": name,
                          "n": a.n, "batch": a.batch, "heads": a.heads,
                          "dim": a.dim, "schedule": a.schedule, "causal": a.causal, "device": str(device),
                          "threads": torch.get_num_threads(), "reps": a.reps,
                          "median_s": statistics.median(times), "min_s": min(times)}), flush=True)


def bench_train(a, device):
    c, doc = config_from_toml(Path(a.config).read_text())
    c.attention_impl = a.impl
    t = doc.get("train", {})
    B, T = doc.get("data", {}).get("batch_size", 8), c.seq_len
    torch.manual_seed(0)
    model = TransformerLM(c).to(device).train()
    params = dict(model.named_parameters())
    # dilatron's groups (optim.cpp weight_decay_groups): decay on matrices, none on vectors.
    groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": t.get("weight_decay", 0.1)},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=t.get("lr", 3e-3), betas=(t.get("beta1", 0.9), t.get("beta2", 0.95)))
    clip = t.get("grad_clip", 1.0)
    times, losses = [], []
    for step in range(a.steps):
        batch = torch.randint(0, c.vocab_size, (B, T + 1), device=device)

        def train_step():
            loss = model.loss(batch)
            loss.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())

        times.append(timed(train_step, device))
    steady = times[2:] if len(times) > 2 else times
    print(json.dumps({"bench": "twin_train", "impl": a.impl, "torch": torch.__version__, "config": a.config,
                      "steps": a.steps, "batch": B, "seq_len": T,
                      "device": str(device), "threads": torch.get_num_threads(),
                      "parameters": sum(p.numel() for p in params.values()),
                      "median_step_s": statistics.median(steady), "tokens_per_s": B * T / statistics.median(steady),
                      "first_loss": losses[0], "last_loss": losses[-1]}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--impl", choices=("einsum", "sdpa"), default="einsum", help="the twin's attention")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    sub = ap.add_subparsers(dest="what", required=True)
    at = sub.add_parser("attention")
    at.add_argument("--n", type=int, default=16384)
    at.add_argument("--batch", type=int, default=1)
    at.add_argument("--heads", type=int, default=8)
    at.add_argument("--dim", type=int, default=64)
    at.add_argument("--schedule", default="1024:1,4096:4,16384:16")
    at.add_argument("--causal", action="store_true")
    at.add_argument("--reps", type=int, default=3)
    tr = sub.add_parser("train")
    tr.add_argument("--config", default="configs/passkey.toml")
    tr.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    (bench_attention if a.what == "attention" else bench_train)(a, device)


if __name__ == "__main__":
    main()
