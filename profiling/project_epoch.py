"""Project one WebVid-10M epoch on N GPUs (8 x H100 by default): which side bounds it, and how long?

The two rates are taken at the same frames and frame size (bench_data's), so that they describe
the same clips:

  decode   clips/s per CPU loader worker from bench_data.json (rows marked "loaded" never count):
           --decode-source auto = the fastest shard format measured, else one mp4 per clip with
           decord; the 1-worker row, else the best per-worker row. Times --workers-per-gpu.
  training clips/s per GPU, from the first of:
             1. --train-json (any bench_train.json; a CPU one reads "devices like this one");
             2. the latest GPU bench_train result at those frames and size: bench_train.json under
                --results (recursively) or inside a gpu_check_logs.tar.gz there, whose machine
                has a GPU (latest by its recorded date);
             3. the FLOP count of one training step (profiling/bench_train.py's `train_flops`,
                the --preset model at those frames and size, each --drop, captions of
                --text-tokens, the trainer's default reversed-clip pass) at --mfu of the
                --gpu's dense bf16 peak.
The epoch takes clips / min(N x training rate, N x workers per GPU x decode rate); the smaller
term names the bound. Linear scaling in N is assumed. The goal line compares the 8-GPU epoch with
--goal-hours (8 h: the paper's "less than a day" divided by three).

    python profiling/project_epoch.py [--results profiling/results] [--data-json F]
                                      [--train-json F] [--gpus 8] [--workers-per-gpu 13]
                                      [--mfu 0.4] [--gpu H100] [--drop 0.5] [--goal-hours 8]
                                      [--decode-source auto|files|shards-mp4|shards-jpg|shards-webp]
                                      [--decode-rate CLIPS_PER_S_PER_WORKER] [--allow-loaded]
Writes project_epoch.json and project_epoch.md into --out (default: --results).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling.machine import RESULTS, machine_info, markdown_table, write_json, write_markdown  # noqa: E402

WEBVID_CLIPS = 10.7e6
PAPER_GPUS, PAPER_HOURS = 8, 24.0  # the paper: one WebVid-10M epoch on 8 GPUs in less than a day
GOAL_HOURS = 8.0  # the paper's day divided by three
# DGX H100: 112 cores for 8 GPUs -> the --workers default there, 112 // 8 - 1
DEFAULT_WORKERS_PER_GPU = 13


def _source(row):
    s = row.get("source", "files")
    return "shards-mp4" if s == "shards" else s  # payloads before formats: "shards" was mp4


def usable_rows(data, allow_loaded=False):
    """bench_data rows with a rate, not loaded (unless allow_loaded)."""
    return [r for r in data["results"] if r.get("clips_per_s_per_worker")
            and (allow_loaded or not r.get("loaded"))]


def decode_rate(data, source="auto", allow_loaded=False):
    """(clips/s per worker, which figure) from a bench_data payload. source "auto": the fastest
    shard format measured (per worker), else files (decord when measured); within the source the
    1-worker row, else the best per-worker row. Loaded rows are not figures: left out."""
    rows = usable_rows(data, allow_loaded)
    if not rows:
        raise SystemExit("error: bench_data.json has no row measured below the load limit (every row is "
                         "LOADED); rerun profiling/bench_data.py on a quiet machine, or pass --allow-loaded "
                         "to project from loaded figures anyway")

    def per_worker(r):
        return r["clips_per_s_per_worker"]

    if source == "auto":
        shards = [r for r in rows if _source(r).startswith("shards")]
        source = _source(max(shards, key=per_worker)) if shards else "files"
    mine = [r for r in rows if _source(r) == source]
    if source == "files" and any(r.get("decoder") == "decord" for r in mine):
        mine = [r for r in mine if r.get("decoder") == "decord"]
    if not mine:
        raise SystemExit(f"error: bench_data.json has no measured rows of source {source!r}; rerun "
                         f"profiling/bench_data.py --sources {source} or pick --decode-source")
    one = [r for r in mine if r["workers"] == 1]
    best = max(one or mine, key=per_worker)
    what = f"{source}" + (f" ({best['decoder']})" if best.get("decoder") else "")
    what += ", 1 worker" if best["workers"] == 1 else f", {best['workers']} workers, per worker"
    if best.get("loaded"):
        what += f", LOADED (load {best.get('load', 0):.1f}): not a figure"
    return per_worker(best), what


# ----------------------------------------------------------------------------- training rate

def _payloads(results):
    """(where, bench_train payload) of every bench_train.json under `results`, and of those in
    its gpu_check_logs.tar.gz files."""
    results = Path(results)
    for p in sorted(results.rglob("bench_train.json")):
        try:
            yield str(p), json.loads(p.read_text())
        except (OSError, ValueError):
            continue
    for t in sorted(results.rglob("gpu_check_logs.tar.gz")):
        try:
            with tarfile.open(t) as tar:
                for m in tar:
                    if m.isfile() and m.name.endswith("bench_train.json"):
                        yield f"{t}:{m.name}", json.load(io.TextIOWrapper(tar.extractfile(m)))
        except (OSError, tarfile.TarError, ValueError):
            continue


def latest_gpu_result(results, frames, size):
    """(where, payload) of the latest GPU bench_train result at `frames` x `size`, else None."""
    found = []
    for where, d in _payloads(results):
        cfg, machine = d.get("config") or {}, d.get("machine") or {}
        if machine.get("gpu") and d.get("results") and (cfg.get("frames"), cfg.get("size")) == (frames, size):
            found.append((machine.get("date") or "", where, d))
    if not found:
        return None
    _, where, d = max(found, key=lambda x: (x[0], x[1]))
    return where, d


def flops_per_clip(preset, frames, size, drop, text_tokens=20, mask_ratio=0.5, batch=32, reverse=1.0,
                   fusion_layers=2):
    """Training FLOPs of one clip (one step of `batch` clips / batch) of the trainer's model: the
    --preset CLIP towers, a fusion encoder of `fusion_layers` at the text width, the motion channel,
    the reversed-clip pass, VTC + VTM + MLM (profiling/bench_train.py's `train_flops`)."""
    from hvfm.model.clip import PRESETS
    from profiling.bench_train import ModelShape, train_flops
    p = PRESETS[preset]
    vw, vl, _, patch, _ = p["vision"]
    tw, tl, _ = p["text"]
    shape = ModelShape(v_width=vw, v_layers=vl, v_mlp=4 * vw, patch=patch, channels=3, t_width=tw,
                       t_layers=tl, t_mlp=4 * tw, f_width=tw, f_layers=fusion_layers, f_mlp=4 * tw,
                       proj=p["projection"], vocab=49408, motion=True)
    tokens = frames * (size // patch) ** 2
    kept = max(1, round(tokens * (1 - drop)))
    video = [kept + 1] * batch
    text = [text_tokens] * batch
    masked = round(mask_ratio * (text_tokens - 2)) * batch
    return train_flops(shape, video, text, masked, reverse=reverse)["total"] / batch


def mean_drop(drop):
    lo, _, hi = str(drop).partition(":")
    return (float(lo) + float(hi)) / 2 if hi else float(lo)


def read_train_json(path):
    """A bench_train payload with at least one measured drop ratio, else one error line."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: no training rate to project from ({type(e).__name__}); run "
                 f"profiling/bench_train.py --out {Path(path).parent} first, or leave --train-json out "
                 f"(the latest GPU result, else the FLOP count)")
    if not d.get("results"):
        sys.exit(f"error: {path}: bench_train had measured no drop ratio yet "
                 f"({d.get('progress', 'no progress recorded')}); nothing to project")
    return d


def training_rates(args, frames, size, notes):
    """(rates [(drop, fused clips/s per GPU, unfused or None)], what, device)."""
    if args.train_json:
        found = (args.train_json, read_train_json(args.train_json))
    else:
        found = latest_gpu_result(args.results, frames, size)
        if found is None and Path(args.results).resolve() != RESULTS.resolve():
            found = latest_gpu_result(RESULTS, frames, size)
    if found is not None:
        where, d = found
        cfg = d["config"]
        if (cfg.get("frames"), cfg.get("size")) != (frames, size):
            notes.append(f"{where} trained {cfg.get('frames')} frames x {cfg.get('size')} px, the decode rate is "
                         f"for {frames} x {size}: the projection mixes two clip sizes")
        if d.get("partial"):
            notes.append(f"{where} is partial ({d.get('progress')})")
        device = d["machine"].get("gpu") or f"{d['machine'].get('cpu')} (CPU: devices like this one)"
        rates = [(r["drop"], r["fused"]["samples_per_s"], (r.get("unfused") or {}).get("samples_per_s"))
                 for r in d["results"]]
        shown = Path(where.split(":")[0]).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown.name
        tail = where[len(where.split(":")[0]):]
        return rates, f"measured: bench_train {shown}{tail} ({cfg.get('preset')}, batch {cfg.get('batch')})", device
    from profiling.bench_train import gpu_peak_tflops
    peak = gpu_peak_tflops(args.gpu)
    if peak is None:
        raise SystemExit(f"error: --gpu {args.gpu}: no known dense bf16 peak; name one of H100, H200, "
                         f"A100, B200, L40S")
    rates = []
    for drop in args.drop:
        f = flops_per_clip(args.preset, frames, size, mean_drop(drop), args.text_tokens)
        rates.append((drop, args.mfu * peak * 1e12 / f, None))
        notes.append(f"drop {drop}: {f / 1e12:.2f} TFLOP per training clip ({args.preset}, {frames} x {size} px, "
                     f"reversed pass, VTC+VTM+MLM)")
    where = Path(args.results).resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where.name
    return rates, (f"FLOP count at {args.mfu:.0%} MFU of {args.gpu} ({peak:g} TFLOP/s bf16): no GPU "
                   f"bench_train result at {frames} frames x {size} px under {where}"), args.gpu


def project(rates, per_worker, workers_per_gpu, gpus, clips):
    rows = []
    for drop, fused, unfused in rates:
        for n in gpus:
            train_rate = n * fused
            data_rate = n * workers_per_gpu * per_worker
            rate = min(train_rate, data_rate)
            rows.append(dict(drop=drop, gpus=n, train_clips_per_s=train_rate, decode_clips_per_s=data_rate,
                             bound="training" if train_rate <= data_rate else "decode",
                             epoch_hours=clips / rate / 3600, gpu_only_epoch_hours=clips / train_rate / 3600,
                             unfused_epoch_hours=clips / min(n * unfused, data_rate) / 3600 if unfused else None,
                             workers_per_gpu_needed=train_rate / n / per_worker))
    return rows


def paper_check(per_worker, source, workers_per_gpu, clips, gpus=PAPER_GPUS, hours=PAPER_HOURS):
    """The data side of the paper's claim (one WebVid-10M epoch on 8 GPUs in less than a day)."""
    data_hours = clips / (gpus * workers_per_gpu * per_worker) / 3600
    need = clips / (hours * 3600) / gpus / per_worker
    line = (f"paper check (WebVid-10M on {gpus} GPUs in less than a day): at {per_worker:.3g} clips/s "
            f"per worker ({source}) and {workers_per_gpu} workers per GPU the loaders alone need "
            f"{data_hours:.3g} h per epoch ({'within' if data_hours < hours else 'NOT within'} a day); "
            f"a day needs >= {need:.3g} workers per GPU at that rate")
    return {"gpus": gpus, "hours": hours, "decode_source": source,
            "decode_clips_per_s_per_worker": per_worker, "workers_per_gpu": workers_per_gpu,
            "data_bound_epoch_hours": data_hours, "workers_per_gpu_for_a_day": need, "line": line}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", default=str(RESULTS), help="folder searched for bench_data.json and GPU "
                                                            "bench_train results")
    ap.add_argument("--train-json", help="a bench_train.json to take the training rate from")
    ap.add_argument("--data-json", help="bench_data.json (default: RESULTS/bench_data.json)")
    ap.add_argument("--workers-per-gpu", type=int, default=DEFAULT_WORKERS_PER_GPU,
                    help="loader worker processes (CPU cores) per GPU (default: a DGX H100's 112 cores "
                         "/ 8 GPUs - 1)")
    ap.add_argument("--decode-rate", type=float, help="clips/s per worker (instead of bench_data)")
    ap.add_argument("--frames", type=int, help="with --decode-rate: the frames it was measured at (default 8)")
    ap.add_argument("--size", type=int, help="with --decode-rate: the frame side (default 224)")
    ap.add_argument("--decode-source", default="auto",
                    choices=["auto", "files", "shards-mp4", "shards-jpg", "shards-webp", "shards"],
                    help="which bench_data figure: auto = the fastest shard format measured, else files")
    ap.add_argument("--allow-loaded", action="store_true",
                    help="project from rows bench_data marked LOADED (not figures; said in the output)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[8])
    ap.add_argument("--gpu", default="H100", help="GPU of the FLOP-count rate (its dense bf16 peak)")
    ap.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation of the FLOP-count rate")
    ap.add_argument("--preset", default="vit-b16", help="model of the FLOP-count rate")
    ap.add_argument("--drop", nargs="+", default=["0.5"], help="patch drop ratios of the FLOP-count rate")
    ap.add_argument("--text-tokens", type=int, default=20, help="caption length of the FLOP-count rate")
    ap.add_argument("--clips", type=float, default=WEBVID_CLIPS, help="clips in one epoch")
    ap.add_argument("--goal-hours", type=float, default=GOAL_HOURS)
    ap.add_argument("--out", help="folder for project_epoch.json/.md (default: --results)")
    args = ap.parse_args(argv)
    if args.decode_source == "shards":
        args.decode_source = "shards-mp4"
    res = Path(args.results)
    notes, data = [], None
    if args.train_json:  # a bad one is one error line before anything else is read
        read_train_json(args.train_json)
    if args.decode_rate:
        per_worker, source = args.decode_rate, "--decode-rate"
        frames, size = args.frames or 8, args.size or 224
    else:
        data_file = Path(args.data_json or res / "bench_data.json")
        try:
            data = json.loads(data_file.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"error: {data_file}: no decode rate ({type(e).__name__}); run profiling/bench_data.py "
                     f"--out {data_file} first, or give --data-json / --decode-rate")
        per_worker, source = decode_rate(data, args.decode_source, args.allow_loaded)
        frames, size = data["config"]["frames"], data["config"]["size"]
        if "LOADED" in source:
            notes.append("the decode figure was measured on a LOADED machine (--allow-loaded): not a figure")
        shown = data_file.resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown.name
        notes.append(f"decode figure used: {per_worker:.3g} clips/s per worker, bench_data's {source} row "
                     f"({shown}; {data.get('data') or 'data not recorded'}; measured on {data['machine']['cpu']})")
        if not source.startswith("files"):
            try:
                other, other_source = decode_rate(data, "files", args.allow_loaded)
                o = paper_check(other, other_source, args.workers_per_gpu, args.clips)
                notes.append(f"for comparison, one mp4 per clip ({other_source}: {other:.3g} clips/s per "
                             f"worker): the loaders alone would need {o['data_bound_epoch_hours']:.3g} h per "
                             f"epoch on 8 GPUs")
            except SystemExit:
                pass
    rates, train_what, device = training_rates(args, frames, size, notes)
    rows = project(rates, per_worker, args.workers_per_gpu, args.gpus, args.clips)
    paper = paper_check(per_worker, source, args.workers_per_gpu, args.clips)
    eight = [r for r in rows if r["gpus"] == 8] or [r for r in rows if r["gpus"] == max(args.gpus)]
    verdicts = [f"{r['gpus']} x {device}, drop {r['drop']}, {frames} frames x {size} px: {r['epoch_hours']:.2f} h "
                f"per epoch, {r['bound']}-bound (training {r['train_clips_per_s']:,.0f} clips/s, decode "
                f"{r['decode_clips_per_s']:,.0f} clips/s); goal {args.goal_hours:g} h: "
                f"{'met' if r['epoch_hours'] < args.goal_hours else 'NOT met'}"
                + ("" if r["bound"] == "training" else
                   f" (the GPUs need {r['workers_per_gpu_needed']:.1f} workers per GPU at this decode rate)")
                for r in eight]
    payload = {"benchmark": "project_epoch", "machine": machine_info(), "config": vars(args),
               "frames": frames, "size": size, "train_source": train_what, "train_device": device,
               "decode_clips_per_s_per_worker": per_worker, "decode_source": source,
               "data_machine": data["machine"]["cpu"] if data else None, "paper_check": paper,
               "goal_hours": args.goal_hours, "verdicts": verdicts, "notes": notes, "results": rows}
    out = Path(args.out or res)
    path = write_json(out / "project_epoch.json", payload)
    fmt = lambda x: "-" if x is None else x  # noqa: E731
    body = markdown_table(
        ["drop", "GPUs", "train clips/s", "decode clips/s", "bound", "epoch h", "epoch h if data were free",
         "epoch h unfused"],
        [[r["drop"], r["gpus"], r["train_clips_per_s"], r["decode_clips_per_s"], r["bound"], r["epoch_hours"],
          r["gpu_only_epoch_hours"], fmt(r["unfused_epoch_hours"])] for r in rows])
    lines = verdicts + [f"{args.clips / 1e6:.1f}M clips per epoch, {frames} frames x {size} px on both sides; "
                        f"training rate: {train_what}; decode: {per_worker:.2f} clips/s per worker ({source}) "
                        f"x {args.workers_per_gpu} workers per GPU", "linear scaling in the number of GPUs assumed",
                        paper["line"]] + notes
    write_markdown(out / "project_epoch.md", "project_epoch: one WebVid-10M epoch", payload["machine"], body, lines)
    print(body)
    for n in lines:
        print(f"- {n}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
