"""bench_data on generated WebVid-resolution clips (one file per clip and tar shards) and the epoch
projection that reads its figure. Tiny settings; nothing here asserts a speed."""
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling import bench_data, project_epoch  # noqa: E402
from profiling.machine import machine_info  # noqa: E402


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_data")
    bench_data.main(["--gen-clips", "2", "--gen-seconds", "1", "1.5", "--copies", "2", "--clips", "2",
                     "--batch-size", "1", "--workers", "0", "1", "--frames", "2", "--size", "32",
                     "--cache", str(tmp / "cache"), "--out", str(tmp / "out" / "bench_data.json")])
    return tmp


def test_bench_data_times_files_and_shards_of_generated_clips(bench):
    import av
    d = json.loads((bench / "out" / "bench_data.json").read_text())
    assert [(r["source"], r["workers"]) for r in d["results"]] == \
        [("files", 0), ("files", 1), ("shards", 0), ("shards", 1)]
    for r in d["results"]:
        assert positive(r["clips_per_s"]) and r["clips"] >= 2 and r["skipped"] == 0
        assert r["clips_per_s_per_worker"] == pytest.approx(r["clips_per_s"] / max(r["workers"], 1))
    assert d["machine"]["versions"]["torch"] and len(d["load_average_1min"]) == 5
    clips = sorted((bench / "cache").glob("clips_*/clip*.mp4"))
    assert [c.name for c in clips] == ["clip000.mp4", "clip001.mp4"]
    for c, seconds in zip(clips, d["clip_seconds"]):
        assert 1 <= seconds <= 1.5
        with av.open(str(c)) as f:
            s = f.streams.video[0]
            assert (s.codec_context.width, s.codec_context.height) == (640, 360)
            assert s.frames == round(seconds * 25)
    index = json.loads((Path(d["shards"]) / "index.json").read_text())
    assert index["samples"] == 4 and index["size"] == 32 and index["bad_files"] == 0
    import tarfile
    with tarfile.open(Path(d["shards"]) / index["shards"][0]["name"]) as t:
        mp4 = t.extractfile("000000000.mp4").read()  # clip000 at 25 fps -> 8 fps, short side 32
    import io
    with av.open(io.BytesIO(mp4)) as f:
        s = f.streams.video[0]
        assert (s.codec_context.width, s.codec_context.height) == (56, 32)  # 640x360 -> 57x32, even
        assert abs(s.frames - d["clip_seconds"][0] * 8) <= 1
    md = (bench / "out" / "bench_data.md").read_text()
    assert "| shards | 1 |" in md and "| files | 0 |" in md and "640x360" in md


def fake_train_json(path, rates):
    """A bench_train payload holding only what project_epoch reads (its inputs, not results)."""
    path.write_text(json.dumps({
        "machine": machine_info(), "config": {"preset": "tiny", "frames": 2, "size": 32, "batch": 1},
        "results": [{"drop": d, "fused": {"samples_per_s": f}, "unfused": {"samples_per_s": u}}
                    for d, f, u in rates]}))
    return path


def test_projection_uses_the_shards_figure_and_says_so(bench, tmp_path):
    data_json = bench / "out" / "bench_data.json"
    d = json.loads(data_json.read_text())
    row = {(r["source"], r["workers"]): r for r in d["results"]}
    train = fake_train_json(tmp_path / "bench_train.json", [("0.5", 30.0, 20.0), ("0.75", 50.0, 25.0)])
    p = project_epoch.main(["--train-json", str(train), "--data-json", str(data_json), "--workers-per-gpu", "4",
                            "--gpus", "1", "8", "--out", str(tmp_path)])
    per_worker = row[("shards", 1)]["clips_per_s"]
    assert p["decode_source"] == "shards, 1 worker"
    assert p["decode_clips_per_s_per_worker"] == pytest.approx(per_worker)
    for r in p["results"]:
        assert r["decode_clips_per_s"] == pytest.approx(r["gpus"] * 4 * per_worker)
    check = p["paper_check"]
    assert check["gpus"] == 8 and check["hours"] == 24
    assert check["data_bound_epoch_hours"] == pytest.approx(10.7e6 / (8 * 4 * per_worker) / 3600)
    assert check["workers_per_gpu_for_a_day"] == pytest.approx(10.7e6 / (24 * 3600) / 8 / per_worker)
    within = "within a day" if check["data_bound_epoch_hours"] < 24 else "NOT within a day"
    md = (tmp_path / "project_epoch.md").read_text()
    assert "paper check" in md and within in md and "shards, 1 worker" in md

    p = project_epoch.main(["--train-json", str(train), "--data-json", str(data_json), "--decode-source",
                            "files", "--gpus", "8", "--out", str(tmp_path)])
    assert p["decode_source"] == "files, 1 worker"
    assert p["decode_clips_per_s_per_worker"] == pytest.approx(row[("files", 1)]["clips_per_s"])


def test_projection_without_shard_rows_names_the_missing_source(bench, tmp_path):
    d = json.loads((bench / "out" / "bench_data.json").read_text())
    d["results"] = [r for r in d["results"] if r["source"] == "files"]
    data_json = tmp_path / "bench_data.json"
    data_json.write_text(json.dumps(d))
    train = fake_train_json(tmp_path / "bench_train.json", [("0.5", 30.0, 20.0)])
    with pytest.raises(SystemExit, match="no measured rows of source 'shards'"):
        project_epoch.main(["--train-json", str(train), "--data-json", str(data_json), "--decode-source",
                            "shards", "--out", str(tmp_path)])
    p = project_epoch.main(["--train-json", str(train), "--data-json", str(data_json), "--out", str(tmp_path)])
    assert p["decode_source"] == "files, 1 worker"  # auto: files when no shards were measured
