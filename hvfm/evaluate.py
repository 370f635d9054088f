"""Zero-shot retrieval and temporal accuracy of a trained hvfm model (or a plain HF CLIP folder).

    python -m hvfm.evaluate --checkpoint DIR --ann test.json --video-root DIR [--frames N]
                            [--size S] [--dump-scores scores.npy]

Prints one JSON object: text-to-video and video-to-text R@1/5/10 (percent, as the literature
reports them), median and mean rank, and -- when the annotation has "group" keys, as the synthetic
test split does -- temporal accuracy: among the clips of a group (the same objects, every motion
or order), how often a caption's own clip scores highest. Ties count against the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import DataError, build_loader, read_annotations, tokenize  # noqa: E402
from hvfm.data.annotations import Annotations  # noqa: E402
from hvfm.data.text import clean_caption  # noqa: E402


def ranks(scores, correct):
    """Rank (1 = best) of each row's best correct column; ties count against: rank = 1 + the
    number of wrong columns scoring at least as high as the best correct one."""
    scores = np.asarray(scores, dtype=np.float64)
    best = np.where(correct, scores, -np.inf).max(1, keepdims=True)
    return 1 + ((scores >= best) & ~correct).sum(1)


def recall_metrics(r, prefix):
    return {**{f"{prefix}_r{k}": float(100.0 * np.mean(r <= k)) for k in (1, 5, 10)},
            f"{prefix}_medr": float(np.median(r)), f"{prefix}_meanr": float(np.mean(r))}


def retrieval_metrics(scores, text_video):
    """scores (n_text, n_video); text_video[i] the video of caption i. A video-to-text query
    counts a hit when any of its captions ranks high enough."""
    scores = np.asarray(scores)
    text_video = np.asarray(text_video)
    correct = text_video[:, None] == np.arange(scores.shape[1])[None, :]
    return {**recall_metrics(ranks(scores, correct), "t2v"),
            **recall_metrics(ranks(scores.T, correct.T), "v2t")}


def temporal_accuracy(scores, text_video, groups, kinds=None):
    """Within each group of videos, the fraction of captions whose own video scores highest
    (strictly: a tie is a miss). Returns overall and per-kind accuracy and the chance level."""
    scores, text_video, groups = np.asarray(scores), np.asarray(text_video), np.asarray(groups)
    hits, chance, per_kind = [], [], {}
    for i, v in enumerate(text_video):
        members = np.nonzero(groups == groups[v])[0]
        others = members[members != v]
        hit = bool(len(others) == 0 or scores[i, v] > scores[i, others].max())
        hits.append(hit)
        chance.append(1.0 / len(members))
        if kinds is not None:
            per_kind.setdefault(kinds[v], []).append(hit)
    out = {"temporal_acc": float(np.mean(hits)), "temporal_chance": float(np.mean(chance))}
    for kind, h in sorted(per_kind.items()):
        out[f"temporal_acc_{kind}"] = float(np.mean(h))
    return out


def _video_view(ann):
    """One item per video (its first caption), for encoding each video exactly once."""
    return Annotations(ann.source, ann.root, list(ann.videos),
                       [[ann.pair_caption[ann.video_pairs[i]]] for i in range(ann.num_videos)],
                       list(ann.alt_videos), extra=ann.extra)


@torch.no_grad()
def score_matrix(model, tokenizer, ann, frames=8, size=96, batch_size=32, workers=0,
                 drop_ratio=None, progress=False, dtype=torch.float32):
    """(n_captions, n_videos) cosine similarities, rows and columns in annotation order."""
    from tqdm import tqdm

    model.eval()
    missing = [str(ann.resolve(i)) for i in range(ann.num_videos) if not ann.resolve(i).exists()]
    if missing:
        raise DataError(f"{ann.source}: {len(missing)} video(s) missing under {ann.root}, "
                        f"first: {missing[0]}; check --video-root")
    loader = build_loader(_video_view(ann), tokenizer, batch_size=batch_size, frames=frames,
                          size=size, train=False, num_workers=workers, max_retries=0)
    videos, rng = [], np.random.default_rng(0)
    for batch in tqdm(loader, desc="videos", disable=not progress, leave=False):
        pixels = batch["pixels"].to(dtype)
        videos.append(model.encode_video(pixels, batch["num_frames"], drop_ratio, rng).float().cpu())
    captions = list(ann.pair_caption)
    texts = []
    for s in range(0, len(captions), batch_size):
        ids, attn, _ = tokenize(tokenizer, captions[s:s + batch_size])
        texts.append(model.encode_text(ids, attn).float().cpu())
    return (torch.cat(texts) @ torch.cat(videos).T).numpy()


def evaluate(model, tokenizer, ann, frames=8, size=96, batch_size=32, workers=0, drop_ratio=None,
             progress=False, dump_scores=None, dtype=torch.float32):
    scores = score_matrix(model, tokenizer, ann, frames, size, batch_size, workers, drop_ratio,
                          progress, dtype)
    if dump_scores:
        np.save(dump_scores, scores)
    metrics = retrieval_metrics(scores, ann.pair_video)
    if ann.extra and all("group" in e for e in ann.extra):
        metrics.update(temporal_accuracy(scores, ann.pair_video, [e["group"] for e in ann.extra],
                                         [e.get("kind", "all") for e in ann.extra]))
    metrics.update(frames=frames, videos=ann.num_videos, captions=len(ann))
    return metrics


def load_checkpoint(path, attn="sdpa"):
    """(model, tokenizer, kind) from an `OUTPUT_DIR/final` export or a plain HF CLIP folder (image
    CLIP applied to frames, with a fresh fusion encoder that retrieval does not use)."""
    from hvfm.model import VideoLanguageModel, add_mask_token, load_clip
    from hvfm.export import is_export, load_export

    path = Path(path)
    if is_export(path):
        model, tokenizer = load_export(path, attn=attn)
        return model, tokenizer, "hvfm"
    try:
        clip, tokenizer = load_clip(str(path))
    except ValueError as e:
        raise DataError(f"{path}: not an hvfm export nor a CLIP folder ({e})") from None
    add_mask_token(clip, tokenizer)
    return VideoLanguageModel.from_clip(clip, tokenizer, attn=attn), tokenizer, "clip"


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvfm.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="OUTPUT_DIR/final or an HF CLIP folder")
    ap.add_argument("--ann", required=True, help='JSON list of {"video", "caption"}')
    ap.add_argument("--video-root", required=True)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=None, help="frame side (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eval-drop-ratio", default=None, help="drop patches at test time too")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--dump-scores", help="save the caption-by-video score matrix (.npy)")
    args = ap.parse_args(argv)
    try:
        model, tokenizer, kind = load_checkpoint(args.checkpoint, args.attn)
        ann = read_annotations(args.ann, args.video_root, clean=clean_caption)
        size = args.size or model.video.image_size
        metrics = evaluate(model, tokenizer, ann, args.frames, size, args.batch_size, args.workers,
                           args.eval_drop_ratio, progress=True, dump_scores=args.dump_scores)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    metrics.update(checkpoint=str(args.checkpoint), kind=kind, ann=str(args.ann))
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
