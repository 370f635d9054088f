"""Decoded clips per second of the training loader, per worker: one file per clip vs tar shards.

Measures the whole per-sample path a training run uses: read, decode F frames, random resized
crop + flip, normalise, tokenise and mask the caption, collate; for each worker count and each
source:

  files   the map-style loader (`--train-csv`): one mp4 file per clip, decord (PyAV fallback)
          decoding and resizing the source video as it is
  shards  the shard loader (`--train-shards`): the same clips re-encoded by
          `python -m hvfm.data.prepare` (short side --size, --shard-fps, a key frame per second),
          read sequentially from tar files and decoded from memory

With no data flags it generates a handful of clips at WebVid's resolution (--gen-clips of
640x360, 10-30 s, 25 fps, H.264 with x264's default GOP; a camera pan over a textured scene with
moving objects), once, cached under profiling/results/tmp/, lists each --copies times (so an
epoch is long enough to time), and writes their shards there too.

    python profiling/bench_data.py [--workers 0 1 2] [--clips 32] [--frames 8] [--size 224]
                                   [--gen-clips 8] [--copies 4] [--sources files shards]
                                   [--train-csv CSV --video-root DIR [--train-shards SPEC]]
                                   [--synthetic-clips N]   (the built-in 96 px synthetic corpus)
                                   [--out profiling/results/bench_data.json]
Writes JSON (with the machine, versions, commit) and a markdown table beside it, and prints the
table. profiling/project_epoch.py reads the JSON (clips/s per worker; the shards figure when
there is one) to tell whether decoding or training bounds an epoch.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import build_loader, read_annotations  # noqa: E402
from hvfm.data.text import clean_caption, ensure_tokenizer  # noqa: E402
from profiling.machine import (RESULTS, describe, machine_info, markdown_table, write_json,  # noqa: E402
                               write_markdown)

CACHE = RESULTS / "tmp" / "bench_data"
WIDTH, HEIGHT, GEN_FPS = 640, 360, 25
COLOURS = ("red", "green", "blue", "yellow", "white", "orange")
RGB = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40),
       "white": (245, 245, 245), "orange": (250, 140, 20)}


# ----------------------------------------------------------------------------- the clips

def _texture(rng, w, h):
    """A smooth colour texture (upsampled noise plus finer detail), uint8 (h, w, 3). PIL, not
    torch: this runs in forked workers, where torch's OpenMP pool (used by the parent) deadlocks."""
    from PIL import Image
    out = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((8, 90.0), (32, 40.0), (128, 25.0), (320, 15.0)):
        noise = rng.standard_normal((3, cells * h // w + 1, cells)).astype(np.float32)
        for c in range(3):
            up = Image.fromarray(noise[c], mode="F").resize((w, h), Image.BICUBIC)
            out[:, :, c] += amp * np.asarray(up)
    return (out + 110).clip(0, 255).astype(np.uint8)


def make_clip(task):
    """Write one 640x360 clip (seconds s) to path: a pan over a texture, three moving discs."""
    import av
    path, seconds, seed = task
    rng = np.random.default_rng(seed)
    frames = int(round(seconds * GEN_FPS))
    pan = rng.uniform(0.5, 1.5) * np.array([rng.choice([-1, 1]), rng.uniform(-0.3, 0.3)])  # px per frame
    bg = _texture(rng, WIDTH + int(abs(pan[0]) * frames) + 2, HEIGHT + int(abs(pan[1]) * frames) + 2)
    discs = [(rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(-4, 4), rng.uniform(-3, 3),
              rng.uniform(20, 60), RGB[c]) for c in rng.choice(COLOURS, 3, replace=False)]
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    tmp = Path(path).with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=GEN_FPS, options={"threads": "1", "crf": "23",
                                                                  "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.thread_count = 1
        for t in range(frames):
            ox = int(t * abs(pan[0])) if pan[0] > 0 else int(abs(pan[0]) * (frames - t))
            oy = int(t * abs(pan[1])) if pan[1] > 0 else int(abs(pan[1]) * (frames - t))
            img = bg[oy:oy + HEIGHT, ox:ox + WIDTH].copy()
            for x, y, vx, vy, r, col in discs:
                cx, cy = (x + vx * t) % WIDTH, (y + vy * t) % HEIGHT
                img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = col
            frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format="yuv420p")
            frame.pts, frame.time_base = t, Fraction(1, GEN_FPS)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    os.replace(tmp, path)
    return path


def ensure_clips(cache, n, min_s, max_s, copies, seed=0, workers=1):
    """The generated clips (made once) and a WebVid CSV listing each `copies` times; returns
    (csv path, video root, [seconds of each clip])."""
    from hvfm.data.synthetic import run_tasks
    root = Path(cache) / f"clips_{WIDTH}x{HEIGHT}_{GEN_FPS}fps_{min_s:g}-{max_s:g}s_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    seconds = [float(s) for s in rng.uniform(min_s, max_s, n).round(1)]
    tasks = [(str(root / f"clip{i:03d}.mp4"), s, seed * 1000 + i) for i, s in enumerate(seconds)]
    todo = [t for t in tasks if not Path(t[0]).exists()]
    if todo:
        print(f"generating {len(todo)} clips of {WIDTH}x{HEIGHT} ({min_s:g}-{max_s:g} s) in {root} "
              f"(once)", flush=True)
        run_tasks(make_clip, todo, workers, every=1, what="clips", chunksize=1)
    csv_path = root / f"train_x{copies}.csv"
    captions = ["a camera pans over a textured scene while {} discs move".format(
        ", ".join(np.random.default_rng(seed * 1000 + i).choice(COLOURS, 3, replace=False)))
        for i in range(n)]
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for c in range(copies):
            for i in range(n):
                vid = f"clip{i:03d}" if c == 0 else f"copy{c}_clip{i:03d}"
                if c:
                    link = root / f"{vid}.mp4"
                    if not link.exists():
                        link.symlink_to(f"clip{i:03d}.mp4")
                w.writerow([vid, "", f"PT{int(seconds[i])}S", "", captions[i]])
    return csv_path, root, seconds


# ----------------------------------------------------------------------------- timing

def measure(make_loader, workers, clips, source):
    """clips/s of the loader over `clips` clips after a warm-up batch (epochs repeat as needed)."""
    loader = make_loader(workers)
    done, epoch, start, skipped = 0, 0, None, 0
    while done < clips:
        loader.set_epoch(epoch)
        got = 0
        for batch in loader:
            got += 1
            if start is None:  # warm-up: worker start, first decode
                start = time.perf_counter()
                continue
            done += len(batch["index"])
            if done >= clips:
                break
        if got == 0:
            raise SystemExit(f"{source}: the loader gave no batch (fewer clips than one batch?)")
        skipped = loader.skipped
        epoch += 1
    elapsed = time.perf_counter() - start
    return {"source": source, "workers": workers, "clips": done, "seconds": elapsed,
            "clips_per_s": done / elapsed, "clips_per_s_per_worker": done / elapsed / max(workers, 1),
            "skipped": skipped}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-csv", help="WebVid CSV (default: generated 640x360 clips)")
    ap.add_argument("--train-json", help="JSON annotations instead of a CSV")
    ap.add_argument("--video-root")
    ap.add_argument("--train-shards", help="shards of the same clips (with --train-csv/--train-json): "
                                           "time them too")
    ap.add_argument("--tokenizer", help="HF tokenizer folder (default: one trained on the captions)")
    ap.add_argument("--sources", nargs="+", default=["files", "shards"], choices=["files", "shards"])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--clips", type=int, default=32, help="clips timed per setting (after a warm-up batch)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="frame side of the batch; short side of the shards")
    ap.add_argument("--shard-fps", type=int, default=8, help="fps of the shards prepare writes")
    ap.add_argument("--decoder", default="auto", choices=["auto", "decord", "pyav"])
    ap.add_argument("--gen-clips", type=int, default=8, help="generated clips (no data flags)")
    ap.add_argument("--gen-seconds", type=float, nargs=2, default=[10.0, 30.0], metavar=("MIN", "MAX"))
    ap.add_argument("--copies", type=int, default=4, help="times each generated clip is listed")
    ap.add_argument("--cache", default=str(CACHE), help="where generated clips and shards are kept")
    ap.add_argument("--synthetic-clips", type=int, default=None,
                    help="time the built-in synthetic corpus (96 px) of this many clips instead, "
                         "files only (generated once and cached)")
    ap.add_argument("--out", default=str(RESULTS / "bench_data.json"))
    args = ap.parse_args(argv)

    ann_file = args.train_csv or args.train_json
    shards, corpus, seconds = args.train_shards, None, None
    sources = list(args.sources)
    if ann_file:
        ann = read_annotations(ann_file, args.video_root, clean=clean_caption)
        corpus = f"{ann.source} ({len(ann)} pairs)"
        if not shards:
            sources = [s for s in sources if s != "shards"]
    elif args.synthetic_clips:
        from hvfm.data.synthetic import ensure_corpus
        syn = ensure_corpus(n_train=args.synthetic_clips, workers=os.cpu_count(), progress=True)
        ann = read_annotations(syn.train_csv, syn.train_root, clean=clean_caption)
        corpus, sources = f"built-in synthetic corpus, {len(ann)} clips of 96 px", ["files"]
    else:
        lo, hi = args.gen_seconds
        ann_file, root, seconds = ensure_clips(args.cache, args.gen_clips, lo, hi, args.copies,
                                               workers=os.cpu_count())
        ann = read_annotations(ann_file, root, clean=clean_caption)
        corpus = (f"{args.gen_clips} generated clips of {WIDTH}x{HEIGHT} at {GEN_FPS} fps, "
                  f"{min(seconds):.1f}-{max(seconds):.1f} s (mean {np.mean(seconds):.1f} s), "
                  f"each listed {args.copies} times")
        if "shards" in sources:
            from hvfm.data.prepare import prepare
            shards = Path(args.cache) / f"shards_{root.name}_x{args.copies}_s{args.size}_f{args.shard_fps}"
            t0 = time.perf_counter()
            prepare(ann_file, root, shards, size=args.size, fps=args.shard_fps,
                    shard_size=max(1, len(ann) // 4), workers=os.cpu_count(), progress=False)
            print(f"shards: {shards} ({time.perf_counter() - t0:.1f} s, 0 if cached)")
    tok_dir = args.tokenizer or Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer = ensure_tokenizer(tok_dir, ann)
    info = machine_info()
    print(f"machine: {describe(info)}")
    print(f"data: {corpus}; {args.frames} frames at {args.size} px, decoder {args.decoder}, "
          f"batch {args.batch_size}")

    def files(workers):
        return build_loader(ann, tokenizer, batch_size=args.batch_size, frames=args.frames, size=args.size,
                            num_workers=workers, decoder=args.decoder, seed=0)

    def shard_loader(workers):
        from hvfm.data.shards import build_shard_loader
        return build_shard_loader(shards, tokenizer, batch_size=args.batch_size, frames=args.frames,
                                  size=args.size, num_workers=workers, decoder=args.decoder, seed=0)

    rows, load = [], [os.getloadavg()[0]]
    for source in sources:
        for w in args.workers:
            rows.append(measure(files if source == "files" else shard_loader, w, args.clips, source))
            r = rows[-1]
            load.append(os.getloadavg()[0])
            print(f"{source:6s} workers {w}: {r['clips_per_s']:.2f} clips/s "
                  f"({r['clips_per_s_per_worker']:.2f} per worker)", flush=True)
    table = markdown_table(["source", "workers", "clips", "seconds", "clips/s", "clips/s per worker", "skipped"],
                           [[r["source"], r["workers"], r["clips"], r["seconds"], r["clips_per_s"],
                             r["clips_per_s_per_worker"], r["skipped"]] for r in rows])
    print(table)
    payload = {"benchmark": "bench_data", "machine": info, "config": vars(args), "data": corpus,
               "shards": str(shards) if shards else None, "clip_seconds": seconds,
               "load_average_1min": load, "results": rows}
    path = write_json(args.out, payload)
    notes = [f"data: {corpus}; {args.frames} frames at {args.size} px, decoder {args.decoder}, "
             f"batch {args.batch_size}; the whole per-sample path (read, decode, crop, flip, "
             f"normalise, tokenise + mask, collate), timed after a warm-up batch",
             "files: one mp4 per clip as it is (decord resizes on decode); shards: the same clips "
             f"re-encoded by python -m hvfm.data.prepare (short side {args.size}, {args.shard_fps} fps, "
             f"a key frame per second), read from tar files and decoded from memory",
             "workers 0 = decoding in the training process; per worker = clips/s / max(workers, 1)",
             f"1-minute load average before and after each row: {', '.join(f'{x:.1f}' for x in load)} "
             f"on {os.cpu_count()} cores (other jobs share the CPU: the rates are lower bounds)"]
    write_markdown(Path(args.out).with_suffix(".md"), "bench_data: decoded clips per second", info, table, notes)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
