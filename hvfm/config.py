"""The trainer's configuration: its flags (`parse_args`), their checks (`check_args`), the
DeepSpeed config checks (`read_ds_config`, the hand-kept list of DeepSpeed's top-level keys),
the precision choice and the config the engine gets (`engine_config`)."""
from __future__ import annotations

import argparse
import difflib
import json
import os
import tempfile
import time
from pathlib import Path

# The built-in default (no data flags) has two stages, as the method: an image CLIP (the `tiny`
# preset) pretrained on the built-in stills, built once and cached, then post-pretrained on the
# built-in video corpus with the defaults of any --clip run (2 epochs). Stage 1 trains a random
# model, at a higher LR than a pretrained one is tuned at.
BUILTIN = {"epochs": 2, "max_minutes": 10.0}
TEMPORAL_LR_MULT, FRESH_LR_MULT, VTM_HARDNESS = 100.0, 10.0, 0.0
IMAGE_CROP = (0.9, 1.0)  # stills: their captions name places, which a large crop would move
SAVE_EVERY_MINUTES = 30.0  # on your data: a multi-day run loses at most this much to a crash
BUILTIN_IMAGE = {"max_steps": 1200, "lr": 5e-4, "batch_size": 64, "max_minutes": 10.0,
                 "drop_ratio": "0.5"}
# The caption-swap term's default weight per stage, chosen by measurement (README "What teaches
# time", profiling/results/ablate_time.md): on in both stages (in the video stage it raised the
# order of events by ~0.04 in 2 seeds at no R@1 cost).
SWAP_WEIGHT = {"image": 0.2, "video": 0.2}
ATTN_CHOICES = ("auto", "sdpa", "torch-varlen", "triton", "flash_attn", "xformers")
PRESETS = ("tiny", "vit-b16", "vit-l14")
DESCRIPTION = "hvfm training entry point: `deepspeed hvfm/train.py --deepspeed ds_configs/z2.json [flags]`."


class ConfigError(ValueError):
    """A bad flag or config file: one line naming it and the fix."""


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
    ap = argparse.ArgumentParser(prog="hvfm/train.py", description=DESCRIPTION,
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
    m.add_argument("--clip", metavar="DIR_OR_HUB_ID",
                   help="HF CLIPModel to start from: a folder, or a hub ID such as "
                        "openai/clip-vit-base-patch16 (fetched once into the Hugging Face cache)")
    m.add_argument("--fusion-layers", type=int, default=2,
                   help="fusion encoder blocks (copied from the text tower's last blocks)")
    m.add_argument("--fusion-width", type=int, default=None, help="default: the text width")
    m.add_argument("--attn", default="auto", help=f"attention backend: {', '.join(ATTN_CHOICES)}")
    m.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward (less memory)")
    m.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32", "fp16"],
                   help="auto: the DeepSpeed config's if it states one, else bf16 on a GPU and "
                        "the faster of bf16/fp32 on a CPU (measured once per machine, cached in "
                        "HVFM_CACHE/cpu_precision.json)")
    d = ap.add_argument_group("data (default: the built-in synthetic corpus)")
    d.add_argument("--train-csv", help="WebVid CSV (videoid,contentUrl,duration,page_dir,name), or "
                                       "MSR-VTT's MSRVTT_train.9k.csv / 7k (format from content)")
    d.add_argument("--train-json", help='JSON list of {"video", "caption"}, or any release file '
                                        'python -m hvfm.evaluate reads (format from content)')
    d.add_argument("--train-shards", help="tar shards written by `python -m hvfm.data.prepare`: "
                                          "a folder or a brace pattern DIR/{000000..000099}.tar")
    d.add_argument("--video-root", help="folder the training videos are under")
    d.add_argument("--eval-json", help="retrieval test annotations (MSR-VTT style JSON)")
    d.add_argument("--eval-video-root", help="folder the evaluation videos are under")
    d.add_argument("--tokenizer", help="HF tokenizer folder (default: the CLIP folder's, or one "
                                       "trained on the captions)")
    d.add_argument("--frames", type=int, default=8, help="frames sampled per clip")
    d.add_argument("--size", type=int, default=None, help="frame side (default: the model's)")
    from hvfm.data.loading.dataset import default_workers
    d.add_argument("--workers", type=int, default=default_workers(),
                   help="loader worker processes per rank (default: %(default)s here: cores per "
                        "local rank - 1, at least 1, no upper cap; local ranks: LOCAL_SIZE, set by the "
                        "deepspeed launcher, or LOCAL_WORLD_SIZE, set by torchrun)")
    d.add_argument("--decoder", default="auto", choices=("auto", "decord", "torchcodec", "pyav"),
                   help="video decoder of the loader workers: auto tries decord, torchcodec, PyAV in "
                        "that order (a measured order: hvfm/data/decode.py AUTO_ORDER), skipping one "
                        "that is not installed; tar shards of pre-extracted frames (prepare --format "
                        "jpg/webp) decode images and ignore it")
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
                        "along an axis its caption names (left-right or top-bottom; captions with "
                        "no place words are not mirrored) with its place words swapped, a hard "
                        "negative that only position tells apart")
    t.add_argument("--swap-weight", type=float, default=None, metavar="W",
                   help="weight of the caption-swap term (any stage, any data): each caption with "
                        "a pair of place, direction or time words (left/right, top/bottom, up/down, "
                        "into/out of, before/after, 'A then B', ...) is swapped and encoded (one "
                        "more text-tower pass), and two cross-entropies are added: [s(v,t), "
                        "s(t,t_swap)] and [s(v,t), s(v,t_swap)], the own caption the target "
                        f"(default: {SWAP_WEIGHT['image']:g} in the image stage, where it teaches "
                        f"the text tower its place words; {SWAP_WEIGHT['video']:g} in the video "
                        "stage, where it sharpened the order of events; 0 turns it off)")
    o = ap.add_argument_group("schedule and output")
    o.add_argument("--max-steps", type=int, default=None,
                   help=f"default: --epochs' steps; the image stage on the built-in stills: "
                        f"{BUILTIN_IMAGE['max_steps']}")
    o.add_argument("--epochs", type=int, default=None,
                   help=f"passes over the data (default 1; {BUILTIN['epochs']} on the built-in video corpus)")
    o.add_argument("--image-steps", type=int, default=None,
                   help=f"steps of the built-in image CLIP when the built-in default has to build it "
                        f"(default: {BUILTIN_IMAGE['max_steps']}; each value is cached on its own)")
    o.add_argument("--rebuild-image-clip", action="store_true",
                   help="train the built-in image CLIP again and replace the cached one (e.g. one "
                        "its time cap cut short, which later runs reuse and name as such)")
    o.add_argument("--max-minutes", type=float, default=None,
                   help=f"stop training after this long (default: {BUILTIN['max_minutes']:g} on the "
                        f"built-in clips, {BUILTIN_IMAGE['max_minutes']:g} on the built-in stills, no "
                        f"limit on your data); on several ranks rank 0's clock decides, read every "
                        f"--log-every steps")
    o.add_argument("--lr", type=float, default=None,
                   help=f"peak LR (default: the config's; {BUILTIN_IMAGE['lr']} for the image stage "
                        f"on the built-in stills, a model trained from random weights)")
    o.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    o.add_argument("--output-dir", default=None, help="default: runs/<date-time>")
    o.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N steps (default: 0, by steps never; a run always "
                        "saves at its end)")
    o.add_argument("--save-every-minutes", type=float, default=None, metavar="M",
                   help=f"checkpoint after every M minutes of training (default: {SAVE_EVERY_MINUTES:g} "
                        f"on your data, 0 on the built-in corpora; 0: never by time). Rank 0's clock "
                        f"decides for every rank, read every --log-every steps, so a save comes up to "
                        f"--log-every - 1 steps late")
    o.add_argument("--resume", action="store_true", help="continue from --output-dir's last checkpoint")
    o.add_argument("--log-every", type=int, default=10, help="steps between rows of metrics.csv")
    o.add_argument("--no-eval", action="store_true", help="skip the before/after evaluation")
    o.add_argument("--seed", type=int, default=0, help="every random choice derives from it")
    o.add_argument("--verbose", action="store_true",
                   help="show the libraries' own progress bars, info lines and notes (transformers, "
                        "the hub, DeepSpeed's comm-op build line and ZeRO-3 notes, the FutureWarnings "
                        "raised inside torch.distributed and DeepSpeed), hidden by default; the "
                        "deepspeed launcher's own lines are hidden by its -q: deepspeed -q hvfm/train.py")
    r = ap.add_argument_group("reliability")
    r.add_argument("--decode-timeout", type=float, default=30.0,
                   help="abandon a video whose decode takes longer than this many seconds (the "
                        "decoder runs in a watchdog child process, killed and replaced); 0: decode "
                        "in the loader worker itself, no watchdog")
    r.add_argument("--max-nonfinite", type=int, default=5,
                   help="stop (exit code 3) after this many non-finite losses or gradients in a row; "
                        "each one is skipped")
    args = ap.parse_args(argv)
    if args.swap_weight is None:  # the stage's default (SWAP_WEIGHT)
        args.swap_weight = SWAP_WEIGHT["image" if args.stage == "image" else "video"]
    return args


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
    if isinstance(cfg, dict) and "activation_checkpointing" in cfg:  # read by nothing here
        raise ConfigError(f'{path}: hvfm does not read the "activation_checkpointing" section; remove '
                          f'it and pass --activation-checkpointing (each block recomputed in the backward)')
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
    if sum(map(bool, (args.train_csv, args.train_json, args.train_shards))) > 1:
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
    if not 0.0 <= args.swap_weight:
        raise ConfigError(f"--swap-weight {args.swap_weight:g}: give a number >= 0")
    from hvfm.model import parse_drop_ratio
    for flag, value in (("--drop-ratio", args.drop_ratio), ("--eval-drop-ratio", args.eval_drop_ratio)):
        try:
            parse_drop_ratio(value)
        except ValueError as e:
            raise ConfigError(f"{flag}: {e}") from None
    return {**dict(zip(("vtc", "vtm", "mlm"), weights)), "swap": args.swap_weight}


def pick_attention(name, cuda):
    from hvfm.model import BACKENDS
    if name == "auto":
        return "triton" if cuda and "triton" in BACKENDS else "sdpa"
    return name


def stated_precision(cfg):
    """The precision a DeepSpeed config states, by DeepSpeed's own convention: "bf16" or "fp16"
    for a section with "enabled": true ("bfloat16" is bf16's alias); "fp32" when it has a bf16,
    bfloat16 or fp16 section and none is enabled (DeepSpeed then trains in fp32: a user who
    wrote "bf16": {"enabled": false} asked for that); None when it has no precision section at
    all, the one case `--precision auto` decides."""
    sections = [(key, name) for key, name in (("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"))
                if key in cfg]
    on = [name for key, name in sections if isinstance(cfg[key], dict) and cfg[key].get("enabled") is True]
    if on:
        return on[0]
    return "fp32" if sections else None


def pick_precision(choice, cuda, cfg=None, source="the DeepSpeed config"):
    """(precision, why): what the config states, else `--precision`, else (auto) bf16 on a GPU
    and on a CPU whichever of bf16/fp32 runs a transformer-sized matmul faster, measured once per
    machine (`cpu_precision`). A flag that contradicts the config is a ConfigError."""
    stated = stated_precision(cfg or {})
    if stated and choice not in ("auto", stated):
        says = ("disables bf16 and fp16 (fp32)" if stated == "fp32"
                else f'enables {stated} ("{stated}": {{"enabled": true}})')
        raise ConfigError(f'--precision {choice} contradicts {source}, which {says}; drop the flag '
                          f'or change the config')
    if stated == "fp32":
        return stated, f"{source} disables bf16 and fp16"
    if stated:
        return stated, f"{source} enables it"
    if choice != "auto":
        return choice, "--precision"
    if cuda:
        return "bf16", "auto: a GPU"
    return cpu_precision()


def cpu_fingerprint():
    """What the CPU precision choice depends on: the CPU model, torch, and its thread count."""
    import platform

    import torch
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads()}


def time_matmuls(rounds=5, reps=10):
    """{dtype: seconds}: the fastest of `rounds` rounds of `reps` 2048x512x1024 matmuls per dtype,
    the rounds interleaved (the fastest round is the one least disturbed by other load)."""
    import torch
    mats = {name: (torch.randn(2048, 512, dtype=dt), torch.randn(512, 1024, dtype=dt))
            for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16))}
    best = {name: float("inf") for name in mats}
    for _ in range(rounds):
        for name, (a, b) in mats.items():
            a @ b
            start = time.perf_counter()
            for _ in range(reps):
                a @ b
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def cpu_precision(cache=None, measure=time_matmuls):
    """(precision, why) of `--precision auto` on a CPU: bf16 if it runs a transformer-sized matmul
    faster than fp32, else fp32. Measured once per machine (CPU model, torch, threads) and cached
    in HVFM_CACHE/cpu_precision.json, so the same command trains in the same precision whatever
    the load when it starts; delete the file to measure again."""
    from hvfm.data.synthetic.common import cache_root
    path = Path(cache) if cache is not None else cache_root() / "cpu_precision.json"
    machine = cpu_fingerprint()
    try:
        entry = json.loads(path.read_text())
        if entry.get("machine") == machine and entry.get("precision") in ("bf16", "fp32"):
            return entry["precision"], (f"auto: measured once on this CPU on {entry['date']} "
                                        f"({entry['times']}), cached in {path}")
    except (OSError, ValueError, AttributeError):
        pass
    times = measure()
    pick = "bf16" if times["bfloat16"] < times["float32"] else "fp32"
    said = (f"a 2048x512x1024 matmul x10: {1e3 * times['bfloat16']:.0f} ms in bf16, "
            f"{1e3 * times['float32']:.0f} ms in fp32, the fastest of 5 rounds")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"machine": machine, "precision": pick, "times": said,
                                   "date": time.strftime("%Y-%m-%d")}, indent=1) + "\n")
        os.replace(tmp, path)
        where = f"measured now and cached in {path}"
    except OSError as e:
        where = f"measured now, not cached ({type(e).__name__}: {e})"
    return pick, f"auto: on this CPU {said}; {where}"


def engine_config(cfg, precision, lr=None):
    """The config the DeepSpeed engine gets: the checked file's, with the precision picked
    (`pick_precision`) stated, `--lr` as the optimizer's LR, and, in bf16 under ZeRO, gradients
    accumulated and reduced in fp32 (`data_types.grad_accum_dtype`; the file's own value wins).
    Without ZeRO DeepSpeed has no bf16 + fp32-accumulation mode (NotImplementedError), so the
    key is left out there."""
    cfg = dict(cfg)
    cfg["bf16"] = {**(cfg.get("bf16") or {}), "enabled": precision == "bf16"}
    cfg["fp16"] = {**(cfg.get("fp16") or {}), "enabled": precision == "fp16"}
    cfg.pop("bfloat16", None)  # bf16's alias: the section above replaces it
    if lr is not None:
        cfg["optimizer"] = dict(cfg.get("optimizer", {}))
        cfg["optimizer"]["params"] = {**cfg["optimizer"].get("params", {}), "lr": lr}
    stage = (cfg.get("zero_optimization") or {}).get("stage", 0)
    if precision == "bf16" and stage >= 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32", **(cfg.get("data_types") or {})}
    return cfg


def is_builtin(args):
    """No data flags: the run trains on the built-in corpus of its stage."""
    return not (args.train_csv or args.train_json or args.train_shards)


def check_run(args, cuda):
    """Every check that needs no process group, before any work: the flags, the DeepSpeed config,
    the output folder and the precision. Applies the image stage's fixed settings to `args`.
    Returns (loss weights, the checked DeepSpeed config, attention backend, precision, why)."""
    weights = check_args(args, cuda)
    builtin = is_builtin(args)
    if args.stage == "image":  # stage 1: stills are one-frame clips; contrastive loss alone
        args.frames, args.reverse_negatives, args.motion_channel = 1, 0.0, False
        weights = {"vtc": 1.0, "vtm": 0.0, "mlm": 0.0, "swap": args.swap_weight}
        if builtin and args.batch_size is None:
            args.batch_size = BUILTIN_IMAGE["batch_size"]
    cfg = read_ds_config(args.deepspeed, int(os.environ.get("WORLD_SIZE", 1)), args.batch_size)
    out_dir = Path(args.output_dir) if args.output_dir else None
    check_output_dir(out_dir or "runs")
    if args.decode_timeout < 0 or args.max_nonfinite < 1:
        raise ConfigError("--decode-timeout must be >= 0 and --max-nonfinite >= 1")
    if args.log_every < 1:
        raise ConfigError(f"--log-every {args.log_every}: give a positive number of steps")
    if args.save_every < 0:
        raise ConfigError(f"--save-every {args.save_every}: give a number of steps >= 0 (0: by steps never)")
    if args.save_every_minutes is None:
        args.save_every_minutes = 0.0 if builtin else SAVE_EVERY_MINUTES
    if not args.save_every_minutes >= 0:
        raise ConfigError(f"--save-every-minutes {args.save_every_minutes:g}: give minutes >= 0 (0: never by time)")
    ckpt_dir = out_dir / "checkpoints" if out_dir else None
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
    precision, why = pick_precision(args.precision, cuda, cfg, args.deepspeed)
    if precision == "fp16" and not cuda:
        raise ConfigError(f"fp16 ({why}) needs a GPU (DeepSpeed has no fp16 on CPU); use bf16 or fp32")
    return weights, cfg, attn, precision, why


def schedule_defaults(args, builtin, image):
    """The built-in corpora's schedule where the flags leave it open (steps, epochs, LR, time
    cap); returns --max-steps or the preset's (None: the epochs decide)."""
    preset = BUILTIN_IMAGE if image else BUILTIN
    max_steps = args.max_steps or (preset.get("max_steps") if builtin else None)
    if builtin and args.epochs is None and args.max_steps is None:
        args.epochs = preset.get("epochs")
    if builtin and image and args.lr is None:
        args.lr = preset["lr"]
    if builtin and args.max_minutes is None and args.max_steps is None:
        args.max_minutes = preset["max_minutes"]  # a slow machine stops early, not late
    return max_steps
