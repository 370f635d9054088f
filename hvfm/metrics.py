"""Pure evaluation metrics: score matrices in, numbers out (no model, no data, no process group).

Conventions, as `python -m hvfm.evaluate` reports them:
- A score matrix is (n_text, n_video); `text_video[i]` is the video of caption i.
- Ranks are 1-based and ties count against the model: rank = 1 + the number of wrong candidates
  scoring at least as high as the best correct one.
- R@k in percent, median and mean rank (`t2v_r1 ... v2t_meanr`).
- Multiple choice and temporal accuracy give a k-way tie at the top 1/k of a hit, so a model that
  cannot tell the candidates apart scores exactly chance.
"""
from __future__ import annotations

import numpy as np
import torch

DSL_TEMP = 100.0
RECALL_KS = (1, 5, 10)


# ---------------------------------------------------------------------------- retrieval

def ranks(scores, correct):
    """Rank (1 = best) of each row's best correct column; ties count against: rank = 1 + the
    number of wrong columns scoring at least as high as the best correct one."""
    scores = np.asarray(scores, dtype=np.float64)
    best = np.where(correct, scores, -np.inf).max(1, keepdims=True)
    return 1 + ((scores >= best) & ~correct).sum(1)


def recall_metrics(r, prefix):
    """R@1/5/10 (percent), median and mean rank of the ranks `r`, keys prefixed by `prefix`."""
    return {**{f"{prefix}_r{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS},
            f"{prefix}_medr": float(np.median(r)), f"{prefix}_meanr": float(np.mean(r))}


def retrieval_metrics(scores, text_video, v2t_scores=None):
    """scores (n_text, n_video) ranked per row for text-to-video; text_video[i] the video of
    caption i. Video-to-text ranks the columns of `v2t_scores` (same orientation; default
    `scores`) and counts a hit when any of the video's captions ranks high enough."""
    scores = np.asarray(scores)
    v2t_scores = scores if v2t_scores is None else np.asarray(v2t_scores)
    text_video = np.asarray(text_video)
    correct = text_video[:, None] == np.arange(scores.shape[1])[None, :]
    return {**recall_metrics(ranks(scores, correct), "t2v"),
            **recall_metrics(ranks(v2t_scores.T, correct.T), "v2t")}


def r1_intervals(scores, text_video, v2t_scores=None, n_boot=1000, seed=0):
    """95% bootstrap intervals (percent) of t2v and v2t R@1 as `retrieval_metrics` counts them:
    caption hits resampled by their video (a video's captions together), video hits by video.
    Keys t2v_r1_ci, v2t_r1_ci."""
    scores = np.asarray(scores)
    v2t_scores = scores if v2t_scores is None else np.asarray(v2t_scores)
    text_video = np.asarray(text_video)
    correct = text_video[:, None] == np.arange(scores.shape[1])[None, :]
    t2v = (ranks(scores, correct) <= 1).astype(np.float64)
    v2t = (ranks(v2t_scores.T, correct.T) <= 1).astype(np.float64)
    return {"t2v_r1_ci": [100.0 * x for x in group_bootstrap_ci(t2v, text_video, n_boot, seed)],
            "v2t_r1_ci": [100.0 * x for x in group_bootstrap_ci(
                v2t, np.arange(scores.shape[1]), n_boot, seed)]}


def mean_similarity(temb, vemb):
    """Mean over views of the (n_text, n_video) similarities of text embeddings (n_text, P) and
    video embeddings (views, n_video, P), as float64 numpy (tensors or arrays in; the products
    in the embeddings' dtype, the mean over views in float64)."""
    temb, vemb = torch.as_tensor(temb), torch.as_tensor(vemb)
    return torch.stack([temb @ v.T for v in vemb]).double().mean(0).numpy()


# ---------------------------------------------------------------------------- time

def temporal_hits(scores, text_video, groups, tie_tol=1e-5):
    """Per caption: (hit, chance) arrays of the within-group choice of `temporal_accuracy`. Row i
    (caption of video text_video[i]) scores the videos of its video's group (`groups` per video);
    a k-way tie at the top that holds its video earns 1/k, chance is 1 / group size."""
    scores, text_video, groups = np.asarray(scores), np.asarray(text_video), np.asarray(groups)
    hits, chance = np.zeros(len(text_video)), np.zeros(len(text_video))
    for i, v in enumerate(text_video):
        members = np.nonzero(groups == groups[v])[0]
        s = scores[i, members]
        top = s.max()
        tied = np.abs(s - top) <= tie_tol
        hits[i] = 1.0 / tied.sum() if abs(scores[i, v] - top) <= tie_tol else 0.0
        chance[i] = 1.0 / len(members)
    return hits, chance


def temporal_accuracy(scores, text_video, groups, kinds=None, tie_tol=1e-5):
    """Within each group of videos, how often a caption's own video scores highest.

    Ties are broken at random in expectation: a caption whose video shares the top score with
    k - 1 others (within `tie_tol`) scores 1/k. So a model that cannot tell a group's clips apart
    (e.g. one frame of clips that share their middle frame) scores exactly the chance level.
    Returns overall and per-kind accuracy and the chance level (mean of 1/group size)."""
    hits, chance = temporal_hits(scores, text_video, groups, tie_tol)
    out = {"temporal_acc": float(np.mean(hits)), "temporal_chance": float(np.mean(chance))}
    if kinds is not None:
        kind_of = np.asarray(kinds, dtype=object)[np.asarray(text_video)]
        for kind in sorted(set(kind_of)):
            out[f"temporal_acc_{kind}"] = float(np.mean(hits[kind_of == kind]))
            out[f"temporal_chance_{kind}"] = float(np.mean(chance[kind_of == kind]))
    return out


def group_bootstrap_ci(values, clusters, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap interval (lo, hi) of the mean of `values`, resampling whole clusters
    (groups) with replacement: each of `n_boot` resamples draws as many groups as there are,
    and its statistic is the mean over all the values of the drawn groups (so the point estimate
    is the plain mean). Deterministic for a seed. NaNs for no values."""
    values, clusters = np.asarray(values, dtype=np.float64), np.asarray(clusters)
    if values.size == 0:
        return float("nan"), float("nan")
    ids, inverse = np.unique(clusters, return_inverse=True)
    sums = np.bincount(inverse, weights=values, minlength=len(ids))
    counts = np.bincount(inverse, minlength=len(ids)).astype(np.float64)
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(int(n_boot), len(ids)))
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def caption_spread(temb, caption_groups):
    """How far apart a group's captions are for the text tower: the mean pairwise cosine
    distance (1 - cos) of the embeddings `temb` (n, P) of each group's captions (`caption_groups`
    per row), averaged over the groups with at least two captions (NaN if none). Captions that
    differ only in their time words but map to one point give ~0: the text tower is blind."""
    t = np.asarray(temb, dtype=np.float64)
    t = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-12)
    caption_groups = np.asarray(caption_groups)
    spreads = []
    for g in np.unique(caption_groups):
        m = t[caption_groups == g]
        if len(m) < 2:
            continue
        cos = m @ m.T
        iu = np.triu_indices(len(m), 1)
        spreads.append(float(np.mean(1.0 - cos[iu])))
    return float(np.mean(spreads)) if spreads else float("nan")


def v2t_in_group(scores, text_video, groups, tie_tol=1e-5):
    """Per video (column of `scores`, (n_text, n_video)): within the captions of its group's
    videos (`groups` per video), whether one of its own captions scores highest; a k-way tie at
    the top earns (own captions among the tied) / k. Returns (hit per video, chance per video:
    own captions / group captions). Videos that pick the same caption score exactly chance."""
    scores, text_video, groups = np.asarray(scores), np.asarray(text_video), np.asarray(groups)
    caption_group = groups[text_video]
    hits, chance = np.zeros(scores.shape[1]), np.zeros(scores.shape[1])
    for v in range(scores.shape[1]):
        rows = np.nonzero(caption_group == groups[v])[0]
        own = text_video[rows] == v
        s = scores[rows, v]
        tied = np.abs(s - s.max()) <= tie_tol
        hits[v] = (tied & own).sum() / tied.sum()
        chance[v] = own.sum() / len(rows) if len(rows) else 0.0
    return hits, chance


def group_rank_labels(captions, groups):
    """A label for each item (a video's caption) from the captions alone: the rank of its caption
    among the sorted distinct captions of its group. When a group's captions differ only in
    their time words, the rank names the same variant in every group: with "a red circle moves
    {down, left, right, up}" it is the direction; with "X appears, then Y" against "Y appears,
    then X", it is 0 when the alphabetically first object comes first."""
    captions, groups = list(captions), np.asarray(groups)
    labels = np.zeros(len(captions), np.int64)
    for g in np.unique(groups):
        idx = np.nonzero(groups == g)[0]
        order = sorted({captions[i] for i in idx})
        for i in idx:
            labels[i] = order.index(captions[i])
    return labels


def linear_probe(x, labels, groups, train_frac=0.5, seed=0, ridge=1e-3):
    """Held-out accuracy of a linear read-out of `labels` from the features `x` (n, P), split by
    group: a fixed-seed permutation of the groups puts round(train_frac x groups) (at least one,
    and at least one left) in the training part. The read-out is ridge least squares onto the
    one-hot labels (features and targets centred on the training part; ridge x the mean
    feature variance); the predicted label is the highest output. Returns {"acc", "chance" (the
    test part's most frequent label share), "train", "test" (item counts), "classes"} or None
    when there are fewer than 2 groups or 2 labels in the training part."""
    x = np.asarray(x, dtype=np.float64)
    labels, groups = np.asarray(labels), np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2:
        return None
    perm = np.random.default_rng(seed).permutation(ids)
    n_train = min(max(1, int(round(train_frac * len(ids)))), len(ids) - 1)
    train = np.isin(groups, perm[:n_train])
    classes = np.unique(labels[train])
    if len(classes) < 2:
        return None
    xt, yt = x[train], (labels[train][:, None] == classes[None, :]).astype(np.float64)
    mx, my = xt.mean(0), yt.mean(0)
    xc = xt - mx
    gram = xc.T @ xc
    lam = ridge * max(np.trace(gram) / gram.shape[0], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(gram.shape[0]), xc.T @ (yt - my))
    pred = classes[np.argmax((x[~train] - mx) @ w + my, axis=1)]
    test = labels[~train]
    _, counts = np.unique(test, return_counts=True)
    return {"acc": float(np.mean(pred == test)), "chance": float(counts.max() / len(test)),
            "train": int(train.sum()), "test": int(len(test)), "classes": int(len(classes))}


def time_diagnostics(scores, temb, vemb, text_video, captions, groups, kinds, *,
                     hit_scores=None, n_boot=1000, seed=0):
    """Per kind of group (motion, order, ...), the numbers that say whether time is learned and
    which tower is blind. `scores` (n_text, n_video) the raw similarities of the text embeddings
    `temb` (n_text, P) and video embeddings `vemb` (n_video, P); `text_video`, `captions` per
    caption; `groups`, `kinds` per video. `hit_scores` (default `scores`): the scores the
    within-group accuracy is taken on (after re-ranking, as `temporal_accuracy`).

    Keys, for each kind K: `K_acc` (= temporal_acc_K) and `K_ci` [lo, hi], the 95% bootstrap
    interval over groups (`n_boot` resamples, `seed`); `K_groups`; `K_caption_spread` (text
    tower: `caption_spread`); `K_v2t_in_group` and its `K_v2t_in_group_chance` (does a clip pick
    its own caption in its group: `v2t_in_group` on the raw similarities); `K_probe_acc`,
    `K_probe_chance` (video tower: `linear_probe` of the `group_rank_labels` of each video's
    first caption, on the video embeddings, split by group; None with fewer than 2 groups)."""
    text_video = np.asarray(text_video)
    groups, kinds = np.asarray(groups), np.asarray(kinds, dtype=object)
    hits, _ = temporal_hits(scores if hit_scores is None else hit_scores, text_video, groups)
    v2t_hits, v2t_chance = v2t_in_group(scores, text_video, groups)
    first_caption = {}
    for i, v in enumerate(text_video):
        first_caption.setdefault(int(v), captions[i])
    video_caption = [first_caption.get(v, "") for v in range(len(groups))]
    temb, vemb = np.asarray(temb, dtype=np.float64), np.asarray(vemb, dtype=np.float64)
    out = {}
    for kind in sorted(set(kinds.tolist())):
        vid = kinds == kind
        rows = vid[text_video]
        lo, hi = group_bootstrap_ci(hits[rows], groups[text_video][rows], n_boot, seed)
        k_groups = groups[vid]
        probe = linear_probe(vemb[vid], group_rank_labels([video_caption[v] for v in
                                                           np.nonzero(vid)[0]], k_groups),
                             k_groups, seed=seed)
        out.update({f"{kind}_acc": float(np.mean(hits[rows])), f"{kind}_ci": [lo, hi],
                    f"{kind}_groups": int(len(np.unique(k_groups))),
                    f"{kind}_caption_spread": caption_spread(temb[rows], groups[text_video][rows]),
                    f"{kind}_v2t_in_group": float(np.mean(v2t_hits[vid])),
                    f"{kind}_v2t_in_group_chance": float(np.mean(v2t_chance[vid])),
                    f"{kind}_probe_acc": None if probe is None else probe["acc"],
                    f"{kind}_probe_chance": None if probe is None else probe["chance"]})
    return out


# ---------------------------------------------------------------------------- re-scoring

def _softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def dual_softmax(scores, temp=DSL_TEMP):
    """Dual-softmax re-scoring of a (n_text, n_video) similarity matrix S. Returns
    (t2v, v2t), both (n_text, n_video):  t2v = S * softmax(temp * S, axis=0) (over the texts,
    per video), v2t = S * softmax(temp * S, axis=1) (over the videos, per text)."""
    s = np.asarray(scores, dtype=np.float64)
    return s * _softmax(temp * s, 0), s * _softmax(temp * s, 1)


def topk_indices(scores, k):
    """(n_rows, min(k, n_cols)) column indices of each row's k highest scores, best first
    (ties: lower column first)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(int(k), scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def rerank_topk(scores, top, values):
    """Re-rank the columns `top` (n_rows, k) of each row by `values` (n_rows, k), above the other
    columns, which keep their scores and order. The top-k of row i get
    floor_i + 1 + (values - min(values_i)), floor_i the row's best score outside its top-k."""
    out = np.array(scores, dtype=np.float64)
    top, values = np.asarray(top), np.asarray(values, dtype=np.float64)
    if top.size == 0:
        return out
    rows = np.arange(out.shape[0])[:, None]
    rest = out.copy()
    rest[rows, top] = -np.inf
    floor = rest.max(1, keepdims=True)
    floor = np.where(np.isfinite(floor), floor, 0.0)
    out[rows, top] = floor + 1.0 + (values - values.min(1, keepdims=True))
    return out


def rerank_pairs(top_t, top_v):
    """The (text, video) pairs that re-ranking scores, sorted and each once: every text's
    candidate videos `top_t` (n_text, k) and every video's candidate texts `top_v` (n_video, k)."""
    return sorted({(i, int(v)) for i, row in enumerate(top_t) for v in row} |
                  {(int(t), j) for j, row in enumerate(top_v) for t in row})


def pair_values_at(pairs, values, top_t, top_v):
    """Spread the values of `pairs` (one each, as `rerank_pairs` lists them) back onto the two
    candidate tables: ((n_text, k) for `top_t`, (n_video, k) for `top_v`)."""
    where = {p: n for n, p in enumerate(pairs)}
    vt = np.array([[values[where[(i, int(v))]] for v in row] for i, row in enumerate(top_t)])
    vv = np.array([[values[where[(int(t), j)]] for t in row] for j, row in enumerate(top_v)])
    return vt, vv


def rerank_sum(vtm_log_odds, cosine, logit_scale):
    """The default re-ranking score (`--rerank-score sum`): the VTM head's log-odds
    logit_match - logit_nomatch plus the VTC logit, `logit_scale` (the model's, exponentiated)
    x the cosine. The two experts' evidence adds up, so where VTM cannot tell candidates apart
    the similarity's order stands."""
    return np.asarray(vtm_log_odds, dtype=np.float64) + float(logit_scale) * np.asarray(cosine, dtype=np.float64)


def rerank(t2v, v2t, k, score_pairs):
    """Re-rank each text's k best videos of `t2v` and each video's k best texts of `v2t` (both
    (n_text, n_video)) by `score_pairs(pairs)`, which returns one value per (text, video) pair of
    `rerank_pairs`; the rest keep their order below (see `rerank_topk`). Returns (t2v, v2t)."""
    top_t = topk_indices(t2v, k)  # per text: videos
    top_v = topk_indices(np.asarray(v2t).T, k)  # per video: texts
    pairs = rerank_pairs(top_t, top_v)
    vt, vv = pair_values_at(pairs, score_pairs(pairs), top_t, top_v)
    return rerank_topk(t2v, top_t, vt), rerank_topk(np.asarray(v2t).T, top_v, vv).T


# ---------------------------------------------------------------------------- multiple choice

def mc_accuracy(pair_scores, video_pairs, answers, tie_tol=1e-6):
    """Multiple-choice accuracy (fraction) and chance. Question q's options are the pairs
    video_pairs[q]:video_pairs[q+1]; a k-way tie at the top that includes the answer earns 1/k."""
    pair_scores = np.asarray(pair_scores, dtype=np.float64)
    hits, chance = [], []
    for q, answer in enumerate(answers):
        s = pair_scores[video_pairs[q]:video_pairs[q + 1]]
        tied = np.abs(s - s.max()) <= tie_tol
        hits.append(1.0 / tied.sum() if tied[answer] else 0.0)
        chance.append(1.0 / len(s))
    return float(np.mean(hits)), float(np.mean(chance))


def mc_option_scores(temb, vemb, pair_video):
    """Similarity of each option (caption row of `temb`, (n_options, P)) with its question's video
    (`pair_video[j]`), averaged over the views of `vemb` (views, n_video, P): (n_options,) float64."""
    temb, vemb = torch.as_tensor(temb), torch.as_tensor(vemb)
    pv = torch.as_tensor(np.asarray(pair_video))
    return torch.stack([(temb * v[pv]).sum(-1) for v in vemb]).double().mean(0).numpy()
