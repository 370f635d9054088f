"""What VTM re-ranking costs against plain evaluation, in one process, runs alternated.

    python profiling/bench_rerank.py --checkpoint RUN/final [--ann TEST.json --video-root DIR]
                                     [--k 16] [--repeats 3] [--warmup 1] [--frames 8] [--out profiling/results]

After `--warmup` untimed plain calls, each repeat runs `hvfm.evaluate.main` once plain and once
with `--rerank-k K` (same checkpoint, annotations and frames; the order alternates between
repeats so that warm caches favour neither).
Without --ann it evaluates on the built-in test split. Reports the wall time of each call, the
median ratio rerank / plain, and R@1 of both. Writes bench_rerank.json and .md into --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from profiling.machine import (RESULTS, describe, machine_info, markdown_table,  # noqa: E402
                               write_json, write_markdown)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--ann", help="annotations (default: the built-in test split)")
    ap.add_argument("--video-root")
    ap.add_argument("--k", type=int, default=16, help="re-ranked candidates")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed plain calls first (caches)")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    from hvfm.evaluate import main as evaluate
    if args.ann is None:
        from hvfm.data.synthetic.clips import ensure_corpus
        corpus = ensure_corpus(workers=os.cpu_count())
        args.ann, args.video_root = str(corpus.test_json), str(corpus.test_root)
    base = ["--checkpoint", args.checkpoint, "--ann", args.ann, "--video-root", args.video_root,
            "--frames", str(args.frames), "--workers", str(args.workers)]
    info = machine_info()
    print(f"machine: {describe(info)}", flush=True)
    for _ in range(args.warmup):  # the first call pays for imports, page cache and kernels
        evaluate(base)
    runs = []
    for r in range(args.repeats):
        for k in ((0, args.k) if r % 2 == 0 else (args.k, 0)):
            t0 = time.perf_counter()
            m = evaluate(base + (["--rerank-k", str(k)] if k else []))
            s = time.perf_counter() - t0
            runs.append({"repeat": r, "k": k, "seconds": s, "t2v_r1": m["t2v_r1"],
                         "v2t_r1": m["v2t_r1"]})
            print(f"repeat {r}, k={k}: {s:.1f} s, t2v R@1 {m['t2v_r1']:.1f}, v2t R@1 "
                  f"{m['v2t_r1']:.1f}", flush=True)
    ratios = [next(x["seconds"] for x in runs if x["repeat"] == r and x["k"]) /
              next(x["seconds"] for x in runs if x["repeat"] == r and not x["k"])
              for r in range(args.repeats)]
    summary = {"ratio_median": float(np.median(ratios)), "ratios": ratios}
    payload = {"benchmark": "bench_rerank", "machine": info, "config": vars(args),
               "runs": runs, "summary": summary}
    out = Path(args.out)
    write_json(out / "bench_rerank.json", payload)
    rows = [[x["repeat"], x["k"] or "plain", f"{x['seconds']:.1f}", f"{x['t2v_r1']:.1f}",
             f"{x['v2t_r1']:.1f}"] for x in runs]
    write_markdown(out / "bench_rerank.md", "bench_rerank: VTM re-ranking against plain evaluation",
                   info, markdown_table(["repeat", "k", "seconds", "t2v R@1", "v2t R@1"], rows),
                   notes=[f"rerank / plain, median over repeats: {summary['ratio_median']:.2f}x "
                          f"({', '.join(f'{x:.2f}' for x in ratios)})",
                          "each call loads the model, decodes the videos and encodes everything: "
                          "the ratio is what a user pays for --rerank-k"])
    print(f"rerank k={args.k} / plain: {summary['ratio_median']:.2f}x (median of {args.repeats})")
    return payload


if __name__ == "__main__":
    main()
