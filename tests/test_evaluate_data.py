"""hvfm.data.loading.evaluation: evaluation clips go through training's dataset and collate; a bad video is
reported with the batch, not replaced; the evaluation annotation readers."""
import json

import numpy as np
import pytest
import torch

from PIL import Image
from videos import write_broken, write_clip

from hvfm.data import Annotations, Collator, DataError, VideoTextDataset, read_annotations
from hvfm.data.decode import decode_clip
from hvfm.data.loading.evaluation import (EvalClipDataset, EvalCollator, clip_batches, detect_format,
                                 missing_videos, read_multiple_choice, subset_annotations)
from hvfm.data.text.tokens import build_tokenizer
from hvfm.data.transforms.device import prepare_batch
from hvfm.data.transforms.host import VideoTransform

SIZE = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three clips of 6, 10 and 3 frames, a still, a garbage file and a missing one."""
    root = tmp_path_factory.mktemp("evaldata")
    write_clip(root / "a.mp4", frames=6)
    write_clip(root / "b.mp4", frames=10)
    write_clip(root / "c.mp4", frames=3)
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "d.png")
    write_broken(root / "bad.mp4", "garbage", good=root / "a.mp4")
    entries = [{"video": "a.mp4", "caption": ["a red circle", "a circle"]},
               {"video": "bad.mp4", "caption": "broken"},
               {"video": "b.mp4", "caption": "a blue square then a star"},
               {"video": "gone.mp4", "caption": "missing"},
               {"video": "c.mp4", "caption": "a green star moves left"},
               {"video": "d.png", "caption": "a still"}]
    (root / "ann.json").write_text(json.dumps(entries))
    ann = read_annotations(root / "ann.json", root)
    tok = build_tokenizer(list(ann.pair_caption), root / "tok", vocab_size=300)
    return dict(root=root, ann=ann, tok=tok)


def test_clips_are_the_evaluation_clips_of_training_code(corpus):
    ann = corpus["ann"]
    ds = EvalClipDataset(ann, [0, 2, 4, 5], frames=4, size=SIZE)
    train_ds = VideoTextDataset(ann, 4, SIZE, train=False)
    assert len(ds) == 4
    for k, v in enumerate([0, 2, 4, 5]):
        item = ds[k]
        assert item["video"] == v and item["error"] is None
        # the first caption of the video; the pixels training's dataset gives for that pair
        pair = int(ann.video_pairs[v])
        assert item["caption"] == ann.pair_caption[pair]
        torch.testing.assert_close(item["pixels"], train_ds[pair]["pixels"], rtol=0, atol=0)
        # and what evaluation computed before the move: middle frames, resize, centre crop
        frames, _ = decode_clip(ann.resolve(v), 4, False, None, short_side=SIZE)
        ref, _ = VideoTransform(SIZE, train=False)(frames, None)
        # the workers send uint8 frames and crop rows; the pixels are made by prepare_batch
        batch = prepare_batch(EvalCollator(corpus["tok"], device_transform=True)([item]), "cpu")
        n = int(batch["num_frames"][0])
        torch.testing.assert_close(batch["pixels"][0, :n], ref, rtol=0, atol=0)
    assert [ds[k]["pixels"].shape[0] for k in range(4)] == [4, 4, 3, 1]  # c has 3 frames, d is a still


def test_a_bad_video_is_reported_not_replaced(corpus):
    ann = corpus["ann"]
    ds = EvalClipDataset(ann, [1, 3], frames=4, size=SIZE)
    bad, gone = ds[0], ds[1]
    assert bad["video"] == 1 and bad["error"][0].endswith("bad.mp4") and bad["error"][1]
    assert gone["video"] == 3 and gone["error"] == (str(corpus["root"] / "gone.mp4"), "missing file")
    assert "pixels" not in bad or bad["pixels"] is None


def test_collate_is_trainings_collate_plus_the_video_list(corpus):
    ann, tok = corpus["ann"], corpus["tok"]
    ds = EvalClipDataset(ann, range(ann.num_videos), frames=4, size=SIZE)
    samples = [ds[k] for k in range(len(ds))]
    batch = EvalCollator(tok)(samples)
    good = [s for s in samples if s["error"] is None]
    ref = Collator(tok, mask_ratio=0.0, device_transform=torch.cuda.is_available())(good)
    assert set(ref) <= set(batch)  # every key the training batch has
    assert batch["videos"] == [0, 2, 4, 5]
    assert sorted(batch["failed"]) == [1, 3]
    torch.testing.assert_close(batch["pixels"], ref["pixels"], rtol=0, atol=0)
    assert batch["num_frames"].tolist() == [4, 4, 3, 1]
    assert batch["pixels"].shape == (4, 4, 3, SIZE, SIZE)
    assert (batch["pixels"][3, 1:] == 0).all() and (batch["pixels"][2, 3] == 0).all()  # zero-padded
    assert (batch["mlm_labels"] == -100).all()  # no masking for evaluation
    empty = EvalCollator(tok)([samples[1], samples[3]])
    assert empty["videos"] == [] and empty["pixels"] is None and sorted(empty["failed"]) == [1, 3]


def test_clip_batches_keep_order_and_carry_failures(corpus):
    ann, tok = corpus["ann"], corpus["tok"]
    batches = list(clip_batches(ann, range(ann.num_videos), 4, SIZE, 2, 0, tok))
    assert [b["videos"] for b in batches] == [[0], [2], [4, 5]]
    assert [sorted(b["failed"]) for b in batches] == [[1], [3], []]
    assert list(clip_batches(ann, [], 4, SIZE, 2, 0, tok)) == []


def test_subset_and_missing_videos(corpus):
    ann = corpus["ann"]
    assert missing_videos(ann) == [3]
    sub = subset_annotations(ann, [0, 2])
    assert sub.num_videos == 2 and list(sub.pair_caption) == ["a red circle", "a circle",
                                                              "a blue square then a star"]
    assert sub.video_pairs.tolist() == [0, 2, 3] and sub.resolve(1) == corpus["root"] / "b.mp4"


def test_a_video_without_captions_is_a_one_line_error(corpus):
    ann = Annotations("x.json", corpus["root"], ["a.mp4"], [[]])
    with pytest.raises(DataError, match=r"x\.json: video a\.mp4 has no caption"):
        EvalClipDataset(ann, [0], 4, SIZE)


def test_multiple_choice_file_and_format_detection(corpus, tmp_path):
    root = corpus["root"]
    mc = tmp_path / "mc.json"
    mc.write_text(json.dumps([{"video": "a.mp4", "options": ["A Red, circle!", "x"], "answer": 0},
                              {"video": "b.mp4", "options": ["p", "q", "r"], "answer": 2,
                               "group": 7}]))
    ann, answers = read_multiple_choice(mc, root)
    assert answers.tolist() == [0, 2] and ann.video_pairs.tolist() == [0, 2, 5]
    assert ann.pair_caption[0] == "a red circle"  # cleaned like training captions
    assert ann.extra == [{}, {"group": 7}]
    assert detect_format(mc) == "mc" and detect_format(root / "ann.json") == "retrieval"
    csv = tmp_path / "w.csv"
    csv.write_text("videoid,name\n1,x\n")
    assert detect_format(csv) == "retrieval"
    odd = tmp_path / "odd.json"
    odd.write_text('[{"video": "a.mp4"}]')
    with pytest.raises(DataError, match=r"odd\.json: fits none of the annotation formats.*list_mc"):
        detect_format(odd)
