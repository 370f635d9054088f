"""Annotation files: WebVid CSVs and MSR-VTT/DiDeMo-style JSON lists, read into one form.

An `Annotations` holds, for every video, its path under a video root and its captions; training
iterates over (video, caption) pairs. Strings are packed into numpy buffers (`StringColumn`) so a
10M-row corpus is a few flat arrays that forked loader workers share without copying.

WebVid CSV: columns `videoid, contentUrl, duration, page_dir, name`; the video is
`ROOT/{page_dir}/{videoid}.mp4` or `ROOT/{videoid}.mp4`, whichever exists. The layout is detected
on the first rows; each sample still tries the other layout when its file is not where expected.

JSON: `[{"video": rel_path, "caption": str | [str, ...]}, ...]` (or `"image"` for a still, read
as a one-frame clip). A caption list means several
captions for the video (one training pair each), or with `paragraph=True` one paragraph
(DiDeMo / ActivityNet style, joined with spaces). Extra keys are kept in `Annotations.extra`.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

from .errors import DataError

WEBVID_COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
REQUIRED_WEBVID_COLUMNS = ("videoid", "name")  # page_dir is optional: ROOT/{videoid}.mp4
LAYOUT_PROBE_ROWS = 64


class StringColumn:
    """An immutable list of strings stored as one utf-8 buffer plus offsets."""

    def __init__(self, strings):
        encoded = [s.encode("utf-8") for s in strings]
        self.offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self.offsets[1:])
        self.buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.buffer[self.offsets[i]:self.offsets[i + 1]].tobytes().decode("utf-8")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class Annotations:
    """Videos under one root, each with one or more captions.

    videos[i]       primary relative path of video i
    alt_videos[i]   other layout's relative path ("" when there is none)
    pair_video[j]   video index of training pair j;  pair_caption[j] its caption
    video_pairs     CSR offsets: the pairs of video i are video_pairs[i]:video_pairs[i+1]
    """

    def __init__(self, source, root, videos, captions, alt_videos=None, extra=None, dropped=0):
        self.source = str(source)
        self.root = Path(root)
        self.videos = StringColumn(videos)
        self.alt_videos = StringColumn(alt_videos if alt_videos is not None else [""] * len(videos))
        counts = np.array([len(c) for c in captions], dtype=np.int64)
        self.video_pairs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.pair_video = np.repeat(np.arange(len(videos), dtype=np.int64), counts)
        self.pair_caption = StringColumn([c for caps in captions for c in caps])
        self.extra = extra or []
        self.dropped = dropped  # rows without a usable video id or caption, reported by the loader

    @property
    def num_videos(self):
        return len(self.videos)

    def __len__(self):
        return len(self.pair_video)

    def captions_of(self, video_index):
        a, b = self.video_pairs[video_index], self.video_pairs[video_index + 1]
        return [self.pair_caption[j] for j in range(a, b)]

    def resolve(self, video_index):
        """Path of video i: the primary layout if it exists, else the other one, else the primary
        (a missing file is reported by the decoder as 'missing file')."""
        return self.locate(video_index)[0]

    def locate(self, video_index):
        """(path, size in bytes) of video i, as `resolve` finds it, with one stat when the file is
        where the layout says (the decoder takes the size and does not stat again). Size -1: the
        file is missing in both layouts; None: it could not be stat-ed (the decoder says why)."""
        primary = self.root / self.videos[video_index]
        size = _size(primary)
        if size is not None and size >= 0:
            return primary, size
        alt = self.alt_videos[video_index]
        if alt:
            alt_size = _size(self.root / alt)
            if alt_size is not None and alt_size >= 0:
                return self.root / alt, alt_size
        return primary, size

    def __repr__(self):
        return (f"Annotations({self.source!r}, root={str(self.root)!r}, videos={self.num_videos}, "
                f"pairs={len(self)}, dropped={self.dropped})")


def _size(path):
    """st_size of `path`; -1 when it does not exist, None when it cannot be stat-ed otherwise."""
    try:
        return os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return -1
    except OSError:
        return None


def _check_root(root, source):
    if root is None:
        raise DataError(f"{source}: no video root given; pass --video-root DIR (the folder the "
                        f"annotation's video paths are relative to)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{source}: video root {root} does not exist or is not a folder; "
                        f"pass --video-root DIR pointing at the videos")
    return root


def _check_file(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: annotation file is empty; it needs at least one video")
    return path


def read_webvid_csv(path, video_root, clean=None):
    """Read a WebVid CSV. `clean` maps a raw caption to the training caption (None: keep)."""
    path = _check_file(path)
    root = _check_root(video_root, path)
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: annotation file is empty; it needs a header and rows")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_WEBVID_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a WebVid CSV has the "
                            f"header {','.join(WEBVID_COLUMNS)}")
        col = {name: header.index(name) for name in (*REQUIRED_WEBVID_COLUMNS, "page_dir") if name in header}
        videos, alts, captions, dropped = [], [], [], 0
        for row in reader:
            if not row:
                continue
            try:
                vid, name = (row[col[c]].strip() for c in REQUIRED_WEBVID_COLUMNS)
                page = row[col["page_dir"]].strip() if "page_dir" in col else ""
            except IndexError:
                dropped += 1
                continue
            caption = clean(name) if clean else name
            if not vid or not caption:
                dropped += 1
                continue
            alts.append(f"{vid}.mp4")
            videos.append(f"{page}/{vid}.mp4" if page else f"{vid}.mp4")
            captions.append([caption])
    if not videos:
        raise DataError(f"{path}: no usable rows (every row lacks a videoid or a caption)")
    videos, alts = _detect_layout(path, root, videos, alts)
    return Annotations(path, root, videos, captions, alts, dropped=dropped)


def _detect_layout(source, root, videos, alts):
    """Make the layout that exists for most of the first rows the primary one."""
    probe = range(min(LAYOUT_PROBE_ROWS, len(videos)))
    nested = sum((root / videos[i]).exists() for i in probe)
    flat = sum((root / alts[i]).exists() for i in probe)
    if nested == 0 and flat == 0:
        raise DataError(f"{source}: none of the first {len(probe)} videos exist under {root} as "
                        f"{{page_dir}}/{{videoid}}.mp4 or {{videoid}}.mp4; check --video-root")
    if flat > nested:
        return alts, videos
    return videos, alts


def read_json_list(path, expected):
    """The non-empty JSON list in `path`; any problem is one DataError naming the file and
    `expected`, the shape of an entry."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected a list of {expected}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file ({e.strerror})") from None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{path}: expected a non-empty JSON list of {expected}")
    return entries


def read_json(path, video_root, paragraph=False, clean=None):
    """Read a JSON list of {"video", "caption"} entries (MSR-VTT / DiDeMo style)."""
    path = _check_file(path)
    root = _check_root(video_root, path)
    entries = read_json_list(path, '{"video": path, "caption": text or [texts]}')
    videos, captions, extra = [], [], []
    for i, e in enumerate(entries):
        if isinstance(e, dict) and "video" not in e and "image" in e:  # a still: a one-frame clip
            e = {"video": e["image"], **{k: v for k, v in e.items() if k != "image"}}
        if not isinstance(e, dict) or "video" not in e or "caption" not in e:
            raise DataError(f'{path}: entry {i} lacks "video" (or "image") or "caption"; every '
                            f'entry needs both')
        caps = e["caption"]
        caps = [caps] if isinstance(caps, str) else list(caps)
        if not caps or not all(isinstance(c, str) for c in caps):
            raise DataError(f'{path}: entry {i} ("{e["video"]}") has no caption text')
        if paragraph:
            caps = [" ".join(c.strip() for c in caps)]
        if clean:
            caps = [clean(c) for c in caps]
        videos.append(str(e["video"]))
        captions.append(caps)
        extra.append({k: v for k, v in e.items() if k not in ("video", "caption")})
    return Annotations(path, root, videos, captions, extra=extra)


def read_annotations(path, video_root, paragraph=False, clean=None):
    """A WebVid CSV (by its .csv suffix) or a JSON list, whichever `path` is."""
    if os.fspath(path).lower().endswith(".csv"):
        return read_webvid_csv(path, video_root, clean=clean)
    return read_json(path, video_root, paragraph=paragraph, clean=clean)
