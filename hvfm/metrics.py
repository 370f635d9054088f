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


def mean_similarity(temb, vemb):
    """Mean over views of the (n_text, n_video) similarities of text embeddings (n_text, P) and
    video embeddings (views, n_video, P), as float64 numpy (tensors or arrays in; the products
    in the embeddings' dtype, the mean over views in float64)."""
    temb, vemb = torch.as_tensor(temb), torch.as_tensor(vemb)
    return torch.stack([temb @ v.T for v in vemb]).double().mean(0).numpy()


# ---------------------------------------------------------------------------- time

def temporal_accuracy(scores, text_video, groups, kinds=None, tie_tol=1e-5):
    """Within each group of videos, how often a caption's own video scores highest.

    Ties are broken at random in expectation: a caption whose video shares the top score with
    k - 1 others (within `tie_tol`) scores 1/k. So a model that cannot tell a group's clips apart
    (e.g. one frame of clips that share their middle frame) scores exactly the chance level.
    Returns overall and per-kind accuracy and the chance level (mean of 1/group size)."""
    scores, text_video, groups = np.asarray(scores), np.asarray(text_video), np.asarray(groups)
    hits, chance, per_kind = [], [], {}
    for i, v in enumerate(text_video):
        members = np.nonzero(groups == groups[v])[0]
        s = scores[i, members]
        own = scores[i, v]
        top = s.max()
        tied = np.abs(s - top) <= tie_tol
        hit = 1.0 / tied.sum() if abs(own - top) <= tie_tol else 0.0
        hits.append(hit)
        chance.append(1.0 / len(members))
        if kinds is not None:
            per_kind.setdefault(kinds[v], []).append(hit)
    out = {"temporal_acc": float(np.mean(hits)), "temporal_chance": float(np.mean(chance))}
    for kind, h in sorted(per_kind.items()):
        out[f"temporal_acc_{kind}"] = float(np.mean(h))
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
