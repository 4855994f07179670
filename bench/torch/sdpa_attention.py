"""Dilated attention (LongNet) the way it is written today with PyTorch 2.x: for each branch and each
head offset, gather the grid rows of every segment into a contiguous batch, run PyTorch's fused
flash-attention kernel on it (the CPU one, `aten::_scaled_dot_product_flash_attention_for_cpu`, the
kernel behind `scaled_dot_product_attention` there, which also returns the log-sum-exp), scatter the
rows back, and merge the branches by their log-sum-exp (merge_branches, as in dilated_attention.py).
No scores are materialised. Needs PyTorch >= 2.2 (scripts/torch-venv.sh installs a current one).

The same function as dilated_attention.dilated_attention (docs/attention-contract.md) for both branch
kinds, per-head offsets, ragged last segments and causal masking; no relative-position bias and no
dropout (the fused kernel takes neither in this form).

The merge needs the gradient of each branch's log-sum-exp, which the fused kernel's autograd does not
give; FlashWithLse adds it exactly with one backward call (see its backward).
"""
import math

import torch

from dilated_attention import KEY_DILATED, branches, merge_branches, parse_schedule

__all__ = ["dilated_attention_sdpa"]


class FlashWithLse(torch.autograd.Function):
    """(o, lse) of softmax attention on [Bx, H, L, D] inputs, both differentiable.

    d lse_i / d s_ij = P_ij, so an lse gradient g adds g_i P_ij to dS_ij = P_ij (dP_ij - delta_i),
    which is delta_i lowered by g_i. The fused backward computes delta_i = dO_i . O_i from the `out` it
    is given, so it gets O_i - g_i dO_i / |dO_i|^2 instead: the same dS, in one call at the kernel's
    own head dimension. That needs g_i = 0 wherever dO_i = 0, which holds for the lse gradients
    merge_branches passes back (g_i = w_i dO_i . (o_i - o), w_i the branch's weight); a row with
    dO_i = 0 and g_i != 0 is refused.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        do = do.contiguous()
        if dlse is not None:
            norm2 = (do * do).sum(-1)
            if bool(((norm2 == 0) & (dlse != 0)).any()):
                raise ValueError("FlashWithLse: an lse gradient on a row whose output gradient is 0")
            o = o - (dlse / torch.where(norm2 > 0, norm2, torch.ones_like(norm2)))[..., None] * do
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def _batched(x):
    """[B, S, n, Hg, D] -> [B*S, Hg, n, D], contiguous (the gather)."""
    B, S, n, Hg, D = x.shape
    return x.permute(0, 1, 3, 2, 4).reshape(B * S, Hg, n, D)


def _unbatched(o, lse, B, S):
    """[B*S, Hg, n, D], [B*S, Hg, n] -> [B, S, n, Hg, D], [B, S, n, Hg]."""
    _, Hg, n, D = o.shape
    return o.view(B, S, Hg, n, D).transpose(2, 3), lse.view(B, S, Hg, n).transpose(2, 3)


def _segments(q, k, v, r, kind, causal, scale, H):
    """One branch on whole segments: q, k, v [B, S, L, H, D] (S segments of L rows) -> o, lse in the
    same layout, lse -inf (and o 0) where the branch gives a query no key."""
    B, S, L, _, D = q.shape
    o = q.new_zeros(B, S, L, H, D)
    lse = q.new_full((B, S, L, H), -math.inf)
    for off in range(min(r, H, L)):  # heads off, off + r, ... see the grid rows off, off + r, ...
        kg, vg = (_batched(x[:, :, off::r, off::r]) for x in (k, v))
        if kind != KEY_DILATED:
            og, lg = FlashWithLse.apply(_batched(q[:, :, off::r, off::r]), kg, vg, causal, scale)
            o[:, :, off::r, off::r], lse[:, :, off::r, off::r] = _unbatched(og, lg, B, S)
        elif not causal:
            og, lg = FlashWithLse.apply(_batched(q[:, :, :, off::r]), kg, vg, False, scale)
            o[:, :, :, off::r], lse[:, :, :, off::r] = _unbatched(og, lg, B, S)
        else:
            # Queries by residue c mod r: row c + m'r sees grid key off + mr iff m <= m' (c >= off) or
            # m <= m' - 1 (c < off), so each class is top-left causal attention, the second one from
            # its second query on (its first has no key).
            for c in range(min(r, L)):
                first = c if c >= off else c + r
                if first >= L:
                    continue
                og, lg = FlashWithLse.apply(_batched(q[:, :, first::r, off::r]), kg, vg, True, scale)
                o[:, :, first::r, off::r], lse[:, :, first::r, off::r] = _unbatched(og, lg, B, S)
    return o, lse


def dilated_attention_sdpa(q, k, v, schedule, causal=False, scale=None):
    """q, k, v [B, N, H, D] float32; schedule "w:r,w:rk,..." or [(w, r) or (w, r, kind), ...].

    Returns (o [B, N, H, D], lse [B, H, N]) like dilated_attention.dilated_attention; o is
    differentiable in q, k and v.
    """
    schedule = parse_schedule(schedule) if isinstance(schedule, str) else branches(schedule)
    B, N, H, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    outs, lses = [], []
    for w, r, kind in schedule:
        w = min(w, N)
        full = N // w * w  # the whole segments, then the ragged last one (its own length, no padding)
        parts = [(0, full, w)] + ([(full, N, N - full)] if full < N else [])
        o_parts, lse_parts = [], []
        for lo, hi, L in parts:
            seg = [x[:, lo:hi].reshape(B, (hi - lo) // L, L, H, D) for x in (q, k, v)]
            o, lse = _segments(*seg, r, kind, causal, scale, H)
            o_parts.append(o.reshape(B, hi - lo, H, D))
            lse_parts.append(lse.reshape(B, hi - lo, H))
        outs.append(torch.cat(o_parts, 1))
        lses.append(torch.cat(lse_parts, 1))
    return merge_branches(outs, lses)
