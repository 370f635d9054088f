"""hvfm.metrics: retrieval metrics, temporal accuracy, dual softmax, re-ranking, multiple choice
on hand-made score matrices with known ranks."""
import math

import numpy as np
import pytest

import torch

from hvfm.metrics import (caption_spread, dual_softmax, group_bootstrap_ci, group_rank_labels,
                          linear_probe, mc_accuracy, mc_option_scores, mean_similarity,
                          pair_values_at, ranks, recall_metrics, rerank, rerank_pairs, rerank_sum,
                          rerank_topk, retrieval_metrics, temporal_accuracy, temporal_hits,
                          time_diagnostics, topk_indices, v2t_in_group)


def test_ranks_known_matrix_and_ties():
    scores = np.array([[0.9, 0.1, 0.2],    # correct video 0 ranks 1
                       [0.5, 0.4, 0.6],    # correct video 1 ranks 3
                       [0.3, 0.3, 0.3]])   # all tied: counts against the model -> rank 3
    correct = np.eye(3, dtype=bool)
    assert ranks(scores, correct).tolist() == [1, 3, 3]


def test_retrieval_metrics_with_several_captions_per_video():
    # 4 captions, 2 videos: captions 0,1 describe video 0; captions 2,3 describe video 1.
    scores = np.array([[0.9, 0.1],
                       [0.2, 0.8],   # wrong for t2v (rank 2)
                       [0.1, 0.7],
                       [0.6, 0.5]])  # wrong (rank 2)
    m = retrieval_metrics(scores, [0, 0, 1, 1])
    assert m["t2v_r1"] == pytest.approx(50.0) and m["t2v_r5"] == 100.0
    assert m["t2v_medr"] == 1.5 and m["t2v_meanr"] == 1.5
    # v2t: video 0's best caption is caption 0 (0.9, nothing wrong above) -> rank 1;
    # video 1's best caption is caption 2 (0.7); caption 1 (0.8, wrong) is above -> rank 2.
    assert m["v2t_r1"] == 50.0 and m["v2t_medr"] == 1.5


def test_recall_at_k_on_a_permutation():
    n = 20
    rng = np.random.default_rng(0)
    target_rank = rng.integers(1, n + 1, n)
    scores = np.zeros((n, n))
    for i, r in enumerate(target_rank):
        others = [j for j in range(n) if j != i]
        scores[i, others] = np.arange(n - 1, 0, -1)  # distinct descending scores
        scores[i, i] = (n - r) + 0.5  # exactly r - 1 wrong videos score higher
    m = retrieval_metrics(scores, np.arange(n))
    for k in (1, 5, 10):
        assert m[f"t2v_r{k}"] == pytest.approx(100 * np.mean(target_rank <= k))
    assert m["t2v_medr"] == np.median(target_rank)


def test_temporal_accuracy_within_groups():
    # Group 0: videos 0-3 (motion), group 1: videos 4-5 (order); caption i describes video i.
    groups = [0, 0, 0, 0, 1, 1]
    kinds = ["motion"] * 4 + ["order"] * 2
    scores = np.full((6, 6), -1.0)
    for i in range(6):
        scores[i, i] = 1.0
    scores[1, 2] = 2.0      # caption 1 prefers video 2 of its own group: a miss
    scores[4, 0] = 5.0      # a video of another group scores higher: irrelevant within the group
    scores[5, 4] = 1.0      # two-way tie with its own video: half a hit
    scores[3, 0] = scores[3, 1] = 1.0 + 1e-7  # three-way tie at the top (within tolerance)
    m = temporal_accuracy(scores, np.arange(6), groups, kinds)
    assert m["temporal_acc"] == pytest.approx((1 + 0 + 1 + 1 / 3 + 1 + 0.5) / 6)
    assert m["temporal_acc_motion"] == pytest.approx((2 + 1 / 3) / 4)
    assert m["temporal_acc_order"] == pytest.approx(0.75)
    assert m["temporal_chance"] == pytest.approx((4 * 0.25 + 2 * 0.5) / 6)
    assert (m["temporal_chance_motion"], m["temporal_chance_order"]) == (0.25, 0.5)


def test_temporal_accuracy_of_a_blind_model_is_chance():
    groups = np.repeat(np.arange(5), [4, 2, 4, 2, 4])
    scores = np.random.default_rng(0).normal(size=(len(groups), len(groups)))
    scores = np.take_along_axis(scores, np.zeros_like(scores, dtype=int), 1)  # rows constant
    m = temporal_accuracy(scores, np.arange(len(groups)), groups)
    assert m["temporal_acc"] == pytest.approx(m["temporal_chance"])


def test_mean_and_median_rank():
    m = recall_metrics(np.array([1, 3, 2, 10]), "t2v")
    assert m["t2v_meanr"] == 4.0 and m["t2v_medr"] == 2.5
    assert m["t2v_r1"] == 25.0 and m["t2v_r5"] == 75.0 and m["t2v_r10"] == 100.0


def test_tie_with_a_wrong_video_counts_against():
    scores = np.array([[0.5, 0.5, 0.1],    # own video 0 tied with video 1 -> rank 2
                       [0.2, 0.2, 0.2]])   # own video 1 tied with both -> rank 3
    m = retrieval_metrics(scores, [0, 1])
    assert m["t2v_r1"] == 0.0 and m["t2v_meanr"] == 2.5


def test_several_captions_per_video_v2t_takes_the_best_caption():
    # video 0 has captions 0, 1, 2; video 1 has caption 3. Video 0's best caption (caption 2, 0.7)
    # is beaten only by caption 3 (0.8, wrong): rank 2, although its other captions rank lower.
    scores = np.array([[0.1, 0.0],
                       [0.2, 0.0],
                       [0.7, 0.0],
                       [0.8, 0.9]])
    m = retrieval_metrics(scores, [0, 0, 0, 1])
    assert m["v2t_meanr"] == (2 + 1) / 2 and m["v2t_r1"] == 50.0
    # t2v: captions 0-2 rank video 0 first; caption 3 ranks video 1 first
    assert m["t2v_r1"] == 100.0


def test_separate_v2t_scores_are_used_for_v2t_only():
    t2v = np.eye(3)
    v2t = np.eye(3)[::-1].copy()
    m = retrieval_metrics(t2v, np.arange(3), v2t)
    assert m["t2v_r1"] == 100.0 and m["v2t_r1"] == pytest.approx(100 / 3)


def test_dual_softmax_hand_computed():
    # texts x videos; video 0 is a "hub" that both texts like. temp 10.
    s = np.array([[0.6, 0.5],
                  [0.7, 0.1]])
    t2v, v2t = dual_softmax(s, temp=10.0)
    e = math.e
    # t2v: softmax over the texts of each video column: col 0 logits (6, 7), col 1 (5, 1)
    expected_t2v = [[0.6 * 1 / (1 + e), 0.5 * e ** 4 / (1 + e ** 4)],
                    [0.7 * e / (1 + e), 0.1 * 1 / (1 + e ** 4)]]
    # v2t: softmax over the videos of each text row: row 0 logits (6, 5), row 1 (7, 1)
    expected_v2t = [[0.6 * e / (1 + e), 0.5 * 1 / (1 + e)],
                    [0.7 * e ** 6 / (1 + e ** 6), 0.1 * 1 / (1 + e ** 6)]]
    np.testing.assert_allclose(t2v, expected_t2v, rtol=1e-12)
    np.testing.assert_allclose(v2t, expected_v2t, rtol=1e-12)
    # the hub no longer wins text 0: its own (video 1) does
    assert retrieval_metrics(s, [1, 0])["t2v_r1"] == 50.0
    assert retrieval_metrics(t2v, [1, 0], v2t)["t2v_r1"] == 100.0


def test_dual_softmax_large_temperature_is_stable():
    s = np.random.default_rng(0).uniform(-1, 1, (5, 7))
    t2v, v2t = dual_softmax(s, temp=1e4)
    assert np.isfinite(t2v).all() and np.isfinite(v2t).all()


def test_topk_indices_best_first_ties_by_column():
    s = np.array([[0.1, 0.9, 0.5, 0.9],
                  [0.3, 0.2, 0.1, 0.0]])
    assert topk_indices(s, 3).tolist() == [[1, 3, 2], [0, 1, 2]]
    assert topk_indices(s, 10).shape == (2, 4)


def test_rerank_only_reorders_within_the_top_k():
    rng = np.random.default_rng(0)
    scores = rng.uniform(-1, 1, (6, 9))
    k = 3
    top = topk_indices(scores, k)
    values = rng.uniform(0, 1, (6, k))
    out = rerank_topk(scores, top, values)
    for i in range(6):
        new_order = np.argsort(-out[i], kind="stable")
        # the top k are the same set, now in the order of the VTM values
        assert set(new_order[:k]) == set(top[i])
        assert new_order[:k].tolist() == top[i][np.argsort(-values[i], kind="stable")].tolist()
        # everything else keeps its score and its order, below the top k
        rest = np.setdiff1d(np.arange(9), top[i])
        np.testing.assert_array_equal(out[i, rest], scores[i, rest])
        assert new_order[k:].tolist() == [j for j in np.argsort(-scores[i], kind="stable") if j in rest]
        assert out[i, top[i]].min() > out[i, rest].max()


def test_rerank_changes_recall_only_inside_the_top_k():
    # caption i describes video i. Video i ranks 2nd by similarity; VTM puts it first.
    n, k = 5, 2
    scores = np.tile(np.linspace(1, 0, n), (n, 1))  # same order for everyone: video 0 first
    for i in range(n):
        scores[i] = np.roll(scores[i], i - 1)  # video i-1 first (1.0), video i second (0.75)
    top = topk_indices(scores, k)
    values = (top == np.arange(n)[:, None]).astype(float)  # VTM: own video 1, other 0
    before = retrieval_metrics(scores, np.arange(n))
    after = retrieval_metrics(rerank_topk(scores, top, values), np.arange(n))
    assert before["t2v_r1"] == 0.0 and after["t2v_r1"] == 100.0
    assert before["t2v_r5"] == after["t2v_r5"]


def test_rerank_with_k_equal_to_all_columns():
    scores = np.array([[0.3, 0.2, 0.1]])
    out = rerank_topk(scores, topk_indices(scores, 3), np.array([[0.1, 0.9, 0.5]]))
    assert np.argsort(-out[0]).tolist() == [1, 2, 0]


def test_mc_accuracy_with_ties():
    # three questions with 3, 2 and 4 options
    pairs = np.array([0, 3, 5, 9])
    scores = np.array([0.1, 0.9, 0.2,     # picks option 1 (answer 1): hit
                       0.5, 0.5,          # two-way tie including the answer: half
                       0.3, 0.8, 0.8, 0.1])  # tie of options 1, 2; answer 0: miss
    acc, chance = mc_accuracy(scores, pairs, [1, 0, 0])
    assert acc == pytest.approx((1 + 0.5 + 0) / 3)
    assert chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)


def test_mean_similarity_averages_the_views():
    temb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vemb = torch.tensor([[[1.0, 0.0], [0.6, 0.8]],    # view 0
                         [[0.0, 1.0], [0.6, 0.8]]])   # view 1
    s = mean_similarity(temb, vemb)
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, [[0.5, 0.6], [0.5, 0.8]], rtol=1e-6)


def test_mc_option_scores_pairs_each_option_with_its_question_video():
    temb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 options
    vemb = torch.tensor([[[2.0, 3.0], [4.0, 5.0]],             # view 0: videos 0, 1
                         [[0.0, 1.0], [0.0, 1.0]]])            # view 1
    s = mc_option_scores(temb, vemb, [0, 0, 1])  # options 0, 1 ask about video 0, option 2 video 1
    np.testing.assert_allclose(s, [(2 + 0) / 2, (3 + 1) / 2, (9 + 1) / 2])


def test_rerank_pairs_lists_each_candidate_pair_once():
    top_t = [[2], [0], [0]]   # text 0's best video is 2, texts 1 and 2 prefer video 0
    top_v = [[1], [1], [0]]   # videos 0 and 1 prefer text 1, video 2 text 0
    pairs = rerank_pairs(top_t, top_v)
    assert pairs == [(0, 2), (1, 0), (1, 1), (2, 0)]  # (0, 2) and (1, 0) come from both sides
    vt, vv = pair_values_at(pairs, [10.0, 20.0, 30.0, 40.0], top_t, top_v)
    assert vt.tolist() == [[10.0], [20.0], [40.0]]
    assert vv.tolist() == [[20.0], [30.0], [10.0]]


def test_rerank_sum_adds_vtm_log_odds_to_the_vtc_logit():
    np.testing.assert_allclose(rerank_sum([0.0, 2.0], [0.5, -0.25], 10.0), [5.0, -0.5])


def test_rerank_reorders_both_directions_by_the_pair_scores():
    s = np.array([[0.9, 0.8, 0.1],
                  [0.2, 0.7, 0.6]])
    favoured = {(0, 1), (1, 2), (1, 0)}  # VTM's matches
    asked = []

    def score_pairs(pairs):
        asked.extend(pairs)
        return np.array([1.0 if p in favoured else 0.0 for p in pairs])

    t2v, v2t = rerank(s, s, 2, score_pairs)
    assert asked == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # each pair scored once
    # text 0: top 2 {0, 1}, VTM picks 1; text 1: top 2 {1, 2}, VTM picks 2; the rest below
    assert np.argsort(-t2v, axis=1, kind="stable").tolist() == [[1, 0, 2], [2, 1, 0]]
    # per video over the two texts: video 0 -> text 1, video 1 -> text 0, video 2 -> text 1
    assert np.argmax(v2t, axis=0).tolist() == [1, 0, 1]
    assert retrieval_metrics(t2v, [1, 2], v2t)["t2v_r1"] == 100.0


# ---------------------------------------------------------------------------- time diagnostics

def test_temporal_hits_are_the_accuracy_per_caption():
    groups = [0, 0, 1, 1]
    scores = np.eye(4)
    scores[1, 0] = 2.0  # caption 1 picks video 0: a miss
    scores[2, 3] = 1.0  # caption 2 ties its own video with video 3: half a hit
    hits, chance = temporal_hits(scores, np.arange(4), groups)
    assert hits.tolist() == [1.0, 0.0, 0.5, 1.0] and chance.tolist() == [0.5] * 4


def test_group_bootstrap_ci_exact_and_deterministic():
    # every group has the same mean: every resample gives it, so the interval is that point
    lo, hi = group_bootstrap_ci([1, 0, 0, 1, 1, 0], [0, 0, 1, 1, 2, 2], n_boot=200, seed=3)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)
    # two groups of means 1 and 0: a resample draws k of 2 groups of mean 1 with prob 1/4, 1/2, 1/4
    values, groups = [1, 1, 0, 0], [0, 0, 1, 1]
    a = group_bootstrap_ci(values, groups, n_boot=1000, seed=0)
    assert a == group_bootstrap_ci(values, groups, n_boot=1000, seed=0)  # deterministic
    assert a == (0.0, 1.0)
    # the resample statistic is the mean over the drawn groups' values, computed by hand here
    values, groups = np.array([1.0, 0.0, 1.0, 1.0, 0.0]), np.array([5, 5, 7, 7, 9])
    draws = np.random.default_rng(4).integers(0, 3, size=(50, 3))
    sums, counts = np.array([1.0, 2.0, 0.0]), np.array([2.0, 2.0, 1.0])
    stats = sums[draws].sum(1) / counts[draws].sum(1)
    ref = tuple(float(q) for q in np.quantile(stats, [0.025, 0.975]))
    assert group_bootstrap_ci(values, groups, n_boot=50, seed=4) == pytest.approx(ref)
    assert all(math.isnan(x) for x in group_bootstrap_ci([], []))


def test_caption_spread_of_hand_made_embeddings():
    e = np.array([[1.0, 0.0], [0.0, 2.0],     # group 0: orthogonal -> distance 1
                  [3.0, 0.0], [1.0, 0.0],     # group 1: same direction -> 0
                  [0.0, 1.0]])                # group 2: one caption, no pair -> left out
    assert caption_spread(e, [0, 0, 1, 1, 2]) == pytest.approx(0.5)
    # three captions: pairwise distances 1 - cos = (1, 2, 1) -> mean 4/3
    tri = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert caption_spread(tri, [0, 0, 0]) == pytest.approx(4 / 3)
    assert math.isnan(caption_spread(e[:1], [0]))


def test_v2t_in_group_blind_text_tower_scores_chance():
    # 4 videos of one group, one caption each; every video prefers caption 0 -> only video 0 hits
    scores = np.tile([[2.0], [1.0], [0.5], [0.0]], (1, 4))
    hits, chance = v2t_in_group(scores, np.arange(4), [0, 0, 0, 0])
    assert hits.tolist() == [1.0, 0.0, 0.0, 0.0] and chance.tolist() == [0.25] * 4
    assert hits.mean() == pytest.approx(chance.mean())
    # identical captions: a 4-way tie at the top earns 1/4 each
    hits, _ = v2t_in_group(np.ones((4, 4)), np.arange(4), [0, 0, 0, 0])
    assert hits.tolist() == [0.25] * 4
    # two groups; captions of another group never compete; video 2 has two captions (2, 3)
    scores = np.array([[0.9, 0.1, 5.0],
                       [0.2, 0.8, 5.0],
                       [5.0, 5.0, 0.3],
                       [5.0, 5.0, 0.1]])
    hits, chance = v2t_in_group(scores, [0, 1, 2, 2], [0, 0, 1])
    assert hits.tolist() == [1.0, 1.0, 1.0] and chance.tolist() == [0.5, 0.5, 1.0]


def test_group_rank_labels_name_the_variant():
    caps = ["a red circle moves up", "a red circle moves left", "a red circle moves down",
            "a red circle moves right", "a blue star moves left", "a blue star moves down",
            "a blue star moves up", "a blue star moves right",
            "a red circle appears, then a blue star", "a blue star appears, then a red circle"]
    groups = [0] * 4 + [1] * 4 + [2, 2]
    assert group_rank_labels(caps, groups).tolist() == [3, 1, 0, 2, 1, 0, 3, 2, 1, 0]


def test_linear_probe_separable_and_random():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 4)
    labels = np.tile(np.arange(4), 40)
    centres = 3.0 * np.eye(4, 16)
    offsets = np.concatenate([np.zeros((40, 4)), 3.0 * rng.normal(size=(40, 12))], 1)
    x = centres[labels] + 0.3 * rng.normal(size=(160, 16)) + offsets[groups]  # separable
    p = linear_probe(x, labels, groups, seed=0)
    assert p["acc"] == 1.0 and p["chance"] == 0.25 and p["classes"] == 4
    assert p["train"] == 80 and p["test"] == 80
    assert linear_probe(x, labels, groups, seed=0) == p  # deterministic
    noise = rng.normal(size=(160, 16))  # features that carry no label: about chance
    q = linear_probe(noise, labels, groups, seed=0)
    assert abs(q["acc"] - 0.25) < 0.15
    # the split is by group: no group in both parts, so a per-group feature cannot leak the label
    per_group = rng.normal(size=(40, 16))[groups]
    r = linear_probe(np.concatenate([per_group, noise], 1), labels, groups, seed=1)
    assert abs(r["acc"] - 0.25) < 0.15
    assert linear_probe(x[:4], labels[:4], groups[:4]) is None  # one group: no held-out part
    assert linear_probe(x, np.zeros(160, int), groups) is None  # one label


def test_time_diagnostics_per_kind():
    # group 0: motion, 4 videos; group 1: order, 2 videos; caption i describes video i
    caps = ["a moves down", "a moves left", "a moves right", "a moves up",
            "a appears, then b", "b appears, then a"]
    groups, kinds = [0, 0, 0, 0, 1, 1], ["motion"] * 4 + ["order"] * 2
    temb = np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    vemb = np.array([[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    scores = temb @ vemb.T
    d = time_diagnostics(scores, temb, vemb, np.arange(6), caps, groups, kinds, n_boot=100)
    assert d["motion_acc"] == pytest.approx(0.25) and d["order_acc"] == 1.0
    assert d["motion_ci"] == pytest.approx([0.25, 0.25]) and d["order_ci"] == [1.0, 1.0]
    assert d["motion_groups"] == 1 and d["order_groups"] == 1
    assert d["motion_caption_spread"] == pytest.approx(0.0)
    assert d["order_caption_spread"] == pytest.approx(1.0)
    assert d["motion_v2t_in_group"] == pytest.approx(0.25) and d["order_v2t_in_group"] == 1.0
    assert d["motion_v2t_in_group_chance"] == 0.25 and d["order_v2t_in_group_chance"] == 0.5
    assert d["motion_probe_acc"] is None and d["order_probe_chance"] is None  # one group each
    # the within-group accuracy is taken on hit_scores when given (re-ranked scores)
    d2 = time_diagnostics(scores, temb, vemb, np.arange(6), caps, groups, kinds,
                          hit_scores=np.eye(6), n_boot=10)
    assert d2["motion_acc"] == 1.0 and d2["motion_v2t_in_group"] == pytest.approx(0.25)


def test_r1_intervals_hold_the_point_and_narrow_with_more_data():
    from hvfm.metrics import r1_intervals
    rng = np.random.default_rng(0)
    for n in (40, 400):
        scores = rng.normal(size=(n, n)) + 1.2 * np.eye(n)
        m = retrieval_metrics(scores, np.arange(n))
        ci = r1_intervals(scores, np.arange(n), n_boot=500)
        for d in ("t2v", "v2t"):
            lo, hi = ci[f"{d}_r1_ci"]
            assert lo <= m[f"{d}_r1"] <= hi and 0 < hi - lo < (40 if n == 40 else 15)
    perfect = r1_intervals(np.eye(5), np.arange(5))
    assert perfect["t2v_r1_ci"] == [100.0, 100.0]
