"""Probe stills (issue 20): pairs that differ only in place (mirrored) or colour, and their
evaluation: own caption against its twin, with intervals over groups."""
import json

import numpy as np
import pytest
import torch

from hvfm.data.synthetic import stills as si
from hvfm.data.text.swap import SWAP
from hvfm.evaluate import encode_videos, evaluate_probes, probe_lines, score_matrix
from hvfm.data import read_annotations
from hvfm.data.text.tokens import clean_caption
from hvfm.model import VideoLanguageModel
from hvfm.model.testing import tiny_clip, tiny_tokenizer

AXIS_WORDS = {"place_lr": {"left", "right"}, "place_tb": {"top", "bottom", "up", "down"},
              "relation": {"left", "right", "above", "below"}, "colour": set(si.IMAGE_COLOURS)}


def _diff(a, b):
    wa, wb = a.split(), b.split()
    assert len(wa) == len(wb), (a, b)
    return [(x, y) for x, y in zip(wa, wb) if x != y]


@pytest.mark.parametrize("kind", si.PROBE_KINDS)
def test_twins_differ_only_in_their_attribute(kind):
    for index in range(40):
        (p, cap_p, _), (q, cap_q, variant) = si.probe_group(0, kind, index)
        diff = _diff(cap_p, cap_q)
        assert diff, (kind, cap_p)
        for x, y in diff:
            assert x in AXIS_WORDS[kind] and y in AXIS_WORDS[kind], (kind, cap_p, cap_q)
            if kind != "colour":
                assert SWAP[x] == y  # mirrored: each differing word is its opposite
        for o, m in zip(p["objects"], q["objects"]):
            if kind == "colour":
                assert (o["colour"] != m["colour"], o["x"], o["y"]) == (True, m["x"], m["y"])
            else:
                moved = {k for k in ("x", "y") if not np.isclose(o[k], m[k])}
                assert moved <= {"x", "y"} and len(moved) <= 1
                for k in moved:
                    assert np.isclose(o[k] + m[k], 1.0)
    assert si.probe_group(0, kind, 7) == si.probe_group(0, kind, 7)  # deterministic
    assert si.probe_group(0, kind, 7) != si.probe_group(1, kind, 7)


def test_mirrored_still_is_the_own_still_flipped(tmp_path):
    for kind, flip in (("place_lr", np.fliplr), ("place_tb", np.flipud)):
        (p, _, _), (q, _, _) = si.probe_group(0, kind, 3)
        plain = {"kind": "plain", "colours": ["night"]}
        a = si.render_image({**p, "background": plain}, 48)
        b = si.render_image({**q, "background": plain}, 48)
        assert not np.array_equal(a, b) and np.array_equal(flip(a), b)


def test_probe_files_and_their_evaluation(tmp_path):
    root = si.generate_probes(tmp_path / "probes", groups=3, size=32, seed=0)
    entries = json.loads((root / "probes.json").read_text())
    assert len(entries) == 3 * len(si.PROBE_KINDS) * 2
    assert {e["kind"] for e in entries} == set(si.PROBE_KINDS)
    assert all((root / e["image"]).exists() for e in entries)
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = VideoLanguageModel.from_clip(tiny_clip(tok, dtype=torch.float32), tok,
                                         fusion_layers=1, max_frames=2).eval()
    m = evaluate_probes(model, tok, root, size=32, n_boot=200)
    assert set(m) == set(si.PROBE_KINDS)
    # by hand from the similarity matrix: each still against its twin's caption
    sims = score_matrix(model, tok, read_annotations(root / "probes.json", root,
                                                     clean=clean_caption), frames=1, size=32)
    for kind in si.PROBE_KINDS:
        idx = [i for i, e in enumerate(entries) if e["kind"] == kind]
        own = [float(sims[i, i] > sims[i ^ 1, i]) + 0.5 * float(sims[i, i] == sims[i ^ 1, i])
               for i in idx]  # twins are neighbours: 2g, 2g + 1
        assert m[kind]["own_vs_alt"] == pytest.approx(np.mean(own))
        assert m[kind]["groups"] == 3
        lo, hi = m[kind]["own_vs_alt_ci"]
        assert lo <= m[kind]["own_vs_alt"] <= hi
    # the image tower's side, by hand from the stills' embeddings: twins 2g, 2g + 1
    ann = read_annotations(root / "probes.json", root, clean=clean_caption)
    vemb = encode_videos(model, tok, ann, list(range(len(entries))), frames=1, size=32)[0][0].double()
    for kind in si.PROBE_KINDS:
        idx = [i for i, e in enumerate(entries) if e["kind"] == kind]
        spread = np.mean([1 - float(vemb[i] @ vemb[i + 1]) for i in idx[::2]])
        assert m[kind]["image_spread"] == pytest.approx(spread, abs=1e-5)
        acc = m[kind]["image_probe_acc"]
        if kind in ("colour", "relation"):  # no label the image alone defines
            assert acc is None
        else:  # one group of 3 held out: 0, 1 or 2 of its stills read right
            assert acc in (0.0, 0.5, 1.0) and m[kind]["image_probe_chance"] == 0.5
    lines = probe_lines(m)
    assert len(lines) == len(si.PROBE_KINDS)
    assert all("image spread" in line for line in lines)
    assert sum("image probe" in line for line in lines) == 2
