"""CLIP presets and the one loading path.

A real checkpoint folder and one written by `save_random_clip` look the same (config.json,
weights, tokenizer files), so training always starts from `load_clip(folder)`.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn
from transformers import AutoTokenizer, CLIPConfig, CLIPModel

# (vision width, layers, heads, patch, image) / (text width, layers, heads) / projection
PRESETS = {
    "tiny": dict(vision=(128, 4, 4, 16, 96), text=(128, 4, 4), projection=128),
    "vit-b16": dict(vision=(768, 12, 12, 16, 224), text=(512, 12, 8), projection=512),
    "vit-l14": dict(vision=(1024, 24, 16, 14, 224), text=(768, 12, 12), projection=768),
}
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")


def preset_config(name: str, vocab_size: int, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, pad_token_id: int | None = None,
                  image_size: int | None = None, max_positions: int = 77) -> CLIPConfig:
    """A `CLIPConfig` with the preset's shapes (quick_gelu, LN eps 1e-5, MLP 4x width)."""
    if name not in PRESETS:
        raise ValueError(f"unknown CLIP preset '{name}'; valid: {', '.join(PRESETS)}")
    p = PRESETS[name]
    vw, vl, vh, patch, img = p["vision"]
    tw, tl, th = p["text"]
    ids = {k: v for k, v in dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                 pad_token_id=pad_token_id).items() if v is not None}
    text = dict(vocab_size=vocab_size, hidden_size=tw, intermediate_size=4 * tw,
                num_hidden_layers=tl, num_attention_heads=th, max_position_embeddings=max_positions,
                hidden_act="quick_gelu", layer_norm_eps=1e-5, **ids)
    vision = dict(hidden_size=vw, intermediate_size=4 * vw, num_hidden_layers=vl,
                  num_attention_heads=vh, patch_size=patch, image_size=image_size or img,
                  hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=p["projection"])


def save_random_clip(preset: str, tokenizer, folder: str, seed: int = 0, **config_kw) -> str:
    """Write a randomly initialised CLIPModel of `preset` plus `tokenizer` to `folder`."""
    config = preset_config(preset, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           **config_kw)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _missing(folder: str) -> str | None:
    """Name of the first required file absent from `folder`, or None."""
    have = set(os.listdir(folder))
    if "config.json" not in have:
        return "config.json"
    if not have.intersection(_WEIGHTS):
        return "model.safetensors (or pytorch_model.bin)"
    if "tokenizer.json" not in have and not {"vocab.json", "merges.txt"} <= have:
        return "tokenizer.json (or vocab.json + merges.txt)"
    return None


def load_clip(folder: str):
    """Load `(CLIPModel, tokenizer)` from a save_pretrained folder; ValueError names what is missing."""
    if not os.path.isdir(folder):
        raise ValueError(f"CLIP folder {folder} does not exist (make one with save_random_clip "
                         f"or download a checkpoint)")
    missing = _missing(folder)
    if missing:
        raise ValueError(f"CLIP folder {folder} is missing {missing}; expected a folder written "
                         f"by save_pretrained (model + tokenizer)")
    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def add_mask_token(clip_model: CLIPModel, tokenizer, token: str = "<|mask|>") -> bool:
    """Give `tokenizer` a mask token if it lacks one and grow the text embedding to `len(tokenizer)`.

    New rows start at the mean of the existing embeddings. Returns True if anything changed.
    """
    changed = False
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": token})
        changed = True
    emb = clip_model.text_model.embeddings.token_embedding
    n = len(tokenizer)
    if emb.num_embeddings < n:
        new = nn.Embedding(n, emb.embedding_dim, device=emb.weight.device, dtype=emb.weight.dtype)
        with torch.no_grad():
            new.weight[: emb.num_embeddings] = emb.weight
            new.weight[emb.num_embeddings:] = emb.weight.mean(0)
        clip_model.text_model.embeddings.token_embedding = new
        clip_model.config.text_config.vocab_size = n
        changed = True
    return changed
