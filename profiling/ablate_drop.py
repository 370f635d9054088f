"""The drop-ratio trade-off: the real trainer, the same step budget, several patch drop ratios.

For each ratio R it runs

    python hvfm/train.py --deepspeed ds_configs/z2.json --drop-ratio R --max-steps N \\
                         --output-dir RUNS/rR [any other train.py flags you pass]

one after the other, reads each run's summary.json and reports, per ratio: training wall time,
tokens/s (kept video + text tokens per second per device), samples/s, the final loss, and the
evaluation after training -- text-to-video R@1 with all frames, temporal accuracy with all frames
and with one frame (where the evaluation set has temporal groups: the synthetic corpus does).

    python profiling/ablate_drop.py [--ratios 0 0.25 0.5 0.75 0.9] [--steps 30]
                                    [--deepspeed ds_configs/z2.json] [--out profiling/results]
                                    [train.py flags, e.g. --train-csv C --video-root D
                                     --eval-json E --eval-video-root F --frames 8 --workers 4]

Flags this script does not know go to train.py unchanged, so the same command ablates your own
data. With no data flags the trainer uses its built-in synthetic corpus and the tiny preset.
Default budget: 30 steps per ratio, which measures the time side in minutes on CPU (on 2 shared
cores about 2-5 minutes per ratio with 8 frames, evaluation included; `--frames 4` halves it) but
leaves the accuracies near chance; the trainer's built-in budget is 600 steps (--steps 600), where
the accuracies mean something (about an hour per ratio on such a CPU, minutes on a GPU). Runs are sequential, so unlike bench_train the times are not interleaved: compare them on a
quiet machine. Writes ablate_drop.json, ablate_drop.md and ablate_drop.png (when matplotlib is
installed) into --out; each run's folder and log stay under --runs-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling.machine import (RESULTS, describe, machine_info, markdown_table, pyplot,  # noqa: E402
                               run_logged, write_json, write_markdown)

FLUSH_DENORMAL = ("import runpy, sys, torch; torch.set_flush_denormal(True); sys.argv = sys.argv[1:]; "
                  "runpy.run_path(sys.argv[0], run_name='__main__')")
OWNED = ("--drop-ratio", "--max-steps", "--output-dir", "--deepspeed", "--resume")


def run_dir_name(ratio):
    return "r" + str(ratio).replace(":", "-")


def train_command(args, ratio, out_dir, extra):
    log_every = [] if any(f.split("=")[0] == "--log-every" for f in extra) else ["--log-every", "1"]
    # --flush-denormal: the trainer with torch.set_flush_denormal(True) set first (see README)
    launch = [sys.executable, "-c", FLUSH_DENORMAL] if args.flush_denormal else [sys.executable]
    return [*launch, str(ROOT / "hvfm" / "train.py"), "--deepspeed", args.deepspeed,
            "--drop-ratio", str(ratio), "--max-steps", str(args.steps), "--output-dir", str(out_dir),
            "--seed", str(args.seed), *log_every, *extra]


def child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        import torch
        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if not cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):  # each run is a world of its own
        env.pop(k, None)
    return env


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def step_times(metrics_csv):
    """Per logged step: data wait + compute seconds, from the trainer's metrics.csv (or [])."""
    import csv
    try:
        with open(metrics_csv) as f:
            return [float(r["data_s"]) + float(r["step_s"]) for r in csv.DictReader(f)
                    if r.get("step_s") not in (None, "")]
    except (OSError, KeyError, ValueError):
        return []


def read_run(summary, ratio, seconds, log, metrics_csv=None):
    ev = summary.get("eval", {})
    row = {"drop": ratio, "ok": True, "log": str(log), "process_s": seconds,
           "steps": summary.get("steps"), "wall_s": summary.get("wall_s"),
           "samples_per_s": summary.get("samples_per_s"),
           "tokens_per_s": summary.get("tokens_per_s_per_device"),
           "final_loss": _get(summary, "last_losses", "loss"),
           "precision": summary.get("precision"), "attn": summary.get("attn")}
    for when in ("before", "after"):
        row[f"{when}_t2v_r1"] = _get(ev, when, "all_frames", "t2v_r1")
        row[f"{when}_temporal_acc"] = _get(ev, when, "all_frames", "temporal_acc")
        row[f"{when}_temporal_acc_one_frame"] = _get(ev, when, "one_frame", "temporal_acc")
    row["temporal_chance"] = _get(ev, "after", "all_frames", "temporal_chance")
    # The median step is robust to bursts of load on a shared machine; the wall time is not.
    times = step_times(metrics_csv) if metrics_csv else []
    row["median_step_ms"] = 1e3 * float(np.median(times)) if times else None
    if times and row["tokens_per_s"] and row["wall_s"] and row["steps"]:
        tokens_per_step = row["tokens_per_s"] * row["wall_s"] / row["steps"]
        row["tokens_per_s_median_step"] = tokens_per_step / (row["median_step_ms"] / 1e3)
    else:
        row["tokens_per_s_median_step"] = None
    return row


def run_ratio(args, ratio, runs_dir, extra, env):
    out_dir = runs_dir / run_dir_name(ratio)
    log = runs_dir / f"{run_dir_name(ratio)}.log"
    cmd = train_command(args, ratio, out_dir, extra)
    print(f"drop {ratio}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    rc = run_logged(cmd, log, env, args.timeout)
    seconds = time.perf_counter() - start
    summary_file = out_dir / "summary.json"
    if rc != 0 or not summary_file.exists():
        tail = log.read_text()[-1500:]
        print(f"drop {ratio}: train.py failed ({rc}); last lines of {log}:\n{tail}", flush=True)
        return {"drop": ratio, "ok": False, "returncode": rc, "log": str(log), "process_s": seconds,
                "log_tail": tail}
    row = read_run(json.loads(summary_file.read_text()), ratio, seconds, log, out_dir / "metrics.csv")
    print(f"drop {ratio}: {row['wall_s']:.1f} s training, {row['tokens_per_s']:.0f} tokens/s, "
          f"R@1 {row['after_t2v_r1']}, temporal {row['after_temporal_acc']} "
          f"(1 frame {row['after_temporal_acc_one_frame']})", flush=True)
    return row


def fmt(x, pct=False):
    return None if x is None else (f"{x:.1f}" if pct else x)


def table(rows):
    body = []
    for r in rows:
        if not r["ok"]:
            body.append([r["drop"], f"failed ({r['returncode']})"] + [None] * 8)
            continue
        body.append([r["drop"], r["steps"], r["wall_s"], r.get("median_step_ms"), r["tokens_per_s"],
                     r.get("tokens_per_s_median_step"), r["final_loss"], fmt(r["after_t2v_r1"], True),
                     fmt(r["after_temporal_acc"]), fmt(r["after_temporal_acc_one_frame"])])
    return markdown_table(["drop", "steps", "train s", "median step ms", "tokens/s",
                           "tokens/s at median step", "final loss", "t2v R@1 %", "temporal acc",
                           "temporal acc (1 frame)"], body)


def plot(payload, path):
    plt = pyplot()
    rows = [r for r in payload["results"] if r["ok"]]
    if plt is None or not rows:
        return None
    x = np.array([float(str(r["drop"]).split(":")[0]) for r in rows])
    labels = [str(r["drop"]) for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("after_t2v_r1", "t2v R@1 (%, /100)", "o"),
                               ("after_temporal_acc", "temporal acc, all frames", "s"),
                               ("after_temporal_acc_one_frame", "temporal acc, 1 frame", "^")):
        ys = [r[key] for r in rows]
        if all(y is None for y in ys):
            continue
        ys = [np.nan if y is None else (y / 100 if key.endswith("r1") else y) for y in ys]
        a1.plot(x, ys, marker=marker, label=label)
    chance = rows[-1].get("temporal_chance")
    if chance:
        a1.axhline(chance, color="gray", ls=":", label="temporal chance")
    a1.set_xlabel("drop ratio")
    a1.set_ylabel("accuracy after training")
    a1.set_title(f"accuracy, {payload['config']['steps']} steps each")
    a1.legend(fontsize=8)
    a2.bar(range(len(rows)), [r["wall_s"] for r in rows], color="tab:gray", label="training wall s")
    a2.set_xticks(range(len(rows)), labels)
    a2.set_xlabel("drop ratio")
    a2.set_ylabel("training wall time (s)")
    robust = all(r.get("median_step_ms") for r in rows)
    if robust:
        a2.plot(range(len(rows)), [r["median_step_ms"] * r["steps"] / 1e3 for r in rows], "k_",
                markersize=30, mew=2, label="steps x median step")
    a2.legend(fontsize=8, loc="upper center")
    tw = a2.twinx()
    key = "tokens_per_s_median_step" if robust else "tokens_per_s"
    tw.plot(range(len(rows)), [r[key] for r in rows], "o-", color="tab:green")
    tw.set_ylabel("tokens/s per device" + (" (median step)" if robust else ""), color="tab:green")
    a2.set_title("time for the same step budget")
    fig.suptitle(f"drop-ratio ablation on {payload['machine']['gpu'] or payload['machine']['cpu']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(payload, out):
    """ablate_drop.md (table + notes) and the plot, from the payload."""
    cfg, rows, info = payload["config"], payload["results"], payload["machine"]
    extra = cfg["train_args"]
    notes = [f"each ratio: `hvfm/train.py --deepspeed {Path(cfg['deepspeed']).name} --max-steps "
             f"{cfg['steps']} {' '.join(extra)}`" + ("" if extra else " (built-in synthetic corpus, tiny preset)")
             + ("; run with torch.set_flush_denormal(True) (--flush-denormal)" if cfg.get("flush_denormal") else ""),
             "train s = the trainer's training-loop wall time (evaluation excluded); tokens/s = "
             "kept video + text tokens per second per device over that time; median step ms = the "
             "median of the logged steps' data wait + compute (robust to bursts of load on a shared "
             "machine), and tokens/s at median step = the mean tokens per step / that median",
             "accuracies: the trainer's evaluation after training (t2v R@1 with all frames; "
             "temporal accuracy with all frames and with one frame)",
             "runs are sequential, not interleaved: times are comparable on a quiet machine only"]
    write_markdown(Path(out) / "ablate_drop.md", "ablate_drop: the drop-ratio trade-off", info, table(rows), notes)
    return plot(payload, Path(out) / "ablate_drop.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Unknown flags are passed to hvfm/train.py.")
    ap.add_argument("--ratios", nargs="+", default=["0", "0.25", "0.5", "0.75", "0.9"],
                    help="drop ratios (numbers or lo:hi ranges)")
    ap.add_argument("--steps", type=int, default=30, help="training steps per ratio")
    ap.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "z2.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    ap.add_argument("--flush-denormal", action="store_true",
                    help="run the trainer with torch.set_flush_denormal(True) (CPU: early steps "
                         "can otherwise be 20x slower on subnormal floats)")
    ap.add_argument("--runs-dir", help="where the runs go (default: RESULTS/tmp/ablate_drop-<time>)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for ablate_drop.json/.md/.png")
    args, extra = ap.parse_known_args(argv)
    clash = [f for f in extra if f.split("=")[0] in OWNED]
    if clash:
        ap.error(f"{', '.join(clash)}: set by this script (use --ratios/--steps/--runs-dir/--deepspeed)")
    runs_dir = Path(args.runs_dir or RESULTS / "tmp" / time.strftime("ablate_drop-%Y%m%d-%H%M%S"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {describe(info)}")
    env = child_env()
    rows = []
    payload = {"benchmark": "ablate_drop", "machine": info, "config": {**vars(args), "train_args": extra},
               "runs_dir": str(runs_dir), "results": rows}
    out = Path(args.out)
    for ratio in args.ratios:
        rows.append(run_ratio(args, ratio, runs_dir, extra, env))
        write_json(out / "ablate_drop.json", payload)
    png = write_report(payload, out)
    print(table(rows))
    print(f"wrote {out / 'ablate_drop.json'}" + (f", {png}" if png else ""))
    if not all(r["ok"] for r in rows):
        sys.exit(1)
    return payload


if __name__ == "__main__":
    main()
