"""Checkpoints of the trainer: atomic save and publish (`save`), resume (`resume`), the client
state saved with the engine's, and the consolidated fp32 weights the export is made from
(`export_final`).

The layout: CKPT/stepNNNNNNNN/ (DeepSpeed's files), CKPT/latest (the tag of the last complete
one). A save writes CKPT/.tmp-stepN first and publishes it only once every rank's files are on
disk, so `latest` never names a partial checkpoint.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

from hvfm.distributed import all_gather


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...): the previous one is intact. Exit 2."""
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


def resume(engine, ckpt_dir, loader, rank, world):
    """Load the checkpoint `latest` names into the engine (weights, optimizer, LR schedule) and
    this rank's loader position; returns the client state (`client_state`'s keys)."""
    _, client = engine.load_checkpoint(str(ckpt_dir))
    states = client.get("loaders")  # one per rank (the file holds rank 0's client state only)
    loader.load_state_dict(states[rank] if states and len(states) == world else client["loader"])
    return client


def save(engine, ckpt_dir, step, client):
    """Write the checkpoint of `step` so that `latest` never names a partial one: every rank writes
    into CKPT/.tmp-stepN, all ranks agree that every write succeeded, then rank 0 fsyncs and
    renames the folder to CKPT/stepN and replaces `latest` atomically (temp file + os.replace).
    A kill at any moment leaves `latest` naming the previous complete checkpoint (the next start
    removes the .tmp- folder). A failed write (disk full) removes the partial folder on every
    rank's say-so and raises CheckpointError on all ranks; nothing published is touched."""
    import torch.distributed as dist
    rank = dist.get_rank()
    ckpt_dir = Path(ckpt_dir)
    tag = tag_of(step)
    tmp_tag = f".tmp-{tag}"
    guard = _SaveGuard(engine)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
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



def export_final(folder, ckpt_dir, clip_config, tokenizer, build, image=False):
    """Write OUTPUT_DIR/final from the fp32 master weights of the checkpoint `latest` names
    (consolidated from the ZeRO partitions, not the bf16 module): an hvfm export, or after the
    image stage a plain HF CLIPModel folder with its tokenizer. Returns that state, for the
    closing evaluation (one model, one result). Rank 0 only."""
    from hvfm.export import consolidate_deepspeed, save_clip_folder, save_export
    state = consolidate_deepspeed(Path(ckpt_dir), latest_tag(ckpt_dir))
    if image:
        save_clip_folder(folder, state, clip_config, tokenizer)
    else:
        save_export(folder, state, clip_config, tokenizer, build)
    return state
