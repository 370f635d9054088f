"""Every shard format prepare writes (mp4, pre-extracted jpg / webp frames): a prepared sample
decodes to the frames the sampler asked for, the same loader code path reads them (index.json
counts, resume positions), and the decode watchdog covers shard samples (hangs and crashes are
skipped and counted, as for files)."""
import io
import json
import tarfile

import numpy as np
import pytest
import torch

import decode_faults
from hvfm.data.decode import sample_indices
from hvfm.data.sources.prepare import INDEX, count_samples, prepare
from hvfm.data.loading.shards import build_shard_loader, decode_sample, shard_captions, shard_counts, expand_shards, video_of
from hvfm.data.text.tokens import ensure_tokenizer
from videos import frame_index, write_clip

N, FPS = 6, 8
LENGTHS = [20, 33, 40, 27, 24, 36]  # frames per clip: more than the 16 stored


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    rows = []
    for i, n in enumerate(LENGTHS):
        write_clip(root / f"c{i}.mp4", frames=n, width=64, height=48, fps=FPS)
        rows.append({"video": f"c{i}.mp4", "caption": f"clip number {i} moves left"})
    (root / "ann.json").write_text(json.dumps(rows))
    return root


@pytest.fixture(scope="module")
def prepared(clips, tmp_path_factory):
    """Each format, 2 clips per shard (3 shards); frames at the clips' own short side."""
    out = {}
    for fmt in ("mp4", "jpg", "webp"):
        d = tmp_path_factory.mktemp(f"shards_{fmt}") / "s"
        prepare(clips / "ann.json", clips, d, size=48, fps=FPS, shard_size=2, progress=False, fmt=fmt,
                keep_frames=16, quality=95)
        out[fmt] = d
    return out


@pytest.fixture(scope="module")
def tokenizer(prepared, tmp_path_factory):
    return ensure_tokenizer(tmp_path_factory.mktemp("tok") / "tok", shard_captions(prepared["jpg"]))


def samples(folder):
    """{key: {ext: bytes}} of every sample in a shard folder."""
    out = {}
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            for m in t:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


@pytest.mark.parametrize("fmt", ["mp4", "jpg", "webp"])
def test_a_prepared_sample_decodes_to_the_frames_the_sampler_asked_for(prepared, clips, fmt):
    index = json.loads((prepared[fmt] / INDEX).read_text())
    assert index["format"] == fmt and index["samples"] == N and index["size"] == 48
    assert [s["samples"] for s in index["shards"]] == [2, 2, 2]
    got = samples(prepared[fmt])
    assert sorted(got) == [f"{i:09d}" for i in range(N)]
    for key, s in got.items():
        row = int(key)
        meta = json.loads(s["json"])
        assert meta["row"] == row and meta["video"] == f"c{row}.mp4"
        assert s["txt"].decode() == f"clip number {row} moves left"
        video = video_of(s)
        if fmt == "mp4":
            assert set(video) == {"mp4"} and not any(k.startswith("f0") for k in s)
        else:
            assert sorted(video) == ["frames"] and len(video["frames"]) == 16
            assert sorted(k for k in s if k.startswith("f")) == [f"f{j:02d}.{fmt}" for j in range(16)]
            # the stored frames: the evaluation frames of 16 equal segments of the source clip
            assert meta["source_frames"] == LENGTHS[row]
            assert meta["frames"] == sample_indices(LENGTHS[row], 16, train=False)
        for seed in range(3):
            frames = decode_sample(video, 8, True, np.random.default_rng(seed), name=key)
            replay = np.random.default_rng(seed)
            if fmt == "mp4":  # re-encoded at the source's fps: frame i is source frame i
                want = sample_indices(LENGTHS[row], 8, True, replay)
            else:  # 8 of the 16 stored frames, one per equal segment, as a file's sampler picks
                want = [meta["frames"][j] for j in sample_indices(16, 8, True, replay)]
            assert frames.shape == (8, 48, 64, 3) and frames.dtype == np.uint8
            assert [frame_index(f) for f in frames] == want, (fmt, key, seed)
            # within codec tolerance of the pattern (flat grey 20 + 5 i)
            levels = np.array([20 + 5 * i for i in want], np.float64)[:, None, None, None]
            assert np.abs(frames.astype(np.float64) - levels).mean() < 1.5


def test_frames_formats_cost_less_than_a_video_decode_per_sample(prepared):
    """What a frames sample holds: 16 small images (here flat grey, so tiny); only the 8 sampled
    ones are decoded (a damaged unsampled frame does not fail the sample, a sampled one does)."""
    s = samples(prepared["jpg"])["000000001"]
    video = video_of(s)
    wanted = sample_indices(16, 8, True, np.random.default_rng(0))
    spare = next(j for j in range(16) if j not in wanted)
    broken = {"frames": list(video["frames"])}
    broken["frames"][spare] = b"not a jpeg"
    a = decode_sample(video, 8, True, np.random.default_rng(0))
    b = decode_sample(broken, 8, True, np.random.default_rng(0))
    assert np.array_equal(a, b)
    broken["frames"][wanted[0]] = b"not a jpeg"
    from hvfm.data import DecodeError
    rng = np.random.default_rng(0)
    with pytest.raises(DecodeError, match="x.tar:1: frames: "):
        decode_sample(broken, 8, True, rng, name="x.tar:1")
    assert rng.bit_generator.state == np.random.default_rng(0).bit_generator.state  # draws given back


def test_frames_shards_go_through_the_same_loader_path(prepared, tokenizer):
    """index.json counts equal the tars' own, and an epoch over jpg shards covers every sample
    once per epoch over 3 ranks x 1 worker (a shard per slot), as mp4 shards do."""
    urls = expand_shards(prepared["jpg"])
    assert shard_counts(urls) == {u: count_samples(u) for u in urls}
    seen = {}
    for fmt in ("mp4", "jpg"):
        got = []
        for rank in (0, 1, 2):
            loader = build_shard_loader(prepared[fmt], tokenizer, batch_size=1, frames=4, size=32,
                                        num_workers=1, rank=rank, world_size=3, shuffle_buffer=0, seed=2)
            for b in loader:
                assert b["pixels"].shape == (1, 4, 3, 32, 32) and b["n_skipped"] == 0
                got += b["index"].tolist()
        seen[fmt] = got
        assert sorted(got) == list(range(N))
    assert seen["mp4"] == seen["jpg"]  # the same slots read the same samples: one code path


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_positions_hold_on_frames_shards(prepared, tokenizer, workers):
    def make():
        return build_shard_loader(prepared["jpg"], tokenizer, batch_size=1, frames=4, size=32,
                                  num_workers=workers, shuffle_buffer=0, seed=1)

    ref = list(make())
    assert len(ref) == N
    part = make()
    it = iter(part)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))
    del it
    resumed = make()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == N - 3
    for a, b in zip(ref[3:], rest):
        for k in ("pixels", "index", "mlm_input_ids", "input_ids"):
            assert torch.equal(a[k], b[k]), k
    assert resumed.position == N


@pytest.mark.parametrize("fmt,workers", [("jpg", 0), ("mp4", 2)])
def test_the_watchdog_covers_shard_samples(prepared, tokenizer, monkeypatch, fmt, workers):
    """A shard sample whose decode hangs for ever (signals blocked) or segfaults is abandoned,
    skipped and counted; the epoch completes with the other samples, in the same order as a run
    without the watchdog."""
    plain = build_shard_loader(prepared[fmt], tokenizer, batch_size=1, frames=4, size=32,
                               num_workers=workers, shuffle_buffer=0, seed=4)
    ref = [(b["shard_slot"], int(b["index"]), b["pixels"]) for b in plain]  # every sample once
    decode_faults.install("hang:000000003,crash:000000005", monkeypatch)
    loader = build_shard_loader(prepared[fmt], tokenizer, batch_size=1, frames=4, size=32,
                                num_workers=workers, shuffle_buffer=0, seed=4, decode_timeout=3.0)
    got = [(b["shard_slot"], int(b["index"]), b["pixels"]) for b in loader]
    assert len(got) == len(ref) == N  # the epoch completes (its last batches from the next pass)
    assert not {i for _, i, _ in got} & {3, 5}
    c = loader.counters()
    assert c["timeouts"] >= 1 and c["crashes"] >= 1 and c["skipped"] == c["timeouts"] + c["crashes"] == c["bad_drawn"]
    assert any(p.endswith(":000000003") and "timed out" in r for p, r in loader.bad_files.items())
    assert any(p.endswith(":000000005") and "crashed" in r for p, r in loader.bad_files.items())
    # per worker slot, the good samples of the run without faults come first, in order, and the
    # frames the watchdog's child decoded are the in-process ones
    for slot in {s for s, _, _ in ref}:
        good = [(i, x) for s, i, x in ref if s == slot and i not in (3, 5)]
        mine = [(i, x) for s, i, x in got if s == slot][:len(good)]
        assert [i for i, _ in mine] == [i for i, _ in good], slot
        for (i, a), (_, b) in zip(good, mine):
            assert torch.equal(a, b), i


def test_prepare_formats_and_settings(clips, tmp_path, capsys):
    from hvfm.data.sources.prepare import main as prepare_main
    out = tmp_path / "s"
    argv = ["--train-json", str(clips / "ann.json"), "--video-root", str(clips), "--out", str(out),
            "--format", "jpg", "--keep-frames", "4", "--shard-size", "3"]
    prepare_main(argv)
    index = json.loads((out / INDEX).read_text())
    assert (index["format"], index["keep_frames"], index["size"], index["quality"]) == ("jpg", 4, 256, 85)
    s = samples(out)["000000000"]
    assert sorted(k for k in s if k.startswith("f")) == ["f00.jpg", "f01.jpg", "f02.jpg", "f03.jpg"]
    from PIL import Image
    assert Image.open(io.BytesIO(s["f00.jpg"])).size == (340, 256)  # 64x48 -> short side 256
    with pytest.raises(SystemExit) as e:  # another format into the same folder: one error line
        prepare_main([*argv[:6], "--format", "webp", "--keep-frames", "4", "--shard-size", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0]
    # a folder written before formats existed (its settings name no format) is an mp4 one
    old = tmp_path / "old"
    prepare(clips / "ann.json", clips, old, size=48, shard_size=3, progress=False)
    settings = json.loads((old / ".parts" / "settings.json").read_text())
    settings.pop("format")
    (old / ".parts" / "settings.json").write_text(json.dumps(settings))
    assert prepare(clips / "ann.json", clips, old, size=48, shard_size=3, progress=False)["samples"] == N


def test_prepare_reads_frames_with_the_decoder_asked_for(clips, prepared, tmp_path):
    """--decoder pyav stores the same source frames as decord (the default here)."""
    out = tmp_path / "pyav"
    prepare(clips / "ann.json", clips, out, size=48, shard_size=2, progress=False, fmt="jpg",
            keep_frames=16, quality=95, decoder="pyav")
    a, b = samples(prepared["jpg"]), samples(out)
    for key in a:
        assert json.loads(a[key]["json"]) == json.loads(b[key]["json"])
        fa, fb = frame_members_of(a[key]), frame_members_of(b[key])
        assert [frame_index(x) for x in fa] == [frame_index(x) for x in fb]


def frame_members_of(s):
    from hvfm.data.loading.shards import decode_image, frame_members
    return [decode_image(x) for x in frame_members(s)]
