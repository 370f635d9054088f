"""bench_data on generated WebVid-resolution clips (one mp4 per clip with each decoder, every shard
format, in one run) and the epoch projection that reads its figure. Tiny settings; nothing here
asserts a speed."""
import io
import json
import math
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hvfm.data.decode import available_decoders  # noqa: E402
from profiling import bench_data, project_epoch  # noqa: E402
from profiling.machine import machine_info  # noqa: E402

ROW_FIELDS = {"source", "decoder", "workers", "clips_per_s_per_worker", "load"}


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """--quick with --max-load 0: every row is marked loaded whatever the machine's load (so the
    test is deterministic), and the marking is what is tested."""
    tmp = tmp_path_factory.mktemp("bench_data")
    bench_data.main(["--quick", "--frames", "2", "--size", "32", "--frames-size", "32", "--keep-frames", "4",
                     "--max-load", "0", "--cache", str(tmp / "cache"), "--out", str(tmp / "out" / "bench_data.json")])
    return tmp


def test_bench_data_times_every_source_in_one_run_and_marks_loaded_rows(bench):
    import av
    d = json.loads((bench / "out" / "bench_data.json").read_text())
    ready = [k for k, why in available_decoders().items() if why is None]
    want = [("files", dec) for dec in ("decord", "pyav", "torchcodec") if dec in ready]
    want += [("shards-mp4", "auto"), ("shards-jpg", "pillow"), ("shards-webp", "pillow")]
    assert [(r["source"], r["decoder"]) for r in d["results"]] == want
    assert {(m["source"], m["decoder"]) for m in d["not_run"]} == \
        {("files", dec) for dec in ("decord", "pyav", "torchcodec") if dec not in ready}
    assert all(m["why"] for m in d["not_run"])
    for r in d["results"]:
        assert ROW_FIELDS <= set(r) and r["workers"] == 1
        assert len(r["repeats"]) == 3 and all(positive(x) for x in r["repeats"])
        assert r["clips_per_s_per_worker"] == pytest.approx(sorted(r["repeats"])[1])  # the median
        assert r["load"] >= 0 and r["loaded"] and r["load_limit"] == 0 and r["vs_files_decord"] is None
        assert r["skipped"] == 0 and positive(r["bytes_per_clip"])
    assert d["loaded_rows"] == len(d["results"]) and d["auto_order"] == []
    assert len(d["load_average_1min"]) == 1 + 2 * 3 * len(d["results"])
    clips = sorted((bench / "cache").glob("clips_*/clip*.mp4"))
    assert [c.name for c in clips] == ["clip000.mp4", "clip001.mp4"]
    for c, seconds in zip(clips, d["clip_seconds"]):
        assert 1 <= seconds <= 1.5
        with av.open(str(c)) as f:
            s = f.streams.video[0]
            assert (s.codec_context.width, s.codec_context.height) == (640, 360)
    for source in d["shards"]:  # (the JSON's paths are portable placeholders: find them here)
        fmt = source.split("-")[1]
        spec, = [p for p in (bench / "cache").glob("shards_*") if f"_{fmt}_" in p.name]
        index = json.loads((Path(spec) / "index.json").read_text())
        assert index["samples"] == 4 and index["format"] == source.split("-")[1]
    md = (bench / "out" / "bench_data.md").read_text()
    assert "| shards-jpg | pillow | 1 |" in md and "LOADED" in md and "640x360" in md


def test_summarise_takes_the_median_and_keeps_loaded_rows_out_of_ratios():
    def run(rate, *load):
        return {"clips_per_s_per_worker": rate, "clips": 4, "skipped": 0, "load_seen": list(load)}
    runs = {("files", "decord", 1): [run(5.0, 0.5, 0.9), run(4.0, 0.4, 1.1), run(6.0, 0.3, 0.8)],
            ("shards-jpg", "pillow", 1): [run(50.0, 1.0, 1.2), run(70.0, 1.0, 1.3), run(60.0, 1.1, 1.9)],
            ("files", "pyav", 1): [run(2.0, 1.0, 2.5), run(3.0, 1.0, 1.0), run(1.0, 1.0, 1.0)]}
    rows = {(r["source"], r["decoder"]): r for r in bench_data.summarise(runs)}
    assert rows["files", "decord"]["clips_per_s_per_worker"] == 5.0 and rows["files", "decord"]["load"] == 1.1
    assert rows["shards-jpg", "pillow"]["vs_files_decord"] == pytest.approx(12.0)
    pyav = rows["files", "pyav"]  # load 2.5 > 2 cores (1 worker + the training process)
    assert pyav["loaded"] and pyav["vs_files_decord"] is None and pyav["load_limit"] == 2
    assert bench_data.auto_order(list(rows.values())) == ["decord"]
    assert bench_data.cores_used(0) == 1 and bench_data.cores_used(3) == 4
    loaded = {(r["source"], r["decoder"]): r for r in bench_data.summarise(runs, max_load=1.0)}
    assert loaded["files", "decord"]["loaded"] and loaded["shards-jpg", "pillow"]["vs_files_decord"] is None


def test_fewer_than_three_repeats_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_data.main(["--quick", "--repeats", "2"])
    assert ">= 3 alternated repeats" in capsys.readouterr().err


def data_json(path, rows, frames=8, size=224):
    path.write_text(json.dumps({"machine": machine_info(), "config": {"frames": frames, "size": size},
                                "data": "test rows", "results": rows}))
    return path


def row(source, decoder, rate, workers=1, loaded=False):
    return {"source": source, "decoder": decoder, "workers": workers, "clips_per_s_per_worker": rate,
            "clips_per_s": rate * workers, "load": 3.0 if loaded else 0.2, "loaded": loaded}


def train_payload(gpu, frames, size, fused, date):
    m = {**machine_info(), "gpu": gpu, "date": date}
    return {"machine": m, "config": {"preset": "vit-b16", "frames": frames, "size": size, "batch": 32},
            "results": [{"drop": "0.5", "fused": {"samples_per_s": fused}, "unfused": {"samples_per_s": fused / 2}}]}


def test_projection_uses_the_fastest_unloaded_shards_and_a_flop_rate_without_gpu_results(tmp_path):
    d = data_json(tmp_path / "bench_data.json", [
        row("files", "decord", 5.0), row("files", "pyav", 3.0), row("shards-mp4", "auto", 12.0),
        row("shards-jpg", "pillow", 60.0), row("shards-webp", "pillow", 500.0, loaded=True)])
    res = tmp_path / "results"
    res.mkdir()
    p = project_epoch.main(["--data-json", str(d), "--results", str(res), "--out", str(tmp_path)])
    assert p["decode_source"] == "shards-jpg (pillow), 1 worker" and p["decode_clips_per_s_per_worker"] == 60.0
    assert (p["frames"], p["size"]) == (8, 224) and p["train_source"].startswith("FLOP count at 40% MFU of H100")
    flops = project_epoch.flops_per_clip("vit-b16", 8, 224, 0.5)
    assert 0.5e12 < flops < 2e12  # about 1 TFLOP per clip with the reversed pass
    (r,) = p["results"]
    assert r["gpus"] == 8 and r["train_clips_per_s"] == pytest.approx(8 * 0.4 * 989e12 / flops)
    assert r["decode_clips_per_s"] == pytest.approx(8 * 13 * 60.0)
    assert r["bound"] == ("training" if r["train_clips_per_s"] <= r["decode_clips_per_s"] else "decode")
    assert r["epoch_hours"] == pytest.approx(10.7e6 / min(r["train_clips_per_s"], r["decode_clips_per_s"]) / 3600)
    assert "goal 8 h" in p["verdicts"][0] and f"{r['epoch_hours']:.2f} h per epoch" in p["verdicts"][0]
    md = (tmp_path / "project_epoch.md").read_text()
    assert p["verdicts"][0] in md and "8 frames x 224 px on both sides" in md and "one mp4 per clip" in md
    p = project_epoch.main(["--data-json", str(d), "--results", str(res), "--out", str(tmp_path),
                            "--decode-source", "files"])
    assert p["decode_source"] == "files (decord), 1 worker"


def test_projection_takes_the_latest_gpu_result_at_the_same_frames_and_size(tmp_path):
    d = data_json(tmp_path / "bench_data.json", [row("files", "decord", 5.0)], frames=8, size=224)
    res = tmp_path / "results"
    (res / "old").mkdir(parents=True)
    (res / "old" / "bench_train.json").write_text(json.dumps(train_payload("NVIDIA H100", 8, 224, 300.0, "2026-01-01")))
    (res / "cpu").mkdir()  # a CPU result and a GPU one at another size: never the GPU rate
    (res / "cpu" / "bench_train.json").write_text(json.dumps(train_payload(None, 8, 224, 1.0, "2026-12-01")))
    (res / "small").mkdir()
    (res / "small" / "bench_train.json").write_text(json.dumps(train_payload("NVIDIA H100", 4, 96, 9000.0, "2026-12-02")))
    new = res / "h100-20261203"  # the latest: inside gpu_check's tarball
    new.mkdir()
    body = json.dumps(train_payload("NVIDIA H100 80GB HBM3", 8, 224, 350.0, "2026-12-03")).encode()
    with tarfile.open(new / "gpu_check_logs.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("gpu_check_logs/bench_train.json")
        info.size = len(body)
        t.addfile(info, io.BytesIO(body))
    p = project_epoch.main(["--data-json", str(d), "--results", str(res), "--out", str(tmp_path)])
    assert "gpu_check_logs.tar.gz:gpu_check_logs/bench_train.json" in p["train_source"]
    assert p["train_device"] == "NVIDIA H100 80GB HBM3"
    (r,) = p["results"]
    assert r["train_clips_per_s"] == pytest.approx(8 * 350.0) and r["decode_clips_per_s"] == pytest.approx(8 * 13 * 5.0)
    assert r["bound"] == "decode" and r["workers_per_gpu_needed"] == pytest.approx(350.0 / 5.0)
    assert r["epoch_hours"] == pytest.approx(10.7e6 / (8 * 13 * 5.0) / 3600)  # 5.7 h
    assert "decode-bound" in p["verdicts"][0] and "goal 8 h: met" in p["verdicts"][0]
    assert "70.0 workers per GPU" in p["verdicts"][0]


def test_projection_refuses_loaded_figures_unless_asked(tmp_path):
    d = data_json(tmp_path / "bench_data.json", [row("files", "decord", 5.0, loaded=True)])
    with pytest.raises(SystemExit, match="every row is LOADED"):
        project_epoch.main(["--data-json", str(d), "--results", str(tmp_path), "--out", str(tmp_path)])
    p = project_epoch.main(["--data-json", str(d), "--results", str(tmp_path), "--out", str(tmp_path),
                            "--allow-loaded"])
    assert "LOADED" in p["decode_source"] and any("not a figure" in n for n in p["notes"])
    old = data_json(tmp_path / "old.json", [{"source": "shards", "workers": 1, "clips_per_s": 4.0,
                                             "clips_per_s_per_worker": 4.0}])
    p = project_epoch.main(["--data-json", str(old), "--results", str(tmp_path), "--out", str(tmp_path)])
    assert p["decode_source"] == "shards-mp4, 1 worker"  # a payload of before formats and loads
