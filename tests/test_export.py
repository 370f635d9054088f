"""The export folder: a transformers CLIPModel (vision/text towers, projections, logit_scale, the
vocabulary grown by the mask token) plus hvfm's extra weights; exact round trip; v1 folders still
load; merging with the original CLIP; checkpoint folders of the wrong kind fail in one line."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hvfm.data import DataError
from hvfm.export import main as export_main, save_export, split_state
from hvfm.load import FORMAT, join_state, load_any, load_export, merge_with_clip, to_clip_key
from hvfm.model import VideoLanguageModel, add_mask_token
from hvfm.model.testing import tiny_clip, tiny_tokenizer

BUILD = dict(fusion_layers=1, fusion_width=None, attn="sdpa", max_frames=4)



@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models: one intra-op thread (see conftest)."""

@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny CLIP without a mask token saved as an HF folder, and a 'post-pretrained' model
    inflated from it (mask token added, every weight moved, random temporal embedding)."""
    root = tmp_path_factory.mktemp("export")
    tok = tiny_tokenizer(mask=False)
    clip = tiny_clip(tok, dtype=torch.float32)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    stale_config = clip.config.to_dict()
    assert add_mask_token(clip, tok)
    model = VideoLanguageModel.from_clip(clip, tok, **BUILD).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    from transformers import CLIPConfig
    # the vocabulary in the config the exporter is given may be stale: the export fixes it
    save_export(root / "final", model.state_dict(), CLIPConfig.from_dict(stale_config), tok, BUILD)
    return dict(root=root, tok=tok, model=model, final=root / "final", clip=root / "clip")


def test_export_files_and_format(made):
    final = made["final"]
    meta = json.loads((final / "hvfm.json").read_text())
    assert meta["format"] == FORMAT == "hvfm-export-v2" and meta["build"] == BUILD
    for name in ("config.json", "model.safetensors", "hvfm_model.safetensors", "tokenizer.json"):
        assert (final / name).exists(), name
    config = json.loads((final / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == len(made["tok"])  # grown by the mask token
    assert config["architectures"] == ["CLIPModel"]


def test_round_trip_is_exact(made):
    model, tok = load_export(made["final"])
    assert tok.mask_token_id is not None and len(tok) == len(made["tok"])
    mine, theirs = made["model"].state_dict(), model.state_dict()
    assert set(mine) == set(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    # tied MLM decoder stays tied
    assert model.fusion.mlm_head.decoder.weight is model.text.token_embedding.weight


def test_transformers_clipmodel_loads_the_export_and_matches_one_frame(made):
    from transformers import CLIPModel
    hf = CLIPModel.from_pretrained(str(made["final"])).eval()
    model, tok = made["model"], made["tok"]
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = ["a red ball moves left", "the box", "a green circle jumps then turns"]
    enc = tok(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = hf.get_image_features(pixel_values=pixels)
        txt = hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        vid = model.video(pixels[:, None], torch.ones(3, dtype=torch.int64)).embeds
        mine = model.text(enc["input_ids"], enc["attention_mask"].sum(1).numpy()).embeds
    torch.testing.assert_close(img, vid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(txt, mine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hf.logit_scale.reshape(1), model.logit_scale.detach())
    # the temporal embedding is not zero, so one frame's features include frame 0's row
    assert model.video.embeddings.temporal_embedding[0].abs().sum() > 0


def test_split_and_join_state():
    state = {"video.layers.0.mlp.fc1.weight": torch.ones(2, 2), "logit_scale": torch.tensor([2.0]),
             "fusion.vtm_head.weight": torch.zeros(2, 2),
             "fusion.mlm_head.decoder.weight": torch.ones(3, 2),
             "video.embeddings.position_embedding": torch.zeros(5, 2),
             "video.embeddings.temporal_embedding": torch.full((4, 2), 0.5)}
    clip, extra = split_state(state)
    assert clip["logit_scale"].shape == () and "fusion.mlm_head.decoder.weight" not in extra
    assert set(extra) == {"fusion.vtm_head.weight", "video.embeddings.position_embedding",
                          "video.embeddings.temporal_embedding"}
    pos = clip["vision_model.embeddings.position_embedding.weight"]
    assert torch.equal(pos[0], torch.zeros(2)) and torch.equal(pos[1:], torch.full((4, 2), 0.5))
    back = join_state(clip, extra)
    assert set(back) == set(state) - {"fusion.mlm_head.decoder.weight"}
    for k in back:
        assert torch.equal(back[k], state[k]), k


def test_v1_exports_still_load(made, tmp_path):
    old = tmp_path / "v1"
    old.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (old / name).write_bytes((made["final"] / name).read_bytes())
    state = {k: v.clone().contiguous() for k, v in made["model"].state_dict().items()}
    save_file(state, str(old / "hvfm_model.safetensors"))
    (old / "hvfm.json").write_text(json.dumps({"format": "hvfm-export-v1", "build": BUILD}))
    model, _ = load_export(old)
    for k, v in made["model"].state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # and the export CLI upgrades it to v2
    export_main(["--checkpoint", str(old), "--out", str(tmp_path / "v2")])
    assert json.loads((tmp_path / "v2" / "hvfm.json").read_text())["format"] == FORMAT
    model2, _ = load_export(tmp_path / "v2")
    for k, v in made["model"].state_dict().items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_merge_with_clip(made, tmp_path):
    from hvfm.model import load_clip
    clip, tok = load_clip(str(made["clip"]))
    add_mask_token(clip, tok)
    theirs = clip.state_dict()
    post = made["model"].state_dict()
    for alpha in (0.0, 0.25, 1.0):
        model, _ = load_export(made["final"])
        n = merge_with_clip(model, made["clip"], alpha)
        assert n == sum(to_clip_key(k) is not None for k, _ in model.named_parameters())
        got = model.state_dict()
        for name, value in got.items():
            key = to_clip_key(name)
            if name == "fusion.mlm_head.decoder.weight":  # tied to the token embedding
                assert torch.equal(value, got["text.token_embedding.weight"])
            elif key is None:  # temporal embedding, fusion encoder, heads: post-pretrained
                assert torch.equal(value, post[name]), name
            else:
                want = alpha * theirs[key].reshape(value.shape) + (1 - alpha) * post[name]
                torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(DataError, match="alpha must be in"):
        merge_with_clip(model, made["clip"], 1.5)
    # recorded in the export
    export_main(["--checkpoint", str(made["final"]), "--out", str(tmp_path / "m"),
                 "--merge-with-clip", "0.5", "--clip", str(made["clip"])])
    meta = json.loads((tmp_path / "m" / "hvfm.json").read_text())["meta"]
    assert meta["merge"]["alpha"] == 0.5 and meta["merge"]["tensors"] == n


def test_hf_clip_folder_loads_as_the_image_baseline(made):
    model, tok, info = load_any(made["clip"])
    assert info["kind"] == "clip" and tok.mask_token_id is not None
    assert model.video.embeddings.temporal_embedding.abs().sum() == 0


@pytest.mark.parametrize("kind", ["missing", "empty", "bert", "bad_export"])
def test_wrong_checkpoint_folders_fail_in_one_line(made, tmp_path, kind):
    folder = tmp_path / kind
    if kind != "missing":
        folder.mkdir()
    if kind == "bert":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if kind == "bad_export":
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "hvfm.json"):
            (folder / name).write_bytes((made["final"] / name).read_bytes())
        (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError) as e:
        load_any(folder)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg
    if kind in ("empty", "bert"):
        assert "expected an hvfm export" in msg


def test_export_cli_refuses_a_plain_clip_folder(made, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main(["--checkpoint", str(made["clip"]), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("error: ")] and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_logit_scale_and_vocab_shapes_match_transformers(made):
    from transformers import CLIPModel
    hf = CLIPModel.from_pretrained(str(made["final"]))
    assert hf.text_model.embeddings.token_embedding.num_embeddings == len(made["tok"])
    assert np.isfinite(float(hf.logit_scale.detach()))
