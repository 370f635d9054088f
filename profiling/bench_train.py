"""Training throughput of the trainer's own step: the fused packed path against the unfused
padded baseline, per drop ratio, and the loader's share of a training step.

Everything is built the way `hvfm/train.py` builds it: its flags and checks (`hvfm.config`: the
DeepSpeed config, the precision probe), the process group, the data (`prepare_data`: the built-in
corpus, or --train-csv / --train-json / --train-shards), the model (`hvfm.build.build_model`: the
--model preset with random weights, or --clip), the loader (`build_train_loader`) and the
DeepSpeed engine with the trainer's LR groups (`build_engine`). Every timed step is the trainer's
`train_step`: the batch to the device and its crop/resize/normalise/cast there, forward (VTC, VTM
with hard and reversed negatives, MLM, at the run's loss weights), backward, optimizer step.
Only the weights differ from a run: a preset starts random, also on the built-in corpus, where
the trainer would first build the image CLIP (speed does not depend on the weights).

Two engines with identical weights, two phases per drop ratio:

  compute  After a warm-up, fused and unfused alternate step by step on the same loader batch
           with the same seeds (same kept patches, same negatives), so a noisy machine slows both
           alike and the ratio holds. Waiting for the batch is not timed here. Per variant:
           samples/s, tokens/s (kept video + text tokens per second per device), the step split
           into prepare (copy + device transform) / forward / backward / optimizer (CUDA events
           on GPU, perf_counter on CPU), TFLOP/s and MFU (useful FLOPs on the real packed shapes:
           see `train_flops`), peak memory, and fused/unfused ratios.
  loader   The fused engine alone pulls its batches from the loader as the training loop does.
           The first (workers x 2) steps are not counted: the loader queue filled up during the
           compute phase. Of the next --steps: the time spent waiting for a batch against the
           time in the step (the loader's share), and samples/s end to end.

Then the extras, at one drop ratio (--extras-drop, 0.5): reversed-clip negatives for a fraction
of the batch (--reverse 1 0.5 0: train.py's --reverse-negatives) and the motion channel
(--motion on off: --[no-]motion-channel; the other setting is a second model built by
`build_model`, with its own fused and unfused engines). The first value of each is the base; the
others change one of the two from it (--grid: every combination). Every setting and both variants
take each batch in turn with the same seeds, so the cost of each extra is a ratio measured in one
run: per row the same numbers as above, and samples/s against the base setting.

Each engine's first step (a warm-up step: compile, autotune, DeepSpeed's lazy set-up) is reported
apart, against its steady-state step.

    python profiling/bench_train.py [--drop 0.5 0.75 0.1:0.5] [--steps 8] [--warmup 2]
                                    [--fused A/E] [--unfused A/E] [--out profiling/results]
                                    [--reverse 1 0.5 0] [--motion on off] [--extras-drop 0.5]
                                    [--grid | --no-extras]
                                    [--gpu-defaults | --cpu-defaults] [train.py flags ...]

Any other flag is the trainer's (`python hvfm/train.py --help`), e.g. --deepspeed, --model, --clip,
--frames, --size, --batch-size, --workers, --precision, --activation-checkpointing, the data
flags. Defaults: on CPU --model tiny, 4 frames of 96 px, batch 8, drop 0.5, 0.75 and U[0.1, 0.5]
per sample (a few minutes on 2 cores); with CUDA (or --gpu-defaults) --model vit-b16, 8 frames of
224 px, batch 32, drop 0, 0.5, 0.75, 0.9 and U[0.1, 0.5]. --deepspeed defaults to ds_configs/z2.json.
Without data flags the built-in corpus is the data (generated once and cached, as the trainer
does): its clips are small, so decoding is cheaper than on WebVid's 640x360
(`profiling/bench_data.py` measures that). Writes bench_train.json (machine, versions, commit,
every step), bench_train.md and bench_train.png (when matplotlib is installed) into --out. The
JSON and the markdown are rewritten (atomically) after each engine's first step, each drop ratio
and each round of the extras, marked "partial": true (the markdown's title: PARTIAL) until the
end, so a run cut short (SIGTERM from `timeout` included) keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import kernels  # noqa: E402  (the Triton compile + autotune report of each engine's first step)
from profiling.machine import (RESULTS, describe, machine_info, markdown_table, nvml_used_bytes,  # noqa: E402
                               pyplot, reset_peak_rss, rss_bytes, write_json, write_markdown)

GIB = 2.0 ** 30
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched case-insensitively against the
# device name in this order (so "H100 PCIe" wins over "H100"). Override with --peak-tflops.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0),
                   ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0),
                   ("A800", 312.0), ("L40S", 362.0))
# (the trainer's flags, the bench's) of each set of defaults; the user's own flags win
CPU_DEFAULTS = (["--model", "tiny", "--frames", "4", "--size", "96", "--batch-size", "8"],
                dict(drop=["0.5", "0.75", "0.1:0.5"], steps=8, warmup=2))
GPU_DEFAULTS = (["--model", "vit-b16", "--frames", "8", "--size", "224", "--batch-size", "32"],
                dict(drop=["0", "0.5", "0.75", "0.9", "0.1:0.5"], steps=6, warmup=3))
PREFETCH = 2  # batches each loader worker keeps ready (build_loader's prefetch_factor)


def gpu_peak_tflops(name):
    """Dense bf16 peak of a known GPU from its name, else None."""
    low = (name or "").lower()
    for key, peak in GPU_PEAK_TFLOPS:
        if key.lower() in low:
            return peak
    return None


def cpu_peak_tflops(dtype, n=1024, reps=5):
    """Measured rate of one large square matmul in `dtype` on all threads (best of `reps`): the
    CPU's practical peak, against which MFU on CPU is reported."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best / 1e12


# ------------------------------------------------------------------------------------ FLOPs

@dataclass(frozen=True)
class ModelShape:
    """What the FLOP count needs of a VideoLanguageModel."""
    v_width: int
    v_layers: int
    v_mlp: int
    patch: int
    channels: int
    t_width: int
    t_layers: int
    t_mlp: int
    f_width: int
    f_layers: int
    f_mlp: int
    proj: int
    vocab: int
    motion: bool = False

    @classmethod
    def of(cls, model):
        v, t, f = model.video, model.text, model.fusion
        pw = v.embeddings.patch_weight
        return cls(v_width=pw.shape[0], v_layers=len(v.layers), v_mlp=v.layers[0].mlp.fc1.out_features,
                   patch=pw.shape[-1], channels=pw.shape[1],
                   t_width=t.token_embedding.embedding_dim, t_layers=len(t.layers),
                   t_mlp=t.layers[0].mlp.fc1.out_features,
                   f_width=f.final_layer_norm.weight.shape[0], f_layers=len(f.layers),
                   f_mlp=f.layers[0].mlp.fc1.out_features if len(f.layers) else 0,
                   proj=v.visual_projection.out_features, vocab=t.token_embedding.num_embeddings,
                   motion=v.embeddings.motion_weight is not None)


def _blocks(rows, width, mlp, layers):
    """Linear FLOPs of `layers` pre-LN blocks over `rows` tokens: q,k,v,out + fc1, fc2."""
    return 2.0 * rows * (4 * width * width + 2 * width * mlp) * layers


def train_flops(s: ModelShape, video_lens, text_lens, masked, reverse=1.0, vtm=True, mlm=True):
    """Useful FLOPs of one training step of VideoLanguageModel.forward + backward.

    video_lens: per-sample packed video lengths (kept patches + 1 CLS); text_lens: caption
    lengths (BOS..EOS); masked: number of MLM positions; reverse: the fraction of the batch
    (True: all) whose clips are also encoded played backwards (the model's `reverse_count`: the
    first ones), a second video pass (a VTC column, a VTM pair) as the trainer does by default;
    vtm / mlm: whether those losses run (a zero loss weight skips them).

    Forward: every matmul 2*rows*in*out; attention 4 * sum(Lq*Lk) * D*H (causal text attention:
    Lq*(Lq+1)/2 pairs); patch embedding 2 * kept * C*p*p * W (kept patches only: the unfused
    path's work on dropped patches is waste, not counted), plus the motion channel's 2 -> W map.
    Training = 3x linear (fwd + 2 bwd), 3.5x attention (bwd 2.5x fwd, as flash-attn counts), 2x
    patch embedding (no pixel gradient). Activation-checkpointing recomputation is not counted
    (MFU counts useful work). The VTM hard negatives are drawn at run time: their lengths are
    counted at the batch means (exact when all clips keep the same count and all captions are
    equally long).
    Returns dict(linear, attention, patch = forward FLOPs by kind; forward, total = training).
    """
    from hvfm.model.model import reverse_count
    v = np.asarray(video_lens, np.float64)
    t = np.asarray(text_lens, np.float64)
    B = len(v)
    n_rev = reverse_count(reverse, B)
    vr, tr = v[:n_rev], t[:n_rev]  # the reversed clips (same kept patches) and their captions
    Wv, Wt, Wf, P = s.v_width, s.t_width, s.f_width, s.proj
    lin = att = 0.0
    kept = v.sum() - B + vr.sum() - n_rev
    # video tower, main pass + the reversed one
    patch = 2.0 * kept * s.channels * s.patch ** 2 * Wv
    if s.motion:
        lin += 2.0 * kept * 2 * Wv
    lin += _blocks(v.sum() + vr.sum(), Wv, s.v_mlp, s.v_layers) + 2.0 * (B + n_rev) * Wv * P
    att += 4.0 * ((v ** 2).sum() + (vr ** 2).sum()) * Wv * s.v_layers
    # text tower: the caption, and the masked caption when MLM runs
    text_passes = 2 if mlm else 1
    lin += text_passes * (_blocks(t.sum(), Wt, s.t_mlp, s.t_layers) + 2.0 * B * Wt * P)
    att += text_passes * 4.0 * (t * (t + 1) / 2).sum() * Wt * s.t_layers
    # VTC: text x video similarities both ways (+ each caption against its reversed clip)
    lin += 2 * 2.0 * B * B * P + 2.0 * n_rev * P

    def fusion(rows_t, rows_v, sum_tt, sum_tv):
        """rows_v: video rows mapped into the fusion width and through the cross-attention K/V
        projections (each clip once, however many pairs it is in)."""
        f_lin = (2.0 * rows_t * Wt * Wf if Wt != Wf else 0.0) + 2.0 * rows_v * Wv * Wf
        f_lin += _blocks(rows_t, Wf, s.f_mlp, s.f_layers)
        f_lin += 2.0 * (2 * rows_t + 2 * rows_v) * Wf * Wf * s.f_layers  # cross q,out / k,v
        f_att = 4.0 * (sum_tt + sum_tv) * Wf * s.f_layers  # bidirectional self + cross
        return f_lin, f_att

    tv_pos = (t * v).sum()
    if vtm:
        # positives, a hard-negative clip per caption, a hard-negative caption per clip, each
        # reversed clip with its caption; then the 2-way head. The video side is projected once
        # per clip of the pool (every clip, and each reversed copy, is in some pair)
        pairs = 3 * B + n_rev
        f_lin, f_att = fusion(rows_t=3 * t.sum() + tr.sum(), rows_v=v.sum() + vr.sum(),
                              sum_tt=3 * (t ** 2).sum() + (tr ** 2).sum(),
                              sum_tv=tv_pos + (tr * vr).sum() + t.sum() * v.mean() + t.mean() * v.sum())
        lin += f_lin + 2.0 * pairs * Wf * 2
        att += f_att
    if mlm:
        # masked caption with its own clip, then the head on the masked positions
        f_lin, f_att = fusion(rows_t=t.sum(), rows_v=v.sum(), sum_tt=(t ** 2).sum(), sum_tv=tv_pos)
        lin += f_lin + 2.0 * masked * (Wf * Wt + Wt * s.vocab)
        att += f_att
    forward = lin + att + patch
    return dict(linear=lin, attention=att, patch=patch, forward=forward,
                total=3.0 * lin + 3.5 * att + 2.0 * patch)


# ------------------------------------------------------------------------------------ the trainer's set-up

class BenchError(RuntimeError):
    """What stops the benchmark before it measures: one line."""


@dataclass
class Setup:
    """What `hvfm/train.py` builds for a run, built by its own functions."""
    args: argparse.Namespace  # the trainer's flags, after its checks
    weights: dict
    attn: str  # the trainer's attention backend (--attn, auto: its pick)
    precision: str
    precision_why: str
    model: torch.nn.Module
    size: int
    micro: int
    loader: object
    cfg: dict  # the checked DeepSpeed config (engine_config applied per engine)
    tok_dir: object = None  # what build_model needs to build the model again (another --motion)
    run_dir: object = None


def trainer_argv(args, rest):
    """The trainer's flag list: --deepspeed and the size defaults first, the user's flags after
    them (argparse keeps the last occurrence)."""
    defaults = (GPU_DEFAULTS if args.gpu else CPU_DEFAULTS)[0]
    return ["--deepspeed", str(ROOT / "ds_configs" / "z2.json"), *defaults, *rest]


def trainer_setup(rest):
    """Check the trainer's flags, join a world of one, prepare the data, build the model and the
    loader: hvfm/train.py's own steps, in its order."""
    from hvfm.build import build_model, build_train_loader
    from hvfm.builtin_run import prepare_data
    from hvfm.config import check_run, parse_args
    from hvfm.distributed import init_distributed, quiet_libraries

    args = parse_args(rest)
    if args.stage != "video" or args.resume:
        raise BenchError("bench_train measures the video stage of a fresh run: drop --stage/--resume")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise BenchError("bench_train measures one device: run it with python, not a launcher")
    run_dir = Path(args.output_dir)  # a trained tokenizer, init_clip
    if not args.verbose:
        quiet_libraries()
    if not CUDA:  # as the trainer: subnormal floats make early CPU steps many times slower
        torch.set_flush_denormal(True)
    weights, cfg, attn, precision, why = check_run(args, CUDA)
    rank, world = init_distributed(CUDA)
    train_ann, _, tok_dir = prepare_data(args, run_dir, rank)
    model, tokenizer, _, _ = build_model(args, tok_dir, run_dir, attn, rank)
    size = args.size or model.video.image_size
    micro = cfg["train_micro_batch_size_per_gpu"]
    loader = build_train_loader(args, train_ann, tokenizer, micro, size, rank, world, CUDA)
    return Setup(args, weights, attn, precision, why, model, size, micro, loader, cfg, tok_dir, run_dir)


def setup_model(setup, motion):
    """The run's model with the motion channel on or off: the set-up's own model when its flags
    say so, else `build_model` again with --[no-]motion-channel (the same CLIP folder)."""
    from hvfm.build import build_model
    if setup.model is not None and bool(setup.args.motion_channel) == motion:
        return setup.model
    args = argparse.Namespace(**{**vars(setup.args), "motion_channel": motion})
    return build_model(args, setup.tok_dir, setup.run_dir, setup.attn, 0)[0]


def variant(model, spec):
    """The model with the attention backend / patch embedding of `spec` ("attn/embed")."""
    from hvfm.model import get_backend
    attn, _, embed = spec.partition("/")
    if attn != "sdpa" and get_backend(attn) is get_backend("sdpa"):
        raise BenchError(f"attention backend '{attn}' is not available here (it would fall back to "
                         f"sdpa); choose another with --fused/--unfused")
    model.set_attention(attn)
    if embed:
        model.video.patch_embed = embed
    return model


def endless(loader):
    """The loader's batches, epoch after epoch, as the training loop takes them."""
    from hvfm.data import DataError
    while True:
        got = False
        for batch in loader:
            got = True
            yield batch
        if not got:
            raise DataError("the loader gave no batch (fewer samples than one batch?)")
        loader.set_epoch(loader.epoch + 1)


# ------------------------------------------------------------------------------------ measuring

class Clock:
    """Marks within a step: CUDA events on GPU (read after one synchronize), perf_counter on CPU."""

    def __init__(self):
        self.marks = []

    def mark(self):
        if CUDA:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def spans(self):
        """Seconds between consecutive marks (call after synchronising)."""
        if CUDA:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class Timed:
    """The engine as `train_step` uses it, with a clock mark as each of its parts begins and
    after the optimizer step: prepare (until the forward) / forward / backward / optimizer."""

    def __init__(self, engine, clock):
        self._engine, self._clock = engine, clock

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __call__(self, *a, **kw):
        self._clock.mark()
        return self._engine(*a, **kw)

    def backward(self, loss):
        self._clock.mark()
        return self._engine.backward(loss)

    def step(self):
        self._clock.mark()
        out = self._engine.step()
        self._clock.mark()
        return out


def memory_start():
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak_rss()
    return rss_bytes("VmRSS")


def memory_peak():
    if CUDA:
        return torch.cuda.max_memory_allocated()
    return rss_bytes("VmHWM")


def one_step(engine, batch, setup, drop, seeds, shape, dtype, host_check, reverse=None):
    """One optimizer step through the trainer's `train_step` (at `reverse`, the fraction of
    reversed negatives: default the run's); returns its timings, tokens, FLOPs and memory, and
    the video tokens the model's video tower encoded (main pass + reversed clips, counted by a
    hook on the tower: what the reverse fraction did in the model)."""
    from hvfm.model import keep_counts
    from hvfm.model.model import reverse_count
    from hvfm.loop import train_step
    reverse = setup.args.reverse_negatives if reverse is None else reverse
    args = argparse.Namespace(**{**vars(setup.args), "drop_ratio": drop, "reverse_negatives": reverse})
    nf = np.asarray(batch["num_frames"], np.int64)
    B = len(nf)
    counts = keep_counts(nf * (setup.size // shape.patch) ** 2, drop,
                         np.random.default_rng(seeds))  # the model's own draw (same seeds)
    n_rev = reverse_count(reverse, B)
    tower = getattr(getattr(engine, "module", None), "video", None)
    encoded = []
    hook = tower.register_forward_hook(lambda m, i, o: encoded.append(o.varlen.total)) if tower else None
    text_lens = np.asarray(batch["attention_mask"].sum(1))
    masked = int((batch["mlm_labels"] != -100).sum())
    bad_loss = torch.zeros((), device=engine.device)
    base = memory_start()
    clock = Clock()
    wall = time.perf_counter()
    clock.mark()
    # a copy of the batch dict: train_step's prepare_batch replaces its frames and consumes its
    # crop rows, and the other variant of the pair takes the same batch
    try:
        out = train_step(Timed(engine, clock), dict(batch), seeds, args, setup.weights, dtype, bad_loss,
                         host_check)
        if CUDA:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall
    finally:
        if hook is not None:
            hook.remove()
    if out is None:  # (no ZeRO) a non-finite loss: train_step dropped the micro-batch
        raise BenchError(f"drop {drop}: a non-finite loss; lower --lr or check the data")
    prep, fwd, bwd, opt = clock.spans()
    peak = memory_peak()
    video_tokens, text_tokens = int(out["video_tokens"]), int(out["text_tokens"])
    if video_tokens != int(counts.sum()) + B:
        warnings.warn(f"FLOP count assumes {int(counts.sum()) + B} video tokens, the model used "
                      f"{video_tokens}", RuntimeWarning)
    encoded = int(sum(encoded)) if hook is not None else None
    expected = int(counts.sum() + B + counts[:n_rev].sum() + n_rev)
    if encoded is not None and encoded != expected:
        warnings.warn(f"FLOP count assumes the video tower encodes {expected} tokens (reverse "
                      f"{reverse:g}: {n_rev} of {B} clips again), the model encoded {encoded}",
                      RuntimeWarning)
    w = setup.weights
    flops = train_flops(shape, counts + 1, text_lens, masked, reverse,
                        vtm=bool(w["vtm"]), mlm=bool(w["mlm"]))
    return dict(prepare_s=prep, forward_s=fwd, backward_s=bwd, optimizer_s=opt,
                step_s=wall, device_s=prep + fwd + bwd + opt, reverse=float(reverse), reversed_clips=n_rev,
                video_tokens=video_tokens, video_tokens_encoded=encoded,
                text_tokens=text_tokens, tokens=video_tokens + text_tokens,
                samples=B, flops=flops["total"], attention_flops_frac=3.5 * flops["attention"] / flops["total"],
                loss=float(out["loss"].detach()), mem_start_bytes=base, mem_peak_bytes=peak)


def summarise(steps, peak_tflops):
    t = sum(s["step_s"] for s in steps)
    tflops = sum(s["flops"] for s in steps) / t / 1e12
    peaks = [s["mem_peak_bytes"] for s in steps if s["mem_peak_bytes"] is not None]
    acts = [s["mem_peak_bytes"] - s["mem_start_bytes"] for s in steps
            if s["mem_peak_bytes"] is not None and s["mem_start_bytes"] is not None]
    mean = lambda k: statistics.fmean(s[k] for s in steps)  # noqa: E731
    return dict(steps=len(steps), step_ms=1e3 * t / len(steps),
                step_ms_median=1e3 * statistics.median(s["step_s"] for s in steps),
                prepare_ms=1e3 * mean("prepare_s"), forward_ms=1e3 * mean("forward_s"),
                backward_ms=1e3 * mean("backward_s"), optimizer_ms=1e3 * mean("optimizer_s"),
                samples_per_s=sum(s["samples"] for s in steps) / t,
                tokens_per_s=sum(s["tokens"] for s in steps) / t,
                video_tokens_per_step=mean("video_tokens"), text_tokens_per_step=mean("text_tokens"),
                tflops=tflops, mfu=tflops / peak_tflops if peak_tflops else None,
                attention_flops_frac=mean("attention_flops_frac"),
                peak_mem_gib=max(peaks) / GIB if peaks else None,
                step_mem_gib=max(acts) / GIB if acts else None)


def compare(fused_steps, unfused_steps, fused, unfused):
    pairs = [u["step_s"] / f["step_s"] for f, u in zip(fused_steps, unfused_steps)]
    return dict(fused_tokens_per_s=fused["tokens_per_s"], unfused_tokens_per_s=unfused["tokens_per_s"],
                speedup=fused["tokens_per_s"] / unfused["tokens_per_s"],
                pair_speedup_median=statistics.median(pairs), pair_speedup_min=min(pairs),
                pair_speedup_max=max(pairs),
                memory_ratio=(fused["peak_mem_gib"] / unfused["peak_mem_gib"]
                              if fused["peak_mem_gib"] and unfused["peak_mem_gib"] else None))


def loader_share(steps):
    """The loader phase: the share of the loop's time spent waiting for a batch."""
    wait, step = sum(s["wait_s"] for s in steps), sum(s["step_s"] for s in steps)
    return dict(steps=len(steps), wait_ms=1e3 * wait / len(steps), step_ms=1e3 * step / len(steps),
                share=wait / (wait + step), samples_per_s=sum(s["samples"] for s in steps) / (wait + step),
                wait_ms_max=1e3 * max(s["wait_s"] for s in steps))


# ------------------------------------------------------------------------------------ report

def main_tables(payload):
    rows, rat, lrows = [], [], []
    for d in payload["results"]:
        for name in ("fused", "unfused"):
            r = d[name]
            rows.append([d["drop"], f"{name} ({payload['variants'][name]})", split_ms(r),
                         r["samples_per_s"], r["tokens_per_s"], r["tflops"], mfu(r),
                         r["peak_mem_gib"], r["step_mem_gib"]])
        c = d["ratio"]
        rat.append([d["drop"], c["fused_tokens_per_s"], c["unfused_tokens_per_s"], f"{c['speedup']:.2f}x",
                    f"{c['pair_speedup_median']:.2f}x ({c['pair_speedup_min']:.2f}-{c['pair_speedup_max']:.2f})"])
        ld = d["loader"]
        lrows.append([d["drop"], ld["steps"], ld["step_ms"], ld["wait_ms"], ld["wait_ms_max"],
                      f"{100 * ld['share']:.1f}%", ld["samples_per_s"], d["fused"]["samples_per_s"]])
    mem = "peak alloc GiB" if payload["device"] == "cuda" else "peak RSS GiB"
    return (markdown_table(["drop", "variant (attn/embed)", "step ms (prep/fwd/bwd/opt)", "samples/s",
                            "tokens/s", "TFLOP/s", "MFU", mem, "step +GiB"], rows),
            markdown_table(["drop", "fused tokens/s", "unfused tokens/s", "speedup",
                            "per-pair speedup median (min-max)"], rat),
            markdown_table(["drop", "loader steps", "step ms", "wait ms", "longest wait ms", "loader share",
                            "samples/s end to end", "samples/s compute only"], lrows))


def split_ms(r):
    return (f"{r['step_ms']:.1f} ({r['prepare_ms']:.0f}/{r['forward_ms']:.0f}/"
            f"{r['backward_ms']:.0f}/{r['optimizer_ms']:.0f})")


def mfu(r):
    return f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else None


def on_off(m):
    return "on" if m else "off"


def first_step_table(payload):
    """Each engine's first step (compile, autotune, DeepSpeed's lazy set-up) against its
    steady-state median step in the first row it was timed in."""
    steady = {}
    for d in payload["results"]:
        for name in ("fused", "unfused"):
            steady.setdefault(name, d[name]["step_ms_median"])
    ext = payload.get("extras") or {}
    base_motion = payload["model_shape"]["motion"]
    for row in ext.get("rows", []):
        for name in ("fused", "unfused"):
            label = name if row["motion"] == base_motion else f"{name}, motion {on_off(row['motion'])}"
            steady.setdefault(label, row[name]["step_ms_median"])
    rows = []
    for label, s in payload["first_step"].items():
        st = steady.get(label)
        tune = (f"{s['autotune_s']:.1f} s, {s['autotune_keys']} keys ({s['autotune_disk']} from disk)"
                if s.get("autotune_keys") else "-")
        rows.append([label, s["step_s"], f"{s['prepare_s']:.2f}/{s['forward_s']:.2f}/{s['backward_s']:.2f}/"
                     f"{s['optimizer_s']:.2f}", tune, st, f"{1e3 * s['step_s'] / st:.1f}x" if st else None])
    return markdown_table(["engine", "first step s", "prep/fwd/bwd/opt s", "Triton compile+autotune",
                           "steady step ms (median)", "first / steady"], rows)


def extras_tables(payload):
    ext = payload["extras"]
    mem = "peak alloc GiB" if payload["device"] == "cuda" else "peak RSS GiB"
    rows, rat = [], []
    for d in ext["rows"]:
        for name in ("fused", "unfused"):
            r = d[name]
            rows.append([f"{d['reverse']:g}", on_off(d["motion"]), f"{name} ({payload['variants'][name]})",
                         split_ms(r), r["samples_per_s"], r["tokens_per_s"], r["tflops"], mfu(r),
                         r["peak_mem_gib"], r["step_mem_gib"]])
        f, u = d["vs_base"]["fused"], d["vs_base"]["unfused"]
        rat.append([f"{d['reverse']:g}", on_off(d["motion"]), d["reversed_clips_per_step"],
                    d["video_tokens_encoded_per_step"], d["train_flops_per_step"] / 1e9,
                    f"{f['throughput']:.2f}x", f"{f['pair_median']:.2f}x ({f['pair_min']:.2f}-{f['pair_max']:.2f})",
                    f"{u['throughput']:.2f}x", f"{d['ratio']['speedup']:.2f}x"])
    return (markdown_table(["reversed", "motion", "variant (attn/embed)", "step ms (prep/fwd/bwd/opt)",
                            "samples/s", "tokens/s", "TFLOP/s", "MFU", mem, "step +GiB"], rows),
            markdown_table(["reversed", "motion", "clips reversed / step", "video tokens encoded / step",
                            "train GFLOP / step", "fused samples/s vs base", "per-pair (min-max)",
                            "unfused samples/s vs base", "fused/unfused speedup"], rat))


def tables(payload):
    """The markdown blocks of the report, each with its heading, for what has been measured."""
    out = []
    if payload["results"]:
        t1, t2, t3 = main_tables(payload)
        out += ["## Per drop ratio\n\n" + t1, t2, "## The loader's share\n\n" + t3]
    ext = payload.get("extras")
    if ext and ext["rows"]:
        base = ext["base"]
        t1, t2 = extras_tables(payload)
        out += [f"## The extras at drop {ext['drop']}: reversed negatives and the motion channel\n\n"
                f"Base: reverse {base['reverse']:g}, motion {on_off(base['motion'])}; every setting and "
                f"both variants took each batch in turn with the same seeds ({ext['rounds']} timed "
                f"rounds).\n\n" + t1, t2]
    if payload["first_step"]:
        out.append("## First step of each engine (compile, autotune and set-up included)\n\n"
                   + first_step_table(payload))
    return out


def plot(payload, path):
    plt = pyplot()
    if plt is None or not payload["results"]:
        return None
    res = payload["results"]
    labels = [str(d["drop"]) for d in res]
    x = np.arange(len(res))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, (name, color) in enumerate((("fused", "tab:green"), ("unfused", "tab:gray"))):
        a1.bar(x + (k - 0.5) * 0.38, [d[name]["tokens_per_s"] for d in res], 0.38, color=color,
               label=f"{name} ({payload['variants'][name]})")
    for i, d in enumerate(res):
        a1.annotate(f"{d['ratio']['speedup']:.2f}x", (i, max(d['fused']['tokens_per_s'], d['unfused']['tokens_per_s'])),
                    ha="center", va="bottom")
    a1.set_xticks(x, labels)
    a1.set_xlabel("drop ratio")
    a1.set_ylabel("tokens/s per device (kept video + text)")
    a1.set_title("throughput (label: fused/unfused)")
    a1.legend(fontsize=8)
    parts = (("prepare_ms", "tab:cyan"), ("forward_ms", "tab:blue"), ("backward_ms", "tab:orange"), ("optimizer_ms", "tab:purple"))
    for k, name in enumerate(("fused", "unfused")):
        bottom = np.zeros(len(res))
        for part, color in parts:
            vals = np.array([d[name][part] for d in res])
            a2.bar(x + (k - 0.5) * 0.38, vals, 0.38, bottom=bottom, color=color,
                   label=part.replace("_ms", "") if k == 0 else None, hatch="" if k == 0 else "//",
                   edgecolor="white")
            bottom += vals
    a2.set_xticks(x, labels)
    a2.set_xlabel("drop ratio (left bar fused, hatched unfused)")
    a2.set_ylabel("ms per step")
    a2.set_title("step time split")
    a2.legend(fontsize=8)
    cfg = payload["config"]
    fig.suptitle(f"{cfg['preset']}, {cfg['frames']} frames x {cfg['size']} px, batch {cfg['batch']}, "
                 f"{payload['precision']} on {payload['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replace_file(path, write, *a):
    """`write(tmp, *a)` then rename over `path`: a run killed mid-write leaves the previous file."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp, *a)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_outputs(payload, out):
    """bench_train.json and .md from what has been measured so far ("partial": true until the
    end), the PNG at the end."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = replace_file(out / "bench_train.json", write_json, payload)
    blocks = tables(payload)
    if blocks:
        cfg = payload["config"]
        notes = [f"the trainer's set-up and step (hvfm.build, hvfm.loop.train_step): DeepSpeed "
                 f"{payload['zero']}, {payload['precision']} ({payload['precision_why']}); "
                 f"{cfg['steps']} alternated steps per variant after {cfg['warmup']} warm-up; "
                 f"{payload['threads']} torch thread(s); the trainer's attention here: {payload['trainer_attn']}",
                 f"data: {payload['data']}; {payload['workers']} loader worker(s)",
                 "tokens/s = kept video tokens (incl. CLS) + text tokens of the step, per second, "
                 "per device; speedup = fused tokens/s / unfused tokens/s (same batch and seeds per pair); "
                 "prep = the batch to the device and its crop/resize/normalise/cast there",
                 "loader table: the fused engine alone, its batches from the loader as in training, "
                 f"after {payload['loader_skip']} uncounted steps (the queue the workers filled "
                 "meanwhile); loader share = time waiting for a batch / (waiting + step); a wait "
                 "of a few ms is taking a ready batch from the queue (the copy between processes)",
                 f"MFU against {payload['peak_tflops']:.3g} TFLOP/s ({payload['peak_source']})"
                 if payload["peak_tflops"] else "MFU: no peak known for this device (--peak-tflops)"]
        if payload.get("extras"):
            notes.append("extras: vs base = the setting's samples/s / the base setting's (same "
                         "batches); per-pair = median (min-max) of base step time / step time; "
                         "clips reversed = --reverse-negatives x batch, rounded up; video tokens "
                         "encoded = what the video tower ran (main pass + reversed clips), counted "
                         "by a hook on it; all engines of the extras are resident, so compare step +GiB")
        notes.append("first step: each engine's first optimizer step, untimed in the rows (a "
                     "warm-up step): on a GPU the Triton compile and autotune (unless cached) and "
                     "DeepSpeed's lazy set-up")
        notes += payload["notes"]
        title = "bench_train: the trainer's step, fused vs unfused, and the loader's share"
        if not payload["complete"]:
            title += f" (PARTIAL: cut short or still running; {payload['progress']})"
        replace_file(out / "bench_train.md", write_markdown, title, payload["machine"],
                     "\n\n".join(blocks), notes)
        if payload.get("complete"):
            png = plot(payload, out / "bench_train.png")
            if png:
                print(f"wrote {png}")
    return path


# ------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    """(the bench's options, the trainer's flags): what the bench does not know goes to train.py."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                 epilog="Any other flag is hvfm/train.py's (see its --help).")
    ap.add_argument("--gpu-defaults", action="store_true", help="ViT-B/16 defaults (automatic with CUDA)")
    ap.add_argument("--cpu-defaults", action="store_true", help="tiny defaults even with CUDA")
    ap.add_argument("--drop", nargs="+", help="drop ratios: numbers or per-sample ranges lo:hi "
                                              "(replaces train.py's --drop-ratio)")
    ap.add_argument("--steps", type=int, help="timed steps per variant per drop ratio (and counted "
                                              "steps of the loader phase)")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant per drop ratio (at least 1: "
                                               "the first step compiles; it is reported apart)")
    x = ap.add_argument_group("the extras (rows after the drop ratios, at one drop ratio)")
    x.add_argument("--reverse", type=float, nargs="+", default=[1.0, 0.5, 0.0], metavar="F",
                   help="fractions of reversed-clip negatives (train.py's --reverse-negatives); "
                        "the first is the base (default 1 0.5 0)")
    x.add_argument("--motion", nargs="+", choices=("on", "off"), default=["on", "off"],
                   help="the motion channel (train.py's --[no-]motion-channel); the first is the "
                        "base (default on off)")
    x.add_argument("--extras-drop", default="0.5", help="the drop ratio of the extras rows (default 0.5)")
    x.add_argument("--grid", action="store_true", help="every (reverse, motion) combination, not "
                                                       "only one changed from the base at a time")
    x.add_argument("--no-extras", action="store_true", help="no extras rows")
    ap.add_argument("--fused", help="attn/patch_embed of the fused path "
                                    "(default triton/triton on CUDA, torch-varlen/gather on CPU)")
    ap.add_argument("--unfused", default="sdpa/conv", help="attn/patch_embed of the baseline")
    ap.add_argument("--peak-tflops", type=float, help="peak for MFU (default: GPU table / measured CPU matmul)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); on a CPU "
                                                "shared with other jobs 1 thread is steadier")
    ap.add_argument("--out", default=str(RESULTS), help="folder for bench_train.json/.md/.png")
    args, rest = ap.parse_known_args(argv)
    args.gpu = (args.gpu_defaults or CUDA) and not args.cpu_defaults
    for k, v in (GPU_DEFAULTS if args.gpu else CPU_DEFAULTS)[1].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.fused is None:
        args.fused = "triton/triton" if CUDA else "torch-varlen/gather"
    return args, trainer_argv(args, rest)


def main(argv=None):
    from hvfm.config import ConfigError
    from hvfm.data import DataError
    args, targv = parse_args(argv)
    try:
        return bench(args, targv)
    except (BenchError, ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            from hvfm.distributed import remove_shm_buffer
            remove_shm_buffer()


def check_options(args):
    """The bench's own options, before anything is built: one line naming the flag."""
    from hvfm.model import parse_drop_ratio
    for flag, values in (("--drop", args.drop), ("--extras-drop", [args.extras_drop])):
        for v in values:
            try:
                parse_drop_ratio(v)
            except ValueError as e:
                raise BenchError(f"{flag} {v}: {e}") from None
    for r in args.reverse:
        if not 0.0 <= r <= 1.0:
            raise BenchError(f"--reverse {r:g}: give fractions of the batch in [0, 1]")
    if args.warmup < 1 or args.steps < 1:
        raise BenchError(f"--warmup {args.warmup} --steps {args.steps}: give at least 1 of each "
                         f"(the first step compiles and is reported apart from the timed ones)")


def bench(args, targv):
    import importlib.util
    check_options(args)
    if importlib.util.find_spec("deepspeed") is None:
        raise BenchError("bench_train drives the trainer, which needs deepspeed: pip install deepspeed "
                         "(on a machine without the registry, carry its wheels: profiling/README.md)")
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    device_name = info["gpu"] or info["cpu"]
    print(f"machine: {describe(info)}")
    notes = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if not CUDA and load is not None and load > (os.cpu_count() or 1):
        notes.append(f"the CPU was shared: load average {load:.1f} on {os.cpu_count()} cores at the "
                     f"start; absolute rates are low and noisy, the per-pair ratios less so")
        print(f"NOTE: {notes[-1]}")
    # the run folder (a trained tokenizer, init_clip): a temporary one unless --output-dir is given
    scratch = None
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in targv):
        scratch = tempfile.mkdtemp(prefix="hvfm-bench-train-")
        targv = [*targv, "--output-dir", scratch]
    try:
        return measure(args, trainer_setup(targv), info, device_name, notes, load)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


def extras_settings(args):
    """The (reverse fraction, motion on) of the extras rows: the first value of --reverse and of
    --motion is the base, and each other value varies one of the two from it (--grid: every
    combination). None with --no-extras."""
    if args.no_extras:
        return []
    motion = [m == "on" for m in args.motion]
    if args.grid:
        pairs = [(r, m) for m in motion for r in args.reverse]
    else:
        pairs = [(r, motion[0]) for r in args.reverse] + [(args.reverse[0], m) for m in motion]
    return list(dict.fromkeys(pairs))  # in order, each once


def motion_params(model):
    w = model.video.embeddings.motion_weight
    return 0 if w is None else w.numel()


def measure(args, setup, info, device_name, notes, load):
    from hvfm.config import is_builtin
    targs, precision = setup.args, setup.precision
    settings = extras_settings(args)
    # the LR schedule's length: the most steps one engine takes
    total_steps = (len(args.drop) * (args.warmup + 2 * args.steps + loader_skip(targs))
                   + len(settings) * (args.warmup + args.steps))
    base_motion = bool(targs.motion_channel)
    shape = ModelShape.of(setup.model)
    n_params = sum(p.numel() for p in setup.model.parameters())
    engines, dtype, host_check = engine_pair(args, setup, setup.model, total_steps)
    zero = f"ZeRO-{engines['fused'].zero_optimization_stage()}"
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    elif CUDA:
        peak = gpu_peak_tflops(info["gpu"]) if precision == "bf16" else None
        source = f"dense bf16 peak of {info['gpu']}"
    else:
        peak = cpu_peak_tflops(dtype)
        source = f"measured {precision} 1024^3 matmul on this CPU"
    pair_params = {base_motion: (n_params, motion_params(setup.model))}
    setup.model = None
    data = ("the built-in corpus" if is_builtin(targs) else
            targs.train_shards or targs.train_csv or targs.train_json)
    what = targs.clip or f"--model {targs.model} (random weights)"
    if shape.vocab < 49408:
        notes.append(f"text vocabulary {shape.vocab} (the run's tokenizer; CLIP's has 49,408): the "
                     f"MLM head costs less than with a real CLIP (--clip DIR)")
    if is_builtin(targs):
        notes.append("data: the built-in corpus, small clips: decoding is far cheaper than on "
                     "WebVid's 640x360 (profiling/bench_data.py measures that)")
    print(f"{what}: {n_params / 1e6:.1f}M parameters; {targs.frames} frames x {setup.size} px, "
          f"batch {setup.micro}; {precision} ({setup.precision_why}); DeepSpeed {zero}; "
          f"fused {args.fused} vs unfused {args.unfused}; data {data}, {targs.workers} worker(s); "
          f"peak {peak and round(peak, 3)} TFLOP/s ({source})", flush=True)

    config = dict(preset=targs.clip or targs.model, frames=targs.frames, size=setup.size,
                  batch=setup.micro, drop=args.drop, steps=args.steps, warmup=args.warmup,
                  fused=args.fused, unfused=args.unfused,
                  extras=dict(drop=args.extras_drop, reverse=args.reverse, motion=args.motion,
                              grid=args.grid) if settings else None,
                  trainer_flags=vars(targs))
    payload = {"benchmark": "bench_train", "machine": info, "config": config,
               "device": "cuda" if CUDA else "cpu", "device_name": device_name,
               "engine": "deepspeed", "zero": zero, "precision": precision,
               "precision_why": setup.precision_why, "trainer_attn": setup.attn,
               "data": data, "workers": targs.workers, "loader_skip": loader_skip(targs),
               "parameters": n_params, "model_shape": asdict(shape),
               "variants": {"fused": args.fused, "unfused": args.unfused},
               "peak_tflops": peak, "peak_source": source, "notes": notes,
               "complete": False, "partial": True, "progress": "set up",
               "threads": torch.get_num_threads(), "load_average_start": load,
               "first_step": {}, "results": [], "extras": None}
    first = payload["first_step"]

    def step(label, engine, batch, drop, seeds, shp=shape, reverse=None):
        s = one_step(engine, batch, setup, drop, seeds, shp, dtype, host_check, reverse)
        if label not in first:  # the engine's first step: compile, autotune, lazy set-up
            tune = kernels.autotune_report(reset=True)  # this engine's first-call kernel costs
            first[label] = {**s, "autotune_s": tune["seconds"], "autotune_keys": tune["keys"],
                            "autotune_tuned": tune["tuned"], "autotune_disk": tune["disk"]}
            print(f"first step of {label}: {s['step_s']:.2f} s; "
                  f"{kernels.format_autotune_report(tune)}", flush=True)
            write_outputs(payload, args.out)
        return s

    batches = endless(setup.loader)
    for di, drop in enumerate(args.drop):
        seeds = lambda i: np.random.SeedSequence([targs.seed, di, i])  # noqa: E731 - same per pair
        steps, warm = {"fused": [], "unfused": []}, {"fused": [], "unfused": []}
        for w in range(args.warmup):
            batch = next(batches)
            for name in engines:
                warm[name].append(step(name, engines[name], batch, drop, seeds(10_000 + w)))
        for i in range(args.steps):  # fused, unfused, fused, unfused, ... same batch and seeds per pair
            batch = next(batches)
            for name in engines:
                steps[name].append(step(name, engines[name], batch, drop, seeds(i)))
        res = {name: summarise(s, peak) for name, s in steps.items()}
        ratio = compare(steps["fused"], steps["unfused"], res["fused"], res["unfused"])
        # the loader phase: the fused engine alone takes its batches from the loader, as training
        loader_steps = []
        for i in range(loader_skip(targs) + args.steps):
            t = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - t
            s = step("fused", engines["fused"], batch, drop, seeds(20_000 + i))
            s["wait_s"] = wait
            loader_steps.append(s)
        counted = loader_steps[loader_skip(targs):]
        payload["results"].append({"drop": drop, **res, "ratio": ratio, "loader": loader_share(counted),
                                   "step_log": steps, "warmup_log": warm, "loader_log": loader_steps})
        ld = payload["results"][-1]["loader"]
        print(f"drop {drop}: fused {res['fused']['tokens_per_s']:.0f} tokens/s "
              f"({res['fused']['step_ms']:.0f} ms/step), unfused {res['unfused']['tokens_per_s']:.0f} "
              f"({res['unfused']['step_ms']:.0f} ms/step): {ratio['speedup']:.2f}x; loader share "
              f"{100 * ld['share']:.1f}% ({ld['wait_ms']:.0f} ms waiting per {ld['step_ms']:.0f} ms step)",
              flush=True)
        payload["progress"] = f"drop ratios: {di + 1} of {len(args.drop)}"
        write_outputs(payload, args.out)
        gc.collect()

    if settings:
        # the extras: every (reverse, motion) setting and both variants take each batch in turn,
        # with the same seeds (the same kept patches), so their ratios hold on a noisy machine
        drop = args.extras_drop
        pairs = {base_motion: (engines, shape)}
        for m in dict.fromkeys(m for _, m in settings):
            if m not in pairs:
                model = setup_model(setup, m)
                pair_params[m] = (sum(p.numel() for p in model.parameters()), motion_params(model))
                pairs[m] = (engine_pair(args, setup, model, total_steps)[0], ModelShape.of(model))
                del model
        ext = payload["extras"] = dict(drop=drop, base=dict(reverse=settings[0][0], motion=settings[0][1]),
                                       grid=args.grid, rounds=0, rows=[])
        logs = {k: {"fused": [], "unfused": []} for k in settings}
        warm = {k: {"fused": [], "unfused": []} for k in settings}
        seeds = lambda i: np.random.SeedSequence([targs.seed, len(args.drop), i])  # noqa: E731
        label = lambda name, m: name if m == base_motion else f"{name}, motion {'on' if m else 'off'}"  # noqa: E731
        for i in range(args.warmup + args.steps):
            batch = next(batches)
            timed = i >= args.warmup
            for r, m in settings:
                eng, shp = pairs[m]
                for name in ("fused", "unfused"):
                    s = step(label(name, m), eng[name], batch, drop, seeds(i), shp, r)
                    (logs if timed else warm)[(r, m)][name].append(s)
            if timed:
                ext["rounds"] = i - args.warmup + 1
                ext["rows"] = extras_rows(settings, logs, warm, peak, pair_params)
                payload["progress"] = f"extras: {ext['rounds']} of {args.steps} rounds"
                write_outputs(payload, args.out)
        for row in ext["rows"]:
            v = row["vs_base"]["fused"]
            print(f"drop {drop}, reverse {row['reverse']:g}, motion {'on' if row['motion'] else 'off'}: "
                  f"fused {row['fused']['samples_per_s']:.3g} samples/s ({v['throughput']:.2f}x the base), "
                  f"unfused {row['unfused']['samples_per_s']:.3g} ({row['vs_base']['unfused']['throughput']:.2f}x); "
                  f"fused/unfused {row['ratio']['speedup']:.2f}x", flush=True)
    if CUDA:
        used = nvml_used_bytes(torch.cuda.current_device())
        payload["device_memory_used_gib"] = used / GIB if used is not None else None
        payload["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    payload["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload["complete"], payload["partial"], payload["progress"] = True, False, "complete"
    path = write_outputs(payload, args.out)
    print("\n\n".join(tables(payload)))
    print(f"wrote {path}")
    return payload


def engine_pair(args, setup, model, total_steps):
    """({"fused": engine, "unfused": engine}, the step's dtype, host_check): `model` and a copy with
    identical weights, each with its attention backend / patch embedding, each its DeepSpeed
    engine as the trainer builds it."""
    from hvfm.build import build_engine
    models = {"fused": model, "unfused": copy.deepcopy(model)}
    engines = {}
    for name, spec in (("fused", args.fused), ("unfused", args.unfused)):
        variant(models[name], spec)
        engines[name], _, _, dtype, host_check = build_engine(models[name], setup.cfg, setup.precision,
                                                              setup.args, total_steps)
    return engines, dtype, host_check


def versus(steps, base):
    """Throughput of `steps` against `base` (the same batches and seeds, in the same rounds)."""
    pairs = [b["step_s"] / s["step_s"] for s, b in zip(steps, base)]
    rate = lambda ss: sum(x["samples"] for x in ss) / sum(x["step_s"] for x in ss)  # noqa: E731
    return dict(throughput=rate(steps) / rate(base), pair_median=statistics.median(pairs),
                pair_min=min(pairs), pair_max=max(pairs))


def extras_rows(settings, logs, warm, peak, params):
    """One row per (reverse, motion) setting: both variants summarised, fused/unfused, and each
    variant's throughput against the base setting's (the first)."""
    base = logs[settings[0]]
    rows = []
    for r, m in settings:
        lg = logs[(r, m)]
        res = {name: summarise(s, peak) for name, s in lg.items()}
        mean = lambda k: statistics.fmean(s[k] for s in lg["fused"])  # noqa: E731
        rows.append(dict(reverse=r, motion=m, **res,
                         ratio=compare(lg["fused"], lg["unfused"], res["fused"], res["unfused"]),
                         vs_base={name: versus(lg[name], base[name]) for name in lg},
                         reversed_clips_per_step=mean("reversed_clips"),
                         video_tokens_encoded_per_step=(mean("video_tokens_encoded")
                                                        if lg["fused"][0]["video_tokens_encoded"] is not None
                                                        else None),
                         train_flops_per_step=mean("flops"),
                         parameters=params[m][0], motion_parameters=params[m][1],
                         step_log=lg, warmup_log=warm[(r, m)]))
    return rows


def loader_skip(targs):
    """Loader-phase steps not counted: the batches the workers queued during the compute phase."""
    return targs.workers * PREFETCH


def stop_on_sigterm():
    """`timeout` (gpu_check.sh's stage budgets) sends SIGTERM: end as on Ctrl-C, so the temporary
    run folder and the process group are cleaned up; the files written so far stay, partial."""
    import signal

    def stop(signum, frame):
        print("bench_train: stopped by SIGTERM; the results written so far are partial", file=sys.stderr)
        sys.exit(128 + signum)
    signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    stop_on_sigterm()
    main()
