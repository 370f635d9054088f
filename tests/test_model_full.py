"""Loading a CLIP folder, and the whole model's forward/backward."""
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hvfm.model import (VideoLanguageModel, add_mask_token, load_clip, preset_config,  # noqa: E402
                        save_random_clip)
from hvfm.model.testing import tiny_batch, tiny_clip, tiny_tokenizer  # noqa: E402

CAPTIONS = ["a red ball moves left", "the box moves right then up", "a red ball moves left",
            "a green circle jumps"]  # two identical captions
FRAMES = [2, 3, 1, 3]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_presets():
    c = preset_config("vit-b16", 49409, eos_token_id=49407)
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers,
            c.vision_config.patch_size, c.text_config.hidden_size, c.projection_dim) == \
        (768, 12, 16, 512, 512)
    c = preset_config("vit-l14", 49409)
    assert (c.vision_config.hidden_size, c.vision_config.num_hidden_layers,
            c.vision_config.patch_size, c.text_config.hidden_size) == (1024, 24, 14, 768)
    with pytest.raises(ValueError, match="unknown CLIP preset 'vit-h'"):
        preset_config("vit-h", 10)


def test_saved_clip_loads_and_inflates(tok, tmp_path):
    clip = tiny_clip(tok, dtype=torch.float32)
    clip.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    loaded, tok2 = load_clip(str(tmp_path / "clip"))
    assert len(tok2) == len(tok) and tok2.mask_token_id == tok.mask_token_id
    assert tok2("a red ball")["input_ids"] == tok("a red ball")["input_ids"]
    model = VideoLanguageModel.from_clip(loaded, tok2, fusion_layers=1, max_frames=4)
    assert torch.equal(model.text.token_embedding.weight, clip.text_model.embeddings.token_embedding.weight)
    assert torch.equal(model.video.embeddings.patch_weight,
                       clip.vision_model.embeddings.patch_embedding.weight)
    # a folder missing a file: one line naming the folder and the file
    os.remove(tmp_path / "clip" / "tokenizer.json")
    with pytest.raises(ValueError) as e:
        load_clip(str(tmp_path / "clip"))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "clip") in msg and "tokenizer.json" in msg
    os.remove(tmp_path / "clip" / "config.json")
    with pytest.raises(ValueError, match="config.json"):
        load_clip(str(tmp_path / "clip"))
    with pytest.raises(ValueError, match="does not exist"):
        load_clip(str(tmp_path / "nothing"))


def test_save_random_tiny_and_mask_token(tmp_path):
    tok = tiny_tokenizer(mask=False)
    folder = save_random_clip("tiny", tok, str(tmp_path / "tiny"))
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert cfg["vision_config"]["hidden_size"] == 128 and cfg["vision_config"]["image_size"] == 96
    clip, tok = load_clip(folder)
    assert clip.config.text_config.eos_token_id == tok.eos_token_id
    with pytest.raises(ValueError, match="add_mask_token"):
        VideoLanguageModel.from_clip(clip, tok)
    old = clip.text_model.embeddings.token_embedding.weight.detach().clone()
    assert add_mask_token(clip, tok) and tok.mask_token_id == len(tok) - 1
    new = clip.text_model.embeddings.token_embedding.weight
    assert new.shape[0] == len(tok) and torch.equal(new[:-1], old)
    torch.testing.assert_close(new[-1], old.mean(0))
    assert not add_mask_token(clip, tok)
    VideoLanguageModel.from_clip(clip, tok, fusion_layers=1)


def _run(tok, attn, reverse=True, seed=0):
    model = VideoLanguageModel.from_clip(tiny_clip(tok), tok, fusion_layers=2, attn=attn,
                                         max_frames=3)
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero temporal embedding so reverse negatives differ
        model.video.embeddings.temporal_embedding.normal_(std=0.1)
    batch = tiny_batch(tok, CAPTIONS, FRAMES, seed=seed)
    out = model(batch, drop_ratio="0.3:0.8", rng=np.random.default_rng(seed),
                reverse_negatives=reverse, generator=torch.Generator().manual_seed(seed))
    out["loss"].backward()
    return model, out


def test_forward_backward_finite_and_complete(tok):
    model, out = _run(tok, "torch-varlen")
    for k in ("loss", "vtc", "vtm", "mlm"):
        assert torch.isfinite(out[k]), k
    assert out["text_tokens"] == sum(len(tok(c)["input_ids"]) for c in CAPTIONS)
    assert 4 < out["video_tokens"] < 4 + 16 * sum(FRAMES)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
    assert model.video.embeddings.temporal_embedding.grad.abs().sum() > 0


def test_sdpa_and_varlen_models_agree(tok):
    (ma, oa), (mb, ob) = _run(tok, "sdpa"), _run(tok, "torch-varlen")
    for k in ("loss", "vtc", "vtm", "mlm", "video_tokens", "text_tokens"):
        torch.testing.assert_close(torch.as_tensor(oa[k]), torch.as_tensor(ob[k]), rtol=1e-10,
                                   atol=1e-12, msg=k)
    gb = dict(mb.named_parameters())
    for n, p in ma.named_parameters():
        torch.testing.assert_close(p.grad, gb[n].grad, rtol=1e-8, atol=1e-10, msg=n)


def test_retrieval_api(tok):
    model = VideoLanguageModel.from_clip(tiny_clip(tok), tok, fusion_layers=1, max_frames=3)
    batch = tiny_batch(tok, CAPTIONS, FRAMES)
    with torch.no_grad():
        v = model.encode_video(batch["pixels"], batch["num_frames"])
        t = model.encode_text(batch["input_ids"], batch["attention_mask"])
        s = model.vtm_score(batch["pixels"], batch["num_frames"], batch["input_ids"],
                            batch["attention_mask"])
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(4, dtype=v.dtype))
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(4, dtype=t.dtype))
    assert torch.allclose(t[0], t[2]) and s.shape == (4,) and ((s > 0) & (s < 1)).all()
    model.set_attention("torch-varlen")
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(batch["pixels"], batch["num_frames"]), v)


def test_bf16_autocast_and_checkpointing(tok):
    clip = tiny_clip(tok, dtype=torch.float32)
    model = VideoLanguageModel.from_clip(clip, tok, fusion_layers=1, max_frames=3,
                                         attn="torch-varlen", checkpointing=True)
    batch = tiny_batch(tok, CAPTIONS, FRAMES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch, drop_ratio=0.5, rng=np.random.default_rng(0), reverse_negatives=True)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32
    assert all(p.grad is not None for p in model.parameters())


def test_loss_weights(tok):
    model = VideoLanguageModel.from_clip(tiny_clip(tok), tok, fusion_layers=1, max_frames=3)
    batch = tiny_batch(tok, CAPTIONS, FRAMES)
    out = model(batch, drop_ratio=0.5, rng=np.random.default_rng(0), loss_weights=(1.0, 0.0, 0.0))
    assert out["mlm"] == 0 and out["vtm"] == 0 and torch.equal(out["loss"].detach(), out["vtc"])
    out = model(batch, drop_ratio=0.5, rng=np.random.default_rng(0), loss_weights={"vtc": 2.0})
    torch.testing.assert_close(out["loss"].detach(), 2 * out["vtc"] + out["vtm"] + out["mlm"])
