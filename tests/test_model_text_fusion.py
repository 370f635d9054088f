"""Text tower vs transformers' CLIP; packed vs padded text and fusion encoders (float64)."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hvfm.model import (FusionEncoder, TextEncoder, Varlen, gather_sequences,  # noqa: E402
                        host_lengths)
from hvfm.model.testing import tiny_clip, tiny_tokenizer  # noqa: E402

CAPTIONS = ["a red ball moves left", "the box", "a blue square jumps then turns slowly", "up"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def clip(tok):
    return tiny_clip(tok)


def test_text_tower_equals_clip(tok, clip):
    enc = tok(CAPTIONS, padding=True, return_tensors="pt")
    text = TextEncoder.from_clip(clip, attn="torch-varlen")
    ours = text(enc["input_ids"], host_lengths(enc["attention_mask"]))
    ref = clip.get_text_features(**enc).pooler_output
    torch.testing.assert_close(ours.embeds, ref, rtol=1e-10, atol=1e-12)
    hidden = clip.text_model(**enc).last_hidden_state
    real = enc["attention_mask"].bool()
    torch.testing.assert_close(ours.tokens, hidden[real], rtol=1e-10, atol=1e-12)


def _grads(*modules):
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules)
            for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fusion_width", [None, 48])
def test_text_and_fusion_packed_equals_padded(tok, clip, fusion_width):
    enc = tok(CAPTIONS, padding=True, return_tensors="pt")
    lengths = host_lengths(enc["attention_mask"])
    g = torch.Generator().manual_seed(0)
    video_lengths = [5, 1, 9, 3]  # e.g. CLS + kept patches per clip
    video = torch.randn(sum(video_lengths), 32, generator=g, dtype=torch.float64)
    vs = Varlen.from_lengths(video_lengths)
    results = []
    for attn in ("sdpa", "torch-varlen"):
        torch.manual_seed(1)  # same fresh cross-attention weights
        text = TextEncoder.from_clip(clip, attn=attn)
        fusion = FusionEncoder.from_text(text, 32, layers=2, width=fusion_width, attn=attn)
        t = text(enc["input_ids"], lengths)
        h = fusion(t.tokens, t.varlen, video, vs)
        out = (fusion.vtm_logits(h, t.varlen), fusion.mlm_head(h))
        (out[0].square().sum() + out[1].logsumexp(-1).sum() + t.embeds.sin().sum()).backward()
        results.append((out, _grads(text, fusion)))
    (a, ga), (b, gb) = results
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert ga.keys() == gb.keys() and "1.layers.0.cross_attn.k_proj.weight" in ga
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-9, atol=1e-11, msg=n)


def test_fusion_init_from_text(clip):
    text = TextEncoder.from_clip(clip)
    fusion = FusionEncoder.from_text(text, 32, layers=1)
    last = text.layers[-1]
    for name in ("self_attn.q_proj.weight", "mlp.fc2.bias", "layer_norm1.weight", "layer_norm2.bias"):
        assert torch.equal(fusion.layers[0].state_dict()[name], last.state_dict()[name]), name
    assert fusion.mlm_head.decoder.weight is text.token_embedding.weight  # tied
    wide = FusionEncoder.from_text(text, 32, layers=3, width=64, heads=4)  # shapes differ: fresh
    assert wide.layers[0].mlp.fc1.weight.shape == (128, 64)
    assert wide.mlm_head.decoder.weight is text.token_embedding.weight
    # more fusion layers than text layers: only the last ones are copied
    deep = FusionEncoder.from_text(text, 32, layers=3)
    assert torch.equal(deep.layers[2].mlp.fc1.weight, last.mlp.fc1.weight)
    assert torch.equal(deep.layers[1].mlp.fc1.weight, text.layers[0].mlp.fc1.weight)
    assert not np.allclose(deep.layers[0].mlp.fc1.weight.detach(), text.layers[0].mlp.fc1.weight.detach())


@pytest.mark.parametrize("attn", ["sdpa", "torch-varlen"])
def test_fusion_projects_each_clip_once(tok, clip, attn):
    """VTM pairs a clip with several texts: with video_index the K/V projections (and video_in)
    see each used clip once, and outputs and gradients equal gathering the clips first."""
    captions = CAPTIONS + CAPTIONS[:3]
    enc = tok(captions, padding=True, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    video_lengths = [5, 1, 9, 4]  # clip 3 is in no pair
    index = [0, 2, 0, 1, 2, 2, 0]  # one clip per caption, repeats as VTM's negatives make them
    video = torch.randn(sum(video_lengths), 32, generator=g, dtype=torch.float64)
    vs = Varlen.from_lengths(video_lengths)
    torch.manual_seed(1)
    text = TextEncoder.from_clip(clip, attn=attn)
    fusion = FusionEncoder.from_text(text, 32, layers=2, attn=attn)
    t = text(enc["input_ids"], host_lengths(enc["attention_mask"]))
    tokens = t.tokens.detach()
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
             for blk in fusion.layers for m in (blk.cross_attn.k_proj, blk.cross_attn.v_proj)]
    hooks.append(fusion.video_in.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])))
    results = []
    for once in (False, True):
        seen.clear()
        fusion.zero_grad()
        vx = video.clone().requires_grad_()
        if once:
            h = fusion(tokens, t.varlen, vx, vs, video_index=index)
        else:
            gx, gs = gather_sequences(vx, vs, index)
            h = fusion(tokens, t.varlen, gx, gs)
        loss = fusion.vtm_logits(h, t.varlen).square().sum() + fusion.mlm_head(h).logsumexp(-1).sum()
        loss.backward()
        results.append((h.detach(), vx.grad, _grads(fusion), list(seen)))
    for hk in hooks:
        hk.remove()
    (h0, dv0, g0, seen0), (h1, dv1, g1, seen1) = results
    torch.testing.assert_close(h1, h0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dv1, dv0, rtol=1e-10, atol=1e-12)
    assert g0.keys() == g1.keys() and "0.layers.1.cross_attn.v_proj.weight" in g1
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-9, atol=1e-11, msg=n)
    gathered = sum(video_lengths[i] for i in index)  # 5+9+5+1+9+9+5 = 43 rows
    unique = sum(video_lengths[i] for i in sorted(set(index)))  # 5+1+9 = 15 rows
    assert seen0 == [gathered] * 5 and seen1 == [unique] * 5, (seen0, seen1)
    with pytest.raises(ValueError, match="video_index"):
        fusion(tokens, t.varlen, video, vs, video_index=[0, 1, 4, 0, 0, 0, 0])
