"""Any checkpoint hvfm reads, turned into a model: an hvfm export (`OUTPUT_DIR/final`, format
v1 or v2), a DeepSpeed checkpoint folder of any ZeRO stage (consolidated to fp32), a run folder,
or a plain HF CLIPModel folder (`load_any`). Also the export format's names (which hvfm weight is
which CLIP weight) that hvfm/export.py writes by, and `merge_with_clip` (weight-space
interpolation with the original CLIP). Evaluation, export and training load through here."""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch

from hvfm.data.errors import DataError

FORMAT = "hvfm-export-v2"
FORMATS = ("hvfm-export-v1", FORMAT)
CLIP_WEIGHTS = "model.safetensors"
EXTRA_WEIGHTS = "hvfm_model.safetensors"  # v1 held every weight under this name
V1_WEIGHTS = "hvfm_model.safetensors"
TEMPORAL = "video.embeddings.temporal_embedding"
POSITION = "video.embeddings.position_embedding"
TIED = ("fusion.mlm_head.decoder.weight",)  # the token embedding, tied

# hvfm parameter name <-> transformers CLIPModel name: whole names, and prefixes ending in "."
_CLIP_NAMES = [
    ("video.embeddings.patch_weight", "vision_model.embeddings.patch_embedding.weight"),
    ("video.embeddings.class_embedding", "vision_model.embeddings.class_embedding"),
    ("video.embeddings.position_embedding", "vision_model.embeddings.position_embedding.weight"),
    ("video.pre_layrnorm.", "vision_model.pre_layrnorm."),
    ("video.layers.", "vision_model.encoder.layers."),
    ("video.post_layernorm.", "vision_model.post_layernorm."),
    ("video.visual_projection.weight", "visual_projection.weight"),
    ("text.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("text.position_embedding.weight", "text_model.embeddings.position_embedding.weight"),
    ("text.layers.", "text_model.encoder.layers."),
    ("text.final_layer_norm.", "text_model.final_layer_norm."),
    ("text.text_projection.weight", "text_projection.weight"),
    ("logit_scale", "logit_scale"),
]


def _rename(name, pairs):
    for src, dst in pairs:
        if name == src or (src.endswith(".") and name.startswith(src)):
            return dst + name[len(src):]
    return None


def to_clip_key(name):
    """transformers CLIPModel name of an hvfm parameter, or None (temporal embedding, fusion)."""
    return _rename(name, _CLIP_NAMES)


def from_clip_key(name):
    """Inverse of `to_clip_key` (None for CLIP names hvfm does not hold, e.g. position_ids)."""
    return _rename(name, [(b, a) for a, b in _CLIP_NAMES])


def join_state(clip, extra):
    """hvfm state from `split_state`'s two parts (extra tensors override mapped ones)."""
    state = {}
    for key, t in clip.items():
        name = from_clip_key(key)
        if name is not None:
            state[name] = t.reshape(1) if name == "logit_scale" else t
    state.update(extra)
    return state


def is_export(folder):
    return export_meta(folder) is not None


def export_meta(folder):
    try:
        meta = json.loads((Path(folder) / "hvfm.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") in FORMATS else None


def read_export_state(folder):
    """hvfm state dict of an export folder (v1 or v2)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = export_meta(folder)
    if meta is None:
        raise DataError(f"{folder}: not an hvfm export (no hvfm.json with a format of {', '.join(FORMATS)})")
    try:
        if meta["format"] == "hvfm-export-v1":
            return load_file(str(folder / V1_WEIGHTS))
        weights = meta.get("weights", {})
        return join_state(load_file(str(folder / weights.get("clip", CLIP_WEIGHTS))),
                          load_file(str(folder / weights.get("extra", EXTRA_WEIGHTS))))
    except Exception as e:  # noqa: BLE001 - OSError, or safetensors' own error on a bad file
        raise DataError(f"{folder}: export weights do not load ({one_line(e)})") from None


def one_line(e, limit=200):
    """An exception as one line: its type and the first `limit` characters of its message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def model_from_config(clip_config, tokenizer, build, attn=None):
    """(VideoLanguageModel with fresh weights, the build it used) from a CLIP config, a tokenizer
    and `build` (`VideoLanguageModel.from_clip` keyword arguments; `attn` overrides its backend).
    Fill its weights with `load_state`."""
    from transformers import CLIPModel

    from hvfm.model import VideoLanguageModel

    build = dict(build)
    if attn:
        build["attn"] = attn
    # exports written before these options existed: no motion channel, VTM on the first token
    build.setdefault("motion", False)
    build.setdefault("vtm_token", "first")
    clip = CLIPModel(clip_config)
    return VideoLanguageModel.from_clip(clip, tokenizer, **build), build


def load_state(model, state, source):
    """Load an hvfm state dict into `model`; every weight must match (the tied MLM decoder may be
    absent), else a DataError naming `source`."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k in TIED}
    if set(missing) - tied or unexpected:
        raise DataError(f"{source}: weights do not match the model (missing "
                        f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def load_export(folder, attn=None):
    """(VideoLanguageModel, tokenizer) from an export folder (v1 or v2)."""
    model, tokenizer, _ = load_export_info(folder, attn)
    return model, tokenizer


def load_export_info(folder, attn=None):
    """(model, tokenizer, info) from an export folder; info: kind, build, clip_config, run_dir."""
    from transformers import CLIPConfig

    from hvfm.data.text.tokens import load_tokenizer

    folder = Path(folder)
    meta = export_meta(folder)
    if meta is None:
        raise DataError(f"{folder}: not an hvfm export")
    tokenizer = load_tokenizer(folder)
    config = CLIPConfig.from_pretrained(str(folder))
    model, build = model_from_config(config, tokenizer, meta["build"], attn)
    load_state(model, read_export_state(folder), folder)
    return model, tokenizer, {"kind": "hvfm", "format": meta["format"], "build": build,
                              "clip_config": config, "run_dir": folder.parent, "source": str(folder)}


# ----------------------------------------------------------------------------- DeepSpeed

def find_deepspeed(path, tag=None):
    """(checkpoints folder, tag) when `path` is a DeepSpeed checkpoint folder (holding `latest`)
    or one tag folder inside it, else None."""
    path = Path(path)
    if tag is None and (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if tag is not None and (path / tag).is_dir():
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    return None


def _run_build(run_dir, source):
    """(clip_config, tokenizer, build) of the run that wrote `run_dir/checkpoints`: from its
    export `final/` when present, else rebuilt as hvfm/build.py's build_model does from
    run_config.json and the CLIP folder it started from."""
    from transformers import CLIPConfig

    from hvfm.data.text.tokens import load_tokenizer
    from hvfm.model import add_mask_token, load_clip

    final = run_dir / "final"
    meta = export_meta(final)
    if meta is not None:
        return CLIPConfig.from_pretrained(str(final)), load_tokenizer(final), dict(meta["build"])
    cfg_path = run_dir / "run_config.json"
    try:
        run = json.loads(cfg_path.read_text())
        args = run["args"]
    except (OSError, ValueError, KeyError):
        raise DataError(f"{source}: cannot rebuild the model: neither {final}/hvfm.json nor "
                        f"{cfg_path} (written by hvfm/train.py next to checkpoints/) is readable") from None
    clip_dir = args.get("clip") or str(run_dir / "init_clip")
    try:
        clip, tokenizer = load_clip(clip_dir)
    except ValueError as e:
        raise DataError(f"{source}: the run's CLIP folder does not load ({e})") from None
    if args.get("tokenizer") and args.get("clip"):
        tokenizer = load_tokenizer(args["tokenizer"])
    add_mask_token(clip, tokenizer)
    if "build" in run:  # persisted by the trainer: the keyword arguments it built the model with
        return clip.config, tokenizer, dict(run["build"])
    # runs from before the build was persisted
    build = dict(fusion_layers=args.get("fusion_layers", 2), fusion_width=args.get("fusion_width"),
                 attn=run.get("attn", "sdpa"), max_frames=max(int(args.get("frames", 8)), 16))
    return clip.config, tokenizer, build


def consolidate_deepspeed(ckpt_dir, tag, quiet=False):
    """fp32 state dict of a DeepSpeed checkpoint of any ZeRO stage (stage 0: the module states).
    DeepSpeed's progress messages go to stderr (stdout is for results); `quiet`: nowhere (its
    "Processing zero checkpoint" lines and "Loading checkpoint shards" bar; errors still raise)."""
    import os
    ckpt_dir = Path(ckpt_dir)
    sink = open(os.devnull, "w") if quiet else None
    with contextlib.ExitStack() as stack:
        if sink is not None:
            stack.enter_context(sink)
            stack.enter_context(contextlib.redirect_stderr(sink))
        stack.enter_context(contextlib.redirect_stdout(sink or sys.stderr))
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag)
        except Exception as e:  # noqa: BLE001 - not a ZeRO checkpoint: try the plain module states
            states = sorted((ckpt_dir / tag).glob("mp_rank_*_model_states.pt"))
            if not states:
                raise DataError(f"{ckpt_dir / tag}: DeepSpeed checkpoint does not consolidate "
                                f"({one_line(e)})") from None
            sd = torch.load(states[0], map_location="cpu", weights_only=False)
            module = sd.get("module") if isinstance(sd, dict) else None
            if not module:
                raise DataError(f"{ckpt_dir / tag}: DeepSpeed checkpoint does not consolidate "
                                f"({one_line(e)})") from None
            return {k: v.float() for k, v in module.items()}


def load_deepspeed(path, attn=None, tag=None):
    """(model, tokenizer, info) from OUTPUT_DIR/checkpoints or one tag folder inside it."""
    found = find_deepspeed(path, tag)
    if found is None:
        raise DataError(f"{path}: not a DeepSpeed checkpoint folder (no 'latest' file or *model_states.pt)")
    ckpt_dir, tag = found
    if not (ckpt_dir / tag).is_dir():
        raise DataError(f"{ckpt_dir}: checkpoint tag '{tag}' (from 'latest') has no folder")
    run_dir = ckpt_dir.parent
    clip_config, tokenizer, build = _run_build(run_dir, path)
    model, build = model_from_config(clip_config, tokenizer, build, attn)
    load_state(model, consolidate_deepspeed(ckpt_dir, tag), ckpt_dir / tag)
    return model, tokenizer, {"kind": "deepspeed", "tag": tag, "build": build,
                              "clip_config": clip_config, "run_dir": run_dir,
                              "source": str(ckpt_dir / tag)}


# ----------------------------------------------------------------------------- any checkpoint

def load_any(path, attn=None, tag=None, max_frames=16):
    """(model, tokenizer, info) from an export, a DeepSpeed checkpoint folder (or tag folder),
    a run folder (its final/ export, else its checkpoints/), or a plain HF CLIP folder (image
    CLIP applied to frames, with a fresh fusion encoder; its temporal embedding is zero).
    Anything else: DataError naming what was expected."""
    from hvfm.model import VideoLanguageModel, add_mask_token, load_clip

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: checkpoint folder does not exist")
    if is_export(path):
        return load_export_info(path, attn)
    if tag is not None and not (path / tag).is_dir() and (path / "checkpoints" / tag).is_dir():
        return load_deepspeed(path / "checkpoints", attn, tag)  # a run folder and --tag
    if tag is not None or find_deepspeed(path) is not None:
        return load_deepspeed(path, attn, tag)
    if is_export(path / "final"):
        return load_export_info(path / "final", attn)
    if find_deepspeed(path / "checkpoints") is not None:
        return load_deepspeed(path / "checkpoints", attn)
    kinds = ("expected an hvfm export (OUTPUT_DIR/final), a DeepSpeed checkpoint folder "
             "(OUTPUT_DIR/checkpoints or a tag folder in it) or an HF CLIPModel folder")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        raise DataError(f"{path}: not a checkpoint: {kinds}") from None
    if model_type != "clip":
        raise DataError(f"{path}: config.json is a '{model_type}' model, not CLIP: {kinds}")
    try:
        clip, tokenizer = load_clip(str(path))
    except ValueError as e:
        raise DataError(f"{path}: not a loadable CLIP folder ({e}); {kinds}") from None
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds; one line for the user
        raise DataError(f"{path}: CLIP folder does not load ({one_line(e)})") from None
    add_mask_token(clip, tokenizer)
    build = dict(fusion_layers=2, fusion_width=None, attn=attn or "sdpa", max_frames=max(16, max_frames))
    with torch.random.fork_rng(devices=[]):  # a fresh fusion encoder, the same every time
        torch.manual_seed(0)
        model = VideoLanguageModel.from_clip(clip.float(), tokenizer, **build)
    return model, tokenizer, {"kind": "clip", "build": build, "clip_config": clip.config,
                              "run_dir": None, "source": str(path)}


def default_clip_dir(info):
    """The CLIP folder a run started from: run_config.json's --clip, else OUTPUT_DIR/init_clip."""
    run_dir = info.get("run_dir")
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    try:
        clip = json.loads((run_dir / "run_config.json").read_text())["args"].get("clip")
        if clip:
            return Path(clip)
    except (OSError, ValueError, KeyError):
        pass
    return run_dir / "init_clip" if (run_dir / "init_clip" / "config.json").exists() else None


@torch.no_grad()
def merge_with_clip(model, clip_dir, alpha):
    """Weight-space interpolation with the original CLIP, in place:

        theta = alpha * theta_clip + (1 - alpha) * theta_post

    for every parameter CLIP has (both towers, projections, logit_scale; hvfm's token embedding
    includes the mask row, which the CLIP side gets as add_mask_token makes it: the mean row).
    The temporal embedding, fusion encoder and heads are not in CLIP and stay post-pretrained.
    alpha 0 = the post-pretrained model, 1 = CLIP's towers. Returns the number of merged tensors."""
    from hvfm.model import add_mask_token, load_clip

    if not 0.0 <= alpha <= 1.0:
        raise DataError(f"--merge-with-clip {alpha}: alpha must be in [0, 1]")
    try:
        clip, tokenizer = load_clip(str(clip_dir))
    except ValueError as e:
        raise DataError(f"--clip: {e}") from None
    add_mask_token(clip, tokenizer)
    theirs = clip.state_dict()
    merged = 0
    for name, p in model.named_parameters():
        key = to_clip_key(name)
        if key is None or key not in theirs:
            continue
        q = theirs[key].to(p.device, torch.float32).reshape(p.shape) if theirs[key].numel() == p.numel() else None
        if q is None:
            raise DataError(f"--clip {clip_dir}: {key} has shape {tuple(theirs[key].shape)}, the "
                            f"model's {name} {tuple(p.shape)}; is it the CLIP this run started from?")
        p.copy_((alpha * q + (1.0 - alpha) * p.float()).to(p.dtype))
        merged += 1
    return merged


def merge_with_clip_dir(model, info, alpha, clip_dir=None):
    """`merge_with_clip` with the CLIP folder given, else the run's own (`default_clip_dir`).
    Returns (the folder used, the number of tensors merged)."""
    clip_dir = clip_dir or default_clip_dir(info)
    if clip_dir is None:
        raise DataError("--merge-with-clip needs --clip DIR (the original CLIP folder); there "
                        "is no OUTPUT_DIR/init_clip or run_config.json next to the checkpoint")
    return clip_dir, merge_with_clip(model, clip_dir, alpha)
