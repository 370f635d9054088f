"""The parts the harvest adds: parameter groups, reversed negatives for a fraction of the batch,
VTM negative hardness, mirrored stills, the flow of the motion channel, old exports' defaults."""
import numpy as np
import pytest
import torch

from hvfm.data.text.tokens import place_axes, swap_left_right, swap_top_bottom
from hvfm.model import VideoLanguageModel, sample_hard_negatives
from hvfm.model.losses import host_pairs, vtc_loss
from hvfm.model.model import reverse_count
from hvfm.model.testing import tiny_batch, tiny_clip, tiny_tokenizer
from hvfm.model.video import patch_flow
from hvfm.optim import FRESH_FUSION, TIME_PARAMS, param_groups


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _model(tok, **kw):
    torch.manual_seed(0)
    return VideoLanguageModel.from_clip(tiny_clip(tok, dtype=torch.float32), tok, fusion_layers=1,
                                        max_frames=4, **kw)


def test_param_groups_give_time_and_fresh_layers_their_lr(tok):
    model = _model(tok, motion=True)
    groups = param_groups(model, 0.1, 1e-4, temporal_lr_mult=100.0, fresh_lr_mult=10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = []
    for g in groups:
        lr = g.get("lr", 1e-4)
        for p in g["params"]:
            n = names[id(p)]
            seen.append(n)
            if n in TIME_PARAMS:
                assert lr == pytest.approx(1e-2) and g["weight_decay"] == 0.0, n
            elif n.startswith("fusion.") and any(f".{k}." in f".{n}" for k in FRESH_FUSION):
                assert lr == pytest.approx(1e-3), n
            else:
                assert lr == pytest.approx(1e-4), n
            if p.ndim < 2 or "embedding" in n:
                assert g["weight_decay"] == 0.0, n
    assert sorted(seen) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert "video.embeddings.motion_weight" in seen and "fusion.layers.0.cross_attn.q_proj.weight" in seen
    assert "fusion.layers.0.self_attn.q_proj.weight" in seen  # copied from the text tower: base LR


def test_reverse_count():
    assert [reverse_count(f, 16) for f in (0, False, 0.25, 0.5, True, 1.0)] == [0, 0, 4, 8, 16, 16]
    assert reverse_count(0.3, 5) == 2
    with pytest.raises(ValueError):
        reverse_count(1.5, 4)


def test_reverse_fraction_in_vtc_and_vtm(tok):
    model = _model(tok)
    batch = tiny_batch(tok, ["a red ball moves left", "the box moves right", "a green circle jumps",
                             "a blue box turns"], [3, 2, 3, 1])
    out = model(batch, drop_ratio=0.5, rng=np.random.default_rng(0), reverse_negatives=0.5,
                generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    # VTC: texts 0, 1 get their reversed clip as one more column; texts 2, 3 get -inf there
    t, v, r = torch.randn(4, 8), torch.randn(4, 8), torch.randn(2, 8)
    loss, _ = vtc_loss(t, v, torch.tensor([2.0]), reverse_video_emb=r)
    full, _ = vtc_loss(t, v, torch.tensor([2.0]))
    assert loss > full  # extra negatives only raise the loss
    # VTM pairs: positives, hard negatives, then (text i, reversed clip i) for i < 2
    ti, vi, labels = host_pairs(torch.tensor([1, 0, 3, 2]), torch.tensor([1, 0, 3, 2]),
                                torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), 4, 2)
    assert ti[-2:].tolist() == [0, 1] and vi[-2:].tolist() == [4, 5] and labels.sum() == 4
    assert len(labels) == 4 + 4 + 4 + 2


def test_vtm_hardness_zero_draws_uniformly():
    sim = torch.tensor([[10.0, 9.0, -5.0, -5.0]] * 4)
    pos = torch.eye(4, dtype=torch.bool)
    hard = [sample_hard_negatives(sim, pos, torch.Generator().manual_seed(s))[0][0].item() for s in range(200)]
    soft = [sample_hard_negatives(sim * 0.0, pos, torch.Generator().manual_seed(s))[0][0].item()
            for s in range(200)]
    assert set(hard) == {1}  # e^-14: the hardest negative every time
    counts = np.bincount(soft, minlength=4)
    assert counts[0] == 0 and min(counts[1:]) > 40  # uniform over the three non-positives


def test_mirrored_stills_swap_their_place_words(tok):
    assert swap_top_bottom("a red star up at the top, a cross below a circle") == \
        "a red star down at the bottom, a cross above a circle"
    assert swap_left_right("a box to the left of a ball") == "a box to the right of a ball"
    assert place_axes("a box to the left of a ball") == ("lr",)
    assert place_axes("a star up on the right") == ("lr", "tb")
    assert place_axes("a circle in the center") == () and place_axes("the leftover cake") == ()
    # The Collator's mirrored samples (a flip in the crop row, applied on the device):
    # tests/test_data_device.py::test_mirrored_stills_are_flipped_on_the_device


def test_patch_flow_direction_and_symmetry():
    g = torch.arange(16, dtype=torch.float32)
    def blob(cx, cy):  # a bright disc on a dark patch
        d = (g[None, :] - cx) ** 2 + (g[:, None] - cy) ** 2
        return (d < 16).float().expand(3, 16, 16)[None] * 2 - 1
    before, now, after = blob(6, 8), blob(7.5, 8), blob(9, 8)
    fx, fy = patch_flow(before, now, after)[0].tolist()
    assert fx > 0.3 and abs(fy) < 0.1 * fx  # to the right
    assert torch.allclose(patch_flow(after, now, before), -patch_flow(before, now, after))
    up = patch_flow(blob(8, 9), blob(8, 7.5), blob(8, 6))[0]
    assert up[1] < -0.3 and abs(up[0]) < 0.1 * -up[1]  # image y grows downwards
    assert patch_flow(now, now, now).abs().max() == 0
    flat = torch.zeros(1, 3, 16, 16)
    assert patch_flow(flat, flat, flat + 1).abs().max() == 0  # no texture: no flow


def test_old_exports_build_without_the_new_parts(tok):
    from hvfm.load import model_from_config
    clip = tiny_clip(tok, dtype=torch.float32)
    old, build = model_from_config(clip.config, tok, {"fusion_layers": 1, "max_frames": 4})
    assert old.video.embeddings.motion_weight is None and old.fusion.vtm_token == "first"
    new, _ = model_from_config(clip.config, tok, {"fusion_layers": 1, "max_frames": 4, "motion": True,
                                             "vtm_token": "last"})
    assert new.video.embeddings.motion_weight.shape == (clip.config.vision_config.hidden_size, 2)
    assert new.fusion.vtm_token == "last"
