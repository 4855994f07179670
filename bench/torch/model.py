"""dilatron's TransformerLM (lib/lm/model.cpp) as a torch.nn.Module with the same parameter names,
so a dilatron HDF5 checkpoint loads with load_state_dict(strict=True): byte embedding `tok`, pre-LN
blocks `blocks.<l>` (ln1, attn.qkv fused, XPOS/rotary, dilated attention, attn.proj, ln2, fc, erf
GELU, fc_out), final `ln_f`, head tied to `tok.weight` unless model.tie_embeddings = false.

Attention dropout (Philox bits inside dilatron's op) is not reproduced: a model with attn_dropout > 0
raises in training mode (evaluation never drops, so checkpoints of such runs still load and score).
"""
import math
import tomllib
from dataclasses import dataclass, field

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dilated_attention import dilated_attention, parse_schedule


@dataclass
class ModelConfig:  # dilatron::ModelConfig's defaults (model.h), which a stored config may omit
    vocab_size: int = 259
    seq_len: int = 2048
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    d_ff: int = 512
    dropout: float = 0.0
    attn_dropout: float = 0.0
    positional: str = "xpos"
    xpos_scale_base: float = 512.0
    rel_pos_bias: bool = False
    bias_buckets: int = 32
    bias_max_distance: int = 128
    tie_embeddings: bool = True
    init_std: float = 0.02
    layer_schedules: list = field(default_factory=list)
    # The twin's own choice, not dilatron's: "einsum" (dilated_attention.py, any feature) or "sdpa"
    # (sdpa_attention.py, PyTorch >= 2.2's fused kernel; no bias).
    attention_impl: str = "einsum"


def geometric_schedule(w0, ratio, n):
    """LongNet's w_k = w0 ratio^k, r_k = ratio^k while w_k < n, then one branch capped at n (model.cpp)."""
    s, w, r = [], w0, 1
    while True:
        seg = min(w, n)
        s.append((seg, min(r, seg)))
        if w >= n or len(s) == 16:
            return s
        w, r = w * ratio, r * ratio


def config_from_toml(text):
    """(ModelConfig, the whole TOML dict) from a dilatron config's text, with config.cpp's defaults."""
    doc = tomllib.loads(text)
    m, a = doc.get("model", {}), doc.get("attention", {})
    c = ModelConfig(**{k: m[k] for k in m})
    if "schedule" in a:
        c.layer_schedules = [parse_schedule(a["schedule"])] * c.n_layers
    else:
        gen = a.get("generator")
        w0, ratio = a.get("w0", 256), a.get("ratio", 4)
        local = [(min(a.get("local_segment", 256), c.seq_len), 1)]
        if gen not in ("geometric", "local_then_dilated"):
            raise ValueError(f"attention: need schedule or generator, got {a}")
        c.layer_schedules = [local if gen == "local_then_dilated" and l < a.get("local_layers", 1)
                             else geometric_schedule(w0, ratio, c.seq_len) for l in range(c.n_layers)]
    for l, text in a.get("layers", {}).items():
        c.layer_schedules[int(l)] = parse_schedule(text)
    return c, doc


class RotaryEmbedding(nn.Module):
    """Rotary or XPOS on interleaved pairs (x[2i], x[2i+1]); tables computed in float64 and cast,
    as dilatron does (RotaryEmbedding::tables), cached per (length, dtype, device)."""

    def __init__(self, kind, head_dim, scale_base):
        super().__init__()
        self.kind, self.head_dim, self.scale_base, self.cache = kind, head_dim, scale_base, {}

    def tables(self, n, dtype, device):
        key = (n, dtype, device)
        if key not in self.cache:
            d = float(self.head_dim)
            i = torch.arange(self.head_dim // 2, dtype=torch.float64)
            t = torch.arange(n, dtype=torch.float64)[:, None]
            angle = t * torch.pow(10000.0, -2.0 * i / d)
            scale = torch.ones_like(angle)
            if self.kind == "xpos":
                zeta = (2.0 * i + 0.4 * d) / (1.4 * d)
                scale = torch.pow(zeta, (t + math.floor(-n / 2.0)) / self.scale_base)
                fmin, fmax = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
                if not bool(((scale > fmin) & (scale < fmax) & (1 / scale > fmin) & (1 / scale < fmax)).all()):
                    raise ValueError(f"xpos: sequence length {n} with scale_base {self.scale_base} leaves float32's "
                                     "range; use a larger xpos_scale_base or positional = 'rotary'")
            cos, sin = torch.cos(angle), torch.sin(angle)
            self.cache[key] = tuple(x.to(dtype=dtype, device=device)
                                    for x in (scale * cos, scale * sin, cos / scale, sin / scale))
        return self.cache[key]

    def forward(self, x, is_key):  # x [B, N, H, D]
        cq, sq, ck, sk = self.tables(x.shape[1], x.dtype, x.device)
        c, s = ((ck, sk) if is_key else (cq, sq))
        c, s = c[:, None, :], s[:, None, :]  # [N, 1, D/2]
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)


class DilatedSelfAttention(nn.Module):
    def __init__(self, c, schedule):
        super().__init__()
        self.c, self.schedule, self.n_heads = c, schedule, c.n_heads
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.proj = nn.Linear(c.d_model, c.d_model)
        if c.rel_pos_bias:
            self.rel_bias = nn.Parameter(torch.zeros(c.n_heads, c.bias_buckets))
        self.rotary = RotaryEmbedding(c.positional, c.d_model // c.n_heads, c.xpos_scale_base) \
            if c.positional != "none" else None

    def forward(self, x):
        B, N, E = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, E // self.n_heads).unbind(2)
        if self.rotary is not None:
            q, k = self.rotary(q, False), self.rotary(k, True)
        if self.training and self.c.attn_dropout > 0:
            raise NotImplementedError("attention dropout (Philox bits) is not part of the torch twin")
        if self.c.attention_impl == "sdpa":
            if self.c.rel_pos_bias:
                raise NotImplementedError("the sdpa twin has no relative-position bias (use attention_impl einsum)")
            from sdpa_attention import dilated_attention_sdpa  # needs PyTorch >= 2.2
            o, _ = dilated_attention_sdpa(q, k, v, self.schedule, causal=True)
        else:
            o, _ = dilated_attention(q, k, v, self.schedule, causal=True, bias=getattr(self, "rel_bias", None),
                                     bias_num_buckets=self.c.bias_buckets, bias_max_distance=self.c.bias_max_distance)
        return self.proj(o.reshape(B, N, E))


class TransformerBlock(nn.Module):
    def __init__(self, c, schedule):
        super().__init__()
        self.ln1 = nn.LayerNorm(c.d_model, eps=1e-5)
        self.attn = DilatedSelfAttention(c, schedule)
        self.ln2 = nn.LayerNorm(c.d_model, eps=1e-5)
        self.fc = nn.Linear(c.d_model, c.d_ff)
        self.fc_out = nn.Linear(c.d_ff, c.d_model)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x):
        h = x + self.drop(self.attn(self.ln1(x)))
        return h + self.drop(self.fc_out(F.gelu(self.fc(self.ln2(h)))))  # erf GELU, as ops.h's default


class TransformerLM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.tok = nn.Embedding(c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(c, s) for s in c.layer_schedules)
        self.ln_f = nn.LayerNorm(c.d_model, eps=1e-5)
        self.head = None if c.tie_embeddings else nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self):
        """GPT-2 initialisation as dilatron's (not its random numbers): N(0, init_std), biases zero,
        residual projections scaled by 1/sqrt(2 n_layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias") or "ln" in name:
                continue
            resid = name.endswith(("attn.proj.weight", "fc_out.weight"))
            nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layers) if resid else std)

    def forward(self, tokens):  # int64 [B, T] -> logits [B, T, vocab]
        x = self.drop(self.tok(tokens))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return self.head(x) if self.head is not None else x @ self.tok.weight.t()

    def loss(self, batch):
        """batch int64 [B, T + 1]: mean cross-entropy of columns 1..T given 0..T-1 over all B*T targets
        (TransformerLM::loss)."""
        logits = self.forward(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def load_checkpoint(path):
    """A dilatron checkpoint -> (TransformerLM in eval mode, the stored config as a dict).

    Parameters come from /model/<name> in their stored dtype (train.dtype); the architecture from the
    TOML text in the file's `config` attribute (docs/checkpoints.md)."""
    with h5py.File(path, "r") as f:
        text = f.attrs["config"]
        text = text.decode() if isinstance(text, bytes) else text
        names = []
        f["model"].visit(lambda n: names.append(n) if isinstance(f["model"][n], h5py.Dataset) else None)
        state = {n: torch.from_numpy(np.asarray(f["model"][n][()])) for n in names}
    c, doc = config_from_toml(text)
    model = TransformerLM(c).to(next(iter(state.values())).dtype)
    model.load_state_dict(state, strict=True)  # exactly dilatron's names and shapes, nothing missing or extra
    return model.eval(), doc
