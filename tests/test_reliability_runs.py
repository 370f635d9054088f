"""Reliability of whole training runs, launched as users launch them (the deepspeed launcher, 2
ranks on CPU): a corpus with 20% broken rows, a hung and a crashing decoder and non-finite
losses/gradients trains to the end with exact counts; SIGKILL of the whole process group at a
random moment (ZeRO-2) and during a checkpoint save (ZeRO-3), and a disk that fills during a
save, cost at most one checkpoint interval, and the resumed losses equal the first computation
bit for bit; K non-finite steps in a row stop the run with exit code 3, the checkpoint intact.

Launches are expensive (~20-60 s each on 2 CPU cores), so each test chains several faults."""
import os
import time

import pytest

from hvfm.data import read_annotations
from hvfm.data.synthetic.clips import generate
from hvfm.data.text.tokens import clean_caption, ensure_tokenizer
from reliability_helpers import (add_broken_rows, assert_all_finite, fault_env, kill9, latest, losses,
                                 rng_delay, run, seed_drawing_every_bad_row, shm_buffers, start,
                                 summary, tiny_ds_config, wait_for)

STEPS, EVERY, MICRO = 10, 2, 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The synthetic corpus (38 clips) + 2 one-frame clips + 10 broken rows (20% of 50), one
    tokenizer for every run (BPE training is not deterministic run to run), tiny ZeRO configs."""
    root = tmp_path_factory.mktemp("rel")
    corpus = generate(root / "syn", n_train=38, n_test=4, frames=8, size=32, seed=0)
    broken_csv = root / "broken.csv"
    bad, kind_of, faults = add_broken_rows(corpus.train_csv, corpus.train_root, short=2, out=broken_csv)
    ann = read_annotations(broken_csv, corpus.train_root, clean=clean_caption)
    tok = root / "tok"
    ensure_tokenizer(tok, ann)
    return {"corpus": corpus, "csv": broken_csv, "ann": ann, "kind_of": kind_of, "faults": fault_env(faults),
            "tok": tok, "z2": tiny_ds_config(root / "z2.json", "z2", MICRO),
            "z3": tiny_ds_config(root / "z3.json", "z3", MICRO)}


def flags(data, out, config, csv_path=None, steps=STEPS):
    return ["--deepspeed", str(data[config]), "--train-csv", str(csv_path or data["csv"]),
            "--video-root", str(data["corpus"].train_root), "--tokenizer", str(data["tok"]),
            "--frames", "2", "--size", "32", "--workers", "1", "--log-every", "1", "--no-eval",
            "--precision", "fp32", "--max-steps", str(steps), "--save-every", str(EVERY),
            "--output-dir", str(out)]


def ok(r):
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "DataLoader worker" not in r.stderr, r.stderr[-3000:]
    assert not shm_buffers(r.port), "the run left DeepSpeed's /dev/shm buffers behind"
    return r


def logged_steps(out):
    """Steps logged so far (complete lines of metrics.csv; safe while it is being written)."""
    try:
        text = (out / "metrics.csv").read_text()
    except FileNotFoundError:
        return 0
    return max(0, text.count("\n") - 1)


def remove_shm(port):
    """After a run that exits with an error the launcher may stop a rank before it removes its
    shared-memory buffer (it kills the others as soon as one exits non-zero): clean up."""
    for name in shm_buffers(port):
        os.unlink(name)


def one_error_line(text, *words):
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.mark.slow  # 3 launches, ~1.5-3 min on 2 shared cores
def test_broken_corpus_hung_decoder_nan_and_kill9_resume_zero2(data, tmp_path):
    """ZeRO-2, 2 ranks: 20% broken rows (every kind, a decoder that hangs for ever, one that
    segfaults), NaN losses at micro-batches 3-4 on rank 1 only and NaN gradients at 7 on rank 0
    only. (1) Uninterrupted: reaches STEPS, skip/time-out/crash counts equal the replay of sampler
    and replacement chain, 3 non-finite micro-batches skipped, weights finite. (2) Same run,
    SIGKILLed at a random moment after its first checkpoint, then --resume: every loss equals (1)
    exactly, so do the counts; at most one checkpoint interval was recomputed."""
    hooks = dict(HVFM_TEST_DECODE_FAULT=data["faults"], HVFM_TEST_NAN_LOSS="3@1,4@1", HVFM_TEST_NAN_GRAD="7@0")
    fed = STEPS + 3  # 3 micro-batches skipped as non-finite, each consumed its batch
    seed, want = seed_drawing_every_bad_row(data["ann"], data["kind_of"], world=2, batch=MICRO, batches_fed=fed)
    assert want["timeouts"] >= 1 and want["crashes"] >= 1, want
    extra = ["--decode-timeout", "2", "--seed", str(seed)]
    ref = tmp_path / "ref"
    r = ok(run([*flags(data, ref, "z2"), *extra], **hooks))
    s = summary(ref)
    got = {k: s[k] for k in ("skipped_samples", "bad_rows_drawn", "decode_timeouts", "decoder_crashes")}
    assert got == dict(zip(got, want.values())), (got, want)
    assert s["steps"] == STEPS and s["nonfinite_skipped"] == 3, s
    assert r.stderr.count("non-finite loss") == 2 and r.stderr.count("non-finite gradient") == 1
    assert_all_finite(ref / "final")
    print(f"broken corpus run: {got}, non-finite skipped {s['nonfinite_skipped']}")
    reference = losses(ref)
    assert sorted(reference) == list(range(1, STEPS + 1))

    # A random moment: a random step t in 3..7 has been logged (so step 2's checkpoint is
    # published), then 0-0.3 s more: inside step t + 1, a save, or a wait for a batch behind a
    # hung decode.
    kill_seed = int(os.environ.get("HVFM_KILL_SEED", time.time_ns() % 10**6))
    target = 3 + int(rng_delay(kill_seed, 0, 5))
    out = tmp_path / "killed"
    proc = start([*flags(data, out, "z2"), *extra], tmp_path / "killed.log", **hooks)
    try:
        wait_for(lambda: logged_steps(out) >= target, proc)
        time.sleep(rng_delay(kill_seed + 1, 0.0, 0.3))
    finally:
        kill9(proc)
    log = (tmp_path / "killed.log").read_text()
    assert proc.returncode != 0 or "exits successfully" in log
    named = latest(out)
    kept = out / "checkpoints" / named
    assert {p.name for p in kept.iterdir()} >= {"mp_rank_00_model_states.pt",
                                                 "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"}, kill_seed
    logged = max(losses(out))
    resumed_from = int(named[4:])
    assert logged - resumed_from <= EVERY, (kill_seed, logged, named)  # lost <= one interval
    ok(run([*flags(data, out, "z2"), *extra, "--resume"], **hooks))
    assert losses(out) == reference, (kill_seed, named)
    s2 = summary(out)
    for k in ("steps", "skipped_samples", "bad_rows_drawn", "decode_timeouts", "decoder_crashes",
              "nonfinite_skipped"):
        assert s2[k] == s[k], (k, s2[k], s[k], kill_seed)
    assert not list((out / "checkpoints").glob(".tmp-*"))
    print(f"kill seed {kill_seed}: killed after step {logged} (target {target}), resumed from {named}")
    assert named != f"step{STEPS:08d}", "the run ended before the kill"


@pytest.mark.slow  # 3 launches, ~1.5-3 min on 2 shared cores
def test_disk_full_kill_during_save_and_nonfinite_stop_zero3(data, tmp_path):
    """ZeRO-2's sibling on ZeRO-3, 2 ranks, clean data, loader in the training process
    (--workers 0). (1) The disk fills on rank 1 only during the save of step 4: one error line,
    exit 2, `latest` still names step 2, no partial folder. (2) --resume, and SIGKILL while the
    save of step 8 is half written: `latest` names step 6, the partial folder is unpublished.
    (3) --resume: steps 7-8 again, then NaN losses from micro-batch 9 on: 3 in a row stop the run
    (exit 3, one line) with the checkpoint of step 8 intact and finite. Each step recomputed after
    a resume equals its first computation exactly; metrics.csv holds each step once."""
    out = tmp_path / "run"
    ckpt = out / "checkpoints"
    base = [*flags(data, out, "z3", csv_path=data["corpus"].train_csv, steps=10), "--workers", "0",
            "--max-nonfinite", "3"]
    r = run(base, HVFM_TEST_SAVE_FAULT="enospc@4:1")
    remove_shm(r.port)
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    one_error_line(r.stdout + r.stderr, "step00000004", "No space left on device", "step00000002 is intact")
    assert latest(out) == "step00000002" and not (ckpt / "step00000004").exists()
    assert not list(ckpt.glob(".tmp-*"))
    first = losses(out)
    assert sorted(first) == [1, 2, 3, 4]

    proc = start([*base, "--resume"], tmp_path / "hang.log", HVFM_TEST_SAVE_FAULT="hang@8")
    try:
        wait_for(lambda: list(ckpt.glob(".tmp-step00000008/.test-hang-rank*")), proc)
    finally:
        kill9(proc)
    assert latest(out) == "step00000006" and (ckpt / ".tmp-step00000008").is_dir()
    second = losses(out)
    assert sorted(second) == list(range(1, 9))
    assert {k: second[k] for k in first} == first  # 3, 4 recomputed from step 2: identical

    r = run([*base, "--resume"], HVFM_TEST_NAN_LOSS="9-")
    assert r.returncode == 3, (r.stdout[-2000:], r.stderr[-2000:])
    one_error_line(r.stdout + r.stderr, "3 non-finite steps in a row", "step00000008")
    assert "Traceback" not in r.stderr
    assert losses(out) == second  # 7, 8 recomputed from step 6: identical; nothing after
    assert latest(out) == "step00000008" and not list(ckpt.glob(".tmp-*"))
    assert_all_finite(ckpt / "step00000008")
    assert not (out / "final").exists()
    remove_shm(r.port)
