"""Dilated attention (LongNet) in plain PyTorch, the way it is usually written today: for each branch
(w, r), view the sequence as whole segments (zero-padding a ragged last one), take every r-th row of
each segment for the heads whose offset is h mod r (strided views), run dense softmax attention
inside each segment (one batched einsum over all segments and heads of an offset group, masked
scores materialised), scatter the rows back, and merge the branches by their log-sum-exp. Autograd
comes from torch.

Both branch kinds of the contract are supported. A dilated branch (`w:r`) takes queries and keys on
the grid (rows off, off + r, ... of each segment). A key-dilated branch (`w:rk`) takes every row of
the segment as a query and the grid rows as keys; causal masking compares absolute positions (key
row <= query row) and the bias uses the true distance t - j. A query may have no key in a
key-dilated branch (causal with its place u < o, or a ragged last segment no longer than o): that
branch then gives it lse = -inf and o = 0 and passes it no gradient.

It computes the function of docs/attention-contract.md (the contract) without dropout:
dilatron's attention dropout draws its mask bits from Philox4x32-10 keyed per (b, h, branch, t, j),
which this twin does not reproduce. Everything else is supported: several branches of either kind,
per-head offsets (any H, also not a multiple of r), ragged last segments (w not dividing N), causal
masking, queries no branch covers (o = 0, lse = -inf, no gradient) and the T5 relative-position bias.
"""
import math
import re

import torch

__all__ = ["DILATED", "KEY_DILATED", "parse_schedule", "format_schedule", "relative_position_buckets",
           "dilated_attention", "merge_branches", "branches"]

DILATED, KEY_DILATED = "dilated", "key-dilated"
_INT = re.compile(r"-?[0-9]+")


def branches(schedule):
    """A schedule as a validated list of (w, r, kind); pairs (w, r) are dilated branches."""
    out = []
    for i, br in enumerate(schedule):
        if len(br) == 2:
            (w, r), kind = br, DILATED
        elif len(br) == 3:
            w, r, kind = br
        else:
            raise ValueError(f"schedule branch {i}: expected (w, r) or (w, r, kind), got {br!r}")
        if kind not in (DILATED, KEY_DILATED):
            raise ValueError(f"schedule branch {i}: kind {kind!r} is neither {DILATED!r} nor {KEY_DILATED!r}")
        if not (w >= 1 and 1 <= r <= w):
            raise ValueError(f"schedule branch {i} has w = {w}, r = {r} (need w >= 1, 1 <= r <= w)")
        out.append((int(w), int(r), kind))
    if not 1 <= len(out) <= 16:
        raise ValueError(f"schedule needs 1..16 branches, got {len(out)}")
    return out


def parse_schedule(text):
    """'2048:1,4096:2k' -> [(2048, 1, 'dilated'), (4096, 2, 'key-dilated')], parsed and validated like
    dilatron's parse_schedule: branches `w:r` (dilated) or `w:rk` (key-dilated) separated by commas,
    blanks around a branch allowed, anything else a ValueError naming the branch."""
    schedule = []
    for i, part in enumerate(text.split(",")):
        token = part.strip(" \t")
        w, colon, r = token.partition(":")
        kind = KEY_DILATED if r.endswith("k") else DILATED
        r = r[:-1] if kind == KEY_DILATED else r
        if not (colon and _INT.fullmatch(w) and _INT.fullmatch(r)):
            raise ValueError(f"schedule '{text}': bad branch '{token}' (branch {i}): expected segment:dilation "
                             "pairs separated by commas, a trailing k for a key-dilated branch, e.g. "
                             "'2048:1,4096:2' or '256:1,2048:8k'")
        schedule.append((int(w), int(r), kind))
    try:
        return branches(schedule)
    except ValueError as e:
        raise ValueError(f"schedule '{text}': {e}") from None


def format_schedule(schedule):
    """The inverse of parse_schedule (pairs count as dilated branches)."""
    return ",".join(f"{w}:{r}" + ("k" if kind == KEY_DILATED else "") for w, r, kind in branches(schedule))


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
    """q, k, v [B, N, H, D]; schedule "w:r,w:rk,..." or [(w, r) or (w, r, kind), ...] (a pair is a
    dilated branch, kind is DILATED or KEY_DILATED); bias None or [H, num_buckets].

    Returns (o [B, N, H, D], lse [B, H, N]). o is differentiable in q, k, v and bias (through the
    merge too: the branch weights are not detached); lse is -inf where no branch covers (t, h).
    """
    schedule = parse_schedule(schedule) if isinstance(schedule, str) else branches(schedule)
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    # Masked scores get the most negative finite value, not -inf: a query row without any key (a
    # padded query whose segment is all past N, or a key-dilated query before the first grid key)
    # then gives a finite row instead of NaNs in the backward; it is discarded, or replaced by
    # lse = -inf and o = 0 through torch.where (which passes it no gradient).
    neg = torch.finfo(q.dtype).min
    outs, lses = [], []
    for w, r, kind in schedule:
        w = min(w, N)  # a segment longer than the sequence is one segment [0, N): no padding needed
        S = -(-N // w)  # segments; the last is ragged when w does not divide N
        pad = S * w - N
        # [B, S, w, H, D] views of the sequence, zero-padded to whole segments (a copy only then).
        qs, ks, vs = ((torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x).reshape(B, S, w, H, D)
                      for x in (q, k, v))
        o_b = q.new_zeros(B, S, w, H, D)
        lse_b = q.new_full((B, S, w, H), -math.inf)
        key_dilated = kind == KEY_DILATED
        for off in range(min(r, H)):  # heads h = off, off + r, ... share the grid rows off, off + r, ...
            rows = torch.arange(off, w, r, device=q.device)  # key positions inside a segment, [m]
            if len(rows) == 0:  # w was capped at N <= off: no grid in any segment, nothing to see
                continue
            # Query rows: the grid (dilated) or the whole segment (key-dilated), [n].
            qrows = torch.arange(w, device=q.device) if key_dilated else rows
            qg = qs[:, :, :, off::r] if key_dilated else qs[:, :, off::r, off::r]  # [B, S, n, Hg, D]
            kg, vg = (x[:, :, off::r, off::r] for x in (ks, vs))  # [B, S, m, Hg, D]
            s = torch.einsum("bsihd,bsjhd->bshij", qg * scale, kg)  # [B, S, Hg, n, m]
            if bias is not None:
                dist = (qrows[:, None] - rows[None, :])  # t - j, the same for every segment
                bucket = relative_position_buckets(dist, causal, bias_num_buckets, bias_max_distance)
                s = s + bias[off::r][:, bucket]  # [Hg, n, m]
            # Keys past N (the padded tail of the last segment) and, causal, keys after the query.
            pos = torch.arange(S, device=q.device)[:, None] * w + rows  # [S, m] absolute key positions
            keep = (pos < N)[:, None, None, :]  # [S, 1, 1, m]
            if causal:
                keep = keep & (qrows[:, None] >= rows[None, :])  # [S, 1, n, m]
            s = s.masked_fill(~keep, neg)
            lse = torch.logsumexp(s, dim=-1)  # [B, S, Hg, n]: the merge's weights (with gradient)
            o = torch.einsum("bshij,bsjhd->bsihd", torch.softmax(s, dim=-1), vg)  # [B, S, n, Hg, D]
            if key_dilated:
                # A query with no key in this branch: lse = -inf and o = 0 (not the finite value of a
                # row of masked scores), so the merge gives it weight 0 from this branch.
                has = keep.any(-1)  # [S, 1, n] or [S, 1, 1]
                lse = torch.where(has, lse, torch.full_like(lse, -math.inf))
                o = torch.where(has.transpose(1, 2)[..., None], o, torch.zeros_like(o))
                o_b[:, :, :, off::r] = o  # scatter back (autograd: CopySlices)
                lse_b[:, :, :, off::r] = lse.transpose(2, 3)
            else:
                o_b[:, :, off::r, off::r] = o
                lse_b[:, :, off::r, off::r] = lse.transpose(2, 3)
        outs.append(o_b.view(B, S * w, H, D)[:, :N])
        lses.append(lse_b.view(B, S * w, H)[:, :N])
    return merge_branches(outs, lses)


def merge_branches(outs, lses):
    """Branch outputs [B, N, H, D] and lses [B, N, H] -> (o [B, N, H, D], lse [B, H, N], detached).

    o = sum_i exp(lse_i - lse) o_i with lse = log sum_i exp(lse_i), i.e. one softmax over all
    branches' (branch, key) pairs. The max is only for stability (it cancels), so it is detached;
    uncovered (t, h) have every lse_i = -inf, hence weight 0 and a zero denominator, guarded.
    """
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
