"""Fusion encoder: text tokens self-attend (bidirectional) and cross-attend to the video tokens of
their own pair; MLM head (tied to the text token embedding) and VTM head on the last (EOT) token, or the first.

Sequence i of the text packing is paired with sequence i of the video packing, so query and key
lengths differ per pair (`cu_seqlens_q != cu_seqlens_k`). VTM pairs one clip with several texts
(its positive and hard negatives): with `video_index` the video tokens are mapped into the
fusion width and through each layer's cross-attention K/V projections once per distinct clip,
and only the projected K/V rows are gathered per pair.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from transformers.activations import ACT2FN

from .attention import Varlen, attention, gather_sequences, sequence_rows
from .blocks import Block, run_blocks


def _init_fresh(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class MLMHead(nn.Module):
    """dense -> gelu -> LN -> decoder (weight tied to the token embedding, own bias)."""

    def __init__(self, width: int, text_width: int, vocab: int, eps: float = 1e-5):
        super().__init__()
        self.dense = nn.Linear(width, text_width)
        self.act = ACT2FN["gelu"]
        self.norm = nn.LayerNorm(text_width, eps=eps)
        self.decoder = nn.Linear(text_width, vocab)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x):
        return self.decoder(self.norm(self.act(self.dense(x))))


class FusionBlock(Block):
    """A `Block` with cross-attention whose K/V rows may repeat memory rows: `mem` holds each
    clip once, `mem_rows` (int64, one per K/V row; None = every row in order) says which memory
    row each K/V row of the packing `mems` is. K/V are projected on `mem`, then gathered."""

    def __init__(self, width, heads, mlp_width, act="quick_gelu", eps=1e-5):
        super().__init__(width, heads, mlp_width, act, eps, cross=True)

    def forward(self, x, xs: Varlen, causal=False, backend="sdpa", mem=None, mems=None,
                mem_rows=None):
        x = x + self.self_attn(self.layer_norm1(x), xs, causal=causal, backend=backend)
        x = x + self._cross(self.cross_norm(x), xs, mem, mems, mem_rows, backend)
        return x + self.mlp(self.layer_norm2(x))

    def _cross(self, x, xs: Varlen, mem, mems: Varlen, mem_rows, backend):
        a = self.cross_attn
        q = a.q_proj(x).unflatten(-1, (a.heads, -1))
        k, v = a.k_proj(mem), a.v_proj(mem)  # once per distinct clip
        if mem_rows is not None:
            k, v = k[mem_rows], v[mem_rows]
        k, v = k.unflatten(-1, (a.heads, -1)), v.unflatten(-1, (a.heads, -1))
        o = attention(q, k, v, xs.cu_seqlens, mems.cu_seqlens, xs.max_seqlen, mems.max_seqlen,
                      backend=backend, seqlens_q=xs.lengths, seqlens_k=mems.lengths)
        return a.out_proj(o.flatten(-2))


class FusionEncoder(nn.Module):
    """L_f pre-LN blocks of self-attention, cross-attention to video, MLP; then a final LN."""

    def __init__(self, width, layers, heads, mlp_width, text_width, video_width, vocab,
                 act="quick_gelu", eps=1e-5, attn="sdpa", checkpointing=False, vtm_token="last"):
        super().__init__()
        if vtm_token not in ("first", "last"):
            raise ValueError(f"vtm_token {vtm_token!r}: choose 'first' or 'last'")
        self.attn, self.checkpointing, self.vtm_token = attn, checkpointing, vtm_token
        self.text_in = nn.Linear(text_width, width) if text_width != width else nn.Identity()
        self.video_in = nn.Linear(video_width, width)
        self.layers = nn.ModuleList(FusionBlock(width, heads, mlp_width, act, eps)
                                    for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)
        self.mlm_head = MLMHead(width, text_width, vocab, eps)
        self.vtm_head = nn.Linear(width, 2)
        _init_fresh(self)

    @classmethod
    def from_text(cls, text, video_width: int, layers: int = 2, width: int | None = None,
                  heads: int | None = None, mlp_ratio: float | None = None, **kw) -> "FusionEncoder":
        """Build next to a `TextEncoder`: self-attn/MLP/LNs copied from its last `layers` blocks
        where shapes match (cross-attention and maps are fresh); MLM decoder tied to its embedding."""
        tw = text.token_embedding.embedding_dim
        ref = text.layers[-1]
        width = width or tw
        heads = heads or ref.self_attn.heads
        mlp = int(width * mlp_ratio) if mlp_ratio else ref.mlp.fc1.out_features * width // tw
        fus = cls(width, layers, heads, mlp, tw, video_width, text.token_embedding.num_embeddings,
                  ref.mlp.act_name, ref.layer_norm1.eps, **kw)
        fus.to(text.token_embedding.weight.dtype)
        src = list(text.layers)[-layers:]
        for blk, s in zip(fus.layers[len(fus.layers) - len(src):], src):
            theirs = s.state_dict()
            # cross-attention starts as a copy of the block's self-attention (and its norm), a
            # trained map at the width's scale: fresh layers at std 0.02 chained four deep
            # (video_in, k/v, out) made the video's share of the fusion ~1% of the text's and
            # its gradient as small, so VTM and MLM learned from the text alone
            theirs.update({k.replace("self_attn.", "cross_attn.").replace("layer_norm1.", "cross_norm."): v
                           for k, v in s.state_dict().items() if k.startswith(("self_attn.", "layer_norm1."))})
            with torch.no_grad():
                for name, p in blk.state_dict().items():
                    if name in theirs and theirs[name].shape == p.shape:
                        p.copy_(theirs[name])
        with torch.no_grad():  # variance-preserving map of the video tokens into the fusion width
            nn.init.normal_(fus.video_in.weight, std=video_width ** -0.5)
        if text.final_layer_norm.weight.shape == fus.final_layer_norm.weight.shape:
            fus.final_layer_norm.load_state_dict(text.final_layer_norm.state_dict())
        fus.mlm_head.decoder.weight = text.token_embedding.weight  # tied (shared Parameter)
        return fus

    def forward(self, text_x, ts: Varlen, video_x, vs: Varlen, video_index=None):
        """text_x (total_t, text W) and video_x (total_v, video W). Pair i is text sequence i
        with video sequence i, or with video sequence `video_index[i]` when given (host ints,
        repeats allowed: each clip's video tokens are projected once however many texts it
        pairs with; the result equals gathering the clips first)."""
        rows = None
        if video_index is not None:
            idx = np.asarray(video_index, np.int64)
            if idx.shape != (ts.batch,) or (idx.size and not 0 <= idx.min() <= idx.max() < vs.batch):
                raise ValueError(f"video_index needs one index in [0, {vs.batch}) per text "
                                 f"sequence ({ts.batch}); got shape {idx.shape}")
            used, inverse = np.unique(idx, return_inverse=True)
            if len(used) < vs.batch:  # clips no pair uses: not projected at all
                video_x, vs = gather_sequences(video_x, vs, used)
            rows, vs = sequence_rows(vs, inverse, video_x.device)
        x = self.text_in(text_x)
        mem = self.video_in(video_x)
        x = run_blocks(self.layers, x, ts, self.checkpointing, backend=self.attn, mem=mem, mems=vs,
                       mem_rows=rows)
        return self.final_layer_norm(x)

    def vtm_logits(self, h, ts: Varlen):
        """(B, 2) match logits from one token of each text sequence: its last (the caption's EOT,
        which CLIP's causal text tower made the summary of the caption) or its first (BOS, which
        that tower leaves the same for every caption; it learns the caption only in the fusion)."""
        where = ts.cu_seqlens[1:] - 1 if self.vtm_token == "last" else ts.cu_seqlens[:-1]
        return self.vtm_head(h[where.long()])

