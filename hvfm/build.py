"""The model a run trains: the video-language model inflated from a CLIP folder."""
from __future__ import annotations

from hvfm.config import ConfigError
from hvfm.data.text import load_tokenizer


def build_model(args, tok_dir, out_dir, attn, rank):
    """The video-language model inflated from a CLIP folder (--clip, or the preset saved with
    random weights to OUTPUT_DIR/init_clip first: one loading path)."""
    import torch.distributed as dist
    from hvfm.model import VideoLanguageModel, add_mask_token, load_clip, save_random_clip

    clip_dir = args.clip
    if clip_dir is None:
        clip_dir = out_dir / "init_clip"
        if rank == 0 and not (clip_dir / "config.json").exists():
            save_random_clip(args.model, load_tokenizer(tok_dir), str(clip_dir), seed=args.seed)
        dist.barrier()
    try:
        clip, tokenizer = load_clip(str(clip_dir))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tok_dir is not None and args.clip is not None:
        tokenizer = load_tokenizer(tok_dir)
    add_mask_token(clip, tokenizer)
    build = dict(fusion_layers=args.fusion_layers, fusion_width=args.fusion_width, attn=attn,
                 max_frames=max(args.frames, 16), checkpointing=args.activation_checkpointing,
                 motion=args.motion_channel, vtm_token="last")
    model = VideoLanguageModel.from_clip(clip, tokenizer, **build)
    build.pop("checkpointing")
    return model, tokenizer, clip.config, build
