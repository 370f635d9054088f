"""How far `kernels.varlen_attention` is from exact, as numbers: forward and backward against a
float64 reference, beside torch's own attention in the same precision against the same reference.

    python profiling/gpu_kernel_errors.py [--out DIR] [--dtypes bf16 fp16]

Cases on CUDA (12 heads of 64, the trainer's shapes): ViT-B video self-attention (4 clips keeping
U[0.1, 0.5] of 8x196 patches, + CLS), long self-attention (4096 and 3001 tokens: the autotuner's
long class at 4k), fusion cross-attention (captions of 5-77 queries over 160-1500 video keys:
the short-query tiles, BLOCK_M 16/32), causal text self-attention (5-77 tokens, both short).
Per case and dtype: the max |error| of out, dq, dk, dv of the Triton kernel against float64
(the same inputs, per sequence, torch's math attention), and the same of torch's
scaled_dot_product_attention run per sequence in that dtype; `ok` when the kernel's error is at
most 2x torch's + 1e-3 * max|reference| (flash-attention's criterion, with a floor for values
that round to zero). On a CPU: tiny shapes, fp32, under the Triton interpreter (the code path,
not the GPU's rounding). Writes kernel_errors.json into --out after every case; exit 1 if a case
is not ok. The assertions live in tests/test_kernels_*.py; this reports the numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
if not CUDA:  # must precede the first import of kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from profiling.machine import machine_info, write_json  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases():
    """(name, query lengths, key lengths, causal, heads, head dim)."""
    g = torch.Generator().manual_seed(0)
    if CUDA:
        keep = (0.1 + 0.4 * torch.rand(4, generator=g)).tolist()
        video = [1 + round(r * 8 * 196) for r in keep]
        words = [5, 20, 45, 77]
        return [("vit_b_video_self", video, video, False, 12, 64),
                ("long_self_4k", [4096, 3001], [4096, 3001], False, 12, 64),
                ("fusion_cross_short_q", words, [160, 800, 1500, 300], False, 12, 64),
                ("text_causal", words, words, True, 12, 64)]
    return [("video_self", [37, 70], [37, 70], False, 2, 32),
            ("fusion_cross_short_q", [5, 17], [40, 70], False, 2, 32),
            ("text_causal", [5, 17], [5, 17], True, 2, 32)]


def per_sequence(q, k, v, lq, lk, causal):
    """torch attention, one sequence at a time (q/k/v packed (total, H, D)); (L, L) causal masks
    are the usual top-left ones, the same as bottom-right when Lq == Lk (the only causal case)."""
    outs, sq, sk = [], 0, 0
    for a, b in zip(lq, lk):
        x = [t.transpose(0, 1)[None] for t in (q[sq:sq + a], k[sk:sk + b], v[sk:sk + b])]
        outs.append(F.scaled_dot_product_attention(*x, is_causal=causal)[0].transpose(0, 1))
        sq, sk = sq + a, sk + b
    return torch.cat(outs)


def run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}


def measure(name, lq, lk, causal, H, D, dtype, dev):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(n), H, D, generator=g, dtype=torch.float64) for n in (lq, lk, lk))
    do = torch.randn(sum(lq), H, D, generator=g, dtype=torch.float64)
    cu = [torch.tensor([0, *lens], device=dev).cumsum(0).to(torch.int32) for lens in (lq, lk)]
    ref = run(lambda a, b, c: per_sequence(a, b, c, lq, lk, causal), *(t.to(dev) for t in (q, k, v, do)))
    low = [t.to(dev, dtype) for t in (q, k, v, do)]
    tri = run(lambda a, b, c: kernels.varlen_attention(a, b, c, cu[0], cu[1], max(lq), max(lk), causal=causal),
              *low)
    tor = run(lambda a, b, c: per_sequence(a, b, c, lq, lk, causal), *low)
    rows = {}
    for key in ("out", "dq", "dk", "dv"):
        r = ref[key].detach()
        e_tri = float((tri[key].detach().double() - r).abs().max())
        e_tor = float((tor[key].detach().double() - r).abs().max())
        bound = 2 * e_tor + 1e-3 * float(r.abs().max())
        rows[key] = dict(triton=e_tri, torch=e_tor, ratio=e_tri / e_tor if e_tor else None, bound=bound,
                         ok=bool(e_tri <= bound))
    return dict(case=name, dtype=str(dtype).replace("torch.", ""), causal=causal, heads=H, head_dim=D,
                q_lens=lq, k_lens=lk, errors=rows, ok=all(x["ok"] for x in rows.values()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".", help="folder for kernel_errors.json")
    ap.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp16"] if CUDA else ["fp32"])
    args = ap.parse_args(argv)
    dev = "cuda" if CUDA else "cpu"
    payload = {"benchmark": "kernel_errors", "machine": machine_info(), "device": dev,
               "interpreted": os.environ.get("TRITON_INTERPRET") == "1",
               "criterion": "triton max|err| <= 2 * torch max|err| + 1e-3 * max|reference|, vs float64",
               "results": [], "complete": False}
    out = Path(args.out) / "kernel_errors.json"
    for dt in args.dtypes:
        for case in cases():
            r = measure(*case, DTYPES[dt], dev)
            payload["results"].append(r)
            write_json(out, payload)
            print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['case']} {r['dtype']}: " + ", ".join(
                f"{k} {e['triton']:.2e} (torch {e['torch']:.2e})" for k, e in r["errors"].items()), flush=True)
    payload["complete"] = True
    payload["ok"] = all(r["ok"] for r in payload["results"])
    write_json(out, payload)
    print(f"{'PASS' if payload['ok'] else 'FAIL'}: wrote {out}")
    return 0 if payload["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
