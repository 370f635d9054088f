"""The training entry point as a user runs it: a few batches from a tiny corpus, and bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hvfm.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("syn"), n_train=16, n_test=6, frames=8, size=32, seed=0)


def _run(*flags, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "hvfm/train.py", "--deepspeed", "ds_configs/z2.json", *flags],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_train_script_streams_batches(corpus, tmp_path):
    out = tmp_path / "run"
    r = _run("--train-csv", str(corpus.train_csv), "--video-root", str(corpus.train_root),
             "--max-steps", "3", "--size", "32", "--workers", "1", "--output-dir", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["batches"] == 3 and summary["clips"] == 3 * 16  # z2.json: 16 per GPU
    assert summary["skipped"] == 0 and summary["clips_per_s"] > 0
    assert (out / "tokenizer" / "tokenizer.json").exists()


@pytest.mark.parametrize("problem", ["missing_column", "missing_root", "missing_config"])
def test_bad_input_is_one_line_and_exit_2(corpus, tmp_path, problem):
    csv_path, root, config = corpus.train_csv, corpus.train_root, "ds_configs/z2.json"
    if problem == "missing_column":
        lines = Path(corpus.train_csv).read_text().splitlines()
        csv_path = tmp_path / "bad.csv"
        csv_path.write_text("\n".join([lines[0].replace(",name", ",title")] + lines[1:]) + "\n")
    elif problem == "missing_root":
        root = tmp_path / "no_such_folder"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "hvfm/train.py", "--deepspeed",
           str(tmp_path / "absent.json") if problem == "missing_config" else config,
           "--train-csv", str(csv_path), "--video-root", str(root), "--output-dir", str(tmp_path / "o")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    expect = {"missing_column": "bad.csv", "missing_root": "no_such_folder", "missing_config": "absent.json"}
    assert expect[problem] in errors[0]
