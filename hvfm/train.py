"""hvfm training entry point: `deepspeed hvfm/train.py --deepspeed ds_configs/z2.json [flags]`.

Post-pretrains CLIP on video-text pairs: random patch dropping in the video encoder, masked
caption words for the fusion encoder, VTC + VTM + MLM losses, through a DeepSpeed engine (ZeRO
1/2/3, bf16, activation checkpointing). With no data flags it generates the built-in synthetic
corpus once, trains the `tiny` preset from random weights, and prints zero-shot retrieval and
temporal accuracy on the synthetic test split before and after training.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. With spinning
# threads, any other busy process on a small CPU machine (a data worker, a second job) made a
# CPU step ~13x slower here (13.9 s vs 1.03 s with PASSIVE, same machine and load).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
import json
import difflib
import errno
import math
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (the deepspeed launcher does): make hvfm importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hvfm.data import DataError, build_loader, read_annotations  # noqa: E402
from hvfm.data.text import clean_caption, ensure_tokenizer, load_tokenizer  # noqa: E402

# The built-in default (no data flags) has two stages, as the method: an image CLIP (the `tiny`
# preset) pretrained on the built-in stills, built once and cached, then post-pretrained on the
# built-in video corpus with the defaults of any --clip run (2 epochs). Stage 1 trains a random
# model, at a higher LR than a pretrained one is tuned at.
BUILTIN = {"epochs": 2, "max_minutes": 10.0}
TEMPORAL_LR_MULT, FRESH_LR_MULT, VTM_HARDNESS = 100.0, 10.0, 0.0
IMAGE_CROP = (0.9, 1.0)  # stills: their captions name places, which a large crop would move
BUILTIN_IMAGE = {"max_steps": 1200, "lr": 5e-4, "batch_size": 64, "max_minutes": 8.0,
                 "drop_ratio": "0.5"}
ATTN_CHOICES = ("auto", "sdpa", "torch-varlen", "triton", "flash_attn", "xformers")
PRESETS = ("tiny", "vit-b16", "vit-l14")


STARTING = {"made": None}  # the output folder this run created, until its training begins


class ConfigError(ValueError):
    """A bad flag or config file: one line naming it and the fix."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, ...): the previous one is intact. Exit 2."""
    collective = True  # raised on every rank at the same point


class NonFiniteError(RuntimeError):
    """--max-nonfinite non-finite steps in a row: training stops, the last checkpoint is kept. Exit 3."""
    collective = True


class DefaultsHelp(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already says it or there is
    none to show (a flag that is off, an option that is unset by default)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return f"{text} (default: {d})" if text else f"default: {d}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="hvfm/train.py", description=__doc__.split("\n")[0],
                                 formatter_class=DefaultsHelp)
    ap.add_argument("--deepspeed", metavar="PATH", required=True, help="DeepSpeed config JSON")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                    help="set by the deepspeed launcher")
    ap.add_argument("--stage", choices=("video", "image"), default="video",
                    help="video: post-pretrain a CLIP on video-text pairs (the method); image: "
                         "pretrain an image CLIP on stills (stage 1: one frame, VTC only), exported "
                         "as an HF CLIPModel folder for --clip")
    m = ap.add_argument_group("model")
    m.add_argument("--model", default="tiny", help=f"preset without --clip: {', '.join(PRESETS)}")
    m.add_argument("--clip", metavar="DIR", help="HF CLIPModel folder to start from")
    m.add_argument("--fusion-layers", type=int, default=2,
                   help="fusion encoder blocks (copied from the text tower's last blocks)")
    m.add_argument("--fusion-width", type=int, default=None, help="default: the text width")
    m.add_argument("--attn", default="auto", help=f"attention backend: {', '.join(ATTN_CHOICES)}")
    m.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward (less memory)")
    m.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: the DeepSpeed config's if it states one, else bf16 on a GPU and "
                        "the faster of bf16/fp32 on a CPU")
    d = ap.add_argument_group("data (default: the built-in synthetic corpus)")
    d.add_argument("--train-csv", help="WebVid CSV (videoid,contentUrl,duration,page_dir,name)")
    d.add_argument("--train-json", help='JSON list of {"video", "caption"}')
    d.add_argument("--train-shards", help="tar shards of hvfm.data.prepare: DIR or DIR/{000000..000099}.tar")  # shards hook
    d.add_argument("--video-root", help="folder the training videos are under")
    d.add_argument("--eval-json", help="retrieval test annotations (MSR-VTT style JSON)")
    d.add_argument("--eval-video-root", help="folder the evaluation videos are under")
    d.add_argument("--tokenizer", help="HF tokenizer folder (default: the CLIP folder's, or one "
                                       "trained on the captions)")
    d.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    d.add_argument("--size", type=int, default=None, help="frame side (default: the model's)")
    from hvfm.data.dataset import default_workers  # device transform: --workers default
    d.add_argument("--workers", type=int, default=default_workers(),  # device transform
                   help="loader worker processes per rank (default: %(default)s here: min(8, cores "
                        "per local rank - 1), at least 1)")
    d.add_argument("--batch-size", type=int, default=None,
                   help="clips (or images) per device and micro-step (default: the DeepSpeed "
                        f"config's; {BUILTIN_IMAGE['batch_size']} in the image stage on the built-in stills)")
    t = ap.add_argument_group("method")
    t.add_argument("--drop-ratio", default="0.5", help="patch drop ratio, or a range lo:hi per sample")
    t.add_argument("--eval-drop-ratio", default=None,
                   help="drop patches in the before/after evaluation too (default: keep all)")
    t.add_argument("--mask-ratio", type=float, default=0.5, help="share of caption words MLM masks")
    t.add_argument("--loss-weights", default="1,1,1", help="VTC,VTM,MLM")
    t.add_argument("--temporal-lr-mult", type=float, default=TEMPORAL_LR_MULT,
                   help="LR multiplier of the zero-initialised parameters of time (temporal "
                        "embedding, motion channel)")
    t.add_argument("--fresh-lr-mult", type=float, default=FRESH_LR_MULT,
                   help="LR multiplier of the fusion encoder's freshly initialised layers "
                        "(cross-attention, input maps, VTM and MLM heads)")
    t.add_argument("--motion-channel", action=argparse.BooleanOptionalAction, default=True,
                   help="each patch also gets its local optical flow (Lucas-Kanade over frames "
                        "t-1, t, t+1) through a zero-initialised map (see hvfm/model/video.py)")
    t.add_argument("--reverse-negatives", type=float, nargs="?", const=1.0, default=1.0,
                   metavar="FRACTION", help="the fraction of each batch whose clips are also "
                   "encoded played backwards, as extra hard negatives of their own captions")
    t.add_argument("--no-reverse-negatives", dest="reverse_negatives", action="store_const",
                   const=0.0, help="no reversed-clip negatives (--reverse-negatives 0)")
    t.add_argument("--vtm-hardness", type=float, default=VTM_HARDNESS,
                   help="VTM negatives are drawn with p ~ softmax(hardness x the VTC logits) "
                        "among the non-matching pairs: 1 the hardest (ALBEF), 0 uniformly")
    t.add_argument("--mirror-negatives", type=float, default=0.0, metavar="FRACTION",
                   help="image stage: that fraction of the stills also enters its batch mirrored "
                        "(left-right or top-bottom) with its place words swapped, a hard negative "
                        "that only position tells apart")
    o = ap.add_argument_group("schedule and output")
    o.add_argument("--max-steps", type=int, default=None,
                   help=f"default: --epochs' steps; the image stage on the built-in stills: "
                        f"{BUILTIN_IMAGE['max_steps']}")
    o.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the data (default 1; {BUILTIN['epochs']} on the built-in video corpus)")
    o.add_argument("--image-steps", type=int, default=None,
                   help=f"steps of the built-in image CLIP when the built-in default has to build it "
                        f"(default: {BUILTIN_IMAGE['max_steps']}; each value is cached on its own)")
    o.add_argument("--max-minutes", type=float, default=None,
                   help=f"stop training after this long (default: {BUILTIN['max_minutes']:g} on the "
                        f"built-in clips, {BUILTIN_IMAGE['max_minutes']:g} on the built-in stills)")
    o.add_argument("--lr", type=float, default=None,
                   help=f"peak LR (default: the config's; {BUILTIN_IMAGE['lr']} for the image stage "
                        f"on the built-in stills, a model trained from random weights)")
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    o.add_argument("--output-dir", default=None, help="default: runs/<date-time>")
    o.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    o.add_argument("--resume", action="store_true", help="continue from --output-dir's last checkpoint")
    o.add_argument("--log-every", type=int, default=10, help="steps between rows of metrics.csv")
    o.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    o.add_argument("--seed", type=int, default=0, help="every random choice derives from it")
    o.add_argument("--verbose", action="store_true",
                   help="show the libraries' own progress bars and info lines (transformers, "
                        "DeepSpeed), which are hidden by default")
    r = ap.add_argument_group("reliability")
    r.add_argument("--decode-timeout", type=float, default=30.0,
                   help="abandon a video whose decode takes longer than this many seconds (the "
                        "decoder runs in a watchdog child process, killed and replaced); 0: decode "
                        "in the loader worker itself, no watchdog")
    r.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop (exit code 3) after this many non-finite losses or gradients in a row; "
                        "each one is skipped")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- checks before work

# Top-level keys of a DeepSpeed config (docs: deepspeed.ai/docs/config-json, and the keys its
# config parser reads). The installed DeepSpeed's own key constants are added at run time, so a
# newer release's keys are accepted too; keys starting with "_" are comments.
DS_CONFIG_KEYS = frozenset("""
train_batch_size train_micro_batch_size_per_gpu gradient_accumulation_steps optimizer scheduler
communication_data_type seq_parallel_communication_data_type prescale_gradients
gradient_predivide_factor gradient_allreduce_op sparse_gradients fp16 bf16 bfloat16 amp
torch_autocast gradient_clipping graph_harvesting zero_optimization zero_allow_untested_optimizer
zero_force_ds_cpu_optimizer aio activation_checkpointing flops_profiler steps_per_print
wall_clock_breakdown dump_state memory_breakdown tensorboard wandb csv_monitor comet comms_logger
autotuning elasticity data_efficiency curriculum_learning compression_training checkpoint
data_types sparse_attention pipeline quantize_training eigenvalue progressive_layer_drop
disable_allgather dataloader_drop_last vocabulary_size expert_parallel
use_data_before_expert_parallelism log_level legacy_fusion managed_gradient_accumulation
disable_python_gc compile hybrid_engine weight_quantization sequence_parallel_size
tensor_parallel nebula timers zenflow fp16_master_weights_and_grads
""".split())


def known_ds_keys():
    keys = set(DS_CONFIG_KEYS)
    try:
        import deepspeed.runtime.constants as c
        keys |= {v for k, v in vars(c).items() if k.isupper() and isinstance(v, str) and v.isidentifier()}
    except Exception:  # noqa: BLE001 - DeepSpeed missing or changed: the built-in list alone
        pass
    return keys


def check_ds_keys(path, cfg):
    known = known_ds_keys()
    for key in cfg:
        if key.startswith("_") or key in known:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f'; did you mean "{close[0]}"?' if close else "; remove it"
        raise ConfigError(f'{path}: unknown DeepSpeed config key "{key}"{hint}')


def check_output_dir(out_dir):
    """Fail at start, in one line, when `out_dir` cannot be created or written."""
    out_dir = Path(out_dir).absolute()
    probe_in = out_dir
    while not probe_in.exists():
        if probe_in.is_symlink():
            raise ConfigError(f"--output-dir {out_dir}: {probe_in} is a dangling link")
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"--output-dir {out_dir}: {probe_in} is a file, not a folder; "
                          f"choose another --output-dir")
    try:
        fd, name = tempfile.mkstemp(prefix=".hvfm-write-test-", dir=probe_in)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise ConfigError(f"--output-dir {out_dir}: cannot write in {probe_in} ({e.strerror}); "
                          f"choose a writable --output-dir") from None


def read_ds_config(path, world_size, batch_size=None):
    """The DeepSpeed config, checked; `batch_size` (--batch-size) replaces its micro batch."""
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: DeepSpeed config not found; pass --deepspeed ds_configs/z2.json") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if isinstance(cfg, dict):
        check_ds_keys(path, cfg)  # first: a misspelt batch-size key is named as such
    if isinstance(cfg, dict) and batch_size is not None:
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size}: give a positive number")
        cfg["train_micro_batch_size_per_gpu"] = batch_size
        if "train_batch_size" in cfg:
            cfg["train_batch_size"] = batch_size * cfg.get("gradient_accumulation_steps", 1) * world_size
    if not isinstance(cfg, dict) or "train_micro_batch_size_per_gpu" not in cfg:
        raise ConfigError(f"{path}: missing train_micro_batch_size_per_gpu")
    micro, accum = cfg["train_micro_batch_size_per_gpu"], cfg.get("gradient_accumulation_steps", 1)
    for key, val in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", accum)):
        if not isinstance(val, int) or val < 1:
            raise ConfigError(f"{path}: {key} must be a positive integer, got {val!r}")
    total = cfg.get("train_batch_size")
    if total is not None and total != micro * accum * world_size:
        raise ConfigError(f"{path}: train_batch_size {total} != train_micro_batch_size_per_gpu {micro} "
                          f"x gradient_accumulation_steps {accum} x {world_size} rank(s); fix one of them")
    if "auto" in json.dumps(cfg):
        raise ConfigError(f'{path}: "auto" values are not supported; write numbers')
    return cfg


def check_args(args, cuda):
    if args.clip is None and args.model not in PRESETS:
        raise ConfigError(f"--model {args.model}: unknown preset; choose one of {', '.join(PRESETS)} "
                          f"or pass --clip DIR")
    if args.attn not in ATTN_CHOICES:
        raise ConfigError(f"--attn {args.attn}: unknown backend; choose one of {', '.join(ATTN_CHOICES)}")
    if not 0.0 <= args.mirror_negatives <= 1.0:
        raise ConfigError(f"--mirror-negatives {args.mirror_negatives:g}: give a fraction in [0, 1]")
    if not 0.0 <= args.vtm_hardness:
        raise ConfigError(f"--vtm-hardness {args.vtm_hardness:g}: give a number >= 0")
    if not 0.0 <= args.reverse_negatives <= 1.0:
        raise ConfigError(f"--reverse-negatives {args.reverse_negatives:g}: give a fraction of the "
                          f"batch in [0, 1]")
    for flag, value in (("--temporal-lr-mult", args.temporal_lr_mult), ("--fresh-lr-mult", args.fresh_lr_mult)):
        if not value > 0:
            raise ConfigError(f"{flag} {value:g}: give a positive multiplier")
    if args.precision == "fp16" and not cuda:
        raise ConfigError("--precision fp16 needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    if sum(map(bool, (args.train_csv, args.train_json, args.train_shards))) > 1:  # shards hook
        raise ConfigError("--train-csv, --train-json, --train-shards: give one of them")
    if (args.train_csv or args.train_json) and not args.video_root:
        raise ConfigError("--video-root is required with --train-csv/--train-json")
    if args.eval_json and not args.eval_video_root:
        raise ConfigError("--eval-video-root is required with --eval-json")
    if args.resume and not args.output_dir:
        raise ConfigError("--resume needs --output-dir: the folder of the run to continue")
    try:
        weights = [float(x) for x in args.loss_weights.split(",")]
        assert len(weights) == 3 and min(weights) >= 0
    except (ValueError, AssertionError):
        raise ConfigError(f"--loss-weights {args.loss_weights}: give three numbers VTC,VTM,MLM >= 0") from None
    from hvfm.model import parse_drop_ratio
    for flag, value in (("--drop-ratio", args.drop_ratio), ("--eval-drop-ratio", args.eval_drop_ratio)):
        try:
            parse_drop_ratio(value)
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return dict(zip(("vtc", "vtm", "mlm"), weights))


def pick_attention(name, cuda):
    from hvfm.model import BACKENDS
    if name == "auto":
        return "triton" if cuda and "triton" in BACKENDS else "sdpa"
    return name


def stated_precision(cfg):
    """The precision a DeepSpeed config enables ("bf16", "fp16") or None when it states none
    (DeepSpeed's own convention: a section with "enabled": true; "bfloat16" is bf16's alias)."""
    on = [name for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"))
          if isinstance(cfg.get(key), dict) and cfg[key].get("enabled") is True]
    return on[0] if on else None


def pick_precision(choice, cuda, cfg=None, source="the DeepSpeed config"):
    """(precision, why): what the config states, else `--precision`, else (auto) bf16 on a GPU
    and on a CPU whichever of bf16/fp32 runs a transformer-sized matmul faster. A flag that
    contradicts the config is a ConfigError."""
    import torch
    stated = stated_precision(cfg or {})
    if stated and choice not in ("auto", stated):
        raise ConfigError(f'--precision {choice} contradicts {source}, which enables {stated} '
                          f'("{stated}": {{"enabled": true}}); drop the flag or change the config')
    if stated:
        return stated, f"{source} enables it"
    if choice != "auto":
        return choice, "--precision"
    if cuda:
        return "bf16", "auto: a GPU"
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 512, dtype=dtype), torch.randn(512, 1024, dtype=dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        times[str(dtype).split(".")[-1]] = time.perf_counter() - start
    pick = "bf16" if times["bfloat16"] < times["float32"] else "fp32"
    return pick, (f"auto: on this CPU a 2048x512x1024 matmul took {1e3 * times['bfloat16']:.0f} ms "
                  f"in bf16, {1e3 * times['float32']:.0f} ms in fp32 (10 runs)")


# ----------------------------------------------------------------------------- set-up

def quiet_libraries():
    """Hide the libraries' progress bars and info lines (transformers' "Loading weights", the
    hub's "Writing model shards", DeepSpeed's engine and optimizer reports); warnings and errors
    still show. --verbose skips this."""
    import logging
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(cuda):
    """Join (or make) the process group. On GPUs each rank is bound to cuda:LOCAL_RANK first:
    NCCL's object collectives (broadcast_object_list, all_gather_object) stage their bytes on
    the *current* device, which without this is cuda:0 on every rank while DeepSpeed puts the
    rank's model on cuda:LOCAL_RANK -- a hang or a crash at the first collective."""
    import deepspeed
    import torch
    import torch.distributed as dist
    if "RANK" not in os.environ:  # plain `python hvfm/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    return dist.get_rank(), dist.get_world_size()


def broadcast(obj):
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def prepare_data(args, out_dir, rank):
    """(train annotations, eval annotations or None, tokenizer folder or None). With no data flags
    rank 0 generates the built-in corpus of the stage (stills or clips) and the built-in tokenizer;
    the others wait at the barrier and load them."""
    import torch.distributed as dist
    from hvfm.data.synthetic import ensure_corpus
    from hvfm.data.synthetic_images import ensure_images

    builtin = not (args.train_csv or args.train_json or args.train_shards)  # shards hook
    train = evaluation = None
    if builtin and args.stage == "image":
        if rank == 0:
            ensure_images(seed=args.seed, workers=os.cpu_count(), progress=True)
        dist.barrier()
        root = ensure_images(seed=args.seed)
        train = read_annotations(root / "images.json", root, clean=clean_caption)
        if not args.eval_json:
            evaluation = read_annotations(root / "images_test.json", root, clean=clean_caption)
    elif builtin:
        if rank == 0:
            ensure_corpus(workers=os.cpu_count(), progress=True)
        dist.barrier()
        corpus = ensure_corpus()
        train = read_annotations(corpus.train_csv, corpus.train_root, clean=clean_caption)
        if not args.eval_json:
            evaluation = read_annotations(corpus.test_json, corpus.test_root, clean=clean_caption)
    elif args.train_shards:  # shards hook: their captions, read only to train a tokenizer
        from hvfm.data.shards import shard_captions
        train = shard_captions(args.train_shards)
    else:
        train = read_annotations(args.train_csv or args.train_json, args.video_root, clean=clean_caption)
    if args.eval_json:
        evaluation = read_annotations(args.eval_json, args.eval_video_root, clean=clean_caption)
    tok_dir = args.tokenizer
    if tok_dir is None and args.clip is None:
        if builtin:  # one tokenizer for both built-in corpora; it travels with the image CLIP
            from hvfm.data.builtin import builtin_tokenizer_dir, ensure_builtin_tokenizer
            if rank == 0:
                ensure_builtin_tokenizer(seed=args.seed)
            dist.barrier()
            tok_dir = builtin_tokenizer_dir(seed=args.seed)
        else:
            tok_dir = out_dir / "tokenizer"
            if rank == 0:
                ensure_tokenizer(tok_dir, train)
            dist.barrier()
    return train, evaluation, tok_dir


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


TIME_PARAMS = ("video.embeddings.temporal_embedding", "video.embeddings.motion_weight")
FRESH = ()
FRESH_FUSION = ("cross_norm", "cross_attn", "video_in", "text_in", "vtm_head", "mlm_head")


def param_groups(model, weight_decay, lr, temporal_lr_mult=1.0, fresh_lr_mult=1.0):
    """AdamW groups: no decay for biases, norms, embeddings and the temperature. The parameters
    of time (temporal embedding, motion channel: new and zero-initialised) learn at
    `lr * temporal_lr_mult`; the fusion encoder's fresh layers (cross-attention, input maps,
    heads: randomly initialised, unlike its blocks copied from the text tower) at
    `lr * fresh_lr_mult`; the rest (CLIP's towers) at `lr`."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in TIME_PARAMS:
            key = ("time", False)
        else:
            fresh = name in FRESH or (name.startswith("fusion.") and
                                      any(f".{k}" in f".{name}" for k in FRESH_FUSION))
            decay = not (p.ndim < 2 or "embedding" in name or "logit_scale" in name)
            key = ("fresh" if fresh else "base", decay)
        groups.setdefault(key, []).append(p)
    mult = {"base": 1.0, "fresh": fresh_lr_mult, "time": temporal_lr_mult}
    out = []
    for (kind, decay), params in groups.items():
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if mult[kind] != 1.0:
            group["lr"] = lr * mult[kind]
        out.append(group)
    return out


def lr_lambda(total_steps, warmup):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


# ----------------------------------------------------------------------------- evaluation

def run_eval(model, tokenizer, ann, args, size, dtype, label, rank, pool="joint"):
    """Retrieval with all frames and with one frame (an image model's view); the image stage
    evaluates stills (one frame). pool "mean": every frame encoded as an image, embeddings
    averaged (the image CLIP baseline)."""
    from hvfm.evaluate import evaluate
    results = {}
    views = ((1, "one_frame"),) if args.stage == "image" else ((args.frames, "all_frames"), (1, "one_frame"))
    for frames, key in views:
        results[key] = evaluate(model, tokenizer, ann, frames=frames, size=size,
                                workers=min(args.workers, 2), drop_ratio=args.eval_drop_ratio,
                                dtype=dtype, pool=pool)
    if rank == 0:
        for key, r in results.items():
            what = "1 frame" if key == "one_frame" else f"{args.frames} frames"
            line = (f"[{label}, {what}] t2v R@1/5/10 {r['t2v_r1']:.1f}/{r['t2v_r5']:.1f}/{r['t2v_r10']:.1f}  "
                    f"v2t R@1/5/10 {r['v2t_r1']:.1f}/{r['v2t_r5']:.1f}/{r['v2t_r10']:.1f}")
            if "temporal_acc" in r:
                line += (f"  temporal acc {r['temporal_acc']:.3f} (motion "
                         f"{r.get('temporal_acc_motion', float('nan')):.3f}, order "
                         f"{r.get('temporal_acc_order', float('nan')):.3f}; chance {r['temporal_chance']:.3f})")
            print(line, flush=True)
    return results


def comparison_table(before, after, frames):
    """The built-in default's closing table: the image CLIP against the harvested video model."""
    head = (f"{'':44}{'t2v R@1':>8}{'R@5':>6}{'R@10':>6}{'v2t R@1':>9}{'R@5':>6}{'R@10':>6}"
            f"{'motion':>8}{'order':>7}")
    lines = [head]
    for name, res in (("image CLIP (frames mean-pooled)", before), ("harvested video model", after)):
        for key, what in (("all_frames", f"{frames} frames"), ("one_frame", "1 frame")):
            r = res.get(key)
            if r is None:
                continue
            lines.append(f"{name + ', ' + what:44}{r['t2v_r1']:8.1f}{r['t2v_r5']:6.1f}{r['t2v_r10']:6.1f}"
                         f"{r['v2t_r1']:9.1f}{r['v2t_r5']:6.1f}{r['v2t_r10']:6.1f}"
                         f"{r.get('temporal_acc_motion', float('nan')):8.3f}"
                         f"{r.get('temporal_acc_order', float('nan')):7.3f}")
    lines.append("temporal accuracy: chance 0.25 for motion (4 directions), 0.5 for order (2)")
    return "\n".join(lines)


def image_clip_key(args):
    """What the built-in image CLIP depends on: a change of any of these builds a new one."""
    from hvfm.data.builtin import TOKENIZER_VERSION
    from hvfm.data.synthetic_images import DEFAULT_IMAGES, IMAGE_VERSION
    return {"preset": args.model, "seed": args.seed, "images": DEFAULT_IMAGES,
            "image_generator": IMAGE_VERSION, "tokenizer": TOKENIZER_VERSION, **BUILTIN_IMAGE,
            "max_steps": args.image_steps or BUILTIN_IMAGE["max_steps"]}


def ensure_image_clip(args, rank):
    """The built-in image CLIP (stage 1 on the built-in stills), trained once by this trainer and
    cached in HVFM_CACHE/image_clip/ keyed by `image_clip_key`. Every rank takes part."""
    import hashlib
    import uuid

    import torch.distributed as dist
    from hvfm.data.synthetic import default_cache_dir

    key = image_clip_key(args)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = default_cache_dir().parent / "image_clip" / f"{args.model}-{digest}"
    marker = folder / "hvfm_image_clip.json"
    if marker.exists():
        if rank == 0:
            print(f"image CLIP: the built-in one, cached in {folder}", flush=True)
        return folder
    tmp = Path(broadcast(str(folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"))))
    if rank == 0:
        print(f"image CLIP: building the built-in one once (stage 1: the {args.model} preset on "
              f"the built-in stills, cached in {folder})", flush=True)
    argv = ["--deepspeed", args.deepspeed, "--stage", "image", "--model", args.model,
            "--seed", str(args.seed), "--attn", args.attn, "--precision", args.precision,
            "--workers", str(args.workers), "--output-dir", str(tmp),
            "--max-steps", str(key["max_steps"]), "--max-minutes", str(key["max_minutes"]),
            "--drop-ratio", key["drop_ratio"], *(["--verbose"] if args.verbose else [])]
    summary = train(parse_args(argv), label="image CLIP")
    if rank == 0:
        (tmp / "final" / marker.name).write_text(json.dumps({"key": key, "summary": {
            k: summary[k] for k in ("steps", "wall_s", "eval") if k in summary}}, indent=2))
        if folder.exists():  # a half-written one (no marker)
            shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp / "final", folder)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return folder


# ----------------------------------------------------------------------------- training

def train(args, label=None):
    import deepspeed
    import numpy as np
    import torch
    import torch.distributed as dist
    from tqdm import tqdm
    from hvfm.data.transform import prepare_batch  # device transform

    cuda = torch.cuda.is_available()
    if not args.verbose:
        quiet_libraries()
    if not cuda:  # subnormal floats made the first CPU steps of a fresh run 10-20x slower here
        torch.set_flush_denormal(True)
    weights = check_args(args, cuda)
    image = args.stage == "image"
    builtin = not (args.train_csv or args.train_json or args.train_shards)  # shards hook
    if image:  # stage 1: stills are one-frame clips; contrastive loss alone
        args.frames, args.reverse_negatives, args.motion_channel = 1, 0.0, False
        weights = {"vtc": 1.0, "vtm": 0.0, "mlm": 0.0}
        if builtin and args.batch_size is None:
            args.batch_size = BUILTIN_IMAGE["batch_size"]
    world_guess = int(os.environ.get("WORLD_SIZE", 1))
    cfg = read_ds_config(args.deepspeed, world_guess, args.batch_size)
    out_dir = Path(args.output_dir) if args.output_dir else None
    ckpt_dir = out_dir / "checkpoints" if out_dir else None
    check_output_dir(out_dir or "runs")
    if args.decode_timeout < 0 or args.max_nonfinite < 1:
        raise ConfigError("--decode-timeout must be >= 0 and --max-nonfinite >= 1")
    if args.resume and not (ckpt_dir / "latest").exists():
        raise ConfigError(f"--resume: no checkpoint in {ckpt_dir} (no 'latest' file); "
                          f"start without --resume or point --output-dir at a run that saved one")
    if out_dir and not args.resume and (ckpt_dir / "latest").exists():
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose "
                          f"another --output-dir")
    attn = pick_attention(args.attn, cuda)
    if args.resume and args.precision == "auto":  # keep the precision the run started with
        try:
            args.precision = json.loads((out_dir / "run_config.json").read_text())["precision"]
        except (OSError, ValueError, KeyError):
            pass
    precision, precision_why = pick_precision(args.precision, cuda, cfg, args.deepspeed)
    if precision == "fp16" and not cuda:
        raise ConfigError(f"fp16 ({precision_why}) needs a GPU (DeepSpeed has no fp16 on CPU); "
                          f"use bf16 or fp32")

    rank, world = init_distributed(cuda)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if out_dir is None:
        out_dir = Path(broadcast(time.strftime("runs/%Y%m%d-%H%M%S")))
        ckpt_dir = out_dir / "checkpoints"
    if rank == 0:
        if not out_dir.exists() and label is None:  # a failed start removes it again (main)
            STARTING["made"] = out_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for partial in ckpt_dir.glob(".tmp-*"):  # a save that was killed: never published
            shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()

    harvest = builtin and not image and args.clip is None
    if harvest:  # the built-in default harvests: stage 1 first (once, cached), then this stage
        args.clip = str(ensure_image_clip(args, rank))
    train_ann, eval_ann, tok_dir = prepare_data(args, out_dir, rank)
    model, tokenizer, clip_config, build = build_model(args, tok_dir, out_dir, attn, rank)
    if image:  # an image model: no time, no fusion (the tied token embedding stays trainable)
        tied = model.text.token_embedding.weight
        for p in model.fusion.parameters():
            p.requires_grad_(p is tied)
        model.video.embeddings.temporal_embedding.requires_grad_(False)
    size = args.size or model.video.image_size
    preset = BUILTIN_IMAGE if image else BUILTIN
    max_steps = args.max_steps or (preset.get("max_steps") if builtin else None)
    if builtin and args.epochs is None and args.max_steps is None:
        args.epochs = preset.get("epochs")
    if builtin and image and args.lr is None:
        args.lr = preset["lr"]
    if builtin and args.max_minutes is None and args.max_steps is None:
        args.max_minutes = preset["max_minutes"]  # a slow machine stops early, not late
    micro = cfg["train_micro_batch_size_per_gpu"]
    accum = cfg.get("gradient_accumulation_steps", 1)
    if args.train_shards:  # shards hook
        from hvfm.data.shards import build_shard_loader
        loader = build_shard_loader(args.train_shards, tokenizer, batch_size=micro, frames=args.frames, size=size,
                                    seed=args.seed, num_workers=args.workers, mask_ratio=args.mask_ratio, rank=rank,
                                    world_size=world, pin_memory=cuda, crop_scale=IMAGE_CROP if image else (0.5, 1.0))
    else:
        loader = build_loader(train_ann, tokenizer, batch_size=micro, frames=args.frames, size=size,
                              seed=args.seed, num_workers=args.workers, mask_ratio=args.mask_ratio,
                              rank=rank, world_size=world, pin_memory=cuda,
                              decode_timeout=args.decode_timeout or None,
                              mirror=args.mirror_negatives if image else 0.0,
                              crop_scale=IMAGE_CROP if image else (0.5, 1.0))
    steps_per_epoch = len(loader) // accum
    if max_steps is None:
        max_steps = (args.epochs or 1) * steps_per_epoch
    elif args.epochs:
        max_steps = min(max_steps, args.epochs * steps_per_epoch)

    cfg = dict(cfg)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16"}
    if args.lr is not None:
        cfg.setdefault("optimizer", {}).setdefault("params", {})["lr"] = args.lr
    opt_params = cfg.get("optimizer", {}).get("params", {})
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, max_steps // 20)
    results = {}
    if eval_ann is not None and not args.no_eval and not args.resume and not image and rank == 0:
        # The image CLIP the run starts from, each frame an image: the baseline to beat. In fp32,
        # before DeepSpeed casts the weights, so the numbers are the ones `python -m
        # hvfm.evaluate --checkpoint CLIP_FOLDER` gives.
        results["before"] = run_eval(model.to(device), tokenizer, eval_ann, args, size,
                                     torch.float32, "image CLIP, frames mean-pooled", rank, pool="mean")
    dist.barrier()
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, opt_params.get("weight_decay", 0.0),
                                                   opt_params.get("lr", 1e-4), args.temporal_lr_mult,
                                                   args.fresh_lr_mult),
        config=cfg, lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(max_steps, warmup)))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

    step, wall_before = 0, 0.0
    nonfinite = {"skipped": 0, "streak": 0}
    fed = 0  # micro-batches fed to the model since the run began (trained or skipped)
    if args.resume:
        _, client = engine.load_checkpoint(str(ckpt_dir))
        step, wall_before = client["step"], client.get("wall_s", 0.0)
        states = client.get("loaders")  # one per rank (the file holds rank 0's client state only)
        loader.load_state_dict(states[rank] if states and len(states) == world else client["loader"])
        nonfinite["skipped"] = client.get("nonfinite_skipped", 0)
        fed = client.get("batches_fed", 0)
        if rank == 0:
            truncate_metrics(out_dir / "metrics.csv", step)
    elif rank == 0:
        (out_dir / "run_config.json").write_text(json.dumps(
            {"args": vars(args), "ds_config": cfg, "attn": attn, "precision": precision,
             "precision_why": precision_why, "world_size": world, "max_steps": max_steps,
             "build": build}, indent=2))


    if rank == 0:
        print(f"{label or 'training'}: {max_steps} steps of {micro * accum * world} "
              f"{'images' if image else 'clips'}{' (+ mirrored ones)' if image and args.mirror_negatives else ''} "
              f"({world} rank(s)), attn {attn}, {precision} ({precision_why}), drop ratio {args.drop_ratio}, "
              f"output {out_dir}", flush=True)
    from hvfm.metrics_log import MetricsLog
    columns = ["step", "epoch", "loss", "vtc", "vtm", "mlm", "lr", "samples_per_s", "tokens_per_s",
               "data_s", "step_s", "skipped", "nonfinite"]
    log = MetricsLog(out_dir, columns, append=args.resume) if rank == 0 else None
    if log is not None and log.tb is None and log.tb_missing != "disabled":
        print(f"metrics: {out_dir / 'metrics.csv'} (TensorBoard off: {log.tb_missing})", flush=True)
    bar = tqdm(total=max_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)
    engine.train()
    if label is None:  # training began: what it writes is kept whatever happens next
        STARTING["made"] = None
    start = time.perf_counter()
    samples = tokens = 0
    last = {}
    deadline = start + args.max_minutes * 60 if args.max_minutes else None
    micro_step = 0
    last_saved = step if args.resume else None
    test_nan = TestNaN(rank)

    def skip_nonfinite(what):
        """Count a skipped non-finite micro-batch or step; stop after --max-nonfinite in a row."""
        nonfinite["skipped"] += 1
        nonfinite["streak"] += 1
        if rank == 0:
            tqdm.write(f"warning: step {step + 1}: non-finite {what}; skipped "
                       f"({nonfinite['streak']} in a row, {nonfinite['skipped']} in all)", file=sys.stderr)
        if nonfinite["streak"] >= args.max_nonfinite:
            latest = ckpt_dir / "latest"
            kept = latest.read_text().strip() if latest.exists() else "none"
            raise NonFiniteError(
                f"{nonfinite['streak']} non-finite steps in a row (--max-nonfinite {args.max_nonfinite}), "
                f"the last at step {step + 1} ({what}); stopped without saving, the last checkpoint "
                f"({kept}) is kept in {ckpt_dir}; lower --lr or check the data, then --resume")

    while step < max_steps and (deadline is None or time.perf_counter() < deadline):
        got_batch, started_at = False, loader.position
        t_data = time.perf_counter()
        for batch in loader:
            got_batch = True
            t_fetch = time.perf_counter()
            batch = prepare_batch(batch, engine.device, dtype)  # device transform: uint8 -> crop/resize/normalise there
            # Every random choice of a step derives from (seed, step, micro-step, rank): a resumed
            # run draws exactly what the uninterrupted run drew.
            seeds = np.random.SeedSequence([args.seed, step, micro_step % accum, rank])
            out = engine(batch, drop_ratio=args.drop_ratio, rng=np.random.default_rng(seeds),
                         generator=torch.Generator(device=engine.device).manual_seed(
                             int(seeds.generate_state(1, np.uint64)[0] >> 2)),
                         reverse_negatives=args.reverse_negatives, loss_weights=weights,
                         vtm_hardness=args.vtm_hardness)
            fed += 1
            loss = test_nan(out["loss"], fed)
            # A non-finite loss on any rank: every rank drops this micro-batch (no backward, no
            # step; the data moves on, the step counter and LR schedule do not).
            if not all_ranks_finite(loss):
                skip_nonfinite("loss")
                t_data = time.perf_counter()
                continue
            skipped_before = engine.skipped_steps
            engine.backward(loss)
            engine.step()
            micro_step += 1
            samples += len(batch["index"]) * world
            tokens += (out["video_tokens"] + out["text_tokens"])
            if micro_step % accum:
                continue
            if engine.skipped_steps != skipped_before:
                # Non-finite gradients: DeepSpeed's ZeRO optimizer found them (all ranks agree),
                # skipped the update and zeroed the gradients; the step is not counted.
                skip_nonfinite("gradient")
                t_data = time.perf_counter()
                continue
            nonfinite["streak"] = 0
            step += 1
            now = time.perf_counter()
            last = {k: float(out[k].detach()) for k in ("loss", "vtc", "vtm", "mlm")}
            elapsed = now - start
            if rank == 0:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", vtc=f"{last['vtc']:.2f}", vtm=f"{last['vtm']:.2f}",
                                mlm=f"{last['mlm']:.2f}", lr=f"{scheduler.get_last_lr()[0]:.1e}",
                                sps=f"{samples / elapsed:.1f}", data=f"{t_fetch - t_data:.2f}s",
                                step=f"{now - t_fetch:.2f}s")
                stopping = step >= max_steps or (deadline and now >= deadline)
                if step % args.log_every == 0 or stopping:  # the last step is always logged
                    # losses with 9 significant digits: float32 exactly (resume is checked on them)
                    log.write(dict(zip(columns, [
                        step, loader.epoch, *(f"{last[k]:.9g}" for k in ("loss", "vtc", "vtm", "mlm")),
                        f"{scheduler.get_last_lr()[0]:.3e}", f"{samples / elapsed:.3f}",
                        f"{tokens / elapsed:.1f}", f"{t_fetch - t_data:.4f}",
                        f"{now - t_fetch:.4f}", loader.skipped, nonfinite["skipped"]])))
            if args.save_every and step % args.save_every == 0:
                save(engine, ckpt_dir, step, loader, wall_before + elapsed,
                     {"nonfinite_skipped": nonfinite["skipped"], "batches_fed": fed}, rank)
                last_saved = step
            t_data = time.perf_counter()
            if step >= max_steps or (deadline and now >= deadline):
                break
        else:
            loader.set_epoch(loader.epoch + 1)
        if not got_batch and started_at == 0:
            raise DataError(f"{train_ann.source}: the loader gave no batch (fewer samples than one batch?)")
    bar.close()
    wall = time.perf_counter() - start
    if rank == 0 and step < max_steps and deadline and time.perf_counter() >= deadline:
        print(f"stopped at the time cap: {args.max_minutes:g} minutes of training (--max-minutes) "
              f"after {step} of {max_steps} steps", flush=True)
    if step != last_saved:  # (a resumed run that had nothing left to do saves nothing)
        save(engine, ckpt_dir, step, loader, wall_before + wall,
             {"nonfinite_skipped": nonfinite["skipped"], "batches_fed": fed}, rank)

    if rank == 0:
        # One model, one result: the export, the evaluation below and the DeepSpeed checkpoint
        # all hold the fp32 master weights of the last checkpoint (not the bf16 module).
        from hvfm.export import _build_model, _load_state, consolidate_deepspeed
        state = consolidate_deepspeed(ckpt_dir, (ckpt_dir / "latest").read_text().strip())
        export_final(out_dir / "final", state, clip_config, tokenizer, build, image)
        if eval_ann is not None and not args.no_eval:
            final, _ = _build_model(clip_config, tokenizer, build)
            _load_state(final, state, ckpt_dir)
            results["after"] = run_eval(final.to(device), tokenizer, eval_ann, args, size,
                                        torch.float32, label or ("image CLIP" if image else "harvested"), rank)
            del final
        del state
    dist.barrier()
    # Skip counters summed over ranks; bad files: the union of every rank's.
    counts = torch.tensor([loader.counters()[k] for k in ("skipped", "bad_drawn", "timeouts", "crashes")],
                          dtype=torch.float64, device=engine.device)
    dist.all_reduce(counts)
    skipped, bad_drawn, timeouts, crashes = (int(c) for c in counts.tolist())
    bad_files = sorted({f for part in all_gather(sorted(loader.bad_files)) for f in part})
    summary = {"steps": step, "wall_s": wall_before + wall, "train_s_this_run": wall,
               "samples_per_s": samples / wall, "tokens_per_s_per_device": tokens / wall,
               "skipped_samples": skipped, "bad_rows_drawn": bad_drawn, "decode_timeouts": timeouts,
               "decoder_crashes": crashes, "bad_files": len(bad_files),
               "nonfinite_skipped": nonfinite["skipped"], "world_size": world, "attn": attn, "precision": precision, "last_losses": last,
               "eval": results, "output_dir": str(out_dir)}
    if rank == 0:
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: v for k, v in summary.items() if k != "eval"}), flush=True)
        log.close()
        if "before" in results and "after" in results:
            print(comparison_table(results["before"], results["after"], args.frames), flush=True)
    return summary


# ----------------------------------------------------------------------------- reliability

def all_gather(obj):
    import torch.distributed as dist
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def all_ranks_finite(loss):
    """True when the loss is finite on every rank (one small all-reduce: the ranks agree)."""
    import torch
    import torch.distributed as dist
    flag = (~torch.isfinite(loss.detach())).any().to(torch.float32).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0


def truncate_metrics(path, step):
    """A resumed run recomputes the steps after its checkpoint: drop their rows logged before."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step]
    if len(keep) == len(rows):
        return
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def _fsync(path, directory=False):
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class TestNaN:
    """Test hook (tests only): HVFM_TEST_NAN_LOSS / HVFM_TEST_NAN_GRAD = "3,4,9-" make the loss
    (or, with a finite loss, every gradient) NaN at those micro-batches (1-based, counted from the
    start of the run, across resumes); an entry "3@1" applies on rank 1 only."""

    def __init__(self, rank):
        self.rank = rank
        self.loss = self._parse(os.environ.get("HVFM_TEST_NAN_LOSS", ""))
        self.grad = self._parse(os.environ.get("HVFM_TEST_NAN_GRAD", ""))

    def _parse(self, spec):
        ranges = []
        for item in filter(None, spec.split(",")):
            item, _, on_rank = item.partition("@")
            if on_rank and int(on_rank) != self.rank:
                continue
            lo, dash, hi = item.partition("-")
            ranges.append((int(lo), int(hi) if hi else (10**12 if dash else int(lo))))
        return ranges

    def __call__(self, loss, fed):
        if any(lo <= fed <= hi for lo, hi in self.loss):
            return loss * float("nan")
        if any(lo <= fed <= hi for lo, hi in self.grad):
            return _NaNGrad.apply(loss)
        return loss


def _nan_grad_fn():
    import torch

    class NaNGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")
    return NaNGrad


class _LazyNaNGrad:
    fn = None

    def apply(self, x):
        if self.fn is None:
            self.fn = _nan_grad_fn()
        return self.fn.apply(x)


_NaNGrad = _LazyNaNGrad()


class _SaveGuard:
    """Wraps the engine's file writes during one save: each file is fsynced after it is written,
    and an OSError (disk full, ...) is recorded instead of raised, so this rank goes on through
    DeepSpeed's collectives with the others and all ranks learn of it together afterwards.

    Test hook (tests only): HVFM_TEST_SAVE_FAULT="enospc@STEP" writes 1 KiB of the first file of
    the save at STEP and then raises ENOSPC; "hang@STEP" writes the first file, touches
    TMPDIR/.test-hang-rankR in the checkpoint's temp folder and sleeps for ever; ":R" after STEP
    limits it to rank R."""

    def __init__(self, engine, step, rank):
        self.engine, self.rank, self.error, self.files = engine, rank, None, 0
        self.ce = engine.checkpoint_engine
        self.inner_save, self.inner_copy = self.ce.save, engine._copy_recovery_script
        self.fault = None
        spec = os.environ.get("HVFM_TEST_SAVE_FAULT", "")
        if spec:
            kind, _, where = spec.partition("@")
            at, _, on_rank = where.partition(":")
            if int(at) == step and (not on_rank or int(on_rank) == rank):
                self.fault = kind
        self.ce.save = self.save
        engine._copy_recovery_script = self.copy

    def save(self, state_dict, path, *args, **kwargs):
        if self.error is not None:
            return None
        try:
            if self.fault == "enospc":
                with open(path, "wb") as f:
                    f.write(b"\0" * 1024)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            out = self.inner_save(state_dict, path, *args, **kwargs)
            _fsync(path)
            self.files += 1
            if self.fault == "hang":
                Path(path).parent.joinpath(f".test-hang-rank{self.rank}").touch()
                while True:
                    time.sleep(3600)
            return out
        except OSError as e:
            self.error = e
            return None

    def copy(self, *args, **kwargs):
        if self.error is None:
            try:
                return self.inner_copy(*args, **kwargs)
            except OSError as e:
                self.error = e
        return None

    def restore(self):
        self.ce.save = self.inner_save
        self.engine._copy_recovery_script = self.inner_copy


def save(engine, ckpt_dir, step, loader, wall, extra, rank):
    """Write the checkpoint of `step` so that `latest` never names a partial one: every rank writes
    into CKPT/.tmp-stepN, all ranks agree that every write succeeded, then rank 0 fsyncs and
    renames the folder to CKPT/stepN and replaces `latest` atomically (temp file + os.replace).
    A kill at any moment leaves `latest` naming the previous complete checkpoint (the next start
    removes the .tmp- folder). A failed write (disk full) removes the partial folder on every
    rank's say-so and raises CheckpointError on all ranks; nothing published is touched."""
    import torch.distributed as dist
    tag = f"step{step:08d}"
    tmp_tag = f".tmp-{tag}"
    client = {"step": step, "loader": loader.state_dict(), "loaders": all_gather(loader.state_dict()),
              "wall_s": wall, **extra}
    guard = _SaveGuard(engine, step, rank)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client, save_latest=False)
    finally:
        guard.restore()
    errors = [e for e in all_gather(None if guard.error is None else _describe(guard.error)) if e]
    if not errors:  # every file is on disk: publish, and let every rank know how that went
        failed = None
        if rank == 0:
            try:
                _publish(ckpt_dir, tmp_tag, tag)
            except OSError as e:
                failed = _describe(e)
        errors = [e for e in all_gather(failed) if e]
    if errors:
        if rank == 0:
            shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
        dist.barrier()
        latest = ckpt_dir / "latest"
        prev = latest.read_text().strip() if latest.exists() else None
        raise CheckpointError(f"saving checkpoint {tag} in {ckpt_dir} failed ({errors[0]}); "
                              + (f"the previous checkpoint {prev} is intact" if prev else "no checkpoint was kept")
                              + "; free disk space, then --resume")
    dist.barrier()


def _describe(e):
    return f"{e.strerror or e}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)


def _publish(ckpt_dir, tmp_tag, tag):
    tmp, final, latest = ckpt_dir / tmp_tag, ckpt_dir / tag, ckpt_dir / "latest"
    named = latest.read_text().strip() if latest.exists() else None
    if final.exists():  # a copy of this step that a killed run renamed but never named in latest
        assert named != tag, f"{final} is the checkpoint 'latest' names"
        shutil.rmtree(final)
    _fsync(tmp, directory=True)
    os.rename(tmp, final)
    _fsync(ckpt_dir, directory=True)
    with open(ckpt_dir / "latest.tmp", "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(ckpt_dir / "latest.tmp", latest)
    _fsync(ckpt_dir, directory=True)


def export_final(folder, state, clip_config, tokenizer, build, image=False):
    """Write OUTPUT_DIR/final from a (consolidated fp32) state: an hvfm export, or after the image
    stage a plain HF CLIPModel folder with its tokenizer."""
    from hvfm.export import save_clip_folder, save_export
    if image:
        save_clip_folder(folder, state, clip_config, tokenizer)
    else:
        save_export(folder, state, clip_config, tokenizer, build)


def remove_shm_buffer():
    """DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm/deepspeed_allreduce_buffer_* (about
    70 MB per rank and master port) behind at exit; remove this rank's. Only after the final
    barrier: the other ranks open it by name while they initialise."""
    addr, port, rank = (os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"))
    if addr and port and rank and hasattr(os, "getuid"):
        try:
            os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
        except OSError:
            pass


def main(argv=None):
    args = parse_args(argv)
    code = 0
    collective = False  # an error every rank raised at the same point: they can still meet
    try:
        train(args)
    except (DataError, ConfigError, CheckpointError, NonFiniteError) as e:
        import torch.distributed as dist
        code = 3 if isinstance(e, NonFiniteError) else 2
        collective = getattr(e, "collective", False)
        if not (collective and dist.is_initialized() and dist.get_rank() != 0):  # one line per run
            from tqdm import tqdm
            tqdm.write(f"error: {e}", file=sys.stderr)  # on a line of its own, under a live bar
        if code == 2 and STARTING["made"] is not None:  # a failed start leaves nothing behind
            shutil.rmtree(STARTING["made"], ignore_errors=True)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            if code == 0 or collective:
                dist.barrier()
            dist.destroy_process_group()
            if code == 0 or collective:  # every rank is past the barrier, long done mapping it
                remove_shm_buffer()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
