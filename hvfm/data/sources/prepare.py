"""Write a video-text corpus as tar shards (webdataset layout), the form large trainings stream.

    python -m hvfm.data.prepare --train-csv CSV --video-root DIR --out SHARDS
                                [--format mp4|jpg|webp] [--size N] [--fps 8] [--keep-frames 16]
                                [--quality 85] [--shard-size 1000] [--workers N]

Every video of the annotation file (a WebVid CSV, or a JSON list, read by the trainer's own
reader) becomes one sample of key `NNNNNNNNN` (its row number) in `SHARDS/SSSSSS.tar`:

    NNNNNNNNN.mp4   (--format mp4) the clip re-encoded with PyAV: H.264 (libx264, yuv420p, one
                    thread), short side `--size` (default 224), `--fps` frames per second, a key
                    frame every second (a short GOP: a reader seeks cheaply and never decodes far)
    NNNNNNNNN.f00.jpg ... f15.jpg   (--format jpg, or .webp) `--keep-frames` frames of the clip
                    pre-extracted at short side `--size` (default 256): the evaluation frames of
                    that many equal segments (`decode.sample_indices`), Pillow JPEG at `--quality`.
                    Training samples its `--frames` of them with the same sampler as a file (one
                    random frame per equal segment), then the same random crop and flip: no video
                    decoding at training time, at the cost of coarser temporal jitter (each of 8
                    frames is one of 2 stored candidates, not any frame of its segment) and a
                    fixed 256-px short side
    NNNNNNNNN.txt   its caption(s), one per line, as in the annotation file
    NNNNNNNNN.json  {"video": the relative path it came from, "row": its row; frame formats also
                    "frames": the source frame indices stored, "source_frames": the clip's count}

Shard k holds rows k*S .. (k+1)*S-1 (S = --shard-size), so a rerun assigns the same rows to the
same shard. Resumable: each shard is written to `.tmp-SSSSSS.tar` and renamed when complete, with
its sample count and bad files in `.parts/SSSSSS.json` (written first); a rerun keeps the finished
shards and redoes the rest (a half-written one included). Bad videos (missing, unreadable, no
frames) never stop it: they are left out, counted, and listed in `SHARDS/bad_files.txt`
(`path<TAB>reason`). When every shard is done, `SHARDS/index.json` records the shards, their sample
counts and the settings; the trainer reads it (`--train-shards SHARDS`) to know an epoch's length
and, on `--resume`, which shards each loader worker had finished (skipped without being opened;
see hvfm/data/loading/shards.py). Rewrite index.json (rerun prepare) if shards are changed by hand.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tarfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from .annotations import read_annotations
from ..decode import (available_decoders, decode_size, decoder_order, resize_frames, sample_indices,
                     torchcodec_status)
from ..errors import DataError

FORMAT = "hvfm-shards v1"
FORMATS = ("mp4", "jpg", "webp")
DEFAULT_SIZE = {"mp4": 224, "jpg": 256, "webp": 256}
INDEX = "index.json"
BAD_FILES = "bad_files.txt"
PARTS = ".parts"


def shard_name(k):
    return f"{k:06d}.tar"


def reencode(path, size=224, fps=8, crf=23):
    """The clip at `path` as mp4 bytes: H.264 yuv420p, short side `size` (even sides), `fps` frames
    per second (each output frame shows the latest input frame at its time), a key frame every
    second. Raises on any decoder/encoder failure and ValueError on a clip without frames."""
    import av

    with av.open(str(path)) as inp:
        src = inp.streams.video[0]
        src.codec_context.thread_count = 1
        width, height = decode_size(src.codec_context.width, src.codec_context.height, size)
        in_step = 1.0 / float(src.average_rate) if src.average_rate else 1.0 / fps
        buf = io.BytesIO()
        n, prev, t0, t_last = 0, None, None, 0.0
        with av.open(buf, mode="w", format="mp4") as out:
            # mbtree off: one-threaded x264 is then byte-identical run to run (see synthetic/clips.py)
            stream = out.add_stream("libx264", rate=fps, options={
                "threads": "1", "crf": str(crf), "preset": "veryfast",
                "x264-params": f"keyint={fps}:min-keyint={fps}:scenecut=0:mbtree=0"})
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1

            def emit(frame):
                nonlocal n
                f = frame.reformat(width=width, height=height, format="yuv420p")
                f.pts, f.time_base = n, Fraction(1, fps)
                out.mux(stream.encode(f))
                n += 1

            for i, frame in enumerate(inp.decode(src)):
                t = frame.time if frame.time is not None else i * in_step
                t0 = t if t0 is None else t0
                t -= t0
                while prev is not None and n / fps < t - 1e-6:  # output times before this frame
                    emit(prev)
                prev, t_last = frame, t
            if prev is None:
                raise ValueError("no video frames")
            while True:  # the last frame lasts one input frame
                emit(prev)
                if n / fps >= t_last + in_step - 1e-6:
                    break
            out.mux(stream.encode(None))
    return buf.getvalue()


def read_frames(path, keep, decoder="auto"):
    """The evaluation frames of `keep` equal segments of a clip (`sample_indices`; all its frames
    when it has fewer), at the file's own size: (uint8 (T, H, W, 3), their indices, the clip's
    frame count). decoder: as --decoder ("auto": decord, torchcodec, PyAV, the first installed;
    decord and torchcodec seek, PyAV decodes up to the last frame wanted)."""
    ready = available_decoders()
    order = [d for d in decoder_order(decoder) if ready[d] is None]
    if not order:
        raise RuntimeError("; ".join(ready[d] for d in decoder_order(decoder)))
    name = order[0]
    if name == "decord":
        import decord
        vr = decord.VideoReader(str(path), num_threads=1)
        n = len(vr)
        idx = sample_indices(n, keep, train=False)
        return (vr.get_batch(idx).asnumpy() if idx else None), idx, n
    if name == "torchcodec":
        dec = torchcodec_status()[0].VideoDecoder(str(path), dimension_order="NHWC", num_ffmpeg_threads=1)
        n = dec.metadata.num_frames or 0
        idx = sample_indices(n, keep, train=False)
        return (dec.get_frames_at(indices=idx).data.numpy() if idx else None), idx, n
    import av
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        n = stream.frames
        if n > 0:
            idx = sample_indices(n, keep, train=False)
            wanted, got = set(idx), {}
            for i, f in enumerate(c.decode(stream)):
                if i in wanted:
                    got[i] = f.to_ndarray(format="rgb24")
                if i >= idx[-1]:
                    break
            if len(got) == len(idx):
                return np.stack([got[i] for i in idx]), idx, n
            c.seek(0)
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]  # no (or a wrong) count
    idx = sample_indices(len(frames), keep, train=False)
    return (np.stack([frames[i] for i in idx]) if idx else None), idx, len(frames)


def extract_frames(path, keep=16, size=256, fmt="jpg", quality=85, decoder="auto"):
    """`keep` frames of the clip at `path` (the evaluation frames of `keep` equal segments; all of
    them when it has fewer), short side `size`, each encoded as `fmt` (jpg / webp) with Pillow.
    Returns ([bytes per frame], the source frame indices, the clip's frame count). Raises on a
    clip without frames or a decoder failure."""
    from PIL import Image
    frames, idx, n = read_frames(path, keep, decoder)
    if frames is None or not len(frames):
        raise ValueError("no video frames")
    frames = resize_frames(frames, size)
    out = []
    for f in frames:
        buf = io.BytesIO()
        if fmt == "jpg":  # 4:2:0 as the source H.264; optimised Huffman tables: smaller, as fast to read
            Image.fromarray(f).save(buf, format="JPEG", quality=quality, subsampling=2, optimize=True)
        else:
            Image.fromarray(f).save(buf, format="WEBP", quality=quality, method=4)
        out.append(buf.getvalue())
    return out, [int(i) for i in idx], n


def _write_shard(task):
    """Write one shard (a pool task); returns its part record."""
    out, k, rows, opts = task
    import webdataset as wds

    name = shard_name(k)
    tmp = out / f".tmp-{name}"
    bad, samples = [], 0
    with open(tmp, "wb") as f:
        with wds.TarWriter(f, mtime=0) as sink:
            for row, rel, path, captions in rows:
                meta = {"video": rel, "row": row}
                try:
                    if not os.path.exists(path):
                        raise FileNotFoundError("missing file")
                    if opts["format"] == "mp4":
                        video = {"mp4": reencode(path, opts["size"], opts["fps"])}
                    else:
                        images, idx, n = extract_frames(path, opts["keep_frames"], opts["size"],
                                                        opts["format"], opts["quality"], opts["decoder"])
                        video = {f"f{j:02d}.{opts['format']}": b for j, b in enumerate(images)}
                        meta.update(frames=idx, source_frames=n)
                except Exception as e:  # noqa: BLE001 - any bad video is listed, never fatal
                    bad.append([str(path), " ".join(f"{type(e).__name__}: {e}".split())[:200]])
                    continue
                sink.write({"__key__": f"{row:09d}", **video, "txt": "\n".join(captions),
                            "json": meta})
                samples += 1
        f.flush()
        os.fsync(f.fileno())
    part = {"name": name, "samples": samples, "bad": bad}
    _atomic_text(out / PARTS / f"{k:06d}.json", json.dumps(part))
    os.replace(tmp, out / name)  # last: the shard exists only when complete
    return part


def _atomic_text(path, text):
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _done(out, k):
    """The part record of shard k if it was finished, else None."""
    part = out / PARTS / f"{k:06d}.json"
    if not (out / shard_name(k)).is_file() or not part.is_file():
        return None
    try:
        return json.loads(part.read_text())
    except ValueError:
        return None


def prepare(ann_file, video_root, out, size=None, fps=8, shard_size=1000, workers=1, progress=True,
            fmt="mp4", keep_frames=16, quality=85, decoder="auto"):
    """Write the shards of `ann_file` into `out` (see the module docstring); returns the index.
    fmt: "mp4" (re-encoded clips), "jpg" or "webp" (`keep_frames` pre-extracted frames per clip);
    size: short side (default 224 for mp4, 256 for frames); decoder: the reader of the frames
    formats (as --decoder; mp4 re-encodes with PyAV)."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    size = DEFAULT_SIZE[fmt] if size is None else size
    if size < 2 or size % 2:
        raise DataError(f"--size {size}: give an even number of pixels >= 2 (yuv420p)")
    if fps < 1 or shard_size < 1 or workers < 1 or keep_frames < 1:
        raise DataError("--fps, --keep-frames, --shard-size and --workers must be >= 1")
    if not 1 <= quality <= 100:
        raise DataError(f"--quality {quality}: give 1..100")
    ann = read_annotations(ann_file, video_root, split="train")  # MSRVTT_data.json: train
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder for the shards")
    (out / PARTS).mkdir(parents=True, exist_ok=True)
    settings = {"size": size, "fps": fps, "shard_size": shard_size, "source": str(Path(ann_file).resolve()),
                "format": fmt}
    if fmt != "mp4":
        settings.update(keep_frames=keep_frames, quality=quality)
    meta = out / PARTS / "settings.json"
    if meta.exists() and {"format": "mp4", **json.loads(meta.read_text())} != settings:
        raise DataError(f"--out {out}: holds shards written with other settings "
                        f"({meta.read_text().strip()}); give another folder or empty this one")
    _atomic_text(meta, json.dumps(settings))
    for leftover in out.glob(".tmp-*"):  # a shard being written when the last run stopped
        leftover.unlink()
    n = ann.num_videos
    shards = (n + shard_size - 1) // shard_size
    parts, tasks = {}, []
    for k in range(shards):
        part = _done(out, k)
        if part is not None:
            parts[k] = part
            continue
        rows = []
        for i in range(k * shard_size, min(n, (k + 1) * shard_size)):
            path = ann.resolve(i)
            rows.append((i, str(path.relative_to(ann.root)), str(path), ann.captions_of(i)))
        tasks.append((out, k, rows, {"format": fmt, "size": size, "fps": fps, "keep_frames": keep_frames,
                                     "quality": quality, "decoder": decoder}))
    if progress:
        print(f"{ann.source}: {n} videos -> {shards} shard(s) in {out}; {len(parts)} already "
              f"done, {len(tasks)} to write ({workers} process(es))", flush=True)
    t0 = time.time()
    if workers > 1 and len(tasks) > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(workers, len(tasks))) as pool:
            done = pool.imap_unordered(_write_shard, tasks)
            for j, part in enumerate(done):
                parts[int(part["name"][:6])] = part
                if progress:
                    print(f"{j + 1}/{len(tasks)} shards, {time.time() - t0:.0f}s", flush=True)
    else:
        for j, task in enumerate(tasks):
            parts[task[1]] = _write_shard(task)
            if progress:
                print(f"{j + 1}/{len(tasks)} shards, {time.time() - t0:.0f}s", flush=True)
    bad = [b for k in sorted(parts) for b in parts[k]["bad"]]
    _atomic_text(out / BAD_FILES, "".join(f"{p}\t{r}\n" for p, r in bad))
    index = {"format": FORMAT, **settings, "videos": n, "samples": sum(p["samples"] for p in parts.values()),
             "bad_files": len(bad),
             "shards": [{"name": parts[k]["name"], "samples": parts[k]["samples"]} for k in sorted(parts)]}
    _atomic_text(out / INDEX, json.dumps(index, indent=1))
    return index


def count_samples(tar_path):
    """Samples (distinct keys) in one tar shard, by reading its member names."""
    keys = set()
    with tarfile.open(tar_path) as t:
        for m in t:
            if m.isfile():
                base = os.path.basename(m.name)
                keys.add(os.path.join(os.path.dirname(m.name), base.split(".", 1)[0]))
    return len(keys)


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown where there is one: not "(default: None)" on required or open flags."""
    def _get_help_string(self, action):
        if action.default is None or action.required:
            return action.help
        return super()._get_help_string(action)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvfm.data.prepare", description=__doc__.split("\n")[0],
                                 formatter_class=_Help)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--train-csv", help="WebVid CSV (videoid,contentUrl,duration,page_dir,name)")
    src.add_argument("--train-json", help='JSON list of {"video", "caption"}')
    ap.add_argument("--video-root", required=True, help="folder the videos are under")
    ap.add_argument("--out", required=True, help="folder for the shards (SHARDS/*.tar)")
    ap.add_argument("--format", default="mp4", choices=FORMATS,
                    help="mp4: each clip re-encoded (short GOP); jpg / webp: --keep-frames frames per "
                         "clip pre-extracted as images (no video decoding when training; see the "
                         "README's table of formats)")
    ap.add_argument("--size", type=int, default=None,
                    help="short side in pixels, even (default: 224 for mp4, 256 for jpg/webp)")
    ap.add_argument("--fps", type=int, default=8, help="frames per second of the re-encoded clips (mp4)")
    ap.add_argument("--keep-frames", type=int, default=16,
                    help="frames stored per clip (jpg/webp); training samples --frames of them")
    ap.add_argument("--quality", type=int, default=85, help="JPEG / WebP quality (jpg/webp)")
    ap.add_argument("--decoder", default="auto", choices=("auto", "decord", "torchcodec", "pyav"),
                    help="reader of the source clips for jpg/webp (auto: decord, torchcodec, PyAV, the "
                         "first installed); mp4 re-encodes with PyAV")
    ap.add_argument("--shard-size", type=int, default=1000, help="videos per shard")
    ap.add_argument("--workers", type=int, default=1, help="processes, one shard (one x264 thread) each")
    a = ap.parse_args(argv)
    t0 = time.time()
    try:
        index = prepare(a.train_csv or a.train_json, a.video_root, a.out, a.size, a.fps, a.shard_size,
                        a.workers, fmt=a.format, keep_frames=a.keep_frames, quality=a.quality,
                        decoder=a.decoder)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {index['samples']} samples in {len(index['shards'])} shard(s) to {a.out} in "
          f"{time.time() - t0:.1f}s; {index['bad_files']} bad file(s) left out"
          f"{' (listed in ' + str(Path(a.out) / BAD_FILES) + ')' if index['bad_files'] else ''}; "
          f"train with --train-shards {a.out}")


if __name__ == "__main__":
    main()
