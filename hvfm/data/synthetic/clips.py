"""Built-in synthetic video-text corpus whose captions can only be told apart with TIME.

Every clip is a few coloured shapes drawn with numpy on one fixed background colour and encoded as
a real H.264 mp4 (PyAV, libx264, yuv420p, one encoder thread, 8 fps). Two kinds, about half each:

* motion -- one object moves left/right/up/down in a straight line, covering a random 30-55% of
  the frame over the clip, and stays wholly inside the frame: "a red circle moves left".
* order  -- two different objects at random static positions; the first is shown until a switch
  time s, the second after it: "a red circle appears, then a blue square".

Leak-proofing (see DESIGN.md "What is known about learning time on the synthetic task"):

* A motion clip is parametrised by where the object is at the middle of the clip; that point is
  uniform over the positions that keep the whole path inside the frame, the same set for both
  directions of an axis. So the middle frame says nothing about the direction, and a clip played
  backwards is exactly the clip of the opposite direction through the same middle point. (The
  first and last frames do hint at the direction, as in real video; only order in time tells it.)
  Paths do not wrap around the edges: "x grows with time" stays a simple feature to learn.
* The switch time s of an order clip is uniform in [1/4, 3/4] of the clip, a distribution that is
  symmetric under time reversal (s -> 1 - s): the middle frame shows either object half the time.
* The default clip has an odd number of frames (17), so the middle frame, which a one-frame
  evaluation looks at, is the exact centre of time reversal.
* One background colour for every clip, no per-clip noise or texture: nothing to fingerprint.
* Every clip's parameters come from a numpy Generator seeded by (seed, split, index), never from
  global state; train and test use different streams. Output is identical for any worker count.

Layout written by `generate(out)`:
  out/train.csv                        WebVid CSV (videoid,contentUrl,duration,page_dir,name);
  out/train/{page_dir}/{videoid}.mp4   1000 clips per page dir; video root is out/train
  out/test.json                        MSR-VTT style [{"video", "caption", "group", "kind",
  out/test/g{group}_{variant}.mp4        "variant"}]; video root is out/test
  out/meta.json, out/.complete         parameters and counts; the marker is written last

The test split is made of groups holding every temporal variant of the same objects (a motion
group: one object in all 4 directions through the same middle point; an order group: one pair in
both orders, the second clip being the first played backwards) with one canonical caption
template, so captions in a group differ only in time words, and all clips of a group share their
middle frame: a one-frame view of a group cannot do better than chance.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from .common import build_once, default_cache_dir, is_complete, run_tasks, shape_mask  # noqa: F401

VERSION = 3  # 3: x264 without mbtree (byte-identical output)
GENERATOR = f"hvfm.data.synthetic v{VERSION}"
FPS = 8
CLIPS_PER_PAGE = 1000
BACKGROUND = (40, 40, 48)
# The built-in corpus: 4000 training clips; 1200 test clips = 400 groups, 200 per kind (motion
# groups of 4 clips, order groups of 2), enough for a 95% interval of about +-0.05 per kind.
DEFAULT_TRAIN, DEFAULT_TEST = 4000, 1200
COLOURS = {
    "red": (230, 30, 30), "green": (30, 200, 50), "blue": (40, 80, 255), "yellow": (245, 225, 30),
    "white": (250, 250, 250), "cyan": (30, 225, 230), "magenta": (225, 40, 225),
    "orange": (255, 140, 0),
}
SHAPES = ("circle", "square", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image axes
TRAVEL_RANGE = (0.30, 0.55)        # path length over the clip, fraction of the frame size
RADIUS_RANGE = (0.07, 0.14)        # fraction of the frame size
SWITCH_RANGE = (0.25, 0.75)        # fraction of the clip duration

_MOTION_TEMPLATES = ("{a} {obj} moves {d}", "{a} {obj} moving {dp}", "{obj} slides {d}",
                     "{a} {obj} travels {d} across the frame", "{a} {obj} drifting {d}",
                     "the {obj} goes {d}")
_ORDER_TEMPLATES = ("{a1} {o1} appears, then {a2} {o2}", "first {a1} {o1}, then {a2} {o2}",
                    "{a1} {o1} is shown, then {a2} {o2} replaces it",
                    "{a1} {o1} and then {a2} {o2}", "{a1} {o1}, then {a2} {o2} shows up")


# ----------------------------------------------------------------------------- parameters
def _rng(seed, split, index):
    return np.random.default_rng([int(seed), {"train": 0, "test": 1}[split], int(index)])


def _object(rng, inside=False):
    r = float(rng.uniform(*RADIUS_RANGE))
    lo, hi = (r, 1 - r) if inside else (0.0, 1.0)
    return {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
            "radius": r, "x": float(rng.uniform(lo, hi)), "y": float(rng.uniform(lo, hi))}


def sample_motion(rng, direction=None, any_axis=False):
    """Parameters of a motion clip: sizes as fractions of the frame; (x, y) is the middle point.

    The middle point is uniform over the points whose whole path stays inside the frame: along
    the motion axis in [r + travel/2, 1 - r - travel/2], across it in [r, 1 - r]. `any_axis`
    keeps travel/2 of margin on both axes, so every direction is valid from the same middle point.
    """
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    r = float(rng.uniform(*RADIUS_RANGE))
    travel = float(rng.uniform(*TRAVEL_RANGE))
    d = direction or str(rng.choice(list(DIRECTIONS)))
    along = DIRECTIONS[d][0] != 0  # True: moves along x
    margin = r + travel / 2
    x = float(rng.uniform(margin, 1 - margin) if along or any_axis else rng.uniform(r, 1 - r))
    y = float(rng.uniform(margin, 1 - margin) if not along or any_axis else rng.uniform(r, 1 - r))
    return {"kind": "motion", "colour": colour, "shape": shape, "radius": r, "x": x, "y": y,
            "travel": travel, "direction": d}


def sample_order(rng):
    """Parameters of an order clip: two objects differing in colour and/or shape, switch time."""
    first = _object(rng, inside=True)
    second = _object(rng, inside=True)
    while (second["colour"], second["shape"]) == (first["colour"], first["shape"]):
        second.update(colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)))
    return {"kind": "order", "first": first, "second": second,
            "switch": float(rng.uniform(*SWITCH_RANGE))}


def sample_params(rng):
    """A uniformly drawn train clip: motion or order with probability 1/2 each."""
    return sample_motion(rng) if rng.random() < 0.5 else sample_order(rng)


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


def caption(params, rng=None):
    """Caption of a clip: the canonical template when rng is None, else a random template."""
    if params["kind"] == "motion":
        obj = f"{params['colour']} {params['shape']}"
        d = params["direction"]
        t = _MOTION_TEMPLATES[0 if rng is None else int(rng.integers(len(_MOTION_TEMPLATES)))]
        dp = f"to the {d}" if d in ("left", "right") else d
        return t.format(a=_article(obj), obj=obj, d=d, dp=dp)
    o1 = f"{params['first']['colour']} {params['first']['shape']}"
    o2 = f"{params['second']['colour']} {params['second']['shape']}"
    t = _ORDER_TEMPLATES[0 if rng is None else int(rng.integers(len(_ORDER_TEMPLATES)))]
    return t.format(a1=_article(o1), o1=o1, a2=_article(o2), o2=o2)


# ----------------------------------------------------------------------------- rendering
def _draw(video, obj, cx, cy, size, frames_mask=None):
    """Draw obj centred at (cx, cy) pixels (arrays over frames)."""
    grid = np.arange(size, dtype=np.float64) + 0.5
    dx = grid[None, None, :] - cx[:, None, None]
    dy = grid[None, :, None] - cy[:, None, None]
    mask = shape_mask(obj["shape"], dx, dy, obj["radius"] * size)
    if frames_mask is not None:
        mask &= frames_mask[:, None, None]
    video[mask] = COLOURS[obj["colour"]]


def render_clip(params, frames, size):
    """Render a clip in memory: (frames, size, size, 3) uint8 RGB."""
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = BACKGROUND
    t = np.arange(frames, dtype=np.float64)
    if params["kind"] == "motion":
        ux, uy = DIRECTIONS[params["direction"]]
        offset = params["travel"] * size * (t / max(frames - 1, 1) - 0.5)  # 0 at the middle
        _draw(video, params, params["x"] * size + ux * offset, params["y"] * size + uy * offset, size)
    elif params["kind"] == "order":
        first_shown = (t + 0.5) / frames < params["switch"]  # frame centre before the switch
        for obj, shown in ((params["first"], first_shown), (params["second"], ~first_shown)):
            pos = np.ones(frames)
            _draw(video, obj, pos * obj["x"] * size, pos * obj["y"] * size, size, shown)
    else:
        raise ValueError(f"unknown clip kind {params['kind']!r}")
    return video


def encode_mp4(video, path, fps=FPS):
    """Write (F, S, S, 3) uint8 RGB frames as an H.264 yuv420p mp4, single-threaded."""
    import av

    frames, height, width, _ = video.shape
    with av.open(str(path), mode="w", format="mp4") as container:
        # mbtree off: with it, one-threaded x264 still wrote different bytes for the same frames
        # in about 1 encode in 20 (pixels off by up to 4); without it 1,200 encodes were identical
        stream = container.add_stream("libx264", rate=fps,
                                      options={"threads": "1", "crf": "18", "preset": "fast",
                                               "x264-params": "mbtree=0"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for i in range(frames):
            rgb = av.VideoFrame.from_ndarray(np.ascontiguousarray(video[i]), format="rgb24")
            frame = rgb.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _render_and_write(task):
    path, params, frames, size = task
    encode_mp4(render_clip(params, frames, size), path)
    return path


# ----------------------------------------------------------------------------- corpus
@dataclass
class CorpusPaths:
    root: Path
    train_csv: Path
    train_root: Path
    test_json: Path
    test_root: Path

    @classmethod
    def of(cls, root):
        root = Path(root)
        return cls(root, root / "train.csv", root / "train", root / "test.json", root / "test")


def _duration(frames):
    s = max(1, int(round(frames / FPS)))
    return f"PT{s // 3600:02d}H{s // 60 % 60:02d}M{s % 60:02d}S"


def _test_group_count(n_test):
    """Groups alternate motion (4 clips) / order (2 clips); the count closest to n_test, >= 2."""
    return min(range(2, n_test // 2 + 3), key=lambda g: (abs(_group_clips(g) - n_test), g))


def _group_clips(groups):
    return 4 * ((groups + 1) // 2) + 2 * (groups // 2)


def _train_items(n_train, seed):
    for i in range(n_train):
        rng = _rng(seed, "train", i)
        params = sample_params(rng)
        vid, page = str(1_000_000 + i), f"{i // CLIPS_PER_PAGE:03d}"
        yield vid, page, params, caption(params, rng)


def _test_items(n_test, seed):
    for g in range(_test_group_count(n_test)):
        rng = _rng(seed, "test", g)
        if g % 2 == 0:
            base = sample_motion(rng, any_axis=True)
            variants = [(d, {**base, "direction": d}) for d in DIRECTIONS]
        else:
            base = sample_order(rng)  # B>A is A>B played backwards: switch s -> 1 - s
            swapped = {**base, "first": base["second"], "second": base["first"],
                       "switch": 1.0 - base["switch"]}
            variants = [("A>B", base), ("B>A", swapped)]
        for variant, params in variants:
            name = f"g{g:04d}_{variant.replace('>', '')}.mp4"
            yield name, {"video": name, "caption": caption(params), "group": g,
                         "kind": params["kind"], "variant": variant}, params


def _params_meta(n_train, n_test, frames, size, seed):
    return {"generator": GENERATOR, "version": VERSION, "train": int(n_train),
            "test": int(n_test), "frames": int(frames), "size": int(size), "seed": int(seed),
            "fps": FPS}


def generate(out_dir, n_train=DEFAULT_TRAIN, n_test=DEFAULT_TEST, frames=17, size=96, seed=0, workers=1,
             progress=False):
    """Write the corpus under out_dir (see module docstring); returns its CorpusPaths."""
    if size % 2 or size < 8:
        raise ValueError(f"size must be even and >= 8 (yuv420p), got {size}")
    if frames < 2 or n_train < 1:
        raise ValueError("need frames >= 2 and n_train >= 1")
    paths = CorpusPaths.of(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    (paths.root / ".complete").unlink(missing_ok=True)
    train = list(_train_items(n_train, seed))
    test = list(_test_items(n_test, seed))
    tasks = []
    for vid, page, params, _ in train:
        (paths.train_root / page).mkdir(parents=True, exist_ok=True)
        tasks.append((str(paths.train_root / page / f"{vid}.mp4"), params, frames, size))
    paths.test_root.mkdir(parents=True, exist_ok=True)
    tasks += [(str(paths.test_root / name), params, frames, size) for name, _, params in test]

    run_tasks(_render_and_write, tasks, workers, progress and 500, "clips", chunksize=16)

    with open(paths.train_csv, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for vid, page, _, cap in train:
            w.writerow([vid, f"{page}/{vid}.mp4", _duration(frames), page, cap])
    with open(paths.test_json, "w", encoding="utf-8") as f:
        json.dump([entry for _, entry, _ in test], f, indent=1)
    kinds = [params["kind"] for _, _, params, _ in train]
    meta = {**_params_meta(n_train, n_test, frames, size, seed), "counts": {
        "train": len(train), "train_motion": kinds.count("motion"),
        "train_order": kinds.count("order"), "test": len(test),
        "test_groups": len({e["group"] for _, e, _ in test})}}
    text = json.dumps(meta, indent=1, sort_keys=True)
    (paths.root / "meta.json").write_text(text)
    (paths.root / ".complete").write_text(text)  # last: marks the folder as complete
    return paths


def ensure_corpus(cache_dir=None, n_train=DEFAULT_TRAIN, n_test=DEFAULT_TEST, frames=17, size=96, seed=0,
                  workers=1, progress=False):
    """Generate the corpus for these parameters once under cache_dir and reuse it afterwards.

    Generation goes to a temporary sibling folder that is renamed into place; a process that
    loses a race discards its copy and uses the winner's."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"n{n_train}_t{n_test}_f{frames}_s{size}_seed{seed}_v{VERSION}"
    want = _params_meta(n_train, n_test, frames, size, seed)
    build_once(final, lambda root: is_complete(root, want),
               lambda tmp: generate(tmp, n_train, n_test, frames, size, seed, workers, progress))
    return CorpusPaths.of(final)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's help ends with its default, unless it has none (None)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m hvfm.data.synthetic", description=__doc__.split(
        "\n")[0] + " With --images: the image-text corpus of stills.",
        formatter_class=_DefaultsHelp)
    ap.add_argument("out", help="output folder")
    ap.add_argument("--train", type=int, default=DEFAULT_TRAIN, help="number of train clips")
    ap.add_argument("--test", type=int, default=DEFAULT_TEST, help="test clips (rounded to whole groups)")
    ap.add_argument("--frames", type=int, default=17, help="odd: the middle frame is the centre")
    ap.add_argument("--size", type=int, default=96, help="frame side in pixels (even)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of every clip's and still's random draws: the same flags and seed "
                         "give the same corpus")
    ap.add_argument("--workers", type=int, default=1, help="processes rendering clips")
    ap.add_argument("--images", type=int, default=None, metavar="N",
                    help="write the image-text corpus instead (stage 1): N training stills, "
                         "OUT/images.json and OUT/images_test.json (see stills.py)")
    ap.add_argument("--images-test", type=int, default=500, help="held-out stills with --images")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.images is not None:
        from .stills import generate_images
        out = generate_images(a.out, a.images, a.images_test, a.size, a.seed, a.workers, progress=True)
        print(f"wrote {a.images} train + {a.images_test} test stills to {out} in "
              f"{time.time() - t0:.1f}s; train with --train-json {out / 'images.json'} "
              f"--video-root {out}")
        return
    p = generate(a.out, a.train, a.test, a.frames, a.size, a.seed, a.workers, progress=True)
    meta = json.loads((p.root / "meta.json").read_text())
    print(f"wrote {meta['counts']['train']} train + {meta['counts']['test']} test clips to "
          f"{p.root} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
