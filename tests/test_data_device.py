"""Device-side preprocessing (hvfm/data/transforms/device.py): uint8 frames + crop rows from the workers,
crop / resize / normalise where the model runs; the same result as the old float path."""
import numpy as np
import pytest
import torch

from hvfm.data import Collator, build_loader, build_tokenizer, read_annotations
from hvfm.data.decode import resize_frames, decode_clip
from hvfm.data.transforms.device import (PARAMS, collate_frames, draw_params, mirror_params, prepare_batch,
                                 to_model_pixels)
from hvfm.data.transforms.host import CLIP_STD, VideoTransform
from videos import write_clip

# The old path resized on the host and rounded to uint8 before the float transform. On a CPU the
# device transform's first resize is that same uint8 call (bit-identical result); in float (as on
# a GPU) it differs by the rounding: a resize is a convex combination (antialiased bilinear
# weights are >= 0), so by at most half a uint8 step plus the integer kernel's fixed-point error,
# bounded here by one step, divided by the smallest std of the normalisation.
ROUNDING = 1.0 / 255 / min(CLIP_STD) + 1e-6


def _noise(t=5, h=45, w=70, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def _old(frames, size, train, seed, scale=(0.5, 1.0)):
    """The float path as it was: decoder-sized uint8 frames -> VideoTransform on the host."""
    sized = resize_frames(frames, size)
    return VideoTransform(size, train, scale=scale)(sized, np.random.default_rng(seed))


def _new(frames, size, train, seed, scale=(0.5, 1.0), dtype=torch.float32, first_resize="auto"):
    row, flipped = draw_params(frames.shape[1], frames.shape[2], size, train,
                               np.random.default_rng(seed), scale)
    pixels, crop, num = collate_frames([torch.from_numpy(frames)], [row])
    return to_model_pixels(pixels, crop, num, dtype, first_resize)[0], flipped


@pytest.mark.parametrize("train", [True, False])
def test_device_transform_matches_the_old_float_path(train):
    frames = _noise()
    flips = []
    for seed in range(12):
        (a, fa), (b, fb) = _old(frames, 32, train, seed), _new(frames, 32, train, seed)
        assert fa == fb  # the same draws: crop box and flip
        flips.append(fb)
        assert a.shape == b.shape == (5, 3, 32, 32)
        assert torch.equal(a, b)  # on a CPU: the old result bit for bit
        c, fc = _new(frames, 32, train, seed, first_resize="float")  # a GPU's way
        assert fc == fa and 0 < (a - c).abs().max().item() <= ROUNDING
        # Frames the decoder already sized (no first resize): bit for bit the old result.
        sized = resize_frames(frames, 32)
        c, _ = VideoTransform(32, train)(sized, np.random.default_rng(seed))
        d, _ = _new(sized, 32, train, seed)
        assert torch.equal(c, d)
    assert any(flips) == train and (not train or not all(flips))


def test_device_transform_casts_to_the_model_dtype_on_the_device():
    frames = _noise(seed=1)
    ref, _ = _new(frames, 32, True, 3)
    bf, _ = _new(frames, 32, True, 3, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    torch.testing.assert_close(bf.float(), ref, atol=0.02, rtol=0.01)
    with pytest.raises(TypeError, match="uint8"):
        to_model_pixels(torch.zeros(1, 1, 4, 4, 3), torch.zeros(1, len(PARAMS), dtype=torch.int64),
                        torch.ones(1, dtype=torch.int64))


def test_mixed_sizes_pad_and_match_one_by_one():
    clips = [_noise(5, 45, 70, 0), _noise(3, 60, 40, 1), _noise(4, 32, 32, 2)]
    rows = [draw_params(c.shape[1], c.shape[2], 24, True, np.random.default_rng(i))[0]
            for i, c in enumerate(clips)]
    pixels, crop, num = collate_frames([torch.from_numpy(c) for c in clips], rows)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 5, 60, 70, 3)
    assert num.tolist() == [5, 3, 4]
    out = to_model_pixels(pixels, crop, num)
    for i, c in enumerate(clips):
        alone = to_model_pixels(*collate_frames([torch.from_numpy(c)], [rows[i]]))
        assert torch.equal(out[i, : len(c)], alone[0])
        assert (out[i, len(c):] == 0).all()  # padded frames stay exactly 0, as before


def test_prepare_batch_replaces_pixels_and_keeps_the_keys():
    frames = _noise(2, 40, 40)
    row, _ = draw_params(40, 40, 16, False)
    pixels, crop, num = collate_frames([torch.from_numpy(frames)], [row])
    batch = {"pixels": pixels, "crop": crop, "num_frames": num, "index": torch.tensor([7])}
    out = prepare_batch(batch, torch.device("cpu"), torch.float32)
    assert set(out) == {"pixels", "num_frames", "index"}
    assert out["pixels"].shape == (1, 2, 3, 16, 16) and out["pixels"].dtype == torch.float32
    ref, _ = VideoTransform(16, False)(resize_frames(frames, 16))
    assert (out["pixels"][0] - ref).abs().max().item() <= ROUNDING


def test_mirrored_stills_are_flipped_on_the_device(tmp_path):
    """Moved from test_harvest_parts: the Collator mirrors a sample by its crop row now."""
    tok = build_tokenizer(["a red ball left", "a blue box up", "the green circle"] * 3,
                          tmp_path / "tok", vocab_size=300)
    frames = [_noise(1, 12, 12, i) for i in range(3)]
    samples = [{"pixels": torch.from_numpy(f), "crop": draw_params(12, 12, 8, True, np.random.default_rng(i))[0],
                "caption": c, "index": i, "epoch": 0, "failures": []}
               for i, (f, c) in enumerate(zip(frames, ["a red ball left", "a blue box up", "the green circle"]))]
    batch = prepare_batch(Collator(tok, mask_ratio=0.0, mirror=1.0)(samples), "cpu")
    # each still is mirrored along the axis its caption names; "the green circle" names none,
    # and a mirrored copy of it would be a second positive of its own caption: not mirrored
    assert batch["pixels"].shape[0] == 5 and batch["index"].tolist() == [0, 1, 2, 0, 1]
    orig, mirr = batch["pixels"][:2], batch["pixels"][3:]
    assert torch.equal(mirr[0], orig[0].flip(-1)) and batch["captions"][3] == "a red ball right"
    assert torch.equal(mirr[1], orig[1].flip(-2)) and batch["captions"][4] == "a blue box down"
    # a caption naming both axes is mirrored along either, drawn per sample
    both = [{**samples[0], "caption": "a red ball left up", "index": i} for i in range(40)]
    out = Collator(tok, mask_ratio=0.0, mirror=1.0)(both)
    assert sorted(set(out["captions"][40:])) == ["a red ball left down", "a red ball right up"]
    none = Collator(tok, mask_ratio=0.0, mirror=0.0)(samples)
    assert none["pixels"].shape[0] == 3
    row = samples[0]["crop"]
    assert mirror_params(mirror_params(row, False), False).tolist() == row.tolist()


def test_loader_batches_equal_the_old_float_path(tmp_path):
    """A whole loader batch through the device transform against the old host path, sample by
    sample, with the same per-sample seeds (augmentation and determinism unchanged)."""
    import csv
    from hvfm.data.loading.dataset import keyed_rng
    root = tmp_path / "videos"
    with open(tmp_path / "ann.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(4):
            write_clip(root / f"v{i}.mp4", frames=9, width=64, height=48)
            w.writerow([f"v{i}", "", "", "", f"a clip number {i}"])
    ann = read_annotations(tmp_path / "ann.csv", root)
    tok = build_tokenizer([f"a clip number {i}" for i in range(4)] * 3, tmp_path / "tok", vocab_size=300)
    batch = next(iter(build_loader(ann, tok, batch_size=4, frames=4, size=32, num_workers=0, seed=5,
                                   mask_ratio=0.0, device_transform=True)))
    assert batch["pixels"].dtype == torch.uint8
    out = prepare_batch(batch, "cpu")["pixels"]
    for k, i in enumerate(batch["index"].tolist()):
        rng = keyed_rng(5, 0, i)
        frames, _ = decode_clip(ann.resolve(i), 4, True, rng)
        ref, _ = VideoTransform(32, True)(resize_frames(frames, 32), rng)
        assert (out[k] - ref).abs().max().item() <= ROUNDING


def test_cpu_only_batches_are_transformed_in_the_worker_alike():
    """collate_clips(device_transform=False) (a CPU-only run: the worker transforms) gives the
    same pixels as the uint8 batch through prepare_batch; prepare_batch then only casts."""
    from hvfm.data.transforms.device import collate_clips
    clips = [torch.from_numpy(_noise(3, 40, 56, s)) for s in range(2)]
    rows = [draw_params(40, 56, 24, True, np.random.default_rng(s))[0] for s in range(2)]
    on_device = prepare_batch(collate_clips(clips, rows, True), "cpu", torch.bfloat16)
    in_worker = collate_clips(clips, rows, False)
    assert "crop" not in in_worker and in_worker["pixels"].dtype == torch.float32
    cast = prepare_batch(in_worker, "cpu", torch.bfloat16)
    assert cast["pixels"].dtype == torch.bfloat16 and torch.equal(cast["pixels"], on_device["pixels"])
