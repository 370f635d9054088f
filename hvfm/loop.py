"""The training loop: checks, set-up, the loop (`train_step` is one micro-batch), the end. Read top
to bottom. It trains on the data its flags name (or what a caller hands it) and knows nothing of
the built-in default, which calls it like any user would (hvfm/builtin_run.py).

Flags and config checks live in hvfm/config.py, the model's build in hvfm/build.py, checkpoints
in hvfm/checkpoint.py, loading them in hvfm/load.py; the entry point is hvfm/train.py.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from hvfm import checkpoint
from hvfm.build import build_engine, build_model, build_train_loader
from hvfm.config import check_run
from hvfm.data import DataError, read_annotations
from hvfm.data.text.tokens import clean_caption, ensure_tokenizer
from hvfm.data.transforms.device import prepare_batch
from hvfm.distributed import (all_gather, broadcast, init_distributed, quiet_libraries, remove_shm_buffer,
                              start_error_watch)

STARTING = {"made": None}  # the output folder this run created, until its training begins
LOSSES = ("loss", "vtc", "vtm", "mlm", "swap")
COLUMNS = ["step", "epoch", *LOSSES, "lr", "samples_per_s", "tokens_per_s", "data_s", "step_s",
           "skipped", "nonfinite"]


class NonFiniteError(RuntimeError):
    """--max-nonfinite non-finite steps in a row: training stops, the last checkpoint is kept. Exit 3."""
    collective = True


def train_step(engine, batch, seeds, args, weights, dtype, bad_loss, host_check=False):
    """One micro-batch: forward, backward, engine.step(). Returns the model's outputs, or None
    when `host_check` found a non-finite loss (the micro-batch is dropped on every rank).

    No device->host sync of ours between forward and backward: a non-finite loss adds 1 to the
    device counter `bad_loss` and multiplies the loss by NaN instead of 1 (exact otherwise), so
    every gradient is NaN and DeepSpeed's ZeRO overflow check (stages 1-3, fp32 and bf16),
    which engine.step() runs anyway and which all-reduces its flag and reads it on the host,
    skips the update on all ranks and zeroes the gradients. The caller reads `bad_loss` only
    when a step was skipped, to say whether the loss or the gradients were non-finite. With
    gradient accumulation the whole step is skipped (before: only that micro-batch, the step
    then waited for one more); with one micro-batch per step, as the shipped configs, the same.
    Without ZeRO DeepSpeed checks nothing: there `host_check` reads the loss (all-reduced so the
    ranks agree) before the backward, the one sync that is then needed."""
    import numpy as np
    import torch
    batch = prepare_batch(batch, engine.device, dtype)  # uint8 frames: crop, resize, normalise there
    out = engine(batch, drop_ratio=args.drop_ratio, rng=np.random.default_rng(seeds),
                 generator=torch.Generator(device=engine.device).manual_seed(
                     int(seeds.generate_state(1, np.uint64)[0] >> 2)),
                 reverse_negatives=args.reverse_negatives, loss_weights=weights,
                 vtm_hardness=args.vtm_hardness)
    loss = out["loss"]
    finite = torch.isfinite(loss.detach())
    if host_check:
        flag = (~finite).to(torch.float32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item():
            return None
    bad_loss.add_((~finite).to(bad_loss.dtype))
    engine.backward(loss * torch.where(finite, 1.0, float("nan")))
    engine.step()
    return out


def tok_dir_needed(args):
    """Neither --tokenizer nor --clip: the run makes its tokenizer (built-in, or trained on the
    training captions)."""
    return args.tokenizer is None and args.clip is None


def read_data(args, out_dir, rank):
    """(train annotations, eval annotations or None, tokenizer folder or None) from the data
    flags; with neither --tokenizer nor --clip, rank 0 trains a tokenizer on the training
    captions into OUTPUT_DIR/tokenizer and the others wait for it."""
    import torch.distributed as dist
    if args.train_shards:  # their captions (lazy: read only if a tokenizer must be trained)
        from hvfm.data.loading.shards import shard_captions
        train = shard_captions(args.train_shards)
    elif args.train_csv:  # a WebVid CSV column-wise, this rank's rows only (it has millions)
        train = read_annotations(args.train_csv, args.video_root, clean=clean_caption,
                                 rank=rank, world_size=dist.get_world_size(), split="train")
    else:  # any format hvfm.data.sources.formats detects; every video with all its sentences
        train = read_annotations(args.train_json, args.video_root, clean=clean_caption,
                                 split="train")
    evaluation = read_eval_data(args)
    if rank == 0:  # the format each file was read as (hvfm.data.sources.formats)
        from hvfm.data.sources.annotations import describe
        for flag, ann in (("train", train), ("eval", evaluation)):
            if getattr(ann, "format", None):
                print(f"data ({flag}): {describe(ann)}", flush=True)
    tok_dir = args.tokenizer
    if tok_dir_needed(args):
        tok_dir = out_dir / "tokenizer"
        if rank == 0:
            ensure_tokenizer(tok_dir, train)
        dist.barrier()
    return train, evaluation, tok_dir


def read_eval_data(args):
    """--eval-json's annotations (None without it), read by the benchmark's protocol: paragraphs
    for DiDeMo / ActivityNet."""
    if not args.eval_json:
        return None
    return read_annotations(args.eval_json, args.eval_video_root, clean=clean_caption, paragraph=None)


def start_process(args, cuda):
    """What every run of this process does first, once (a second call is a no-op): hide the
    libraries' noise (unless --verbose), flush subnormal floats on a CPU, join the process group
    and start the error watch. Returns (rank, world)."""
    import torch
    if not args.verbose:
        quiet_libraries()
    if not cuda:  # subnormal floats made the first CPU steps of a fresh run 10-20x slower here
        torch.set_flush_denormal(True)
    rank, world = init_distributed(cuda)
    watch = start_error_watch(rank, world)  # an error on one rank ends every rank (main)
    if watch is not None and not watch.on_exit:
        watch.on_exit += [remove_failed_start, lambda code: remove_shm_buffer()]
    return rank, world


def train(args, data=None, label=None, evaluate=None):
    """Train as the flags say; returns the run's summary (also OUTPUT_DIR/summary.json).

    data: None reads the data flags (`read_data`); a callable `data(out_dir, rank)` returns
    (train annotations, eval annotations or None, tokenizer folder or None) instead.
    label: a run inside another (e.g. the built-in image CLIP): its name in the lines it prints;
    its output folder is then the caller's to keep or remove.
    evaluate: `evaluate(model, tokenizer, eval_annotations, size, when)`, called on rank 0 when
    there are eval annotations and no --no-eval: when "before" on a fresh run with the model it
    starts from (fp32, before DeepSpeed casts it), "after" with the final weights (fp32). What it
    returns (None: nothing) is the summary's eval[when]."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from hvfm.metrics_log import MetricsLog

    # ---- checks before any work (one error line, nothing written)
    cuda = torch.cuda.is_available()
    weights, cfg, attn, precision, precision_why = check_run(args, cuda)
    image = args.stage == "image"

    # ---- process group, output folder, data, model
    rank, world = start_process(args, cuda)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    out_dir = Path(args.output_dir or broadcast(time.strftime("runs/%Y%m%d-%H%M%S")))
    ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        if not out_dir.exists() and label is None:  # a failed start removes it again (main)
            STARTING["made"] = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.remove_partial(ckpt_dir)
    dist.barrier()
    if data is None:
        train_ann, eval_ann, tok_dir = read_data(args, out_dir, rank)
    else:
        train_ann, eval_ann, tok_dir = data(out_dir, rank)
    model, tokenizer, clip_config, build = build_model(args, tok_dir, out_dir, attn, rank)
    size = args.size or model.video.image_size
    max_steps = args.max_steps
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg.get("gradient_accumulation_steps", 1)
    loader = build_train_loader(args, train_ann, tokenizer, micro, size, rank, world, cuda, image)
    steps_per_epoch = len(loader) // accum
    if max_steps is None:
        max_steps = (args.epochs or 1) * steps_per_epoch
    elif args.epochs:
        max_steps = min(max_steps, args.epochs * steps_per_epoch)

    results = {}
    evaluating = evaluate is not None and eval_ann is not None and not args.no_eval and rank == 0
    if evaluating and not args.resume:  # the model the run starts from: the baseline to beat
        before = evaluate(model.to(device), tokenizer, eval_ann, size, "before")
        if before is not None:
            results["before"] = before
    dist.barrier()

    # ---- the engine
    engine, scheduler, cfg, dtype, host_check = build_engine(model, cfg, precision, args, max_steps)

    step, wall_before, fed = 0, 0.0, 0  # fed: micro-batches fed since the run began (across resumes)
    nonfinite = {"skipped": 0, "streak": 0}
    if args.resume:
        client = checkpoint.resume(engine, ckpt_dir, loader, rank, world)
        step, wall_before = client["step"], client.get("wall_s", 0.0)
        nonfinite["skipped"], fed = client.get("nonfinite_skipped", 0), client.get("batches_fed", 0)
        if rank == 0:
            checkpoint.truncate_metrics(out_dir / "metrics.csv", step)
    elif rank == 0:
        (out_dir / "run_config.json").write_text(json.dumps(
            {"args": vars(args), "ds_config": cfg, "attn": attn, "precision": precision,
             "precision_why": precision_why, "world_size": world, "max_steps": max_steps,
             "build": build}, indent=2))

    if rank == 0:
        print(f"{label or 'training'}: {max_steps} steps of {micro * accum * world} "
              f"{'images' if image else 'clips'}{' (+ mirrored ones)' if image and args.mirror_negatives else ''} "
              f"({world} rank(s)), attn {attn}, {precision} ({precision_why}), drop ratio {args.drop_ratio}, "
              f"output {out_dir}", flush=True)
    log = MetricsLog(out_dir, COLUMNS, append=args.resume) if rank == 0 else None
    if log is not None and log.tb is None and log.tb_missing != "disabled":
        print(f"metrics: {out_dir / 'metrics.csv'} (TensorBoard off: {log.tb_missing})", flush=True)
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    engine.train()
    if label is None:  # training began: what it writes is kept whatever happens next
        STARTING["made"] = None

    def skip_nonfinite(what):
        """Count a skipped non-finite micro-batch or step; stop after --max-nonfinite in a row."""
        nonfinite["skipped"] += 1
        nonfinite["streak"] += 1
        if rank == 0:
            tqdm.write(f"warning: step {step + 1}: non-finite {what}; skipped "
                       f"({nonfinite['streak']} in a row, {nonfinite['skipped']} in all)", file=sys.stderr)
        if nonfinite["streak"] >= args.max_nonfinite:
            raise NonFiniteError(
                f"{nonfinite['streak']} non-finite steps in a row (--max-nonfinite {args.max_nonfinite}), "
                f"the last at step {step + 1} ({what}); stopped without saving, the last checkpoint "
                f"({checkpoint.latest_tag(ckpt_dir) or 'none'}) is kept in {ckpt_dir}; lower --lr or "
                f"check the data, then --resume")

    def save():
        checkpoint.save(engine, ckpt_dir, step, checkpoint.client_state(
            step, loader, wall_before + time.perf_counter() - start, nonfinite["skipped"], fed))

    # ---- the loop
    start = time.perf_counter()
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    saved_at, out_of_time = start, False

    def clock(now):
        """(save by time now, past --max-minutes) on this rank's clock; rank 0's is the one read."""
        due = bool(args.save_every_minutes) and now - saved_at >= 60 * args.save_every_minutes
        return [float(due), float(bool(deadline) and now >= deadline)]
    samples = tokens = micro_step = 0
    last_saved = step if args.resume else None
    last = None  # the last step's losses, on the device; read every --log-every steps
    bad_loss = torch.zeros((), device=engine.device)  # non-finite losses since the last step
    while step < max_steps and not out_of_time:
        got_batch, started_at = False, loader.position
        t_data = time.perf_counter()
        for batch in loader:
            got_batch, t_fetch = True, time.perf_counter()
            # Every random choice of a step derives from (seed, step, micro-step, rank): a resumed
            # run draws exactly what the uninterrupted run drew.
            seeds = np.random.SeedSequence([args.seed, step, micro_step % accum, rank])
            skipped_before = engine.skipped_steps
            fed += 1
            out = train_step(engine, batch, seeds, args, weights, dtype, bad_loss, host_check)
            if out is None:  # (no ZeRO) a non-finite loss: this micro-batch is dropped on every rank
                skip_nonfinite("loss")
                t_data = time.perf_counter()
                continue
            micro_step += 1
            samples += len(batch["index"]) * world
            tokens += out["video_tokens"] + out["text_tokens"]
            if micro_step % accum:
                continue
            if engine.skipped_steps != skipped_before:
                # DeepSpeed skipped the update (all ranks agree) and zeroed the gradients; the
                # step is not counted. A non-finite loss on any rank made them NaN, else they were.
                dist.all_reduce(bad_loss, op=dist.ReduceOp.MAX)
                skip_nonfinite("loss" if bad_loss.item() else "gradient")
                bad_loss.zero_()
                t_data = time.perf_counter()
                continue
            nonfinite["streak"] = 0
            step += 1
            now = time.perf_counter()
            last = torch.stack([out[k].detach().float() for k in LOSSES])
            elapsed = now - start
            bar.update(1)
            stopping = step >= max_steps
            sync = step % args.log_every == 0 or stopping  # the same steps on every rank
            # The clock's decisions (save by time, --max-minutes) are rank 0's, so that every rank
            # saves or stops at the same step: with several ranks they travel with the losses of
            # the --log-every steps (one small broadcast there, no extra host read).
            values = None
            if sync and world > 1:
                flags = torch.tensor(clock(now))
                if last.is_cuda:  # no wait for the queued step before the broadcast's own
                    flags = flags.pin_memory().to(last.device, non_blocking=True)
                values = torch.cat([last, flags.to(last.device)])
                dist.broadcast(values, src=0)
                values = values.tolist()  # the one read of the losses (rank 0's on every rank)
                save_due, late = values[len(LOSSES):]
            elif world == 1:
                save_due, late = clock(now)
            else:
                save_due = late = False
            if late:
                out_of_time = stopping = True
            if sync or stopping:  # the last step is always logged
                losses = dict(zip(LOSSES, values or last.tolist()))
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{losses['loss']:.3f}",  # the terms this run trains
                                **{k: f"{losses[k]:.2f}" for k in LOSSES[1:] if weights[k]},
                                lr=f"{lr:.1e}",
                                sps=f"{samples / elapsed:.1f}", data=f"{t_fetch - t_data:.2f}s",
                                step=f"{now - t_fetch:.2f}s")
                if log is not None:  # losses with 9 significant digits: float32 exactly (resume checks them)
                    log.write(dict(zip(COLUMNS, [
                        step, loader.epoch, *(f"{losses[k]:.9g}" for k in LOSSES), f"{lr:.3e}",
                        f"{samples / elapsed:.3f}", f"{tokens / elapsed:.1f}", f"{t_fetch - t_data:.4f}",
                        f"{now - t_fetch:.4f}", loader.skipped, nonfinite["skipped"]])))
            if (args.save_every and step % args.save_every == 0) or save_due:
                save()
                last_saved, saved_at = step, time.perf_counter()
            t_data = time.perf_counter()
            if stopping:
                break
        else:
            loader.set_epoch(loader.epoch + 1)
        if not got_batch and started_at == 0:
            raise DataError(f"{train_ann.source}: the loader gave no batch (fewer samples than one batch?)")
    bar.close()
    wall = time.perf_counter() - start
    if rank == 0 and step < max_steps and out_of_time:
        print(f"stopped at the time cap: {args.max_minutes:g} minutes of training (--max-minutes) "
              f"after {step} of {max_steps} steps", flush=True)
    if step != last_saved:  # (a resumed run that had nothing left to do saves nothing)
        save()

    # ---- the end: export, closing evaluation, summary
    if rank == 0:
        # One model, one result: the export, the evaluation below and the DeepSpeed checkpoint
        # all hold the fp32 master weights of the last checkpoint (not the bf16 module).
        state = checkpoint.export_final(out_dir / "final", ckpt_dir, clip_config, tokenizer, build, image,
                                        quiet=not args.verbose)
        if evaluating:
            from hvfm.load import load_state, model_from_config
            final, _ = model_from_config(clip_config, tokenizer, build)
            load_state(final, state, ckpt_dir)
            after = evaluate(final.to(device), tokenizer, eval_ann, size, "after")
            if after is not None:
                results["after"] = after
            del final
        del state
    dist.barrier()
    # Skip counters summed over ranks; bad files: the union of every rank's.
    counts = torch.tensor([loader.counters()[k] for k in ("skipped", "bad_drawn", "timeouts", "crashes")],
                          dtype=torch.float64, device=engine.device)
    dist.all_reduce(counts)
    skipped, bad_drawn, timeouts, crashes = (int(c) for c in counts.tolist())
    bad_files = sorted({f for part in all_gather(sorted(loader.bad_files)) for f in part})
    summary = {"steps": step, "wall_s": wall_before + wall, "train_s_this_run": wall,
               "samples_per_s": samples / wall, "tokens_per_s_per_device": tokens / wall,
               "skipped_samples": skipped, "bad_rows_drawn": bad_drawn, "decode_timeouts": timeouts,
               "decoder_crashes": crashes, "bad_files": len(bad_files),
               "nonfinite_skipped": nonfinite["skipped"], "world_size": world, "attn": attn,
               "precision": precision, "last_losses": dict(zip(LOSSES, last.tolist())) if last is not None else {},
               "eval": results, "output_dir": str(out_dir)}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}), flush=True)
        log.close()
    return summary


def remove_failed_start(code):
    """A failed start (exit 2 before training began) leaves nothing behind."""
    if code == 2 and STARTING["made"] is not None:
        shutil.rmtree(STARTING["made"], ignore_errors=True)


