"""profiling/gpu_check.sh and its parts, on a CPU: the wheels cover what the check imports, the
dry run writes the layout the device tool brings back (<= 8 files, <= 2 folders down), the step
check (fused vs unfused first step) passes on the real code and fails on a wrong attention, and
gpu_summary turns the stages' real JSON into the report's numbers."""
import ast
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from profiling import gpu_summary  # noqa: E402

STAGES = ("setup", "tests_kernels", "kernel_errors", "step_check", "tests_sync", "bench_train",
          "bench_kernels", "bench_zero", "bench_data", "project_epoch")
OPTIONAL = {"flash_attn", "xformers",  # optional attention backends, imported under try
            "torchcodec"}  # an optional decoder (`--decoder torchcodec`), skipped where it does not load
LOCAL = {p.stem for p in (ROOT / "tests").glob("*.py")} | {"hvfm", "kernels", "profiling", "tests"}


def env():
    e = {k: v for k, v in os.environ.items() if k != "OUT"}
    e["PYTHONPATH"] = str(ROOT)
    return e


def wheels(flag):
    r = subprocess.run(["bash", str(ROOT / "profiling" / "gpu_wheels.sh"), flag], capture_output=True,
                       text=True, check=True)
    return r.stdout.split()


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_distributions():
    """Distributions behind every third-party top-level import of the code the check runs."""
    to_dist = md.packages_distributions()
    found = set()
    for folder in ("hvfm", "kernels", "profiling", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if top in sys.stdlib_module_names or top in LOCAL or top in OPTIONAL:
                        continue
                    found |= {norm(d) for d in to_dist.get(top, [top])}
    return found


def requirements(dist):
    """Requires-Dist of an installed distribution, without extras (markers for Linux CPython)."""
    out = []
    for req in md.requires(dist) or []:
        name, _, marker = req.partition(";")
        if "extra" in marker or "win32" in marker or "darwin" in marker:
            continue
        out.append(norm(re.split(r"[ <>=!~(\[]", name.strip())[0]))
    return out


def test_wheels_cover_every_import_the_machine_lacks():
    carried = {norm(w.split("==")[0]): w for w in wheels("--list")}
    assert all("==" in w for w in carried.values()), "every wheel is pinned"
    assert len(carried) == len(wheels("--list")), "one version of each"
    has = {norm(n) for n in wheels("--machine-has")}
    assert not set(carried) & has - {"typing-extensions"}
    # what the code imports, then what those need, down to what the machine already has
    todo, seen = list(imported_distributions()), set()
    while todo:
        d = todo.pop()
        if d in seen:
            continue
        seen.add(d)
        if d in has:
            continue
        assert d in carried, f"the check imports {d} (or a wheel needs it): not on the lent machine, not in gpu_wheels.sh"
        todo += requirements(d)
    for must in ("deepspeed", "av", "pydantic", "pydantic-core", "hjson", "webdataset", "braceexpand"):
        assert must in carried, must
    # the carried versions are those the CPU machine tests (requirements-cpu.txt pins)
    pins = {norm(line.split("==")[0]): line.split("==")[1].strip()
            for line in (ROOT / "requirements-cpu.txt").read_text().splitlines() if "==" in line}
    for name, w in carried.items():
        if name in pins:
            assert w.split("==")[1] == pins[name], (w, pins[name])


def test_built_wheels_are_the_list_and_under_60_mib():
    found = sorted((ROOT / ".whl").glob("*.whl"))
    if not found:
        pytest.skip(".whl/ not built here (bash profiling/gpu_wheels.sh)")
    total = sum(p.stat().st_size for p in found)
    assert total < 60 * 2 ** 20, f"{total / 2 ** 20:.1f} MiB"
    names = {norm(p.name.split("-")[0]) for p in found}
    listed = {norm(w.split("==")[0]) for w in wheels("--list")}
    assert names <= listed and listed - names <= {"decord"}, (names, listed)  # --no-decord drops it
    # what travels to the device machine (tracked files + the carried .whl) stays under its 64 MiB
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    tree = sum((ROOT / f).stat().st_size for f in tracked.decode().split("\0") if f and (ROOT / f).is_file())
    assert tree + total < 64 * 2 ** 20, f"{(tree + total) / 2 ** 20:.1f} MiB would travel"


def dry_run(out):
    return subprocess.run(["bash", str(ROOT / "profiling" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env())


def test_dry_run_writes_the_layout_that_comes_back(tmp_path):
    out = tmp_path / "out"
    r = dry_run(out)
    assert r.returncode == 0, r.stderr
    assert 'run(command="bash profiling/gpu_check.sh", carry=[".whl"], timeout_s=480)' in r.stdout
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == ["gpu_check.md", "gpu_check_logs.tar.gz"]
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    text = (out / "gpu_check.md").read_text()
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| (\w+) \| not run \(dry run[^|]*\| - \| (\d+) \|$", line)
        if m:
            rows[m.group(1)] = int(m.group(2))
    assert set(rows) == set(STAGES), rows
    assert sum(rows.values()) <= 420, rows  # the stage budgets: a rerun fits in the lease
    # profiling/README.md's stage table says the same budgets
    doc = (ROOT / "profiling" / "README.md").read_text()
    documented = {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| (\w+) \| (\d+) \|", doc, re.M)
                  if m.group(1) in STAGES}
    assert documented == rows, (documented, rows)
    assert f"{sum(rows.values())} in all" in doc
    assert "## Key numbers" in text and "bench_train.py --gpu-defaults --drop 0.5 0.1:0.5" in text
    # every kernel test file runs on the GPU, except the two whose paths need no GPU (CI runs them)
    kcmd = text.split("## tests_kernels")[1].split("\n## ")[0]
    assert "env HVFM_AUTOTUNE=off" in kcmd
    for f in sorted((ROOT / "tests").glob("test_kernels_*.py")) + [ROOT / "tests" / "test_model_triton.py"]:
        assert (f"tests/{f.name}" in kcmd) == (f.name not in ("test_kernels_compile.py",
                                                              "test_kernels_autotune.py")), f.name
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = tar.getnames()
        tsv = tar.extractfile("gpu_check_logs/stages.tsv").read().decode()
    assert "gpu_check_logs/gpu_check.md" in names
    assert [line.split("\t")[0] for line in tsv.splitlines()] == list(STAGES)
    assert str(out) in r.stdout
    scratch = re.search(r"stages work in (\S+);", r.stdout).group(1)
    assert not Path(scratch).exists()  # a dry run leaves no scratch folder behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_the_check_refuses_in_one_line(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "profiling" / "gpu_check.sh"), "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env())
    assert r.returncode == 2 and "no CUDA GPU" in r.stderr and "--dry-run" in r.stderr


@pytest.fixture(scope="module")
def step_json(tmp_path_factory):
    """The step check's real output: module mode, tiny preset, fp32, Triton interpreted."""
    out = tmp_path_factory.mktemp("step")
    r = subprocess.run([sys.executable, "profiling/gpu_step_check.py", "--mode", "module", "--batch-size", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return out / "step_check.json"


def test_fused_first_step_matches_the_unfused_one(step_json):
    d = json.loads(step_json.read_text())
    assert d["ok"] and d["complete"] and d["precision"] == "fp32" and d["interpreted"]
    assert d["config"]["fused"] == "triton/triton" and d["config"]["unfused"] == "sdpa/conv"
    what = {c["what"] for c in d["checks"]}
    assert {"loss loss", "loss vtc", "loss vtm", "loss mlm", "grad norm total", "grad norm video"} <= what
    for c in d["checks"]:
        assert c["ok"] and c["diff"] <= c["bound"] and c["unfused"] > 0, c
    assert d["same_tokens"]


def test_step_check_fails_on_a_wrong_attention(tmp_path):
    """A fused path whose attention is slightly off (keys scaled by 1.02: a wrong softmax scale)
    must fail the fp32 tolerance."""
    code = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from hvfm.model import get_backend, register_backend
sdpa = get_backend("sdpa")
register_backend("broken", lambda q, k, v, *a, **kw: sdpa(q, k * 1.02, v, *a, **kw))
from profiling.gpu_step_check import check, parse
d = check(parse(["--mode", "module", "--batch-size", "2", "--fused", "broken/gather", "--out", {str(tmp_path)!r}]))
print("RESULT", d["ok"], sum(not c["ok"] for c in d["checks"]))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert r.returncode == 0, r.stderr[-2000:]
    ok, failed = r.stdout.split("RESULT")[1].split()
    assert ok == "False" and int(failed) >= 2


def run_script(script, *args, timeout=600):
    r = subprocess.run([sys.executable, f"profiling/{script}", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout, env=env())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_summary_reads_the_stages_real_outputs(tmp_path, step_json):
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    run_script("gpu_kernel_errors.py", "--out", work)
    run_script("bench_kernels.py", "--quick", "--out", work)
    shutil.copy(step_json, work)
    for name in ("bench_train", "bench_zero", "bench_data", "project_epoch"):  # committed CPU results
        shutil.copy(ROOT / "profiling" / "results" / f"{name}.json", work)
    (work / "tests_sync.xml").write_text(
        '<testsuites><testsuite tests="1" failures="1" errors="0" skipped="0"><testcase classname="t" '
        'name="test_sync"><failure message="boom: a sync"/></testcase></testsuite></testsuites>')
    (work / "logs" / "bench_train.log").write_text("a log\n")
    (work / "stages.tsv").write_text("".join(f"{s}\tok\t1\t10\tcmd {s}\n" for s in STAGES))
    gpu_summary.write(work, out, "test")
    text = (out / "gpu_check.md").read_text()
    key = text.split("## Key numbers")[1].split("## Stages")[0]
    train = json.loads((work / "bench_train.json").read_text())
    r05 = next(r for r in train["results"] if r["drop"] == "0.5")
    assert f"drop 0.5: fused {r05['fused']['tokens_per_s']:.0f} tokens/s vs unfused " \
           f"{r05['unfused']['tokens_per_s']:.0f}: {r05['ratio']['speedup']:.2f}x" in key
    assert "drop 0.1:0.5: fused" in key
    errs = json.loads((work / "kernel_errors.json").read_text())
    worst = max(e["triton"] for r in errs["results"] for e in r["errors"].values())
    assert f"kernel max error vs float64, float32: {worst:.2e}" in key
    assert "fused vs unfused first step (module, fp32): PASS" in key
    assert "ZeRO-2 (2 rank(s)" in key and "attention vit_b16_video_keep0.5 fwd+bwd: triton" in key
    assert "tests_sync: 0 passed, 1 failed" in key and "boom: a sync" in text
    projected = json.loads((ROOT / "profiling" / "results" / "project_epoch.json").read_text())
    gpus = {r["gpus"] for r in projected["results"]}
    assert any(f"one WebVid-10M epoch, drop 0.5 on {g} GPU(s)" in key for g in gpus), key
    for s in STAGES:
        assert f"## {s}: ok" in text
    with tarfile.open(out / "gpu_check_logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu_check_logs/logs/bench_train.log", "gpu_check_logs/bench_train.json",
            "gpu_check_logs/kernel_errors.json", "gpu_check_logs/gpu_check.md"} <= names


def test_summary_survives_a_stage_cut_short(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "bench_train.json").write_text('{"results": [{"drop": "0.5", "fu')  # killed mid-write
    (work / "step_check.json").write_text(json.dumps({"mode": "engine", "complete": False}))
    (work / "stages.tsv").write_text("bench_train\ttimed out after 75 s\t75\t75\tcmd\n"
                                     "step_check\ttimed out after 65 s\t65\t65\tcmd\n")
    gpu_summary.write(work, tmp_path / "out")
    text = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "## bench_train: timed out after 75 s" in text and "(no results" in text
    assert "step check: started (engine) but did not finish" in text
