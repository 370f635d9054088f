"""Device-side preprocessing: loader workers send uint8 frames, the device crops, resizes and
normalises them.

A worker decodes a clip and draws its augmentation (the crop box, the flip) with the sample's own
generator, exactly the draws `transforms.VideoTransform` makes, but applies none of it: the batch
carries the uint8 frames (B, T, H, W, 3), zero-padded to the largest clip of the batch, and one
row of integers per sample (`crop`, see `PARAMS`). After `.to(device, non_blocking=True)` the
trainer and the evaluator call `to_model_pixels` (or `prepare_batch`), which, per sample,

    uint8 -> float in [0, 1] -> resize the frame to (rh, rw) -> crop (top, left, ch, cw)
          -> resize to (size, size) -> flips -> clamp -> CLIP mean/std -> model dtype

on whatever device the frames are on (a CPU run does it on the CPU). Frames arrive at the size the
decoder produced: decord decodes at the file's own size (no container probe to learn it) and the
first resize brings the short side to `size`, as the decoder's resize did before. On a CPU that
resize is torch's uint8 kernel, the one `decode._resize_frames` uses, and the result is the old
host path's (`_resize_frames` + `VideoTransform`) bit for bit; on a GPU it is float, within a uint8
step of it. Padded frames stay exactly 0, as before.

The crop parameters stay on the host (a CPU int64 tensor): reading them on the device would make
every batch wait for a copy back.
"""
from __future__ import annotations

import numpy as np
import torch

from ..decode import decode_size
from .host import CLIP_MEAN, CLIP_STD, crop_box, resize

# One row of `crop` per sample: the valid frame region (h, w) in the padded uint8 tensor, the size
# (rh, rw) the whole frame is resized to, the crop box in that resized frame, the output size, and
# the horizontal / vertical flips.
PARAMS = ("h", "w", "rh", "rw", "top", "left", "ch", "cw", "size", "hflip", "vflip")


def draw_params(height, width, size, train, rng=None, scale=(0.5, 1.0), hflip=0.5):
    """The crop row (int64 numpy, see PARAMS) of a clip whose frames are (height, width), and
    whether it is flipped. Draws from `rng` exactly what `VideoTransform` draws: the crop box in
    the frame resized to `size` on its short side, then the flip."""
    rw, rh = decode_size(width, height, size)
    flipped = False
    if train:
        if rng is None:
            raise ValueError("training-mode crops need an rng (numpy Generator)")
        top, left, ch, cw = crop_box(rh, rw, rng, scale)
        if hflip and rng.random() < hflip:
            flipped = True
    else:  # resize the short side to `size` (as resize_center_crop after the decoder), centre crop
        s = size / min(rh, rw)
        rh, rw = max(size, round(rh * s)), max(size, round(rw * s))
        top, left, ch, cw = (rh - size) // 2, (rw - size) // 2, size, size
    row = np.array([height, width, rh, rw, top, left, ch, cw, size, flipped, 0], dtype=np.int64)
    return row, flipped


def mirror_params(row, vertical):
    """The crop row of the same sample mirrored left-right (or top-bottom when `vertical`)."""
    row = np.array(row, dtype=np.int64, copy=True)
    row[PARAMS.index("vflip" if vertical else "hflip")] ^= 1
    return row


def collate_frames(frames, rows):
    """uint8 clips [(T_i, H_i, W_i, 3)] and their crop rows -> (pixels uint8 (B, T, H, W, 3)
    zero-padded, crop int64 (B, len(PARAMS)), num_frames int64 (B,))."""
    t = max(f.shape[0] for f in frames)
    h = max(f.shape[1] for f in frames)
    w = max(f.shape[2] for f in frames)
    same = all(f.shape[:3] == (t, h, w) for f in frames)
    pixels = (torch.empty if same else torch.zeros)(len(frames), t, h, w, 3, dtype=torch.uint8)
    for i, f in enumerate(frames):
        pixels[i, : f.shape[0], : f.shape[1], : f.shape[2]] = torch.as_tensor(f)
    crop = torch.as_tensor(np.stack([np.asarray(r, dtype=np.int64) for r in rows]))
    num = torch.tensor([f.shape[0] for f in frames], dtype=torch.int64)
    return pixels, crop, num


def collate_clips(frames, rows, device_transform=True):
    """{"pixels", "crop", "num_frames"} of `collate_frames` for a batch bound for a GPU; with
    device_transform=False (a CPU-only run: the device is the host) the loader worker transforms
    here and the batch holds float32 "pixels" and no "crop" (`prepare_batch` then moves and casts)."""
    pixels, crop, num = collate_frames(frames, rows)
    if not device_transform:
        return {"pixels": to_model_pixels(pixels, crop, num), "num_frames": num}
    return {"pixels": pixels, "crop": crop, "num_frames": num}


def _normalize(x):
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def to_model_pixels(pixels, crop, num_frames, dtype=torch.float32, first_resize="auto"):
    """uint8 (B, T, H, W, 3) on any device + host crop rows -> normalised (B, T, 3, S, S) in
    `dtype` on the same device; frames past num_frames[i] are 0.

    first_resize: how the whole frame is brought to (rh, rw): "uint8" (torch's integer kernel,
    rounded to uint8 as a decoder's resize was: on a CPU ~10x faster than in float, and the same
    call as `decode._resize_frames`, so the result equals the old host path bit for bit), "float"
    (no rounding; GPUs resize float only) or "auto" (uint8 on a CPU, float elsewhere). The crop's
    resize and the normalisation are float32, as before; the cast to `dtype` comes last."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"to_model_pixels expects the loader's uint8 frames, got {pixels.dtype}")
    if first_resize == "auto":
        first_resize = "uint8" if pixels.device.type == "cpu" else "float"
    if first_resize not in ("uint8", "float"):
        raise ValueError(f"first_resize must be auto, uint8 or float, got {first_resize!r}")
    rows = crop.tolist() if torch.is_tensor(crop) else [list(r) for r in crop]
    nums = num_frames.tolist() if torch.is_tensor(num_frames) else list(num_frames)
    sizes = {r[PARAMS.index("size")] for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"one output size per batch, got {sorted(sizes)}")
    size = sizes.pop()
    b, t = pixels.shape[:2]
    out = torch.empty(b, t, 3, size, size, dtype=dtype, device=pixels.device)
    for i, (row, n) in enumerate(zip(rows, nums)):
        out[i, n:] = 0
        h, w, rh, rw, top, left, ch, cw, _, hf, vf = row
        x = pixels[i, :n, :h, :w].permute(0, 3, 1, 2)  # uint8, channels-last in memory
        if first_resize == "uint8":
            x = resize(x.contiguous(memory_format=torch.channels_last), rh, rw)
            x = x[..., top:top + ch, left:left + cw].float().div_(255.0)
        else:
            x = resize(x.float().div_(255.0), rh, rw)[..., top:top + ch, left:left + cw]
        x = resize(x, size, size)
        if hf:
            x = x.flip(-1)
        if vf:
            x = x.flip(-2)
        out[i, :n] = _normalize(x.clamp_(0.0, 1.0)).to(dtype)
    return out


def prepare_batch(batch, device, dtype=torch.float32, key="pixels"):
    """Moves the batch's uint8 frames to `device` (non-blocking: pinned by the loader when on
    CUDA) and replaces them by model-ready pixels in `dtype`; the crop rows are consumed. The
    other keys are left as they are (the model moves what it needs). A batch the workers already
    transformed (no "crop": a loader built with device_transform=False, as on a CPU-only run) is
    only moved and cast."""
    pixels = batch[key].to(device, non_blocking=True)
    if "crop" not in batch:
        batch[key] = pixels.to(dtype)
        return batch
    batch[key] = to_model_pixels(pixels, batch.pop("crop"), batch["num_frames"], dtype)
    return batch
