"""The data side of hvfm: annotations -> decoded, sampled, transformed clips + tokenised captions."""
from .sources.annotations import Annotations, read_annotations, read_webvid_csv
from .loading.dataset import Collator, ResumableDistributedSampler, VideoTextDataset, build_loader
from .decode import DecodeError, decode_clip, sample_indices
from .errors import DataError
from .text.tokens import MLMMasker, build_tokenizer, clean_caption, load_tokenizer, tokenize
from .transforms.host import VideoTransform

__all__ = [
    "Annotations", "read_annotations", "read_webvid_csv", "Collator",
    "ResumableDistributedSampler", "VideoTextDataset", "build_loader", "DecodeError",
    "decode_clip", "sample_indices", "DataError", "MLMMasker", "build_tokenizer", "clean_caption",
    "load_tokenizer", "tokenize", "VideoTransform",
]
