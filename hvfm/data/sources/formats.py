"""The benchmarks' annotation files as their releases ship them, detected from the file's content.

`detect(path)` names the one format a file fits (a DataError naming the formats when it fits none
or two); `parse(path, detected, split)` turns it into plain records, one per entry of the file:
retrieval `(video name, [sentences], extra)`, multiple choice `(video name, [options], answer,
extra)`. Turning records into `Annotations` (merging the sentences of one video into one gallery
entry, finding the video files) is `hvfm.data.sources.annotations.read_annotations`'s work; the WebVid
CSV is streamed by `read_webvid_csv` and only detected here.

Formats (name: file users have, where it comes from):
- webvid_csv: WebVid `results_*.csv` (`videoid, contentUrl, duration, page_dir, name`), with or
  without a UTF-8 byte-order mark.
- msrvtt_csv: `MSRVTT_JSFUSION_test.csv` (`key,vid_key,video_id,sentence`: the 1k-A test, 1,000
  pairs; CLIP4Clip's msrvtt_data, Frozen-in-Time), or any CSV with `video_id,sentence`.
- msrvtt_split_csv: `MSRVTT_train.9k.csv` / `MSRVTT_train.7k.csv` (`video_id` only): the
  sentences come from `MSRVTT_data.json` beside it, all of a video's sentences with it.
- msrvtt_json: `MSRVTT_data.json` (`info`, `videos` with `split`, `sentences`), one split.
- list: a JSON list of `{"video", "caption": text | [texts]}` (hvfm's own; UMT, Singularity and
  VINDLU's `*_ret_*.json`), one entry per video or per sentence.
- list_mc: a JSON list of `{"video", "options" | "caption": [texts], "answer": index}` (hvfm's
  own; UMT / Singularity / VINDLU `msrvtt_mc_test.json`): multiple choice.
- didemo: DiDeMo's LocalizingMoments `train_data.json` / `val_data.json` / `test_data.json`
  (`annotation_id, description, video, times, ...`; one entry per moment).
- activitynet: ActivityNet Captions `train.json` / `val_1.json` / `val_2.json`
  (`{"v_ID": {"duration", "timestamps", "sentences"}}`).
- jsonl: JSON Lines, one object per line (ClipBERT's `*.jsonl`: `clip_name` or `video`,
  `caption` / `sentence`, or `options` + `answer` for multiple choice).

Video naming schemes ("naming" of a parse): "path" (the name as listed; `NAME.mp4` for a bare
name), "msrvtt" (`videoNNNN.mp4`), "didemo" (the name with its own extension), "activitynet"
(`v_ID.mp4` or `ID.mp4`).
"""
from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError

FORMATS = {
    "webvid_csv": "WebVid CSV (videoid, name, ...)",
    "msrvtt_csv": "MSR-VTT sentence CSV (MSRVTT_JSFUSION_test.csv: key,vid_key,video_id,sentence)",
    "msrvtt_split_csv": "MSR-VTT split CSV (MSRVTT_train.9k.csv / 7k: video_id; sentences from "
                        "MSRVTT_data.json beside it)",
    "msrvtt_json": "MSR-VTT MSRVTT_data.json (info, videos with split, sentences)",
    "list": 'JSON list of {"video", "caption"} (hvfm, UMT, Singularity, VINDLU retrieval)',
    "list_mc": 'JSON list of {"video", "options" or "caption": [...], "answer"} (multiple choice)',
    "didemo": "DiDeMo LocalizingMoments JSON (description, video, times)",
    "activitynet": 'ActivityNet Captions dict ({"v_ID": {"duration", "timestamps", "sentences"}})',
    "jsonl": "JSON Lines (ClipBERT style: clip_name or video, caption or options + answer)",
}
# DiDeMo and ActivityNet are scored paragraph-to-video in the literature (the sentences joined)
PARAGRAPH_FORMATS = ("didemo", "activitynet")
MSRVTT_SPLITS = ("train", "validate", "test")
MSRVTT_DATA = "MSRVTT_data.json"
_VIDEO_KEYS = ("video", "clip_name", "video_id")  # JSON Lines aliases, in this order
_CAPTION_KEYS = ("caption", "sentence")


@dataclass
class Detected:
    """What `detect` found: the format's name, the task, and the decoded content."""
    format: str
    task: str  # "retrieval" or "multiple_choice"
    content: object = None  # parsed JSON, the JSON Lines objects, or the CSV header

    @property
    def description(self):
        return FORMATS[self.format]


@dataclass
class Parsed:
    """Records of one file. `records`: retrieval (name, [sentences], extra) or multiple choice
    (name, [options], answer, extra), one per entry, in file order."""
    format: str
    task: str
    naming: str
    records: list = field(default_factory=list)
    note: str = ""


def format_names():
    return ", ".join(FORMATS)


def read_text(path):
    """The file's text, a UTF-8 byte-order mark dropped."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); annotation files "
                        f"are UTF-8 JSON, JSON Lines or CSV") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file ({e.strerror})") from None


def _fits(path, fits, what):
    """The one format in `fits`, else one error line naming the formats."""
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise DataError(f"{path}: fits none of the annotation formats ({what}); hvfm reads "
                        f"{format_names()}")
    raise DataError(f"{path}: fits {len(fits)} formats at once, {' and '.join(fits)} ({what}); "
                    f"keep the keys of one")


def _entry_fits(e):
    """Formats a JSON list entry (or a JSON Lines object, with its aliases) fits."""
    if not isinstance(e, dict):
        return []
    fits = []
    has_video = any(k in e for k in ("video", "image"))
    if has_video and "caption" in e and "answer" not in e:
        fits.append("list")
    if "video" in e and "answer" in e and ("options" in e or isinstance(e.get("caption"), list)):
        fits.append("list_mc")
    if "video" in e and "description" in e:
        fits.append("didemo")
    return fits


def _keys(e):
    return ", ".join(map(str, list(e)[:8])) if isinstance(e, dict) else type(e).__name__


def _jsonl_entry(e):
    """A JSON Lines object as a list entry: `clip_name` / `video_id` -> "video", `sentence` ->
    "caption"."""
    if not isinstance(e, dict):
        return e
    out = dict(e)
    if "video" not in out:
        for k in _VIDEO_KEYS[1:]:
            if k in out:
                out["video"] = out.pop(k)
                break
    if "caption" not in out and "sentence" in out:
        out["caption"] = out.pop("sentence")
    return out


def _head(path, size=1 << 16):
    """The file's first `size` bytes as text (a byte-order mark dropped): a CSV is detected from
    its header alone, never read whole here (a WebVid CSV has millions of rows)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(size)
    except OSError as e:
        raise DataError(f"{path}: cannot read the annotation file ({e.strerror})") from None
    return raw.decode("utf-8-sig", errors="replace")


def detect(path):
    """The format `path` fits, from its content (not its name)."""
    head = _head(path).lstrip()
    if not head:
        raise DataError(f"{path}: annotation file is empty; it needs at least one video")
    if head[0] in "[{":
        text = read_text(path)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            if head[0] == "{" and e.msg == "Extra data":  # several objects: JSON Lines
                return _detect_jsonl(path, text)
            raise DataError(f"{path}: not valid JSON ({e}); expected one of {format_names()}") \
                from None
        if isinstance(obj, list):
            if not obj:
                raise DataError(f"{path}: expected a non-empty JSON list of entries")
            fmt = _fits(path, _entry_fits(obj[0]), f"a JSON list whose entry 0 has {_keys(obj[0])}")
            return Detected(fmt, "multiple_choice" if fmt == "list_mc" else "retrieval", obj)
        fits = []
        if "videos" in obj and "sentences" in obj:
            fits.append("msrvtt_json")
        values = list(obj.values())[:4]
        if values and all(isinstance(v, dict) and "sentences" in v for v in values):
            fits.append("activitynet")
        fmt = _fits(path, fits, f"a JSON object with keys {_keys(obj)}")
        return Detected(fmt, "retrieval", obj)
    header = next(csv.reader(io.StringIO(head.splitlines()[0])), [])
    header = [h.strip() for h in header]
    fits = []
    if "videoid" in header:
        fits.append("webvid_csv")
    if "video_id" in header:
        fits.append("msrvtt_split_csv" if "sentence" not in header else "msrvtt_csv")
    return Detected(_fits(path, fits, f"a CSV with header {','.join(header)[:120]}"), "retrieval",
                    header)


def _detect_jsonl(path, text):
    lines = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            lines.append(_jsonl_entry(json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); a JSON Lines file "
                            f"holds one object per line") from None
    fits = [f for f in _entry_fits(lines[0]) if f != "didemo"]
    kind = _fits(path, fits, f"JSON Lines whose line 1 has {_keys(lines[0])}")
    return Detected("jsonl", "multiple_choice" if kind == "list_mc" else "retrieval", lines)


# ---------------------------------------------------------------------------- parsing

def _texts(path, i, name, caps, what="caption"):
    caps = [caps] if isinstance(caps, str) else caps
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise DataError(f'{path}: entry {i} ("{name}") has no {what} text')
    return list(caps)


def _list_records(path, entries, naming="path"):
    records = []
    for i, e in enumerate(entries):
        if isinstance(e, dict) and "video" not in e and "image" in e:  # a still: a one-frame clip
            e = {"video": e["image"], **{k: v for k, v in e.items() if k != "image"}}
        if not isinstance(e, dict) or "video" not in e or "caption" not in e:
            raise DataError(f'{path}: entry {i} lacks "video" (or "image") or "caption"; every '
                            f'entry needs both')
        if "answer" in e:
            raise DataError(f'{path}: entry {i} ("{e["video"]}") has an "answer" but entry 0 has '
                            f'none; a file is either retrieval or multiple choice')
        records.append((str(e["video"]), _texts(path, i, e["video"], e["caption"]),
                        {k: v for k, v in e.items() if k not in ("video", "caption")}))
    return records


def _mc_records(path, entries):
    records = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "video" not in e or "answer" not in e or \
                not ("options" in e or "caption" in e):
            raise DataError(f'{path}: entry {i} lacks "video", "options" (or a "caption" list) or '
                            f'"answer"; a multiple-choice entry needs all three')
        key = "options" if "options" in e else "caption"
        opts = e[key]
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
            raise DataError(f'{path}: entry {i} ("{e["video"]}"): "{key}" must be a list of at '
                            f'least two texts (the options)')
        a = e["answer"]
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(opts):
            raise DataError(f'{path}: entry {i} ("{e["video"]}"): "answer" must be an option '
                            f'index in [0, {len(opts)}), got {a!r}')
        records.append((str(e["video"]), list(opts), a,
                        {k: v for k, v in e.items() if k not in ("video", key, "answer")}))
    return records


def _csv_rows(path, text):
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(text))
    reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
    return [r for r in reader if any((v or "").strip() for v in r.values() if isinstance(v, str))]


def _msrvtt_sentences(path):
    """{video_id: [sentences]} and {video_id: split} of an MSRVTT_data.json (file order)."""
    text = read_text(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e}); expected MSR-VTT's {MSRVTT_DATA}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("videos"), list) or \
            not isinstance(obj.get("sentences"), list):
        raise DataError(f'{path}: expected MSR-VTT\'s {MSRVTT_DATA} ("videos" and "sentences" '
                        f'lists)')
    splits = {}
    for i, v in enumerate(obj["videos"]):
        if not isinstance(v, dict) or "video_id" not in v:
            raise DataError(f'{path}: videos[{i}] has no "video_id"')
        splits[str(v["video_id"])] = str(v.get("split", ""))
    sentences = {}
    for i, s in enumerate(obj["sentences"]):
        if not isinstance(s, dict) or "video_id" not in s or not isinstance(s.get("caption"), str):
            raise DataError(f'{path}: sentences[{i}] lacks "video_id" or a "caption" text')
        sentences.setdefault(str(s["video_id"]), []).append(s["caption"])
    return sentences, splits


def parse(path, detected, split=None):
    """`Parsed` records of a file `detect` recognised (any but webvid_csv). `split`: the
    MSRVTT_data.json split (default test)."""
    fmt, content = detected.format, detected.content
    if fmt == "list":
        return Parsed(fmt, "retrieval", "path", _list_records(path, content))
    if fmt == "list_mc":
        return Parsed(fmt, "multiple_choice", "path", _mc_records(path, content))
    if fmt == "jsonl":
        if detected.task == "multiple_choice":
            return Parsed(fmt, detected.task, "path", _mc_records(path, content))
        return Parsed(fmt, "retrieval", "path", _list_records(path, content))
    if fmt == "didemo":
        records = []
        for i, e in enumerate(content):
            if not isinstance(e, dict) or "video" not in e or "description" not in e:
                raise DataError(f'{path}: entry {i} lacks "video" or "description"; every DiDeMo '
                                f'moment needs both')
            records.append((str(e["video"]), _texts(path, i, e["video"], e["description"],
                                                    "description"),
                            {k: e[k] for k in ("annotation_id", "times") if k in e}))
        return Parsed(fmt, "retrieval", "didemo", records)
    if fmt == "activitynet":
        records = []
        for i, (vid, v) in enumerate(content.items()):
            if not isinstance(v, dict) or "sentences" not in v:
                raise DataError(f'{path}: "{vid}" has no "sentences"; an ActivityNet Captions '
                                f'entry is {{"duration", "timestamps", "sentences"}}')
            records.append((str(vid), [s.strip() for s in _texts(path, i, vid, v["sentences"],
                                                                  "sentence")],
                            {k: v[k] for k in ("duration", "timestamps") if k in v}))
        return Parsed(fmt, "retrieval", "activitynet", records)
    if fmt == "msrvtt_json":
        split = split or "test"
        sentences, splits = _msrvtt_sentences(path)
        ids = [v for v, s in splits.items() if s == split]
        if not ids:
            have = sorted(set(splits.values()))
            raise DataError(f"{path}: no video of split {split!r}; its splits are "
                            f"{', '.join(have) or 'none'}; pass --split one of them")
        missing = [v for v in ids if v not in sentences]
        if missing:
            raise DataError(f"{path}: video {missing[0]} of split {split} has no sentence "
                            f"({len(missing)} such)")
        # one record per sentence, as the file lists them: merged into one video each later
        return Parsed(fmt, "retrieval", "msrvtt", [(v, [c], {}) for v in ids for c in sentences[v]],
                      note=f"split {split}: {len(ids)} of {len(splits)} videos")
    text = read_text(path)
    rows = _csv_rows(path, text)
    if not rows:
        raise DataError(f"{path}: no rows under the header")
    if fmt == "msrvtt_csv":
        records = []
        for i, r in enumerate(rows):
            vid, sent = (r.get("video_id") or "").strip(), r.get("sentence")
            if not vid or not isinstance(sent, str) or not sent.strip():
                raise DataError(f"{path}: row {i + 1} lacks a video_id or a sentence")
            records.append((vid, [sent.strip()], {k: r[k] for k in ("key", "vid_key") if k in r}))
        return Parsed(fmt, "retrieval", "msrvtt", records,
                      note=f"{len(records)} pairs (MSRVTT_JSFUSION_test.csv, the 1k-A test: 1,000)")
    if fmt == "msrvtt_split_csv":
        data = Path(path).parent / MSRVTT_DATA
        if not data.is_file():
            raise DataError(f"{path}: lists only video ids; their sentences are in {MSRVTT_DATA}, "
                            f"expected beside it at {data} (CLIP4Clip's msrvtt_data has both)")
        sentences, _ = _msrvtt_sentences(data)
        records = []
        for i, r in enumerate(rows):
            vid = (r.get("video_id") or "").strip()
            if vid not in sentences:
                raise DataError(f"{path}: row {i + 1}: video {vid!r} has no sentence in {data}")
            records.append((vid, sentences[vid], {}))
        return Parsed(fmt, "retrieval", "msrvtt", records,
                      note=f"sentences from {data}")
    raise DataError(f"{path}: format {fmt} is not read by records")  # webvid_csv: streamed


def candidates(name, naming):
    """[(label, relative path)] of where a video named `name` may be, in the order tried; each is
    also tried under all/ (Frozen-in-Time keeps MSR-VTT's videos in videos/all)."""
    suffix = Path(name).suffix
    if naming == "activitynet":
        vid = name[2:] if name.startswith("v_") else name
        base = [("v_ID.mp4", f"v_{vid}.mp4"), ("ID.mp4", f"{vid}.mp4")]
    elif naming == "msrvtt":
        base = [("listed name", name)] if suffix else [("videoNNNN.mp4", f"{name}.mp4")]
    elif naming == "didemo":
        base = [("listed name (own extension)", name), ("NAME.ext.mp4", f"{name}.mp4")]
        if suffix and suffix.lower() != ".mp4":
            base.append(("NAME.mp4", str(Path(name).with_suffix(".mp4"))))
    else:
        base = [("listed name", name)] if suffix else [("NAME.mp4", f"{name}.mp4")]
    return base + [(f"all/{label}", f"all/{rel}") for label, rel in base]


def stems(name, naming):
    """File stems (the name without its extension) a video may have under another extension."""
    out = [name, str(Path(name).with_suffix(""))]
    if naming == "activitynet":
        vid = name[2:] if name.startswith("v_") else name
        out = [f"v_{vid}", vid]
    return list(dict.fromkeys(out))
