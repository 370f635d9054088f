"""The consolidated export `OUTPUT_DIR/final` that evaluation loads.

Folder contents: the CLIP config (`config.json`, so the towers' shapes are known), the tokenizer
files, `hvfm.json` (how the video model was built: fusion depth/width, frames, attention) and
`hvfm_model.safetensors` (every weight of the video-language model, fp32).
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch

FORMAT = "hvfm-export-v1"


def is_export(folder):
    meta = Path(folder) / "hvfm.json"
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_export(folder, state_dict, clip_config, tokenizer, build):
    """Write the export atomically (temporary sibling, then rename). `build` holds the keyword
    arguments of `VideoLanguageModel.from_clip` other than the CLIP model and tokenizer."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    clip_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, str(tmp / "hvfm_model.safetensors"))
    (tmp / "hvfm.json").write_text(json.dumps({"format": FORMAT, "build": build}, indent=2) + "\n")
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, folder)
    return folder


def load_export(folder, attn=None):
    """(VideoLanguageModel, tokenizer) from an export folder."""
    from safetensors.torch import load_file
    from transformers import CLIPConfig, CLIPModel

    from hvfm.data.text import load_tokenizer
    from hvfm.model import VideoLanguageModel

    folder = Path(folder)
    build = json.loads((folder / "hvfm.json").read_text())["build"]
    if attn:
        build = {**build, "attn": attn}
    tokenizer = load_tokenizer(folder)
    clip = CLIPModel(CLIPConfig.from_pretrained(str(folder)))
    model = VideoLanguageModel.from_clip(clip, tokenizer, **build)
    state = load_file(str(folder / "hvfm_model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("decoder.weight")}  # tied to the token embedding
    if set(missing) - tied or unexpected:
        raise ValueError(f"{folder}: weights do not match the model (missing {sorted(set(missing) - tied)[:3]}, "
                         f"unexpected {sorted(unexpected)[:3]})")
    return model, tokenizer
