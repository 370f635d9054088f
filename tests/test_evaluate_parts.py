"""The pieces hvfm.evaluate keeps (sharding across ranks) and the names it re-exports after the
split into hvfm.metrics and hvfm.data.loading.evaluation."""
import numpy as np
import pytest

import hvfm.evaluate as ev
from hvfm import metrics
from hvfm.data.loading import evaluation as eval_data
from hvfm.evaluate import shard_range


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shard_ranges_cover_everything_once_in_order(world):
    for n in range(0, 12):
        ranges = [shard_range(n, r, world) for r in range(world)]
        assert np.concatenate([np.arange(a, b) for a, b in ranges]).tolist() == list(range(n))
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        shard_range(5, world, world)


def test_moved_names_stay_importable_from_hvfm_evaluate():
    """Callers import these from hvfm.evaluate (hvfm/train.py: evaluate; tests: main); the moved
    ones must be the very objects of their new modules, not copies."""
    for name in ("ranks", "recall_metrics", "retrieval_metrics", "temporal_accuracy",
                 "dual_softmax", "topk_indices", "rerank_topk", "mc_accuracy", "DSL_TEMP"):
        assert getattr(ev, name) is getattr(metrics, name), name
    for name in ("ClipDataset", "clip_batches", "subset_annotations", "read_multiple_choice",
                 "detect_format"):
        assert getattr(ev, name) is getattr(eval_data, name), name
    for name in ("evaluate", "evaluate_mc", "main", "run", "parse_args", "score_matrix",
                 "load_checkpoint", "encode_texts", "encode_videos", "vtm_scores"):
        assert callable(getattr(ev, name)), name
