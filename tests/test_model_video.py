"""Token dropping, patch embedding and the packed video encoder."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hvfm.model import VideoEncoder, keep_counts, parse_drop_ratio, sample_keep  # noqa: E402
from hvfm.model.attention import Varlen  # noqa: E402
from hvfm.model.testing import tiny_clip, tiny_tokenizer  # noqa: E402

HW = 16  # tiny_clip: 32 px frames, patch 8


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(tiny_tokenizer())


def clips(num_frames, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(num_frames), max(num_frames), 3, size, size, dtype=torch.float64)
    for i, n in enumerate(num_frames):
        x[i, :n] = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    return x


def test_keep_counts_fixed_and_ranged():
    n = np.array([16, 48, 1568, 7, 1])
    assert keep_counts(n, 0.75).tolist() == [4, 12, 392, 2, 1]
    assert keep_counts(n, "0.75").tolist() == [4, 12, 392, 2, 1]
    assert keep_counts(n, None).tolist() == n.tolist()
    big = np.full(64, 1568)
    k = keep_counts(big, "0.5:0.9", np.random.default_rng(0))
    assert k.min() >= round(0.1 * 1568) and k.max() <= round(0.5 * 1568)
    assert len(set(k.tolist())) > 10  # drawn per sample
    same = keep_counts(big, (0.5, 0.9), np.random.default_rng(0))
    assert np.array_equal(k, same)  # reproducible from the host RNG
    assert parse_drop_ratio("0.5:0.9") == (0.5, 0.9)
    with pytest.raises(ValueError):
        parse_drop_ratio("0.9:0.5")
    with pytest.raises(ValueError) as e:  # the error echoes what the user wrote
        parse_drop_ratio("1.5")
    assert str(e.value).startswith("drop ratio 1.5 must") and "1.5:1.5" not in str(e.value)


def test_keep_idx_sorted_unique_in_range():
    num_patches = np.array([16, 48, 32, 16])
    counts = keep_counts(num_patches, "0.3:0.9", np.random.default_rng(1))
    torch.manual_seed(0)
    keep = sample_keep(counts, num_patches, 48)
    assert keep.keep_idx.shape[0] == counts.sum() and keep.rows.tolist() == np.repeat(
        np.arange(4), counts).tolist()
    for i, chunk in enumerate(torch.split(keep.keep_idx, counts.tolist())):
        assert (chunk.diff() > 0).all() and chunk.min() >= 0 and chunk.max() < num_patches[i]
    # all positions get picked over many draws (uniform choice, not a fixed prefix)
    seen = torch.cat([sample_keep(counts, num_patches, 48).keep_idx[:counts[0]] for _ in range(50)])
    assert len(seen.unique()) == 16


def test_eval_keeps_all(clip):
    enc = VideoEncoder.from_clip(clip, max_frames=3)
    out = enc(clips([1, 3]), torch.tensor([1, 3]))
    assert out.varlen.lengths == (17, 49)
    assert out.keep.keep_idx.tolist() == list(range(16)) + list(range(48))


@pytest.mark.parametrize("motion", [False, True])
def test_patch_embed_implementations_agree(clip, motion):
    enc = VideoEncoder.from_clip(clip, max_frames=3, motion=motion)
    with torch.no_grad():
        enc.embeddings.temporal_embedding.normal_()
        if motion:
            enc.embeddings.motion_weight.normal_()
    px, nf = clips([2, 3, 1]), np.array([2, 3, 1])
    keep = enc.sample(nf, 32, 3, "0.2:0.8", np.random.default_rng(0))
    vs = Varlen.from_lengths(keep.counts + 1)
    a, ia = enc.embeddings(px, keep, vs, torch.from_numpy(nf), impl="conv")
    b, ib = enc.embeddings(px, keep, vs, torch.from_numpy(nf), impl="gather")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(ia, ib)


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_packed_equals_padded(clip):
    """sdpa (pad + mask) and torch-varlen (packed) give the same outputs and gradients."""
    px, nf = clips([2, 3, 1]), np.array([2, 3, 1])
    results = []
    for attn, embed in (("sdpa", "conv"), ("torch-varlen", "gather")):
        enc = VideoEncoder.from_clip(clip, max_frames=3, attn=attn, patch_embed=embed)
        torch.manual_seed(3)  # same temporal embedding for both
        with torch.no_grad():
            enc.embeddings.temporal_embedding.normal_(std=0.1)
        out = enc(px, nf, "0.3:0.7", np.random.default_rng(0), generator=torch.Generator().manual_seed(1))
        (out.embeds.square().sum() + out.tokens.sin().sum()).backward()
        results.append((out, _grads(enc)))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a.embeds, b.embeds, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-10, atol=1e-12)
    assert ga.keys() == gb.keys() and "embeddings.temporal_embedding" in ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-11, msg=n)


def test_single_frame_equals_clip_vision(clip):
    enc = VideoEncoder.from_clip(clip, max_frames=2, attn="torch-varlen")
    px = clips([1, 1])
    ours = enc(px, [1, 1]).embeds
    ref = clip.get_image_features(pixel_values=px[:, 0]).pooler_output
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    # other resolution: bicubic-interpolated position embedding, as transformers does it
    px = clips([1, 1], size=48)
    ours = enc(px, [1, 1]).embeds
    ref = clip.get_image_features(pixel_values=px[:, 0], interpolate_pos_encoding=True).pooler_output
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("motion", [False, True])
def test_reverse_equals_reversed_frames(clip, motion):
    enc = VideoEncoder.from_clip(clip, max_frames=3, attn="torch-varlen", motion=motion)
    torch.manual_seed(0)
    with torch.no_grad():
        enc.embeddings.temporal_embedding.normal_()
        if motion:
            enc.embeddings.motion_weight.normal_()
    nf = np.array([3, 2])
    px = clips(nf.tolist())
    keep = enc.sample(nf, 32, 3, 0.5, np.random.default_rng(0))
    back = enc(px, nf, keep=keep, reverse=True)
    # the same clip with its frames flipped, keeping the mirrored patches
    flipped = px.clone()
    for i, n in enumerate(nf):
        flipped[i, :n] = px[i, :n].flip(0)
    t, hw = keep.keep_idx // HW, keep.keep_idx % HW
    idx = (torch.from_numpy(nf)[keep.rows] - 1 - t) * HW + hw
    order = (keep.rows * 48 + idx).argsort()
    keep2 = type(keep)(keep.counts, idx[order], keep.rows)
    ref = enc(flipped, nf, keep=keep2)
    torch.testing.assert_close(back.embeds, ref.embeds, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(back.tokens, ref.tokens, rtol=1e-10, atol=1e-12)
    assert torch.equal(back.keep_idx, keep2.keep_idx)
    fwd = enc(px, nf, keep=keep)
    assert not torch.allclose(fwd.embeds, back.embeds)


def test_checkpointing_same_grads(clip):
    px, nf = clips([2, 1]), [2, 1]
    grads = []
    for ckpt in (False, True):
        enc = VideoEncoder.from_clip(clip, max_frames=2, attn="torch-varlen", checkpointing=ckpt)
        enc(px, nf, 0.5, np.random.default_rng(0),
            generator=torch.Generator().manual_seed(0)).embeds.sum().backward()
        grads.append(_grads(enc))
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-12, atol=1e-14)


def test_motion_channel_starts_as_the_image_model_and_sees_only_time(clip):
    """Weight zero: exactly the model without the channel. Any weight: one-frame clips (no time)
    and clips whose frames are all equal are unchanged, while moving clips change (playing a
    clip backwards: test_reverse_equals_reversed_frames; the flow: test_harvest_parts)."""
    plain = VideoEncoder.from_clip(clip, max_frames=3, attn="torch-varlen")
    moving = VideoEncoder.from_clip(clip, max_frames=3, attn="torch-varlen", motion=True)
    assert moving.embeddings.motion_weight.abs().sum() == 0
    px, nf = clips([3, 2, 1]), np.array([3, 2, 1])
    torch.testing.assert_close(moving(px, nf).embeds, plain(px, nf).embeds, rtol=0, atol=0)
    with torch.no_grad():
        moving.embeddings.motion_weight.normal_()
    assert not torch.allclose(moving(px, nf).embeds[:2], plain(px, nf).embeds[:2])
    torch.testing.assert_close(moving(px[2:], nf[2:]).embeds, plain(px[2:], nf[2:]).embeds,
                               rtol=1e-12, atol=1e-12)
    still = px[:1, :1].expand(1, 3, -1, -1, -1).clone()
    torch.testing.assert_close(moving(still, [3]).embeds, plain(still, [3]).embeds,
                               rtol=1e-12, atol=1e-12)
