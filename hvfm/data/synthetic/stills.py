"""Built-in synthetic image-text corpus: the stills a built-in image CLIP is trained on (stage 1).

Each image shows one to three coloured shapes on a background that is a plain palette colour,
a noisy colour or a two-colour gradient. Its caption names every object's size, colour, shape and
place on a 3x3 grid ("a small red star at the top left"), or the relation between two objects
("a blue circle to the left of a large yellow square"). Words of place are the same words the
video captions use for motion ("left", "right", "up", "down" beside "top", "bottom"), so the text
tower meets them before post-pretraining. Captions are precise enough that an image model must
encode *where* things are, not only what they are.

Vocabulary: 13 colours (red, green, blue, yellow, white, black, grey, purple, orange, pink, cyan,
magenta, brown), 6 shapes (circle, square, triangle, cross, star, diamond), 3 sizes. Objects
always stand out from their background (colour distance checked against the background's
colours), and two objects of one image never share colour and shape.

Layout written by `generate_images(out)`:
  out/images/{split}/{page}/{index}.png   split train or test, 1000 per page folder
  out/images.json                   [{"image": "images/000/0000000.png", "caption": text}, ...]
  out/images_test.json              held-out stills, same format (another random stream)
  out/images_meta.json, out/.images_complete   parameters and counts; the marker is written last

Use it as `--train-json OUT/images.json --video-root OUT` (paths are relative to OUT).
Every image's parameters come from a numpy Generator seeded by (seed, split, index), so the
corpus is identical for any worker count.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .common import build_once, default_cache_dir, is_complete, run_tasks, shape_mask

IMAGE_VERSION = 3
PER_PAGE = 1000
DEFAULT_IMAGES, DEFAULT_IMAGES_TEST = 8000, 500  # the built-in corpus
IMAGE_COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 240), "yellow": (245, 225, 30),
    "white": (250, 250, 250), "black": (10, 10, 10), "grey": (128, 128, 128),
    "purple": (120, 40, 170), "orange": (255, 140, 0), "pink": (255, 150, 190),
    "cyan": (30, 225, 230), "magenta": (225, 40, 225), "brown": (130, 75, 30),
}
IMAGE_SHAPES = ("circle", "square", "triangle", "cross", "star", "diamond")
DARK_BACKGROUNDS = {"night": (40, 40, 48), "charcoal": (22, 22, 24), "navy": (22, 28, 62),
                    "forest": (22, 48, 30), "maroon": (58, 22, 24), "slate": (62, 70, 82)}
LIGHT_BACKGROUNDS = {"silver": (200, 200, 205), "beige": (222, 212, 182), "sky": (172, 200, 228)}
BACKGROUNDS = {**DARK_BACKGROUNDS, **LIGHT_BACKGROUNDS}  # never named in captions
SIZES = (("small", 0.07, 0.11), ("medium", 0.11, 0.16), ("large", 0.16, 0.22))  # radius / frame
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
MIN_CONTRAST = 110.0  # Euclidean RGB distance between an object and every background colour


# ----------------------------------------------------------------------------- parameters
def _rng(seed, split, index):
    return np.random.default_rng([int(seed), {"train": 10, "test": 11}[split], int(index)])


def _background(rng):
    """Plain, noisy or two-tone gradient; muted tones (mostly dark, a quarter light) that the
    object colours stand out from, as the built-in videos' dark background does."""
    kind = str(rng.choice(["plain", "noise", "gradient"], p=[0.4, 0.3, 0.3]))
    names = list(DARK_BACKGROUNDS if rng.random() < 0.75 else LIGHT_BACKGROUNDS)
    a = str(rng.choice(names))
    bg = {"kind": kind, "colours": [a]}
    if kind == "gradient":
        b = str(rng.choice([n for n in names if n != a]))
        bg.update(colours=[a, b], angle=float(rng.uniform(0, 2 * np.pi)))
    elif kind == "noise":
        bg["sigma"] = float(rng.uniform(6, 20))
    return bg


def _rgb(name):
    return np.array(IMAGE_COLOURS.get(name) or BACKGROUNDS[name], np.float64)


def _contrast_ok(colour, bg):
    c = _rgb(colour)
    return all(np.linalg.norm(c - _rgb(b)) >= MIN_CONTRAST for b in bg["colours"])


def _place(x, y):
    """3x3 grid words (row, column) of a point in [0, 1]^2."""
    return ROWS[min(2, int(y * 3))], COLS[min(2, int(x * 3))]


def sample_image(rng):
    """Parameters of one still: background, 1-3 objects placed without overlapping much."""
    bg = _background(rng)
    n = int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15]))
    objects = []
    for _ in range(50 * n):
        if len(objects) == n:
            break
        colour = str(rng.choice(list(IMAGE_COLOURS)))
        shape = str(rng.choice(IMAGE_SHAPES))
        size, lo, hi = SIZES[int(rng.integers(len(SIZES)))]
        r = float(rng.uniform(lo, hi))
        x, y = (float(v) for v in rng.uniform(r, 1 - r, 2))
        if not _contrast_ok(colour, bg) or any((o["colour"], o["shape"]) == (colour, shape)
                                               for o in objects):
            continue
        if any(np.hypot(x - o["x"], y - o["y"]) < 1.1 * (r + o["radius"]) for o in objects):
            continue
        objects.append({"colour": colour, "shape": shape, "size": size, "radius": r, "x": x, "y": y})
    if not objects:  # every draw clashed (very unlikely): a plain grey background always works
        return sample_image(np.random.default_rng(rng.integers(2**62)))
    return {"background": bg, "objects": objects}


def _article(word):
    return "an" if word[0] in "aeiou" else "a"


_PLACE_PHRASES = {  # (row, column) -> phrases; "up"/"down" as in motion captions
    ("middle", "center"): ("in the center", "in the middle"),
    ("middle", "left"): ("on the left", "at the left"),
    ("middle", "right"): ("on the right", "at the right"),
    ("top", "center"): ("at the top", "up at the top"),
    ("bottom", "center"): ("at the bottom", "down at the bottom"),
}


def place_phrase(row, col, rng):
    options = _PLACE_PHRASES.get((row, col))
    if options is None:  # a corner
        options = (f"at the {row} {col}", f"in the {row} {col} corner",
                   f"{'up' if row == 'top' else 'down'} on the {col}")
    return str(options[int(rng.integers(len(options)))])


def _name(obj, rng, with_size=True):
    words = ([obj["size"]] if with_size else []) + [obj["colour"], obj["shape"]]
    text = " ".join(words)
    return f"{_article(text)} {text}"


def _relation(a, b):
    """Where object a is relative to b, along the axis they differ most on."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def image_caption(params, rng):
    """Caption naming size, colour, shape and place of every object (or a relation of two)."""
    objs = params["objects"]
    if len(objs) == 2 and rng.random() < 0.5:
        a, b = (objs[0], objs[1]) if rng.random() < 0.5 else (objs[1], objs[0])
        return f"{_name(a, rng)} {_relation(a, b)} {_name(b, rng)}"
    parts = [f"{_name(o, rng)} {place_phrase(*_place(o['x'], o['y']), rng)}" for o in objs]
    if len(parts) == 1:  # a verb now and then, as captions of stills have
        verb = _VERBS[int(rng.integers(len(_VERBS)))]
        return verb.format(parts[0]) if "{}" in verb else parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


_VERBS = ("", "", "there is {}", "we see {}", "a picture of {}")  # "{}": the object and its place


# ----------------------------------------------------------------------------- rendering
def _background_pixels(bg, size, rng):
    base = _rgb(bg["colours"][0])
    img = np.empty((size, size, 3), np.float64)
    img[:] = base
    if bg["kind"] == "gradient":
        other = _rgb(bg["colours"][1])
        g = (np.arange(size) + 0.5) / size - 0.5
        ramp = np.cos(bg["angle"]) * g[None, :] + np.sin(bg["angle"]) * g[:, None]
        ramp = (ramp - ramp.min()) / max(ramp.max() - ramp.min(), 1e-9)
        img = base * (1 - ramp[..., None]) + other * ramp[..., None]
    elif bg["kind"] == "noise":
        img = img + rng.normal(0, bg["sigma"], (size, size, 3))
    return img


def render_image(params, size, seed=0):
    """(size, size, 3) uint8 RGB of a still's parameters; noise comes from `seed`."""
    img = _background_pixels(params["background"], size, np.random.default_rng(seed))
    grid = np.arange(size, dtype=np.float64) + 0.5
    for o in params["objects"]:
        mask = shape_mask(o["shape"], grid[None, :] - o["x"] * size,
                           grid[:, None] - o["y"] * size, o["radius"] * size)
        img[mask] = IMAGE_COLOURS[o["colour"]]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _write(task):
    path, params, size, seed = task
    from PIL import Image
    Image.fromarray(render_image(params, size, seed)).save(path, format="PNG", compress_level=1)
    return path


# ----------------------------------------------------------------------------- corpus
def _items(split, n, seed):
    """(relative path, parameters, caption, noise seed) of each still."""
    for i in range(n):
        rng = _rng(seed, split, i)
        params = sample_image(rng)
        rel = f"images/{split}/{i // PER_PAGE:03d}/{i:07d}.png"
        yield rel, params, image_caption(params, rng), int(rng.integers(2**31))


def _meta(n, n_test, size, seed):
    return {"generator": f"hvfm.data.synthetic_images v{IMAGE_VERSION}", "version": IMAGE_VERSION,
            "images": int(n), "images_test": int(n_test), "size": int(size), "seed": int(seed)}


def generate_images(out_dir, n=DEFAULT_IMAGES, n_test=DEFAULT_IMAGES_TEST, size=96, seed=0, workers=1, progress=False):
    """Write the image corpus under out_dir (see module docstring); returns out_dir as a Path."""
    if size < 8 or n < 1:
        raise ValueError("need size >= 8 and at least one image")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".images_complete").unlink(missing_ok=True)
    splits = {"train": list(_items("train", n, seed)), "test": list(_items("test", n_test, seed))}
    tasks = []
    for items in splits.values():
        for rel, params, _, noise_seed in items:
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            tasks.append((str(out / rel), params, size, noise_seed))
    run_tasks(_write, tasks, workers, progress and 2000, "images", chunksize=64)
    for split, name in (("train", "images.json"), ("test", "images_test.json")):
        entries = [{"image": rel, "caption": cap} for rel, _, cap, _ in splits[split]]
        (out / name).write_text(json.dumps(entries, indent=0))
    text = json.dumps({**_meta(n, n_test, size, seed), "counts": {
        "train": len(splits["train"]), "test": len(splits["test"])}}, indent=1, sort_keys=True)
    (out / "images_meta.json").write_text(text)
    (out / ".images_complete").write_text(text)  # last: marks the corpus as complete
    return out


def ensure_images(cache_dir=None, n=DEFAULT_IMAGES, n_test=DEFAULT_IMAGES_TEST, size=96, seed=0, workers=1, progress=False):
    """Generate the image corpus for these parameters once under cache_dir; reuse it afterwards
    (written to a temporary sibling and renamed, so a crash or a race never leaves half of one)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"images_n{n}_t{n_test}_s{size}_seed{seed}_v{IMAGE_VERSION}"
    want = _meta(n, n_test, size, seed)
    return build_once(final, lambda root: is_complete(root, want, ".images_complete"),
                      lambda tmp: generate_images(tmp, n, n_test, size, seed, workers, progress))


# ----------------------------------------------------------------------------- place probes
# Held-out stills in groups of two that differ in one attribute, each with its own caption, to
# measure what the image CLIP's towers know (issue 20): a caption against the same caption with
# its place words mirrored, and with its colour changed. Kinds (one per group, in turn):
#   place_lr  one object off the centre column; the other still is mirrored left-right
#   place_tb  one object off the middle row; the other still is mirrored top-bottom
#   relation  "A to the left of / above B"; the other still mirrored along that relation's axis
#   colour    one object; the other still shows it in another colour
# A mirrored still is the same parameters with x -> 1 - x (or y -> 1 - y), so its caption is
# the own caption with exactly the words of that axis swapped. Stills come from their own random
# stream (never the training or test stills).
PROBE_VERSION = 1
PROBE_KINDS = ("place_lr", "place_tb", "relation", "colour")
DEFAULT_PROBE_GROUPS = 200  # per kind


def _one_object(rng, want):
    """Parameters of a one-object still whose object satisfies `want(obj)`."""
    while True:
        p = sample_image(rng)
        p["objects"] = [o for o in p["objects"] if want(o)][:1]
        if p["objects"]:
            return p


def _two_objects(rng):
    while True:
        p = sample_image(rng)
        if len(p["objects"]) >= 2:
            p["objects"] = p["objects"][:2]
            return p


def _mirror(params, axis):
    key = "x" if axis == "lr" else "y"
    return {**params, "objects": [{**o, key: 1.0 - o[key]} for o in params["objects"]]}


def _place_caption(params, choice):
    o = params["objects"][0]
    row, col = _place(o["x"], o["y"])
    options = _PLACE_PHRASES.get((row, col)) or (
        f"at the {row} {col}", f"in the {row} {col} corner",
        f"{'up' if row == 'top' else 'down'} on the {col}")
    text = " ".join([o["size"], o["colour"], o["shape"]])
    return f"{_article(text)} {text} {options[choice % len(options)]}"


def _relation_caption(params):
    a, b = params["objects"]
    return f"{_name(a, None)} {_relation(a, b)} {_name(b, None)}"


def probe_group(seed, kind, index):
    """[(parameters, caption, variant)] x 2 of one probe group, drawn from (seed, kind, index)."""
    rng = np.random.default_rng([int(seed), 12, PROBE_KINDS.index(kind), int(index)])
    choice = int(rng.integers(3))
    if kind in ("place_lr", "place_tb"):
        axis = kind[-2:]
        off = (lambda o: _place(o["x"], o["y"])[1] != "center") if axis == "lr" else \
              (lambda o: _place(o["x"], o["y"])[0] != "middle")
        p = _one_object(rng, off)
        q = _mirror(p, axis)
        return [(p, _place_caption(p, choice), "own"), (q, _place_caption(q, choice), "mirrored")]
    if kind == "relation":
        p = _two_objects(rng)
        a, b = p["objects"]
        axis = "lr" if abs(a["x"] - b["x"]) >= abs(a["y"] - b["y"]) else "tb"
        q = _mirror(p, axis)
        return [(p, _relation_caption(p), "own"), (q, _relation_caption(q), "mirrored")]
    p = _one_object(rng, lambda o: True)
    o = p["objects"][0]
    others = [c for c in IMAGE_COLOURS if c != o["colour"] and _contrast_ok(c, p["background"])]
    q = {**p, "objects": [{**o, "colour": str(rng.choice(others))}]}
    return [(p, _place_caption(p, choice), "own"), (q, _place_caption(q, choice), "recoloured")]


def generate_probes(out_dir, groups=DEFAULT_PROBE_GROUPS, size=96, seed=0, workers=1):
    """Write `groups` probe groups per kind under out_dir: probes/*.png and probes.json
    ([{"image", "caption", "group", "kind", "variant"}], readable by read_annotations)."""
    out = Path(out_dir)
    (out / "probes").mkdir(parents=True, exist_ok=True)
    entries, tasks, g = [], [], 0
    for index in range(int(groups)):
        for kind in PROBE_KINDS:
            for params, caption, variant in probe_group(seed, kind, index):
                rel = f"probes/g{g:05d}_{variant}.png"
                entries.append({"image": rel, "caption": caption, "group": g, "kind": kind,
                                "variant": variant})
                tasks.append((str(out / rel), params, size, int(seed) * 100003 + g))
            g += 1
    run_tasks(_write, tasks, workers, False, "probes", chunksize=64)
    (out / "probes.json").write_text(json.dumps(entries, indent=0))
    meta = {"generator": f"hvfm.data.synthetic_images probes v{PROBE_VERSION}",
            "version": PROBE_VERSION, "groups": int(groups), "size": int(size), "seed": int(seed)}
    (out / ".probes_complete").write_text(json.dumps(meta, indent=1, sort_keys=True))
    return out


def ensure_probes(cache_dir=None, groups=DEFAULT_PROBE_GROUPS, size=96, seed=0, workers=1):
    """The probe stills for these parameters, generated once under cache_dir (see generate_probes)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / f"probes_g{groups}_s{size}_seed{seed}_v{PROBE_VERSION}"
    want = {"version": PROBE_VERSION, "groups": int(groups), "size": int(size), "seed": int(seed)}
    return build_once(final, lambda root: is_complete(root, want, ".probes_complete"),
                      lambda tmp: generate_probes(tmp, groups, size, seed, workers))
