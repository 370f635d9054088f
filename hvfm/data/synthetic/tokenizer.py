"""The built-in tokenizer: one byte-level BPE for both built-in corpora (stills and clips).

It is trained on the captions the two generators write (computed from their parameters, no
rendering needed) plus the words of their vocabularies, saved once in `HVFM_CACHE`, and saved
again inside the built-in image CLIP, so the video stage reads it from `--clip` as it would
read a real CLIP's tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import clips as syn
from . import stills as simg
from ..text.tokens import clean_caption, ensure_tokenizer_from

TOKENIZER_VERSION = 1
VOCAB_SIZE = 1000
VIDEO_CLIPS = 4000  # the built-in video corpus (`ensure_corpus` defaults)


def _key(seed):
    return {"version": TOKENIZER_VERSION, "vocab": VOCAB_SIZE, "seed": int(seed),
            "video": {"clips": VIDEO_CLIPS, "generator": syn.VERSION},
            "images": {"n": simg.DEFAULT_IMAGES, "generator": simg.IMAGE_VERSION}}


def builtin_tokenizer_dir(seed=0, cache_dir=None):
    cache = Path(cache_dir) if cache_dir is not None else syn.default_cache_dir()
    return cache / f"tokenizer_v{TOKENIZER_VERSION}_seed{seed}"


def builtin_captions(seed=0):
    """Training captions of both built-in corpora, cleaned as the trainer cleans them, and the
    vocabulary words."""
    caps = [cap for _, _, _, cap in syn._train_items(VIDEO_CLIPS, seed)]
    caps += [cap for _, _, cap, _ in simg._items("train", simg.DEFAULT_IMAGES, seed)]
    words = list(syn.COLOURS) + list(simg.IMAGE_COLOURS) + list(syn.SHAPES) + list(simg.IMAGE_SHAPES)
    words += list(syn.DIRECTIONS) + [s for s, _, _ in simg.SIZES] + list(simg.ROWS) + list(simg.COLS)
    return [clean_caption(c) for c in caps] + [" ".join(words)]


def ensure_builtin_tokenizer(seed=0, cache_dir=None):
    """Load the built-in tokenizer, training and saving it first if needed."""
    folder = builtin_tokenizer_dir(seed, cache_dir)
    key = _key(seed)
    marker = folder / "hvfm_tokenizer.json"
    try:
        fresh = json.loads(marker.read_text()) == key
    except (OSError, ValueError):
        fresh = False
    if not fresh and folder.exists():
        import shutil
        shutil.rmtree(folder, ignore_errors=True)
    return ensure_tokenizer_from(folder, lambda: builtin_captions(seed), VOCAB_SIZE,
                                 marker={"name": marker.name, "text": json.dumps(key)})
