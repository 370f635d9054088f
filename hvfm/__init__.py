"""hvfm: a video-language foundation model harvested from CLIP (see README.md)."""
__version__ = "0.1.0"
