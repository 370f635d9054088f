"""The model on the Triton kernels: same loss and gradients as the sdpa backend (float32)."""
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hvfm.model import VideoEncoder, VideoLanguageModel  # noqa: E402
from hvfm.model.attention import Varlen  # noqa: E402
from hvfm.model.testing import tiny_batch, tiny_clip, tiny_tokenizer  # noqa: E402
from hvfm.model.video import default_patch_embed  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
pytestmark = pytest.mark.skipif(not (INTERPRET or torch.cuda.is_available()),
                                reason="needs CUDA or TRITON_INTERPRET=1")
CAPTIONS = ["a red ball moves left", "the box moves right then up", "a green circle jumps"]
FRAMES = [2, 3, 1]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("reverse", [False, True])
def test_patch_embed_triton_matches_gather(tok, reverse):
    enc = VideoEncoder.from_clip(tiny_clip(tok, dtype=torch.float32), max_frames=3).to(DEVICE)
    with torch.no_grad():
        enc.embeddings.temporal_embedding.normal_()
    g = torch.Generator().manual_seed(0)
    px = torch.randn(3, 3, 3, 35, 35, generator=g).to(DEVICE)  # 35 px: a 3-pixel border is cut
    nf = np.array(FRAMES)
    keep = enc.sample(nf, 35, 3, "0.2:0.8", np.random.default_rng(0), DEVICE)
    vs = Varlen.from_lengths(keep.counts + 1, DEVICE)
    res = {}
    for impl in ("gather", "triton"):
        enc.zero_grad()
        x, idx = enc.embeddings(px, keep, vs, torch.from_numpy(nf).to(DEVICE), impl=impl,
                                reverse=reverse)
        (x * torch.linspace(-1, 1, x.numel(), device=DEVICE).view_as(x)).sum().backward()
        res[impl] = x.detach(), idx, {n: p.grad.clone() for n, p in enc.embeddings.named_parameters()}
    (xa, ia, ga), (xb, ib, gb) = res["gather"], res["triton"]
    torch.testing.assert_close(xb, xa, rtol=1e-5, atol=1e-5)
    assert torch.equal(ia, ib)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-5, atol=1e-5, msg=n)


def test_triton_attention_selects_triton_patch_embed(tok):
    assert default_patch_embed("triton") == "triton" and default_patch_embed("sdpa") == "conv"
    assert default_patch_embed("torch-varlen") == "gather"
    enc = VideoEncoder.from_clip(tiny_clip(tok, dtype=torch.float32), max_frames=3, attn="triton")
    assert enc.patch_embed == "triton"


def _run(tok, attn, seed=0):
    clip = tiny_clip(tok, dtype=torch.float32)
    model = VideoLanguageModel.from_clip(clip, tok, fusion_layers=1, attn=attn, max_frames=3,
                                         patch_embed="triton" if attn == "triton" else "gather")
    model.to(DEVICE)
    torch.manual_seed(1)
    with torch.no_grad():
        model.video.embeddings.temporal_embedding.normal_(std=0.1)
    batch = tiny_batch(tok, CAPTIONS, FRAMES, seed=seed)
    out = model(batch, drop_ratio="0.3:0.8", rng=np.random.default_rng(seed), reverse_negatives=True,
                generator=torch.Generator(DEVICE).manual_seed(seed))
    out["loss"].backward()
    return model, out


def test_triton_and_sdpa_models_agree(tok):
    (ma, oa), (mb, ob) = _run(tok, "sdpa"), _run(tok, "triton")
    assert mb.video.patch_embed == "triton" and mb.video.attn == "triton"
    for k in ("loss", "vtc", "vtm", "mlm", "video_tokens", "text_tokens"):
        torch.testing.assert_close(torch.as_tensor(ob[k]), torch.as_tensor(oa[k]), rtol=1e-4,
                                   atol=1e-5, msg=k)
    gb = dict(mb.named_parameters())
    for n, p in ma.named_parameters():
        scale = max(1.0, p.grad.abs().max().item())
        torch.testing.assert_close(gb[n].grad, p.grad, rtol=1e-4, atol=1e-4 * scale, msg=n)
