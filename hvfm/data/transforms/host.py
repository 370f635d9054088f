"""Video transforms on torch tensors (no torchvision): one crop for all frames of a clip.

Training: random resized crop (area scale 0.5-1, aspect 3/4-4/3) + horizontal flip.
Evaluation: resize the short side, centre crop. Both end with CLIP's mean/std normalisation.
Input: uint8 frames (T, H, W, 3); output: float32 (T, 3, size, size).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_float(frames):
    """uint8 (T, H, W, 3) numpy or tensor -> float32 (T, 3, H, W) in [0, 1]."""
    x = torch.as_tensor(frames)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x, mean=CLIP_MEAN, std=CLIP_STD):
    mean = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - mean) / std


def resize(x, h, w):
    """x (..., H, W) float or uint8 resized to (h, w): bilinear, antialiased (F.interpolate)."""
    if x.shape[-2:] == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)


def crop_box(height, width, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, h, w) of a random crop with area in `scale` and aspect in `ratio`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Fallback: the largest centred crop whose aspect is within range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(x, size, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    top, left, h, w = crop_box(x.shape[-2], x.shape[-1], rng, scale, ratio)
    return resize(x[..., top:top + h, left:left + w], size, size)


def resize_center_crop(x, size):
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = resize(x, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


class VideoTransform:
    """Callable: (uint8 frames, rng) -> (float32 (T, 3, size, size), flipped: bool)."""

    def __init__(self, size, train, hflip=0.5, scale=(0.5, 1.0)):
        self.size, self.train, self.hflip, self.scale = size, train, hflip, scale

    def __call__(self, frames, rng=None):
        x = to_float(frames)
        flipped = False
        if self.train:
            x = random_resized_crop(x, self.size, rng, self.scale)
            if self.hflip and rng.random() < self.hflip:
                x, flipped = x.flip(-1), True
        else:
            x = resize_center_crop(x, self.size)
        return normalize(x.clamp_(0.0, 1.0)).contiguous(), flipped


def pixel_range():
    """Lowest and highest value a normalised pixel can take, per channel, as numpy arrays."""
    mean, std = np.array(CLIP_MEAN), np.array(CLIP_STD)
    return (0 - mean) / std, (1 - mean) / std
