"""kernels._compile_check: the kernels compiled for sm_80 / sm_90 without a GPU (Triton frontend,
MLIR passes, bundled ptxas), specialised as a launch specialises them, within the hardware's
shared memory and registers and without spills.

CI compiles the Hopper subset (`--subset`: every sm_90 attention config, bf16, causal and not, at
the largest head dim it is offered for, where registers and shared memory are tightest; ~35
compiles). The full grid (sm_80 and sm_90, bf16 + fp16, head dims 64 and 128, causal both ways,
the preprocess and patch-embed kernels too: 280 compiles, ~6 minutes on 2 cores, all within the
limits and without spills with Triton 3.7.1) runs in `test_full_grid` when HVFM_COMPILE_ALL=1
(marked slow).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels import _compile_check as cc
from kernels import _config

ROOT = Path(__file__).resolve().parents[1]


def _has_nvidia_backend():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        return False
    return True


needs_nvidia = pytest.mark.skipif(not _has_nvidia_backend(), reason="triton without NVIDIA backend")


def _run(args, tmp_path, timeout):
    """The check as a user runs it, without TRITON_INTERPRET (compiled-mode kernels)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "kernels._compile_check", *args, "--json", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    rows = json.loads(out.read_text()) if out.exists() else []
    return res, rows


def _check_rows(rows):
    for r in rows:
        assert r["status"] == "ok", r
        assert r["shared"] <= cc.SHARED_LIMIT[r["arch"]], r
        assert r["regs"] <= cc.MAX_REGS, r
        assert r["spill_store"] == r["spill_load"] == 0, r
        if r["kernel"] in ("fwd", "dkdv", "dq", "patch_embed"):
            assert r["dot"] in ("mma", "wgmma"), r  # tensor cores


@needs_nvidia
def test_subset_compiles_within_limits_without_spills(tmp_path):
    res, rows = _run(["--subset", "--max-spill", "0"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "shared KiB" in res.stdout and "regs" in res.stdout  # the table
    # every sm_90 config of each attention table compiled, at its largest head dim
    for name, make in (("fwd", _config.attention_fwd_table), ("dkdv", _config.attention_dkdv_table),
                       ("dq", _config.attention_dq_table)):
        entries = make(False).entries("sm90")
        want = {(90, tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages, min(d, 128), cz)
                for c, d, _ in entries for cz in (False, True)}
        got = {(r["arch"], tuple(sorted(r["config"].items())), r["num_warps"], r["num_stages"],
                r["head_dim"], r["causal"]) for r in rows if r["kernel"] == name}
        assert got == want, name
        assert any(r["config"]["BLOCK_M"] == 128 for r in rows if r["kernel"] == name) \
            or name == "dkdv"  # Hopper's 128-query tiles
    _check_rows(rows)
    # Hopper gets warpgroup MMA for the 64-row tiles
    assert any(r["dot"] == "wgmma" for r in rows if r["arch"] == 90)


def test_variants_follow_the_arch_family():
    """Each arch compiles its own family's configs, at the head dims each is offered for."""
    v = cc._variants((80, 90), ("bf16",), (64, 128), (False,), ("fwd",))
    for arch, fam in ((80, "sm80"), (90, "sm90")):
        want = {(tuple(sorted(c.kwargs.items())), d) for c, max_d, _ in
                _config.attention_fwd_table(False).entries(fam) for d in (64, 128) if d <= max_d}
        got = {(tuple(sorted(x[5]["kwargs"].items())), x[3]) for x in v if x[1] == arch}
        assert got == want
    assert (("BLOCK_M", 128), ("BLOCK_N", 128)) not in \
        {tuple(sorted(x[5]["kwargs"].items())) for x in v if x[3] == 128}  # limited to 64
    grid = dict(cc.SUBSET)
    grid["causal_modes"] = grid.pop("causal")
    sub = cc._variants(**grid)
    assert {x[1] for x in sub} == {90} and {x[2] for x in sub} == {"bf16"}


@pytest.mark.slow
@needs_nvidia
@pytest.mark.skipif(os.environ.get("HVFM_COMPILE_ALL") != "1",
                    reason="the full grid takes minutes; set HVFM_COMPILE_ALL=1")
def test_full_grid(tmp_path):
    res, rows = _run(["--max-spill", "0"], tmp_path, timeout=3600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    _check_rows(rows)
    assert {r["kernel"] for r in rows} == set(cc.KERNELS)


def _row(**kw):
    base = dict(kernel="dkdv", arch=80, dtype="bf16", head_dim=128, causal=False, classes="long",
                config={"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2, shared=1024,
                regs=128, spill_store=0, spill_load=0, stack=0, dot="mma", status="ok", seconds=1)
    return {**base, **kw}


def test_limits_and_exit_status(monkeypatch):
    """Over the shared memory of the arch, over 255 registers, a failed compile, or spills past
    --max-spill: the row says why and the run counts it (main exits 1)."""
    assert cc.verdict(_row()) == ""
    assert "shared" in cc.verdict(_row(shared=164 * 1024))  # fits sm_90, not sm_80
    assert cc.verdict(_row(arch=90, shared=164 * 1024)) == ""
    assert "registers" in cc.verdict(_row(regs=256))
    assert cc.verdict(_row(spill_store=8, spill_load=8)) == ""  # spills alone: reported
    assert "spills" in cc.verdict(_row(spill_store=8, spill_load=8), max_spill=0)
    assert cc.verdict(_row(status="FAILED: CompilationError: x")).startswith("FAILED")
    monkeypatch.setattr(cc, "compile_one",
                        lambda v: _row(shared=(200 if v[3] == 128 else 1) * 1024))
    printed = []
    out, bad = cc.run(archs=(80,), dtypes=("bf16",), head_dims=(64, 128), causal=(False,),
                      kernels=("delta",), jobs=1, out=printed.append)
    assert bad == 1 and len(out) == 2 * len(_config.preprocess_configs(False))
    assert "OVER: shared 204800 B > 166912 B" in printed[0]
    assert printed[-1].endswith("1 over the limits or failed")
