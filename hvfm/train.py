"""hvfm training entry point: `deepspeed hvfm/train.py --deepspeed ds_configs/z2.json [flags]`.

Post-pretrains CLIP on video-text pairs: random patch dropping in the video encoder, masked
caption words for the fusion encoder, VTC + VTM + MLM losses, through a DeepSpeed engine (ZeRO
1/2/3, bf16, activation checkpointing). With no data flags it generates the built-in synthetic
corpus once, post-pretrains the built-in image CLIP (trained once by this trainer on built-in
stills, cached), and prints zero-shot retrieval and temporal accuracy on the synthetic test
split: the image CLIP against the harvested video model.

The loop lives in hvfm/loop.py (it knows nothing of the built-in default), the built-in
default's orchestration above it in hvfm/builtin_run.py; flags and config checks in
hvfm/config.py, the model's build in hvfm/build.py, checkpoints in hvfm/checkpoint.py.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With spinning
# threads, any other busy process on a small CPU machine (a data worker, a second job) made a
# CPU step ~13x slower here (13.9 s vs 1.03 s with PASSIVE, same machine and load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does): make hvfm importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm import builtin_run, loop  # noqa: E402
from hvfm.checkpoint import CheckpointError  # noqa: E402
from hvfm.config import ConfigError, is_builtin, parse_args  # noqa: E402
from hvfm.data import DataError  # noqa: E402
from hvfm.distributed import remove_shm_buffer, stop_error_watch  # noqa: E402
from hvfm.loop import NonFiniteError, remove_failed_start  # noqa: E402


def run(args):
    """The built-in default (no data flags: hvfm/builtin_run.py), or the loop (hvfm/loop.py) on
    the data the flags name, evaluated before and after when --eval-json is given. Returns the
    run's summary."""
    if is_builtin(args):
        return builtin_run.run(args)
    summary = loop.train(args, evaluate=builtin_run.evaluator(args))
    builtin_run.print_comparison(summary, args)
    return summary


def closing_line(args, summary):
    """Where the run's output is, and the command that uses it next."""
    out = Path(summary["output_dir"])
    if args.stage == "image":
        nxt = f"stage 2 from it: deepspeed hvfm/train.py --deepspeed {args.deepspeed} --clip {out / 'final'} [data flags]"
    else:
        if args.eval_json:
            ann, root = args.eval_json, args.eval_video_root
        elif is_builtin(args):
            from hvfm.data.synthetic.clips import ensure_corpus
            corpus = ensure_corpus()
            ann, root = corpus.test_json, corpus.test_root
        else:
            ann, root = "ANNOTATIONS", "VIDEO_DIR"
        nxt = f"python -m hvfm.evaluate --checkpoint {out / 'final'} --ann {ann} --video-root {root} --table"
    return f"done: output in {out} (the model: {out / 'final'}, metrics.csv, summary.json); next: {nxt}"


def main(argv=None):
    """Run `train`; bad input, a failed save or a non-finite streak is one `error: ...` line and
    exit code 2 (3: non-finite). An error every rank raises together (`collective`) is said once
    and the ranks end together. One that a rank raises alone (a DataError from its own loader,
    a crash) goes through the error watch: every rank prints the same line and exits with its
    code within seconds, instead of waiting in a collective for the 30-minute time-out."""
    args = parse_args(argv)
    code = 0
    collective = False  # an error every rank raised at the same point: they can still meet
    try:
        summary = run(args)
        import torch.distributed as dist
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(closing_line(args, summary), flush=True)
    except (DataError, ConfigError, CheckpointError, NonFiniteError) as e:
        import torch.distributed as dist
        code = 3 if isinstance(e, NonFiniteError) else 2
        collective = getattr(e, "collective", False)
        watch = None if collective else stop_error_watch()
        if watch is not None:
            watch.fail(code, str(e))  # every rank prints this line and exits; does not return
        if not (collective and dist.is_initialized() and dist.get_rank() != 0):  # one line per run
            from tqdm import tqdm
            tqdm.write(f"error: {e}", file=sys.stderr)  # on a line of its own, under a live bar
        remove_failed_start(code)
    except Exception as e:
        watch = stop_error_watch()
        if watch is not None:  # a crash on this rank: its traceback here, one line on every rank
            import traceback
            import torch.distributed as dist
            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0][:300]
            watch.fail(1, f"rank {dist.get_rank()} failed: {type(e).__name__}: {first} (its traceback is in "
                          f"its log)")
        raise
    finally:
        import torch.distributed as dist
        stop_error_watch()  # before the final barrier: a rank 0 done first is not a dead one
        if dist.is_available() and dist.is_initialized():
            if code == 0 or collective:
                dist.barrier()
            dist.destroy_process_group()
            if code == 0 or collective:  # every rank is past the barrier, long done mapping it
                remove_shm_buffer()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
