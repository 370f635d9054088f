"""Annotation files, path layouts, decoding, frame sampling and bad input."""
import csv
import json

import numpy as np
import pytest

from hvfm.data import DataError, DecodeError, decode_clip, read_annotations, sample_indices
from hvfm.data.decode import middle_pair, take_frames
from hvfm.data.sources.annotations import WEBVID_COLUMNS, StringColumn
from videos import BROKEN_KINDS, frame_index, write_broken, write_clip


def write_webvid(path, rows, header=WEBVID_COLUMNS):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for vid, page, name in rows:
            full = {"videoid": vid, "contentUrl": f"https://example.invalid/{vid}.mp4",
                    "duration": "PT00H00M05S", "page_dir": page, "name": name}
            w.writerow([full[h] for h in header])
    return path


def test_string_column_round_trip():
    items = ["a", "", "ünïcode ✓", "x" * 1000]
    col = StringColumn(items)
    assert list(col) == items and len(col) == 4 and col[-1] == items[-1]
    with pytest.raises(IndexError):
        col[4]


@pytest.mark.parametrize("nested", [True, False])
def test_webvid_layouts(tmp_path, nested):
    root = tmp_path / "videos"
    rows = [(f"{1000 + i}", f"{i // 2:03d}", f"Caption number {i}.") for i in range(4)]
    for vid, page, _ in rows:
        write_clip(root / page / f"{vid}.mp4" if nested else root / f"{vid}.mp4", frames=4)
    ann = read_annotations(write_webvid(tmp_path / "train.csv", rows), root)
    assert ann.num_videos == 4 and len(ann) == 4
    for i, (vid, page, name) in enumerate(rows):
        expected = root / page / f"{vid}.mp4" if nested else root / f"{vid}.mp4"
        assert ann.resolve(i) == expected and expected.exists()
        assert ann.captions_of(i) == [name]


def test_webvid_without_page_dir_reads_the_flat_layout(tmp_path):
    root = tmp_path / "flat"
    rows = [("7", "", "a caption"), ("8", "", "another one")]
    for vid, _, _ in rows:
        write_clip(root / f"{vid}.mp4", frames=2)
    ann = read_annotations(write_webvid(tmp_path / "t.csv", rows, header=("videoid", "name")), root)
    assert [ann.resolve(i) for i in range(2)] == [root / "7.mp4", root / "8.mp4"]
    assert ann.captions_of(1) == ["another one"]


def test_webvid_mixed_layout_falls_back_per_row(tmp_path):
    root = tmp_path / "v"
    rows = [("1", "000", "a"), ("2", "000", "b"), ("3", "000", "c")]
    write_clip(root / "000" / "1.mp4", frames=2)
    write_clip(root / "000" / "2.mp4", frames=2)
    write_clip(root / "3.mp4", frames=2)  # this one is stored flat
    ann = read_annotations(write_webvid(tmp_path / "t.csv", rows), root)
    assert [ann.resolve(i) for i in range(3)] == [root / "000/1.mp4", root / "000/2.mp4", root / "3.mp4"]


def test_json_str_and_list_captions(tmp_path):
    root = tmp_path / "v"
    for name in ("a.mp4", "b.mp4"):
        write_clip(root / name, frames=2)
    entries = [{"video": "a.mp4", "caption": "one caption", "group": 3},
               {"video": "b.mp4", "caption": ["first", "second", "third"]}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(entries))
    ann = read_annotations(path, root)
    assert ann.num_videos == 2 and len(ann) == 4
    assert ann.captions_of(1) == ["first", "second", "third"]
    assert ann.pair_video.tolist() == [0, 1, 1, 1]
    assert ann.extra[0] == {"group": 3}
    para = read_annotations(path, root, paragraph=True)
    assert len(para) == 2 and para.captions_of(1) == ["first second third"]


def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_bad_annotation_files_fail_in_one_line(tmp_path):
    root = tmp_path / "v"
    write_clip(root / "000" / "1.mp4", frames=2)
    no_name = write_webvid(tmp_path / "noname.csv", [("1", "000", "x")],
                           header=("videoid", "contentUrl", "duration", "page_dir"))
    with pytest.raises(DataError) as e:
        read_annotations(no_name, root)
    _one_line(e, "noname.csv", "name")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(DataError) as e:
        read_annotations(empty, root)
    _one_line(e, "empty.json", "empty")
    empty_list = tmp_path / "list.json"
    empty_list.write_text("[]")
    with pytest.raises(DataError) as e:
        read_annotations(empty_list, root)
    _one_line(e, "list.json")
    ok = write_webvid(tmp_path / "ok.csv", [("1", "000", "x")])
    with pytest.raises(DataError) as e:
        read_annotations(ok, tmp_path / "nowhere")
    _one_line(e, "nowhere", "--video-root")
    with pytest.raises(DataError) as e:  # root exists but holds none of the videos
        read_annotations(ok, tmp_path)
    _one_line(e, "ok.csv", "--video-root")
    with pytest.raises(DataError) as e:
        read_annotations(tmp_path / "absent.csv", root)
    _one_line(e, "absent.csv", "not found")


def test_sampling_indices_train_and_eval():
    rng = np.random.default_rng(0)
    assert sample_indices(80, 8, train=False) == [5, 15, 25, 35, 44, 54, 64, 74]
    assert sample_indices(17, 8, train=False) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_indices(17, 1, train=False) == [8]
    # evaluation frames of a clip played backwards are the mirrored frames (no time leak)
    for n in range(2, 60):
        for f in range(1, n + 1):
            idx = sample_indices(n, f, train=False)
            assert len(set(idx)) == len(idx) == f and all(0 <= i < n for i in idx)
            if f % 2 == 0 or n % 2 == 1:  # else the middle sample falls between two frames
                assert sorted(n - 1 - i for i in idx) == idx, (n, f)
    for n in (8, 9, 17, 100, 1001):
        for _ in range(20):
            idx = sample_indices(n, 8, train=True, rng=rng)
            edges = (np.arange(9) * n) // 8
            assert len(idx) == 8
            assert all(edges[i] <= idx[i] < edges[i + 1] for i in range(8))
    assert sample_indices(5, 8, train=True, rng=rng) == [0, 1, 2, 3, 4]  # short clip: all frames
    assert sample_indices(0, 8, train=False) == []
    draws = {tuple(sample_indices(100, 4, True, rng)) for _ in range(50)}
    assert len(draws) > 40  # training sampling is random


def test_one_frame_evaluation_takes_the_exact_middle():
    clip = np.arange(17 * 2, dtype=np.uint8).reshape(17, 1, 2, 1) * 3  # frame i holds 6i, 6i+3

    def get_from(c):
        return lambda idx: c[idx]
    one = take_frames(get_from(clip), 17, 1, train=False)  # odd: frame (n - 1) / 2 = 8
    assert one.shape == (1, 1, 2, 1) and (one == clip[8:9]).all()
    even = clip[:16]
    assert middle_pair(16, 1, False) == [7, 8]
    one = take_frames(get_from(even), 16, 1, train=False)  # even: mean of frames 7 and 8
    assert one.shape == (1, 1, 2, 1) and one.ravel().tolist() == [45, 48]
    # the clip played backwards gives the same frame (frame n // 2 alone would not: 48 vs 42)
    assert (take_frames(get_from(even[::-1]), 16, 1, train=False) == one).all()
    assert take_frames(get_from(even), 16, 1, False).dtype == np.uint8
    odd_pair = np.array([[[[0]]], [[[255]]]], np.uint8)
    assert take_frames(get_from(odd_pair), 2, 1, False).ravel().tolist() == [128]
    # several frames, training, or a single-frame clip: sample_indices unchanged
    assert middle_pair(16, 2, False) is None and middle_pair(16, 1, True) is None
    assert middle_pair(1, 1, False) is None and middle_pair(17, 1, False) is None
    picked = take_frames(get_from(even), 16, 4, False)
    assert (picked == even[sample_indices(16, 4, False)]).all()


@pytest.mark.parametrize("decoder", ["decord", "pyav"])
@pytest.mark.parametrize("frames", [16, 17])
def test_one_frame_of_a_motion_group_cannot_read_the_direction(tmp_path, decoder, frames):
    """The synthetic test split's 4 clips of a motion group pass the same point at the middle:
    one-frame evaluation of an odd-length clip sees the same picture in all four (up to the
    codec's noise). An even-length clip has no middle frame: the mean of its two middle frames
    is the same for opposite directions (the axis shows, the direction does not), where frame
    n // 2 alone would show where the object is going."""
    from hvfm.data.synthetic.clips import generate
    corpus = generate(tmp_path / "syn", n_train=1, n_test=6, frames=frames, size=32, seed=0)
    entries = json.loads(corpus.test_json.read_text())
    clips = {e["variant"]: corpus.test_root / e["video"] for e in entries if e["kind"] == "motion"}
    assert sorted(clips) == ["down", "left", "right", "up"]
    mid = {d: decode_clip(p, 1, train=False, decoder=decoder)[0].astype(int)
           for d, p in clips.items()}
    assert all(m.shape == (1, 32, 32, 3) for m in mid.values())
    every = {d: decode_clip(p, frames, train=False, decoder=decoder)[0].astype(int)
             for d, p in clips.items()}
    same = [("left", "right"), ("up", "down")] + ([("left", "up")] if frames % 2 else [])
    spread = max(np.abs(mid[a] - mid[b]).max() for a, b in same)
    moved = min(np.abs(every[a][frames // 2] - every[b][frames // 2]).max()
                for a, b in [("left", "right"), ("up", "down")])
    if frames % 2:
        assert all((every[d][frames // 2] == mid[d][0]).all() for d in clips)  # frame 8 itself
        assert spread < 40, spread
    else:
        assert spread < 40 < moved, (spread, moved)


@pytest.mark.parametrize("decoder", ["decord", "pyav", "auto"])
def test_decoders_agree_on_frames(tmp_path, decoder):
    path = write_clip(tmp_path / "c.mp4", frames=40, width=128, height=64)
    frames, used = decode_clip(path, 8, train=False, short_side=32, decoder=decoder)
    assert frames.dtype == np.uint8 and frames.shape == (8, 32, 64, 3)  # aspect kept
    assert [frame_index(f) for f in frames] == sample_indices(40, 8, train=False)
    assert used == ("decord" if decoder == "auto" else decoder)
    a, _ = decode_clip(path, 8, True, np.random.default_rng(5), 32, decoder)
    b, _ = decode_clip(path, 8, True, np.random.default_rng(5), 32, "pyav")
    assert [frame_index(f) for f in a] == [frame_index(f) for f in b]


def test_short_clip_gives_fewer_frames(tmp_path):
    path = write_clip(tmp_path / "short.mp4", frames=3)
    frames, _ = decode_clip(path, 8, train=True, rng=np.random.default_rng(0))
    assert len(frames) == 3 and [frame_index(f) for f in frames] == [0, 1, 2]


@pytest.mark.parametrize("kind", BROKEN_KINDS)
def test_broken_files_raise_decode_error(tmp_path, kind):
    good = write_clip(tmp_path / "good.mp4", frames=20)
    bad = write_broken(tmp_path / f"{kind}.mp4", kind, good=good)
    with pytest.raises(DecodeError) as e:
        decode_clip(bad, 4, train=True, rng=np.random.default_rng(0), short_side=32)
    assert e.value.path == str(bad) and e.value.reason
