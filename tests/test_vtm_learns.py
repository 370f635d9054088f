"""VTM must be able to learn: an easy matching task (the caption names the clip's colour) on the
trainer's own parameter groups. The VTM loss must fall well below its prior (the cross-entropy
of always answering the share of positives), where it sat in every run before the head read the
caption's EOT token and the fusion's fresh layers got their own LR."""
import numpy as np
import pytest
import torch

from hvfm.model import VideoLanguageModel
from hvfm.model.testing import tiny_clip, tiny_tokenizer
from hvfm.optim import param_groups

COLOURS = {"red": (1.5, -1.0, -1.0), "blue": (-1.0, -1.0, 1.5), "green": (-1.0, 1.5, -1.0)}
SHAPES = ("ball", "box", "circle", "square")


def _batch(tok, rng, size=12):
    colours, shapes = rng.choice(list(COLOURS), size), rng.choice(SHAPES, size)
    pixels = torch.from_numpy(rng.normal(0, 0.3, (size, 2, 3, 32, 32)).astype(np.float32))
    for i, c in enumerate(colours):
        pixels[i] += torch.tensor(COLOURS[c]).view(1, 3, 1, 1)
    enc = tok([f"a {c} {s}" for c, s in zip(colours, shapes)], padding=True, return_tensors="pt")
    ids = enc["input_ids"]
    return dict(pixels=pixels, num_frames=torch.full((size,), 2), input_ids=ids,
                attention_mask=enc["attention_mask"], mlm_input_ids=ids,
                mlm_labels=torch.full_like(ids, -100))


def _train_vtm(vtm_token, fresh_lr_mult, steps=150, lr=1e-4):
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = VideoLanguageModel.from_clip(tiny_clip(tok, dtype=torch.float32), tok, fusion_layers=1,
                                         max_frames=4, vtm_token=vtm_token)
    opt = torch.optim.AdamW(param_groups(model, 0.0, lr, fresh_lr_mult=fresh_lr_mult), lr=lr)
    rng = np.random.default_rng(0)
    losses = []
    for step in range(steps):
        out = model(_batch(tok, rng), drop_ratio=0.5, rng=rng, loss_weights=(0, 1, 0),
                    generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["vtm"]))
    return float(np.mean(losses[-20:]))


def test_vtm_learns_an_easy_matching_task(one_torch_thread):
    # Every text gets its positive, one hard-negative video and one hard-negative text: 1 in 3.
    prior = -(np.log(1 / 3) / 3 + np.log(2 / 3) * 2 / 3)
    assert _train_vtm("last", fresh_lr_mult=10.0) < 0.7 * prior


@pytest.mark.parametrize("token", ["first", "last"])
def test_vtm_token_choice_is_read(token):
    tok = tiny_tokenizer()
    model = VideoLanguageModel.from_clip(tiny_clip(tok, dtype=torch.float32), tok, fusion_layers=1,
                                         max_frames=4, vtm_token=token)
    from hvfm.model.attention import Varlen
    ts = Varlen.from_lengths(np.array([2, 3]), "cpu")
    h = torch.arange(5, dtype=torch.float32)[:, None].expand(5, model.fusion.vtm_head.in_features)
    with torch.no_grad():
        model.fusion.vtm_head.weight.zero_()
        model.fusion.vtm_head.weight[0, 0] = 1.0
        model.fusion.vtm_head.bias.zero_()
    read = model.fusion.vtm_logits(h, ts)[:, 0].tolist()
    assert read == ([0.0, 2.0] if token == "first" else [1.0, 4.0])
