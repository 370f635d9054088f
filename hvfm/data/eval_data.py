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

Annotation files: retrieval files are read by `hvfm.data.read_annotations`; multiple-choice files
(`[{"video", "options": [...], "answer": index}]`, MSR-VTT MC style) by `read_multiple_choice`;
`detect_format` tells the two apart from the first entry's keys.
"""
from __future__ import annotations

import numpy as np
import torch

from .annotations import Annotations, check_file, check_root, read_json_list
from .dataset import Collator, VideoTextDataset, worker_init
from .decode import DecodeError
from .errors import DataError
from .text import clean_caption

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
    return Annotations(ann.source, ann.root, [ann.videos[v] for v in keep],
                       [ann.captions_of(v) for v in keep], [ann.alt_videos[v] for v in keep],
                       extra=[ann.extra[v] for v in keep] if ann.extra else [], dropped=ann.dropped)


def missing_videos(ann):
    """Indices of the videos whose file is under neither layout of the video root."""
    return [v for v in range(ann.num_videos) if not ann.resolve(v).exists()]


def _read_json_list(path):
    return read_json_list(path, '{"video", "caption"} or {"video", "options", "answer"} entries')


def read_multiple_choice(path, video_root, clean=clean_caption):
    """(Annotations whose captions are each question's options, answers) of a JSON list of
    {"video", "options": [text, ...], "answer": index}."""
    path = check_file(path)
    root = check_root(video_root, path)
    entries = _read_json_list(path)
    videos, options, answers, extra = [], [], [], []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not {"video", "options", "answer"} <= set(e):
            raise DataError(f'{path}: entry {i} lacks "video", "options" or "answer"; a multiple-'
                            f'choice entry needs all three')
        opts = e["options"]
        if not isinstance(opts, list) or len(opts) < 2 or not all(isinstance(o, str) for o in opts):
            raise DataError(f'{path}: entry {i} ("{e["video"]}"): "options" must be a list of at '
                            f'least two texts')
        a = e["answer"]
        if isinstance(a, bool) or not isinstance(a, int) or not 0 <= a < len(opts):
            raise DataError(f'{path}: entry {i} ("{e["video"]}"): "answer" must be an option '
                            f'index in [0, {len(opts)}), got {a!r}')
        videos.append(str(e["video"]))
        options.append([clean(o) if clean else o for o in opts])
        answers.append(a)
        extra.append({k: v for k, v in e.items() if k not in ("video", "options", "answer")})
    return Annotations(path, root, videos, options, extra=extra), np.array(answers, np.int64)


def detect_format(path):
    """"retrieval" or "mc" from the first entry's keys (a .csv is a WebVid retrieval file)."""
    path = check_file(path)
    if str(path).lower().endswith(".csv"):
        return "retrieval"
    first = _read_json_list(path)[0]
    if isinstance(first, dict) and "options" in first:
        return "mc"
    if isinstance(first, dict) and "caption" in first:
        return "retrieval"
    raise DataError(f'{path}: entry 0 has neither "caption" (retrieval) nor "options" (multiple '
                    f'choice); expected {{"video", "caption"}} or {{"video", "options", "answer"}}')
