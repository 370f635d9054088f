"""A small export for the evaluation tests: a tiny CLIP inflated into hvfm's model with every
weight moved, a stand-in for a post-pretrained one."""
import torch

from hvfm.export import save_export
from hvfm.model import VideoLanguageModel
from hvfm.model.testing import tiny_clip

BUILD = dict(fusion_layers=1, fusion_width=None, attn="sdpa", max_frames=8)


def moved_export(out, tok, scale=0.05, seed=0):
    """Write the export to `out`; returns the tiny CLIP it was inflated from."""
    clip = tiny_clip(tok, dtype=torch.float32, max_positions=32)
    model = VideoLanguageModel.from_clip(clip, tok, **BUILD)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    save_export(out, model.state_dict(), clip.config, tok, BUILD)
    return clip
