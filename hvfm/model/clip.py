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
    init_position_sincos(model)
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """(grid*grid, width) fixed 2D sine-cosine position code (half the channels for y, half for x)."""
    quarter = width // 4
    freq = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                          torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for coord in (y.flatten(), x.flatten()):
        ang = coord[:, None] * freq[None, :]
        parts += [ang.sin(), ang.cos()]
    out = torch.cat(parts, dim=1)
    return torch.nn.functional.pad(out, (0, width - out.shape[1])).float()


def init_position_sincos(model: CLIPModel) -> None:
    """Start a randomly initialised vision tower with a 2D sine-cosine patch position embedding
    on the scale of its patch tokens (as ViTs trained from scratch, e.g. MAE, do).

    With transformers' default init the position embedding (std 0.02) is ~30x smaller than the
    patch tokens of a normalised image (std ~0.6), so after the pre-LayerNorm a patch's place is
    nearly invisible, and the motion of objects with it. A pretrained CLIP has learned both scales;
    this only matters for the random presets.
    """
    emb = model.vision_model.embeddings
    w = emb.patch_embedding.weight.detach()
    token_std = float(w.std()) * w[0].numel() ** 0.5  # a unit-scale input patch
    grid = int(round((emb.position_embedding.num_embeddings - 1) ** 0.5))
    code = sincos_2d(grid, w.shape[0])
    with torch.no_grad():
        emb.position_embedding.weight[1:] = code * (token_std / float(code.std()))


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


def looks_like_hub_id(name: str) -> bool:
    """"openai/clip-vit-base-patch16"-like: one or two path parts, no leading / . ~ and no file."""
    parts = str(name).split("/")
    return (not os.path.exists(name) and 1 <= len(parts) <= 2 and all(parts)
            and not str(name).startswith((".", "~", os.sep)))


def _folder_recipe(name):
    return (f"make a folder where the hub is reachable: python -c \"from transformers import "
            f"CLIPModel, CLIPProcessor; CLIPModel.from_pretrained('{name}').save_pretrained('DIR'); "
            f"CLIPProcessor.from_pretrained('{name}').save_pretrained('DIR')\" and pass --clip DIR")


def load_clip(folder: str):
    """Load `(CLIPModel, tokenizer)` from a save_pretrained folder, or from a Hugging Face hub ID
    (e.g. openai/clip-vit-base-patch16): from this machine's Hugging Face cache when it holds a
    whole copy and the hub is off (HF_HUB_OFFLINE) or out of reach, else through transformers.
    ValueError, one line: what is missing and how to make a folder."""
    if not os.path.isdir(folder):
        if not looks_like_hub_id(folder):
            raise ValueError(f"CLIP folder {folder} does not exist; pass a folder written by "
                             f"CLIPModel.save_pretrained (with its tokenizer) or a hub ID")
        return _load_hub_id(folder)
    missing = _missing(folder)
    if missing:
        raise ValueError(f"CLIP folder {folder} is missing {missing}; expected a folder written "
                         f"by save_pretrained (model + tokenizer)")
    model = CLIPModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set, now or when huggingface_hub was imported."""
    import huggingface_hub.constants as hub
    return bool(hub.HF_HUB_OFFLINE) or any(
        os.environ.get(k, "").strip().upper() in {"1", "ON", "YES", "TRUE"}
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_unreachable(timeout: float = 5.0) -> str | None:
    """Why the Hugging Face hub (HF_ENDPOINT) cannot be reached, one line; None when it answers
    one HTTP request within `timeout` seconds (any status). No retries: transformers' own
    download retries a dead network for ~25 s before it fails."""
    import huggingface_hub.constants as hub
    from huggingface_hub.utils import get_session
    try:
        get_session().head(hub.ENDPOINT, timeout=timeout, follow_redirects=False)
    except Exception as e:  # noqa: BLE001 - no DNS, refused, timed out, proxy: all mean unreachable
        return f"{hub.ENDPOINT}: {type(e).__name__}: {' '.join(str(e).split()) or 'no answer'}"
    return None


def cached_hub_folder(hub_id: str) -> str | None:
    """The folder of `hub_id` in this machine's Hugging Face cache (HF_HOME / HF_HUB_CACHE) when
    it holds a whole CLIP (config, weights, tokenizer), found without the network; else None."""
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (LocalEntryNotFoundError, ...)
        return None
    return folder if _missing(folder) is None else None


def _load_hub_id(name: str):
    cached = cached_hub_folder(name)
    why = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    if why is not None:
        if cached is not None:
            return CLIPModel.from_pretrained(cached), AutoTokenizer.from_pretrained(cached)
        import huggingface_hub.constants as hub
        raise ValueError(f"--clip {name}: not a folder, and a hub ID that cannot be fetched: it is not "
                         f"in this machine's Hugging Face cache ({hub.HF_HUB_CACHE}) and the hub is "
                         f"out of reach ({why}); {_folder_recipe(name)}")
    try:
        return CLIPModel.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except Exception as e:  # noqa: BLE001 - unknown ID, gated, network lost midway: one line
        raise ValueError(f"--clip {name}: not a folder, and transformers could not load it as a hub "
                         f"ID ({type(e).__name__}: {' '.join(str(e).split())}); {_folder_recipe(name)}") from None


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
