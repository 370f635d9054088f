"""Decoded clips per second of the training loader, per worker, for every source hvfm can read.

Measures the whole per-sample path of a loader worker in a GPU run: read, decode F frames, draw
the random crop + flip, tokenise and mask the caption, collate uint8 frames (the crop, resize and
normalise run on the GPU; --transform host adds them to the worker, as on a CPU-only run, and as
this bench measured before that option); for each source, in the same run:

  files        the map-style loader (`--train-csv`): one mp4 per clip as it is, once per decoder
               (`--decoders`: decord, the anchors' way and the baseline; PyAV; torchcodec)
  shards-mp4   the shard loader (`--train-shards`) over `prepare --format mp4`: the clips
               re-encoded (short side --size, --shard-fps, a key frame per second)
  shards-jpg   over `prepare --format jpg`: 16 frames per clip pre-extracted as JPEG at short
  shards-webp  side 256 (or WebP); training samples F of them, no video decoding

Honest figures: every row records the 1-minute load average (before and after each of its
repeats, the row's load is the highest); a row whose load exceeded the cores the bench uses
(workers + 1 for the training process; 1 with --workers 0; or --max-load) is marked "loaded",
its figure is not one, and it takes no part in the ratios (--strict: nothing is written).
Each figure is the median of --repeats (>= 3) repeats, alternated: repeat r times every source
before repeat r + 1 starts, so a slow spell of the machine falls on all sources alike. Ratios
are against files/decord at the same worker count, in the same run.

With no data flags it generates a handful of clips at WebVid's resolution (--gen-clips of
640x360, 10-30 s, 25 fps, H.264 with x264's default GOP; a camera pan over a textured scene with
moving objects), once, cached under profiling/results/tmp/, lists each --copies times (so an
epoch is long enough to time), and writes every shard format there too (once).

    python profiling/bench_data.py [--workers 1] [--repeats 3] [--clips 48] [--frames 8]
                                   [--size 224] [--sources files shards-mp4 shards-jpg shards-webp]
                                   [--decoders decord pyav torchcodec] [--quick] [--strict]
                                   [--train-csv CSV --video-root DIR [--train-shards SPEC]]
                                   [--out profiling/results/bench_data.json]
--quick: 2 short clips, few samples (a smoke test of the bench, not a figure).
Writes JSON (with the machine, versions, commit; rows keep `source`, `decoder`, `workers`,
`clips_per_s_per_worker`, `load`) and a markdown table beside it, and prints the table.
profiling/project_epoch.py reads the JSON.
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
from hvfm.data.text.tokens import clean_caption, ensure_tokenizer  # noqa: E402
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
    from hvfm.data.synthetic.common import run_tasks
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

SOURCES = ("files", "shards-mp4", "shards-jpg", "shards-webp")
FILE_DECODERS = ("decord", "pyav", "torchcodec")


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


def cores_used(workers):
    """Cores the bench keeps busy: each loader worker, and the training process beside them."""
    return workers + 1 if workers else 1


def load1():
    return os.getloadavg()[0]


def summarise(runs, max_load=None):
    """One row per (source, decoder, workers) from its repeats: the median rate, every repeat's
    rate, the highest load seen, and "loaded" when that load exceeded the cores the bench uses
    (or max_load)."""
    rows = []
    for key, reps in runs.items():
        source, decoder, workers = key
        rates = [r["clips_per_s_per_worker"] for r in reps]
        load = max(x for r in reps for x in r["load_seen"])
        limit = max_load if max_load is not None else cores_used(workers)
        med = float(np.median(rates))
        rows.append({"source": source, "decoder": decoder, "workers": workers,
                     "clips_per_s_per_worker": med, "clips_per_s": med * max(workers, 1),
                     "repeats": rates, "clips": sum(r["clips"] for r in reps),
                     "skipped": sum(r["skipped"] for r in reps), "load": load, "load_limit": limit,
                     "loaded": load > limit})
    base = {r["workers"]: r for r in rows if (r["source"], r["decoder"]) == ("files", "decord")}
    for r in rows:
        b = base.get(r["workers"])
        ok = b is not None and not b["loaded"] and not r["loaded"]
        r["vs_files_decord"] = r["clips_per_s_per_worker"] / b["clips_per_s_per_worker"] if ok else None
    return rows


def auto_order(rows):
    """The file decoders ordered by their measured rate (rows not loaded), fastest first."""
    best = {}
    for r in rows:
        if r["source"] == "files" and not r["loaded"] and r.get("clips_per_s_per_worker"):
            best[r["decoder"]] = max(best.get(r["decoder"], 0), r["clips_per_s_per_worker"])
    return sorted(best, key=best.get, reverse=True)


def folder_bytes(spec):
    """(bytes, samples) of a shard folder: its .tar files and index.json's sample count."""
    import json
    spec = Path(spec)
    total = sum(p.stat().st_size for p in spec.glob("*.tar"))
    try:
        samples = json.loads((spec / "index.json").read_text())["samples"]
    except (OSError, ValueError, KeyError):
        samples = 0
    return total, samples


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train-csv", help="WebVid CSV (default: generated 640x360 clips)")
    ap.add_argument("--train-json", help="JSON annotations instead of a CSV")
    ap.add_argument("--video-root")
    ap.add_argument("--train-shards", nargs="+", default=[], metavar="FORMAT=SPEC",
                    help="shards of the same clips (with --train-csv/--train-json), e.g. "
                         "mp4=shards/ jpg=shards_jpg/: time them too")
    ap.add_argument("--tokenizer", help="HF tokenizer folder (default: one trained on the captions)")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--decoders", nargs="+", default=list(FILE_DECODERS), choices=FILE_DECODERS,
                    help="decoders timed on one mp4 per clip (decord is the baseline)")
    ap.add_argument("--shard-decoder", default="auto", choices=["auto", *FILE_DECODERS],
                    help="decoder of the mp4 shards")
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--repeats", type=int, default=3, help="alternated repeats per row (>= 3); the median counts")
    ap.add_argument("--clips", type=int, default=48, help="clips timed per repeat (after a warm-up batch)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=224, help="frame side of the batch; short side of the mp4 shards")
    ap.add_argument("--shard-fps", type=int, default=8, help="fps of the mp4 shards prepare writes")
    ap.add_argument("--frames-size", type=int, default=256, help="short side of the jpg/webp shards")
    ap.add_argument("--keep-frames", type=int, default=16, help="frames per clip of the jpg/webp shards")
    ap.add_argument("--transform", default="device", choices=["device", "host"],
                    help="device: workers send uint8 frames + crop rows, as for a GPU run (crop, resize "
                         "and normalise run on the GPU); host: workers also crop, resize and normalise "
                         "to float, as a CPU-only run (and bench_data before this option) does")
    ap.add_argument("--decode-timeout", type=float, default=30.0,
                    help="the decode watchdog, as train.py's default (every decode in a child process); "
                         "0: decode in the worker itself")
    ap.add_argument("--gen-clips", type=int, default=8, help="generated clips (no data flags)")
    ap.add_argument("--gen-seconds", type=float, nargs=2, default=[10.0, 30.0], metavar=("MIN", "MAX"))
    ap.add_argument("--copies", type=int, default=4, help="times each generated clip is listed")
    ap.add_argument("--cache", default=str(CACHE), help="where generated clips and shards are kept")
    ap.add_argument("--max-load", type=float, default=None,
                    help="mark a row loaded above this 1-minute load (default: the cores the bench "
                         "uses, workers + 1)")
    ap.add_argument("--strict", action="store_true", help="write nothing when a row is loaded (exit 3)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test: 2 clips of 1-1.5 s listed twice, 4 clips per repeat, batch 1")
    ap.add_argument("--out", default=str(RESULTS / "bench_data.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.gen_clips, args.gen_seconds, args.copies, args.clips, args.batch_size = 2, [1.0, 1.5], 2, 4, 1
    if args.repeats < 3:
        ap.error(f"--repeats {args.repeats}: a figure is the median of >= 3 alternated repeats")

    ann_file = args.train_csv or args.train_json
    shards, seconds = {}, None
    sources = list(args.sources)
    if ann_file:
        ann = read_annotations(ann_file, args.video_root, clean=clean_caption)
        corpus = f"{ann.source} ({len(ann)} pairs)"
        for item in args.train_shards:
            fmt, _, spec = item.partition("=")
            if f"shards-{fmt}" not in SOURCES or not spec:
                ap.error(f"--train-shards {item}: write FORMAT=SPEC, FORMAT one of mp4, jpg, webp")
            shards[f"shards-{fmt}"] = spec
        sources = [s for s in sources if s == "files" or s in shards]
    else:
        lo, hi = args.gen_seconds
        ann_file, root, seconds = ensure_clips(args.cache, args.gen_clips, lo, hi, args.copies,
                                               workers=os.cpu_count())
        ann = read_annotations(ann_file, root, clean=clean_caption)
        corpus = (f"{args.gen_clips} generated clips of {WIDTH}x{HEIGHT} at {GEN_FPS} fps, "
                  f"{min(seconds):.1f}-{max(seconds):.1f} s (mean {np.mean(seconds):.1f} s), "
                  f"each listed {args.copies} times")
        from hvfm.data.sources.prepare import prepare
        for source in sources:
            if not source.startswith("shards-"):
                continue
            fmt = source.split("-", 1)[1]
            size = args.size if fmt == "mp4" else args.frames_size
            tag = f"f{args.shard_fps}" if fmt == "mp4" else f"k{args.keep_frames}"
            shards[source] = Path(args.cache) / f"shards_{root.name}_x{args.copies}_{fmt}_s{size}_{tag}"
            t0 = time.perf_counter()
            prepare(ann_file, root, shards[source], size=size, fps=args.shard_fps,
                    shard_size=max(1, len(ann) // 4), workers=os.cpu_count(), progress=False, fmt=fmt,
                    keep_frames=args.keep_frames)
            print(f"{source}: {shards[source]} ({time.perf_counter() - t0:.1f} s, ~0 if cached)")
    tok_dir = args.tokenizer or Path(tempfile.mkdtemp()) / "tokenizer"
    tokenizer = ensure_tokenizer(tok_dir, ann)
    info = machine_info()
    print(f"machine: {describe(info)}")
    print(f"data: {corpus}; {args.frames} frames at {args.size} px, batch {args.batch_size}, "
          f"{args.repeats} alternated repeats of {args.clips} clips")

    from hvfm.data.decode import available_decoders
    ready = available_decoders()
    configs, missing = [], []
    for source in sources:
        if source == "files":
            for d in args.decoders:
                if ready[d] is None:
                    configs.append(("files", d))
                else:  # not installed / does not load here: said in the output, no row
                    missing.append({"source": "files", "decoder": d, "why": ready[d]})
        else:
            configs.append((source, args.shard_decoder if source == "shards-mp4" else "pillow"))

    def make(source, decoder):
        def build(workers):
            on_device = args.transform == "device"
            if source == "files":
                return build_loader(ann, tokenizer, batch_size=args.batch_size, frames=args.frames,
                                    size=args.size, num_workers=workers, decoder=decoder, seed=0,
                                    device_transform=on_device, decode_timeout=args.decode_timeout or None)
            from hvfm.data.loading.shards import build_shard_loader
            return build_shard_loader(shards[source], tokenizer, batch_size=args.batch_size,
                                      frames=args.frames, size=args.size, num_workers=workers,
                                      decoder=decoder if source == "shards-mp4" else "auto", seed=0,
                                      device_transform=on_device, decode_timeout=args.decode_timeout or None)
        return build

    limit = (lambda w: args.max_load) if args.max_load is not None else cores_used
    first = load1()
    if first > limit(max(args.workers)):
        print(f"warning: 1-minute load {first:.1f} already exceeds the {limit(max(args.workers)):g} "
              f"core(s) this bench uses: its rows will be marked loaded (not figures)", flush=True)
    runs = {}
    for rep in range(args.repeats):  # alternated: every source once per repeat
        for source, decoder in configs:
            for w in args.workers:
                before = load1()
                r = measure(make(source, decoder), w, args.clips, source)
                r["load_seen"] = [before, load1()]
                runs.setdefault((source, decoder, w), []).append(r)
                print(f"repeat {rep + 1}/{args.repeats} {source:11s} {decoder:10s} workers {w}: "
                      f"{r['clips_per_s_per_worker']:.2f} clips/s per worker (load {max(r['load_seen']):.1f})",
                      flush=True)
    rows = summarise(runs, args.max_load)
    for m in missing:
        print(f"{m['source']} {m['decoder']}: not run: {m['why']}")
    disk = {}
    if seconds is not None or ann_file:
        sizes = [p.stat().st_size for p in {Path(ann.resolve(i)).resolve() for i in range(ann.num_videos)}]
        disk["files"] = float(np.mean(sizes)) if sizes else None
    for source, spec in shards.items():
        total, n = folder_bytes(spec)
        disk[source] = total / n if n else None
    for r in rows:
        r["bytes_per_clip"] = disk.get(r["source"])
    order = auto_order(rows)
    loaded = [r for r in rows if r.get("loaded")]
    fmt = lambda x, f: "-" if x is None else f.format(x)  # noqa: E731
    table = markdown_table(
        ["source", "decoder", "workers", "clips/s per worker (median)", "repeats", "x files/decord",
         "load (1 min)", "loaded", "disk per clip"],
        [[r["source"], r["decoder"], fmt(r["workers"], "{}"), fmt(r["clips_per_s_per_worker"], "{:.2f}"),
          " / ".join(f"{x:.2f}" for x in r["repeats"]),
          fmt(r.get("vs_files_decord"), "{:.1f}x"), fmt(r["load"], "{:.1f}"),
          "LOADED" if r.get("loaded") else "", fmt(r.get("bytes_per_clip"), "{:,.0f} B")] for r in rows])
    print(table)
    if args.strict and loaded:
        sys.exit(f"error: {len(loaded)} row(s) ran above the load limit (e.g. {loaded[0]['source']} "
                 f"{loaded[0]['decoder']}: load {loaded[0]['load']:.1f} > {loaded[0]['load_limit']:g}); "
                 f"nothing written (--strict): rerun on a quiet machine")
    payload = {"benchmark": "bench_data", "machine": info, "config": vars(args), "data": corpus,
               "shards": {k: str(v) for k, v in shards.items()}, "clip_seconds": seconds,
               "load_average_1min": [first] + [x for rs in runs.values() for r in rs for x in r["load_seen"]],
               "auto_order": order, "loaded_rows": len(loaded), "not_run": missing, "results": rows}
    path = write_json(args.out, payload)
    path_desc = ("read, decode, draw crop + flip, tokenise + mask, collate uint8 frames (crop, resize "
                 "and normalise are the GPU's, as in a GPU run)" if args.transform == "device" else
                 "read, decode, crop, resize, flip, normalise, tokenise + mask, collate (a CPU run's path)")
    notes = [f"data: {corpus}; {args.frames} frames at {args.size} px, batch {args.batch_size}; the "
             f"whole per-sample path of a worker ({path_desc}), timed after a warm-up batch; median of "
             f"{args.repeats} alternated repeats of {args.clips} clips; decode watchdog "
             + (f"on ({args.decode_timeout:g} s, as train.py's default)" if args.decode_timeout else "off"),
             "files: one mp4 per clip as it is; shards-mp4: re-encoded by python -m hvfm.data.prepare "
             f"(short side {args.size}, {args.shard_fps} fps, a key frame per second); shards-jpg/webp: "
             f"{args.keep_frames} frames per clip pre-extracted at short side {args.frames_size} "
             f"(prepare --format jpg/webp), {args.frames} of them sampled and decoded with Pillow",
             "per worker = clips/s / max(workers, 1); x files/decord: against one mp4 per clip with "
             "decord at the same worker count, in this run, rows not loaded only",
             f"load: the highest 1-minute load average seen around the row's repeats, on "
             f"{os.cpu_count()} cores; LOADED: above the cores the bench uses (workers + 1): not a figure"
             + (f" -- {len(loaded)} row(s) LOADED in this run" if loaded else ""),
             f"file decoders by measured rate (for hvfm/data/decode.py AUTO_ORDER): "
             f"{', '.join(order) or 'none measured unloaded'}"]
    notes += [f"not run: {m['source']} {m['decoder']}: {m['why']}" for m in missing]
    write_markdown(Path(args.out).with_suffix(".md"), "bench_data: decoded clips per second", info, table, notes)
    print(f"file decoders fastest first (AUTO_ORDER): {', '.join(order) or 'none measured unloaded'}")
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
