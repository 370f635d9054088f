"""The same command gives the same numbers: two identical CPU runs log identical losses, the CPU
precision choice is made once per machine (not by the load of the moment), and a built-in image
CLIP that its time cap cut short is never reused as a whole one."""
import csv
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from hvfm import config
from hvfm.data.synthetic.clips import generate

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("loss", "vtc", "vtm", "mlm")


def run_once(corpus, clip, out, cache):
    """`python hvfm/train.py` (a world of one) for 3 steps from a tiny CLIP folder on the corpus."""
    cmd = [sys.executable, "hvfm/train.py", "--deepspeed", "ds_configs/z2.json", "--clip", str(clip),
           "--train-csv", str(corpus.train_csv), "--video-root", str(corpus.train_root),
           "--frames", "4", "--size", "32", "--workers", "0", "--log-every", "1", "--max-steps", "3",
           "--no-eval", "--seed", "7", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), HVFM_CACHE=str(cache))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    with open(out / "metrics.csv") as f:
        rows = [{k: row[k] for k in ("step", *LOSSES)} for row in csv.DictReader(f)]
    return rows, json.loads((out / "run_config.json").read_text())


def test_two_identical_runs_log_identical_losses(tmp_path):
    from hvfm.model import save_random_clip
    from hvfm.model.testing import tiny_tokenizer
    corpus = generate(tmp_path / "syn", n_train=24, n_test=4, frames=4, size=32, seed=0)
    clip = tmp_path / "clip"
    save_random_clip("tiny", tiny_tokenizer(), str(clip), seed=0)
    cache = tmp_path / "cache"
    # From a CLIP folder (as the built-in default's stage 2) the fresh fusion layers are drawn by
    # the trainer. The first run measures the CPU precision (random matrices), the second reads
    # it from the cache: the global random stream then stands elsewhere when the model is built.
    first, cfg1 = run_once(corpus, clip, tmp_path / "a", cache)
    second, cfg2 = run_once(corpus, clip, tmp_path / "b", cache)
    assert [r["step"] for r in first] == ["1", "2", "3"]
    # VTM (the fresh fusion layers, the drawn negatives) and MLM (the masks) too, not only VTC:
    # every loss of every step, to the 9 digits metrics.csv holds
    assert first == second
    assert cfg1["precision"] == cfg2["precision"]
    assert "measured now and cached" in cfg1["precision_why"]
    assert "measured once on this CPU" in cfg2["precision_why"] and str(cache) in cfg2["precision_why"]


def test_cpu_precision_is_measured_once_per_machine(tmp_path):
    path = tmp_path / "cpu_precision.json"
    calls = []

    def bf16_faster():
        calls.append(1)
        return {"bfloat16": 0.1, "float32": 0.3}

    def fp32_faster():  # what a loaded machine might measure the next time
        calls.append(1)
        return {"bfloat16": 0.3, "float32": 0.1}

    pick, why = config.cpu_precision(path, measure=bf16_faster)
    assert pick == "bf16" and "measured now and cached" in why and "100 ms in bf16" in why
    pick, why = config.cpu_precision(path, measure=fp32_faster)
    assert pick == "bf16" and len(calls) == 1 and f"cached in {path}" in why  # not measured again
    entry = json.loads(path.read_text())
    path.write_text(json.dumps({**entry, "machine": {**entry["machine"], "cpu": "another CPU"}}))
    assert config.cpu_precision(path, measure=fp32_faster)[0] == "fp32" and len(calls) == 2
    path.write_text("{not json")
    assert config.cpu_precision(path, measure=bf16_faster)[0] == "bf16" and len(calls) == 3


def image_clip_args(**kw):
    return Namespace(model="tiny", seed=0, image_steps=None, rebuild_image_clip=False, **kw)


def cached_image_clip(monkeypatch, tmp_path, marker):
    """A cached built-in image CLIP folder with this marker, where ensure_image_clip looks."""
    import hashlib

    from hvfm.builtin_run import image_clip_key
    monkeypatch.setenv("HVFM_CACHE", str(tmp_path))
    key = image_clip_key(image_clip_args())
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = tmp_path / "image_clip" / f"tiny-{digest}"
    folder.mkdir(parents=True)
    (folder / "hvfm_image_clip.json").write_text(json.dumps({"key": key, **marker(key)}))
    return folder


def test_a_cut_short_image_clip_is_named_as_such_when_reused(monkeypatch, tmp_path, capsys):
    from hvfm.builtin_run import ensure_image_clip
    # as markers from before the steps were recorded: the summary's steps against the key's
    folder = cached_image_clip(monkeypatch, tmp_path, lambda key: {"summary": {"steps": 939}})
    assert ensure_image_clip(image_clip_args(), 0) == folder
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"image CLIP: the built-in one, cached in {folder} -- cut short")
    assert "at 939 of 1200 steps" in line and "--rebuild-image-clip" in line and "--image-steps 939" in line


def test_a_whole_image_clip_is_reused_quietly(monkeypatch, tmp_path, capsys):
    from hvfm.builtin_run import ensure_image_clip
    folder = cached_image_clip(monkeypatch, tmp_path, lambda key: {
        "steps_done": key["max_steps"], "steps_planned": key["max_steps"], "cut_short": False})
    assert ensure_image_clip(image_clip_args(), 0) == folder
    assert capsys.readouterr().out.strip() == f"image CLIP: the built-in one, cached in {folder}"
