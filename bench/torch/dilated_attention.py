"""Dilated attention (LongNet) in plain PyTorch, the way it is usually written today: for each branch
(w, r), view the sequence as whole segments (zero-padding a ragged last one), take every r-th row of
each segment for the heads whose offset is h mod r (strided views), run dense softmax attention
inside each segment (one batched einsum over all segments and heads of an offset group, masked
scores materialised), scatter the rows back, and merge the branches by their log-sum-exp. Autograd
comes from torch.

It computes the function of docs/attention-contract.md (the contract) without dropout:
dilatron's attention dropout draws its mask bits from Philox4x32-10 keyed per (b, h, branch, t, j),
which this twin does not reproduce. Everything else is supported: several branches, per-head
offsets (any H, also not a multiple of r), ragged last segments (w not dividing N), causal masking,
queries no branch covers (o = 0, lse = -inf, no gradient) and the T5 relative-position bias.
"""
import math

import torch

__all__ = ["parse_schedule", "relative_position_buckets", "dilated_attention"]


def parse_schedule(text):
    """'2048:1,4096:2' -> [(2048, 1), (4096, 2)], validated like dilatron's parse_schedule."""
    schedule = [tuple(int(x) for x in part.split(":")) for part in text.split(",")]
    if not 1 <= len(schedule) <= 16:
        raise ValueError(f"schedule '{text}': needs 1..16 branches")
    for i, (w, r) in enumerate(schedule):
        if not (w >= 1 and 1 <= r <= w):
            raise ValueError(f"schedule '{text}': branch {i} has w = {w}, r = {r} (need w >= 1, 1 <= r <= w)")
    return schedule


def relative_position_buckets(n, causal, num_buckets=32, max_distance=128):
    """T5 bucket of each distance n = t - j (a LongTensor of any shape), as in the contract.

    The thresholds go through Python's math.log (the C library's log, as dilatron's host code), on
    the distances 0..max_distance only: every distance from max_distance on is in the last bucket.
    """
    nb = num_buckets if causal else num_buckets // 2
    max_exact = nb // 2
    if max_exact < 1 or max_distance <= max_exact or (not causal and num_buckets % 2):
        raise ValueError(f"relative-position bias: num_buckets = {num_buckets}, max_distance = {max_distance}")
    log_range = math.log(max_distance / max_exact)
    table = torch.tensor([m if m < max_exact else
                          min(nb - 1, max_exact + math.floor(math.log(m / max_exact) / log_range * (nb - max_exact)))
                          for m in range(max_distance + 1)], device=n.device)
    if causal:  # n = max(n, 0)
        return table[n.clamp(0, max_distance)]
    far = table[n.abs().clamp(max=max_distance)]
    return torch.where(n < 0, nb + far, far)


def dilated_attention(q, k, v, schedule, causal=False, scale=None, bias=None, bias_num_buckets=32,
                      bias_max_distance=128):
    """q, k, v [B, N, H, D]; schedule [(w, r), ...] or "w:r,..."; bias None or [H, num_buckets].

    Returns (o [B, N, H, D], lse [B, H, N]). o is differentiable in q, k, v and bias (through the
    merge too: the branch weights are not detached); lse is -inf where no branch covers (t, h).
    """
    if isinstance(schedule, str):
        schedule = parse_schedule(schedule)
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Masked scores get the most negative finite value, not -inf: a padded query whose segment has no
    # key (all of it past N) then gives a finite, discarded row instead of NaNs in the backward.
    neg = torch.finfo(q.dtype).min
    outs, lses = [], []
    for w, r in schedule:
        w = min(w, N)  # a segment longer than the sequence is one segment [0, N): no padding needed
        S = -(-N // w)  # segments; the last is ragged when w does not divide N
        pad = S * w - N
        # [B, S, w, H, D] views of the sequence, zero-padded to whole segments (a copy only then).
        qs, ks, vs = ((torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).reshape(B, S, w, H, D)
                      for x in (q, k, v))
        o_b = q.new_zeros(B, S, w, H, D)
        lse_b = q.new_full((B, S, w, H), -math.inf)
        for off in range(min(r, H)):  # heads h = off, off + r, ... share the grid rows off, off + r, ...
            rows = torch.arange(off, w, r, device=q.device)  # positions inside a segment, [m]
            qg, kg, vg = (x[:, :, off::r, off::r] for x in (qs, ks, vs))  # [B, S, m, Hg, D]
            s = torch.einsum("bsihd,bsjhd->bshij", qg * scale, kg)  # [B, S, Hg, m, m]
            if bias is not None:
                dist = (rows[:, None] - rows[None, :])  # t - j, the same for every segment
                bucket = relative_position_buckets(dist, causal, bias_num_buckets, bias_max_distance)
                s = s + bias[off::r][:, bucket]  # [Hg, m, m]
            # Keys past N (the padded tail of the last segment) and, causal, keys after the query.
            pos = torch.arange(S, device=q.device)[:, None] * w + rows  # [S, m] absolute positions
            keep = (pos < N)[:, None, None, :]  # [S, 1, 1, m]
            if causal:
                keep = keep & (rows[:, None] >= rows[None, :])
            s = s.masked_fill(~keep, neg)
            lse = torch.logsumexp(s, dim=-1)  # [B, S, Hg, m]: the merge's weights (with gradient)
            o = torch.einsum("bshij,bsjhd->bsihd", torch.softmax(s, dim=-1), vg)
            o_b[:, :, off::r, off::r] = o  # scatter back (autograd: CopySlices)
            lse_b[:, :, off::r, off::r] = lse.transpose(2, 3)
        outs.append(o_b.view(B, S * w, H, D)[:, :N])
        lses.append(lse_b.view(B, S * w, H)[:, :N])
    # Merge: o = sum_i exp(lse_i - lse) o_i with lse = log sum_i exp(lse_i), i.e. one softmax over all
    # branches' (branch, key) pairs. The max is only for stability (it cancels), so it is detached;
    # uncovered (t, h) have every lse_i = -inf, hence weight 0 and a zero denominator, guarded.
    lse_all = torch.stack(lses)  # [K, B, N, H]
    m = lse_all.detach().amax(0)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(lse_all - m)
    z = e.sum(0)
    covered = z > 0
    o = (e[..., None] * torch.stack(outs)).sum(0) / torch.where(covered, z, torch.ones_like(z))[..., None]
    lse = torch.where(covered, torch.log(torch.where(covered, z, torch.ones_like(z))) + m,
                      torch.full_like(z, -math.inf))
    return o, lse.detach().permute(0, 2, 1)
