"""Evaluation data: clips of whole videos in annotation order, and the evaluation annotation files.

The clips go through training's own code: `VideoTextDataset` (decode, sample the evaluation
frames, resize and centre-crop) and `Collator` (stack, zero-pad, the batch keys the model step
reads), so a change to how training loads and batches clips applies to evaluation too. What
evaluation adds:
- one item per video (training iterates over (video, caption) pairs);
- a video that does not decode is not replaced by another sample: it travels with the batch as
  {video index: (path, reason)} under "failed", so the evaluator can exclude it and say so;
- the batch also lists the video indices it holds ("videos"); a batch whose clips all failed has
  "videos" == [] and "pixels" None.

Annotation files: `read_eval_annotations` reads any of them, the format detected from the content
(`hvfm.data.sources.formats`): retrieval files by `hvfm.data.read_annotations`, multiple-choice files
(`[{"video", "options" | "caption": [...], "answer": index}]`, MSR-VTT MC) by
`read_multiple_choice`.
"""
from __future__ import annotations

import numpy as np
import torch

from ..sources.annotations import Annotations, check_file, check_root, find_videos, read_annotations
from .dataset import Collator, VideoTextDataset, worker_init
from ..decode import DecodeError
from ..errors import DataError
from ..sources.formats import detect, parse
from ..text.tokens import clean_caption

LOADER_TIMEOUT = 300  # seconds without a batch from the workers before the loader gives up


class EvalClipDataset(VideoTextDataset):
    """Evaluation clips of the videos `videos` (indices into `ann`), one item per video: F frames
    at the segment middles, resized and centre-cropped by training's dataset (train=False). A
    video that does not decode comes back as {"video", "error": (path, reason)}, not replaced."""

    def __init__(self, ann, videos, frames, size, decoder="auto"):
        super().__init__(ann, frames, size, train=False, max_retries=0, decoder=decoder)
        self.videos = [int(v) for v in videos]
        empty = [v for v in self.videos if ann.video_pairs[v] == ann.video_pairs[v + 1]]
        if empty:
            raise DataError(f"{ann.source}: video {ann.videos[empty[0]]} has no caption; every "
                            f"entry needs at least one")
        self._failure = None

    def __len__(self):
        return len(self.videos)

    def _load(self, *args, **kwargs):
        try:
            return super()._load(*args, **kwargs)
        except DecodeError as e:  # remembered for __getitem__: the base class reports it as a DataError
            self._failure = e
            raise

    def __getitem__(self, k):
        v = self.videos[k]
        self._failure = None
        try:  # the video's first pair: its pixels, and a caption the collate can tokenise
            item = super().__getitem__((int(self.ann.video_pairs[v]), 0))
        except DataError:
            if self._failure is None:
                raise
            return {"video": v, "error": (self._failure.path, self._failure.reason)}
        return {**item, "video": v, "error": None}


# Kept for the name evaluation code used before the move (hvfm.evaluate.ClipDataset).
ClipDataset = EvalClipDataset


class EvalCollator:
    """Training's `Collator` (no MLM masking) on the clips that decoded, plus "videos" (their
    video indices, in order) and "failed" ({video: (path, reason)} of the others)."""

    def __init__(self, tokenizer, device_transform=None):
        # uint8 frames + crop rows for a GPU (transform.prepare_batch); on a CPU-only machine the
        # workers finish the pixels themselves
        if device_transform is None:
            device_transform = torch.cuda.is_available()
        self.collate = Collator(tokenizer, mask_ratio=0.0, device_transform=device_transform)

    def __call__(self, samples):
        good = [s for s in samples if s["error"] is None]
        failed = {s["video"]: s["error"] for s in samples if s["error"] is not None}
        if not good:
            return {"videos": [], "pixels": None, "num_frames": None, "failed": failed}
        return {**self.collate(good), "videos": [s["video"] for s in good], "failed": failed}


def clip_batches(ann, videos, frames, size, batch_size, workers, tokenizer):
    """Batches of `videos` (indices into `ann`), in order, as `EvalCollator` makes them."""
    ds = EvalClipDataset(ann, videos, frames, size)
    if len(ds) == 0:
        return iter(())
    return iter(torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=workers,
        pin_memory=torch.cuda.is_available(), collate_fn=EvalCollator(tokenizer), worker_init_fn=worker_init if workers else None,
        timeout=LOADER_TIMEOUT if workers else 0))


# ---------------------------------------------------------------------------- annotations

def subset_annotations(ann, keep):
    """The annotation restricted to the videos `keep` (sorted indices), captions in order."""
    keep = [int(v) for v in keep]
    out = Annotations(ann.source, ann.root, [ann.videos[v] for v in keep],
                      [ann.captions_of(v) for v in keep], [ann.alt_videos[v] for v in keep],
                      extra=[ann.extra[v] for v in keep] if ann.extra else [], dropped=ann.dropped)
    for k in ("format", "task", "paragraph", "merged", "found", "note"):
        setattr(out, k, getattr(ann, k))
    return out


def missing_videos(ann):
    """Indices of the videos whose file is under neither layout of the video root."""
    return [v for v in range(ann.num_videos) if not ann.resolve(v).exists()]


def read_multiple_choice(path, video_root, clean=clean_caption):
    """(Annotations whose captions are each question's options, answers) of a multiple-choice
    file: a JSON list (or JSON Lines) of {"video", "options": [text, ...], "answer": index}, or
    UMT / Singularity's {"video", "caption": [options], "answer"}. Video names are found as the
    list names them (`NAME.mp4` for a bare name, also under all/)."""
    path = check_file(path)
    root = check_root(video_root, path)
    found = detect(path)
    if found.task != "multiple_choice":
        raise DataError(f"{path}: {found.description} is a retrieval file, not multiple choice")
    parsed = parse(path, found)
    names = [r[0] for r in parsed.records]
    videos, ways = find_videos(root, names, parsed.naming)
    options = [[clean(o) if clean else o for o in r[1]] for r in parsed.records]
    ann = Annotations(path, root, videos, options, extra=[r[3] for r in parsed.records])
    ann.format, ann.task, ann.found = parsed.format, "multiple_choice", ways
    return ann, np.array([r[2] for r in parsed.records], np.int64)


def read_eval_annotations(path, video_root, paragraph=None, split=None, clean=clean_caption):
    """(Annotations, answers) of any evaluation file, its format detected from its content:
    answers None for retrieval, the right option of each question for multiple choice.
    `paragraph` None: the format's protocol (paragraph-to-video for DiDeMo and ActivityNet)."""
    if detect(check_file(path)).task == "multiple_choice":
        return read_multiple_choice(path, video_root, clean=clean)
    return read_annotations(path, video_root, paragraph=paragraph, clean=clean, split=split), None


def detect_format(path):
    """"retrieval" or "mc", from the file's content (`hvfm.data.sources.formats.detect`)."""
    return "mc" if detect(check_file(path)).task == "multiple_choice" else "retrieval"
