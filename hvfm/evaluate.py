"""Zero-shot retrieval and multiple-choice evaluation of hvfm exports, DeepSpeed checkpoints and CLIP.

Retrieval, multiple choice and temporal accuracy, computed the way the video-language literature
reports them.

    python -m hvfm.evaluate --checkpoint CKPT --ann test.json --video-root DIR [--frames 8]
        [--pool auto|joint|mean] [--paragraph | --no-paragraph] [--split S]
        [--rerank-k K [--rerank-score sum|prob|logit]]
        [--dsl [--dsl-temp 100]]
        [--mc-by sim|vtm] [--eval-drop-ratio R --views N --seed S]
        [--merge-with-clip ALPHA [--clip DIR]] [--tag TAG] [--dump-scores scores.npy]
        [--bootstrap 1000] [--table]

CKPT: an export (OUTPUT_DIR/final), a DeepSpeed checkpoint folder of any ZeRO stage
(OUTPUT_DIR/checkpoints, or one tag folder in it; consolidated to fp32 in process), a run folder
OUTPUT_DIR (its final/, else its checkpoints/), or an HF `CLIPModel` folder: image CLIP, the
baseline users compare against. `--pool mean` (the default for a CLIP folder) encodes every frame
as an image and averages the normalised frame embeddings (CLIP4Clip's zero-shot mean pooling);
`--pool joint` (the default for hvfm models) encodes all frames' patches in one sequence, as hvfm
trains (a CLIP folder then has a zero temporal embedding).

The annotation file's format is detected from its content (`hvfm.data.sources.formats`) and named in one
line on stderr: MSR-VTT's JSFUSION / 9k / 7k CSVs and MSRVTT_data.json (`--split`, default test),
UMT / Singularity / VINDLU lists (retrieval, or multiple choice with "answer"), DiDeMo's
LocalizingMoments JSON, ActivityNet Captions' dict, JSON Lines, WebVid CSVs; hvfm's own lists:
- retrieval: `[{"video", "caption"}]`; a caption list is several captions of the video (a
  video-to-text query counts a hit when any of them ranks high enough), or with `--paragraph`
  one paragraph (the list joined with spaces). Entries of one video are merged into one gallery
  entry (`merged` in the output). DiDeMo and ActivityNet files are scored paragraph-to-video by
  default (`--no-paragraph`: each sentence).
- multiple choice: `[{"video", "options": [...], "answer": index}]` (MSR-VTT MC style), scored as
  accuracy over the options, never as retrieval.
A file that fits no format, or two, fails in one line naming the formats. Video files are found
as the releases name them (videoNNNN.mp4, DiDeMo's own extensions, v_ID.mp4 or ID.mp4, also
under all/); one warning line counts each way when they were found in more than one.

Scores. Similarity = cosine of the L2-normalised projected embeddings, averaged over `--views`
random patch drops when `--eval-drop-ratio` is given (each view seeded from --seed, the view and
the batch). Then, in this order:
- `--dsl` dual softmax (CAMoE's DSL): with S the (texts x videos) similarity and T = --dsl-temp,
  text-to-video ranks S * softmax(T * S, axis=texts) and video-to-text ranks
  S * softmax(T * S, axis=videos), the softmax taken independently per column / row. It uses the
  whole query set at once (transductive), as the papers that report it do.
- `--rerank-k K` re-ranking: for each text, its K best videos by the current score are scored by
  the VTM head through the fusion encoder, by default (`--rerank-score sum`) its log-odds
  logit_match - logit_nomatch plus the VTC logit (the model's logit scale x the cosine), so
  that VTM adds its evidence to the similarity's instead of replacing it: where VTM cannot tell
  candidates apart the similarity's order stands (`prob`: the match probability alone, `logit`:
  the log-odds alone) and placed above every other video, in that order; the
  rest keep their order. Likewise the K best texts of each video for video-to-text. VTM encodes
  the video once per re-rank pass with the first view's patches.
`--merge-with-clip ALPHA` first interpolates the weights with the original CLIP (`--clip DIR`,
default: the run's --clip, else OUTPUT_DIR/init_clip): theta = ALPHA * theta_clip +
(1 - ALPHA) * theta_post for every parameter CLIP has (see hvfm.load.merge_with_clip).

Metrics: R@1/5/10 in percent, median and mean rank; ties count against the model (rank = 1 + the
number of wrong candidates scoring at least as high as the best correct one). Multiple choice:
the option with the highest score (similarity or VTM match probability) is picked; a k-way tie at
the top earns 1/k. When the annotation has "group" keys (the synthetic test split), temporal
accuracy: within a group (same objects, every motion or order), how often a caption's own clip
scores highest (ties earn fractional credit). Per kind K of group (the "kind" key: motion,
order), `K_acc` with `K_ci`, its 95% percentile bootstrap interval over groups (`--bootstrap`
resamples of whole groups, seed 0), and the diagnostics that say which tower is blind (see
`hvfm.metrics.time_diagnostics`), all on the raw similarities: `K_caption_spread`, the mean
pairwise cosine distance of a group's captions (text tower: ~0 when the captions of a group map
to one point); `K_v2t_in_group` (and its chance), how often a clip's own caption is the most
similar among its group's; `K_probe_acc` (and its chance), a linear probe (ridge least squares)
of the clip's variant on the video embeddings, trained on half the groups and tested on the
others. The variant label is the rank of the clip's caption among its group's sorted captions:
for motion the direction (down, left, right, up), for order whether the alphabetically first
object comes first.

Output: one JSON object on stdout (its last line), naming the checkpoint, data, frames, views,
drop ratio, re-rank k, DSL, merge alpha and the numbers of videos / captions evaluated and
excluded; a table on stderr (`--table`: on stdout, above the JSON). A video file that is missing
or does not decode is reported in one warning line and excluded (`excluded` in the output). A bad
annotation file or checkpoint folder fails in one line: `error: ...`, exit code 2.

Under torchrun / the deepspeed launcher every rank encodes a contiguous shard of the videos and
captions (and of the re-rank pairs) and the results are all-gathered; rank 0 prints.

Where things are: the metrics (pure functions of score matrices) in `hvfm.metrics`; the clips
(training's dataset and collate) and the annotation readers in `hvfm.data.loading.evaluation`; here the
CLI, checkpoint loading, encoding and the orchestration. The moved names stay importable from here.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import DataError, build_loader, read_annotations, tokenize  # noqa: E402,F401
from hvfm.data.loading.evaluation import (ClipDataset, EvalClipDataset, EvalCollator,  # noqa: E402,F401
                                 clip_batches, detect_format, missing_videos,
                                 read_eval_annotations, read_multiple_choice, subset_annotations)
from hvfm.data.text.tokens import clean_caption  # noqa: E402,F401
from hvfm.data.transforms.device import prepare_batch  # noqa: E402  # device transform
# The pure metrics live in hvfm.metrics; imported here for this module and re-exported for the
# callers that import them from hvfm.evaluate.
from hvfm.metrics import (DSL_TEMP, caption_spread, dual_softmax,  # noqa: E402,F401
                          group_bootstrap_ci, group_rank_labels, linear_probe, mc_accuracy, mc_option_scores, mean_similarity,
                          r1_intervals, ranks, recall_metrics, rerank, rerank_pairs, rerank_sum,
                          rerank_topk, retrieval_metrics, temporal_accuracy, temporal_hits, time_diagnostics,
                          topk_indices, v2t_in_group)

RERANK_SCORES = ("sum", "prob", "logit")


# ============================================================================ sharding

def shard_range(n, rank, world):
    """[start, stop) of rank's contiguous shard of n items: sizes differ by at most one and the
    shards of ranks 0..world-1 concatenate to 0..n-1 (a rank may get an empty shard)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} not in [0, {world})")
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def dist_info():
    """(rank, world size) of the initialised process group, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_list(obj, world):
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


# ============================================================================ encoding

def _view_rng(seed, view, first, device):
    """Host (keep counts) and device (which patches) generators of one view of one batch."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, view, int(first)])
    gen = torch.Generator(device=device).manual_seed(int(ss.generate_state(1, np.uint64)[0] >> 2))
    return np.random.default_rng(ss), gen


def _max_tokens(model):
    """Captions are truncated to CLIP's 77 tokens, or fewer if the text tower has fewer positions."""
    from hvfm.data.text.tokens import MAX_LENGTH
    return min(MAX_LENGTH, model.text.position_embedding.num_embeddings)


@torch.no_grad()
def encode_texts(model, tokenizer, captions, batch_size=32, progress=False):
    """(n, P) L2-normalised float32 CPU embeddings."""
    from tqdm import tqdm

    out = []
    for s in tqdm(range(0, len(captions), batch_size), desc="texts", disable=not progress,
                  leave=False, file=sys.stderr):
        ids, attn, _ = tokenize(tokenizer, captions[s:s + batch_size], _max_tokens(model))
        out.append(model.encode_text(ids, attn).float().cpu())
    dim = model.text.text_projection.out_features
    return torch.cat(out) if out else torch.zeros(0, dim)


@torch.no_grad()
def encode_videos(model, tokenizer, ann, videos, frames=8, size=96, batch_size=32, workers=0,
                  drop_ratio=None, views=1, seed=0, dtype=torch.float32, progress=False,
                  pool="joint"):
    """((views, len(videos), P) L2-normalised float32 CPU embeddings (zeros for a failed video),
    {video index: (path, reason)} of the videos that did not decode). The clips are batched by
    training's collate (`hvfm.data.loading.evaluation`), which tokenises a caption of each: hence the
    tokenizer."""
    from tqdm import tqdm

    dim = model.video.visual_projection.out_features
    emb = torch.zeros(views, len(videos), dim)
    where = {int(v): i for i, v in enumerate(videos)}
    failed = {}
    n_batches = -(-len(videos) // batch_size)
    for b in tqdm(clip_batches(ann, videos, frames, size, batch_size, workers, tokenizer),
                  total=n_batches,
                  desc="videos", disable=not progress, leave=False, file=sys.stderr):
        failed.update(b["failed"])
        if not b["videos"]:
            continue
        pixels = prepare_batch(b, model.device, dtype)["pixels"]  # device transform
        cols = [where[v] for v in b["videos"]]
        for view in range(views):
            rng, gen = (None, None) if drop_ratio is None else \
                _view_rng(seed, view, b["videos"][0], pixels.device)
            emb[view, cols] = _video_embeds(model, pixels, b["num_frames"], drop_ratio, rng, gen,
                                            pool).cpu()
    return emb, failed


def _video_embeds(model, pixels, num_frames, drop_ratio, rng, gen, pool="joint"):
    """(B, P) L2-normalised float32 clip embeddings. pool "joint": one sequence of every frame's
    patches; "mean": each frame encoded as an image, the normalised embeddings averaged (and
    normalised again)."""
    normalize = torch.nn.functional.normalize
    if pool == "joint":
        out = model.video(pixels, num_frames, drop_ratio, rng, generator=gen)
        return normalize(out.embeds.float(), dim=-1)
    nf = [int(n) for n in num_frames]
    frames = torch.cat([pixels[i, :n] for i, n in enumerate(nf)])[:, None]
    out = model.video(frames, np.ones(len(frames), np.int64), drop_ratio, rng, generator=gen)
    per_frame = normalize(out.embeds.float(), dim=-1).split(nf)
    return normalize(torch.stack([f.mean(0) for f in per_frame]), dim=-1)


@torch.no_grad()
def vtm_scores(model, tokenizer, ann, captions, pair_text, pair_video, frames=8, size=96,
               batch_size=32, workers=0, drop_ratio=None, seed=0, dtype=torch.float32,
               score="prob", progress=False, pool=None):
    """VTM score of each (caption pair_text[j], video pair_video[j]) through the fusion encoder:
    the match probability, or with score="logit" the log-odds logit_match - logit_nomatch. Each
    video is encoded once (the first view's patches, all frames in one sequence whatever `pool`)
    and so is each caption through the text tower; the pairs then go through the fusion encoder
    alone, in batches of 4 x `batch_size`, each clip's video tokens projected once per batch.
    NaN where the video did not decode."""
    from tqdm import tqdm

    from hvfm.model import concat_sequences, gather_sequences, host_lengths

    pair_text, pair_video = np.asarray(pair_text, np.int64), np.asarray(pair_video, np.int64)
    values = np.full(len(pair_text), np.nan)
    needed = np.unique(pair_text)
    where = {int(c): i for i, c in enumerate(needed)}
    tt = ts = None  # the text tower's tokens of every needed caption, packed in `needed` order
    for s in range(0, len(needed), batch_size):
        ids, attn, _ = tokenize(tokenizer, [captions[c] for c in needed[s:s + batch_size]],
                                _max_tokens(model))
        t = model.text(ids.to(model.device), host_lengths(attn))
        tt, ts = (t.tokens, t.varlen) if tt is None else concat_sequences(tt, ts, t.tokens, t.varlen)
    by_video = {}
    for j, v in enumerate(pair_video):
        by_video.setdefault(int(v), []).append(j)
    videos = sorted(by_video)
    for b in tqdm(clip_batches(ann, videos, frames, size, batch_size, workers, tokenizer),
                  total=-(-len(videos) // batch_size), desc="re-rank", disable=not progress,
                  leave=False, file=sys.stderr):
        if not b["videos"]:
            continue
        pixels = prepare_batch(b, model.device, dtype)["pixels"]  # device transform
        rng, gen = (None, None) if drop_ratio is None else \
            _view_rng(seed, 0, b["videos"][0], pixels.device)
        v = model.video(pixels, b["num_frames"], drop_ratio, rng, generator=gen)
        local = {vid: i for i, vid in enumerate(b["videos"])}
        pairs = [j for vid in b["videos"] for j in by_video[vid]]
        for s in range(0, len(pairs), 4 * batch_size):
            chunk = pairs[s:s + 4 * batch_size]
            tx, txs = gather_sequences(tt, ts, [where[int(pair_text[j])] for j in chunk])
            # the batch's clips as they are: the fusion projects each clip's K/V once for all
            # the captions paired with it
            h = model.fusion(tx, txs, v.tokens, v.varlen,
                             video_index=[local[int(pair_video[j])] for j in chunk])
            logits = model.fusion.vtm_logits(h, txs).float()
            val = logits.softmax(-1)[:, 1] if score == "prob" else logits[:, 1] - logits[:, 0]
            values[chunk] = val.cpu().numpy()
    return values


def _encode_all(model, tokenizer, ann, shard, batch_size, progress, **kw):
    """(text embeddings (n_captions, P), video embeddings (views, n_videos, P), failed videos),
    every rank encoding a contiguous shard of each when `shard` and a process group is up."""
    rank, world = dist_info() if shard else (0, 1)
    a, b = shard_range(ann.num_videos, rank, world)
    vemb, failed = encode_videos(model, tokenizer, ann, range(a, b), batch_size=batch_size,
                                 progress=progress and rank == 0, **kw)
    captions = list(ann.pair_caption)
    c, d = shard_range(len(captions), rank, world)
    temb = encode_texts(model, tokenizer, captions[c:d], batch_size, progress and rank == 0)
    if world > 1:
        parts = all_gather_list((vemb, failed, temb), world)
        vemb = torch.cat([p[0] for p in parts], 1)
        temb = torch.cat([p[2] for p in parts])
        failed = {k: v for p in parts for k, v in p[1].items()}
    return temb, vemb, failed


def _vtm_all(model, tokenizer, ann, pair_text, pair_video, shard, **kw):
    """`vtm_scores` of the pairs, each rank scoring the pairs whose video is in its shard."""
    rank, world = dist_info() if shard else (0, 1)
    pair_video = np.asarray(pair_video, np.int64)
    a, b = shard_range(ann.num_videos, rank, world)
    mine = np.nonzero((pair_video >= a) & (pair_video < b))[0]
    vals = vtm_scores(model, tokenizer, ann, list(ann.pair_caption), np.asarray(pair_text)[mine],
                      pair_video[mine], progress=kw.pop("progress", False) and rank == 0, **kw)
    out = np.full(len(pair_video), np.nan)
    for idx, v in all_gather_list((mine, vals), world):
        out[idx] = v
    return out


def _warn(msg):
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _exclude(ann, bad, how, missing_mode, report):
    """Drop the videos `bad` ({video: (path, reason)}) under missing_mode 'exclude' (one warning
    line), raise under 'raise'. Returns (annotation, kept video indices)."""
    if not bad:
        return ann, np.arange(ann.num_videos)
    path, reason = bad[min(bad)]
    what = f"missing under {ann.root}" if how == "missing" else "do not decode"
    if missing_mode == "raise":
        if how == "missing":
            raise DataError(f"{ann.source}: {len(bad)} video(s) missing under {ann.root}, "
                            f"first: {path}; check --video-root")
        raise DataError(f"{ann.source}: {len(bad)} video(s) do not decode, first: {path} ({reason})")
    keep = np.array([v for v in range(ann.num_videos) if v not in bad], np.int64)
    if len(keep) == 0:
        raise DataError(f"{ann.source}: no video could be read (all {ann.num_videos} {what}, "
                        f"first: {path}); check --video-root")
    if report:
        n_caps = sum(int(ann.video_pairs[v + 1] - ann.video_pairs[v]) for v in bad)
        _warn(f"{ann.source}: {len(bad)} of {ann.num_videos} video(s) {what}, excluded with their "
              f"{n_caps} caption(s); first: {path}" + ("" if how == "missing" else f" ({reason})"))
    return subset_annotations(ann, keep), keep


def _encode_checked(model, tokenizer, ann, missing, shard, batch_size, progress, **kw):
    """Exclude (or raise on) missing and undecodable videos, encode the rest. Returns (annotation
    of the kept videos, their indices in `ann`, text emb, video emb, exclusion counts)."""
    rank, _ = dist_info() if shard else (0, 1)
    model.eval()
    n_videos, n_caps = ann.num_videos, len(ann)
    miss = {v: (str(ann.resolve(v)), "missing file") for v in missing_videos(ann)}
    ann, kept = _exclude(ann, miss, "missing", missing, rank == 0)
    temb, vemb, failed = _encode_all(model, tokenizer, ann, shard, batch_size, progress, **kw)
    first = [miss[min(miss)][0]] if miss else []
    if failed:
        first += [failed[min(failed)][0]]
        before = ann
        ann, keep = _exclude(ann, failed, "decode", missing, rank == 0)
        rows = np.concatenate([np.arange(before.video_pairs[v], before.video_pairs[v + 1])
                               for v in keep]).astype(np.int64)
        vemb, temb = vemb[:, torch.as_tensor(keep)], temb[torch.as_tensor(rows)]
        kept = kept[keep]
    info = {"excluded": n_videos - ann.num_videos, "excluded_captions": n_caps - len(ann)}
    if first:
        info["excluded_first"] = first[0]
    return ann, kept, temb, vemb, info


@torch.no_grad()
def score_matrix(model, tokenizer, ann, frames=8, size=96, batch_size=32, workers=0,
                 drop_ratio=None, progress=False, dtype=torch.float32, views=1, seed=0,
                 pool="joint"):
    """(n_captions, n_videos) cosine similarities, rows and columns in annotation order (raises
    DataError when a video is missing or does not decode)."""
    _, _, temb, vemb, _ = _encode_checked(model, tokenizer, ann, "raise", False, batch_size,
                                          progress, frames=frames, size=size, workers=workers,
                                          drop_ratio=drop_ratio, views=views, seed=seed,
                                          dtype=dtype, pool=pool)
    return mean_similarity(temb, vemb)


def _check_options(views, drop_ratio, rerank_k=0, rerank_score="prob"):
    from hvfm.model import parse_drop_ratio
    try:
        parse_drop_ratio(drop_ratio)
    except ValueError as e:
        raise DataError(f"--eval-drop-ratio: {e}") from None
    if int(views) < 1:
        raise DataError(f"--views {views}: give a positive number of views")
    if views > 1 and drop_ratio is None:
        raise DataError(f"--views {views}: several views differ only by their random patch drop; "
                        f"pass --eval-drop-ratio too")
    if rerank_k < 0:
        raise DataError(f"--rerank-k {rerank_k}: give 0 (off) or a positive number")
    if rerank_score not in RERANK_SCORES:
        raise DataError(f"--rerank-score {rerank_score}: choose one of {', '.join(RERANK_SCORES)}")


@torch.no_grad()
def evaluate(model, tokenizer, ann, frames=8, size=96, batch_size=32, workers=0, drop_ratio=None,
             progress=False, dump_scores=None, dtype=torch.float32, *, views=1, seed=0,
             rerank_k=0, rerank_score="sum", dsl=False, dsl_temp=DSL_TEMP, missing="raise",
             shard=False, pool="joint", n_boot=1000):
    """Retrieval metrics of `ann` (and, when it has groups, temporal accuracy with its `n_boot`
    bootstrap interval over groups and the diagnostics of `hvfm.metrics.time_diagnostics`).

    missing: "raise" (DataError on a missing or undecodable video) or "exclude" (warn once,
    evaluate the rest, count them as `excluded`). shard: split the encoding across the ranks of
    the process group (all ranks must call; not for ZeRO-3 partitioned models). `dump_scores`
    saves the raw similarity matrix (mean over views; before DSL / re-ranking)."""
    _check_options(views, drop_ratio, rerank_k, rerank_score)
    enc = dict(frames=frames, size=size, workers=workers, drop_ratio=drop_ratio, seed=seed,
               dtype=dtype, pool=pool)
    ann, _, temb, vemb, info = _encode_checked(model, tokenizer, ann, missing, shard, batch_size,
                                               progress, views=views, **enc)
    sims = mean_similarity(temb, vemb)
    if dump_scores and dist_info()[0] == 0:
        np.save(dump_scores, sims.astype(np.float32))
    t2v, v2t = dual_softmax(sims, dsl_temp) if dsl else (sims, sims)
    if rerank_k:
        def score_pairs(pairs):  # VTM of each (text, video) pair through the fusion encoder
            vals = _vtm_all(model, tokenizer, ann, [p[0] for p in pairs], [p[1] for p in pairs],
                            shard, batch_size=batch_size, progress=progress, **enc,
                            score="prob" if rerank_score == "prob" else "logit")
            if rerank_score == "sum":  # VTM log-odds + VTC logit: the two experts' evidence added
                scale = float(model.logit_scale.detach().float().clamp(max=np.log(100.0)).exp())
                vals = rerank_sum(vals, [sims[p] for p in pairs], scale)
            return vals
        t2v, v2t = rerank(t2v, v2t, rerank_k, score_pairs)
    metrics = retrieval_metrics(t2v, ann.pair_video, v2t)
    metrics.update(r1_intervals(t2v, ann.pair_video, v2t, n_boot=n_boot))
    if ann.extra and all("group" in e for e in ann.extra):
        groups = [e["group"] for e in ann.extra]
        kinds = [e.get("kind", "all") for e in ann.extra]
        metrics.update(temporal_accuracy(t2v, ann.pair_video, groups, kinds))
        metrics.update(time_diagnostics(sims, temb, torch.nn.functional.normalize(
            vemb.float().mean(0), dim=-1), ann.pair_video, list(ann.pair_caption), groups, kinds,
            hit_scores=t2v, n_boot=n_boot, seed=0))
        metrics["bootstrap"] = n_boot
    metrics.update(frames=frames, videos=ann.num_videos, captions=len(ann), **info, views=views,
                   drop_ratio=drop_ratio, seed=seed, pool=pool, rerank_k=rerank_k, dsl=bool(dsl))
    if rerank_k:
        metrics["rerank_score"] = rerank_score
    if dsl:
        metrics["dsl_temp"] = dsl_temp
    return metrics



@torch.no_grad()
def evaluate_probes(model, tokenizer, root, size=96, batch_size=32, workers=0,
                    dtype=torch.float32, n_boot=1000, progress=False):
    """What an image CLIP knows of place and colour, on the probe stills under `root` (see
    `hvfm.data.synthetic.stills.generate_probes`: groups of two stills that differ only in the
    place of their objects, mirrored along one axis, or in an object's colour). Per kind
    (place_lr, place_tb, relation, colour): `own_vs_alt`, how often a still scores its own caption
    above the group's other caption (the own caption against its mirrored or recoloured twin),
    and `t2i`, how often a caption picks its own still of the two, each with a 95% bootstrap
    interval over groups (`n_boot` resamples); chance is 0.5 for both. Which tower is blind:
    `caption_spread` (text tower: 0 when the two captions map to one point), `image_spread` (the
    same for the two stills' embeddings: 0 when the image tower maps a still and its twin to one
    point; mirrored relation stills keep their set of objects and of positions, so only an
    image tower that binds objects to places tells them apart), and for the one-object place
    kinds `image_probe_acc` / `image_probe_chance`, a linear probe (`hvfm.metrics.linear_probe`,
    half the groups to fit) reading from the image embedding the words its caption differs in
    ("left" or "right", "top" or "bottom"). None for relation (which object the caption names
    first is the caption's choice, not the image's) and colour (its two colours name no common
    variant)."""
    ann = read_annotations(Path(root) / "probes.json", root, clean=clean_caption)
    _, _, temb, vemb, _ = _encode_checked(model, tokenizer, ann, "raise", False, batch_size,
                                          progress, frames=1, size=size, workers=workers,
                                          drop_ratio=None, views=1, seed=0, dtype=dtype,
                                          pool="joint")
    sims = mean_similarity(temb, vemb)
    groups = np.asarray([e["group"] for e in ann.extra])
    kinds = np.asarray([e["kind"] for e in ann.extra], dtype=object)
    text_video = np.asarray(ann.pair_video)
    t2i, _ = temporal_hits(sims, text_video, groups)
    i2t, _ = v2t_in_group(sims, text_video, groups)
    still_caption = {int(v): ann.pair_caption[i] for i, v in enumerate(text_video)}  # one a still
    img = vemb[0].double().numpy()  # (stills, P): the one view
    out = {}
    for kind in sorted(set(kinds.tolist())):
        vid = kinds == kind
        rows = vid[text_video]
        own = group_bootstrap_ci(i2t[vid], groups[vid], n_boot, 0)
        pick = group_bootstrap_ci(t2i[rows], groups[text_video][rows], n_boot, 0)
        probe = None
        if kind.startswith("place"):
            labels = group_rank_labels([still_caption[int(v)] for v in np.nonzero(vid)[0]],
                                       groups[vid])
            probe = linear_probe(img[vid], labels, groups[vid])
        out[kind] = {"own_vs_alt": float(np.mean(i2t[vid])), "own_vs_alt_ci": list(own),
                     "t2i": float(np.mean(t2i[rows])), "t2i_ci": list(pick),
                     "caption_spread": caption_spread(temb[rows],
                                                      groups[text_video][rows]),
                     "image_spread": caption_spread(img[vid], groups[vid]),
                     "image_probe_acc": None if probe is None else probe["acc"],
                     "image_probe_chance": None if probe is None else probe["chance"],
                     "groups": int(len(np.unique(groups[vid]))), "chance": 0.5}
    return out


def probe_lines(m):
    """One line per probe kind: own caption vs its mirrored (or recoloured) twin, with intervals."""
    lines = []
    for kind, r in m.items():
        (a, b), (c, d) = r["own_vs_alt_ci"], r["t2i_ci"]
        lines.append(f"{kind:9} own vs {'recoloured' if kind == 'colour' else 'mirrored'} "
                     f"{r['own_vs_alt']:.3f} [{a:.2f}, {b:.2f}], caption picks its still "
                     f"{r['t2i']:.3f} [{c:.2f}, {d:.2f}] over {r['groups']} groups (chance 0.5); "
                     f"caption spread {_num(r['caption_spread'])}, image spread "
                     f"{_num(r.get('image_spread'))}"
                     + ("" if r.get("image_probe_acc") is None else
                        f", image probe {r['image_probe_acc']:.3f} (chance "
                        f"{r['image_probe_chance']:.2f})"))
    return lines


@torch.no_grad()
def evaluate_mc(model, tokenizer, ann, answers, frames=8, size=96, batch_size=32, workers=0,
                drop_ratio=None, progress=False, dtype=torch.float32, *, views=1, seed=0, by="sim",
                missing="exclude", shard=False, pool="joint"):
    """Multiple-choice accuracy (percent): `ann` holds each question's options as its captions
    (see read_multiple_choice), `answers` the right option of each question."""
    _check_options(views, drop_ratio)
    if by not in ("sim", "vtm"):
        raise DataError(f"--mc-by {by}: choose sim or vtm")
    enc = dict(frames=frames, size=size, workers=workers, drop_ratio=drop_ratio, seed=seed,
               dtype=dtype, pool=pool)
    ann, kept, temb, vemb, info = _encode_checked(model, tokenizer, ann, missing, shard,
                                                  batch_size, progress, views=views, **enc)
    answers = np.asarray(answers)[kept]
    if by == "sim":
        scores = mc_option_scores(temb, vemb, ann.pair_video)
    else:
        scores = _vtm_all(model, tokenizer, ann, np.arange(len(ann)), ann.pair_video, shard,
                          batch_size=batch_size, score="prob", progress=progress, **enc)
    acc, chance = mc_accuracy(scores, ann.video_pairs, answers)
    return {"mc_acc": 100.0 * acc, "mc_chance": 100.0 * chance, "mc_by": by, "frames": frames,
            "questions": ann.num_videos, "videos": ann.num_videos, "captions": len(ann), **info,
            "views": views, "drop_ratio": drop_ratio, "seed": seed, "pool": pool}


# ============================================================================ checkpoints

def load_checkpoint(path, attn="sdpa", tag=None, with_info=False, max_frames=16):
    """(model, tokenizer, kind) -- and the info dict with `with_info` -- from an export
    (OUTPUT_DIR/final), a DeepSpeed checkpoint folder or tag folder, a run folder, or a plain HF
    CLIP folder (image CLIP applied to frames, with a fresh fusion encoder that retrieval does
    not use). DataError for anything else."""
    from hvfm.load import load_any
    model, tokenizer, info = load_any(path, attn=attn, tag=tag, max_frames=max_frames)
    return (model, tokenizer, info["kind"], info) if with_info else (model, tokenizer, info["kind"])


# ============================================================================ CLI

def format_table(m):
    """A human-readable summary of the output object."""
    head = (f"{m.get('checkpoint')} ({m.get('kind')}) on {m.get('ann')}: {m.get('videos')} "
            f"videos, {m.get('captions')} {'options' if 'mc_acc' in m else 'captions'}, "
            f"{m.get('excluded', 0)} excluded")
    setup = (f"frames {m.get('frames')}, views {m.get('views')}, drop ratio {m.get('drop_ratio')}, "
             f"re-rank k {m.get('rerank_k', 0)}, DSL {'on' if m.get('dsl') else 'off'}, "
             f"merge alpha {'off' if m.get('merge_alpha') is None else m['merge_alpha']}")
    lines = [head, setup]
    if "mc_acc" in m:
        lines.append(f"multiple choice by {m['mc_by']}: accuracy {m['mc_acc']:.1f}% over "
                     f"{m['questions']} questions (chance {m['mc_chance']:.1f}%)")
        return "\n".join(lines)
    lines.append(f"{'':5}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'MdR':>7}{'MnR':>8}")
    for d in ("t2v", "v2t"):
        lines.append(f"{d:5}{m[d + '_r1']:7.1f}{m[d + '_r5']:7.1f}{m[d + '_r10']:7.1f}"
                     f"{m[d + '_medr']:7.1f}{m[d + '_meanr']:8.1f}")
    if "temporal_acc" in m:
        kinds = time_lines(m)  # per kind, each with its own chance
        if not kinds:
            lines.append(f"temporal accuracy {m['temporal_acc']:.3f} (chance {m['temporal_chance']:.3f})")
        lines += kinds
    return "\n".join(lines)


def _num(x, fmt=".3f"):
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def time_lines(m):
    """One line per kind of group: accuracy within groups with its 95% bootstrap interval over
    groups, then which tower is blind: the captions' spread within a group (text tower),
    video-to-text within a group, and the linear probe on the video embeddings (video tower)."""
    lines = []
    for kind in sorted(k[:-3] for k in m if k.endswith("_ci") and f"{k[:-3]}_acc" in m):
        lo, hi = m[f"{kind}_ci"]
        chance = m.get(f"temporal_chance_{kind}")
        lines.append(f"{kind} {m[f'{kind}_acc']:.3f} [{_num(lo, '.2f')}, {_num(hi, '.2f')}]"
                     f"{'' if chance is None else f' (chance {chance:.2f})'} over "
                     f"{m[f'{kind}_groups']} groups; caption spread "
                     f"{_num(m[f'{kind}_caption_spread'])}, v2t in group "
                     f"{_num(m[f'{kind}_v2t_in_group'])} (chance "
                     f"{_num(m[f'{kind}_v2t_in_group_chance'])}), video probe "
                     f"{_num(m[f'{kind}_probe_acc'])} (chance {_num(m[f'{kind}_probe_chance'])})")
    return lines


def _init_distributed():
    """Join the process group of a torchrun / deepspeed launch (WORLD_SIZE > 1). True if this
    call created it."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def _report_format(ann):
    """One line naming the detected format and what was read; one warning line when the video
    files were found in more than one way."""
    from hvfm.data.sources.annotations import describe, found_counts
    print(f"format: {describe(ann)}", file=sys.stderr, flush=True)
    if len([w for w in ann.found if w != "not found"]) > 1:
        _warn(f"{ann.source}: video files under {ann.root} found in more than one way: "
              f"{found_counts(ann)}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvfm.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True,
                    help="OUTPUT_DIR/final, OUTPUT_DIR/checkpoints (or a tag folder), OUTPUT_DIR, "
                         "or an HF CLIP folder")
    ap.add_argument("--ann", required=True,
                    help="annotation file, its format detected from its content: MSR-VTT CSVs or "
                         "MSRVTT_data.json, DiDeMo, ActivityNet Captions, UMT / Singularity / "
                         "VINDLU lists (retrieval or multiple choice), JSON Lines, WebVid CSV")
    ap.add_argument("--video-root", required=True,
                    help="folder the annotation file's video paths are relative to")
    ap.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the 'latest' file's)")
    ap.add_argument("--frames", type=int, default=8, help="frames sampled per video (default: %(default)s)")
    ap.add_argument("--size", type=int, default=None, help="frame side (default: the model's)")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="videos or captions encoded at once (default: %(default)s)")
    from hvfm.data.loading.dataset import default_workers  # device transform: --workers default
    ap.add_argument("--workers", type=int, default=default_workers(),  # device transform
                    help="loader worker processes (default: %(default)s here: the cores per local "
                         "rank minus one, at least 1)")
    ap.add_argument("--pool", choices=("auto", "joint", "mean"), default="auto",
                    help="frames in one sequence (joint) or each frame as an image, embeddings "
                         "averaged (mean); auto: mean for a plain CLIP folder, else joint")
    ap.add_argument("--paragraph", action=argparse.BooleanOptionalAction, default=None,
                    help="join a video's sentences into one paragraph (default: on for DiDeMo and "
                         "ActivityNet files, the literature's paragraph-to-video protocol; off "
                         "otherwise); --no-paragraph scores each sentence")
    ap.add_argument("--split", default=None,
                    help="the split of an MSRVTT_data.json (train, validate, test; default test); "
                         "an error with any other file")
    ap.add_argument("--eval-drop-ratio", default=None, help="drop patches at test time too")
    ap.add_argument("--views", type=int, default=1,
                    help="average the similarity over N random drops (needs --eval-drop-ratio)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random drops")
    ap.add_argument("--rerank-k", type=int, default=0, help="re-rank each query's top k by VTM (0: off)")
    ap.add_argument("--rerank-score", choices=RERANK_SCORES, default="sum",
                    help="sum: VTM log-odds + VTC logit (scale x cosine); prob: VTM match "
                         "probability alone; logit: VTM log-odds alone")
    ap.add_argument("--dsl", action="store_true", help="dual-softmax re-scoring of the similarity")
    ap.add_argument("--dsl-temp", type=float, default=DSL_TEMP,
                    help="temperature of --dsl's dual softmax (default: %(default)s)")
    ap.add_argument("--mc-by", choices=("sim", "vtm"), default="sim",
                    help="multiple choice: pick by similarity or by VTM match probability")
    ap.add_argument("--merge-with-clip", type=float, default=None, metavar="ALPHA",
                    help="evaluate theta = ALPHA*theta_clip + (1-ALPHA)*theta_post")
    ap.add_argument("--clip", help="original CLIP folder for --merge-with-clip (default: the run's "
                                   "--clip, else OUTPUT_DIR/init_clip)")
    ap.add_argument("--attn", default="sdpa",
                    help="attention backend: sdpa, torch-varlen, triton, flash_attn, xformers (default: %(default)s)")
    ap.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when available, else cpu")
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="precision of the forward passes (default: %(default)s, the trainer's own closing evaluation's)")
    ap.add_argument("--dump-scores", help="save the caption-by-video similarity matrix (.npy)")
    ap.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                    help="resamples of the groups for the temporal accuracy's 95%% interval")
    ap.add_argument("--table", action="store_true", help="print the table on stdout (above the JSON)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def run(args):
    """The CLI's work: returns the output object (rank 0's is printed by main)."""
    from hvfm.load import merge_with_clip_dir

    if args.clip and args.merge_with_clip is None:
        raise DataError("--clip is only used with --merge-with-clip ALPHA")
    if args.frames < 1:
        raise DataError(f"--frames {args.frames}: give at least one frame")
    if args.bootstrap < 1:
        raise DataError(f"--bootstrap {args.bootstrap}: give a positive number of resamples")
    _check_options(args.views, args.eval_drop_ratio, args.rerank_k, args.rerank_score)
    ann, answers = read_eval_annotations(args.ann, args.video_root, paragraph=args.paragraph,
                                         split=args.split or "test")
    if args.split is not None and ann.format != "msrvtt_json":
        raise DataError(f"--split {args.split}: {args.ann} is {ann.format}, which has no splits; "
                        f"--split applies to MSRVTT_data.json only (drop the flag)")
    fmt = "mc" if answers is not None else "retrieval"
    if dist_info()[0] == 0:
        _report_format(ann)
    model, tokenizer, kind, info = load_checkpoint(args.checkpoint, args.attn, args.tag,
                                                   with_info=True, max_frames=args.frames)
    if args.frames > model.video.max_frames:
        raise DataError(f"--frames {args.frames}: the model's temporal embedding has "
                        f"{model.video.max_frames} frames")
    out = {"checkpoint": str(args.checkpoint), "kind": kind, "ann": str(args.ann),
           "video_root": str(args.video_root), "format": ann.format,
           "task": "multiple_choice" if fmt == "mc" else "retrieval", "merged": ann.merged}
    if info.get("tag"):
        out["tag"] = info["tag"]
    merge = {"merge_alpha": None}
    if args.merge_with_clip is not None:
        clip_dir, n = merge_with_clip_dir(model, info, args.merge_with_clip, args.clip)
        merge = {"merge_alpha": args.merge_with_clip, "merge_clip": str(clip_dir), "merged_tensors": n}
    device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                             if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    model.to(device=device, dtype=dtype)
    size = args.size or model.video.image_size
    pool = args.pool if args.pool != "auto" else ("mean" if kind == "clip" else "joint")
    common = dict(frames=args.frames, pool=pool, size=size, batch_size=args.batch_size,
                  workers=args.workers, drop_ratio=args.eval_drop_ratio, progress=True,
                  dtype=dtype, views=args.views, seed=args.seed, missing="exclude", shard=True)
    if fmt == "mc":
        metrics = evaluate_mc(model, tokenizer, ann, answers, by=args.mc_by, **common)
        metrics.update(rerank_k=0, dsl=False)
    else:
        metrics = evaluate(model, tokenizer, ann, dump_scores=args.dump_scores,
                           rerank_k=args.rerank_k, rerank_score=args.rerank_score, dsl=args.dsl,
                           dsl_temp=args.dsl_temp, n_boot=args.bootstrap, **common)
        metrics["paragraph"] = bool(ann.paragraph)
        if ann.format == "msrvtt_json":
            metrics["split"] = args.split or "test"
    return {**out, **metrics, "size": size, **merge, "attn": args.attn, "dtype": args.dtype,
            "world_size": dist_info()[1]}


def main(argv=None):
    args = parse_args(argv)
    created = _init_distributed()
    rank = dist_info()[0]
    code, metrics = 0, None
    try:
        metrics = run(args)
        if created:  # every rank done with its collectives before any tears the group down
            import torch.distributed as dist
            dist.barrier()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()
    if code:
        sys.exit(code)
    if rank == 0:
        table = format_table(metrics)
        print(table, file=sys.stdout if args.table else sys.stderr, flush=True)
        print(json.dumps(metrics), flush=True)
    return metrics


if __name__ == "__main__":
    main()
