"""profiling/bench_kernels.py runs (smallest config) and writes well-formed JSON; no speed claims."""
import importlib
import json
import math
import os

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs CUDA or TRITON_INTERPRET=1")


def test_bench_kernels_quick(tmp_path, capsys):
    bench = importlib.import_module("profiling.bench_kernels")
    path = bench.main(["--quick", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert data["benchmark"] == "bench_kernels" and data["machine"]["versions"]["torch"]
    assert data["interpreted"] == (os.environ.get("TRITON_INTERPRET") == "1")
    if data["interpreted"]:
        assert "NOTHING" in capsys.readouterr().out
    rows, ratios = data["results"], data["ratios"]
    kinds = {(r["kernel"], r["mode"]) for r in rows}
    assert kinds == {(k, m) for k in ("attention", "patch_embed") for m in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["ms"] > 0 and r["tflops"] > 0 and math.isfinite(r["tflops"]), r
        if r["kernel"] == "attention" and r["impl"] == "triton":  # its shape class and configs
            assert {"class", "fwd", "dkdv", "dq"} <= r["tuned"].keys(), r
            assert r["tuned"]["fwd"]["BLOCK_M"] > 0
    rate = {(r["kernel"], r["case"], r["mode"], r["impl"]): r["tflops"] for r in rows}
    assert len(ratios) == len(rows) - sum(r["impl"] == "triton" for r in rows) > 0
    for r in ratios:
        tri = rate[(r["kernel"], r["case"], r["mode"], "triton")]
        other = rate[(r["kernel"], r["case"], r["mode"], r["vs"])]
        assert (r["triton_tflops"], r["other_tflops"]) == (tri, other)
        assert r["speedup"] == pytest.approx(tri / other, rel=1e-12)
