"""The trainer as users run it: the deepspeed launcher with 1 process (ZeRO-2) and 2 processes
(ZeRO-3), save and resume, the export and evaluation CLI, and bad input (exit 2, nothing written)."""
import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvfm import train as train_mod
from hvfm.data.synthetic.clips import generate

ROOT = Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), n_train=40, n_test=6, frames=8, size=32, seed=0)


def data_flags(corpus):
    return ["--train-csv", str(corpus.train_csv), "--video-root", str(corpus.train_root),
            "--eval-json", str(corpus.test_json), "--eval-video-root", str(corpus.test_root),
            "--frames", "4", "--size", "32", "--workers", "1", "--log-every", "1"]


def launch(flags, procs=1, timeout=600):
    cmd = ["deepspeed", "--num_gpus", str(procs), "--master_port", str(free_port()),
           "hvfm/train.py", *flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


def metrics_rows(out):
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # ~100 s each; CI runs it: nothing else covers the launcher, ZeRO-3 and resume
@pytest.mark.parametrize("procs,config", [(1, "z2"), (2, "z3")])
def test_launcher_trains_saves_resumes_and_exports(corpus, tmp_path, procs, config):
    out = tmp_path / "run"
    base = ["--deepspeed", f"ds_configs/{config}.json", *data_flags(corpus), "--output-dir", str(out),
            "--save-every", "2"]
    first = launch([*base, "--max-steps", "2"], procs)
    assert "[image CLIP, frames mean-pooled, 4 frames] t2v R@1/5/10" in first.stdout
    assert "[harvested, 4 frames]" in first.stdout and "[harvested, 1 frame]" in first.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == procs
    assert np.isfinite(summary["last_losses"]["loss"]) and summary["samples_per_s"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    assert (out / "final" / "hvfm_model.safetensors").exists()

    # One model, one result: the trainer's closing evaluation, its export and its DeepSpeed
    # checkpoint give the same numbers through the CLI (all the fp32 master weights), and the
    # opening evaluation is the CLIP folder the run started from.
    def cli(checkpoint, *extra):
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        r = subprocess.run([sys.executable, "-m", "hvfm.evaluate", "--checkpoint", str(checkpoint),
                            "--ann", str(corpus.test_json), "--video-root", str(corpus.test_root),
                            "--frames", "4", "--size", "32", "--workers", "0", *extra],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    keys = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr", "v2t_r1", "v2t_r5", "v2t_r10",
            "v2t_medr", "temporal_acc")
    after, before = summary["eval"]["after"]["all_frames"], summary["eval"]["before"]["all_frames"]
    for checkpoint in (out / "final", out / "checkpoints"):
        m = cli(checkpoint, "--dump-scores", str(tmp_path / "s.npy"))
        assert {k: m[k] for k in keys} == pytest.approx({k: after[k] for k in keys}), checkpoint
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (m["captions"], m["videos"]) and np.isfinite(scores).all()
    m = cli(out / "init_clip")
    assert m["pool"] == "mean" and {k: m[k] for k in keys} == pytest.approx({k: before[k] for k in keys})

    launch([*base, "--max-steps", "4", "--resume", "--no-eval"], procs)
    rows = metrics_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # went on from step 2, not from 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000004"


def expect_exit_2(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_bad_flags_and_configs_exit_2_and_write_nothing(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["--deepspeed", "ds_configs/z2.json", *data_flags(corpus), "--output-dir", str(out)]
    expect_exit_2(capsys, [*base, "--attn", "nonsense"], "--attn", "sdpa")
    expect_exit_2(capsys, [*base, "--model", "vit-x"], "--model", "tiny")
    expect_exit_2(capsys, [*base, "--precision", "fp16"], "fp16", "bf16")
    expect_exit_2(capsys, [*base, "--resume"], "--resume", "no checkpoint")
    bad = tmp_path / "bad.json"
    cfg = json.loads((ROOT / "ds_configs" / "z2.json").read_text())
    bad.write_text(json.dumps({**cfg, "train_batch_size": 999}))
    expect_exit_2(capsys, [*base[2:], "--deepspeed", str(bad)], "bad.json", "train_batch_size 999")
    assert not out.exists()  # nothing was created for any of them


def test_clip_folder_missing_files_exits_2(corpus, tmp_path, capsys):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text("{}")
    out = tmp_path / "out"
    expect_exit_2(capsys, ["--deepspeed", "ds_configs/z2.json", *data_flags(corpus), "--clip", str(clip),
                           "--output-dir", str(out)], str(clip), "model.safetensors")
    assert not out.exists()  # a failed start leaves nothing behind


def test_existing_run_is_not_overwritten(tmp_path, capsys, corpus):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step00000007")
    expect_exit_2(capsys, ["--deepspeed", "ds_configs/z2.json", *data_flags(corpus), "--output-dir", str(out)],
                  "--resume")
    assert (out / "checkpoints" / "latest").read_text() == "step00000007"


@pytest.mark.slow  # ~40 s (two launches); CI runs it: the only run of --stage image on user data
def test_image_stage_exports_a_clip_folder_that_stage_two_starts_from(corpus, tmp_path):
    from transformers import AutoTokenizer, CLIPModel

    from hvfm.data.synthetic.stills import generate_images
    stills = generate_images(tmp_path / "stills", n=24, n_test=6, size=32)
    s1 = tmp_path / "s1"
    r = launch(["--deepspeed", "ds_configs/z2.json", "--stage", "image", "--train-json",
                str(stills / "images.json"), "--video-root", str(stills), "--eval-json",
                str(stills / "images_test.json"), "--eval-video-root", str(stills), "--size", "32",
                "--batch-size", "4", "--max-steps", "3", "--workers", "0", "--output-dir", str(s1),
                "--mirror-negatives", "0.5", "--log-every", "1"])
    assert "[image CLIP, 1 frame] t2v R@1/5/10" in r.stdout and "harvested" not in r.stdout
    summary = json.loads((s1 / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["last_losses"]["vtm"] == 0 == summary["last_losses"]["mlm"]
    assert set(summary["eval"]["after"]) == {"one_frame"}
    run = json.loads((s1 / "run_config.json").read_text())
    assert run["args"]["frames"] == 1 and run["args"]["reverse_negatives"] == 0
    final = s1 / "final"
    assert not (final / "hvfm.json").exists()  # a plain CLIPModel folder with its tokenizer
    clip = CLIPModel.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    assert clip.text_model.embeddings.token_embedding.num_embeddings == len(tok)
    assert tok.mask_token is not None
    # stage 2 starts from it: inflated, trained, and its baseline row is the image CLIP's
    s2 = tmp_path / "s2"
    r = launch(["--deepspeed", "ds_configs/z2.json", "--clip", str(final), *data_flags(corpus),
                "--max-steps", "1", "--output-dir", str(s2)])
    assert "[image CLIP, frames mean-pooled, 4 frames]" in r.stdout and "harvested video model" in r.stdout
    assert json.loads((s2 / "run_config.json").read_text())["args"]["clip"] == str(final)


def test_image_stage_with_the_caption_swap_term_logs_it(tmp_path):
    from hvfm.data.synthetic.stills import generate_images
    stills = generate_images(tmp_path / "stills", n=16, n_test=4, size=32)
    out = tmp_path / "swap"
    launch(["--deepspeed", "ds_configs/z2.json", "--stage", "image", "--train-json",
            str(stills / "images.json"), "--video-root", str(stills), "--size", "32",
            "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--output-dir", str(out),
            "--swap-weight", "0.2", "--no-eval", "--log-every", "1"])
    rows = metrics_rows(out)
    assert len(rows) == 2 and all(float(r["swap"]) > 0 for r in rows)
    last = json.loads((out / "summary.json").read_text())["last_losses"]
    assert last["swap"] > 0 and last["loss"] == pytest.approx(last["vtc"] + 0.2 * last["swap"], rel=1e-5)
    assert json.loads((out / "run_config.json").read_text())["args"]["swap_weight"] == 0.2


@pytest.mark.slow  # ~60 s; CI runs it: it is the README's main command
def test_readme_main_command(tmp_path):
    """The README's main command on the built-in default, shortened with --max-steps."""
    readme = (ROOT / "README.md").read_text()
    command = "deepspeed hvfm/train.py --deepspeed ds_configs/z2.json"
    assert command in readme
    out = tmp_path / "default"
    r = launch(["--deepspeed", "ds_configs/z2.json", "--max-steps", "2", "--image-steps", "2",
                "--output-dir", str(out)])
    # stage 1 (built once: an image CLIP on the built-in stills), then the harvest from it
    assert "image CLIP: building the built-in one once" in r.stdout or \
        "image CLIP: the built-in one, cached" in r.stdout
    assert "temporal acc" in r.stdout and "harvested video model, 8 frames" in r.stdout
    if "image CLIP: building" in r.stdout:  # stage 1 measured place and colour on probe stills
        assert "own vs mirrored" in r.stdout and "own vs recoloured" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    for when in ("before", "after"):
        assert set(summary["eval"][when]) == {"all_frames", "one_frame"}
    run = json.loads((out / "run_config.json").read_text())
    clip = Path(run["args"]["clip"])
    assert (clip / "hvfm_image_clip.json").is_file() and (clip / "tokenizer.json").is_file()
    assert not (clip / "hvfm.json").exists()  # a plain HF CLIPModel folder


@pytest.mark.slow  # ~50 s (two launches); CI runs it: nothing else covers --epochs / --max-minutes
def test_epochs_and_max_minutes_bound_the_run(corpus, tmp_path):
    # 40 clips, 16 per step, the partial batch dropped: 2 steps per epoch.
    out = tmp_path / "epochs"
    launch(["--deepspeed", "ds_configs/z2.json", *data_flags(corpus), "--output-dir", str(out),
            "--epochs", "2", "--no-eval"])
    rows = metrics_rows(out)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["epoch"]) for r in rows] == [0, 0, 1, 1]
    assert json.loads((out / "summary.json").read_text())["steps"] == 4

    out = tmp_path / "minutes"  # a deadline long past after the first step: stop after it
    r = launch(["--deepspeed", "ds_configs/z2.json", *data_flags(corpus), "--output-dir", str(out),
                "--max-minutes", "0.0001", "--max-steps", "50", "--no-eval", "--log-every", "10"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and (out / "final").is_dir()
    assert "stopped at the time cap" in r.stdout and "after 1 of 50 steps" in r.stdout
    assert [int(r["step"]) for r in metrics_rows(out)] == [1]  # the last step is logged
