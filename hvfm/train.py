"""hvfm training entry point: `deepspeed hvfm/train.py --deepspeed ds_configs/z2.json [flags]`.

Post-pretrains CLIP on video-text pairs: random patch dropping in the video encoder, masked
caption words for the fusion encoder, VTC + VTM + MLM losses, through a DeepSpeed engine (ZeRO
1/2/3, bf16, activation checkpointing). With no data flags it generates the built-in synthetic
corpus once, trains the `tiny` preset from random weights, and prints zero-shot retrieval and
temporal accuracy on the synthetic test split before and after training.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does): make hvfm importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import DataError, build_loader, read_annotations  # noqa: E402
from hvfm.data.text import clean_caption, ensure_tokenizer, load_tokenizer  # noqa: E402

ATTN_CHOICES = ("auto", "sdpa", "torch-varlen", "triton", "flash_attn", "xformers")
PRESETS = ("tiny", "vit-b16", "vit-l14")


class ConfigError(ValueError):
    """A bad flag or config file: one line naming it and the fix."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="hvfm/train.py", description=__doc__.split("\n")[0])
    ap.add_argument("--deepspeed", metavar="PATH", required=True, help="DeepSpeed config JSON")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    m = ap.add_argument_group("model")
    m.add_argument("--model", default="tiny", help=f"preset without --clip: {', '.join(PRESETS)}")
    m.add_argument("--clip", metavar="DIR", help="HF CLIPModel folder to start from")
    m.add_argument("--fusion-layers", type=int, default=2)
    m.add_argument("--fusion-width", type=int, default=None, help="default: the text width")
    m.add_argument("--attn", default="auto", help=f"attention backend: {', '.join(ATTN_CHOICES)}")
    m.add_argument("--activation-checkpointing", action="store_true")
    m.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"])
    d = ap.add_argument_group("data (default: the built-in synthetic corpus)")
    d.add_argument("--train-csv", help="WebVid CSV (videoid,contentUrl,duration,page_dir,name)")
    d.add_argument("--train-json", help='JSON list of {"video", "caption"}')
    d.add_argument("--video-root", help="folder the training videos are under")
    d.add_argument("--eval-json", help="retrieval test annotations (MSR-VTT style JSON)")
    d.add_argument("--eval-video-root")
    d.add_argument("--tokenizer", help="HF tokenizer folder (default: the CLIP folder's, or one "
                                       "trained on the captions)")
    d.add_argument("--frames", type=int, default=8)
    d.add_argument("--size", type=int, default=None, help="frame side (default: the model's)")
    d.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    t = ap.add_argument_group("method")
    t.add_argument("--drop-ratio", default="0.5", help="patch drop ratio, or a range lo:hi per sample")
    t.add_argument("--eval-drop-ratio", default=None)
    t.add_argument("--mask-ratio", type=float, default=0.5)
    t.add_argument("--loss-weights", default="1,1,1", help="VTC,VTM,MLM")
    t.add_argument("--reverse-negatives", action=argparse.BooleanOptionalAction, default=True,
                   help="the clip played backwards as an extra hard negative")
    o = ap.add_argument_group("schedule and output")
    o.add_argument("--max-steps", type=int, default=None, help="default: 600 on the built-in data")
    o.add_argument("--epochs", type=int, default=None)
    o.add_argument("--max-minutes", type=float, default=None, help="stop training after this long")
    o.add_argument("--lr", type=float, default=None, help="peak LR (default: the config's)")
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    o.add_argument("--output-dir", default=None, help="default: runs/<date-time>")
    o.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    o.add_argument("--resume", action="store_true", help="continue from --output-dir's last checkpoint")
    o.add_argument("--log-every", type=int, default=10)
    o.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    o.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- checks before work

def read_ds_config(path, world_size):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found; pass --deepspeed ds_configs/z2.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or "train_micro_batch_size_per_gpu" not in cfg:
        raise ConfigError(f"{path}: missing train_micro_batch_size_per_gpu")
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg.get("gradient_accumulation_steps", 1)
    for key, val in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {val!r}")
    total = cfg.get("train_batch_size")
    if total is not None and total != micro * accum * world_size:
        raise ConfigError(f"{path}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} "
                          f"x gradient_accumulation_steps {accum} x {world_size} rank(s); fix one of them")
    if "auto" in json.dumps(cfg):
        raise ConfigError(f'{path}: "auto" values are not supported; write numbers')
    return cfg


def check_args(args, cuda):
    if args.clip is None and args.model not in PRESETS:
        raise ConfigError(f"--model {args.model}: unknown preset; choose one of {', '.join(PRESETS)} "
                          f"or pass --clip DIR")
    if args.attn not in ATTN_CHOICES:
        raise ConfigError(f"--attn {args.attn}: unknown backend; choose one of {', '.join(ATTN_CHOICES)}")
    if args.precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    if args.train_csv and args.train_json:
        raise ConfigError("--train-csv and --train-json: give one of them")
    if (args.train_csv or args.train_json) and not args.video_root:
        raise ConfigError("--video-root is required with --train-csv/--train-json")
    if args.eval_json and not args.eval_video_root:
        raise ConfigError("--eval-video-root is required with --eval-json")
    if args.resume and not args.output_dir:
        raise ConfigError("--resume needs --output-dir: the folder of the run to continue")
    try:
        weights = [float(x) for x in args.loss_weights.split(",")]
        assert len(weights) == 3 and min(weights) >= 0
    except (ValueError, AssertionError):
        raise ConfigError(f"--loss-weights {args.loss_weights}: give three numbers VTC,VTM,MLM >= 0") from None
    from hvfm.model import parse_drop_ratio
    for flag, value in (("--drop-ratio", args.drop_ratio), ("--eval-drop-ratio", args.eval_drop_ratio)):
        try:
            parse_drop_ratio(value)
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return dict(zip(("vtc", "vtm", "mlm"), weights))


def pick_attention(name, cuda):
    from hvfm.model import BACKENDS
    if name == "auto":
        return "triton" if cuda and "triton" in BACKENDS else "sdpa"
    return name


def pick_precision(choice, cuda):
    """bf16 on GPU; on CPU whichever of bf16/fp32 runs a transformer-sized matmul faster here."""
    import torch
    if choice != "auto":
        return choice, {}
    if cuda:
        return "bf16", {}
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 512, dtype=dtype), torch.randn(512, 1024, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        times[str(dtype).split(".")[-1]] = time.perf_counter() - start
    return ("bf16" if times["bfloat16"] < times["float32"] else "fp32"), times


# ----------------------------------------------------------------------------- set-up

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cuda):
    import deepspeed
    import torch.distributed as dist
    if "RANK" not in os.environ:  # plain `python hvfm/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


def broadcast(obj):
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_data(args, out_dir, rank):
    """(train annotations, eval annotations or None, tokenizer folder or None). Rank 0 generates
    the synthetic corpus and the tokenizer; the others wait at the barrier and load them."""
    import torch.distributed as dist
    from hvfm.data.synthetic import ensure_corpus

    corpus = None
    if not (args.train_csv or args.train_json):
        if rank == 0:
            corpus = ensure_corpus(workers=os.cpu_count(), progress=True)
        dist.barrier()
        corpus = ensure_corpus()
        train = read_annotations(corpus.train_csv, corpus.train_root, clean=clean_caption)
    else:
        train = read_annotations(args.train_csv or args.train_json, args.video_root, clean=clean_caption)
    if args.eval_json:
        evaluation = read_annotations(args.eval_json, args.eval_video_root, clean=clean_caption)
    elif corpus is not None:
        evaluation = read_annotations(corpus.test_json, corpus.test_root, clean=clean_caption)
    else:
        evaluation = None
    tok_dir = args.tokenizer
    if tok_dir is None and args.clip is None:
        tok_dir = (corpus.root if corpus else out_dir) / "tokenizer"
        if rank == 0:
            ensure_tokenizer(tok_dir, train)
        dist.barrier()
    return train, evaluation, tok_dir


def build_model(args, tok_dir, out_dir, attn, rank):
    """The video-language model inflated from a CLIP folder (--clip, or the preset saved with
    random weights to OUTPUT_DIR/init_clip first: one loading path)."""
    import torch.distributed as dist
    from hvfm.model import VideoLanguageModel, add_mask_token, load_clip, save_random_clip

    clip_dir = args.clip
    if clip_dir is None:
        clip_dir = out_dir / "init_clip"
        if rank == 0 and not (clip_dir / "config.json").exists():
            save_random_clip(args.model, load_tokenizer(tok_dir), str(clip_dir), seed=args.seed)
        dist.barrier()
    try:
        clip, tokenizer = load_clip(str(clip_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tok_dir is not None and args.clip is not None:
        tokenizer = load_tokenizer(tok_dir)
    add_mask_token(clip, tokenizer)
    build = dict(fusion_layers=args.fusion_layers, fusion_width=args.fusion_width, attn=attn,
                 max_frames=max(args.frames, 16), checkpointing=args.activation_checkpointing)
    model = VideoLanguageModel.from_clip(clip, tokenizer, **build)
    build.pop("checkpointing")
    return model, tokenizer, clip.config, build


def param_groups(model, weight_decay):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(total_steps, warmup):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------- evaluation

def run_eval(model, tokenizer, ann, args, size, dtype, label, rank):
    """Retrieval with all frames, and with one frame (an image model's view)."""
    from hvfm.evaluate import evaluate
    results = {}
    for frames, key in ((args.frames, "all_frames"), (1, "one_frame")):
        results[key] = evaluate(model, tokenizer, ann, frames=frames, size=size,
                                workers=min(args.workers, 2), drop_ratio=args.eval_drop_ratio,
                                dtype=dtype)
    if rank == 0:
        a, o = results["all_frames"], results["one_frame"]
        line = (f"[{label}] t2v R@1/5/10 {a['t2v_r1']:.1f}/{a['t2v_r5']:.1f}/{a['t2v_r10']:.1f}  "
                f"v2t R@1/5/10 {a['v2t_r1']:.1f}/{a['v2t_r5']:.1f}/{a['v2t_r10']:.1f}")
        if "temporal_acc" in a:
            line += (f"  temporal acc: {a['temporal_acc']:.3f} with {args.frames} frames, "
                     f"{o['temporal_acc']:.3f} with 1 frame (chance {a['temporal_chance']:.3f})")
        print(line, flush=True)
    return results


# ----------------------------------------------------------------------------- training

def train(args):
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm

    cuda = torch.cuda.is_available()
    weights = check_args(args, cuda)
    world_guess = int(os.environ.get("WORLD_SIZE", 1))
    cfg = read_ds_config(args.deepspeed, world_guess)
    out_dir = Path(args.output_dir) if args.output_dir else None
    ckpt_dir = out_dir / "checkpoints" if out_dir else None
    if args.resume and not (ckpt_dir / "latest").exists():
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file); "
                          f"start without --resume or point --output-dir at a run that saved one")
    if out_dir and not args.resume and (ckpt_dir / "latest").exists():
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose "
                          f"another --output-dir")
    attn = pick_attention(args.attn, cuda)
    precision, precision_probe = pick_precision(args.precision, cuda)

    rank, world = init_distributed(cuda)
    if out_dir is None:
        out_dir = Path(broadcast(time.strftime("runs/%Y%m%d-%H%M%S")))
        ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    train_ann, eval_ann, tok_dir = prepare_data(args, out_dir, rank)
    model, tokenizer, clip_config, build = build_model(args, tok_dir, out_dir, attn, rank)
    size = args.size or model.video.image_size
    builtin = not (args.train_csv or args.train_json)
    max_steps = args.max_steps or (600 if builtin else None)
    micro = cfg["train_micro_batch_size_per_gpu"]
    accum = cfg.get("gradient_accumulation_steps", 1)
    loader = build_loader(train_ann, tokenizer, batch_size=micro, frames=args.frames, size=size,
                          seed=args.seed, num_workers=args.workers, mask_ratio=args.mask_ratio,
                          rank=rank, world_size=world, pin_memory=cuda)
    steps_per_epoch = len(loader) // accum
    if max_steps is None:
        max_steps = (args.epochs or 1) * steps_per_epoch
    elif args.epochs:
        max_steps = min(max_steps, args.epochs * steps_per_epoch)

    cfg = dict(cfg)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16"}
    if args.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    opt_params = cfg.get("optimizer", {}).get("params", {})
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, max_steps // 20)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, opt_params.get("weight_decay", 0.0)),
        config=cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max_steps, warmup)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    step, wall_before = 0, 0.0
    if args.resume:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step, wall_before = client["step"], client.get("wall_s", 0.0)
        loader.load_state_dict(client["loader"])
    elif rank == 0:
        (out_dir / "run_config.json").write_text(json.dumps(
            {"args": vars(args), "ds_config": cfg, "attn": attn, "precision": precision,
             "precision_probe_s": precision_probe, "world_size": world, "max_steps": max_steps}, indent=2))

    results = {}
    if eval_ann is not None and not args.no_eval and not args.resume:
        results["before"] = run_eval(engine.module, tokenizer, eval_ann, args, size, dtype, "before", rank)

    if rank == 0:
        print(f"training: {max_steps} steps of {micro * accum * world} clips "
              f"({world} rank(s)), attn {attn}, {precision}, drop ratio {args.drop_ratio}, "
              f"output {out_dir}", flush=True)
    log_file = open(out_dir / "metrics.csv", "a", newline="") if rank == 0 else None
    log = csv.writer(log_file) if log_file else None
    if log and not args.resume:
        log.writerow(["step", "epoch", "loss", "vtc", "vtm", "mlm", "lr", "samples_per_s",
                      "tokens_per_s", "data_s", "step_s", "skipped"])
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    engine.train()
    start = time.perf_counter()
    samples = tokens = 0
    last = {}
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    micro_step = 0
    while step < max_steps and (deadline is None or time.perf_counter() < deadline):
        got_batch, started_at = False, loader.position
        t_data = time.perf_counter()
        for batch in loader:
            got_batch = True
            t_fetch = time.perf_counter()
            batch["pixels"] = batch["pixels"].to(dtype)
            # Every random choice of a step derives from (seed, step, micro-step, rank): a resumed
            # run draws exactly what the uninterrupted run drew.
            seeds = np.random.SeedSequence([args.seed, step, micro_step % accum, rank])
            out = engine(batch, drop_ratio=args.drop_ratio, rng=np.random.default_rng(seeds),
                         generator=torch.Generator(device=engine.device).manual_seed(
                             int(seeds.generate_state(1, np.uint64)[0] >> 2)),
                         reverse_negatives=args.reverse_negatives, loss_weights=weights)
            engine.backward(out["loss"])
            engine.step()
            micro_step += 1
            samples += len(batch["index"]) * world
            tokens += (out["video_tokens"] + out["text_tokens"])
            if micro_step % accum:
                continue
            step += 1
            now = time.perf_counter()
            last = {k: float(out[k].detach()) for k in ("loss", "vtc", "vtm", "mlm")}
            elapsed = now - start
            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", vtc=f"{last['vtc']:.2f}", vtm=f"{last['vtm']:.2f}",
                                mlm=f"{last['mlm']:.2f}", lr=f"{scheduler.get_last_lr()[0]:.1e}",
                                sps=f"{samples / elapsed:.1f}", data=f"{t_fetch - t_data:.2f}s",
                                step=f"{now - t_fetch:.2f}s")
                if step % args.log_every == 0 or step == max_steps:
                    log.writerow([step, loader.epoch, *(f"{last[k]:.5f}" for k in ("loss", "vtc", "vtm", "mlm")),
                                  f"{scheduler.get_last_lr()[0]:.3e}", f"{samples / elapsed:.3f}",
                                  f"{tokens / elapsed:.1f}", f"{t_fetch - t_data:.4f}",
                                  f"{now - t_fetch:.4f}", loader.skipped])
                    log_file.flush()
            if args.save_every and step % args.save_every == 0:
                save(engine, ckpt_dir, step, loader, wall_before + elapsed)
            t_data = time.perf_counter()
            if step >= max_steps or (deadline and now >= deadline):
                break
        else:
            loader.set_epoch(loader.epoch + 1)
        if not got_batch and started_at == 0:
            raise DataError(f"{train_ann.source}: the loader gave no batch (fewer samples than one batch?)")
    bar.close()
    wall = time.perf_counter() - start
    if not args.save_every or step % args.save_every:
        save(engine, ckpt_dir, step, loader, wall_before + wall)

    export_final(engine, out_dir / "final", clip_config, tokenizer, build, cfg, rank)
    if eval_ann is not None and not args.no_eval:
        results["after"] = run_eval(engine.module, tokenizer, eval_ann, args, size, dtype, "after", rank)
    summary = {"steps": step, "wall_s": wall_before + wall, "train_s_this_run": wall,
               "samples_per_s": samples / wall, "tokens_per_s_per_device": tokens / wall,
               "skipped_samples": loader.skipped, "bad_files": len(loader.bad_files),
               "world_size": world, "attn": attn, "precision": precision, "last_losses": last,
               "eval": results, "output_dir": str(out_dir)}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}), flush=True)
        log_file.close()
    return summary


def save(engine, ckpt_dir, step, loader, wall):
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}",
                           client_state={"step": step, "loader": loader.state_dict(), "wall_s": wall})


def export_final(engine, folder, clip_config, tokenizer, build, cfg, rank):
    """Consolidate the weights (gathered from all ranks under ZeRO-3) and write OUTPUT_DIR/final."""
    from hvfm.export import save_export
    if cfg.get("zero_optimization", {}).get("stage", 0) == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        save_export(folder, state, clip_config, tokenizer, build)


def main(argv=None):
    args = parse_args(argv)
    code = 0
    try:
        train(args)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
