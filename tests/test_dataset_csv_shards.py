"""Huge WebVid CSVs: streamed column-wise into flat buffers, each rank keeping only its rows."""
import math
import tracemalloc

import numpy as np
import pytest

from hvfm.data import DataError, build_loader, build_tokenizer, read_annotations
from hvfm.data.sources.annotations import StringColumn

ROWS = 200_000


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory):
    """200k WebVid rows (every 1000th without a caption), one real file per layout probe."""
    d = tmp_path_factory.mktemp("big")
    root = d / "videos"
    (root / "p0").mkdir(parents=True)
    for i in range(0, 64 * 4):  # the first rows of every rank exist (layout detection)
        (root / "p0" / f"{i}.mp4").write_bytes(b"x")
    lines = ["videoid,contentUrl,duration,page_dir,name"]
    for i in range(ROWS):
        name = "" if i % 1000 == 999 else f"clip {i} of a long, quoted caption"
        lines.append(f'{i},https://example.com/{i}.mp4,PT00H00M10S,p0,"{name}"')
    path = d / "webvid.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, root


def _ids(ann):
    return np.array([int(v.rsplit("/", 1)[-1][:-4]) for v in ann.videos])


def test_each_rank_holds_only_its_rows(big_csv):
    path, root = big_csv
    world = 4
    anns = [read_annotations(path, root, rank=r, world_size=world) for r in range(world)]
    whole = read_annotations(path, root)
    assert whole.shard is None and len(whole) == ROWS - ROWS // 1000
    seen = []
    for r, ann in enumerate(anns):
        ids = _ids(ann)
        assert ann.shard == (r, world, ROWS)
        assert (ids % world == r).all()  # only this rank's rows ...
        rows = np.arange(r, ROWS, world)
        assert ids.tolist() == rows[rows % 1000 != 999].tolist()  # ... all of them, in order,
        assert ann.dropped == int((rows % 1000 == 999).sum())  # but the captionless ones
        assert isinstance(ann.videos, StringColumn) and isinstance(ann.pair_caption, StringColumn)
        # flat buffers: about a quarter of the whole corpus's bytes, no Python object per row
        assert ann.videos.nbytes + ann.pair_caption.nbytes < 0.3 * (whole.videos.nbytes + whole.pair_caption.nbytes)
        assert ann.pair_caption[0] == f"clip {ids[0]} of a long, quoted caption"
        seen.append(ids)
    assert sorted(np.concatenate(seen).tolist()) == sorted(_ids(whole).tolist())  # a partition


def test_sharded_read_peaks_at_a_fraction_of_the_file(big_csv):
    """Python heap at its highest while one rank of 8 reads the 200k rows: about twice what the
    rank keeps (its flat buffers, copied once when built), a fraction of the file itself; a list
    of row dicts would take several times the file."""
    path, root = big_csv
    tracemalloc.start()
    try:
        ann = read_annotations(path, root, rank=1, world_size=8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    held = ann.videos.nbytes + ann.alt_videos.nbytes + ann.pair_caption.nbytes
    assert held < path.stat().st_size / 8
    assert peak < 3 * held and peak < 0.35 * path.stat().st_size, (peak, held)


def test_loader_samples_within_the_shard_and_ranks_draw_alike(big_csv, tmp_path):
    path, root = big_csv
    tok = build_tokenizer(["clip of a long quoted caption"] * 4, tmp_path / "tok", vocab_size=300)
    world = 3
    per_rank = math.ceil(ROWS / world)
    for r in range(world):
        ann = read_annotations(path, root, rank=r, world_size=world)
        loader = build_loader(ann, tok, batch_size=4, num_workers=0, rank=r, world_size=world, seed=1)
        idx = loader.sampler.indices()
        assert len(idx) == per_rank  # every rank the same number of samples (equal steps)
        assert idx.max() < len(ann) and len(np.unique(idx)) == len(ann)  # its own rows, all of them
    ann = read_annotations(path, root, rank=0, world_size=world)
    with pytest.raises(DataError, match="read for rank 0 of 3, loaded by rank 1 of 3"):
        build_loader(ann, tok, batch_size=4, num_workers=0, rank=1, world_size=world)


def test_bad_shard_arguments_fail_clearly(big_csv):
    path, root = big_csv
    with pytest.raises(ValueError, match="rank 4 of world size 4 is not a valid shard"):
        read_annotations(path, root, rank=4, world_size=4)
