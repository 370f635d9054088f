"""The built-in image-text corpus (stage 1), image decoding, and the built-in byte-level tokenizer."""
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvfm.data import DecodeError, decode_clip, read_annotations
from hvfm.data.synthetic import stills as si
from hvfm.data.text.tokens import build_tokenizer, clean_caption

ROOT = Path(__file__).resolve().parents[1]
COLOURS = ("red green blue yellow white black grey purple orange pink cyan magenta brown").split()
SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "cli"
    subprocess.run([sys.executable, "-m", "hvfm.data.synthetic", str(out), "--images", "40",
                    "--images-test", "10", "--size", "32"], check=True, cwd=ROOT, capture_output=True)
    return out


def _sample(n, seed=0):
    for i in range(n):
        rng = si._rng(seed, "train", i)
        params = si.sample_image(rng)
        yield params, si.image_caption(params, rng)


def test_cli_writes_images_and_json(images):
    entries = json.loads((images / "images.json").read_text())
    test = json.loads((images / "images_test.json").read_text())
    assert len(entries) == 40 and len(test) == 10
    assert not {e["image"] for e in entries} & {e["image"] for e in test}
    for e in entries + test:
        assert set(e) == {"image", "caption"} and e["caption"]
        assert (images / e["image"]).is_file() and e["image"].endswith(".png")
    assert (images / ".images_complete").is_file()
    # the trainer reads it as one-frame clips
    ann = read_annotations(images / "images.json", images, clean=clean_caption)
    assert ann.num_videos == 40
    frames, how = decode_clip(ann.resolve(0), 8, short_side=32)
    assert how == "image" and frames.shape == (1, 32, 32, 3) and frames.dtype == np.uint8


def test_rendered_png_matches_the_parameters(images):
    entries = json.loads((images / "images.json").read_text())
    rel, params, _, noise_seed = next(si._items("train", 1, 0))
    assert entries[0]["image"] == rel
    got, _ = decode_clip(images / rel, 1)
    np.testing.assert_array_equal(got[0], si.render_image(params, 32, noise_seed))  # PNG: lossless


def test_vocabulary_is_broad_and_every_caption_names_what_it_shows():
    seen_colours, seen_shapes, places, relations, backgrounds = set(), set(), set(), set(), set()
    for params, cap in _sample(600):
        words = cap.split()
        backgrounds.add(params["background"]["kind"])
        for o in params["objects"]:
            assert f"{o['colour']} {o['shape']}" in cap and o["size"] in words, cap
            seen_colours.add(o["colour"])
            seen_shapes.add(o["shape"])
        places.update(w for w in words if w in ("left", "right", "top", "bottom", "center",
                                                 "middle", "up", "down"))
        relations.update(r for r in ("to the left of", "to the right of", "above", "below") if r in cap)
        if len(params["objects"]) == 1:
            row, col = si._place(params["objects"][0]["x"], params["objects"][0]["y"])
            if (row, col) != ("middle", "center"):  # its place is named
                assert (row if row != "middle" else col) in words or \
                    ("up" if row == "top" else "down") in words, cap
    assert seen_colours == set(COLOURS) and seen_shapes == set(SHAPES)
    assert places == {"left", "right", "top", "bottom", "center", "middle", "up", "down"}
    assert len(relations) == 4 and backgrounds == {"plain", "noise", "gradient"}


def test_objects_stand_out_and_differ():
    for params, _ in _sample(300, seed=3):
        objs = params["objects"]
        assert 1 <= len(objs) <= 3
        assert len({(o["colour"], o["shape"]) for o in objs}) == len(objs)
        for o in objs:
            assert si._contrast_ok(o["colour"], params["background"])
            assert o["radius"] <= o["x"] <= 1 - o["radius"] and o["radius"] <= o["y"] <= 1 - o["radius"]


def test_relation_words_match_the_layout():
    a = {"x": 0.2, "y": 0.5}
    b = {"x": 0.8, "y": 0.45}
    assert si._relation(a, b) == "to the left of" and si._relation(b, a) == "to the right of"
    c = {"x": 0.5, "y": 0.1}
    assert si._relation(c, a) == "above" and si._relation(a, c) == "below"


def test_shapes_render_distinctly():
    from hvfm.data.synthetic.common import shape_mask
    g = np.arange(64) + 0.5
    masks = {s: shape_mask(s, g[None, :] - 32, g[:, None] - 32, 20) for s in SHAPES}
    for s, m in masks.items():
        assert 200 < m.sum() < 1300, s
    names = list(masks)
    for i, s in enumerate(names):
        for t in names[i + 1:]:
            assert (masks[s] ^ masks[t]).sum() > 100, (s, t)
    assert masks["star"][15:20, 31:33].all() and not masks["star"][14, 14]  # a point up, no corner


def test_determinism_and_workers(images, tmp_path):
    def hashes(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(Path(root).rglob("*")) if p.is_file()}
    again = si.generate_images(tmp_path / "again", n=40, n_test=10, size=32, workers=2)
    assert hashes(again) == hashes(images)


def test_bad_image_is_a_decode_error(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(DecodeError, match="image"):
        decode_clip(bad, 1)


def test_ensure_images_reuses(tmp_path):
    a = si.ensure_images(tmp_path, n=5, n_test=2, size=16, seed=1)
    stamp = (a / "images.json").stat().st_mtime_ns
    b = si.ensure_images(tmp_path, n=5, n_test=2, size=16, seed=1)
    assert a == b and (b / "images.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [a.name]


def test_byte_level_tokenizer_never_needs_unk(tmp_path):
    caps = [c for _, c in _sample(200)]
    tok = build_tokenizer(caps, tmp_path / "tok", vocab_size=400)
    texts = ["a purple star moves up", "qv zzx ÿ ☃ 東京 emoji 🎥", "MOVES LEFT, then RIGHT!", "v g"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True).strip() == text.lower().strip()
    # the corpus words are whole tokens
    for w in ("purple", "diamond", "left", "bottom"):
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w


def test_builtin_tokenizer_holds_both_corpora(tmp_path):
    from hvfm.data.synthetic.tokenizer import ensure_builtin_tokenizer
    tok = ensure_builtin_tokenizer(seed=0, cache_dir=tmp_path)
    for w in [*COLOURS, *SHAPES, "moves", "then", "appears", "left", "up", "down", "above"]:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    again = ensure_builtin_tokenizer(seed=0, cache_dir=tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert re.fullmatch(r"tokenizer_v\d+_seed0", [p.name for p in tmp_path.iterdir()][0])
