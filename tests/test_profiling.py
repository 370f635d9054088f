"""The profiling suite in tiny configurations: every script runs, writes well-formed JSON with
positive numbers, and its ratios divide the rates they name. Nothing here asserts a speed."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling import bench_train, project_epoch  # noqa: E402
from profiling.machine import pyplot  # noqa: E402

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None


def env():
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(script, *args, timeout=300):
    r = subprocess.run([sys.executable, str(ROOT / "profiling" / script), *map(str, args)], cwd=ROOT,
                       env=env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hvfm.data.synthetic.clips import generate
    return generate(tmp_path_factory.mktemp("syn"), n_train=8, n_test=4, frames=4, size=32, seed=0)


@pytest.fixture(scope="module")
def train_json(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("bench_train")
    # bench options, then train.py's own flags: the trainer's set-up, loader and step; the extras
    # rows at their defaults (reverse 1 0.5 0, motion on off, at drop 0.5)
    run("bench_train.py", "--cpu-defaults", "--drop", "0.5", "0.1:0.5", "--steps", 2, "--warmup", 1,
        "--threads", 1, "--out", out,
        "--frames", 2, "--size", 32, "--batch-size", 3, "--precision", "fp32", "--workers", 1,
        "--train-csv", corpus.train_csv, "--video-root", corpus.train_root)
    return out / "bench_train.json"


def test_bench_train_json_rates_and_ratios(train_json):
    d = json.loads(train_json.read_text())
    assert d["benchmark"] == "bench_train" and d["complete"] and d["engine"] == "deepspeed"
    assert not d["partial"] and d["progress"] == "complete"
    assert d["zero"] == "ZeRO-2" and d["precision"] == "fp32" and d["workers"] == 1
    assert d["machine"]["versions"]["torch"] and "commit" in d["machine"]
    assert (d["config"]["frames"], d["config"]["size"], d["config"]["batch"]) == (2, 32, 3)
    assert d["config"]["trainer_flags"]["train_csv"].endswith("train.csv")
    assert [r["drop"] for r in d["results"]] == ["0.5", "0.1:0.5"]
    assert positive(d["peak_tflops"]) and d["model_shape"]["motion"]  # the trainer's default model
    for r in d["results"]:
        for name in ("fused", "unfused"):
            v = r[name]
            assert v["steps"] == 2 and len(r["step_log"][name]) == 2
            for k in ("step_ms", "forward_ms", "backward_ms", "optimizer_ms", "samples_per_s",
                      "tokens_per_s", "tflops", "mfu", "peak_mem_gib"):
                assert positive(v[k]), (name, k, v[k])
            assert v["prepare_ms"] >= 0
            steps = r["step_log"][name]
            assert v["tokens_per_s"] == pytest.approx(sum(s["tokens"] for s in steps) /
                                                      sum(s["step_s"] for s in steps))
            for s in steps:  # the parts lie within the step's wall time
                assert s["prepare_s"] + s["forward_s"] + s["backward_s"] + s["optimizer_s"] <= s["step_s"]
        # same batch and seeds per pair: both variants saw the same tokens
        assert [s["tokens"] for s in r["step_log"]["fused"]] == [s["tokens"] for s in r["step_log"]["unfused"]]
        c = r["ratio"]
        assert c["speedup"] == pytest.approx(r["fused"]["tokens_per_s"] / r["unfused"]["tokens_per_s"])
        assert c["pair_speedup_min"] <= c["pair_speedup_median"] <= c["pair_speedup_max"]
        # the loader phase: workers x 2 queued steps uncounted, then --steps counted
        ld, log = r["loader"], r["loader_log"]
        assert len(log) == d["loader_skip"] + 2 == 1 * 2 + 2 and ld["steps"] == 2
        wait, step = sum(s["wait_s"] for s in log[2:]), sum(s["step_s"] for s in log[2:])
        assert ld["share"] == pytest.approx(wait / (wait + step)) and 0 <= ld["share"] < 1
        assert ld["wait_ms"] <= ld["wait_ms_max"] == pytest.approx(1e3 * max(s["wait_s"] for s in log[2:]))
        assert ld["samples_per_s"] == pytest.approx(6 / (wait + step))
    md = (train_json.parent / "bench_train.md").read_text()
    assert "speedup" in md and "torch-varlen/gather" in md and "loader share" in md
    assert "PARTIAL" not in md and not list(train_json.parent.glob("*.tmp"))
    assert (train_json.parent / "bench_train.png").exists() == HAVE_MPL


def test_bench_train_extras_reach_the_model(train_json):
    """The extras rows: each (reverse, motion) setting really ran in the model (the tokens its
    video tower encoded, the motion parameters), all on the same batches, with the same rates."""
    d = json.loads(train_json.read_text())
    ext = d["extras"]
    assert ext["drop"] == "0.5" and ext["base"] == {"reverse": 1.0, "motion": True} and ext["rounds"] == 2
    rows = {(r["reverse"], r["motion"]): r for r in ext["rows"]}
    assert list(rows) == [(1.0, True), (0.5, True), (0.0, True), (1.0, False)]
    for (rev, motion), r in rows.items():
        for name in ("fused", "unfused"):
            v, steps = r[name], r["step_log"][name]
            assert v["steps"] == len(steps) == 2 and len(r["warmup_log"][name]) == 1
            for k in ("step_ms", "forward_ms", "backward_ms", "samples_per_s", "tokens_per_s", "tflops",
                      "mfu", "peak_mem_gib"):
                assert positive(v[k]), (rev, motion, name, k, v[k])
            assert v["samples_per_s"] == pytest.approx(sum(s["samples"] for s in steps) /
                                                       sum(s["step_s"] for s in steps))
            base = rows[(1.0, True)]["step_log"][name]
            assert r["vs_base"][name]["throughput"] == pytest.approx(
                sum(s["step_s"] for s in base) / sum(s["step_s"] for s in steps))  # 3 samples each
            for s in steps:
                assert s["reverse"] == rev and s["reversed_clips"] == math.ceil(rev * 3 - 1e-9)
        assert r["ratio"]["speedup"] == pytest.approx(r["fused"]["tokens_per_s"] / r["unfused"]["tokens_per_s"])
        # the motion parameters exist only with the channel on (2 per video width)
        assert r["motion_parameters"] == (2 * d["model_shape"]["v_width"] if motion else 0)
        assert r["parameters"] == d["parameters"] - (0 if motion else 2 * d["model_shape"]["v_width"])
    assert rows[(1.0, True)]["vs_base"]["fused"]["throughput"] == 1.0
    # per round: every setting and variant took the same batch and seeds (the same kept tokens);
    # the video tower encoded the reversed clips again: all of them, 2 of 3, none
    for i in range(2):
        step = {k: r["step_log"]["fused"][i] for k, r in rows.items()}
        assert len({(s["video_tokens"], s["text_tokens"]) for s in step.values()}) == 1
        assert {r["step_log"]["unfused"][i]["tokens"] for r in rows.values()} == {step[(1.0, True)]["tokens"]}
        kept = step[(1.0, True)]["video_tokens"]
        assert step[(1.0, True)]["video_tokens_encoded"] == step[(1.0, False)]["video_tokens_encoded"] == 2 * kept
        assert kept < step[(0.5, True)]["video_tokens_encoded"] < 2 * kept
        assert step[(0.0, True)]["video_tokens_encoded"] == kept
        # ... and the FLOP count follows: more reversed clips, more work; the motion map's share
        assert step[(1.0, True)]["flops"] > step[(0.5, True)]["flops"] > step[(0.0, True)]["flops"]
        assert step[(1.0, True)]["flops"] > step[(1.0, False)]["flops"]
    # each engine's first step (a warm-up step) apart: the two of the run's model, two motion off
    first = d["first_step"]
    assert list(first) == ["fused", "unfused", "fused, motion off", "unfused, motion off"]
    tune = ("autotune_s", "autotune_keys", "autotune_tuned", "autotune_disk")  # + Triton's first-call costs
    assert {k: v for k, v in first["fused"].items() if k not in tune} == d["results"][0]["warmup_log"]["fused"][0]
    assert {k: v for k, v in first["fused, motion off"].items() if k not in tune} == \
        rows[(1.0, False)]["warmup_log"]["fused"][0]
    # no Triton kernel on a CPU path (torch-varlen / sdpa): nothing compiled or tuned, and said so
    assert all(s["autotune_keys"] == 0 and s["autotune_s"] == 0 for s in first.values())
    assert all(positive(s["step_s"]) for s in first.values())
    md = (train_json.parent / "bench_train.md").read_text()
    assert "The extras at drop 0.5" in md and "fused samples/s vs base" in md
    assert "First step of each engine" in md and "unfused, motion off" in md


def test_bench_train_cut_short_keeps_partial_results(tmp_path, corpus):
    """A run stopped by SIGTERM (gpu_check's `timeout`) after its first drop ratio and a round of
    the extras leaves valid JSON and markdown, marked partial, and no temporary run folder."""
    import signal
    import time
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    argv = ["--cpu-defaults", "--drop", "0.5", "--steps", 4, "--warmup", 1, "--threads", 1,
            "--reverse", 1, 0, "--motion", "on", "--out", out, "--frames", 2, "--size", 32,
            "--batch-size", 3, "--precision", "fp32", "--workers", 1,
            "--train-csv", corpus.train_csv, "--video-root", corpus.train_root]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "profiling" / "bench_train.py"), *map(str, argv)],
        cwd=ROOT, env={**env(), "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "stderr.log").open("w"))
    path, seen = out / "bench_train.json", []
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if path.exists():  # replaced atomically: every read is a whole file
                d = json.loads(path.read_text())
                seen.append((len(d["results"]), d["partial"]))
                if (d["extras"] or {}).get("rounds", 0) >= 1:
                    proc.send_signal(signal.SIGTERM)
                    break
            time.sleep(0.02)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    err = (tmp_path / "stderr.log").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert seen[0] == (0, True)  # written at the first step already
    d = json.loads(path.read_text())
    assert d["partial"] and not d["complete"] and d["progress"].startswith("extras:")
    assert [r["drop"] for r in d["results"]] == ["0.5"] and d["results"][0]["fused"]["steps"] == 4
    rounds = d["extras"]["rounds"]
    assert 1 <= rounds < 4
    for r in d["extras"]["rows"]:
        assert r["fused"]["steps"] == r["unfused"]["steps"] == rounds and positive(r["fused"]["tokens_per_s"])
    md = (out / "bench_train.md").read_text()
    assert "PARTIAL" in md and "The extras at drop 0.5" in md
    assert not list(out.glob("*.tmp")) and not (out / "bench_train.png").exists()
    assert list(tmp.glob("hvfm-bench-train-*")) == []  # cleaned up on SIGTERM


def test_bench_train_extras_settings_and_bad_options():
    B = bench_train
    settings = lambda *a: B.extras_settings(B.parse_args(list(a))[0])  # noqa: E731
    assert settings() == [(1.0, True), (0.5, True), (0.0, True), (1.0, False)]
    assert settings("--reverse", "0", "1", "--motion", "off") == [(0.0, False), (1.0, False)]
    assert len(settings("--grid")) == 6 and settings("--no-extras") == []
    for argv, msg in ((["--reverse", "1", "1.5"], "--reverse 1.5: "), (["--extras-drop", "1"], "--extras-drop 1: "),
                      (["--drop", "0.5", "x"], "--drop x: "), (["--warmup", "0"], "--warmup 0 ")):
        with pytest.raises(B.BenchError, match="^" + msg.replace("+", r"\+")):
            B.check_options(B.parse_args(argv)[0])


def test_bench_train_bad_trainer_flag_is_one_line(tmp_path):
    tmp = tmp_path / "tmp"  # where the bench makes its temporary run folder
    tmp.mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "profiling" / "bench_train.py"), "--out", tmp_path,
                        "--drop-ratio", "1.5", "--train-json", "nowhere.json", "--video-root", tmp_path],
                       cwd=ROOT, env={**env(), "TMPDIR": str(tmp)}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --drop-ratio"), r.stderr
    assert not (tmp_path / "bench_train.json").exists()
    assert list(tmp.glob("hvfm-bench-train-*")) == []  # a failed start leaves no run folder


def test_one_step_leaves_the_batch_to_the_other_variant():
    """On a GPU the loader's batches are uint8 frames + crop rows, which train_step's prepare_batch
    replaces and consumes: each variant of a pair must get the batch as the loader gave it."""
    import argparse
    from types import SimpleNamespace

    from hvfm.data.transforms.device import draw_params
    seen = []

    class Engine:  # what train_step uses of a DeepSpeed engine
        device = torch.device("cpu")

        def __call__(self, batch, **kw):
            seen.append(batch["pixels"])
            loss = batch["pixels"].float().mean().requires_grad_()
            return dict(loss=loss, vtc=loss, vtm=loss, mlm=loss, video_tokens=2 * 4 + 2, text_tokens=8)

        def backward(self, loss):
            pass

        def step(self):
            pass

    rng = np.random.default_rng(0)
    batch = dict(pixels=torch.randint(0, 255, (2, 2, 40, 48, 3), dtype=torch.uint8),
                 crop=torch.from_numpy(np.stack([draw_params(40, 48, 32, True, rng)[0] for _ in range(2)])),
                 num_frames=torch.tensor([2, 2]), attention_mask=torch.ones(2, 4, dtype=torch.int64),
                 mlm_labels=torch.full((2, 4), -100), index=torch.arange(2))
    frames = batch["pixels"]
    setup = SimpleNamespace(args=argparse.Namespace(drop_ratio="0.5", reverse_negatives=1.0, vtm_hardness=0.0),
                            size=32, weights={"vtc": 1.0, "vtm": 1.0, "mlm": 1.0})
    shape = bench_train.ModelShape(v_width=8, v_layers=1, v_mlp=8, patch=16, channels=3, t_width=8,
                                   t_layers=1, t_mlp=8, f_width=8, f_layers=1, f_mlp=8, proj=8, vocab=10)
    for _ in range(2):  # fused, then unfused, on the same batch
        bench_train.one_step(Engine(), batch, setup, "0.5", np.random.SeedSequence([0]), shape,
                             torch.float32, host_check=False)
    assert batch["pixels"] is frames and "crop" in batch  # untouched
    assert seen[0].shape == seen[1].shape == (2, 2, 3, 32, 32) and torch.equal(seen[0], seen[1])


@pytest.mark.parametrize("reverse", [1.0, 0.5, 0.0])
def test_flop_count_matches_torch_flop_counter(reverse):
    """train_flops' forward count = what torch's FlopCounterMode sees on the packed path (math SDPA),
    up to causal text attention, which we count as Lq(Lq+1)/2 pairs and SDPA computes as Lq^2.
    The model as the trainer builds it: motion channel, a fusion wider than the text tower."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from hvfm.model import VideoLanguageModel, add_mask_token, keep_counts
    from hvfm.model.testing import tiny_batch, tiny_clip, tiny_tokenizer
    tok = tiny_tokenizer()
    clip = tiny_clip(tok, dtype=torch.float32)
    add_mask_token(clip, tok)
    model = VideoLanguageModel.from_clip(clip, tok, fusion_layers=1, fusion_width=48, motion=True,
                                         vtm_token="last", max_frames=16)
    bench_train.variant(model, "torch-varlen/gather")
    caps = ["a red ball moves left", "the blue box turns fast", "a green circle jumps up",
            "the red square moves down"]  # equally long: the hard negatives' lengths are exact
    batch = tiny_batch(tok, caps, [2, 2, 2, 2], image=32, mask_prob=0.4)
    seeds = np.random.SeedSequence([0, 1])
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(batch, drop_ratio="0.5", rng=np.random.default_rng(seeds),
              generator=torch.Generator().manual_seed(0), reverse_negatives=reverse)
    shape = bench_train.ModelShape.of(model)
    assert shape.motion and shape.f_width != shape.t_width
    counts = keep_counts(np.full(4, 2 * (32 // shape.patch) ** 2), "0.5", np.random.default_rng(seeds))
    lens = batch["attention_mask"].sum(1).numpy()
    f = bench_train.train_flops(shape, counts + 1, lens, int((batch["mlm_labels"] != -100).sum()), reverse)
    causal_gap = 2 * 4.0 * (lens ** 2 - lens * (lens + 1) / 2).sum() * shape.t_width * shape.t_layers
    assert f["forward"] + causal_gap == pytest.approx(fc.get_total_flops(), rel=1e-4)
    assert f["total"] == pytest.approx(3 * f["linear"] + 3.5 * f["attention"] + 2 * f["patch"])


def test_gpu_peak_table():
    assert bench_train.gpu_peak_tflops("NVIDIA H100 PCIe") == 756
    assert bench_train.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert bench_train.gpu_peak_tflops("NVIDIA H200") == 989
    assert bench_train.gpu_peak_tflops("NVIDIA A100-SXM4-80GB") == 312
    assert bench_train.gpu_peak_tflops("Some Other GPU") is None


def test_plots_are_optional(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert pyplot() is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert bench_train.plot({"results": [{}]}, tmp_path / "x.png") is None




def test_bench_data_and_epoch_projection(corpus, train_json, tmp_path):
    from profiling import bench_data
    data_json = tmp_path / "bench_data.json"
    bench_data.main(["--train-csv", str(corpus.train_csv), "--video-root", str(corpus.train_root),
                     "--workers", "0", "--clips", "4", "--batch-size", "2", "--frames", "2",
                     "--size", "32", "--decoders", "decord", "--max-load", "1000", "--out", str(data_json)])
    data = json.loads(data_json.read_text())
    assert positive(data["results"][0]["clips_per_s"]) and (tmp_path / "bench_data.md").exists()

    p = project_epoch.main(["--train-json", str(train_json), "--data-json", str(data_json),
                            "--workers-per-gpu", "4", "--gpus", "1", "8", "--out", str(tmp_path)])
    train = json.loads(train_json.read_text())
    per_worker = data["results"][0]["clips_per_s"]  # workers 0: the main process is one worker
    assert p["decode_clips_per_s_per_worker"] == pytest.approx(per_worker)
    assert len(p["results"]) == 2 * len(train["results"])
    for r in p["results"]:
        sps = next(d for d in train["results"] if d["drop"] == r["drop"])["fused"]["samples_per_s"]
        assert r["train_clips_per_s"] == pytest.approx(r["gpus"] * sps)
        assert r["decode_clips_per_s"] == pytest.approx(r["gpus"] * 4 * per_worker)
        rate = min(r["train_clips_per_s"], r["decode_clips_per_s"])
        assert r["epoch_hours"] == pytest.approx(10.7e6 / rate / 3600)
        assert r["bound"] == ("training" if r["train_clips_per_s"] <= r["decode_clips_per_s"] else "decode")
    assert "epoch h" in (tmp_path / "project_epoch.md").read_text()


def test_project_epoch_without_training_rates_is_one_line(tmp_path):
    """gpu_check runs it after bench_train and bench_data, which may have written nothing
    (skipped, or killed before their first row): one error line that names the file, not a
    traceback. (Without a GPU bench_train result the training rate is the FLOP count's.)"""
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        project_epoch.main(["--results", str(tmp_path / "empty")])
    assert str(e.value).startswith("error: ") and "bench_data.json" in str(e.value)
    (tmp_path / "bench_train.json").write_text(json.dumps({"partial": True, "progress": "set up", "results": []}))
    with pytest.raises(SystemExit) as e:
        project_epoch.main(["--train-json", str(tmp_path / "bench_train.json")])
    assert "measured no drop ratio yet (set up)" in str(e.value)


@pytest.mark.slow  # three trainer runs (~60-90 s): the only test of the ablation driver
def test_ablate_drop_runs_the_studies(corpus, tmp_path):
    cfg = json.loads((ROOT / "ds_configs" / "z2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 2
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    run("ablate_drop.py", "--studies", "drop", "time", "--ratios", "0.5", "0.75", "--epochs", 1,
        "--deepspeed", tmp_path / "ds.json", "--out", tmp_path / "out", "--runs-dir", tmp_path / "runs",
        # unknown to ablate_drop: passed through to train.py
        "--train-csv", corpus.train_csv, "--video-root", corpus.train_root,
        "--eval-json", corpus.test_json, "--eval-video-root", corpus.test_root,
        "--frames", 2, "--size", 32, "--workers", 0, "--precision", "fp32", timeout=900)
    d = json.loads((tmp_path / "out" / "ablate_drop.json").read_text())
    rows = d["results"]
    assert [(r["study"], r["flags"]["--drop-ratio"]) for r in rows] == \
        [("drop", "0.5"), ("drop", "0.75"), ("time", "0.5"), ("time", "0.75")]
    steps_per_epoch = len(corpus_rows(corpus)) // 2
    for r in rows:
        assert r["ok"]
        for k in ("wall_s", "tokens_per_s", "process_s", "median_step_ms"):
            assert positive(r[k]), (k, r[k])
        assert 0 <= r["t2v_r1"] <= 100 and 0 <= r["motion"] <= 1 and 0 <= r["order_1f"] <= 1
    drop, time = rows[:2], rows[2:]
    assert [r["steps"] for r in drop] == [steps_per_epoch] * 2
    assert time[0]["log"] == drop[0]["log"]  # the 0.5 run is the budget, not run again
    # drop 0.75 gets the steps that fit in the 0.5 run's time at its own median step
    want = int(drop[0]["wall_s"] / (drop[1]["median_step_ms"] / 1e3))
    assert time[1]["steps"] == want and time[1]["log"] != drop[1]["log"]
    assert (tmp_path / "out" / "ablate_drop.md").exists()
    assert (tmp_path / "out" / "ablate_drop.png").exists() == HAVE_MPL


def corpus_rows(corpus):
    return corpus.train_csv.read_text().strip().splitlines()[1:]


def test_ablation_variants_share_the_base_run():
    from profiling import ablate_drop as ab
    keys = {ab.key_of(f) for study in ("drop", "mask", "reverse")
            for _, f in ab.variants(study, ["0", "0.5", "0.75", "0.9"])}
    assert len(keys) == 4 + 1 + 2  # drop 0.5 = mask 0.5 = reverse 1: one run
    temporal = {ab.key_of(f) for _, f in ab.variants("temporal", [])}
    assert len(temporal) == 3 and ab.key_of({}) in temporal
    assert "--no-motion-channel" in ab.flag_list({"--no-motion-channel": None}) and \
        "--motion-channel" not in ab.flag_list({"--no-motion-channel": None})
    assert ab.key_of({"--drop-ratio": "0.5"}) == ab.key_of({"--reverse-negatives": "1"})


@pytest.mark.slow  # one 2-rank launch (~30-40 s): the only test of the ZeRO benchmark
def test_bench_zero_two_ranks(tmp_path):
    run("bench_zero.py", "--configs", "z3", "--checkpointing", "on", "--preset", "tiny",
        "--size", 32, "--frames", 2, "--batch", 2, "--fusion-layers", 1, "--fusion-width", 64,
        "--steps", 1, "--warmup", 1, "--out", tmp_path, timeout=600)
    d = json.loads((tmp_path / "bench_zero.json").read_text())
    assert d["world_size"] == 2 and d["complete"] and [r["config"] for r in d["results"]] == ["z3"]
    for r in d["results"]:
        assert r["ok"] and r["checkpointing"] is True, r
        for k in ("params_mib", "grads_mib", "optimizer_mib", "model_states_mib", "peak_mem_gib", "step_ms"):
            assert positive(r[k]), (k, r[k])
        assert len(r["step_ms_per_rank"]) == 2
        assert r["model_states_mib"] == pytest.approx(
            sum(r[f"{g}_mib"] for g in ("params", "grads", "optimizer", "buffers")))
    assert "z3" in (tmp_path / "bench_zero.md").read_text()
