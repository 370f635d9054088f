"""Triton kernels vs torch baselines: varlen attention and the fused kept-patch embedding.

    python profiling/bench_kernels.py [--out DIR] [--quick]

On CUDA (bf16): `kernels.varlen_attention` vs torch SDPA on padded input (flash backend without
a mask: padded keys are attended, timing only; efficient backend with the key-padding mask),
`torch.nn.attention.varlen.varlen_attn`, flash-attn and xformers varlen when installed; shapes
ViT-B video self-attention (H=12, D=64, 8x196 patches + CLS, keep ratio ~ U[0.1, 0.5], batch 32)
and fusion cross-attention (~32 text queries over the kept video tokens). Forward and
forward+backward. `kernels.patch_embed_gather` vs conv-every-patch-then-gather and vs torch
gather+matmul at 50/75/90% drop (ViT-B/16, 224 px, 8 frames, batch 32).
TFLOP/s count useful work only (attention fwd 4*sum(Lq*Lk)*D*H, bwd 2.5x; patch embed
2*kept*C*p*p*D; backward of the embedding 1x more). Ratios divide two rates measured in this run.
Without CUDA the same cases run tiny, fp32, under the Triton interpreter: those times mean nothing.
Writes JSON (machine, versions, commit, every measurement, and for each attention case its
autotune shape class and the configs chosen for it) and prints a table.
"""
import argparse
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
from profiling.machine import RESULTS, describe, machine_info, write_json  # noqa: E402

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
    """name -> fn() running one attention; each takes packed q, k, v (or padded copies)."""
    cq, ck, mq, mk = cu_of(lq, dev), cu_of(lk, dev), max(lq), max(lk)
    impls = {"triton": lambda: kernels.varlen_attention(q, k, v, cq, ck, mq, mk)}
    B, H, D = len(lq), q.shape[1], q.shape[2]

    def pad(x, lens, L):
        out = x.new_zeros(B, L, H, D)
        for i, (s, n) in enumerate(zip(cu_of(lens, "cpu")[:-1].tolist(), lens)):
            out[i, :n] = x[s:s + n]
        return out.transpose(1, 2).detach().requires_grad_(x.requires_grad)
    qp, kp, vp = pad(q, lq, mq), pad(k, lk, mk), pad(v, lk, mk)
    mask = (torch.arange(mk, device=dev)[None, :] < torch.tensor(lk, device=dev)[:, None])
    mask = mask[:, None, None, :]
    if CUDA:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def sdpa(backend, m):
            def run():
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m)
            return run
        impls["sdpa_flash_padded_nomask"] = sdpa(SDPBackend.FLASH_ATTENTION, None)
        impls["sdpa_efficient_padded"] = sdpa(SDPBackend.EFFICIENT_ATTENTION, mask)
        try:
            from torch.nn.attention.varlen import varlen_attn
            impls["torch_varlen_attn"] = lambda: varlen_attn(q, k, v, cq, ck, mq, mk)
        except ImportError:
            pass
        try:
            from flash_attn import flash_attn_varlen_func
            impls["flash_attn_varlen"] = lambda: flash_attn_varlen_func(q, k, v, cq, ck, mq, mk)
        except ImportError:
            pass
        try:
            from xformers.ops import fmha
            bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(list(lq), list(lk))
            impls["xformers_blockdiag"] = lambda: fmha.memory_efficient_attention(
                q[None], k[None], v[None], attn_bias=bias)[0]
        except ImportError:
            pass
    else:  # CPU: the math backend with the padding mask is the only sensible baseline
        impls["sdpa_padded"] = lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    return impls, (q, k, v, qp, kp, vp)


def attention_cases(quick):
    g = torch.Generator().manual_seed(0)
    if CUDA and not INTERPRETED:
        B, H, D, n_patch, text = 4 if quick else 32, 12, 64, 8 * 196, (20, 45)
    else:
        B, H, D, n_patch, text = (2, 2, 32, 64, (5, 20)) if quick else (3, 2, 64, 128, (5, 33))
    keep = 0.1 + 0.4 * torch.rand(B, generator=g)
    video = [1 + max(1, round(float(r) * n_patch)) for r in keep]
    words = torch.randint(text[0], text[1], (B,), generator=g).tolist()
    cases = [("vit_b_video_self", video, video, H, D), ("fusion_cross", words, video, H, D)]
    return cases[:1] if quick and not CUDA else cases


def bench_attention(quick, dtype, dev, measure):
    rows = []
    for name, lq, lk, H, D in attention_cases(quick):
        g = torch.Generator().manual_seed(1)
        q, k, v = (torch.randn(sum(n), H, D, generator=g).to(dev, dtype).requires_grad_()
                   for n in (lq, lk, lk))
        flops = 4.0 * sum(a * b for a, b in zip(lq, lk)) * D * H
        impls, tensors = attention_impls(q, k, v, lq, lk, dev)
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
                print(f"skipping {impl} on {name}: {type(e).__name__}: {str(e).splitlines()[0]}")
                continue
            with torch.no_grad():
                ms = measure(fn)
            rows.append(dict(kernel="attention", case=name, impl=impl, mode="fwd", ms=ms,
                             tflops=flops / ms / 1e9))
            ms = measure(fwd_bwd)
            rows.append(dict(kernel="attention", case=name, impl=impl, mode="fwd+bwd", ms=ms,
                             tflops=3.5 * flops / ms / 1e9))
            if impl == "triton":  # the configs autotuning chose for this case's shape class
                tuned = tuned_configs(max(lq), max(lk))
                rows[-2]["tuned"] = rows[-1]["tuned"] = tuned
                print(f"{name}: shape class {tuned['class']}, tuned {tuned}")
        del q, k, v, tensors, impls
    return rows


def tuned_configs(max_q, max_k):
    """Shape class of a call and the config each attention kernel runs with for it (the
    autotuner's pick on a GPU; the single interpreter config otherwise)."""
    from kernels import _config
    from kernels import attention as KA
    out = {"class": _config.attention_class(max_q, max_k)}
    for name, kern in (("fwd", KA._fwd_kernel), ("dkdv", KA._dkdv_kernel), ("dq", KA._dq_kernel)):
        cfg = getattr(kern, "best_config", None) or kern.configs[0]
        out[name] = dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def bench_patch_embed(quick, dtype, dev, measure):
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
    rows = []
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
            rows.append(dict(kernel="patch_embed", case=case, impl=impl, mode="fwd", ms=ms,
                             tflops=flops / ms / 1e9))
            ms = measure(fwd_bwd)
            rows.append(dict(kernel="patch_embed", case=case, impl=impl, mode="fwd+bwd", ms=ms,
                             tflops=2 * flops / ms / 1e9))
    return rows


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
    rows = bench_attention(args.quick, dtype, dev, measure)
    rows += bench_patch_embed(args.quick, dtype, dev, measure)
    rat = ratios(rows)
    print("| kernel | case | impl | mode | ms | TFLOP/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['case']} | {r['impl']} | {r['mode']} | {r['ms']:.3f} | "
              f"{r['tflops']:.3g} |")
    print("| kernel | case | mode | triton vs | speedup |\n|---|---|---|---|---|")
    for r in rat:
        print(f"| {r['kernel']} | {r['case']} | {r['mode']} | {r['vs']} | {r['speedup']:.2f}x |")
    path = write_json(Path(args.out) / "bench_kernels.json", {
        "benchmark": "bench_kernels", "machine": info, "interpreted": INTERPRETED,
        "device": dev, "dtype": str(dtype).replace("torch.", ""), "config": vars(args),
        "note": "times under the Triton interpreter mean nothing" if INTERPRETED else "",
        "results": rows, "ratios": rat})
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
