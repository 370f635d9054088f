"""The trainer's first step on the fused path against the unfused path: same batch, same seeds,
identical weights; their losses and gradient norms must agree within the precision's tolerance.

    python profiling/gpu_step_check.py [--out DIR] [--mode auto|engine|module]
                                       [--model vit-b16 --frames 8 --size 224 --batch-size 8]
                                       [--drop 0.5] [--precision auto|bf16|fp32]

fused    `triton` attention + the fused Triton patch embedding (`--fused`, as bench_train on CUDA;
         under the Triton interpreter on a CPU)
unfused  `sdpa` on padded sequences + `conv` patch embedding (`--unfused`)

engine mode (deepspeed and a video decoder installed): built by the trainer's own functions, as
  profiling/bench_train.py builds them: its flags and checks, the built-in corpus and the
  trainer's loader (the first batch of it), the model (`hvfm.build.build_model`), two DeepSpeed
  engines with the trainer's LR groups and config (`build_engine`, ds_configs/z2.json). Each
  takes one `hvfm.loop.train_step` (forward, backward, engine.step) on the same batch with the
  same seeds. Compared: the losses (total, VTC, VTM, MLM) and DeepSpeed's global gradient norm
  (the one clipping reads, before clipping).
module mode (no deepspeed or no decoder: a bare GPU machine whose wheels failed): the same
  `train_step` on the model itself (backward, no optimizer), the preset with random weights and
  a synthetic batch; compared: the losses, the total gradient norm and the norm of each part
  (video tower, text tower, fusion, heads).
The fused step is then run twice more on the same batch: the first step's time minus the third's
(`--timing-steps`, default 2 on CUDA, 0 on a CPU) is the cold start (Triton compiles and
autotuning) of the fused path, reported as `first_step_overhead_s` (with warm caches: autotuning
only).

Tolerances (|fused - unfused| <= atol + rtol * |unfused|): fp32 losses 1e-5 + 1e-5, gradient
norms 1e-4 relative (summation order only: ~1e-7 measured on CPU); bf16 losses 2e-2 + 2e-2,
gradient norms 5e-2 relative: bf16 keeps 8 bits of mantissa and the two paths round at
different places (padded vs packed sums, conv vs gathered matmul), backward included. Measured on
CPU (tiny preset, batch 4, bf16, packed torch-varlen/gather against sdpa/conv): losses differ by
<= 5.5e-3 (<= 3e-3 relative), gradient norms by 0.3% (total) to 1.7% (the small heads); ViT-B's
12 layers round more, hence ~3x that. A real error (a wrong mask, a lost token, a wrong scale)
moves them by far more: tests/test_gpu_check.py checks that a perturbed attention fails.
Defaults: on CUDA vit-b16, 8 frames of 224 px, batch 8, bf16; on a CPU the tiny preset, 2
frames of 32 px, batch 4, fp32. Writes step_check.json into --out (rewritten as each part
finishes); exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
if not CUDA:  # must precede the first import of kernels: the Triton path runs interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(ROOT))

from profiling.machine import machine_info, write_json  # noqa: E402

TOLERANCE = {"fp32": dict(loss_atol=1e-5, loss_rtol=1e-5, grad_rtol=1e-4),
             "bf16": dict(loss_atol=2e-2, loss_rtol=2e-2, grad_rtol=5e-2),
             "fp16": dict(loss_atol=2e-2, loss_rtol=2e-2, grad_rtol=5e-2)}
LOSSES = ("loss", "vtc", "vtm", "mlm")
PARTS = ("video", "text", "fusion")  # anything else: "heads"


def have(module):
    return importlib.util.find_spec(module) is not None


def sync():
    if CUDA:
        torch.cuda.synchronize()


class Bare:
    """The engine interface `train_step` uses, over the model itself: forward, backward, and a
    step that leaves the gradients in place (so they can be read)."""

    def __init__(self, model, device):
        self.module, self.device = model, device

    def __call__(self, *a, **kw):
        return self.module(*a, **kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def grad_norms(model):
    sq = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            part = name.split(".")[0]
            part = part if part in PARTS else "heads"
            sq[part] = sq.get(part, 0.0) + float(p.grad.detach().double().pow(2).sum())
    out = {k: math.sqrt(v) for k, v in sorted(sq.items())}
    out["total"] = math.sqrt(sum(sq.values()))
    return out


def compare(fused, unfused, tol):
    """Per compared quantity: both values, |diff|, the bound, and whether it holds."""
    rows = []
    for key, f in fused["losses"].items():
        u = unfused["losses"][key]
        bound = tol["loss_atol"] + tol["loss_rtol"] * abs(u)
        rows.append(dict(what=f"loss {key}", fused=f, unfused=u, diff=abs(f - u), bound=bound,
                         ok=bool(abs(f - u) <= bound)))
    for key, f in fused["grad_norms"].items():
        u = unfused["grad_norms"][key]
        bound = tol["grad_rtol"] * abs(u) + 1e-8
        rows.append(dict(what=f"grad norm {key}", fused=f, unfused=u, diff=abs(f - u), bound=bound,
                         ok=bool(abs(f - u) <= bound and math.isfinite(f))))
    return rows


def one(engine, batch, seeds, args, weights, dtype, host_check, read_norms):
    from hvfm.loop import train_step
    bad = torch.zeros((), device=engine.device)
    sync()
    t = time.perf_counter()
    out = train_step(engine, dict(batch), np.random.SeedSequence(seeds), args, weights, dtype, bad,
                     host_check)
    sync()
    seconds = time.perf_counter() - t
    if out is None:
        raise RuntimeError("the step's loss was not finite (train_step dropped it)")
    losses = {k: float(out[k].detach().float()) for k in LOSSES if k in out and torch.is_tensor(out[k])}
    return dict(losses=losses, grad_norms=read_norms(), seconds=seconds,
                video_tokens=int(out["video_tokens"]), text_tokens=int(out["text_tokens"]))


def engine_setup(opts, scratch):
    """The trainer's set-up (bench_train's): flags, checks, corpus, loader, model; two engines."""
    from hvfm.build import build_engine
    from profiling.bench_train import trainer_setup, variant
    targv = ["--deepspeed", str(ROOT / "ds_configs" / "z2.json"), "--model", opts.model,
             "--frames", str(opts.frames), "--size", str(opts.size), "--batch-size", str(opts.batch_size),
             "--workers", str(opts.workers), "--precision", opts.precision, "--drop-ratio", opts.drop,
             "--output-dir", scratch, "--seed", str(opts.seed)]
    setup = trainer_setup(targv)
    models = {"fused": setup.model, "unfused": copy.deepcopy(setup.model)}
    engines, dtype, host_check = {}, None, False
    for name in ("fused", "unfused"):
        variant(models[name], getattr(opts, name))
        engines[name], _, _, dtype, host_check = build_engine(models[name], setup.cfg, setup.precision,
                                                              setup.args, 10)
    batch = next(iter(setup.loader))

    def norms(name):
        return lambda: {"total": float(engines[name].get_global_grad_norm())}
    return dict(engines=engines, batch=batch, args=setup.args, weights=setup.weights, dtype=dtype,
                host_check=host_check, precision=setup.precision, why=setup.precision_why,
                norms=norms, loader=setup.loader)


def module_setup(opts, scratch):
    """No DeepSpeed or no decoder: the preset with random weights and a synthetic batch."""
    from hvfm.config import check_args, parse_args, pick_precision
    from hvfm.model import VideoLanguageModel, add_mask_token, load_clip, save_random_clip
    from hvfm.model.testing import WORDS, tiny_batch, tiny_tokenizer
    from profiling.bench_train import variant
    args = parse_args(["--deepspeed", str(ROOT / "ds_configs" / "z2.json"), "--model", opts.model,
                       "--frames", str(opts.frames), "--drop-ratio", opts.drop, "--seed", str(opts.seed)])
    weights = check_args(args, CUDA)
    precision, why = pick_precision(opts.precision, CUDA)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tok = tiny_tokenizer()
    save_random_clip(opts.model, tok, scratch, seed=opts.seed)
    clip, tok = load_clip(scratch)
    add_mask_token(clip, tok)
    device = torch.device("cuda" if CUDA else "cpu")
    model = VideoLanguageModel.from_clip(clip, tok, fusion_layers=args.fusion_layers,
                                         fusion_width=args.fusion_width, max_frames=max(opts.frames, 16),
                                         motion=args.motion_channel, vtm_token="last").to(device, dtype)
    models = {"fused": model, "unfused": copy.deepcopy(model)}
    for name in ("fused", "unfused"):
        variant(models[name], getattr(opts, name))
    rng = np.random.default_rng(opts.seed)
    captions = [" ".join(rng.choice(WORDS, int(rng.integers(3, 12)))) for _ in range(opts.batch_size)]
    batch = tiny_batch(tok, captions, [opts.frames] * opts.batch_size, image=opts.size, seed=opts.seed)
    if weights.get("swap", 0) > 0:  # the caption-swap term's fields, as the trainer's collator adds
        from hvfm.data.loading.dataset import swap_fields
        from hvfm.data.text.tokens import MAX_LENGTH
        batch.update(swap_fields(tok, captions, MAX_LENGTH))

    def norms(name):
        def read():
            out = grad_norms(models[name])
            models[name].zero_grad(set_to_none=True)
            return out
        return read
    return dict(engines={n: Bare(m, device) for n, m in models.items()}, batch=batch, args=args,
                weights=weights, dtype=dtype, host_check=False, precision=precision, why=why,
                norms=norms, loader=None)


def check(opts):
    mode = opts.mode
    missing = [m for m in ("deepspeed",) if not have(m)] + ([] if have("av") or have("decord") else ["av/decord"])
    if mode == "auto":
        mode = "module" if missing else "engine"
    elif mode == "engine" and missing:
        raise SystemExit(f"gpu_step_check: --mode engine needs {', '.join(missing)} (or --mode module)")
    payload = {"benchmark": "step_check", "machine": machine_info(), "mode": mode,
               "why_mode": (f"no {', '.join(missing)}: the model's own forward/backward, no engine"
                            if mode == "module" and missing else
                            "the trainer's set-up and DeepSpeed engines" if mode == "engine" else "--mode module"),
               "device": "cuda" if CUDA else "cpu", "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
               "config": {k: v for k, v in vars(opts).items() if k != "out"}, "complete": False, "ok": None}
    out = Path(opts.out) / "step_check.json"
    write_json(out, payload)
    scratch = tempfile.mkdtemp(prefix="hvfm-step-check-")
    try:
        s = (engine_setup if mode == "engine" else module_setup)(opts, scratch)
        args = argparse.Namespace(**{**vars(s["args"]), "drop_ratio": opts.drop})
        tol = TOLERANCE[s["precision"]]
        payload.update(precision=s["precision"], precision_why=s["why"], tolerance=tol)
        print(f"step check ({mode}): {opts.model}, {opts.frames} frames x {opts.size} px, batch "
              f"{opts.batch_size}, drop {opts.drop}, {s['precision']}; fused {opts.fused} vs unfused "
              f"{opts.unfused}", flush=True)
        seeds = [opts.seed, 1, 0]
        res = {}
        for name in ("fused", "unfused"):
            res[name] = one(s["engines"][name], s["batch"], seeds, args, s["weights"], s["dtype"],
                            s["host_check"], s["norms"](name))
            payload[name] = res[name]
            if name == "fused":  # what its first step spent compiling and autotuning the kernels
                import kernels
                payload["autotune"] = {k: v for k, v in kernels.autotune_report(reset=True).items()
                                       if k != "entries"}
                print(kernels.format_autotune_report(payload["autotune"]), flush=True)
            print(f"{name}: losses {res[name]['losses']}, grad norms {res[name]['grad_norms']}, "
                  f"{res[name]['seconds']:.2f} s", flush=True)
            write_json(out, payload)
        rows = compare(res["fused"], res["unfused"], tol)
        payload["checks"] = rows
        payload["ok"] = all(r["ok"] for r in rows) and res["fused"]["video_tokens"] == res["unfused"]["video_tokens"]
        payload["same_tokens"] = res["fused"]["video_tokens"] == res["unfused"]["video_tokens"]
        write_json(out, payload)
        # the fused path's cold start: its first step against a later one (same batch and seeds)
        later = [one(s["engines"]["fused"], s["batch"], seeds, args, s["weights"], s["dtype"],
                     s["host_check"], s["norms"]("fused"))["seconds"] for _ in range(opts.timing_steps)]
        payload["fused_step_s"] = [res["fused"]["seconds"], *later]
        payload["first_step_overhead_s"] = res["fused"]["seconds"] - later[-1] if later else None
        if CUDA:
            payload["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        payload["complete"] = True
        write_json(out, payload)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    for r in rows:
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['what']}: fused {r['fused']:.6g} unfused {r['unfused']:.6g} "
              f"|diff| {r['diff']:.3g} <= {r['bound']:.3g}")
    if payload["first_step_overhead_s"] is not None:
        print(f"fused first step {payload['fused_step_s'][0]:.2f} s, last {payload['fused_step_s'][-1]:.2f} s: "
              f"cold start {payload['first_step_overhead_s']:.2f} s")
    print(f"{'PASS' if payload['ok'] else 'FAIL'}: wrote {out}")
    return payload


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="folder for step_check.json")
    ap.add_argument("--mode", default="auto", choices=["auto", "engine", "module"])
    ap.add_argument("--model", default="vit-b16" if CUDA else "tiny")
    ap.add_argument("--frames", type=int, default=8 if CUDA else 2)
    ap.add_argument("--size", type=int, default=224 if CUDA else 32)
    ap.add_argument("--batch-size", type=int, default=8 if CUDA else 4)
    ap.add_argument("--workers", type=int, default=2 if CUDA else 0)
    ap.add_argument("--drop", default="0.5")
    ap.add_argument("--precision", default="auto" if CUDA else "fp32", choices=["auto", "bf16", "fp32", "fp16"])
    ap.add_argument("--fused", default="triton/triton")
    ap.add_argument("--unfused", default="sdpa/conv")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-steps", type=int, default=2 if CUDA else 0,
                    help="more fused steps after the comparison, to time the cold start")
    return ap.parse_args(argv)


def main(argv=None):
    payload = check(parse(argv))
    sys.exit(0 if payload["ok"] else 1)


if __name__ == "__main__":
    main()
