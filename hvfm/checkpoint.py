"""Checkpoints of the trainer: atomic save and publish (`save`), resume (`resume`), the client
state saved with the engine's, and the consolidated fp32 weights the export is made from
(`export_final`).

The layout: CKPT/stepNNNNNNNN/ (DeepSpeed's files and hvfm_checkpoint.json: the world size and
global batch it was saved with), CKPT/latest (the tag of the last complete one). A save writes
CKPT/.tmp-stepN first and publishes it only once every rank's files are on disk, so `latest`
never names a partial checkpoint.

Another world size (a node lost: 16 ranks resume on 8, or 2 on 1): ZeRO's optimizer state is
partitioned by rank, so `resume` converts the checkpoint once to DeepSpeed's universal format
(`deepspeed.checkpoint.ds_to_universal`, rank 0, the others wait; written to
CKPT/.tmp-stepN-universal and renamed to CKPT/stepN-universal when complete, reused by a later
resume, safe to delete) and loads it with DeepSpeed's `load_universal`: fp32 master weights, Adam
moments, the step count and the LR schedule carry over exactly. The data position carries over
as a share of the epoch: the samples the old ranks had consumed (rank 0's position x the old world
size; ranks step together) are divided among the new ranks, and the skip counters summed onto
the new rank 0 (see `rescale_loader_state` for what is approximate). The global batch
(micro batch x accumulation x ranks) must stay the same across the change: the LR schedule and
the data position are counted in it, and a relaunch that silently halves it would train another
recipe; the error says which gradient_accumulation_steps keeps it. (At the same world size a
changed batch is the user's explicit edit and is accepted, as before.)
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

from hvfm.distributed import all_gather

META = "hvfm_checkpoint.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...): the previous one is intact; or it cannot
    be resumed as asked (see `resume`). Exit 2."""
    collective = True  # raised on every rank at the same point


def tag_of(step):
    return f"step{step:08d}"


def latest_tag(ckpt_dir):
    """The tag `latest` names, or None."""
    latest = Path(ckpt_dir) / "latest"
    return latest.read_text().strip() if latest.exists() else None


def remove_partial(ckpt_dir):
    """Remove the .tmp- folders of saves that were killed (never published). Rank 0, at start."""
    for partial in Path(ckpt_dir).glob(".tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SaveGuard:
    """Wraps the engine's file writes during one save (this patches two DeepSpeed internals:
    `engine.checkpoint_engine.save`, which writes each file, and `engine._copy_recovery_script`):
    each file is fsynced after it is written, and an OSError (disk full, ...) is recorded instead
    of raised, so this rank goes on through DeepSpeed's collectives with the others and all ranks
    learn of it together afterwards. `restore` puts DeepSpeed's own methods back."""

    def __init__(self, engine):
        self.engine, self.error, self.files = engine, None, 0
        self.ce = engine.checkpoint_engine
        self.inner_save, self.inner_copy = self.ce.save, engine._copy_recovery_script
        self.ce.save = self.save
        engine._copy_recovery_script = self.copy

    def save(self, state_dict, path, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            out = self.inner_save(state_dict, path, *args, **kwargs)
            _fsync(path)
            self.files += 1
            return out
        except OSError as e:
            self.error = e
            return None

    def copy(self, *args, **kwargs):
        if self.error is None:
            try:
                return self.inner_copy(*args, **kwargs)
            except OSError as e:
                self.error = e
        return None

    def restore(self):
        self.ce.save = self.inner_save
        self.engine._copy_recovery_script = self.inner_copy


def client_state(step, loader, wall, nonfinite_skipped, batches_fed):
    """What a checkpoint holds besides the engine's state: the step, every rank's loader
    position (collective: each rank's is gathered, the file holds rank 0's copy), the training
    time so far and the counters a resumed run continues."""
    return {"step": step, "loader": loader.state_dict(), "loaders": all_gather(loader.state_dict()),
            "wall_s": wall, "nonfinite_skipped": nonfinite_skipped, "batches_fed": batches_fed}


def saved_layout(tag_dir):
    """What a checkpoint folder was saved with: hvfm_checkpoint.json's dict (world_size,
    global_batch, micro_batch, grad_accum, zero_stage, step); for a checkpoint of before that
    file, {"world_size": N} from the ranks of its ZeRO optimizer files; None without such files
    (no partitioned state: it loads on any world size)."""
    tag_dir = Path(tag_dir)
    try:
        return json.loads((tag_dir / META).read_text())
    except (OSError, ValueError):
        pass
    ranks = {int(m.group(1)) for f in tag_dir.glob("*_optim_states.pt")
             if (m := re.search(r"zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$", f.name))}
    return {"world_size": max(ranks) + 1} if ranks else None


def partitioned(tag_dir):
    """Whether the checkpoint holds optimizer state split by rank (ZeRO, or DeepSpeed's bf16
    optimizer): then it loads as saved only on its own world size."""
    return any(Path(tag_dir).glob("*zero_pp_rank_*_optim_states.pt"))


def rescale_loader_state(states, world, rank):
    """The loader state for `rank` of `world` from `states` (one per rank) saved on another
    world size: the epoch, and the epoch's samples consumed by all old ranks (rank 0's position x
    their number: ranks step together) divided among the new ranks, rounded down. The skip
    counters of every old rank are summed onto the new rank 0 (the totals a run reports stay).
    Approximate: map-style data draws one permutation per epoch split by rank, so the same
    samples count as consumed (exact when the share divides evenly, else up to world - 1 samples
    are seen twice), but a CSV read per rank (rows i % world) and shards (the slot layout
    changes) assign other samples to the new ranks: some samples of the epoch are seen twice,
    others wait for the next epoch. The shard buffers' states are dropped (another layout)."""
    from hvfm.data.loading.dataset import COUNTERS
    first = states[0]
    state = {k: v for k, v in first.items() if k not in ("shard_raw", "shard_layout")}
    state["position"] = first["position"] * len(states) // world
    for k in COUNTERS:
        state[k] = sum(s.get(k, 0) for s in states) if rank == 0 else 0
    return state


def resume(engine, ckpt_dir, loader, rank, world):
    """Load the checkpoint `latest` names into the engine (weights, optimizer, LR schedule) and
    this rank's loader position; returns the client state (`client_state`'s keys). A checkpoint
    of another world size is converted to DeepSpeed's universal format first (module
    docstring); a changed global batch across that change raises CheckpointError (one line)."""
    ckpt_dir = Path(ckpt_dir)
    tag = latest_tag(ckpt_dir)
    saved = saved_layout(ckpt_dir / tag) or {}
    old = saved.get("world_size", world)
    if old != world and partitioned(ckpt_dir / tag):
        check_global_batch(saved, engine, tag, world)
        utag = universal_checkpoint(ckpt_dir, tag, old, world, rank)
        engine._config.load_universal_checkpoint = True  # DeepSpeed's "checkpoint": {"load_universal"}
        try:
            _, client = engine.load_checkpoint(str(ckpt_dir), tag=utag)
        finally:
            engine._config.load_universal_checkpoint = False  # later saves and loads: the usual format
    else:
        _, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if client is None:
        raise CheckpointError(f"--resume: DeepSpeed loaded nothing from {ckpt_dir / tag}; the folder is "
                              f"incomplete: point 'latest' at an earlier step or start afresh")
    states = client.get("loaders") or [client["loader"]]  # one per rank (the file holds rank 0's client state)
    if len(states) == world:
        loader.load_state_dict(states[rank])
    else:
        state = rescale_loader_state(states, world, rank)
        if rank == 0:
            print(f"resume: the {len(states)} saved rank(s)' data position (epoch {state['epoch']}) shared out "
                  f"among {world}: {state['position']} samples per rank consumed (approximate, see README)",
                  flush=True)
        loader.load_state_dict(state)
    return client


def check_global_batch(saved, engine, tag, world):
    """Across a world-size change the global batch must stay (module docstring)."""
    old, batch = saved.get("global_batch"), engine.train_batch_size()
    if old is None or old == batch:
        return
    n, micro = saved["world_size"], engine.train_micro_batch_size_per_gpu()
    accum = engine.gradient_accumulation_steps()
    if old % (micro * world) == 0:
        fix = (f"set gradient_accumulation_steps to {old // (micro * world)} in the DeepSpeed config "
               f"(micro batch {micro} x {old // (micro * world)} x {world} rank(s) = {old})")
    elif old % world == 0:
        fix = (f"make train_micro_batch_size_per_gpu x gradient_accumulation_steps = {old // world} in "
               f"the DeepSpeed config")
    else:
        fix = f"resume on a number of ranks that divides {old}"
    raise CheckpointError(f"--resume: checkpoint {tag} was trained on {n} rank(s) with a global batch of "
                          f"{old}; on {world} rank(s) this config gives {batch} ({micro} x {accum} x "
                          f"{world}): {fix}, so the LR schedule and data position keep their meaning")


def universal_checkpoint(ckpt_dir, tag, old, world, rank):
    """CKPT/TAG-universal, converted from CKPT/TAG by rank 0 unless it exists (collective: every
    rank returns its tag once it is complete, or raises CheckpointError with rank 0's reason)."""
    utag = f"{tag}-universal"
    out, tmp = ckpt_dir / utag, ckpt_dir / f".tmp-{utag}"
    failed = None
    if rank == 0 and not out.is_dir():
        print(f"resume: checkpoint {tag} was saved on {old} rank(s), this run has {world}: converting "
              f"it to DeepSpeed's universal format in {out} (once)", flush=True)
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            from deepspeed.checkpoint import ds_to_universal
            # serial (1 worker): no process forked from a trainer holding a GPU context
            args = SimpleNamespace(input_folder=str(ckpt_dir / tag), output_folder=str(tmp / utag),
                                   num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                   strict=True, inject_missing_state=True)
            chatter = io.StringIO()
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                ds_to_universal.main(args)
            _fsync(tmp / utag, directory=True)
            os.rename(tmp / utag, out)
            _fsync(ckpt_dir, directory=True)
        except Exception as e:  # noqa: BLE001 - any failure of the conversion ends the resume in one line
            failed = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    errors = [e for e in all_gather(failed) if e]  # (every rank waits here for rank 0's conversion)
    if errors:
        raise CheckpointError(f"--resume: converting checkpoint {tag} (saved on {old} ranks) for {world} "
                              f"ranks failed ({errors[0]}); resume on {old} ranks, or free disk space "
                              f"for {ckpt_dir / utag} and retry")
    return utag


def save(engine, ckpt_dir, step, client):
    """Write the checkpoint of `step` so that `latest` never names a partial one: every rank writes
    into CKPT/.tmp-stepN, all ranks agree that every write succeeded, then rank 0 fsyncs and
    renames the folder to CKPT/stepN and replaces `latest` atomically (temp file + os.replace).
    A kill at any moment leaves `latest` naming the previous complete checkpoint (the next start
    removes the .tmp- folder). A failed write (disk full) removes the partial folder on every
    rank's say-so and raises CheckpointError on all ranks; nothing published is touched."""
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    rank = dist.get_rank()
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    tmp_tag = f".tmp-{tag}"
    layout = {"step": step, "world_size": dist.get_world_size(), "global_batch": engine.train_batch_size(),
              "micro_batch": engine.train_micro_batch_size_per_gpu(),
              "grad_accum": engine.gradient_accumulation_steps(), "zero_stage": engine.zero_optimization_stage()}
    # what ds_to_universal needs to convert it for another world size (see `resume`)
    client = {**client, UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    guard = _SaveGuard(engine)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
        if rank == 0 and guard.error is None:
            try:
                with open(ckpt_dir / tmp_tag / META, "w") as f:
                    f.write(json.dumps(layout))
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                guard.error = e
    finally:
        guard.restore()
    errors = [e for e in all_gather(None if guard.error is None else _describe(guard.error)) if e]
    if not errors:  # every file is on disk: publish, and let every rank know how that went
        failed = None
        if rank == 0:
            try:
                _publish(ckpt_dir, tmp_tag, tag)
            except OSError as e:
                failed = _describe(e)
        errors = [e for e in all_gather(failed) if e]
    if errors:
        if rank == 0:
            shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
        dist.barrier()
        prev = latest_tag(ckpt_dir)
        raise CheckpointError(f"saving checkpoint {tag} in {ckpt_dir} failed ({errors[0]}); "
                              + (f"the previous checkpoint {prev} is intact" if prev else "no checkpoint was kept")
                              + "; free disk space, then --resume")
    dist.barrier()


def _describe(e):
    return f"{e.strerror or e}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)


def _publish(ckpt_dir, tmp_tag, tag):
    tmp, final, latest = ckpt_dir / tmp_tag, ckpt_dir / tag, ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.exists() else None
    if final.exists():  # a copy of this step that a killed run renamed but never named in latest
        assert named != tag, f"{final} is the checkpoint 'latest' names"
        shutil.rmtree(final)
    _fsync(tmp, directory=True)
    os.rename(tmp, final)
    _fsync(ckpt_dir, directory=True)
    with open(ckpt_dir / "latest.tmp", "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(ckpt_dir / "latest.tmp", latest)
    _fsync(ckpt_dir, directory=True)


def truncate_metrics(path, step):
    """A resumed run recomputes the steps after its checkpoint: drop their rows logged before."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(rows):
        return
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)



def export_final(folder, ckpt_dir, clip_config, tokenizer, build, image=False, quiet=False):
    """Write OUTPUT_DIR/final from the fp32 master weights of the checkpoint `latest` names
    (consolidated from the ZeRO partitions, not the bf16 module): an hvfm export, or after the
    image stage a plain HF CLIPModel folder with its tokenizer. Returns that state, for the
    closing evaluation (one model, one result). Rank 0 only."""
    from hvfm.export import save_clip_folder, save_export
    from hvfm.load import consolidate_deepspeed
    state = consolidate_deepspeed(Path(ckpt_dir), latest_tag(ckpt_dir), quiet=quiet)
    if image:
        save_clip_folder(folder, state, clip_config, tokenizer)
    else:
        save_export(folder, state, clip_config, tokenizer, build)
    return state
