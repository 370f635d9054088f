"""Text tower vs transformers' CLIP; packed vs padded text and fusion encoders (float64)."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hvfm.model import FusionEncoder, TextEncoder, Varlen, host_lengths  # noqa: E402
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
