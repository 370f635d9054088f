"""Tar shards: `python -m hvfm.data.prepare` (re-encode, bad files, resume after an interruption),
decoding mp4 bytes from memory, the shard loader (batch format of the map-style loader, split by
rank and worker, shuffle, exact resume) and the trainer end to end with --train-shards."""
import csv
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hvfm.data import DataError, DecodeError, build_loader, decode_clip, read_annotations
from hvfm.data.sources.prepare import BAD_FILES, INDEX, main as prepare_main, prepare
from hvfm.data.loading.shards import build_shard_loader, decode_bytes, expand_shards, shard_captions
from hvfm.data.synthetic.clips import generate
from hvfm.data.text.tokens import clean_caption, ensure_tokenizer

ROOT = Path(__file__).resolve().parents[1]
N = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), n_train=N, n_test=4, frames=17, size=32, seed=0)


@pytest.fixture(scope="module")
def shards(corpus, tmp_path_factory):
    """The whole corpus at its own size, 2 videos per shard: 8 shards."""
    out = tmp_path_factory.mktemp("shards") / "s"
    prepare(corpus.train_csv, corpus.train_root, out, size=32, fps=8, shard_size=2, progress=False)
    return out


@pytest.fixture(scope="module")
def tokenizer(shards, tmp_path_factory):
    return ensure_tokenizer(tmp_path_factory.mktemp("tok") / "tok", shard_captions(shards))


def tar_members(path):
    import tarfile
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isfile()}


def keyframes(data):
    import av
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(s))
        return len(frames), (s.codec_context.width, s.codec_context.height), \
            [i for i, f in enumerate(frames) if f.key_frame]


def test_prepare_reencodes_lists_bad_files_and_resumes(corpus, tmp_path, capsys):
    ann = read_annotations(corpus.train_csv, corpus.train_root)
    root = tmp_path / "videos"
    import shutil
    shutil.copytree(corpus.train_root, root)
    garbage, missing = ann.videos[3], ann.videos[7]
    (root / garbage).write_bytes(os.urandom(3000))
    (root / missing).unlink()
    out = tmp_path / "shards"
    argv = ["--train-csv", str(corpus.train_csv), "--video-root", str(root), "--out", str(out),
            "--size", "24", "--fps", "4", "--shard-size", "5", "--workers", "2"]
    prepare_main(argv)
    assert "2 bad file(s) left out" in capsys.readouterr().out
    index = json.loads((out / INDEX).read_text())
    assert [s["name"] for s in index["shards"]] == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]
    assert [s["samples"] for s in index["shards"]] == [4, 4, 5, 1] and index["samples"] == N - 2
    bad = [line.split("\t") for line in (out / BAD_FILES).read_text().splitlines()]
    assert [Path(p).name for p, _ in bad] == [Path(garbage).name, Path(missing).name]
    assert "missing file" in bad[1][1]

    with open(corpus.train_csv) as f:
        names = [r["name"] for r in csv.DictReader(f)]
    members = tar_members(out / "000000.tar")
    assert sorted(members) == [f"00000000{i}.{x}" for i in (0, 1, 2, 4) for x in ("json", "mp4", "txt")]
    assert members["000000004.txt"].decode() == names[4]
    assert json.loads(members["000000004.json"]) == {"video": ann.videos[4], "row": 4}
    # 17 frames at 8 fps (2.125 s) -> 4 fps: 9 frames, short side 24, a key frame at least every second
    n, size, keys = keyframes(members["000000000.mp4"])
    assert (n, size, keys[0]) == (9, (24, 24), 0) and np.diff([*keys, n]).max() <= 4 and len(keys) >= 3

    # Interrupted: shard 1 lost, a half-written shard left behind, no index yet.
    kept = {n: (out / n).stat().st_mtime_ns for n in ("000000.tar", "000002.tar", "000003.tar")}
    before = (out / "000001.tar").read_bytes()
    (out / "000001.tar").unlink()
    (out / ".tmp-000001.tar").write_bytes(b"half a tar")
    (out / INDEX).unlink()
    prepare_main(argv)
    assert "3 already done, 1 to write" in capsys.readouterr().out
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # finished shards kept
    assert (out / "000001.tar").read_bytes() == before  # the redone one: the same bytes
    assert not list(out.glob(".tmp-*")) and json.loads((out / INDEX).read_text()) == index

    with pytest.raises(SystemExit) as e:  # other settings into the same folder: one error line
        prepare_main([*argv[:-6], "--size", "32", "--fps", "4", "--shard-size", "5"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out") and "other settings" in err[0]


def test_decode_bytes_equals_decoding_the_file(shards, tmp_path):
    members = tar_members(shards / "000000.tar")
    data = members["000000001.mp4"]
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    for decoder, side in (("decord", None), ("pyav", 16), ("auto", 16)):
        for train in (False, True):
            a, _ = decode_clip(path, 5, train, np.random.default_rng(3), short_side=side, decoder=decoder)
            b = decode_bytes(data, 5, train, np.random.default_rng(3), short_side=side, decoder=decoder)
            assert a.shape == (5, side or 32, side or 32, 3) and np.array_equal(a, b), (decoder, train)
    with pytest.raises(DecodeError) as e:
        decode_bytes(os.urandom(500), 4, name="x.tar:000000007")
    assert "x.tar:000000007" in str(e.value) and "decord" in str(e.value) and "pyav" in str(e.value)


def test_shard_batches_have_the_map_style_format(corpus, shards, tokenizer):
    ann = read_annotations(corpus.train_csv, corpus.train_root, clean=clean_caption)
    files = next(iter(build_loader(ann, tokenizer, batch_size=4, frames=3, size=24, num_workers=0)))
    loader = build_shard_loader(shards, tokenizer, batch_size=4, frames=3, size=24, num_workers=0)
    batch = next(iter(loader))
    assert set(batch) - {"shard_slot", "shard_raw"} == set(files)
    for k, v in files.items():
        if torch.is_tensor(v):
            assert batch[k].dtype == v.dtype and batch[k].shape[0] == v.shape[0], k
    assert batch["pixels"].shape == files["pixels"].shape == (4, 3, 3, 24, 24)
    captions = set(shard_captions(shards).pair_caption)
    assert all(c in captions or c.replace("right", "left") in captions or c.replace("left", "right") in captions
               for c in batch["captions"])
    assert len(loader) == N // 4 and batch["n_skipped"] == 0


def indices(loader):
    return [i for b in loader for i in b["index"].tolist()]


def test_split_by_rank_and_worker_covers_the_corpus_once(shards, tokenizer):
    # 8 shards of 2 over 2 ranks x 2 workers: each slot reads 2 shards, one epoch reads each once
    seen = []
    for rank in (0, 1):
        loader = build_shard_loader(shards, tokenizer, batch_size=2, frames=2, size=16, num_workers=2,
                                    rank=rank, world_size=2, shuffle_buffer=0, seed=5)
        got = indices(loader)
        assert len(got) == len(loader) * 2 == N // 2
        seen += got
    assert sorted(seen) == list(range(N))
    # the shuffle buffer reorders, deterministically; another epoch gives another order
    a = build_shard_loader(shards, tokenizer, batch_size=2, frames=2, size=16, num_workers=0, shuffle_buffer=8)
    b = build_shard_loader(shards, tokenizer, batch_size=2, frames=2, size=16, num_workers=0, shuffle_buffer=8)
    first, again = indices(a), indices(b)
    assert first == again and first != sorted(first)
    a.set_epoch(1)
    assert indices(a) != first


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_batches_of_the_uninterrupted_run_bad_sample_included(shards, tokenizer, tmp_path, workers):
    # No shuffle buffer: exact whatever the layout (with a buffer: tests/test_resume_scale.py)
    import shutil

    import webdataset as wds
    spec = tmp_path / "s"
    shutil.copytree(shards, spec)
    with wds.TarWriter(str(spec / "000100.tar")) as w:  # not in index.json: counted from the tar
        w.write({"__key__": "000000100", "mp4": os.urandom(2000), "txt": "a broken clip"})
        w.write({"__key__": "000000101", "mp4": tar_members(shards / "000000.tar")["000000000.mp4"],
                 "txt": "a red circle moves left"})

    def make():
        return build_shard_loader(spec, tokenizer, batch_size=3, frames=2, size=16, num_workers=workers,
                                  shuffle_buffer=0, seed=1)

    full = make()
    assert len(full) == (N + 2) // 3
    ref = list(full)
    assert full.skipped >= 1 and any(f.endswith("000100.tar:000000100") for f in full.bad_files)
    part = make()
    it = iter(part)
    for _ in range(2):
        next(it)
    state = json.loads(json.dumps(part.state_dict()))  # as a checkpoint's client state keeps it
    del it
    resumed = make()
    resumed.load_state_dict(state)
    assert len(resumed) == len(ref) - 2
    rest = list(resumed)
    assert len(rest) == len(ref) - 2
    for a, b in zip(ref[2:], rest):
        for k in ("pixels", "index", "mlm_input_ids", "mlm_labels", "input_ids"):
            assert torch.equal(a[k], b[k]), k
    assert resumed.position == full.position


def test_shard_specs_and_errors(shards, tokenizer, tmp_path):
    assert expand_shards(shards) == [str(shards / f"{k:06d}.tar") for k in range(8)]
    assert expand_shards(f"{shards}/{{000002..000004}}.tar") == [str(shards / f"{k:06d}.tar") for k in (2, 3, 4)]
    with pytest.raises(DataError, match="2 of 3 shard.s. missing, first .*000008.tar"):
        expand_shards(f"{shards}/{{000007..000009}}.tar")
    with pytest.raises(DataError, match="no such folder or file; give the folder python -m hvfm.data.prepare wrote"):
        expand_shards(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tar shards; write them with python -m hvfm.data.prepare"):
        expand_shards(tmp_path / "empty")
    with pytest.raises(DataError, match="fewer than one batch of 16 for each of 2 rank"):
        build_shard_loader(shards, tokenizer, batch_size=16, world_size=2)


def test_trainer_takes_one_data_source(shards, corpus, tmp_path, capsys):
    from hvfm import train as train_mod
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--deepspeed", "ds_configs/z2.json", "--train-shards", str(shards), "--train-csv",
                        str(corpus.train_csv), "--video-root", str(corpus.train_root), "--output-dir", str(out)])
    assert e.value.code == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")]
    assert lines == ["error: --train-csv, --train-json, --train-shards: give one of them"]
    assert not out.exists()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(flags):
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "hvfm/train.py", *flags]
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


@pytest.mark.slow  # ~60 s (two launches); the only run of the trainer on shards
def test_trainer_on_shards_trains_and_resumes(shards, tmp_path):
    import shutil
    out = tmp_path / "run"
    flags = ["--deepspeed", "ds_configs/z2.json", "--train-shards", f"{shards}/{{000000..000007}}.tar",
             "--frames", "4", "--size", "32", "--workers", "1", "--batch-size", "2", "--precision", "fp32",
             "--max-steps", "3", "--save-every", "2", "--log-every", "1"]
    launch([*flags, "--output-dir", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["last_losses"]["loss"])
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    # Killed after the save of step 2: resume recomputes step 3 from the data position. The
    # trainer's shuffle buffer (1000) holds samples of earlier shards (2 samples each here), which
    # a resume does not go back for (hvfm/data/loading/shards.py): step 3's batch is another one of the
    # same epoch, so its losses differ; the steps, epoch and logged rows before it stay.
    again = tmp_path / "again"
    shutil.copytree(out, again)
    shutil.rmtree(again / "checkpoints" / "step00000003")
    (again / "checkpoints" / "latest").write_text("step00000002")
    launch([*flags, "--output-dir", str(again), "--resume"])
    rerun = list(csv.DictReader(open(again / "metrics.csv")))
    keys = ("step", "epoch", "loss", "vtc", "vtm", "mlm")
    assert [{k: r[k] for k in keys} for r in rerun[:2]] == [{k: r[k] for k in keys} for r in rows[:2]]
    assert [(r["step"], r["epoch"]) for r in rerun] == [(r["step"], r["epoch"]) for r in rows]
    assert np.isfinite(float(rerun[2]["loss"]))
