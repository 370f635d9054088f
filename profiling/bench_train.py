"""End-to-end training throughput: the fused packed path against the unfused padded baseline.

One real training step -- forward (VTC + VTM with hard and reversed negatives + MLM), backward,
optimizer -- through the DeepSpeed engine the trainer builds (a world of one; a plain torch
AdamW loop, said so in the output, where deepspeed is not importable), on synthetic in-memory
batches: random pixels, random caption ids of realistic length (BOS + words + EOS, default 8 to
32 tokens), MLM labels at the trainer's mask ratio. Two models with identical weights run in the
same process:

  fused    CUDA: `triton` attention + the fused Triton patch embedding;
           CPU: the best packed torch path, `torch-varlen` attention + `gather` patch embedding
  unfused  `sdpa` on padded sequences with a key-padding mask + `conv` (embed every patch, gather)

After a warm-up they alternate step by step (fused, unfused, fused, ...), each pair with the same
seed (same kept patches, same negatives), so a noisy machine slows both alike and the ratio
holds. Per variant: samples/s, tokens/s (kept video + text tokens per second per device), the
step split into forward / backward / optimizer (CUDA events on GPU, perf_counter on CPU),
achieved TFLOP/s and MFU (useful FLOPs on the real packed shapes: see `train_flops`), peak memory,
and fused/unfused ratios.

    python profiling/bench_train.py [--preset tiny] [--frames 4] [--size 96] [--batch 8]
                                    [--drop 0.5 0.75 0.1:0.5] [--steps 8] [--warmup 2]
                                    [--out profiling/results] [--gpu-defaults | --cpu-defaults]

Defaults: on CPU the tiny preset, 4 frames of 96 px, batch 8, drop 0.5 and 0.75 (a minute or two
on 2 cores); with CUDA (or --gpu-defaults) ViT-B/16, 8 frames of 224 px, batch 32, drop 0, 0.5,
0.75, 0.9 and U[0.1, 0.5] per sample. Writes bench_train.json (machine, versions, commit, every
step), bench_train.md and bench_train.png (when matplotlib is installed) into --out; the JSON is
rewritten after each drop ratio, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
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

from profiling.machine import (RESULTS, describe, machine_info, markdown_table, nvml_used_bytes,  # noqa: E402
                               pyplot, reset_peak_rss, rss_bytes, write_json, write_markdown)

GIB = 2.0 ** 30
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), matched case-insensitively against the
# device name in this order (so "H100 PCIe" wins over "H100"). Override with --peak-tflops.
GPU_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0),
                   ("H100", 989.0), ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0),
                   ("A800", 312.0), ("L40S", 362.0))
CPU_DEFAULTS = dict(preset="tiny", frames=4, size=96, batch=8, drop=["0.5", "0.75", "0.1:0.5"], steps=8,
                    warmup=2)
GPU_DEFAULTS = dict(preset="vit-b16", frames=8, size=224, batch=32,
                    drop=["0", "0.5", "0.75", "0.9", "0.1:0.5"], steps=6, warmup=3)
CLIP_VOCAB = 49408 + 1  # CLIP's BPE vocabulary + the added mask token


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
                   proj=v.visual_projection.out_features, vocab=t.token_embedding.num_embeddings)


def _blocks(rows, width, mlp, layers):
    """Linear FLOPs of `layers` pre-LN blocks over `rows` tokens: q,k,v,out + fc1, fc2."""
    return 2.0 * rows * (4 * width * width + 2 * width * mlp) * layers


def train_flops(s: ModelShape, video_lens, text_lens, masked, reverse=True):
    """Useful FLOPs of one training step of VideoLanguageModel.forward + backward.

    video_lens: per-sample packed video lengths (kept patches + 1 CLS); text_lens: caption
    lengths (BOS..EOS); masked: number of MLM positions; reverse: the clip played backwards is a
    second video pass (VTC column + VTM pair), as the trainer does by default.

    Forward: every matmul 2*rows*in*out; attention 4 * sum(Lq*Lk) * D*H (causal text attention:
    Lq*(Lq+1)/2 pairs); patch embedding 2 * kept * C*p*p * W (kept patches only: the unfused
    path's work on dropped patches is waste, not counted). Training = 3x linear (fwd + 2 bwd),
    3.5x attention (bwd 2.5x fwd, as flash-attn counts), 2x patch embedding (no pixel gradient).
    Activation-checkpointing recomputation is not counted (MFU counts useful work).
    The VTM hard negatives are drawn at run time: their lengths are counted at the batch means
    (exact when all clips keep the same count and all captions are equally long).
    Returns dict(linear, attention, patch = forward FLOPs by kind; forward, total = training).
    """
    v = np.asarray(video_lens, np.float64)
    t = np.asarray(text_lens, np.float64)
    B = len(v)
    Wv, Wt, Wf, P = s.v_width, s.t_width, s.f_width, s.proj
    lin = att = 0.0
    passes = 2 if reverse else 1
    # video tower (+ the reversed pass: same kept patches, same lengths)
    patch = passes * 2.0 * (v.sum() - B) * s.channels * s.patch ** 2 * Wv
    lin += passes * (_blocks(v.sum(), Wv, s.v_mlp, s.v_layers) + 2.0 * B * Wv * P)
    att += passes * 4.0 * (v ** 2).sum() * Wv * s.v_layers
    # text tower, twice: the caption and the masked caption (MLM)
    lin += 2 * (_blocks(t.sum(), Wt, s.t_mlp, s.t_layers) + 2.0 * B * Wt * P)
    att += 2 * 4.0 * (t * (t + 1) / 2).sum() * Wt * s.t_layers
    # VTC: text x video similarities both ways (+ the reversed column)
    lin += 2 * 2.0 * B * B * P + (2.0 * B * P if reverse else 0.0)

    def fusion(rows_t, rows_v, sum_tt, sum_tv):
        """rows_v: video rows mapped into the fusion width and through the cross-attention K/V
        projections (each clip once, however many pairs it is in)."""
        f_lin = (2.0 * rows_t * Wt * Wf if Wt != Wf else 0.0) + 2.0 * rows_v * Wv * Wf
        f_lin += _blocks(rows_t, Wf, s.f_mlp, s.f_layers)
        f_lin += 2.0 * (2 * rows_t + 2 * rows_v) * Wf * Wf * s.f_layers  # cross q,out / k,v
        f_att = 4.0 * (sum_tt + sum_tv) * Wf * s.f_layers  # bidirectional self + cross
        return f_lin, f_att

    # VTM: positives, a hard-negative clip per caption, a hard-negative caption per clip
    # (+ each caption with its clip reversed); then the 2-way head. The video side is projected
    # once per clip of the pool (every clip, and its reversed copy, is in some pair)
    groups = 4 if reverse else 3
    tv_pos = (t * v).sum()
    f_lin, f_att = fusion(rows_t=groups * t.sum(), rows_v=passes * v.sum(),
                          sum_tt=groups * (t ** 2).sum(),
                          sum_tv=(groups - 2) * tv_pos + t.sum() * v.mean() + t.mean() * v.sum())
    lin += f_lin + 2.0 * groups * B * Wf * 2
    att += f_att
    # MLM: masked caption with its own clip, then the head on the masked positions
    f_lin, f_att = fusion(rows_t=t.sum(), rows_v=v.sum(), sum_tt=(t ** 2).sum(), sum_tv=tv_pos)
    lin += f_lin + 2.0 * masked * (Wf * Wt + Wt * s.vocab)
    att += f_att
    forward = lin + att + patch
    return dict(linear=lin, attention=att, patch=patch, forward=forward,
                total=3.0 * lin + 3.5 * att + 2.0 * patch)


# ------------------------------------------------------------------------------------ model, data

class _Vocab:
    """What VideoLanguageModel.from_clip needs of a tokenizer: a size and a mask id."""
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, n):
        self.n, self.mask_token_id = n, n - 1

    def __len__(self):
        return self.n


def build_model(args):
    from transformers import CLIPModel

    from hvfm.model import VideoLanguageModel, preset_config
    tok = _Vocab(args.vocab)
    config = preset_config(args.preset, len(tok), tok.bos_token_id, tok.eos_token_id,
                           tok.pad_token_id, image_size=args.size)
    torch.manual_seed(args.seed)
    clip = CLIPModel(config)
    model = VideoLanguageModel.from_clip(clip, tok, fusion_layers=args.fusion_layers,
                                         fusion_width=args.fusion_width, attn="sdpa",
                                         max_frames=max(args.frames, 16),
                                         checkpointing=args.activation_checkpointing)
    return model, tok


def synthetic_batches(args, tok, device, dtype, count=2):
    """`count` loader-style batches: pixels already on the device in the step's dtype (the copy
    from a pinned loader batch overlaps compute in training, so it is not timed), ids, mask,
    MLM ids and labels on the host as the loader gives them."""
    lo, hi = (int(x) for x in args.caption_tokens.split(":"))
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = []
    for _ in range(count):
        B, T, S = args.batch, args.frames, args.size
        pixels = torch.randn(B, T, 3, S, S, generator=g).to(device, dtype)
        lens = rng.integers(lo, hi + 1, B)
        L = int(lens.max())
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.int64)
        am = torch.zeros(B, L, dtype=torch.int64)
        words = torch.randint(3, tok.mask_token_id, (B, L), generator=g)
        masked = torch.zeros(B, L, dtype=torch.bool)
        for i, n in enumerate(lens):
            ids[i, 0], ids[i, 1:n - 1], ids[i, n - 1] = tok.bos_token_id, words[i, :n - 2], tok.eos_token_id
            am[i, :n] = 1
            masked[i, 1:n - 1] = torch.rand(n - 2, generator=g) < args.mask_ratio
            masked[i, 1] = True  # at least one masked word per caption
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        mlm_ids = torch.where(masked, torch.full_like(ids, tok.mask_token_id), ids)
        out.append(dict(pixels=pixels, num_frames=torch.full((B,), T, dtype=torch.int64),
                        input_ids=ids, attention_mask=am, mlm_input_ids=mlm_ids, mlm_labels=labels,
                        index=torch.arange(B)))
    return out


# ------------------------------------------------------------------------------------ engines

class PlainEngine:
    """The trainer's step without DeepSpeed: torch AdamW with the same groups and clipping,
    bf16 through autocast (fp32 weights) where the trainer would use DeepSpeed's bf16."""

    def __init__(self, model, groups, opt_params, clip, dtype, device):
        self.module = model.to(device)
        self.device = torch.device(device)
        kw = {k: opt_params[k] for k in ("lr", "betas", "eps", "weight_decay") if k in opt_params}
        self.optimizer = torch.optim.AdamW(groups, **kw)
        self.clip, self.dtype = clip, dtype

    def __call__(self, batch, **kw):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.module(batch, **kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def have_deepspeed():
    try:
        import deepspeed  # noqa: F401
        return True
    except Exception:  # noqa: BLE001 - missing, or a broken install
        return False


def ds_config(path, batch, precision):
    cfg = json.loads(Path(path).read_text())
    cfg["train_micro_batch_size_per_gpu"] = batch
    cfg["gradient_accumulation_steps"] = 1
    cfg.pop("train_batch_size", None)
    cfg["bf16"] = {"enabled": precision == "bf16"}
    cfg["fp16"] = {"enabled": precision == "fp16"}
    return cfg


def param_groups(model, weight_decay, lr):
    try:
        from hvfm.train import FRESH_LR_MULT, TEMPORAL_LR_MULT
        from hvfm.train import param_groups as trainer_groups
        return trainer_groups(model, weight_decay, lr, TEMPORAL_LR_MULT, FRESH_LR_MULT)
    except ImportError:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]


def make_engine(model, cfg, use_ds, dtype, device):
    opt = cfg.get("optimizer", {}).get("params", {})
    groups = param_groups(model, opt.get("weight_decay", 0.0), opt.get("lr", 1e-4))
    if not use_ds:
        return PlainEngine(model, groups, opt, cfg.get("gradient_clipping", 0.0), dtype, device)
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    return engine


def init_world(use_ds):
    if not use_ds:
        return
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return
    from hvfm.train import init_distributed
    init_distributed(CUDA)


def pick_precision(choice):
    """bf16 on GPU; on CPU the faster of bf16/fp32 on a transformer-sized matmul, as the trainer's
    auto choice (a smaller probe: where bf16 has no hardware path it is ~50x slower)."""
    if choice != "auto":
        return choice
    if CUDA:
        return "bf16"
    times = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(256, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b
        t = time.perf_counter()
        for _ in range(3):
            a @ b
        times[name] = time.perf_counter() - t
    return min(times, key=times.get)


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


def one_step(engine, batch, drop, seed, reverse, shape):
    """One optimizer step; returns its timings, tokens, FLOPs and memory."""
    from hvfm.model import keep_counts
    B, T = batch["pixels"].shape[:2]
    hw = (batch["pixels"].shape[-1] // shape.patch) ** 2
    counts = keep_counts(np.full(B, T * hw), drop, np.random.default_rng(seed))  # the model's draw
    text_lens = batch["attention_mask"].sum(1).numpy()
    masked = int((batch["mlm_labels"] != -100).sum())
    gen = torch.Generator(device=engine.device).manual_seed(seed)
    base = memory_start()
    clock = Clock()
    wall = time.perf_counter()
    clock.mark()
    out = engine(batch, drop_ratio=drop, rng=np.random.default_rng(seed), generator=gen,
                 reverse_negatives=reverse)
    clock.mark()
    engine.backward(out["loss"])
    clock.mark()
    engine.step()
    clock.mark()
    if CUDA:
        torch.cuda.synchronize()
    wall = time.perf_counter() - wall
    fwd, bwd, opt = clock.spans()
    peak = memory_peak()
    video_tokens, text_tokens = int(out["video_tokens"]), int(out["text_tokens"])
    if video_tokens != int(counts.sum()) + B:
        warnings.warn(f"FLOP count assumes {int(counts.sum()) + B} video tokens, the model used "
                      f"{video_tokens}", RuntimeWarning)
    flops = train_flops(shape, counts + 1, text_lens, masked, reverse)
    return dict(seed=seed, forward_s=fwd, backward_s=bwd, optimizer_s=opt,
                step_s=wall, device_s=fwd + bwd + opt,
                video_tokens=video_tokens, text_tokens=text_tokens, tokens=video_tokens + text_tokens,
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
                forward_ms=1e3 * mean("forward_s"), backward_ms=1e3 * mean("backward_s"),
                optimizer_ms=1e3 * mean("optimizer_s"),
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


# ------------------------------------------------------------------------------------ report

def table(payload):
    rows, rat = [], []
    for d in payload["results"]:
        for name in ("fused", "unfused"):
            r = d[name]
            rows.append([d["drop"], f"{name} ({payload['variants'][name]})",
                         f"{r['step_ms']:.1f} ({r['forward_ms']:.0f}/{r['backward_ms']:.0f}/{r['optimizer_ms']:.0f})",
                         r["samples_per_s"], r["tokens_per_s"], r["tflops"],
                         f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else None,
                         r["peak_mem_gib"], r["step_mem_gib"]])
        c = d["ratio"]
        rat.append([d["drop"], c["fused_tokens_per_s"], c["unfused_tokens_per_s"], f"{c['speedup']:.2f}x",
                    f"{c['pair_speedup_median']:.2f}x ({c['pair_speedup_min']:.2f}-{c['pair_speedup_max']:.2f})"])
    mem = "peak alloc GiB" if payload["device"] == "cuda" else "peak RSS GiB"
    return (markdown_table(["drop", "variant (attn/embed)", "step ms (fwd/bwd/opt)", "samples/s",
                            "tokens/s", "TFLOP/s", "MFU", mem, "step +GiB"], rows),
            markdown_table(["drop", "fused tokens/s", "unfused tokens/s", "speedup",
                            "per-pair speedup median (min-max)"], rat))


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
    parts = (("forward_ms", "tab:blue"), ("backward_ms", "tab:orange"), ("optimizer_ms", "tab:purple"))
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


def write_outputs(payload, out):
    out = Path(out)
    path = write_json(out / "bench_train.json", payload)
    if payload["results"]:
        t1, t2 = table(payload)
        notes = [f"engine: {payload['engine']}; precision {payload['precision']}; "
                 f"{payload['config']['steps']} alternated steps per variant after "
                 f"{payload['config']['warmup']} warm-up; {payload['threads']} torch thread(s)"
                 + ("; denormals flushed to zero" if payload["config"]["flush_denormal"] else ""),
                 "tokens/s = kept video tokens (incl. CLS) + text tokens of the step, per second, "
                 "per device; speedup = fused tokens/s / unfused tokens/s (same tokens per pair)",
                 f"MFU against {payload['peak_tflops']:.3g} TFLOP/s ({payload['peak_source']})"
                 if payload["peak_tflops"] else "MFU: no peak known for this device (--peak-tflops)"]
        notes += payload["notes"]
        write_markdown(out / "bench_train.md", "bench_train: training step, fused vs unfused",
                       payload["machine"], t1 + "\n\n" + t2, notes)
        if payload.get("complete"):
            png = plot(payload, out / "bench_train.png")
            if png:
                print(f"wrote {png}")
    return path


# ------------------------------------------------------------------------------------ main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu-defaults", action="store_true", help="ViT-B/16 defaults (automatic with CUDA)")
    ap.add_argument("--cpu-defaults", action="store_true", help="tiny defaults even with CUDA")
    ap.add_argument("--preset", choices=["tiny", "vit-b16", "vit-l14"])
    ap.add_argument("--frames", type=int)
    ap.add_argument("--size", type=int, help="frame side in pixels")
    ap.add_argument("--batch", type=int, help="clips per step (per device)")
    ap.add_argument("--drop", nargs="+", help="drop ratios: numbers or per-sample ranges lo:hi")
    ap.add_argument("--steps", type=int, help="timed steps per variant per drop ratio")
    ap.add_argument("--warmup", type=int, help="untimed steps per variant per drop ratio")
    ap.add_argument("--fused", help="attn/patch_embed of the fused path "
                                    "(default triton/triton on CUDA, torch-varlen/gather on CPU)")
    ap.add_argument("--unfused", default="sdpa/conv", help="attn/patch_embed of the baseline")
    ap.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "z2.json"), help="DeepSpeed config")
    ap.add_argument("--no-deepspeed", action="store_true", help="plain torch AdamW loop")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="auto: bf16 on GPU, on CPU what the trainer's probe picks")
    ap.add_argument("--fusion-layers", type=int, default=2)
    ap.add_argument("--fusion-width", type=int, default=None)
    ap.add_argument("--activation-checkpointing", action="store_true")
    ap.add_argument("--reverse-negatives", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--vocab", type=int, help=f"text vocabulary (default {CLIP_VOCAB} = CLIP's BPE + "
                                              "mask; 512 for tiny, like the synthetic tokenizer)")
    ap.add_argument("--caption-tokens", default="8:32", help="caption length range incl. BOS/EOS")
    ap.add_argument("--mask-ratio", type=float, default=0.5, help="MLM mask ratio (the trainer's default)")
    ap.add_argument("--peak-tflops", type=float, help="peak for MFU (default: GPU table / measured CPU matmul)")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's); on a CPU "
                                                "shared with other jobs 1 thread is steadier")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="torch.set_flush_denormal(True) first (CPU: subnormal floats can make "
                         "early training steps many times slower; the trainer does not set it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS), help="folder for bench_train.json/.md/.png")
    args = ap.parse_args(argv)
    defaults = GPU_DEFAULTS if (args.gpu_defaults or CUDA) and not args.cpu_defaults else CPU_DEFAULTS
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vocab is None:
        args.vocab = 512 if args.preset == "tiny" else CLIP_VOCAB
    if args.fused is None:
        args.fused = "triton/triton" if CUDA else "torch-varlen/gather"
    return args


def variant(model, spec):
    from hvfm.model import get_backend
    attn, _, embed = spec.partition("/")
    if attn != "sdpa" and get_backend(attn) is get_backend("sdpa"):
        raise SystemExit(f"attention backend '{attn}' is not available here (it would fall back to "
                         f"sdpa); choose another with --fused/--unfused")
    model.set_attention(attn)
    if embed:
        model.video.patch_embed = embed
    return model


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    info = machine_info()
    device_name = info["gpu"] or info["cpu"]
    print(f"machine: {describe(info)}")
    notes = []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if not CUDA and load is not None and load > (os.cpu_count() or 1):
        notes.append(f"the CPU was shared: load average {load:.1f} on {os.cpu_count()} cores at the "
                     f"start; absolute rates are low and noisy, the per-pair ratios less so")
        print(f"NOTE: {notes[-1]}")
    use_ds = have_deepspeed() and not args.no_deepspeed
    if not use_ds:
        why = "--no-deepspeed" if args.no_deepspeed else "deepspeed is not importable"
        notes.append(f"plain torch AdamW loop ({why}), not the DeepSpeed engine")
        print(f"NOTE: {notes[-1]}")
    precision = pick_precision(args.precision)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    if args.peak_tflops:
        peak, source = args.peak_tflops, "--peak-tflops"
    elif CUDA:
        peak = gpu_peak_tflops(info["gpu"]) if precision == "bf16" else None
        source = f"dense bf16 peak of {info['gpu']}"
    else:
        peak = cpu_peak_tflops(dtype)
        source = f"measured {precision} 1024^3 matmul on this CPU"
    init_world(use_ds)
    device = f"cuda:{torch.cuda.current_device()}" if CUDA else "cpu"

    model, tok = build_model(args)
    models = {"fused": model, "unfused": copy.deepcopy(model)}
    for name, spec in (("fused", args.fused), ("unfused", args.unfused)):
        variant(models[name], spec)
    shape = ModelShape.of(model)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = ds_config(args.deepspeed, args.batch, precision)
    engines = {k: make_engine(m, cfg, use_ds, dtype, device) for k, m in models.items()}
    del model, models
    batches = synthetic_batches(args, tok, device, dtype)
    print(f"{args.preset}: {n_params / 1e6:.1f}M parameters; {args.frames} frames x {args.size} px, "
          f"batch {args.batch}; {precision}; {'DeepSpeed' if use_ds else 'torch'} engine; "
          f"fused {args.fused} vs unfused {args.unfused}; peak {peak and round(peak, 3)} TFLOP/s ({source})")

    payload = {"benchmark": "bench_train", "machine": info, "config": vars(args),
               "device": "cuda" if CUDA else "cpu", "device_name": device_name,
               "engine": "deepspeed" if use_ds else "torch", "precision": precision,
               "parameters": n_params, "model_shape": asdict(shape),
               "variants": {"fused": args.fused, "unfused": args.unfused},
               "peak_tflops": peak, "peak_source": source, "notes": notes, "complete": False,
               "threads": torch.get_num_threads(), "load_average_start": load,
               "results": []}
    for di, drop in enumerate(args.drop):
        steps = {"fused": [], "unfused": []}
        for name, eng in engines.items():
            for w in range(args.warmup):
                one_step(eng, batches[w % len(batches)], drop, 10_000 * (di + 1) + w, args.reverse_negatives, shape)
        for i in range(args.steps):  # fused, unfused, fused, unfused, ... same seed per pair
            for name, eng in engines.items():
                steps[name].append(one_step(eng, batches[i % len(batches)], drop, 1000 * di + i,
                                            args.reverse_negatives, shape))
        res = {name: summarise(s, peak) for name, s in steps.items()}
        ratio = compare(steps["fused"], steps["unfused"], res["fused"], res["unfused"])
        payload["results"].append({"drop": drop, **res, "ratio": ratio, "step_log": steps})
        print(f"drop {drop}: fused {res['fused']['tokens_per_s']:.0f} tokens/s "
              f"({res['fused']['step_ms']:.0f} ms/step), unfused {res['unfused']['tokens_per_s']:.0f} "
              f"({res['unfused']['step_ms']:.0f} ms/step): {ratio['speedup']:.2f}x", flush=True)
        write_outputs(payload, args.out)
        gc.collect()
    if CUDA:
        used = nvml_used_bytes(torch.cuda.current_device())
        payload["device_memory_used_gib"] = used / GIB if used is not None else None
        payload["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    payload["load_average_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload["complete"] = True
    path = write_outputs(payload, args.out)
    t1, t2 = table(payload)
    print(t1 + "\n\n" + t2)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
