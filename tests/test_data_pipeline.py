"""Transforms, captions, tokenizer, MLM masking, the loader with bad files, sharding and resume."""
import csv
import logging

import numpy as np
import pytest
import torch

from hvfm.data import (DataError, MLMMasker, ResumableDistributedSampler, VideoTransform,
                       build_loader, build_tokenizer, clean_caption, load_tokenizer,
                       read_annotations, tokenize)
from hvfm.data.text.tokens import swap_left_right
from hvfm.data.transforms.device import PARAMS, prepare_batch
from hvfm.data.transforms.host import pixel_range
from videos import BROKEN_KINDS, write_broken, write_clip

CAPTIONS = ["a red circle moves left", "a blue square moves right",
            "a green triangle appears, then a red circle", "a white cross moves up",
            "a yellow star moves down slowly", "the cyan square appears then disappears"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(CAPTIONS * 3, tmp_path_factory.mktemp("tok"), vocab_size=400)


def test_train_and_eval_transforms(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
    low, high = pixel_range()
    for train in (True, False):
        for _ in range(10):
            x, flipped = VideoTransform(32, train)(frames, rng)
            assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
            for c in range(3):
                assert low[c] - 1e-5 <= x[:, c].min() and x[:, c].max() <= high[c] + 1e-5
            assert train or not flipped
    # Evaluation is deterministic and centred; one crop serves every frame of the clip.
    same = np.repeat(frames[:1], 5, axis=0)
    x, _ = VideoTransform(32, True)(same, rng)
    assert torch.allclose(x[0], x[4])
    a, _ = VideoTransform(32, False)(frames)
    b, _ = VideoTransform(32, False)(frames)
    assert torch.equal(a, b)
    flips = [VideoTransform(32, True)(frames, rng)[1] for _ in range(200)]
    assert 60 < sum(flips) < 140


def test_caption_cleaning_and_flip_swap():
    assert clean_caption("Aerial view: Sunset over the sea-shore!! &amp; birds.") == \
        "aerial view sunset over the sea shore & birds"
    assert clean_caption("  One   two three four ", max_words=2) == "one two"
    assert swap_left_right("moves left, then right; leftwards bright") == \
        "moves right, then left; rightwards bright"


def test_tokenizer_folder_round_trip(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path / "copy"))
    again = load_tokenizer(tmp_path / "copy")
    ids, attn, special = tokenize(again, CAPTIONS[:2])
    ids0, _, _ = tokenize(tokenizer, CAPTIONS[:2])
    assert torch.equal(ids, ids0)
    assert ids[0, 0] == again.bos_token_id and ids[0, attn[0].sum() - 1] == again.eos_token_id
    assert again.mask_token_id is not None and again.pad_token_id is not None
    assert again.decode(ids[0], skip_special_tokens=True).replace(" ", "") == CAPTIONS[0].replace(" ", "")
    with pytest.raises(DataError, match="not a tokenizer folder"):
        load_tokenizer(tmp_path / "nothing")


def test_mlm_masking_statistics(tokenizer):
    masker = MLMMasker(tokenizer, ratio=0.5)
    ids, attn, special = tokenize(tokenizer, CAPTIONS * 50)
    gen = torch.Generator().manual_seed(0)
    chosen = replaced_mask = replaced_random = kept = eligible_total = 0
    for _ in range(20):
        masked, labels = masker(ids, attn, special, gen)
        eligible = (attn == 1) & (special == 0)
        sel = labels != -100
        assert not (sel & ~eligible).any()  # specials and padding never masked
        assert torch.equal(masked[~sel], ids[~sel])
        assert torch.equal(labels[sel], ids[sel])
        chosen += sel.sum().item()
        eligible_total += eligible.sum().item()
        replaced_mask += (masked[sel] == tokenizer.mask_token_id).sum().item()
        same = masked[sel] == ids[sel]
        kept += same.sum().item()
        replaced_random += (~same & (masked[sel] != tokenizer.mask_token_id)).sum().item()
    assert abs(chosen / eligible_total - 0.5) < 0.02
    assert abs(replaced_mask / chosen - 0.8) < 0.02
    # A random replacement can draw the original token, so 'kept' is slightly above 10%.
    assert 0.08 < replaced_random / chosen < 0.11 and 0.09 < kept / chosen < 0.12
    special_ids = set(tokenizer.all_special_ids)
    assert not any(int(t) in special_ids and t != tokenizer.mask_token_id
                   for t in masked[(labels != -100) & (masked != ids)])


def _corpus(tmp_path, broken=()):
    root = tmp_path / "v"
    rows = []
    for i in range(12):
        write_clip(root / "000" / f"{i}.mp4", frames=12 if i % 3 else 5)
        rows.append((str(i), "000", CAPTIONS[i % len(CAPTIONS)]))
    good = root / "000" / "1.mp4"
    for j, kind in enumerate(broken):
        vid = f"bad{j}"
        write_broken(root / "000" / f"{vid}.mp4", kind, good=good)
        rows.append((vid, "000", f"broken {kind}"))
    path = tmp_path / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        w.writerows([vid, "", "PT00H00M01S", page, name] for vid, page, name in rows)
    return read_annotations(path, root)


def _all(loader):
    return list(loader)


def test_loader_batches_and_padding(tmp_path, tokenizer):
    ann = _corpus(tmp_path)
    loader = build_loader(ann, tokenizer, batch_size=4, frames=8, size=32, num_workers=0, seed=1,
                          device_transform=True)
    batches = _all(loader)
    assert len(batches) == 3
    b = batches[0]
    # Workers send uint8 frames at the decoder's size and a crop row per sample ...
    assert b["pixels"].dtype == torch.uint8 and b["pixels"].shape == (4, 8, 48, 64, 3)
    assert b["crop"].shape == (4, len(PARAMS))
    # ... which the device transform turns into model pixels; a CPU-only loader runs the same
    # function in its workers (pin_memory off: device_transform defaults to False).
    b = prepare_batch(b, "cpu")
    host = _all(build_loader(ann, tokenizer, batch_size=4, frames=8, size=32, num_workers=0, seed=1))
    assert "crop" not in host[0] and torch.equal(host[0]["pixels"], b["pixels"])
    assert "crop" not in b and b["pixels"].dtype == torch.float32
    assert b["pixels"].shape[0] == 4 and b["pixels"].shape[2:] == (3, 32, 32)
    assert b["input_ids"].shape == b["mlm_labels"].shape == b["attention_mask"].shape
    for i, n in enumerate(b["num_frames"].tolist()):
        assert n in (5, 8)  # the 5-frame clips report 5 frames ...
        assert (b["pixels"][i, n:] == 0).all()  # ... and are zero-padded after them
    assert sorted(i for b in batches for i in b["index"].tolist()) == list(range(12))


def test_loader_same_batches_for_any_worker_count(tmp_path, tokenizer):
    ann = _corpus(tmp_path)
    runs = []
    for workers in (0, 2):
        loader = build_loader(ann, tokenizer, batch_size=4, frames=4, size=32, num_workers=workers, seed=7)
        loader.set_epoch(1)
        runs.append(_all(loader))
    for a, b in zip(*runs):
        for key in ("pixels", "mlm_input_ids", "mlm_labels", "index"):
            assert torch.equal(a[key], b[key]), key
    loader.set_epoch(2)
    assert not torch.equal(_all(loader)[0]["index"], runs[1][0]["index"])  # a new epoch reshuffles


def test_broken_files_are_skipped_counted_and_logged_once(tmp_path, tokenizer, caplog):
    ann = _corpus(tmp_path, broken=BROKEN_KINDS)
    n_broken = len(BROKEN_KINDS)
    loader = build_loader(ann, tokenizer, batch_size=6, frames=4, size=32, num_workers=2, seed=3)
    with caplog.at_level(logging.WARNING, logger="hvfm.data"):
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = _all(loader)
            assert sum(len(b["index"]) for b in batches) == len(ann) // 6 * 6
    bad_paths = {str(ann.resolve(i)) for i in range(12, 12 + n_broken)}
    assert set(loader.bad_files) == bad_paths  # every broken file was drawn over two epochs
    # Every failure counts: at least one per broken row per epoch, and replacements can fail again.
    assert loader.skipped >= 2 * n_broken - 2  # drop_last may leave a broken row out of an epoch
    warned = [r for r in caplog.records if r.name == "hvfm.data"]
    assert len(warned) == n_broken  # each bad file logged exactly once
    for b in batches:
        assert not any(c.startswith("broken") for c in b["captions"])


def test_all_broken_fails_with_one_clear_error(tmp_path, tokenizer):
    ann = _corpus(tmp_path, broken=("empty",))
    ann.root = tmp_path / "elsewhere"
    (tmp_path / "elsewhere").mkdir()
    loader = build_loader(ann, tokenizer, batch_size=2, frames=4, size=32, num_workers=0, max_retries=3)
    with pytest.raises(DataError, match="4 samples in a row failed to decode.*missing file"):
        _all(loader)


def test_sampler_shards_and_resumes():
    n, world = 10, 3
    shards = [list(ResumableDistributedSampler(n, world, r, shuffle=True, seed=5)) for r in range(world)]
    assert all(len(s) == 4 for s in shards)  # padded to equal length
    assert set(i for s in shards for i, _ in s) == set(range(n))
    s = ResumableDistributedSampler(n, world, 1, shuffle=True, seed=5)
    s.set_epoch(0, start=2)
    assert list(s) == shards[1][2:]
    s.set_epoch(1)
    assert [e for _, e in s] == [1] * 4 and [i for i, _ in s] != [i for i, _ in shards[1]]


def test_loader_resume_state(tmp_path, tokenizer):
    ann = _corpus(tmp_path)
    full = build_loader(ann, tokenizer, batch_size=2, frames=4, size=32, num_workers=0, seed=2)
    full.set_epoch(0)
    expected = _all(full)
    partial = build_loader(ann, tokenizer, batch_size=2, frames=4, size=32, num_workers=0, seed=2)
    partial.set_epoch(0)
    it = iter(partial)
    next(it), next(it)
    state = partial.state_dict()
    assert state["position"] == 4
    resumed = build_loader(ann, tokenizer, batch_size=2, frames=4, size=32, num_workers=0, seed=2)
    resumed.load_state_dict(state)
    rest = _all(resumed)
    assert len(rest) == len(expected) - 2
    for a, b in zip(rest, expected[2:]):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["mlm_input_ids"], b["mlm_input_ids"])
