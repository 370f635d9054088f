"""Video encoder inflated from CLIP's vision tower, running on packed, randomly dropped patches.

Sample i with T_i frames has N_i = T_i*Hp*Wp patches and keeps k_i of them; its sequence is
[CLS, kept patches], so `cu_seqlens_v` counts k_i + 1. Keep counts come from a host numpy RNG
(no device sync); which patches are kept is chosen on the device. Kept indices are flat within
the sample (`t*Hp*Wp + h*Wp + w`) and sorted.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Varlen, get_backend, to_device
from .blocks import Block, run_blocks


def parse_drop_ratio(spec) -> tuple[float, float] | None:
    """None -> None (keep all); 0.75 / "0.75" -> (0.75, 0.75); "0.5:0.9" or (0.5, 0.9) -> range."""
    if spec is None:
        return None
    given = spec
    if isinstance(spec, str):
        parts = spec.split(":")
        if len(parts) not in (1, 2):
            raise ValueError(f"drop ratio '{spec}' must be a number or 'lo:hi'")
        spec = tuple(float(x) for x in parts)
    lo, hi = (spec, spec) if np.isscalar(spec) else (spec[0], spec[-1])
    lo, hi = float(lo), float(hi)
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"drop ratio {given} must be in [0, 1), or a range lo:hi with "
                         f"0 <= lo <= hi < 1")
    return lo, hi


def keep_counts(num_patches, drop_ratio, rng: np.random.Generator | None = None) -> np.ndarray:
    """k_i = round((1 - r_i) * N_i) clamped to [1, N_i]; r_i fixed or uniform in the range."""
    n = np.asarray(num_patches, dtype=np.int64)
    spec = parse_drop_ratio(drop_ratio)
    if spec is None:
        return n.copy()
    lo, hi = spec
    r = np.full(len(n), lo) if lo == hi else (rng or np.random.default_rng()).uniform(lo, hi, len(n))
    return np.clip(np.rint((1.0 - r) * n).astype(np.int64), 1, np.maximum(n, 1))


@dataclass
class Keep:
    """Which patches each sample keeps: host counts; device flat indices and sample ids."""

    counts: np.ndarray  # (B,) int64, host
    keep_idx: torch.Tensor  # (sum k,) int64, flat within its sample, sorted per sample
    rows: torch.Tensor  # (sum k,) int64, sample id of each kept patch


def sample_keep(counts: np.ndarray, num_patches: np.ndarray, max_patches: int, device=None,
                generator: torch.Generator | None = None) -> Keep:
    """Choose `counts[i]` of the `num_patches[i]` patches of each sample uniformly, without a sync."""
    counts, num_patches = np.asarray(counts, np.int64), np.asarray(num_patches, np.int64)
    B, total = len(counts), int(counts.sum())
    if np.array_equal(counts, num_patches):  # keep all: indices are known on the host
        idx = np.concatenate([np.arange(n) for n in counts]) if B else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(B), counts)
        return Keep(counts, to_device(idx, device), to_device(rows, device))
    n_t, k_t = to_device(num_patches, device), to_device(counts, device)
    scores = torch.rand(B, max_patches, device=device, generator=generator)
    scores = scores.masked_fill(torch.arange(max_patches, device=device) >= n_t[:, None], float("inf"))
    order = scores.argsort(dim=1)  # valid patches first, in random order
    rows = torch.repeat_interleave(torch.arange(B, device=device), k_t, output_size=total)
    starts = torch.cumsum(k_t, 0) - k_t
    picked = order[rows, torch.arange(total, device=device) - starts[rows]]
    keys = (rows * max_patches + picked).sort().values  # sorted within each sample
    return Keep(counts, keys - rows * max_patches, rows)


def default_patch_embed(attn: str) -> str:
    """Patch embedding matching an attention backend: the fused Triton kernel with 'triton' (when
    that backend runs, not when it fell back to sdpa), 'conv' with sdpa, else 'gather'."""
    if attn == "triton" and get_backend("triton") is not get_backend("sdpa"):
        return "triton"
    return "conv" if attn == "sdpa" else "gather"


def patch_flow(before, now, after, ridge=1e-2):
    """Lucas-Kanade flow of each patch: (n, 2) velocity (x, y) in pixels per frame step that
    best explains the central time difference (after - before) / 2 by the spatial gradients of
    `now` (n, C, p, p each; channels averaged). `ridge` (per pixel) keeps flat patches at zero.
    Odd in time: swapping `before` and `after` negates it; zero when they are equal."""
    g = now.float().mean(1)
    it = (after.float() - before.float()).mean(1) / 2
    gy, gx = torch.gradient(g, dim=(1, 2))
    a, b, c = (gx * gx).sum((1, 2)), (gx * gy).sum((1, 2)), (gy * gy).sum((1, 2))
    u, v = -(gx * it).sum((1, 2)), -(gy * it).sum((1, 2))
    a, c = a + ridge * g[0].numel(), c + ridge * g[0].numel()
    det = a * c - b * b
    return torch.stack([(c * u - b * v) / det, (a * v - b * u) / det], dim=1)


class VideoEmbeddings(nn.Module):
    """Patch embedding of kept patches + spatial (CLIP) and temporal position embeddings, packed.

    With `motion`, each kept patch also gets `motion_weight` (W x 2, zero at initialisation)
    times its Lucas-Kanade flow (`patch_flow` of the same patch in frames t-1, t, t+1): the
    direction of local motion as two numbers, as two-stream video networks feed optical flow.
    Zero at initialisation (the image model exactly) and zero for a one-frame clip at any time,
    so one-frame features stay an image model's; a clip played backwards negates it. Without it
    the transformer has to compute motion from position and time embeddings (README, "How time
    gets in": a free zero-initialised 3-frame tubelet kernel learned direction faster under
    supervision but random-walked under the contrastive loss' early noisy gradients).

    All parameters are used directly in this module's forward (ZeRO-3 gathers them here).
    """

    def __init__(self, width: int, patch: int, grid: int, max_frames: int, channels: int = 3,
                 motion: bool = False):
        super().__init__()
        self.patch, self.grid = patch, grid
        self.patch_weight = nn.Parameter(torch.randn(width, channels, patch, patch) * 0.02)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.02)
        self.position_embedding = nn.Parameter(torch.randn(1 + grid * grid, width) * 0.02)
        self.temporal_embedding = nn.Parameter(torch.zeros(max_frames, width))
        self.motion_weight = nn.Parameter(torch.zeros(width, 2)) if motion else None

    def spatial_pos(self, hp: int, wp: int) -> torch.Tensor:
        """(hp*wp, W) CLIP patch position embedding, bicubic-interpolated if the grid differs."""
        pos = self.position_embedding[1:]
        if (hp, wp) == (self.grid, self.grid):
            return pos
        g = pos.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        g = F.interpolate(g, size=(hp, wp), mode="bicubic", align_corners=False)
        return g.permute(0, 2, 3, 1).reshape(hp * wp, -1)

    def forward(self, pixels, keep: Keep, vs: Varlen, frames: torch.Tensor, impl="gather",
                reverse=False):
        """pixels (B, T, C, S, S); frames (B,) device T_i. Returns (packed x, keep_idx as placed)."""
        B, T, C, S = pixels.shape[:4]
        p, W = self.patch, self.patch_weight.shape[0]
        hp = wp = S // p
        HW = hp * wp
        pixels = pixels[..., : hp * p, : wp * p].to(self.patch_weight.dtype)
        rows, idx = keep.rows, keep.keep_idx
        t, hw = idx // HW, idx % HW
        if impl == "conv":  # unfused baseline: embed every patch of every frame, then gather
            f = F.conv2d(pixels.flatten(0, 1), self.patch_weight, stride=p)  # (B*T, W, hp, wp)
            tok = f.flatten(2).transpose(1, 2).reshape(B, T * HW, W)[rows, idx]
        elif impl == "gather":  # packed: gather kept pixel patches, one matmul
            view = pixels.unflatten(3, (hp, p)).unflatten(5, (wp, p))  # (B, T, C, hp, p, wp, p)
            patches = view[rows, t, :, hw // wp, :, hw % wp, :]  # (n, C, p, p)
            tok = patches.flatten(1) @ self.patch_weight.flatten(1).t()
        elif impl == "triton":  # fused kernel: gather + matmul + position embeddings, one launch
            from kernels import patch_embed_gather
            # cu_seqlens of the kept patches alone (vs also counts one CLS per sample)
            cu = vs.cu_seqlens - torch.arange(B + 1, device=pixels.device, dtype=torch.int32)
            tok = patch_embed_gather(pixels, idx, cu, self.patch_weight, None,
                                     self.spatial_pos(hp, wp),
                                     None if reverse else self.temporal_embedding[:T])
        else:
            raise ValueError(f"unknown patch embedding '{impl}'; valid: conv, gather, triton")
        if self.motion_weight is not None:  # local flow; played backwards it changes sign
            view = pixels.unflatten(3, (hp, p)).unflatten(5, (wp, p))  # (B, T, C, hp, p, wp, p)
            hh, ww = hw // wp, hw % wp
            nxt = torch.minimum(t + 1, frames[rows] - 1)
            prv = torch.minimum((t - 1).clamp(min=0), nxt)
            flow = patch_flow(*(view[rows, f, :, hh, :, ww, :] for f in (prv, t, nxt)))
            mot = flow.to(tok.dtype) @ self.motion_weight.t()
            tok = tok - mot if reverse else tok + mot
        if reverse:  # play backwards: frame t is shown at time T_i - 1 - t
            t = frames[rows] - 1 - t
            idx = t * HW + hw
            order = (rows * (T * HW) + idx).argsort()
            tok, t, hw, idx = tok[order], t[order], hw[order], idx[order]
        if impl != "triton":
            tok = tok + self.spatial_pos(hp, wp)[hw] + self.temporal_embedding[t]
        elif reverse:  # the kernel added the spatial embedding only
            tok = tok + self.temporal_embedding[t]
        cls = (self.class_embedding + self.position_embedding[0]).expand(B, W)
        tok_pos = torch.arange(tok.shape[0], device=tok.device) + rows + 1
        x = tok.new_zeros(vs.total, W)
        x = x.index_copy(0, vs.cu_seqlens[:-1].long(), cls).index_copy(0, tok_pos, tok)
        return x, idx


@dataclass
class VideoOutput:
    embeds: torch.Tensor  # (B, P) projected CLS, not normalised
    tokens: torch.Tensor  # (total_v, W) all tokens after post-LN (CLS first in each sequence)
    varlen: Varlen  # packing of `tokens` (k_i + 1 per sample)
    keep: Keep  # the kept patches (reuse it to encode the same patches again, e.g. reversed)
    keep_idx: torch.Tensor  # flat index (in playback time) of each non-CLS token, as placed


class VideoEncoder(nn.Module):
    """CLIP ViT applied to packed [CLS, kept patches] sequences of whole clips."""

    def __init__(self, width, layers, heads, mlp_width, patch, grid, max_frames, proj_dim,
                 act="quick_gelu", eps=1e-5, attn="sdpa", patch_embed=None,
                 checkpointing=False, motion=False):
        super().__init__()
        self.attn, self.checkpointing = attn, checkpointing
        self.patch_embed = patch_embed or default_patch_embed(attn)
        self.max_frames = max_frames
        self.embeddings = VideoEmbeddings(width, patch, grid, max_frames, motion=motion)
        self.pre_layrnorm = nn.LayerNorm(width, eps=eps)
        self.layers = nn.ModuleList(Block(width, heads, mlp_width, act, eps) for _ in range(layers))
        self.post_layernorm = nn.LayerNorm(width, eps=eps)
        self.visual_projection = nn.Linear(width, proj_dim, bias=False)

    @property
    def image_size(self) -> int:
        """The frame side CLIP's position grid was made for (other sizes are interpolated)."""
        return self.embeddings.patch * self.embeddings.grid

    @classmethod
    def from_clip(cls, clip_model, max_frames: int = 16, **kw) -> "VideoEncoder":
        """Copy CLIP's vision tower + visual projection; temporal embedding (and the motion
        channel, `motion=True`) start at zero: the image model exactly."""
        c, vm = clip_model.config.vision_config, clip_model.vision_model
        enc = cls(c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                  c.patch_size, c.image_size // c.patch_size, max_frames, clip_model.projection_dim,
                  c.hidden_act, c.layer_norm_eps, **kw)
        enc.to(clip_model.visual_projection.weight.dtype)
        e = enc.embeddings
        with torch.no_grad():
            e.patch_weight.copy_(vm.embeddings.patch_embedding.weight)
            e.class_embedding.copy_(vm.embeddings.class_embedding)
            e.position_embedding.copy_(vm.embeddings.position_embedding.weight)
        enc.pre_layrnorm.load_state_dict(vm.pre_layrnorm.state_dict())
        enc.post_layernorm.load_state_dict(vm.post_layernorm.state_dict())
        for mine, theirs in zip(enc.layers, vm.encoder.layers):
            mine.load_state_dict(theirs.state_dict())
        enc.visual_projection.load_state_dict(clip_model.visual_projection.state_dict())
        return enc

    def sample(self, num_frames, frame_size: int, t_pad: int, drop_ratio=None, rng=None,
               device=None, generator=None) -> Keep:
        """Host keep counts (numpy `rng`) + device choice of patches; clips padded to `t_pad` frames."""
        hw = (frame_size // self.embeddings.patch) ** 2
        n = np.asarray(num_frames, dtype=np.int64) * hw
        return sample_keep(keep_counts(n, drop_ratio, rng), n, t_pad * hw, device, generator)

    def forward(self, pixels, num_frames, drop_ratio=None, rng=None, keep: Keep | None = None,
                reverse=False, generator=None) -> VideoOutput:
        """Encode clips. `num_frames` should be a host tensor/array (a device tensor costs a sync).

        `drop_ratio` None keeps every patch; pass `keep` to reuse another call's choice of patches.
        """
        nf = np.asarray(num_frames.cpu() if torch.is_tensor(num_frames) else num_frames, np.int64)
        B, T = pixels.shape[:2]
        if len(nf) != B or nf.min(initial=1) < 1 or nf.max(initial=0) > T:
            raise ValueError(f"num_frames {nf.tolist()} must be in [1, {T}] for each of {B} clips")
        if T > self.max_frames:
            raise ValueError(f"clip has {T} frames but the temporal embedding has {self.max_frames}")
        dev = pixels.device
        if keep is None:
            keep = self.sample(nf, pixels.shape[-1], T, drop_ratio, rng, dev, generator)
        vs = Varlen.from_lengths(keep.counts + 1, dev)
        frames = to_device(nf, dev)
        x, idx = self.embeddings(pixels, keep, vs, frames, self.patch_embed, reverse)
        x = self.pre_layrnorm(x)
        x = run_blocks(self.layers, x, vs, self.checkpointing, backend=self.attn)
        x = self.post_layernorm(x)
        embeds = self.visual_projection(x[vs.cu_seqlens[:-1].long()])
        return VideoOutput(embeds, x, vs, keep, idx)
