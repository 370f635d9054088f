"""What a run trains with, built one way for the trainer and for `profiling/bench_train.py`: the
video-language model inflated from a CLIP folder, the training loader, the DeepSpeed engine."""
from __future__ import annotations

import os

from hvfm.config import ConfigError
from hvfm.data.text.tokens import load_tokenizer


def cached_snapshot(hub_id):
    """The folder of `hub_id` in this machine's Hugging Face cache (HF_HOME / HF_HUB_CACHE),
    found without the network; ValueError when it is not there."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(hub_id, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - not cached (LocalEntryNotFoundError, ...): one line
        raise ValueError(f"{type(e).__name__}: {' '.join(str(e).split())[:160]}") from None


def resolve_clip(name, local_rank, fetch=None, locate=cached_snapshot, load=None, gather=None):
    """`(CLIPModel, tokenizer)` of --clip, resolved once per node. A folder loads on every rank.
    A hub ID is fetched by local rank 0 alone (`fetch`, by default `load_clip`: transformers
    downloads what it needs into the Hugging Face cache); the ranks meet (`gather`, an
    all_gather that is also the barrier); then the other ranks `load` the folder `locate` finds
    in the cache, without the network. A fetch that fails on any node is the same one-line
    ConfigError on every rank, raised together (collective)."""
    from hvfm.distributed import all_gather
    from hvfm.model import load_clip
    from hvfm.model.clip import looks_like_hub_id
    fetch, load, gather = fetch or load_clip, load or load_clip, gather or all_gather
    if not looks_like_hub_id(name):
        try:
            return load(name)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    fetched, error = None, None
    if local_rank == 0:
        try:
            fetched = fetch(name)
        except ValueError as e:
            error = str(e)
    errors = [e for e in gather(error) if e]
    if errors:
        e = ConfigError(errors[0])
        e.collective = True  # every rank raises it here: one line, every rank exits together
        raise e
    if fetched is not None:
        return fetched
    try:
        return load(locate(name))
    except ValueError as e:
        raise ConfigError(f"--clip {name}: local rank 0 of this node fetched it, but this rank does not "
                          f"find it in its Hugging Face cache ({e}); give every rank the same HF_HOME "
                          f"(multi-node: a .deepspeed_env, see ds_configs/README.md)") from None


def build_model(args, tok_dir, out_dir, attn, rank):
    """The video-language model inflated from a CLIP folder (--clip, or the preset saved with
    random weights to OUTPUT_DIR/init_clip first: one loading path), set up for its stage (the
    image stage: `freeze_for_image_stage`)."""
    import torch
    import torch.distributed as dist
    from hvfm.model import VideoLanguageModel, add_mask_token, save_random_clip

    clip_dir = args.clip
    if clip_dir is None:
        clip_dir = out_dir / "init_clip"
        if rank == 0 and not (clip_dir / "config.json").exists():
            save_random_clip(args.model, load_tokenizer(tok_dir), str(clip_dir), seed=args.seed)
        dist.barrier()
    clip, tokenizer = resolve_clip(str(clip_dir), int(os.environ.get("LOCAL_RANK", 0)))
    if tok_dir is not None and args.clip is not None:
        tokenizer = load_tokenizer(tok_dir)
    add_mask_token(clip, tokenizer)
    build = dict(fusion_layers=args.fusion_layers, fusion_width=args.fusion_width, attn=attn,
                 max_frames=max(args.frames, 16), checkpointing=args.activation_checkpointing,
                 motion=args.motion_channel, vtm_token="last")
    torch.manual_seed(args.seed)  # the fresh layers (fusion, heads): the same on every rank and run
    model = VideoLanguageModel.from_clip(clip, tokenizer, **build)
    build.pop("checkpointing")
    if args.stage == "image":
        freeze_for_image_stage(model)
    return model, tokenizer, clip.config, build


def freeze_for_image_stage(model):
    """Stage 1 trains an image model: no time, no fusion. The fusion encoder and the temporal
    embedding are frozen; the token embedding, which the MLM head ties to, stays trainable."""
    tied = model.text.token_embedding.weight
    for p in model.fusion.parameters():
        p.requires_grad_(p is tied)
    model.video.embeddings.temporal_embedding.requires_grad_(False)


def build_train_loader(args, train_ann, tokenizer, micro, size, rank, world, cuda, image=False):
    """The training loader of this rank: streamed tar shards (`--train-shards`) or one file per
    clip; the same batches either way (uint8 frames + crop rows, pinned, when bound for a GPU)."""
    from hvfm.config import IMAGE_CROP
    from hvfm.data import build_loader
    from hvfm.data.loading.shards import build_shard_loader
    crop_scale = IMAGE_CROP if image else (0.5, 1.0)
    common = dict(batch_size=micro, frames=args.frames, size=size, seed=args.seed,
                  num_workers=args.workers, mask_ratio=args.mask_ratio, rank=rank, world_size=world,
                  pin_memory=cuda, crop_scale=crop_scale, swap=args.swap_weight > 0,
                  decoder=getattr(args, "decoder", "auto"), decode_timeout=args.decode_timeout or None)
    if args.train_shards:
        return build_shard_loader(args.train_shards, tokenizer, **common)
    return build_loader(train_ann, tokenizer,
                        mirror=args.mirror_negatives if image else 0.0, **common)


def build_engine(model, cfg, precision, args, max_steps):
    """The DeepSpeed engine over `model`: the checked config with the precision and --lr stated
    (`engine_config`), the LR groups (towers x1, fresh fusion layers, time), warm-up then cosine.
    Returns (engine, scheduler, the config it got, the step's dtype, whether `train_step` must
    check the loss on the host: without ZeRO, DeepSpeed checks no overflow)."""
    import deepspeed
    import torch
    from hvfm.config import engine_config
    from hvfm.optim import lr_lambda, param_groups

    cfg = engine_config(cfg, precision, args.lr)
    opt = cfg.get("optimizer", {}).get("params", {})
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, max_steps // 20)
    groups = param_groups(model, opt.get("weight_decay", 0.0), opt.get("lr", 1e-4),
                          args.temporal_lr_mult, args.fresh_lr_mult)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=groups, config=cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(max_steps, warmup)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return engine, scheduler, cfg, dtype, engine.zero_optimization_stage() == 0
