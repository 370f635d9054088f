"""Annotation files: WebVid CSVs and MSR-VTT/DiDeMo-style JSON lists, read into one form.

An `Annotations` holds, for every video, its path under a video root and its captions; training
iterates over (video, caption) pairs. Strings are packed into numpy buffers (`StringColumn`) so a
10M-row corpus is a few flat arrays that forked loader workers share without copying.

WebVid CSV: columns `videoid, contentUrl, duration, page_dir, name`; the video is
`ROOT/{page_dir}/{videoid}.mp4` or `ROOT/{videoid}.mp4`, whichever exists. The layout is detected
on the first rows; each sample still tries the other layout when its file is not where expected.

Every other public format (MSR-VTT, DiDeMo, ActivityNet, UMT / Singularity lists, JSON Lines) is
detected from the file's content by `hvfm.data.sources.formats` and read by `read_annotations`.

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

from ..errors import DataError
from .formats import FORMATS, PARAGRAPH_FORMATS, candidates, detect, parse, stems

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

    @classmethod
    def from_parts(cls, buffer, offsets):
        col = cls.__new__(cls)
        col.buffer, col.offsets = buffer, offsets
        return col

    @property
    def nbytes(self):
        return self.buffer.nbytes + self.offsets.nbytes


class StringColumnBuilder:
    """Appends strings to one growing utf-8 buffer (no Python string per row is kept)."""

    def __init__(self):
        from array import array
        self._buffer, self._ends = bytearray(), array("q")

    def append(self, s):
        self._buffer += s.encode("utf-8")
        self._ends.append(len(self._buffer))

    def __len__(self):
        return len(self._ends)

    def build(self):
        offsets = np.zeros(len(self._ends) + 1, dtype=np.int64)
        offsets[1:] = np.frombuffer(self._ends, dtype=np.int64) if len(self._ends) else []
        return StringColumn.from_parts(np.frombuffer(bytes(self._buffer), dtype=np.uint8), offsets)


class Annotations:
    """Videos under one root, each with one or more captions.

    videos[i]       primary relative path of video i
    alt_videos[i]   other layout's relative path ("" when there is none)
    pair_video[j]   video index of training pair j;  pair_caption[j] its caption
    video_pairs     CSR offsets: the pairs of video i are video_pairs[i]:video_pairs[i+1]
    """

    def __init__(self, source, root, videos, captions, alt_videos=None, extra=None, dropped=0,
                 shard=None):
        self.source = str(source)
        self.root = Path(root)
        self.videos = _column(videos)
        self.alt_videos = _column(alt_videos if alt_videos is not None else [""] * len(videos))
        if isinstance(captions, StringColumn):  # one caption per video (a WebVid CSV)
            counts = np.ones(len(captions), dtype=np.int64)
            self.pair_caption = captions
        else:
            counts = np.array([len(c) for c in captions], dtype=np.int64)
            self.pair_caption = StringColumn([c for caps in captions for c in caps])
        self.video_pairs = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.pair_video = np.repeat(np.arange(len(self.videos), dtype=np.int64), counts)
        self.extra = extra or []
        self.dropped = dropped  # rows without a usable video id or caption, reported by the loader
        # (rank, world_size, rows): this object holds only the data rows i with i % world_size ==
        # rank of a file of `rows` data rows (a CSV read for one rank); None: all of it.
        self.shard = shard
        # what read_annotations found: the file's format (hvfm.data.sources.formats), the task, whether
        # sentences were joined into paragraphs, how many entries were merged into an earlier
        # entry of the same video, {way: count} of how the video files were found, a note
        self.format, self.task, self.paragraph, self.merged = None, "retrieval", False, 0
        self.found, self.note = {}, ""

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


def _column(strings):
    return strings if isinstance(strings, StringColumn) else StringColumn(strings)


def _size(path):
    """st_size of `path`; -1 when it does not exist, None when it cannot be stat-ed otherwise."""
    try:
        return os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return -1
    except OSError:
        return None


def check_root(root, source):
    if root is None:
        raise DataError(f"{source}: no video root given; pass --video-root DIR (the folder the "
                        f"annotation's video paths are relative to)")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{source}: video root {root} does not exist or is not a folder; "
                        f"pass --video-root DIR pointing at the videos")
    return root


def check_file(path):
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found; check the path")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: annotation file is empty; it needs at least one video")
    return path


def read_webvid_csv(path, video_root, clean=None, rank=0, world_size=1):
    """Read a WebVid CSV. `clean` maps a raw caption to the training caption (None: keep).

    With world_size > 1 only this rank's rows are kept: data rows i with i % world_size == rank
    (`Annotations.shard` says so, and `build_loader` then samples within them). The file is
    streamed row by row; only the videoid, page_dir and name columns of the kept rows are stored,
    appended to flat utf-8 buffers: a rank of a 10M-row run holds its own 10M / world_size rows
    as a few numpy arrays, never a Python object per row."""
    path = check_file(path)
    root = check_root(video_root, path)
    if not (isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"{path}: rank {rank!r} of world size {world_size!r} is not a valid shard")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark is dropped
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: annotation file is empty; it needs a header and rows")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_WEBVID_COLUMNS if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a WebVid CSV has the "
                            f"header {','.join(WEBVID_COLUMNS)}")
        i_vid, i_name = (header.index(c) for c in REQUIRED_WEBVID_COLUMNS)
        i_page = header.index("page_dir") if "page_dir" in header else None
        videos, alts, captions = StringColumnBuilder(), StringColumnBuilder(), StringColumnBuilder()
        rows = dropped = 0
        for row in reader:
            if not row:
                continue
            mine = rows % world_size == rank
            rows += 1
            if not mine:
                continue
            try:
                vid, name = row[i_vid].strip(), row[i_name].strip()
                page = row[i_page].strip() if i_page is not None else ""
            except IndexError:
                dropped += 1
                continue
            caption = clean(name) if clean else name
            if not vid or not caption:
                dropped += 1
                continue
            alts.append(f"{vid}.mp4")
            videos.append(f"{page}/{vid}.mp4" if page else f"{vid}.mp4")
            captions.append(caption)
    if not len(videos):
        which = f" of rank {rank} (rows i % {world_size} == {rank})" if world_size > 1 else ""
        raise DataError(f"{path}: no usable rows{which} (every row lacks a videoid or a caption)")
    videos, alts = _detect_layout(path, root, videos.build(), alts.build())
    return Annotations(path, root, videos, captions.build(), alts, dropped=dropped,
                       shard=(rank, world_size, rows) if world_size > 1 else None)


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


def read_annotations(path, video_root, paragraph=False, clean=None, rank=0, world_size=1,
                     split=None):
    """The annotation file `path` in whichever format its content is (`hvfm.data.sources.formats`): a
    WebVid CSV streamed (for one rank when world_size > 1, see `read_webvid_csv`), any other
    retrieval format read whole. The entries of one video become one video with all its
    sentences (`merged` counts the entries folded into an earlier one); the video files are found
    as the release names them (`find_videos`). `paragraph`: join each video's sentences into one
    (None: the format's protocol, paragraphs for DiDeMo and ActivityNet). `split`: the
    MSRVTT_data.json split (default test). A multiple-choice file is a DataError here (its reader
    is `hvfm.data.loading.evaluation.read_multiple_choice`)."""
    path = check_file(path)
    found = detect(path)
    if found.format == "webvid_csv":
        ann = read_webvid_csv(path, video_root, clean=clean, rank=rank, world_size=world_size)
        ann.format, ann.task, ann.paragraph = found.format, "retrieval", False
        return ann
    if found.task != "retrieval":
        raise DataError(f"{path}: a multiple-choice file ({found.description}); it is scored by "
                        f"python -m hvfm.evaluate as multiple choice, not read as video-text pairs")
    root = check_root(video_root, path)
    parsed = parse(path, found, split)
    if paragraph is None:
        paragraph = parsed.format in PARAGRAPH_FORMATS
    names, captions, extra = [], [], []
    where = {}
    for name, caps, ex in parsed.records:
        if name in where:
            captions[where[name]].extend(caps)
            continue
        where[name] = len(names)
        names.append(name)
        captions.append(list(caps))
        extra.append(ex)
    merged = len(parsed.records) - len(names)
    if paragraph:
        captions = [[" ".join(c.strip() for c in caps)] for caps in captions]
    if clean:
        captions = [[clean(c) for c in caps] for caps in captions]
    videos, ways = find_videos(root, names, parsed.naming)
    ann = Annotations(path, root, videos, captions, extra=extra)
    ann.format, ann.paragraph, ann.merged = parsed.format, bool(paragraph), merged
    ann.found, ann.note = ways, parsed.note
    return ann


def found_counts(ann):
    """"6 as videoNNNN.mp4, 1 not found": how `find_videos` found the files of `ann`."""
    return ", ".join(f"{n} as {way}" if way != "not found" else f"{n} not found"
                     for way, n in ann.found.items())


def describe(ann):
    """One line: the format `read_annotations` detected, what it read, the protocol and how the
    video files were found."""
    if ann.task == "multiple_choice":
        what, protocol = (f"{ann.num_videos} questions, {len(ann)} options",
                          "multiple choice (accuracy over the options)")
    else:
        what = (f"{ann.num_videos} videos, {len(ann)} captions, {ann.merged} entries merged into "
                f"an earlier entry of the same video")
        protocol = "paragraph-to-video retrieval" if ann.paragraph else "retrieval"
    note = f"; {ann.note}" if ann.note else ""
    files = f"; video files: {found_counts(ann)}" if ann.found else ""
    return f"{ann.format}, {FORMATS.get(ann.format, ann.format)}: {what}; {protocol}{note}{files}"


def find_videos(root, names, naming):
    """(relative path of each video, {way: count}): each name tried as `formats.candidates`
    lists, then under another extension (one listing of ROOT and ROOT/all); a video found
    nowhere keeps its first candidate (the evaluator reports it missing), counted "not found"."""
    root = Path(root)
    listing = None
    out, ways = [], {}
    for name in names:
        cands = candidates(name, naming)
        hit = next(((label, rel) for label, rel in cands if (root / rel).is_file()), None)
        if hit is None:
            if listing is None:
                listing = _stem_listing(root)
            for stem in stems(name, naming):
                for sub in ("", "all/"):
                    if sub + stem in listing:
                        rel = listing[sub + stem]
                        hit = (f"{sub}other extension ({Path(rel).suffix})", rel)
                        break
                if hit:
                    break
        label, rel = hit or ("not found", cands[0][1])
        ways[label] = ways.get(label, 0) + 1
        out.append(rel)
    return out, ways


def _stem_listing(root):
    """{"[all/]stem": relative path} of the files in ROOT and ROOT/all (the first of a stem)."""
    listing = {}
    for sub in ("", "all/"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and "." in entry.name:
                listing.setdefault(sub + entry.name.rsplit(".", 1)[0], sub + entry.name)
    return listing
