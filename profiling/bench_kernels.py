"""Triton kernels vs torch baselines: varlen attention and the fused kept-patch embedding.

    python profiling/bench_kernels.py [--out DIR] [--quick]

On CUDA (bf16): `kernels.varlen_attention` vs `torch.nn.attention.varlen.varlen_attn` (torch
>= 2.10; a skipped row with the reason otherwise), torch SDPA on padded input (efficient backend
with the key-padding mask; flash backend without a mask: padded keys are attended, timing only),
flash-attn and xformers varlen when installed. Shapes: ViT-B/16 video self-attention (12 heads
of 64, 8 frames x 196 patches + CLS, batch 32) keeping 0.5 of the patches and keeping a ratio
drawn from U[0.1, 0.5] per sample, and the fusion's cross-attention (20-45 text queries over the
kept video tokens). Forward and forward+backward. `kernels.patch_embed_gather` vs
conv-every-patch-then-gather and vs torch gather+matmul at 50/75/90% drop (ViT-B/16, 224 px,
8 frames, batch 32).
TFLOP/s count useful work only (attention fwd 4*sum(Lq*Lk)*D*H, bwd 2.5x, so fwd+bwd 3.5x;
patch embed 2*kept*C*p*p*D; backward of the embedding 1x more). Ratios divide two rates measured
in this run. Without CUDA the same cases run tiny, fp32, under the Triton interpreter: those
times mean nothing.
Writes `bench_kernels.json` after every row ("complete": false until the end, so a run cut
short keeps what it measured): machine, versions, commit, every measurement, the skipped
baselines and why, for each attention case its autotune shape class and the configs chosen for
it, and `kernels.autotune_report()` (seconds spent compiling and autotuning, and which keys came
from the on-disk autotune cache). Expected on an H100 (an estimate, not yet measured): ~60 s
cold (compiles + autotune of 3 attention classes), ~30 s with Triton's and the autotune cache
warm.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from profiling.machine import RESULTS, describe, machine_info  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def timer(quick):
    """fn -> milliseconds per call (median of do_bench on CUDA; mean of a few calls otherwise)."""
    if CUDA and not INTERPRETED:
        import triton.testing
        return lambda fn: triton.testing.do_bench(fn, warmup=10 if quick else 25,
                                                  rep=30 if quick else 100)

    def cpu(fn):
        fn()
        reps = 1 if quick else 2
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t) / reps * 1e3
    return cpu


def cu_of(lengths, dev):
    cum = torch.tensor([0] + list(lengths)).cumsum(0)
    return cum.to(dev, torch.int32)


def attention_impls(q, k, v, lq, lk, dev):
    """(name -> fn() running one attention, name -> why a baseline is absent, tensors); each fn
    takes packed q, k, v (or padded copies)."""
    cq, ck, mq, mk = cu_of(lq, dev), cu_of(lk, dev), max(lq), max(lk)
    impls = {"triton": lambda: kernels.varlen_attention(q, k, v, cq, ck, mq, mk)}
    absent = {}
    B, H, D = len(lq), q.shape[1], q.shape[2]

    def pad(x, lens, L):
        out = x.new_zeros(B, L, H, D)
        for i, (s, n) in enumerate(zip(cu_of(lens, "cpu")[:-1].tolist(), lens)):
            out[i, :n] = x[s:s + n]
        return out.transpose(1, 2).detach().requires_grad_(x.requires_grad)
    qp, kp, vp = pad(q, lq, mq), pad(k, lk, mk), pad(v, lk, mk)
    mask = (torch.arange(mk, device=dev)[None, :] < torch.tensor(lk, device=dev)[:, None])
    mask = mask[:, None, None, :]
    try:  # torch >= 2.10; flash-attention kernels, CUDA only
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:
        varlen_attn = None
        absent["torch_varlen_attn"] = f"not in torch {torch.__version__} ({e})"
    if CUDA and not INTERPRETED:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(backend, m):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m)
            return run
        if varlen_attn is not None:
            impls["torch_varlen_attn"] = lambda: varlen_attn(q, k, v, cq, ck, mq, mk)
        impls["sdpa_efficient_padded"] = sdpa(SDPBackend.EFFICIENT_ATTENTION, mask)
        impls["sdpa_flash_padded_nomask"] = sdpa(SDPBackend.FLASH_ATTENTION, None)
        try:
            from flash_attn import flash_attn_varlen_func
            impls["flash_attn_varlen"] = lambda: flash_attn_varlen_func(q, k, v, cq, ck, mq, mk)
        except ImportError:
            absent["flash_attn_varlen"] = "flash-attn is not installed"
        try:
            from xformers.ops import fmha
            bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(lq), list(lk))
            impls["xformers_blockdiag"] = lambda: fmha.memory_efficient_attention(
                q[None], k[None], v[None], attn_bias=bias)[0]
        except ImportError:
            absent["xformers_blockdiag"] = "xformers is not installed"
    else:  # CPU: the math backend with the padding mask is the only sensible baseline
        impls["sdpa_padded"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
        if varlen_attn is not None:
            absent["torch_varlen_attn"] = "CUDA only (flash-attention kernels)"
    return impls, absent, (q, k, v, qp, kp, vp)


def attention_cases(quick):
    """(name, query lengths, key lengths, heads, head dim). ViT-B/16 video self-attention: 12
    heads of 64, 8 frames x 196 patches, each sample keeping half its patches or a ratio drawn
    from U[0.1, 0.5], + CLS; the fusion's cross-attention: a caption's words over them."""
    g = torch.Generator().manual_seed(0)
    if CUDA and not INTERPRETED:
        B, H, D, n_patch, text = 4 if quick else 32, 12, 64, 8 * 196, (20, 45)
    else:
        B, H, D, n_patch, text = (2, 2, 32, 64, (5, 20)) if quick else (3, 2, 64, 128, (5, 33))
    half = [1 + round(0.5 * n_patch)] * B
    keep = 0.1 + 0.4 * torch.rand(B, generator=g)
    video = [1 + max(1, round(float(r) * n_patch)) for r in keep]
    words = torch.randint(text[0], text[1], (B,), generator=g).tolist()
    cases = [("vit_b16_video_keep0.5", half, half, H, D),
             ("vit_b16_video_keepU0.1-0.5", video, video, H, D),
             ("fusion_cross", words, video, H, D)]
    return cases[:2] if quick and not CUDA else cases


def bench_attention(quick, dtype, dev, measure, rec):
    for name, lq, lk, H, D in attention_cases(quick):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(sum(n), H, D, generator=g).to(dev, dtype).requires_grad_()
                   for n in (lq, lk, lk))
        flops = 4.0 * sum(a * b for a, b in zip(lq, lk)) * D * H
        impls, absent, tensors = attention_impls(q, k, v, lq, lk, dev)
        for impl, why in absent.items():
            rec.skip("attention", name, impl, why)
        shape = dict(batch=len(lq), heads=H, head_dim=D, max_q=max(lq), max_k=max(lk),
                     mean_q=sum(lq) / len(lq), mean_k=sum(lk) / len(lk))
        for impl, fn in impls.items():
            try:  # an optional baseline may not support this GPU / dtype: skip it, say why
                out = fn()
                do = torch.randn_like(out)
                inputs = tensors[3:] if out.dim() == 4 else tensors[:3]

                def fwd_bwd(fn=fn, do=do, inputs=inputs):
                    torch.autograd.grad(fn(), inputs, do)
                fwd_bwd()  # compiles / autotunes the backward outside the timing
            except Exception as e:  # noqa: BLE001
                if impl == "triton":
                    raise
                rec.skip("attention", name, impl, f"{type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            extra = dict(shape=shape)
            if impl == "triton":  # the configs autotuning chose for this case's shape class
                extra["tuned"] = tuned_configs(max(lq), max(lk), D)
                print(f"{name}: shape class {extra['tuned']['class']}, tuned {extra['tuned']}")
            with torch.no_grad():
                ms = measure(fn)
            rec.add(dict(kernel="attention", case=name, impl=impl, mode="fwd", ms=ms,
                         gflop=flops / 1e9, tflops=flops / ms / 1e9, **extra))
            ms = measure(fwd_bwd)
            rec.add(dict(kernel="attention", case=name, impl=impl, mode="fwd+bwd", ms=ms,
                         gflop=3.5 * flops / 1e9, tflops=3.5 * flops / ms / 1e9, **extra))
        del q, k, v, tensors, impls


def tuned_configs(max_q, max_k, head_dim):
    """Shape class of a call and the config each attention kernel runs with for it (from the
    autotune report: tuned here, read from the disk cache, or the only candidate)."""
    cls = kernels.attention_class(max_q, max_k)
    out = {"class": cls}
    for e in kernels.autotune_report()["entries"]:
        if e["kernel"] in ("attention_fwd", "attention_dkdv", "attention_dq") and \
                e["key"].get("tune_class") == cls and e["key"].get("HEAD_DIM") == head_dim:
            out[e["kernel"].split("_", 1)[1]] = dict(e["config"]["kwargs"],
                                                     num_warps=e["config"]["num_warps"],
                                                     num_stages=e["config"]["num_stages"],
                                                     source=e["source"])
    return out


def bench_patch_embed(quick, dtype, dev, measure, rec):
    if CUDA and not INTERPRETED:
        B, T, S, p, D, drops = (4, 8, 224, 16, 768, (0.75,)) if quick else \
            (32, 8, 224, 16, 768, (0.5, 0.75, 0.9))
    else:
        B, T, S, p, D, drops = (2, 2, 32, 8, 64, (0.75,)) if quick else \
            (2, 4, 48, 16, 128, (0.5, 0.75, 0.9))
    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(B, T, 3, S, S, generator=g).to(dev, dtype)
    hp = S // p
    weight = (torch.randn(D, 3, p, p, generator=g) * 0.02).to(dev, dtype).requires_grad_()
    pos_s = torch.randn(hp * hp, D, generator=g).to(dev, dtype).requires_grad_()
    pos_t = torch.randn(T, D, generator=g).to(dev, dtype).requires_grad_()
    n = T * hp * hp
    for drop in drops:
        counts = torch.full((B,), max(1, round((1 - drop) * n)), dtype=torch.int64)
        total = int(counts.sum())
        idx, sample, cu = kernels.sample_keep_idx(counts.to(dev), torch.full((B,), n, device=dev),
                                                  n, total=total, generator=None)
        t, hw = idx // (hp * hp), idx % (hp * hp)

        def conv_gather():
            f = F.conv2d(pixels.flatten(0, 1), weight, stride=p)
            tok = f.flatten(2).transpose(1, 2).reshape(B, n, D)[sample, idx]
            return tok + pos_s[hw] + pos_t[t]

        def torch_gather():
            view = pixels.unflatten(3, (hp, p)).unflatten(5, (hp, p))
            patches = view[sample, t, :, hw // hp, :, hw % hp, :].flatten(1)
            return patches @ weight.flatten(1).t() + pos_s[hw] + pos_t[t]
        impls = {"triton": lambda: kernels.patch_embed_gather(pixels, idx, cu, weight, None,
                                                               pos_s, pos_t),
                 "conv_then_gather": conv_gather, "torch_gather_matmul": torch_gather}
        flops = 2.0 * total * 3 * p * p * D
        for impl, fn in impls.items():
            do = torch.randn(total, D, device=dev, dtype=dtype)

            def fwd_bwd(fn=fn, do=do):
                torch.autograd.grad(fn(), (weight, pos_s, pos_t), do)
            fwd_bwd()  # compile / autotune outside the timing
            with torch.no_grad():
                ms = measure(fn)
            case = f"vit_b16_drop{int(drop * 100)}"
            rec.add(dict(kernel="patch_embed", case=case, impl=impl, mode="fwd", ms=ms,
                         gflop=flops / 1e9, tflops=flops / ms / 1e9))
            ms = measure(fwd_bwd)
            rec.add(dict(kernel="patch_embed", case=case, impl=impl, mode="fwd+bwd", ms=ms,
                         gflop=2 * flops / 1e9, tflops=2 * flops / ms / 1e9))


def ratios(rows):
    """triton's rate over each other implementation's rate, same kernel/case/mode."""
    out = []
    for r in rows:
        if r["impl"] == "triton":
            continue
        tri = next(x for x in rows if x["impl"] == "triton" and
                   (x["kernel"], x["case"], x["mode"]) == (r["kernel"], r["case"], r["mode"]))
        out.append(dict(kernel=r["kernel"], case=r["case"], mode=r["mode"], vs=r["impl"],
                        triton_tflops=tri["tflops"], other_tflops=r["tflops"],
                        speedup=tri["tflops"] / r["tflops"]))
    return out


class Recorder:
    """The JSON file, rewritten (atomically) after every row: a run cut short by a timeout keeps
    what it measured, with "complete": false."""

    def __init__(self, path, header):
        self.path, self.header = Path(path), header
        self.rows, self.skipped = [], []
        self.write(complete=False)

    def add(self, row):
        self.rows.append(row)
        r = row
        print(f"| {r['kernel']} | {r['case']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | "
              f"{r['tflops']:.3g} |", flush=True)
        self.write(complete=False)

    def skip(self, kernel, case, impl, reason):
        self.skipped.append(dict(kernel=kernel, case=case, impl=impl, reason=reason))
        print(f"skipping {impl} on {case}: {reason}", flush=True)
        self.write(complete=False)

    def write(self, complete, **extra):
        payload = {**self.header, "complete": complete, "results": self.rows,
                   "skipped": self.skipped, "autotune": kernels.autotune_report(), **extra}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        os.replace(tmp, self.path)
        return self.path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(RESULTS), help="folder for bench_kernels.json")
    ap.add_argument("--quick", action="store_true",
                    help="smallest config: batch 4 on CUDA, fewer cases and repetitions")
    args = ap.parse_args(argv)
    dev, dtype = ("cuda", torch.bfloat16) if CUDA and not INTERPRETED else ("cpu", torch.float32)
    info = machine_info()
    print(f"machine: {describe(info)}; triton {info['versions'].get('triton')}")
    if INTERPRETED:
        print("NOTE: no CUDA -- tiny shapes under the Triton interpreter (TRITON_INTERPRET=1); "
              "these times say NOTHING about kernel speed, they only exercise the code paths.")
    measure = timer(args.quick)
    rec = Recorder(Path(args.out) / "bench_kernels.json", {
        "benchmark": "bench_kernels", "machine": info, "interpreted": INTERPRETED,
        "device": dev, "dtype": str(dtype).replace("torch.", ""), "config": vars(args),
        "note": "times under the Triton interpreter mean nothing" if INTERPRETED else "",
        "flops": "attention fwd 4*sum(Lq*Lk)*D*H, fwd+bwd 3.5x; patch embed 2*kept*C*p*p*D, "
                 "fwd+bwd 2x"})
    print("| kernel | case | impl | mode | ms | TFLOP/s |\n|---|---|---|---|---|---|")
    bench_attention(args.quick, dtype, dev, measure, rec)
    print(kernels.format_autotune_report(kernels.autotune_report()), flush=True)
    bench_patch_embed(args.quick, dtype, dev, measure, rec)
    rat = ratios(rec.rows)
    print("| kernel | case | mode | triton vs | speedup |\n|---|---|---|---|---|")
    for r in rat:
        print(f"| {r['kernel']} | {r['case']} | {r['mode']} | {r['vs']} | {r['speedup']:.2f}x |")
    path = rec.write(complete=True, ratios=rat)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
