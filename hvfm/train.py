"""hvfm training entry point: `deepspeed hvfm/train.py --deepspeed ds_configs/z2.json [flags]`.

Current stage: the data pipeline only. It reads the DeepSpeed config for the per-GPU batch size,
prepares the data (the built-in synthetic corpus when no data flags are given), and streams
batches through the real loader (decode, sample, augment, tokenise, mask), reporting throughput
and skipped files. The model, losses and the DeepSpeed engine are not wired in yet.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does): make hvfm importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import DataError, build_loader, read_annotations  # noqa: E402
from hvfm.data.synthetic import ensure_corpus  # noqa: E402
from hvfm.data.text import clean_caption, ensure_tokenizer, load_tokenizer  # noqa: E402


class ConfigError(ValueError):
    """A bad flag or config file: one line naming it and the fix."""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="hvfm/train.py", description=__doc__.split("\n")[0])
    ap.add_argument("--deepspeed", metavar="PATH", required=True, help="DeepSpeed config JSON")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    data = ap.add_argument_group("data (default: the built-in synthetic corpus)")
    data.add_argument("--train-csv", help="WebVid CSV (videoid,contentUrl,duration,page_dir,name)")
    data.add_argument("--train-json", help='JSON list of {"video", "caption"}')
    data.add_argument("--video-root", help="folder the annotation's videos are under")
    data.add_argument("--tokenizer", help="HF tokenizer folder (default: built from the captions)")
    data.add_argument("--frames", type=int, default=8)
    data.add_argument("--size", type=int, default=96, help="frame side after cropping")
    data.add_argument("--mask-ratio", type=float, default=0.5)
    data.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    ap.add_argument("--max-steps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="runs/default")
    return ap.parse_args(argv)


def read_ds_config(path):
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found; pass --deepspeed ds_configs/z2.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if "train_micro_batch_size_per_gpu" not in cfg:
        raise ConfigError(f"{path}: missing train_micro_batch_size_per_gpu")
    return cfg


def prepare_data(args):
    """(annotations, tokenizer) for the run: the user's files, or the synthetic corpus."""
    ann_file = args.train_csv or args.train_json
    if args.train_csv and args.train_json:
        raise ConfigError("--train-csv and --train-json: give one of them")
    if ann_file:
        ann = read_annotations(ann_file, args.video_root, clean=clean_caption)
        tok_dir = args.tokenizer or Path(args.output_dir) / "tokenizer"
    else:
        corpus = ensure_corpus(workers=os.cpu_count(), progress=True)
        ann = read_annotations(corpus.train_csv, corpus.train_root, clean=clean_caption)
        tok_dir = args.tokenizer or corpus.root / "tokenizer"
    tokenizer = load_tokenizer(tok_dir) if args.tokenizer else ensure_tokenizer(tok_dir, ann)
    return ann, tokenizer


def run(args):
    from tqdm import tqdm

    cfg = read_ds_config(args.deepspeed)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ann, tokenizer = prepare_data(args)
    loader = build_loader(ann, tokenizer, batch_size=cfg["train_micro_batch_size_per_gpu"],
                          frames=args.frames, size=args.size, seed=args.seed,
                          num_workers=args.workers, mask_ratio=args.mask_ratio, rank=rank,
                          world_size=world)
    if rank == 0:
        print(f"data: {ann}; tokenizer vocab {len(tokenizer)}; "
              "stage: data pipeline only (model and DeepSpeed engine not wired in yet)")
    start, clips, steps, epoch = time.perf_counter(), 0, 0, 0
    bar = tqdm(total=args.max_steps, disable=rank != 0, desc="batches")
    while steps < args.max_steps:
        loader.set_epoch(epoch)
        for batch in loader:
            clips += len(batch["index"])
            steps += 1
            bar.update(1)
            bar.set_postfix(clips_per_s=f"{clips / (time.perf_counter() - start):.1f}",
                            skipped=loader.skipped)
            if steps >= args.max_steps:
                break
        epoch += 1
    bar.close()
    summary = {"stage": "data-pipeline", "batches": steps, "clips": clips,
               "seconds": time.perf_counter() - start, "skipped": loader.skipped,
               "bad_files": len(loader.bad_files)}
    summary["clips_per_s"] = clips / summary["seconds"]
    if rank == 0:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary))
    return summary


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
