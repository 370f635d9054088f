"""kernels._autotune: the on-disk autotune cache and the first-call report.

The kernels' own tables hold one config under the interpreter (nothing to tune), so the cache is
tested on a tiny kernel with two configs and a stand-in benchmark (the interpreter runs the
kernel; `do_bench` returns scripted times instead of timing it): the first process tunes and
writes the choice, a second process reads it and benchmarks nothing.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from kernels import _autotune as AT
from kernels import autotune_report, format_autotune_report

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRET,
                                       reason="runs the kernel under TRITON_INTERPRET=1")
CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=4, num_stages=1),
           triton.Config({"BLOCK": 32}, num_warps=4, num_stages=1)]


@triton.jit
def _double(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=ok) * 2, mask=ok)


def scripted_bench(times, calls):
    """do_bench stand-in: runs the candidate once, returns the next scripted time."""
    it = iter(times)

    def bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(1)
        t = next(it)
        return [t, t, t]
    return bench


def tune_once(times=(2.0, 1.0), forbid_bench=False, n=40):
    """A fresh autotuner (a new process's) over CONFIGS; returns (report entry, bench calls)."""
    calls = []

    def refuse(kernel_call, quantiles=None):
        raise AssertionError("benchmarked although the choice was cached")
    tuner = AT.autotune(CONFIGS, key=["n"], name="test_double",
                        do_bench=refuse if forbid_bench else scripted_bench(times, calls))(_double)
    x = torch.arange(n, dtype=torch.float32)
    y = torch.zeros_like(x)
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    assert torch.equal(y, 2 * x)
    key = tuner.tuning_key((x, y, n), {})
    assert key in tuner.cache, "tuning_key differs from the key Triton files its choice under"
    return autotune_report()["entries"][-1], len(calls)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(AT.CACHE_ENV, str(tmp_path / "at"))
    return tmp_path / "at"


@needs_interpreter
def test_second_tuner_reads_the_choice_from_disk(cache):
    entry, calls = tune_once(times=(2.0, 1.0))
    assert (entry["source"], calls, entry["candidates"]) == ("tuned", 2, 2)
    assert entry["config"]["kwargs"] == {"BLOCK": 32}  # the faster of the scripted two
    assert entry["key"]["n"] == 40 and entry["key"]["dtypes"] == ["float32", "float32"]
    files = list(cache.iterdir())
    assert [Path(entry["file"])] == files
    data = json.loads(files[0].read_text())
    assert data["best"]["kwargs"] == {"BLOCK": 32} and data["identity"]["device"] == "cpu"
    assert data["identity"]["triton"] == triton.__version__ and len(data["timings_ms"]) == 2
    again, calls = tune_once(forbid_bench=True)
    assert (again["source"], calls, again["config"]) == ("disk", 0, entry["config"])
    # another key (n) is another entry: tuned, and its own file
    other, calls = tune_once(times=(1.0, 3.0), n=7)
    assert (other["source"], other["config"]["kwargs"], calls) == ("tuned", {"BLOCK": 16}, 2)
    assert len(list(cache.iterdir())) == 2
    report = autotune_report()
    assert report["cache_dir"] == str(cache) and report["keys"] >= 3
    assert report["seconds"] >= sum(e["seconds"] for e in (entry, again, other)) - 1e-3
    assert "from the disk cache" in format_autotune_report(report)


@needs_interpreter
def test_stale_or_broken_entries_are_tuned_again(cache):
    entry, _ = tune_once(times=(2.0, 1.0))
    path = Path(entry["file"])
    path.write_text("{not json")
    again, calls = tune_once(times=(1.0, 2.0))  # unreadable: tuned again, file rewritten
    assert (again["source"], calls, again["config"]["kwargs"]) == ("tuned", 2, {"BLOCK": 16})
    data = json.loads(path.read_text())
    assert data["best"]["kwargs"] == {"BLOCK": 16}
    data["best"]["kwargs"] = {"BLOCK": 64}  # a config no longer offered
    path.write_text(json.dumps(data))
    assert tune_once(times=(1.0, 2.0))[0]["source"] == "tuned"
    data = json.loads(path.read_text())
    data["identity"]["device"] = "NVIDIA H200 (sm_90)"  # written for another device
    path.write_text(json.dumps(data))
    assert tune_once(times=(1.0, 2.0))[0]["source"] == "tuned"


@needs_interpreter
def test_search_off_takes_the_first_candidate(cache, monkeypatch):
    monkeypatch.setenv(AT.SEARCH_ENV, "off")
    entry, calls = tune_once(times=(2.0, 1.0))
    assert (entry["source"], calls, entry["file"]) == ("first", 0, None)
    assert entry["config"]["kwargs"] == {"BLOCK": 16} and not cache.exists()
    assert "untuned" in format_autotune_report(autotune_report())


@needs_interpreter
def test_cache_off(monkeypatch, tmp_path):
    monkeypatch.setenv(AT.CACHE_ENV, "off")
    assert AT.cache_dir() is None
    entry, calls = tune_once()
    assert (entry["source"], entry["file"], calls) == ("tuned", None, 2)
    monkeypatch.delenv(AT.CACHE_ENV)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    from triton import knobs
    monkeypatch.setattr(knobs.cache, "dir", str(tmp_path / "tc"), raising=False)
    assert AT.cache_dir() == str(tmp_path / "tc" / "hvfm_autotune")


@needs_interpreter
def test_a_new_process_skips_the_search(cache):
    """This process tunes and writes; a new Python process reads it and benchmarks nothing."""
    assert tune_once()[0]["source"] == "tuned"
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys, json; sys.path[:0] = [{str(root / 'tests')!r}, {str(root)!r}]; "
            "import test_kernels_autotune as t; e, n = t.tune_once(forbid_bench=True); "
            "print(json.dumps([e['source'], n, e['config']['kwargs']]))")
    env = {**os.environ, "PYTHONPATH": str(root), AT.CACHE_ENV: str(cache)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == ["disk", 0, {"BLOCK": 32}]


def test_single_candidate_is_not_benchmarked_and_reported(monkeypatch):
    """The interpreter's one-config tables (and a prune leaving one config) time nothing; the
    first call of each key is reported with its compile time."""
    import kernels
    if not (INTERPRET or torch.cuda.is_available()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    dev = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
    monkeypatch.setenv(AT.SEARCH_ENV, "off")  # CUDA: one compile per kernel, nothing written
    autotune_report(reset=True)
    q = torch.randn(12, 2, 24, device=dev)  # head dim 24: a key no other test uses
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=dev)
    kernels.varlen_attention(q, q, q, cu, cu, 7, 7)
    kernels.varlen_attention(q, q, q, cu, cu, 7, 7)  # same key: no second entry
    rep = autotune_report(reset=True)
    fwd = [e for e in rep["entries"] if e["kernel"] == "attention_fwd"]
    assert len(fwd) == 1 and fwd[0]["key"]["tune_class"] == kernels.attention_class(7, 7)
    assert fwd[0]["seconds"] > 0 and fwd[0]["config"]["kwargs"]["BLOCK_M"] > 0
    assert fwd[0]["source"] == ("single" if INTERPRET else "first")
    assert autotune_report()["keys"] == 0
