"""The trainer with faults injected, for the reliability tests: `deepspeed tests/fault_train.py
[train.py flags]` runs `hvfm.train.main` unchanged, with `deepspeed.initialize` patched so that
the engine it returns misbehaves where these variables say (they live here, not in the package):

  HVFM_TEST_NAN_LOSS / HVFM_TEST_NAN_GRAD = "3,4,9-"   the loss (or, with a finite loss, every
      gradient) is NaN at those micro-batches (1-based, counted from the start of the run, across
      resumes: a resumed run starts from the checkpoint's `batches_fed`); "3@1" on rank 1 only.
  HVFM_TEST_SAVE_FAULT = "enospc@STEP[:RANK]"   the save of STEP writes 1 KiB of its first file,
      then raises ENOSPC (disk full); "hang@STEP[:RANK]" writes the first file, touches
      .test-hang-rankR in the checkpoint's temp folder and sleeps for ever (to be SIGKILLed).
  HVFM_TEST_DATA_ERROR = "K@RANK"   rank RANK raises a DataError (as its loader would) at its
      micro-batch K (1-based), the other ranks go on into the step's collectives.

  HVFM_TEST_DECODE_FAULT = "hang:NAME,crash:NAME2"   the watchdog child's decode of those files
      (or shard sample keys) hangs for ever or segfaults (tests/decode_faults.py; the package
      reads no test variable)."""
from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

import torch


def parse_ranges(spec, rank):
    """"3,4@1,9-" -> [(lo, hi), ...] of the entries that apply on `rank` (hi inclusive)."""
    ranges = []
    for item in filter(None, spec.split(",")):
        item, _, on_rank = item.partition("@")
        if on_rank and int(on_rank) != rank:
            continue
        lo, dash, hi = item.partition("-")
        ranges.append((int(lo), int(hi) if hi else (10**12 if dash else int(lo))))
    return ranges


class NaNGrad(torch.autograd.Function):
    """Identity forward; NaN gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class NaNInjector:
    """Makes the loss (or the gradients) of chosen micro-batches NaN; counts micro-batches fed."""

    def __init__(self, rank, loss_spec="", grad_spec=""):
        self.loss, self.grad = parse_ranges(loss_spec, rank), parse_ranges(grad_spec, rank)
        self.fed = 0

    def __call__(self, loss):
        self.fed += 1
        if any(lo <= self.fed <= hi for lo, hi in self.loss):
            return loss * float("nan")
        if any(lo <= self.fed <= hi for lo, hi in self.grad):
            return NaNGrad.apply(loss)
        return loss


def save_fault(spec, rank):
    """(kind, step) of HVFM_TEST_SAVE_FAULT on this rank, or None."""
    if not spec:
        return None
    kind, _, where = spec.partition("@")
    at, _, on_rank = where.partition(":")
    return None if on_rank and int(on_rank) != rank else (kind, int(at))


def faulty_writer(inner, kind, step, rank):
    """Wraps a DeepSpeed checkpoint engine's `save(state_dict, path)`: the first file of the save
    of `step` (the trainer writes it into .tmp-stepNNNNNNNN) fails as `kind` says."""
    tmp = f".tmp-step{step:08d}"
    fired = []

    def save(state_dict, path, *args, **kwargs):
        if tmp not in Path(path).parts or fired:
            return inner(state_dict, path, *args, **kwargs)
        fired.append(path)
        if kind == "enospc":
            with open(path, "wb") as f:
                f.write(b"\0" * 1024)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        out = inner(state_dict, path, *args, **kwargs)
        if kind == "hang":
            Path(path).parent.joinpath(f".test-hang-rank{rank}").touch()
            while True:
                time.sleep(3600)
        return out
    return save


def patch(env=os.environ):
    """Patch deepspeed.initialize so that its engine carries the faults `env` names."""
    import deepspeed
    import torch.distributed as dist
    real_initialize = deepspeed.initialize

    def initialize(*args, **kwargs):
        engine, *rest = real_initialize(*args, **kwargs)
        rank = dist.get_rank()
        nan = NaNInjector(rank, env.get("HVFM_TEST_NAN_LOSS", ""), env.get("HVFM_TEST_NAN_GRAD", ""))
        forward, load = engine.forward, engine.load_checkpoint

        def faulty_forward(*a, **kw):
            out = forward(*a, **kw)
            return {**out, "loss": nan(out["loss"])}

        def counting_load(*a, **kw):  # a resumed run goes on counting from the checkpoint's
            path, client = load(*a, **kw)
            nan.fed = client.get("batches_fed", 0)
            return path, client
        engine.forward, engine.load_checkpoint = faulty_forward, counting_load
        data_error = parse_ranges(env.get("HVFM_TEST_DATA_ERROR", ""), rank)
        if data_error:
            fed = [0]
            inner_forward = engine.forward

            def failing_forward(*a, **kw):  # counted on its own: a resume does not move it
                fed[0] += 1
                if any(lo <= fed[0] <= hi for lo, hi in data_error):
                    from hvfm.data import DataError
                    raise DataError(f"injected.csv: row {fed[0]}, column contentUrl: test fault on rank "
                                    f"{rank}; fix the row")
                return inner_forward(*a, **kw)
            engine.forward = failing_forward
        fault = save_fault(env.get("HVFM_TEST_SAVE_FAULT", ""), rank)
        if fault:
            ce = engine.checkpoint_engine
            ce.save = faulty_writer(ce.save, *fault, rank)
        return (engine, *rest)
    deepspeed.initialize = initialize


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hvfm.train import main
    import decode_faults
    decode_faults.install(os.environ.get(decode_faults.ENV, ""))
    patch()
    main()
