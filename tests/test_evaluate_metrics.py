"""Retrieval metrics and temporal accuracy on hand-made score matrices with known ranks."""
import numpy as np
import pytest

from hvfm.evaluate import ranks, retrieval_metrics, temporal_accuracy


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
    scores[5, 4] = 1.0      # tie with its own video: a miss
    m = temporal_accuracy(scores, np.arange(6), groups, kinds)
    assert m["temporal_acc"] == pytest.approx(4 / 6)
    assert m["temporal_acc_motion"] == pytest.approx(3 / 4) and m["temporal_acc_order"] == 0.5
    assert m["temporal_chance"] == pytest.approx((4 * 0.25 + 2 * 0.5) / 6)
