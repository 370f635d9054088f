"""Tiny, offline building blocks for tests and smoke runs: a word-level tokenizer and a mini CLIP."""
from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

SPECIALS = ("<|startoftext|>", "<|endoftext|>", "<|pad|>", "<|mask|>", "<|unk|>")
WORDS = ("a", "the", "red", "blue", "green", "ball", "box", "moves", "left", "right", "up",
         "down", "then", "and", "circle", "square", "slowly", "fast", "jumps", "turns")


def tiny_tokenizer(words=WORDS, mask: bool = True) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer over `words`; adds BOS/EOS; pad/mask/unk specials (mask optional)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = [s for s in SPECIALS if mask or s != "<|mask|>"]
    vocab = {w: i for i, w in enumerate(list(specials) + list(words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    kw = dict(mask_token="<|mask|>") if mask else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   pad_token="<|pad|>", unk_token="<|unk|>", **kw)


def tiny_clip_config(tokenizer, width: int = 32, layers: int = 2, heads: int = 2, patch: int = 8,
                     image: int = 32, text_width: int | None = None, projection: int = 24,
                     max_positions: int = 16) -> CLIPConfig:
    """A CLIPConfig much smaller than the `tiny` preset, for unit tests."""
    tw = text_width or width
    text = dict(vocab_size=len(tokenizer), hidden_size=tw, intermediate_size=2 * tw,
                num_hidden_layers=layers, num_attention_heads=heads,
                max_position_embeddings=max_positions, hidden_act="quick_gelu",
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                  num_attention_heads=heads, patch_size=patch, image_size=image,
                  hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection)


def tiny_clip(tokenizer, seed: int = 0, dtype=torch.float64, **kw) -> CLIPModel:
    """Random mini CLIPModel (sdpa attention: exact in float64) in `dtype`; LayerNorms/biases randomised too."""
    torch.manual_seed(seed)
    config = tiny_clip_config(tokenizer, **kw)
    config._attn_implementation = "sdpa"  # eager softmaxes in float32
    model = CLIPModel(config).to(dtype).eval()
    with torch.no_grad():  # non-trivial LN/bias/class values so equivalence tests mean something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "class_embedding" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_batch(tokenizer, captions, num_frames, image: int = 32, mask_prob: float = 0.3,
               seed: int = 0, dtype=torch.float32) -> dict:
    """A loader-style batch: padded pixels, right-padded ids, MLM ids/labels (labels -100 elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(captions), max(num_frames)
    pixels = torch.zeros(B, T, 3, image, image, dtype=dtype)
    for i, n in enumerate(num_frames):
        pixels[i, :n] = torch.randn(n, 3, image, image, generator=g, dtype=dtype)
    enc = tokenizer(list(captions), padding=True, return_tensors="pt")
    ids, am = enc["input_ids"], enc["attention_mask"]
    special = (ids == tokenizer.bos_token_id) | (ids == tokenizer.eos_token_id) | (am == 0)
    masked = (torch.rand(ids.shape, generator=g) < mask_prob) & ~special
    masked[:, 1] |= ~special[:, 1]  # at least one masked word per caption
    labels = torch.where(masked, ids, torch.full_like(ids, -100))
    mlm_ids = torch.where(masked, torch.full_like(ids, tokenizer.mask_token_id), ids)
    return dict(pixels=pixels, num_frames=torch.tensor(num_frames, dtype=torch.int64),
                input_ids=ids, attention_mask=am, mlm_input_ids=mlm_ids, mlm_labels=labels)
