"""Helpers of the reliability tests: a WebVid corpus with broken rows, the exact skip count a
training run must report for it, and launching / killing the trainer as a user would."""
import csv
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from videos import write_broken, write_clip

ROOT = Path(__file__).resolve().parents[1]

# Every way a row can be broken; "hang" and "crash" are real clips whose decode tests/decode_faults.py
# (HVFM_TEST_DECODE_FAULT for a launched trainer: tests/fault_train.py) makes hang for ever
# (signals blocked) or segfault.
BAD_KINDS = ("missing", "empty", "truncated", "truncated_faststart", "garbage", "text", "zero_frames",
             "hang", "crash", "missing")


def fault_env(names):
    """The fault spec (decode_faults.install, HVFM_TEST_DECODE_FAULT) for a corpus' hang/crash files."""
    return ",".join(f"{kind}:{name}" for kind, name in names)


def add_broken_rows(csv_path, video_root, kinds=BAD_KINDS, short=0, short_frames=1, out=None):
    """Append one row per kind (and `short` good clips of `short_frames` frames) to a WebVid CSV
    (written to `out`, default: in place). Returns (bad row indices, {row index: kind},
    [(fault kind, file name)])."""
    video_root = Path(video_root)
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    good = video_root / body[0][3] / f"{body[0][0]}.mp4"
    bad, kind_of, faults = [], {}, []
    for j, kind in enumerate(kinds):
        vid = f"9{j:06d}"
        path = video_root / "bad" / f"{vid}.mp4"
        if kind in ("hang", "crash"):
            write_clip(path, frames=4, width=32, height=32)
            faults.append((kind, path.name))
        else:
            write_broken(path, kind, good=good)
        kind_of[len(body)] = kind
        bad.append(len(body))
        body.append([vid, "", "PT00H00M01S", "bad", f"a broken {kind} video"])
    for j in range(short):
        vid = f"8{j:06d}"
        write_clip(video_root / "short" / f"{vid}.mp4", frames=short_frames, width=32, height=32)
        body.append([vid, "", "PT00H00M01S", "short", "a very short clip"])
    with open(out or csv_path, "w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return bad, kind_of, faults


def seed_drawing_every_bad_row(ann, bad_kind, world, batch, batches_fed, tries=200):
    """The first seed whose sampler draws every bad row within `batches_fed` batches per rank, so
    that a short run meets every kind of fault (a hung and a crashing decoder included). For a
    training run from a CSV, which each rank reads for its own rows (see `expected_skips`)."""
    from hvfm.data import VideoTextDataset
    for seed in range(tries):
        counts = expected_skips(VideoTextDataset(ann, seed=seed), bad_kind, world, batch, batches_fed,
                                csv_by_rank=True)
        if counts["bad_drawn"] == len(bad_kind):
            return seed, counts
    raise AssertionError("no seed draws every bad row")


def expected_skips(dataset, bad_kind, world, batch, batches_fed, max_retries=10, csv_by_rank=False):
    """The counters a run must report after feeding `batches_fed` batches of `batch` samples per
    rank (drop_last): replays the sampler and the dataset's replacement chain, with the bad rows
    known in advance (`bad_kind`: {row (pair) index: kind}). Returns dict(skipped, bad_drawn,
    timeouts, crashes). csv_by_rank: the trainer reads a CSV for each rank's rows only (rows
    i % world == rank, one caption each), samples within them and draws replacements among them."""
    from types import SimpleNamespace

    from hvfm.data import ResumableDistributedSampler
    n = len(dataset)
    counts = dict(skipped=0, bad_drawn=0, timeouts=0, crashes=0)
    for rank in range(world):
        if csv_by_rank and world > 1:
            rows = list(range(rank, n, world))  # this rank's rows, in file order
            local = SimpleNamespace(seed=dataset.seed, ann=rows)
            replace = lambda index, ep, attempt: rows[type(dataset).replacement(local, index, ep, attempt)]  # noqa: E731
            sampler = ResumableDistributedSampler(len(rows), 1, 0, shuffle=True, seed=dataset.seed,
                                                  num_samples=-(-n // world))
            to_global = rows.__getitem__
        else:
            replace, to_global = dataset.replacement, int
            sampler = ResumableDistributedSampler(n, world, rank, shuffle=True, seed=dataset.seed)
        per_epoch = len(sampler) // batch
        drawn, epoch = [], 0
        while len(drawn) < batches_fed * batch:
            sampler.set_epoch(epoch)
            drawn += list(sampler)[: per_epoch * batch]
            epoch += 1
        for index, ep in drawn[: batches_fed * batch]:
            pair = to_global(index)
            for attempt in range(max_retries + 1):
                if attempt:
                    pair = replace(index, ep, attempt)
                kind = bad_kind.get(pair)
                if kind is None:
                    break
                counts["skipped"] += 1
                counts["bad_drawn"] += attempt == 0
                counts["timeouts"] += kind == "hang"
                counts["crashes"] += kind == "crash"
    return counts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra):
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    for k in list(e):
        if k.startswith("HVFM_TEST_"):
            del e[k]
    e.update({k: str(v) for k, v in extra.items()})
    return e


FAULT_HOOKS = ("HVFM_TEST_NAN_LOSS", "HVFM_TEST_NAN_GRAD", "HVFM_TEST_SAVE_FAULT", "HVFM_TEST_DECODE_FAULT")


def ds_command(flags, procs, port, hooks=()):
    """The launcher command: hvfm/train.py, or with a NaN or save fault tests/fault_train.py (the
    same trainer with those faults injected by a patched deepspeed.initialize)."""
    script = "tests/fault_train.py" if any(h in FAULT_HOOKS for h in hooks) else "hvfm/train.py"
    return ["deepspeed", "--num_gpus", str(procs), "--master_port", str(port), script, *flags]


def shm_buffers(port, procs=2):
    """DeepSpeed's CPU shared-memory all-reduce buffers of a launch on `port` that exist."""
    names = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(procs))
    return [n for n in names if os.path.exists(n)]


def run(flags, procs=2, timeout=600, **hooks):
    """Run the trainer to its end (the deepspeed launcher with `procs` ranks); CompletedProcess
    with `.port`, the master port it used."""
    port = free_port()
    r = subprocess.run(ds_command(flags, procs, port, hooks), cwd=ROOT, env=env(**hooks), capture_output=True,
                       text=True, timeout=timeout)
    r.port = port
    return r


def start(flags, log, procs=2, **hooks):
    """Start the launcher in a process group of its own (so that one SIGKILL takes every rank,
    loader worker and decoder child, as a node failure would)."""
    out = open(log, "w")
    port = free_port()
    proc = subprocess.Popen(ds_command(flags, procs, port, hooks), cwd=ROOT, env=env(**hooks), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    proc.port, proc.procs = port, procs
    return proc


def kill9(proc):
    """SIGKILL the whole process group; then remove the shared-memory buffers its ranks had no
    chance to remove (a killed run leaks them; this is the test's own clean-up)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    for name in shm_buffers(proc.port, proc.procs):
        os.unlink(name)


def wait_for(predicate, proc, timeout=300, poll=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return predicate()
        time.sleep(poll)
    raise TimeoutError("condition not reached")


def latest(out):
    f = Path(out) / "checkpoints" / "latest"
    return f.read_text().strip() if f.exists() else None


def losses(out):
    """{step: (loss, vtc, vtm, mlm, lr)} as the strings metrics.csv holds (compared exactly)."""
    with open(Path(out) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {int(r["step"]): tuple(r[k] for k in ("loss", "vtc", "vtm", "mlm", "lr")) for r in rows}


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def assert_all_finite(folder):
    """Every tensor of every .pt / .safetensors file under `folder` is finite."""
    import torch
    files = [p for p in Path(folder).rglob("*") if p.suffix in (".pt", ".safetensors")]
    assert files, f"no checkpoint files under {folder}"

    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                assert torch.isfinite(x).all(), f"non-finite tensor in {p}"
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    for p in files:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            walk(load_file(str(p)))
        else:
            walk(torch.load(p, map_location="cpu", weights_only=False))


def tiny_ds_config(path, base="z2", micro=2):
    cfg = json.loads((ROOT / "ds_configs" / f"{base}.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = micro
    Path(path).write_text(json.dumps(cfg))
    return Path(path)


def rng_delay(seed, lo, hi):
    return float(np.random.default_rng(seed).uniform(lo, hi))
