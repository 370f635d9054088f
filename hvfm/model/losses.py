"""VTC (all-gathered InfoNCE), VTM hard-negative sampling, the caption-swap term, and the small
CE wrappers.

Identical captions: two samples whose captions are token-for-token equal are NOT negatives of
each other. In VTC their off-diagonal logits are removed from both softmax denominators (the
diagonal stays the only positive, so targets stay one-hot); in VTM they get zero sampling weight.

Distributed VTC: each rank computes the loss of its own rows against the gathered columns;
the gather's backward sums the column gradients over ranks, so after DDP/DeepSpeed's gradient
averaging the gradient is exactly that of the loss on the concatenated global batch (and the
mean of the per-rank losses equals it). Every rank must have the same local batch size.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

MAX_LOGIT_SCALE = math.log(100.0)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Losses run in at least float32 (bf16/fp16 activations under autocast are upcast)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient over ranks and keeps this slice."""

    @staticmethod
    def forward(ctx, x):
        ctx.rank, ctx.world = _world()
        parts = [torch.empty_like(x) for _ in range(ctx.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world)[ctx.rank]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` over ranks (identity on one process); differentiable."""
    return _GatherWithGrad.apply(x) if _world()[1] > 1 else x


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    rank, world = _world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def caption_keys(input_ids, lengths) -> torch.Tensor:
    """Host int64 key per caption, equal iff the real tokens are equal (up to hash collisions).

    No device sync in training: `input_ids` is the loader's host tensor (the model moves its
    own copy to the device), so `.cpu()` is a no-op there."""
    ids = input_ids.detach().cpu().numpy()
    return torch.tensor([hash(tuple(row[:n].tolist())) for row, n in zip(ids, lengths)],
                        dtype=torch.int64)


def vtc_loss(text_emb, video_emb, logit_scale, keys=None, reverse_video_emb=None):
    """Symmetric InfoNCE over the global batch. Returns (loss, local text-to-video logits (B, B)).

    `keys` (B,) caption keys on the device mask identical captions out of the denominators;
    `reverse_video_emb` (R, P), R <= B: clip i < R played backwards, one extra text-to-video
    column for text i (texts R.. have none there).
    """
    t, v = F.normalize(_wide(text_emb), dim=-1), F.normalize(_wide(video_emb), dim=-1)
    rank, _ = _world()
    B = t.shape[0]
    T_all, V_all = gather_with_grad(t), gather_with_grad(v)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    t2v, v2t = scale * t @ V_all.t(), scale * v @ T_all.t()
    labels = torch.arange(B, device=t.device) + rank * B
    if keys is not None:
        same = keys[:, None] == gather_no_grad(keys)[None, :]
        same[torch.arange(B, device=t.device), labels] = False
        t2v, v2t = t2v.masked_fill(same, -math.inf), v2t.masked_fill(same, -math.inf)
    local = t2v[:, rank * B:(rank + 1) * B].detach()
    if reverse_video_emb is not None:
        r = F.normalize(_wide(reverse_video_emb), dim=-1)
        col = torch.full((B, 1), -math.inf, device=t.device, dtype=t2v.dtype)
        col[: len(r), 0] = scale * (t[: len(r)] * r).sum(-1)
        t2v = torch.cat([t2v, col], dim=1)
    loss = (F.cross_entropy(t2v, labels) + F.cross_entropy(v2t, labels)) / 2
    return loss, local


def swap_loss(text_emb, video_emb, swap_emb, index, logit_scale):
    """The caption-swap term: caption `index[k]` against its swapped caption `swap_emb[k]`.

    text_emb, video_emb (B, P); swap_emb (>= K, P), row k the swapped caption of row index[k]
    (rows past K are ignored: the pass every rank runs when no caption has a pair); index (K,)
    int64 on the device. With s the cosine times the model's logit scale, the sum of
      - the text-text CE over [s(v_i, t_i), s(t_i, t'_i)], target the first (CE-CLIP): its
        target needs no second tower, so it moves a text tower that is blind to the words;
      - the own-row CE over [s(v_i, t_i), s(v_i, t'_i)] (VFC: the swapped caption as an extra
        negative of its own clip only),
    each a mean over the K captions of this rank. K = 0 gives 0, still joined to the graph, so
    the backward runs the same way on every rank. No host sync (K is the index's shape).
    """
    K = index.shape[0]
    if K == 0:
        return _wide(swap_emb).sum() * 0.0 + 0.0  # + 0.0: never -0 in the logs
    t = F.normalize(_wide(text_emb)[index], dim=-1)
    v = F.normalize(_wide(video_emb)[index], dim=-1)
    s = F.normalize(_wide(swap_emb[:K]), dim=-1)
    scale = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
    vt, tt, vs = scale * (v * t).sum(-1), scale * (t * s).sum(-1), scale * (v * s).sum(-1)
    target = torch.zeros(K, dtype=torch.long, device=t.device)
    return (F.cross_entropy(torch.stack([vt, tt], 1), target)
            + F.cross_entropy(torch.stack([vt, vs], 1), target))


def sample_hard_negatives(sim, positive, generator=None):
    """One hard negative per row of `sim` and per column, with p ∝ softmax(sim) over non-positives.

    sim (B, B) text-to-video logits; positive (B, B) bool (diagonal + identical captions).
    Returns (video for each text, text for each video, row has a negative, column has one);
    where no negative exists the index is arbitrary and the flag False. Gumbel-max: a positive
    can never be drawn.
    """
    def draw(s, pos):
        has = (~pos).any(1)
        logits = s.float().masked_fill(pos, -math.inf).masked_fill(~has[:, None], 0.0)
        u = torch.rand(logits.shape, device=s.device, generator=generator)
        g = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-7)))
        return (logits + g).argmax(1), has

    neg_v, ok_t = draw(sim, positive)
    neg_t, ok_v = draw(sim.t(), positive.t())
    return neg_v, neg_t, ok_t, ok_v


def vtm_loss(logits, labels):
    """2-way cross-entropy, labels 1 = matched pair."""
    return F.cross_entropy(_wide(logits), labels)


def mlm_loss(logits, labels):
    """Cross-entropy over the masked positions (logits (M, V), labels (M,)); 0 when M = 0."""
    if labels.numel() == 0:
        return _wide(logits).sum() * 0.0
    return F.cross_entropy(_wide(logits), labels)


def host_pairs(neg_v, neg_t, ok_t, ok_v, batch: int, reverse: int):
    """Host (text index, video index, label) lists for the VTM pass; costs ONE device->host sync.

    Video index `batch + i` means clip i played backwards (for the first `reverse` clips; True
    means all). Rows without a negative are dropped.

    Why the sync stays: the negatives are drawn on the device from the VTC similarities, and the
    VTM pass packs the chosen texts and clips into varlen sequences, whose cu_seqlens and
    max_seqlen the attention kernels need on the host (packed layout, no padding). Keeping the
    indices on the device would mean padding every pair to the longest clip, what the packed
    path exists to avoid. It is one small copy per step, after the VTC forward.
    """
    h = torch.stack([neg_v, neg_t, ok_t.long(), ok_v.long()]).cpu().numpy()
    r = np.arange(batch)
    texts = [r, r[h[2] == 1], h[1][h[3] == 1]]
    videos = [r, h[0][h[2] == 1], r[h[3] == 1]]
    n_rev = batch if reverse is True else int(reverse)
    if n_rev:
        texts.append(r[:n_rev])
        videos.append(r[:n_rev] + batch)
    labels = np.zeros(sum(len(x) for x in texts), np.int64)
    labels[:batch] = 1
    return np.concatenate(texts), np.concatenate(videos), labels
