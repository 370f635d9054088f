"""Decoded clips per second of the data pipeline, for 0, 1 and 2 loader workers.

Measures the whole per-sample path a training run uses: read the annotation, decode F frames
(decord, PyAV fallback), random resized crop + flip, normalise, tokenise and mask the caption,
collate. With no data flags it reads the built-in synthetic corpus (generated once).

    python profiling/bench_data.py [--train-csv CSV --video-root DIR] [--workers 0 1 2]
                                   [--clips 256] [--frames 8] [--size 224] [--decoder auto]
                                   [--synthetic-clips 4000] [--out profiling/results/bench_data.json]
Writes JSON (with the machine, versions, commit) and a markdown table beside it, and prints the
table. profiling/project_epoch.py reads the JSON (clips/s per worker) to tell whether decoding or
training bounds an epoch.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import build_loader, read_annotations  # noqa: E402
from hvfm.data.synthetic import ensure_corpus  # noqa: E402
from hvfm.data.text import ensure_tokenizer  # noqa: E402
from profiling.machine import (RESULTS, describe, machine_info, markdown_table, write_json,  # noqa: E402
                               write_markdown)


def measure(ann, tokenizer, workers, clips, batch_size, frames, size, decoder):
    loader = build_loader(ann, tokenizer, batch_size=batch_size, frames=frames, size=size,
                          num_workers=workers, decoder=decoder, seed=0)
    it = iter(loader)
    next(it)  # warm-up: worker start, first decode
    done, start = 0, time.perf_counter()
    for batch in it:
        done += len(batch["index"])
        if done >= clips:
            break
    elapsed = time.perf_counter() - start
    return {"workers": workers, "clips": done, "seconds": elapsed, "clips_per_s": done / elapsed,
            "skipped": loader.skipped}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-csv", help="WebVid CSV (default: the synthetic corpus)")
    ap.add_argument("--train-json", help="JSON annotations instead of a CSV")
    ap.add_argument("--video-root")
    ap.add_argument("--tokenizer", help="HF tokenizer folder (default: the synthetic corpus's)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clips", type=int, default=256, help="clips timed per setting")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--decoder", default="auto", choices=["auto", "decord", "pyav"])
    ap.add_argument("--synthetic-clips", type=int, default=4000,
                    help="training clips of the synthetic corpus when no data flags are given "
                         "(4000: the trainer's built-in corpus, generated once and cached)")
    ap.add_argument("--out", default=str(RESULTS / "bench_data.json"))
    args = ap.parse_args(argv)

    ann_file = args.train_csv or args.train_json
    if ann_file:
        ann = read_annotations(ann_file, args.video_root)
        tok_dir = args.tokenizer or Path(tempfile.mkdtemp()) / "tokenizer"
    else:
        corpus = ensure_corpus(n_train=args.synthetic_clips, workers=os.cpu_count(), progress=True)
        ann = read_annotations(corpus.train_csv, corpus.train_root)
        tok_dir = args.tokenizer or corpus.root / "tokenizer"
    tokenizer = ensure_tokenizer(tok_dir, ann)
    info = machine_info()
    print(f"machine: {describe(info)}")
    print(f"data: {ann.source} ({len(ann)} pairs), {args.frames} frames at {args.size} px, "
          f"decoder {args.decoder}, batch {args.batch_size}")
    rows = [measure(ann, tokenizer, w, args.clips, args.batch_size, args.frames, args.size,
                    args.decoder) for w in args.workers]
    table = markdown_table(["workers", "clips", "seconds", "clips/s", "clips/s per worker", "skipped"],
                           [[r["workers"], r["clips"], r["seconds"], r["clips_per_s"],
                             r["clips_per_s"] / max(r["workers"], 1), r["skipped"]] for r in rows])
    print(table)
    path = write_json(args.out, {"benchmark": "bench_data", "machine": info, "config": vars(args),
                                 "data": ann.source, "results": rows})
    write_markdown(Path(args.out).with_suffix(".md"), "bench_data: decoded clips per second", info, table,
                   [f"data: {ann.source}; {args.frames} frames at {args.size} px, decoder {args.decoder}, "
                    f"batch {args.batch_size}; the whole per-sample path (decode, crop, flip, normalise, "
                    f"tokenise + mask, collate)",
                    "workers 0 = decoding in the main process; per worker = clips/s / max(workers, 1)"])
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
