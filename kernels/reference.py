"""Pure-torch references for the kernels, computing in the dtype they are given (run them in
float64 for ground truth, at the input precision for the error a plain torch version makes).
Differentiable, small inputs only (attention builds a dense total_q x total_k mask)."""
from __future__ import annotations

import torch


def _segments(cu: torch.Tensor, total: int):
    """Sequence id and position within it of each packed row."""
    rows = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu[1:].long(), rows, right=True)
    return seg, rows - cu.long()[seg]


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                         max_seqlen_k=None, *, causal=False, softmax_scale=None):
    """Same contract as `kernels.varlen_attention` (max_seqlen_* unused)."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    seg_q, pos_q = _segments(cu_seqlens_q, q.shape[0])
    seg_k, pos_k = _segments(cu_seqlens_k, k.shape[0])
    len_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()[seg_q]
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()[seg_q]
    ok = seg_q[:, None] == seg_k[None, :]
    if causal:  # bottom-right: j <= i + Lk - Lq
        ok = ok & (pos_k[None, :] <= (pos_q + len_k - len_q)[:, None])
    has_key = ok.any(-1, keepdim=True)
    s = torch.einsum("ihd,jhd->hij", q, k) * scale
    # rows without any key attend everywhere (finite softmax, finite grads) and are zeroed after
    s = s.masked_fill(~(ok | ~has_key), float("-inf"))
    p = torch.softmax(s, -1)
    return torch.einsum("hij,jhd->ihd", p, v) * has_key[:, :, None].to(q.dtype)


def patch_grid(pixels, keep_idx, cu_seqlens, patch: int):
    """Sample id, frame and in-frame patch index of each kept patch, and its (n, C*p*p) pixels."""
    B, T, C, S_h, S_w = pixels.shape
    hp, wp = S_h // patch, S_w // patch
    rows, _ = _segments(cu_seqlens, keep_idx.shape[0])
    idx = keep_idx.long()
    t, hw = idx // (hp * wp), idx % (hp * wp)
    view = pixels[..., : hp * patch, : wp * patch]
    view = view.unflatten(3, (hp, patch)).unflatten(5, (wp, patch))  # (B, T, C, hp, p, wp, p)
    patches = view[rows, t, :, hw // wp, :, hw % wp, :]  # (n, C, p, p)
    return rows, t, hw, patches.flatten(1)


def patch_embed_gather_ref(pixels, keep_idx, cu_seqlens, weight, bias=None, pos_spatial=None,
                           pos_temporal=None):
    """Same contract as `kernels.patch_embed_gather`; computes in weight's dtype."""
    _, t, hw, patches = patch_grid(pixels, keep_idx, cu_seqlens, weight.shape[-1])
    tok = patches.to(weight.dtype) @ weight.flatten(1).t()
    if bias is not None:
        tok = tok + bias
    if pos_spatial is not None:
        tok = tok + pos_spatial[hw]
    if pos_temporal is not None:
        tok = tok + pos_temporal[t]
    return tok
