"""CLIP's text tower on packed captions: causal blocks, final LN, EOT pooling, projection."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from .attention import Varlen, to_device
from .blocks import Block, run_blocks


def host_lengths(attention_mask) -> np.ndarray:
    """Caption lengths from a right-padded mask (a device mask costs one host sync)."""
    return attention_mask.detach().sum(1).cpu().numpy().astype(np.int64)


def packed_index(lengths, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Host flat indices into a `(B, row_len)` tensor of the real tokens, and their positions."""
    lengths = np.asarray(lengths, np.int64)
    pos = np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    return rows * row_len + pos, pos


@dataclass
class TextOutput:
    embeds: torch.Tensor  # (B, P) projected EOT state, not normalised
    tokens: torch.Tensor  # (total_t, W) every real token after the final LN
    varlen: Varlen


class TextEncoder(nn.Module):
    """CLIP text transformer over packed tokens; pooled at each caption's last real token (EOS)."""

    def __init__(self, vocab, width, layers, heads, mlp_width, max_positions, proj_dim,
                 act="quick_gelu", eps=1e-5, attn="sdpa", checkpointing=False):
        super().__init__()
        self.attn, self.checkpointing = attn, checkpointing
        self.token_embedding = nn.Embedding(vocab, width)
        self.position_embedding = nn.Embedding(max_positions, width)
        self.layers = nn.ModuleList(Block(width, heads, mlp_width, act, eps) for _ in range(layers))
        self.final_layer_norm = nn.LayerNorm(width, eps=eps)
        self.text_projection = nn.Linear(width, proj_dim, bias=False)

    @classmethod
    def from_clip(cls, clip_model, **kw) -> "TextEncoder":
        """Copy CLIP's text tower and text projection."""
        c, tm = clip_model.config.text_config, clip_model.text_model
        vocab = tm.embeddings.token_embedding.num_embeddings
        enc = cls(vocab, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                  c.intermediate_size, c.max_position_embeddings, clip_model.projection_dim,
                  c.hidden_act, c.layer_norm_eps, **kw)
        enc.to(clip_model.text_projection.weight.dtype)
        enc.token_embedding.load_state_dict(tm.embeddings.token_embedding.state_dict())
        enc.position_embedding.load_state_dict(tm.embeddings.position_embedding.state_dict())
        for mine, theirs in zip(enc.layers, tm.encoder.layers):
            mine.load_state_dict(theirs.state_dict())
        enc.final_layer_norm.load_state_dict(tm.final_layer_norm.state_dict())
        enc.text_projection.load_state_dict(clip_model.text_projection.state_dict())
        return enc

    def forward(self, input_ids, lengths) -> TextOutput:
        """input_ids (B, L) right-padded on the compute device; `lengths` host ints, each >= 1."""
        lengths = np.asarray(lengths, np.int64)
        if lengths.min(initial=1) < 1:
            raise ValueError("every caption needs at least one token (BOS ... EOS)")
        if lengths.max(initial=0) > self.position_embedding.num_embeddings:
            raise ValueError(f"caption of {lengths.max()} tokens exceeds "
                             f"{self.position_embedding.num_embeddings} positions")
        dev = input_ids.device
        flat, pos = packed_index(lengths, input_ids.shape[1])
        ts = Varlen.from_lengths(lengths, dev)
        ids = input_ids.reshape(-1)[to_device(flat, dev)]
        x = self.token_embedding(ids) + self.position_embedding(to_device(pos, dev))
        x = run_blocks(self.layers, x, ts, self.checkpointing, causal=True, backend=self.attn)
        x = self.final_layer_norm(x)
        embeds = self.text_projection(x[ts.cu_seqlens[1:].long() - 1])
        return TextOutput(embeds, x, ts)
