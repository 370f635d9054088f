"""The caption-swap term: the swapper on strings, the Collator's swapped captions, and the loss."""
import contextlib
import io
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hvfm.data.synthetic import clips as sv
from hvfm.data.synthetic import stills as si
from hvfm.data.loading.dataset import Collator
from hvfm.data.text.swap import PAIRS, SWAP, swap_caption, swap_captions
from hvfm.model import VideoLanguageModel
from hvfm.model.losses import swap_loss
from hvfm.model.testing import tiny_batch, tiny_clip, tiny_tokenizer


# ----------------------------------------------------------------------------- the swapper
@pytest.mark.parametrize("a,b", PAIRS)
def test_every_pair_swaps_both_ways(a, b):
    assert swap_caption(f"it goes {a} now") == f"it goes {b} now"
    assert swap_caption(f"it goes {b} now") == f"it goes {a} now"


def test_one_pass_whole_words_and_case():
    assert swap_caption("left right left") == "right left right"  # not left->right->left
    assert swap_caption("up and down, above and below") == "down and up, below and above"
    assert swap_caption("Left, LEFT and left.") == "Right, RIGHT and right."
    for text in ("leftover uptown outside", "a bottomless cup", "an update", "topology",
                 "a red dog sits", "aboveground", "the dog is in the center"):
        assert swap_caption(text) == text
    assert swap_caption("a cat jumps out of the box") == "a cat jumps into the box"
    assert swap_caption("a cat jumps into the box") == "a cat jumps out of the box"
    assert swap_caption("a circle to the left of a square") == "a circle to the right of a square"
    assert swap_caption("the door opens before he enters") == "the door closes after he leaves"
    assert swap_caption("a blue square shows up on the left") == "a blue square shows up on the right"


def test_then_reverses_the_clauses():
    assert swap_caption("a cat sits then a dog runs") == "a dog runs then a cat sits"
    assert swap_caption("first a red circle, then a blue square") == "first a blue square, then a red circle"
    assert swap_caption("A red circle and then a blue square.") == "A blue square and then a red circle."
    assert swap_caption("a, then b, then c") == "c, then b, then a"
    assert swap_caption("then a cat") == "then a cat"  # no A
    # word pairs win over 'then' (both at once would undo each other)
    assert swap_caption("goes up then down") == "goes down then up"


def test_swap_captions_reports_which_changed():
    caps = ["a red ball moves left", "a green circle jumps", "a box, then a ball", "leftover"]
    out, changed = swap_captions(caps)
    assert changed == [True, False, True, False]
    assert out == ["a red ball moves right", "a green circle jumps", "a ball, then a box", "leftover"]


def _words(text):
    return text.replace(",", " ,").split()


def _only_pairs_differ(orig, new):
    a, b = _words(orig), _words(new)
    if len(a) != len(b):  # "into" <-> "out of" changes the count; none in the corpora
        return False
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    return bool(diff) and all(SWAP.get(x) == y for x, y in diff)


def test_real_video_captions():
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    kinds = set()
    for i in range(400):
        params = sv.sample_params(np.random.default_rng(i))
        cap = sv.caption(params, np.random.default_rng([i, 1]))
        new = swap_caption(cap)
        assert new != cap, cap
        if params["kind"] == "motion":  # exactly the caption of the opposite motion
            other = {**params, "direction": opposite[params["direction"]]}
            assert new == sv.caption(other, np.random.default_rng([i, 1])), cap
            assert _only_pairs_differ(cap, new), (cap, new)
        else:  # the two objects trade places in time, every word kept
            o1 = f"{params['first']['colour']} {params['first']['shape']}"
            o2 = f"{params['second']['colour']} {params['second']['shape']}"
            assert sorted(_words(new)) == sorted(_words(cap)), (cap, new)
            assert cap.index(o1) < cap.index(o2) and new.index(o2) < new.index(o1), (cap, new)
        kinds.add(params["kind"])
    assert kinds == {"motion", "order"}
    for i in range(20):  # the canonical captions of the test split's groups too
        base = sv.sample_motion(np.random.default_rng(i), any_axis=True)
        for d in sv.DIRECTIONS:
            assert swap_caption(sv.caption({**base, "direction": d})) == \
                sv.caption({**base, "direction": opposite[d]})
        order = sv.sample_order(np.random.default_rng(i))
        back = {**order, "first": order["second"], "second": order["first"]}
        cap = sv.caption(order)
        assert swap_caption(cap) != cap and sorted(_words(swap_caption(cap))) == sorted(_words(cap))
        assert swap_caption(sv.caption(back)) != sv.caption(back)


def test_real_image_captions():
    place = re.compile(r"\b(left|right|top|bottom|up|down|above|below)\b")
    changed = 0
    for i in range(400):
        rng = np.random.default_rng(i)
        cap = si.image_caption(si.sample_image(rng), rng)
        new = swap_caption(cap)
        if place.search(cap):
            assert _only_pairs_differ(cap, new), (cap, new)
            changed += 1
        else:  # "in the center": nothing to swap
            assert new == cap
    assert changed > 300
    assert swap_caption("a blue circle to the left of a large yellow square") == \
        "a blue circle to the right of a large yellow square"
    assert swap_caption("a small red star at the top left") == "a small red star at the bottom right"


# ----------------------------------------------------------------------------- the Collator
@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _samples(captions):
    return [{"pixels": torch.zeros(1, 8, 8, 3, dtype=torch.uint8),
             "crop": torch.tensor([0, 0, 8, 8, 8, 0], dtype=torch.float32), "caption": c,
             "index": i, "epoch": 0, "failures": []} for i, c in enumerate(captions)]


def test_collator_carries_the_swapped_captions(tok):
    from hvfm.data.transforms.device import draw_params
    samples = _samples(["a red ball moves left", "a green circle jumps", "the box moves up"])
    for s in samples:
        s["crop"] = draw_params(8, 8, 8, False)[0]
    batch = Collator(tok, swap=True)(samples)
    assert batch["swap_index"].tolist() == [0, 2]
    want = tok(["a red ball moves right", "the box moves down"], padding=True, return_tensors="pt")
    assert torch.equal(batch["swap_input_ids"], want["input_ids"])
    assert torch.equal(batch["swap_attention_mask"], want["attention_mask"])
    none = Collator(tok, swap=True)(samples[1:2])  # no pair: one row, the caption unchanged
    assert none["swap_index"].numel() == 0
    assert torch.equal(none["swap_input_ids"], none["input_ids"])
    assert "swap_index" not in Collator(tok)(samples)


# ----------------------------------------------------------------------------- the term
def test_swap_loss_equals_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    t, v, s = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.tensor([math.log(10.0)], dtype=torch.float64)
    index = torch.tensor([2, 0])
    got = swap_loss(t, v, s, index, scale)
    cos = lambda a, b: float(F.normalize(a, dim=0) @ F.normalize(b, dim=0))  # noqa: E731
    want_tt = want_vs = 0.0
    for k, i in enumerate(index.tolist()):
        vt, tt, vs = 10 * cos(v[i], t[i]), 10 * cos(t[i], s[k]), 10 * cos(v[i], s[k])
        want_tt += -vt + math.log(math.exp(vt) + math.exp(tt))
        want_vs += -vt + math.log(math.exp(vt) + math.exp(vs))
    assert got.item() == pytest.approx((want_tt + want_vs) / 2, rel=1e-12)
    empty = swap_loss(t, v, s.requires_grad_(), torch.zeros(0, dtype=torch.long), scale)
    assert empty.item() == 0 and empty.requires_grad


CAPTIONS = ["a red ball moves left", "the box moves right then up", "a green circle jumps",
            "the blue square turns"]


def _swap_batch(tok, captions):
    batch = tiny_batch(tok, captions, [2, 1, 2, 1])
    swapped, changed = swap_captions(captions)
    rows = [i for i, c in enumerate(changed) if c]
    enc = tok([swapped[i] for i in rows] or captions[:1], padding=True, return_tensors="pt")
    return {**batch, "swap_index": torch.tensor(rows, dtype=torch.int64),
            "swap_input_ids": enc["input_ids"], "swap_attention_mask": enc["attention_mask"]}


def _model(tok):
    return VideoLanguageModel.from_clip(tiny_clip(tok), tok, fusion_layers=1, max_frames=2)


def _forward(model, batch, weight):
    return model(batch, drop_ratio=0.5, rng=np.random.default_rng(0),
                 generator=torch.Generator().manual_seed(0), reverse_negatives=False,
                 loss_weights={"swap": weight})


def test_term_in_the_model(tok, monkeypatch):
    model = _model(tok)
    batch = _swap_batch(tok, CAPTIONS)
    calls = []
    forward = model.text.forward
    monkeypatch.setattr(model.text, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    off = _forward(model, batch, 0.0)
    n_off = len(calls)
    on = _forward(model, batch, 0.2)
    assert len(calls) - n_off == n_off + 1  # exactly one more text-tower pass, none at weight 0
    assert off["swap"] == 0
    assert batch["swap_index"].tolist() == [0, 1] and on["swap"] > 0
    torch.testing.assert_close(on["loss"].detach(), off["loss"].detach() + 0.2 * on["swap"])
    for k in ("vtc", "vtm", "mlm"):
        torch.testing.assert_close(on[k], off[k])
    # zero weight: the loss is exactly what it was before the term existed
    base = model(tiny_batch(tok, CAPTIONS, [2, 1, 2, 1]), drop_ratio=0.5,
                 rng=np.random.default_rng(0), generator=torch.Generator().manual_seed(0),
                 reverse_negatives=False)
    assert torch.equal(base["loss"], off["loss"])


def test_term_gradient_reaches_the_text_tower(tok):
    model = _model(tok)
    out = model(_swap_batch(tok, CAPTIONS), drop_ratio=0.5, rng=np.random.default_rng(0),
                generator=torch.Generator().manual_seed(0), reverse_negatives=False,
                loss_weights={"vtc": 0.0, "vtm": 0.0, "mlm": 0.0, "swap": 1.0})
    out["loss"].backward()
    g = model.text.token_embedding.weight.grad
    assert g is not None and g.abs().sum() > 0
    down = tok.convert_tokens_to_ids("down")  # a word only the swapped captions hold
    assert "down" not in " ".join(CAPTIONS) and g[down].abs().sum() > 0
    for p in model.text.layers[0].parameters():  # and the tower's layers
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_no_pair_still_runs_the_pass_and_gives_zero(tok):
    model = _model(tok)
    captions = ["a green circle jumps", "the blue square turns", "a red ball", "the box"]
    batch = _swap_batch(tok, captions)
    assert batch["swap_index"].numel() == 0 and batch["swap_input_ids"].shape[0] == 1
    out = _forward(model, batch, 0.5)
    assert out["swap"] == 0
    out["loss"].backward()
    assert model.text.token_embedding.weight.grad is not None


def test_weight_without_swapped_captions_says_so(tok):
    model = _model(tok)
    with pytest.raises(ValueError, match="swap=True"):
        _forward(model, tiny_batch(tok, CAPTIONS, [2, 1, 2, 1]), 0.2)


# ----------------------------------------------------------------------------- the flag
def test_flag_default_help_and_bad_value(tmp_path):
    from hvfm import config
    ds = str(Path(__file__).resolve().parents[1] / "ds_configs" / "z2.json")
    base = ["--deepspeed", ds, "--precision", "fp32", "--output-dir", str(tmp_path / "out")]
    args = config.parse_args(base)  # the video stage: its own default
    assert config.check_run(args, cuda=False)[0]["swap"] == config.SWAP_WEIGHT["video"]
    args = config.parse_args([*base, "--swap-weight", "0"])  # off when asked
    assert config.check_run(args, cuda=False)[0]["swap"] == 0.0
    args = config.parse_args([*base, "--stage", "image"])  # the image stage: on by default
    assert config.check_run(args, cuda=False)[0] == {"vtc": 1.0, "vtm": 0.0, "mlm": 0.0,
                                                      "swap": config.SWAP_WEIGHT["image"]}
    assert config.SWAP_WEIGHT["image"] > 0 and args.swap_weight == config.SWAP_WEIGHT["image"]
    args = config.parse_args([*base, "--stage", "image", "--swap-weight", "0"])
    assert config.check_run(args, cuda=False)[0]["swap"] == 0.0
    args = config.parse_args([*base, "--swap-weight", "0.1"])
    assert config.check_run(args, cuda=False)[0]["swap"] == 0.1
    for bad in ("-1", "nan"):
        with pytest.raises(config.ConfigError) as e:
            config.check_run(config.parse_args([*base, "--swap-weight", bad]), cuda=False)
        assert "\n" not in str(e.value) and "--swap-weight" in str(e.value)
    out = io.StringIO()
    with pytest.raises(SystemExit), contextlib.redirect_stdout(out):
        config.parse_args(["--help"])
    text = " ".join(out.getvalue().split())
    assert "--swap-weight W" in text and "(default: 0.2 in the image stage" in text
