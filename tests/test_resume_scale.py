"""Resume at scale.

Shards: a resumed shard loader skips the shards its slots consumed (from index.json's counts)
instead of reading every consumed sample, so what the first batch costs does not grow with how
far the epoch had gone; what it delivers is the uninterrupted run's (exactly when the shuffle
buffer held only samples of the shard being read, else that run's rest of the pass less the
buffered samples of earlier shards).

World size: a ZeRO-2 bf16 checkpoint saved on 2 ranks resumes on 1 (DeepSpeed's universal
checkpoint): weights, Adam moments, step count and LR schedule carry over, the data position is
shared out, a changed global batch is refused in one line."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from hvfm.data.sources.prepare import INDEX, prepare
from hvfm.data.loading.shards import build_shard_loader, shard_captions
from hvfm.data.synthetic.clips import generate
from hvfm.data.text.tokens import ensure_tokenizer


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """16 prepared samples (one shard), their tar members by sample key."""
    root = tmp_path_factory.mktemp("scale")
    corpus = generate(root / "syn", n_train=16, n_test=2, frames=9, size=32, seed=0)
    prepare(corpus.train_csv, corpus.train_root, root / "one", size=32, fps=8, shard_size=16, progress=False)
    samples = {}
    with tarfile.open(root / "one" / "000000.tar") as t:
        for m in t:
            if m.isfile():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = t.extractfile(m).read()
    tok = ensure_tokenizer(root / "tok", shard_captions(root / "one"))
    return [samples[k] for k in sorted(samples)], tok


def layout(clips, folder, total, shard):
    """`total` samples (the 16 clips over and over, keys 0..total-1) in shards of `shard`, with the
    index.json prepare writes (the counts the resume skips by)."""
    import webdataset as wds
    samples, _ = clips
    folder.mkdir(parents=True)
    names = []
    for k in range(0, total, shard):
        name = f"{k // shard:06d}.tar"
        with wds.TarWriter(str(folder / name), mtime=0) as w:
            for i in range(k, min(total, k + shard)):
                w.write({"__key__": f"{i:09d}", **samples[i % len(samples)]})
        names.append({"name": name, "samples": min(total, k + shard) - k})
    (folder / INDEX).write_text(json.dumps({"shards": names, "samples": total}))
    return folder


def make(spec, clips, workers=0, buffer=8, batch=4, world=1, rank=0, seed=3):
    return build_shard_loader(spec, clips[1], batch_size=batch, frames=2, size=16, num_workers=workers,
                              shuffle_buffer=buffer, seed=seed, rank=rank, world_size=world)


def stopped_after(spec, clips, batches, **kw):
    """The loader state (as a checkpoint keeps it) after `batches` batches."""
    loader = make(spec, clips, **kw)
    it = iter(loader)
    for _ in range(batches):
        next(it)
    del it
    return json.loads(json.dumps(loader.state_dict()))


def resumed(spec, clips, state, **kw):
    loader = make(spec, clips, **kw)
    loader.load_state_dict(state)
    return loader


def raw_stream(loader, slot_state, n, L=0):
    """The first n (raw index) taken from slot L's shuffled stream continued from `slot_state`."""
    ds = loader.dataset
    state = slot_state or {"k": 0, "r": 0, "buf": []}
    stream = ds._resume_stream(ds.rank * ds.slots + L, L, state)
    return [next(stream)[0] for _ in range(n)], ds.resume_stats[L]


def test_resume_exact_when_the_buffer_holds_only_the_current_shard(clips, tmp_path):
    # 64 samples in shards of 16 (each of 2 workers reads 2), buffer 4: the save after 12
    # batches finds every buffered sample in the slot's second shard, the one being read, so
    # the resume restores the buffer whole.
    spec = layout(clips, tmp_path / "s", 64, 16)
    ref = list(make(spec, clips, workers=2, buffer=4))
    state = stopped_after(spec, clips, 12, workers=2, buffer=4)
    assert all(s["r"] > 16 and s["buf"] and min(s["buf"]) >= 16 for s in state["shard_raw"])
    again = make(spec, clips, workers=2, buffer=4)  # (each slot's resume, run in this process)
    for L, s in enumerate(state["shard_raw"]):
        _, stats = raw_stream(again, s, 1, L)
        assert stats["dropped"] == 0 and stats["restored"] == len(s["buf"])
        assert stats["read"] == s["r"] - 16 * ((s["r"] - 1) // 16)  # the current shard's head only
    loader = resumed(spec, clips, state, workers=2, buffer=4)
    rest = list(loader)
    assert len(rest) == len(ref) - 12 == 4
    for a, b in zip(ref[12:], rest):
        for k in ("pixels", "index", "mlm_input_ids", "mlm_labels", "input_ids"):
            assert torch.equal(a[k], b[k]), k


def test_resume_approximation_drops_only_old_buffered_samples(clips, tmp_path):
    # Shards of 4 under a buffer of 8: the buffer holds samples of earlier shards, which the
    # resume does not go back for. The rest of the pass is the uninterrupted run's less those.
    spec = layout(clips, tmp_path / "s", 64, 4)
    loader = make(spec, clips, buffer=8)
    ref, _ = raw_stream(loader, None, 40)
    state = stopped_after(spec, clips, 5, buffer=8)["shard_raw"][0]
    assert state["k"] == 20 and len(state["buf"]) == 7
    begin = 4 * ((state["r"] - 1) // 4)
    old = [i for i in state["buf"] if i < begin]
    assert old, "the case must drop something"
    again = make(spec, clips, buffer=8)
    got, stats = raw_stream(again, state, 64)  # past the end of the pass: the buffer drained
    assert stats["dropped"] == len(old) and sorted(stats["dropped_ids"]) == sorted(old)
    assert stats["read"] == state["r"] - begin <= 4
    taken = set(ref[:20])
    assert not taken & set(got) and not set(old) & set(got)  # nothing twice, dropped stay out
    # every other sample of the pass is taken once (the second pass begins at raw index 64)
    rest = [i for i in got if i < 64]
    assert sorted(rest) == sorted(set(range(64)) - taken - set(old))


@pytest.fixture
def tar_reads(monkeypatch):
    """Samples that webdataset's tar reader hands out in this process, counted."""
    import webdataset as wds
    count = [0]
    inner = wds.tarfile_to_samples

    def counting(*args, **kwargs):
        stage = inner(*args, **kwargs)

        def run(src):
            for sample in stage(src):
                count[0] += 1
                yield sample
        return run
    monkeypatch.setattr(wds, "tarfile_to_samples", counting)
    return count


def test_first_batch_costs_at_most_one_shard_more_late_in_the_epoch(clips, tmp_path, tar_reads):
    # 96 samples in 12 shards of 8: one rank, one slot (the loader in this process), with and
    # without a buffer; the cost is the samples the tar reader hands out until the first batch.
    spec = layout(clips, tmp_path / "s", 96, 8)

    def reads_to_first_batch(batches, **kw):
        state = stopped_after(spec, clips, batches, **kw)
        loader = resumed(spec, clips, state, **kw)
        before = tar_reads[0]
        next(iter(loader))
        return tar_reads[0] - before, state["shard_raw"][0]["r"]

    for kw in ({"buffer": 8}, {"buffer": 0}):
        early, _ = reads_to_first_batch(1, **kw)
        late, position = reads_to_first_batch(20, **kw)
        assert position >= 80  # 10 of the 12 shards consumed
        assert late <= early + 8, (kw, early, late)  # at most one shard (8 samples) more
        assert late < position - 8  # the consumed shards were skipped, not read
    # 2 ranks x 2 workers (4 slots of 3 shards): the resume runs in the worker processes, so each
    # slot's resume is replayed here from the state the loader kept
    kw = {"buffer": 4, "world": 2, "rank": 1, "workers": 2, "batch": 2}
    probe = make(spec, clips, **kw)
    cost = {}
    for batches in (2, 18):
        state = stopped_after(spec, clips, batches, **kw)
        for L, s in enumerate(state["shard_raw"]):
            before = tar_reads[0]
            _, stats = raw_stream(probe, s, 1, L)
            cost[batches, L] = tar_reads[0] - before, s["r"]
            assert stats["read"] <= 8
    for L in (0, 1):
        assert cost[18, L][1] >= 16  # 2 of the slot's 3 shards consumed
        assert cost[18, L][0] <= cost[2, L][0] + 8 and cost[18, L][0] < cost[18, L][1] - 8


def test_fewer_shards_than_slots_resumes_exactly(clips, tmp_path):
    # 2 shards for 2 ranks x 2 workers: every slot reads every shard and keeps every 4th sample;
    # the skip counts kept samples per shard from index.json.
    spec = layout(clips, tmp_path / "s", 40, 20)
    kw = {"buffer": 0, "world": 2, "rank": 1, "workers": 2, "batch": 2}
    loader = make(spec, clips, **kw)
    for L in (0, 1):
        ref, _ = raw_stream(loader, None, 14, L)
        assert ref == list(range(14))
        got, stats = raw_stream(loader, {"k": 7, "r": 7, "buf": []}, 7, L)
        assert got == ref[7:] and stats["read"] == 2  # shard 0 holds 5 of the slot's: 5, 6 read
    state = stopped_after(spec, clips, 3, **kw)
    full = list(make(spec, clips, **kw))
    rest = list(resumed(spec, clips, state, **kw))
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[3:]]


def test_rescaled_position_skips_the_samples_the_old_ranks_took():
    # map-style data: one permutation per epoch split by rank; 4 ranks at position 6 took its
    # first 24 samples, and 2 (or 3) ranks resumed from rank 0's state skip those same ones
    from hvfm.checkpoint import rescale_loader_state
    from hvfm.data.loading.dataset import ResumableDistributedSampler
    n = 60
    taken = {i for r in range(4) for i, _ in list(ResumableDistributedSampler(n, 4, r, seed=1))[:6]}
    states = [{"epoch": 0, "position": 6, "skipped": r, "bad_drawn": 0, "timeouts": 0, "crashes": 1,
               "shard_raw": [None], "shard_layout": [4, 1]} for r in range(4)]
    for world in (2, 3):
        rest = []
        for rank in range(world):
            state = rescale_loader_state(states, world, rank)
            assert state["position"] == 24 // world and "shard_raw" not in state
            assert (state["skipped"], state["crashes"]) == ((6, 4) if rank == 0 else (0, 0))
            sampler = ResumableDistributedSampler(n, world, rank, seed=1)
            sampler.set_epoch(0, state["position"])
            rest += [i for i, _ in sampler]
        assert sorted(rest) == sorted(set(range(n)) - taken)


def test_checkpoint_of_2_ranks_resumes_on_1(tmp_path):
    # ~40 s: 2 ranks train 3 steps and save (ZeRO-2, bf16), 1 rank resumes: first with the same
    # config (half the global batch: refused in one line, nothing converted), then with
    # accumulation 2 (universal checkpoint)
    root = Path(__file__).resolve().parents[1]
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(root))

    def run(mode, world):
        out = tmp_path / f"{mode}.json"
        r = subprocess.run([sys.executable, str(root / "tests" / "world_change_run.py"), mode, str(world),
                            str(ckpt), str(out)], cwd=root, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
        return json.loads(out.read_text()), r.stdout

    saved, _ = run("save", 2)
    assert json.loads((ckpt / "step00000003" / "hvfm_checkpoint.json").read_text())["world_size"] == 2
    got, stdout = run("resume", 1)
    err = got["error"]
    assert err and "\n" not in err and not got["converted_before_check"]
    assert "trained on 2 rank(s) with a global batch of 4" in err and "set gradient_accumulation_steps to 2" in err
    assert "converting it to DeepSpeed's universal format" in stdout
    assert (ckpt / "step00000003-universal").is_dir() and not list(ckpt.glob(".tmp-*"))
    a, b = saved["saved"], got["resumed"]
    assert b["client_step"] == 3 and b["global_steps"] == a["global_steps"] == 3
    assert b["lr"] == a["lr"]  # the schedule where it was
    assert b["adam_step"] == a["adam_step"] == [3]
    for k in ("master", "exp_avg", "exp_avg_sq"):  # the fp32 weights and Adam moments, all of them
        assert b[k] == pytest.approx(a[k], rel=1e-9) and b[k] > 0, k
    assert got["next_lr"] == saved["next_lr"]  # and it goes on as the 2-rank run did
    assert all(x == x and abs(x) < 100 for x in got["losses"])  # finite
    # the data position: 2 ranks x 12 samples of epoch 1 for the one rank, counters summed
    assert got["loader"] == {"epoch": 1, "position": 24, "skipped": 3, "bad_drawn": 1, "timeouts": 0,
                             "crashes": 0}
    assert got["saved_layout"]["world_size"] == 1 and got["saved_layout"]["global_batch"] == 4
