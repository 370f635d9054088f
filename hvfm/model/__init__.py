"""hvfm.model: CLIP-inflated video-language model with packed, token-dropped attention."""
from .attention import (BACKENDS, Varlen, attention, concat_sequences, gather_sequences,
                        get_backend, register_backend, to_device)
from .blocks import Attention, Block, MLP, run_blocks
from .clip import PRESETS, add_mask_token, load_clip, preset_config, save_random_clip
from .fusion import FusionEncoder, MLMHead
from .losses import (caption_keys, gather_with_grad, mlm_loss, sample_hard_negatives, vtc_loss,
                     vtm_loss)
from .model import VideoLanguageModel
from .text import TextEncoder, TextOutput, host_lengths
from .video import (Keep, VideoEmbeddings, VideoEncoder, VideoOutput, keep_counts,
                    parse_drop_ratio, sample_keep)

__all__ = [
    "BACKENDS", "Varlen", "attention", "concat_sequences", "gather_sequences", "get_backend",
    "register_backend", "to_device", "Attention", "Block", "MLP", "run_blocks", "PRESETS", "add_mask_token",
    "load_clip", "preset_config", "save_random_clip", "FusionEncoder", "MLMHead",
    "caption_keys", "gather_with_grad", "mlm_loss", "sample_hard_negatives", "vtc_loss",
    "vtm_loss", "VideoLanguageModel", "TextEncoder", "TextOutput", "host_lengths", "Keep",
    "VideoEmbeddings", "VideoEncoder", "VideoOutput", "keep_counts", "parse_drop_ratio",
    "sample_keep",
]
