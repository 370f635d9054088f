"""Pre-LN transformer blocks on packed tokens, parameter-compatible with HF `CLIPEncoderLayer`.

Parameter names follow transformers' CLIP (layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2,
mlp.fc1/fc2), so `Block.load_state_dict(hf_layer.state_dict())` copies a CLIP layer. The fusion
block adds `cross_norm` + `cross_attn` (text queries, video keys) between attention and MLP.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from .attention import Varlen, attention


class Attention(nn.Module):
    """Multi-head self-attention over packed rows. Its projections also serve the fusion's
    cross-attention, which applies them itself (fusion.FusionBlock: K/V once per clip)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} not divisible by heads {heads}"
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, xs: Varlen, causal=False, backend="sdpa"):
        h = self.heads
        q = self.q_proj(x).unflatten(-1, (h, -1))
        k = self.k_proj(x).unflatten(-1, (h, -1))
        v = self.v_proj(x).unflatten(-1, (h, -1))
        o = attention(q, k, v, xs.cu_seqlens, xs.cu_seqlens, xs.max_seqlen, xs.max_seqlen,
                      causal=causal, backend=backend, seqlens_q=xs.lengths, seqlens_k=xs.lengths)
        return self.out_proj(o.flatten(-2))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str = "quick_gelu"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.act, self.act_name = ACT2FN[act], act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x += attn(ln1 x); x += mlp(ln2 x). With `cross` it also holds the `cross_norm` and
    `cross_attn` that fusion.FusionBlock's forward applies between the two."""

    def __init__(self, width: int, heads: int, mlp_width: int, act: str = "quick_gelu",
                 eps: float = 1e-5, cross: bool = False):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=eps)
        self.self_attn = Attention(width, heads)
        if cross:
            self.cross_norm = nn.LayerNorm(width, eps=eps)
            self.cross_attn = Attention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = MLP(width, mlp_width, act)

    def forward(self, x, xs: Varlen, causal=False, backend="sdpa"):
        x = x + self.self_attn(self.layer_norm1(x), xs, causal=causal, backend=backend)
        return x + self.mlp(self.layer_norm2(x))


def run_blocks(blocks, x, xs: Varlen, checkpointing=False, **kw):
    """Apply blocks in order; with `checkpointing` each block's activations are recomputed."""
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, xs, use_reentrant=False, **kw)
        else:
            x = blk(x, xs, **kw)
    return x
