"""profiling/bench_kernels.py runs (smallest config) and writes well-formed JSON, after every row;
no speed claims."""
import importlib
import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _no_search(monkeypatch):
    """On CUDA: no autotune search (this checks the file, not the speed; the search costs tens of
    compiles)."""
    monkeypatch.setenv("HVFM_AUTOTUNE", "off")


def test_bench_kernels_quick(tmp_path, capsys):
    bench = importlib.import_module("profiling.bench_kernels")
    path = bench.main(["--quick", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench_kernels" and data["machine"]["versions"]["torch"]
    assert data["interpreted"] == (os.environ.get("TRITON_INTERPRET") == "1")
    assert data["complete"] is True and not path.with_name(path.name + ".tmp").exists()
    out = capsys.readouterr().out
    if data["interpreted"]:
        assert "NOTHING" in out
    assert "autotune+compile:" in out
    rows, ratios = data["results"], data["ratios"]
    kinds = {(r["kernel"], r["mode"]) for r in rows}
    assert kinds == {(k, m) for k in ("attention", "patch_embed") for m in ("fwd", "fwd+bwd")}
    cases = {r["case"] for r in rows if r["kernel"] == "attention"}
    assert {"vit_b16_video_keep0.5", "vit_b16_video_keepU0.1-0.5"} <= cases
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and math.isfinite(r["tflops"]), r
        assert r["tflops"] == pytest.approx(r["gflop"] / r["ms"], rel=1e-9)
        if r["kernel"] == "attention":
            if not data["interpreted"]:  # ViT-B/16 dims
                assert (r["shape"]["heads"], r["shape"]["head_dim"]) == (12, 64)
            if r["impl"] == "triton":  # its shape class and configs
                assert {"class", "fwd", "dkdv", "dq"} <= r["tuned"].keys(), r
                assert r["tuned"]["fwd"]["BLOCK_M"] > 0 and r["tuned"]["fwd"]["source"]
    # keep 0.5: every sample the same length L: forward 4*B*L*L*D*H, fwd+bwd 3.5x that
    for r in rows:
        if r["case"] == "vit_b16_video_keep0.5":
            sh = r["shape"]
            assert sh["mean_q"] == sh["max_q"] == sh["max_k"]
            fwd = 4 * sh["batch"] * sh["max_q"] ** 2 * sh["head_dim"] * sh["heads"] / 1e9
            assert r["gflop"] == pytest.approx(fwd * (3.5 if r["mode"] == "fwd+bwd" else 1))
    # torch varlen_attn: measured on CUDA when this torch has it, else a skipped row saying why
    varlen = {r["case"] for r in rows if r["impl"] == "torch_varlen_attn"}
    skipped = {s["case"]: s["reason"] for s in data["skipped"] if s["impl"] == "torch_varlen_attn"}
    assert varlen | set(skipped) == cases and all(skipped.values())
    if data["interpreted"]:
        assert not varlen
    rate = {(r["kernel"], r["case"], r["mode"], r["impl"]): r["tflops"] for r in rows}
    assert len(ratios) == len(rows) - sum(r["impl"] == "triton" for r in rows) > 0
    for r in ratios:
        tri = rate[(r["kernel"], r["case"], r["mode"], "triton")]
        other = rate[(r["kernel"], r["case"], r["mode"], r["vs"])]
        assert (r["triton_tflops"], r["other_tflops"]) == (tri, other)
        assert r["speedup"] == pytest.approx(tri / other, rel=1e-12)
    assert data["autotune"]["keys"] > 0 and data["autotune"]["seconds"] > 0


def test_partial_results_survive_a_failure(tmp_path, monkeypatch):
    """The JSON is rewritten after every row: a run that dies (or is killed by a stage's timeout)
    in the patch-embed part leaves the attention rows, marked incomplete."""
    bench = importlib.import_module("profiling.bench_kernels")
    written = []
    real = bench.Recorder.write

    def spy(self, complete, **extra):
        written.append(len(self.rows))
        return real(self, complete, **extra)
    monkeypatch.setattr(bench.Recorder, "write", spy)
    cases = bench.attention_cases
    monkeypatch.setattr(bench, "attention_cases", lambda quick: cases(quick)[:1])

    def dies(*a, **k):
        raise RuntimeError("killed")
    monkeypatch.setattr(bench, "bench_patch_embed", dies)
    with pytest.raises(RuntimeError, match="killed"):
        bench.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert data["complete"] is False
    assert data["results"] and all(r["kernel"] == "attention" for r in data["results"])
    # one write per row (and per skipped baseline), from the first row on
    assert written[0] == 0 and set(range(len(data["results"]) + 1)) <= set(written)
