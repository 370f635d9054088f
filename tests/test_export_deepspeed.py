"""A real ZeRO-3 run (deepspeed launcher, 1 process, 2 steps) evaluated every way a user can point
at it: the checkpoints folder, one tag folder, the run folder, its export `final/`, an export
written afterwards from the checkpoint, and the model rebuilt from run_config.json when `final/`
is gone. All give the same scores (fp32 training: the consolidated fp32 weights are the export's).
"""
import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from hvfm.data import read_annotations
from hvfm.data.synthetic.clips import generate
from hvfm.data.text.tokens import build_tokenizer
from hvfm.evaluate import main as evaluate_main
from hvfm.export import main as export_main
from hvfm.model.testing import tiny_clip

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # one deepspeed launch, ~40-60 s on 2 cores; nothing else covers
                               # consolidating a ZeRO-3 checkpoint for evaluation


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("z3")
    corpus = generate(root / "syn", n_train=16, n_test=6, frames=4, size=32, seed=0)
    train = read_annotations(corpus.train_csv, corpus.train_root)
    test = read_annotations(corpus.test_json, corpus.test_root)
    tok = build_tokenizer(list(train.pair_caption) + list(test.pair_caption), root / "tok",
                          vocab_size=400)
    clip = tiny_clip(tok, dtype=torch.float32, max_positions=32)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    out = root / "run"
    cmd = ["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()), "hvfm/train.py",
           "--deepspeed", "ds_configs/z3.json", "--clip", str(root / "clip"),
           "--train-csv", str(corpus.train_csv), "--video-root", str(corpus.train_root),
           "--frames", "4", "--size", "32", "--workers", "0", "--max-steps", "2", "--no-eval",
           "--precision", "fp32", "--fusion-layers", "1", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")  # tiny model: 1 thread
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000002"
    return dict(root=root, out=out, clip=root / "clip", json=corpus.test_json,
                test_root=corpus.test_root)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models: one intra-op thread (see conftest)."""


def scores_of(capsys, run, checkpoint, path, *extra):
    evaluate_main(["--checkpoint", str(checkpoint), "--ann", str(run["json"]), "--video-root",
                   str(run["test_root"]), "--frames", "4", "--workers", "0",
                   "--dump-scores", str(path), *map(str, extra)])
    out = capsys.readouterr().out
    return json.loads(out.strip().splitlines()[-1]), np.load(path)


METRICS = ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr", "v2t_r1", "v2t_r5", "v2t_medr")


def test_zero3_checkpoint_and_its_export_give_the_same_scores(run, capsys, tmp_path):
    out = run["out"]
    ref, ref_s = scores_of(capsys, run, out / "final", tmp_path / "final.npy")
    assert ref["kind"] == "hvfm"
    for name, ckpt in (("ckpts", out / "checkpoints"), ("tag", out / "checkpoints" / "step00000002"),
                       ("run", out)):
        m, s = scores_of(capsys, run, ckpt, tmp_path / f"{name}.npy")
        np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6, err_msg=name)
        assert all(m[k] == ref[k] for k in METRICS), name
        if name != "run":
            assert m["kind"] == "deepspeed" and m["tag"] == "step00000002"
    # re-ranking goes through the fusion encoder and VTM head: those weights match too
    a, _ = scores_of(capsys, run, out / "final", tmp_path / "a.npy", "--rerank-k", "3")
    b, _ = scores_of(capsys, run, out / "checkpoints", tmp_path / "b.npy", "--rerank-k", "3")
    assert all(a[k] == b[k] for k in METRICS)


def test_export_cli_from_the_zero3_checkpoint(run, capsys, tmp_path):
    from transformers import CLIPModel
    export_main(["--checkpoint", str(run["out"] / "checkpoints"), "--out", str(tmp_path / "exp")])
    capsys.readouterr()
    ref, ref_s = scores_of(capsys, run, run["out"] / "final", tmp_path / "final.npy")
    m, s = scores_of(capsys, run, tmp_path / "exp", tmp_path / "exp.npy")
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)
    hf = CLIPModel.from_pretrained(str(tmp_path / "exp"))
    assert hf.config.text_config.vocab_size == hf.text_model.embeddings.token_embedding.num_embeddings


def test_model_rebuilt_from_run_config_when_final_is_missing(run, capsys, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copytree(run["out"] / "checkpoints", bare / "checkpoints")
    shutil.copy(run["out"] / "run_config.json", bare / "run_config.json")
    _, ref_s = scores_of(capsys, run, run["out"] / "final", tmp_path / "final.npy")
    m, s = scores_of(capsys, run, bare / "checkpoints", tmp_path / "bare.npy")
    np.testing.assert_allclose(s, ref_s, rtol=0, atol=1e-6)
    # --merge-with-clip finds the run's --clip folder by itself; alpha 0 changes nothing
    m0, s0 = scores_of(capsys, run, bare / "checkpoints", tmp_path / "m0.npy", "--merge-with-clip", "0")
    assert m0["merge_alpha"] == 0.0 and m0["merge_clip"] == str(run["clip"])
    np.testing.assert_allclose(s0, ref_s, rtol=0, atol=1e-6)
