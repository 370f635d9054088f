"""Project the time of one WebVid-10M epoch on N GPUs from the measured rates: which side bounds?

Training rate: samples/s per device of the fused path (and of the unfused baseline, for
comparison) from bench_train.json, per drop ratio measured. Decode rate: clips/s per CPU loader
worker from bench_data.json -- its tar-shard rows when it measured them (the format a WebVid-scale
run streams), else its one-file-per-clip rows; the 1-worker row when present, else the best
clips/s per worker; --decode-source picks -- times --workers-per-gpu. The output names the figure
used. With N GPUs the epoch takes

    clips / min(N * train samples/s per device, N * workers per GPU * decode clips/s per worker)

and the smaller term names the bound: "training" (the GPUs: faster kernels, more GPUs) or
"decode" (the loaders: more CPU workers per GPU, faster disks, pre-decoded frames). Scaling is taken as linear in N (the
gradient all-reduce and the input pipeline's own limits beyond one node are not modelled).
On a CPU-only machine bench_train's "device" is the CPU, so the table reads "N devices like this".
A "paper check" line puts the data side against the paper's figure (one WebVid-10M epoch on 8
GPUs in less than a day): the epoch the loaders alone allow, and the workers per GPU a day needs.

    python profiling/project_epoch.py [--results profiling/results] [--train-json F]
                                      [--data-json F] [--workers-per-gpu 8] [--gpus 1 8 64]
                                      [--clips 10.7e6] [--decode-rate CLIPS_PER_S_PER_WORKER]
                                      [--decode-source auto|shards|files]
Writes project_epoch.json and project_epoch.md beside the inputs (or into --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling.machine import RESULTS, machine_info, markdown_table, write_json, write_markdown  # noqa: E402

WEBVID_CLIPS = 10.7e6
PAPER_GPUS, PAPER_HOURS = 8, 24.0  # the paper: one WebVid-10M epoch on 8 GPUs in less than a day


def decode_rate(data, source="auto"):
    """(clips/s per worker, which figure) from a bench_data payload. source "auto": the shards
    rows when there are any (the format a WebVid-scale run streams), else the files rows; within
    them the 1-worker row, else the best clips/s per worker. Rows of older payloads carry no
    source: they are "files"."""
    rows = [r for r in data["results"] if r.get("clips_per_s")]
    if source == "auto":
        source = "shards" if any(r.get("source") == "shards" for r in rows) else "files"
    rows = [r for r in rows if r.get("source", "files") == source]
    if not rows:
        raise SystemExit(f"bench_data.json has no measured rows of source {source!r}; rerun "
                         f"profiling/bench_data.py or pick --decode-source")
    one = [r for r in rows if r["workers"] == 1]
    if one:
        return one[0]["clips_per_s"], f"{source}, 1 worker"
    best = max(rows, key=lambda r: r["clips_per_s"] / max(r["workers"], 1))
    return best["clips_per_s"] / max(best["workers"], 1), f"{source}, {best['workers']} workers, per worker"


def project(train, per_worker, workers_per_gpu, gpus, clips):
    rows = []
    for d in train["results"]:
        fused, unfused = d["fused"]["samples_per_s"], d["unfused"]["samples_per_s"]
        for n in gpus:
            train_rate = n * fused
            data_rate = n * workers_per_gpu * per_worker
            rate = min(train_rate, data_rate)
            rows.append(dict(drop=d["drop"], gpus=n, train_clips_per_s=train_rate,
                             decode_clips_per_s=data_rate, bound="training" if train_rate <= data_rate else "decode",
                             epoch_hours=clips / rate / 3600,
                             gpu_only_epoch_hours=clips / train_rate / 3600,
                             unfused_epoch_hours=clips / min(n * unfused, data_rate) / 3600))
    return rows


def paper_check(per_worker, source, workers_per_gpu, clips, gpus=PAPER_GPUS, hours=PAPER_HOURS):
    """The data side of the paper's claim (one WebVid-10M epoch on 8 GPUs in less than a day):
    the epoch the loaders alone allow at the measured decode rate, and the loader workers per GPU
    that a day needs."""
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
    ap.add_argument("--results", default=str(RESULTS), help="folder holding the two JSON files")
    ap.add_argument("--train-json", help="bench_train.json (default: RESULTS/bench_train.json)")
    ap.add_argument("--data-json", help="bench_data.json (default: RESULTS/bench_data.json)")
    ap.add_argument("--workers-per-gpu", type=int, default=8,
                    help="loader worker processes (CPU cores) per GPU")
    ap.add_argument("--decode-rate", type=float, help="clips/s per worker (instead of bench_data)")
    ap.add_argument("--decode-source", default="auto", choices=["auto", "shards", "files"],
                    help="which bench_data figure: auto = shards when measured, else files")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--clips", type=float, default=WEBVID_CLIPS, help="clips in one epoch")
    ap.add_argument("--out", help="folder for project_epoch.json/.md (default: --results)")
    args = ap.parse_args(argv)
    res = Path(args.results)
    train_file = Path(args.train_json or res / "bench_train.json")
    try:
        train = json.loads(train_file.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {train_file}: no training rate to project from ({type(e).__name__}); run "
                 f"profiling/bench_train.py --out {train_file.parent} first, or give --train-json")
    if not train.get("results"):
        sys.exit(f"error: {train_file}: bench_train had measured no drop ratio yet "
                 f"({train.get('progress', 'no progress recorded')}); nothing to project")
    notes = []
    if train.get("partial"):
        notes.append(f"{train_file.name} is partial ({train.get('progress')}): the drop ratios "
                     f"bench_train had measured when it was cut short")
    if args.decode_rate:
        per_worker, source, data = args.decode_rate, "--decode-rate", None
    else:
        data_file = Path(args.data_json or res / "bench_data.json")
        if not data_file.exists() and not args.data_json and (RESULTS / "bench_data.json").exists():
            data_file = RESULTS / "bench_data.json"
            notes.append(f"decode rate from {data_file} (measured on another machine's CPU)")
        data = json.loads(data_file.read_text())
        per_worker, source = decode_rate(data, args.decode_source)
        shown = data_file.resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        notes.append(f"decode figure used: {per_worker:.3g} clips/s per worker, bench_data's "
                     f"{source} row ({shown}; {data.get('data') or 'data not recorded'}; "
                     f"measured on {data['machine']['cpu']})")
        if source.startswith("shards") and any(r.get("source", "files") == "files" for r in data["results"]):
            other, other_source = decode_rate(data, "files")
            o = paper_check(other, other_source, args.workers_per_gpu, args.clips)
            notes.append(f"for comparison, one file per clip ({other_source}: {other:.3g} clips/s per "
                         f"worker): the loaders alone would need {o['data_bound_epoch_hours']:.3g} h per "
                         f"epoch on 8 GPUs ({o['workers_per_gpu_for_a_day']:.3g} workers per GPU for a day)")
        tc, dc = train["config"], data["config"]
        if (tc["frames"], tc["size"]) != (dc["frames"], dc["size"]):
            notes.append(f"bench_data decoded {dc['frames']} frames at {dc['size']} px, bench_train "
                         f"trained on {tc['frames']} frames at {tc['size']} px: rerun one to match")
    rows = project(train, per_worker, args.workers_per_gpu, args.gpus, args.clips)
    device = train["machine"]["gpu"] or f"{train['machine']['cpu']} (CPU)"
    paper = paper_check(per_worker, source, args.workers_per_gpu, args.clips)
    payload = {"benchmark": "project_epoch", "machine": machine_info(), "config": vars(args),
               "train_source": str(train_file), "train_device": device,
               "train_config": {k: train["config"][k] for k in ("preset", "frames", "size", "batch")},
               "decode_clips_per_s_per_worker": per_worker, "decode_source": source,
               "data_machine": data["machine"]["cpu"] if data else None, "paper_check": paper,
               "notes": notes, "results": rows}
    out = Path(args.out or res)
    path = write_json(out / "project_epoch.json", payload)
    body = markdown_table(
        ["drop", "GPUs" if train["machine"]["gpu"] else "devices (CPUs like this one)", "train clips/s", "decode clips/s", "bound", "epoch h", "epoch h if data were free",
         "epoch h unfused"],
        [[r["drop"], r["gpus"], r["train_clips_per_s"], r["decode_clips_per_s"], r["bound"],
          r["epoch_hours"], r["gpu_only_epoch_hours"], r["unfused_epoch_hours"]] for r in rows])
    tcfg = payload["train_config"]
    notes = [f"{args.clips / 1e6:.1f}M clips per epoch; training rate: bench_train's fused samples/s "
             f"per device on {device} ({tcfg['preset']}, {tcfg['frames']} frames x {tcfg['size']} px, "
             f"batch {tcfg['batch']}); decode: {per_worker:.2f} clips/s per worker ({source}) x "
             f"{args.workers_per_gpu} workers per GPU",
             "linear scaling in the number of GPUs assumed", paper["line"]] + notes
    write_markdown(out / "project_epoch.md", "project_epoch: one WebVid-10M epoch", train["machine"],
                   body, notes)
    print(body)
    for n in notes:
        print(f"- {n}")
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
