"""Synthetic: the built-in corpora, rendered once into `HVFM_CACHE` -- clips whose captions need time
(`clips`), stills for the image stage (`stills`), what both share (`common`: cache, build-once,
worker pool, shapes) and the built-in tokenizer trained on their captions (`tokenizer`).

`python -m hvfm.data.synthetic OUT [...]` writes a corpus (see `clips.main`)."""
