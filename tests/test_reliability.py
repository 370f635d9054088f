"""Reliability, in-process (no launcher): every broken file is always broken, hung and crashing
decoders are abandoned and replaced (0 and 2 workers), the skip count is exact, bad configs and
unwritable output folders fail at start with one line, checkpoints are published atomically."""
import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hvfm import checkpoint, config
from hvfm import train as train_mod
from hvfm.data import DecodeError, build_loader, build_tokenizer, decode_clip, read_annotations
from hvfm.data.decode import DecoderProcess
import decode_faults
from reliability_helpers import BAD_KINDS, add_broken_rows, expected_skips, fault_env
from videos import BROKEN_KINDS, write_broken, write_clip

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle moves left", "a blue square moves right", "a green star appears"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(CAPTIONS * 3, tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 good clips (12 frames; 4 of them 2-frame short clips) + the 10 rows of BAD_KINDS (20%)."""
    root = tmp_path_factory.mktemp("corpus")
    path = root / "train.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(40):
            write_clip(root / "v" / "000" / f"{i}.mp4", frames=2 if i < 4 else 12, width=32, height=32)
            w.writerow([str(i), "", "PT00H00M01S", "000", CAPTIONS[i % 3]])
    bad, kind_of, faults = add_broken_rows(path, root / "v")
    return read_annotations(path, root / "v"), kind_of, fault_env(faults)


def test_every_broken_kind_always_fails_and_short_clips_are_samples(tmp_path):
    """Exact skip counts need a deterministic verdict: each broken kind fails for every frame draw,
    in-process and in the watchdog; a 2-frame clip asked for 4 frames is a (short) sample."""
    good = write_clip(tmp_path / "good.mp4", frames=12)
    short = write_clip(tmp_path / "short.mp4", frames=2)
    for kind in BROKEN_KINDS:
        write_broken(tmp_path / f"{kind}.mp4", kind, good=good)
    watchdog = DecoderProcess(20)
    try:
        for seed in range(6):
            for kind in BROKEN_KINDS:
                for train in (True, False):
                    with pytest.raises(DecodeError) as e:
                        decode_clip(tmp_path / f"{kind}.mp4", 4, train, np.random.default_rng(seed), 32)
                    assert e.value.kind == "bad"
                with pytest.raises(DecodeError):
                    watchdog.decode(tmp_path / f"{kind}.mp4", 4, True, np.random.default_rng(seed), 32)
            frames, _ = decode_clip(short, 4, True, np.random.default_rng(seed), 32)
            assert len(frames) == 2
            # the watchdog decodes the same frames and advances the rng exactly as in-process
            r1, r2 = np.random.default_rng(seed), np.random.default_rng(seed)
            a = watchdog.decode(good, 4, True, r1, 32)
            b, _ = decode_clip(good, 4, True, r2, 32)
            assert np.array_equal(a, b) and r1.bit_generator.state == r2.bit_generator.state
        assert watchdog.started == 1  # bad files never cost the child
    finally:
        watchdog.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_hung_and_crashing_decoders_are_abandoned_counted_and_replaced(corpus, tokenizer, workers, monkeypatch):
    """A decode that never returns (signals blocked, as a stuck C call) is killed after
    decode_timeout and counted; a decoder segfault likewise; the epoch completes and the counts
    equal the replay of sampler + replacement chain (20% of the rows are broken)."""
    ann, kind_of, faults = corpus
    decode_faults.install(faults, monkeypatch)
    timeout = 2.0  # generous: a legitimate decode on a loaded CI machine never takes that long
    loader = build_loader(ann, tokenizer, batch_size=5, frames=4, size=32, num_workers=workers,
                          seed=3, decode_timeout=timeout)
    started = time.monotonic()
    for epoch in range(2):
        loader.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == len(ann) // 5
        for b in batches:
            assert not any(c.startswith("a broken") for c in b["captions"])
            assert set(b["num_frames"].tolist()) <= {2, 4}  # short clips train, padded
    elapsed = time.monotonic() - started
    want = expected_skips(loader.dataset, kind_of, world=1, batch=5, batches_fed=2 * (len(ann) // 5))
    assert loader.counters() == want, (loader.counters(), want)
    assert want["timeouts"] >= 1 and want["crashes"] >= 1 and want["bad_drawn"] == 2 * len(BAD_KINDS)
    assert elapsed < 60 + want["timeouts"] * (timeout + 2), elapsed
    assert len(loader.bad_files) == len(BAD_KINDS)  # each bad row drawn, each path logged once


def test_ds_config_unknown_key_and_unwritable_output_exit_2(tmp_path, capsys):
    base = ["--deepspeed", "ds_configs/z2.json", "--train-csv", "x.csv", "--video-root", str(tmp_path)]
    cfg = json.loads((ROOT / "ds_configs" / "z2.json").read_text())
    for typo, right in (("gradient_clip", "gradient_clipping"), ("zero_optimisation", "zero_optimization"),
                        ("train_micro_batch_size_per_gpuu", "train_micro_batch_size_per_gpu")):
        bad = tmp_path / f"{typo}.json"
        bad.write_text(json.dumps({**cfg, typo: cfg.get(right, 1)}))
        expect_exit(capsys, [*base[2:], "--deepspeed", str(bad), "--output-dir", str(tmp_path / "o")], 2,
                    f'"{typo}"', f'"{right}"')
    ok = tmp_path / "comment.json"
    ok.write_text(json.dumps({**cfg, "_comment": "keys starting with _ are comments"}))
    assert config.read_ds_config(ok, 1)["_comment"]

    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    expect_exit(capsys, [*base, "--output-dir", str(a_file / "run")], 2, str(a_file), "is a file")
    expect_exit(capsys, [*base, "--output-dir", str(a_file)], 2, "is a file")
    ro = "/sys/hvfm-reliability-test"  # a read-only file system even for root
    expect_exit(capsys, [*base, "--output-dir", ro], 2, "cannot write", "--output-dir")
    if os.geteuid() != 0:  # root writes into a 0o555 folder regardless
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        expect_exit(capsys, [*base, "--output-dir", str(locked / "run")], 2, "cannot write")
    assert not (tmp_path / "o").exists() and not Path(ro).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".hvfm")) == []


def expect_exit(capsys, argv, code, *words):
    with pytest.raises(SystemExit) as e:
        train_mod.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_publish_is_atomic_and_resume_drops_recomputed_rows(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / ".tmp-step00000004").mkdir(parents=True)
    (ckpt / ".tmp-step00000004" / "w.pt").write_bytes(b"new")
    (ckpt / "step00000002").mkdir()
    (ckpt / "latest").write_text("step00000002")
    (ckpt / "step00000004").mkdir()  # renamed by a killed run, never named by latest: replaced
    (ckpt / "step00000004" / "stale").write_text("old")
    checkpoint._publish(ckpt, ".tmp-step00000004", "step00000004")
    assert (ckpt / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in (ckpt / "step00000004").iterdir()) == ["w.pt"]
    assert not (ckpt / ".tmp-step00000004").exists() and not (ckpt / "latest.tmp").exists()
    assert (ckpt / "step00000002").is_dir()
    (ckpt / ".tmp-step00000004").mkdir()
    with pytest.raises(AssertionError, match="latest"):  # never replace the one latest names
        checkpoint._publish(ckpt, ".tmp-step00000004", "step00000004")

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n1,0.5\n2,0.4\n3,0.3\n4,0.2\n")
    checkpoint.truncate_metrics(metrics, 2)
    assert metrics.read_text().split() == ["step,loss", "1,0.5", "2,0.4"]


def test_nan_injection_parsing_and_counting():
    """The test-side NaN injector (tests/fault_train.py): ranges, rank filters, the micro-batch
    count, and a NaN gradient with a finite loss."""
    from fault_train import NaNInjector, parse_ranges, save_fault
    assert parse_ranges("3,4@1,9-", 0) == [(3, 3), (9, 10**12)]
    assert parse_ranges("3,4@1,9-", 1) == [(3, 3), (4, 4), (9, 10**12)]
    r0, r1 = NaNInjector(0, "3,4@1,9-", "6@0"), NaNInjector(1, "3,4@1,9-", "6@0")
    one = torch.tensor(1.0, requires_grad=True)
    nans = [bool(torch.isnan(r0(one))) for _ in range(10)]  # micro-batches 1..10
    assert nans == [False, False, True, False, False, False, False, False, True, True]
    r1.fed = 3
    assert bool(torch.isnan(r1(one)))  # micro-batch 4, rank 1
    r0.fed = 5
    out = r0(one * 2)  # micro-batch 6: finite loss, NaN gradient
    assert torch.isfinite(out) and out.item() == 2.0
    out.backward()
    assert torch.isnan(one.grad)
    assert save_fault("enospc@4:1", 1) == ("enospc", 4) and save_fault("enospc@4:1", 0) is None
    assert save_fault("hang@8", 3) == ("hang", 8) and save_fault("", 0) is None


def test_save_guard_records_a_failed_write_and_puts_deepspeed_back(tmp_path):
    """checkpoint._SaveGuard on a stand-in engine, with the test-side disk-full writer of
    tests/fault_train.py: the first failed write is recorded (not raised), later writes of that
    save are skipped, successful ones are fsynced and counted, DeepSpeed's methods come back."""
    from types import SimpleNamespace

    from fault_train import faulty_writer

    def write(state, path):
        Path(path).write_bytes(state)

    ce = SimpleNamespace(save=write)
    engine = SimpleNamespace(checkpoint_engine=ce, _copy_recovery_script=lambda *a: "copied")
    tmp = tmp_path / ".tmp-step00000004"
    tmp.mkdir()
    ce.save = faulty_writer(ce.save, "enospc", 4, rank=0)
    inner = ce.save
    guard = checkpoint._SaveGuard(engine)
    assert ce.save == guard.save
    guard.save(b"x" * 10, tmp / "a.pt")  # the fault: 1 KiB, then ENOSPC
    guard.save(b"y", tmp / "b.pt")  # skipped: the save has failed already
    assert guard.copy() is None
    guard.restore()
    assert isinstance(guard.error, OSError) and "No space left" in checkpoint._describe(guard.error)
    assert (tmp / "a.pt").stat().st_size == 1024 and not (tmp / "b.pt").exists() and guard.files == 0
    assert ce.save is inner and engine._copy_recovery_script() == "copied"

    other = tmp_path / ".tmp-step00000006"  # another step's save: written, fsynced, counted
    other.mkdir()
    guard = checkpoint._SaveGuard(engine)
    guard.save(b"z", other / "c.pt")
    guard.restore()
    assert guard.error is None and guard.files == 1 and (other / "c.pt").read_bytes() == b"z"
