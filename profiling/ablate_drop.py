"""Ablations of the method's choices with the real trainer, harvesting from the built-in image CLIP.

Studies (each run is `hvfm/train.py` on its built-in default: the video corpus, post-pretrained
from the built-in image CLIP, which is built once and cached; flags you add go to every run):

- drop:    patch drop ratio 0 / 0.5 / 0.75 / 0.9 at equal steps (`--epochs`);
- time:    the same ratios at equal training wall time: each ratio gets the steps that fit in
           the time the 0.5 run took, from its own median step time in the drop study (so every
           run completes its LR schedule);
- mask:    MLM mask ratio 0 against 0.5 (drop 0.5): does MLM help VTM and multiple choice?
- reverse: reversed-clip negatives for none, half or all of the batch: accuracy against step time.
- temporal: how time gets in: the temporal embedding's LR multiplier 100 against 10, and the
           motion channel (local flow) on against off.

Runs with the same flags are run once and shared by the studies (the base: drop 0.5, mask 0.5,
all clips reversed). Per run it reports the training wall time, the median step, tokens/s, the
final VTM loss against its prior, and after training: t2v R@1, temporal accuracy for motion and
order with all frames and with one frame, and multiple choice among the captions of each clip's
temporal group (the same objects in every motion or order) by similarity and by VTM.

    python profiling/ablate_drop.py [--studies drop time mask reverse] [--epochs 1]
        [--ratios 0 0.5 0.75 0.9] [--out profiling/results] [train.py flags]

On this project's 2-core CPU one epoch of the built-in corpus (250 steps of 16 clips, 8 frames)
takes 3-8 minutes per run by drop ratio, evaluation included: about 50 minutes for all studies.
Runs are sequential, so compare times on a quiet machine. Writes ablate_drop.json, ablate_drop.md
and ablate_drop.png (when matplotlib is installed) into --out; run folders and logs stay under
--runs-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling.machine import (RESULTS, describe, machine_info, markdown_table, pyplot,  # noqa: E402
                               run_logged, write_json, write_markdown)

OWNED = ("--drop-ratio", "--mask-ratio", "--reverse-negatives", "--no-reverse-negatives",
         "--temporal-lr-mult", "--motion-channel", "--no-motion-channel",
         "--max-steps", "--epochs", "--output-dir", "--deepspeed", "--resume")
STUDIES = ("drop", "time", "mask", "reverse", "temporal")
BASE = {"--drop-ratio": "0.5", "--mask-ratio": "0.5", "--reverse-negatives": "1",
        "--temporal-lr-mult": "100", "--motion-channel": None}  # None: a flag without a value
VTM_PRIOR = 0.5623  # cross-entropy of 1 positive in 4 pairs (positive, 2 hard negatives, reversed)


def variants(study, ratios):
    """(label, flags) of one study's runs; flags override BASE."""
    if study == "drop":
        return [(f"drop {r}", {"--drop-ratio": r}) for r in ratios]
    if study == "mask":
        return [(f"mask {m}", {"--mask-ratio": m}) for m in ("0", "0.5")]
    if study == "reverse":
        return [(f"reverse {f}", {"--reverse-negatives": f}) for f in ("0", "0.5", "1")]
    if study == "temporal":
        return [("temporal LR x100, motion channel", {}),
                ("temporal LR x10", {"--temporal-lr-mult": "10"}),
                ("no motion channel", {"--motion-channel": None, "--no-motion-channel": None})]
    raise ValueError(study)


def _full(flags):
    full = {**BASE, **flags}
    if "--no-motion-channel" in full:
        full.pop("--motion-channel", None)
    return full


def key_of(flags):
    return "_".join(f"{k.strip('-').replace('-', '')}{'' if v is None else v}"
                    for k, v in sorted(_full(flags).items()))


def flag_list(flags):
    return [x for k, v in _full(flags).items() for x in ((k,) if v is None else (k, v))]


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


def mc_file(test_json, out):
    """Multiple choice among each test clip's temporal group: the options are the captions of
    its group (every motion, or both orders, of the same objects), the answer its own."""
    entries = json.loads(Path(test_json).read_text())
    groups = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e["caption"])
    mc = [{"video": e["video"], "options": groups[e["group"]],
           "answer": groups[e["group"]].index(e["caption"]), "kind": e.get("kind")} for e in entries]
    Path(out).write_text(json.dumps(mc))
    return out


def _last_json(log):
    try:
        return json.loads(Path(log).read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def evaluate_mc(final, mc, video_root, by, env, log):
    earlier = _last_json(log)
    if isinstance(earlier, dict) and "mc_acc" in earlier:
        return earlier["mc_acc"]
    cmd = [sys.executable, "-m", "hvfm.evaluate", "--checkpoint", str(final), "--ann", str(mc),
           "--video-root", str(video_root), "--frames", "8", "--mc-by", by, "--workers", "1"]
    rc = run_logged(cmd, log, env)
    if rc != 0:
        return None
    return json.loads(Path(log).read_text().strip().splitlines()[-1])["mc_acc"]


def run_one(args, label, flags, extra, env, runs_dir, steps=None, test=None):
    name = key_of(flags) + (f"_steps{steps}" if steps else "")
    out_dir, log = runs_dir / name, runs_dir / f"{name}.log"
    full = _full(flags)
    schedule = ["--max-steps", str(steps)] if steps else ["--epochs", str(args.epochs)]
    cmd = [sys.executable, str(ROOT / "hvfm" / "train.py"), "--deepspeed", args.deepspeed,
           *flag_list(flags), *schedule, "--output-dir", str(out_dir),
           "--log-every", "1", "--seed", str(args.seed), *extra]
    summary_file = out_dir / "summary.json"
    if summary_file.exists() and (out_dir / "final").is_dir():
        print(f"{label}: finished earlier in {out_dir}, read back", flush=True)
        rc, seconds = 0, None
    else:
        if out_dir.exists():  # an interrupted run: start it again from step 0
            shutil.rmtree(out_dir)
        print(f"{label}: {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = run_logged(cmd, log, env, args.timeout)
        seconds = time.perf_counter() - start
    if rc != 0 or not summary_file.exists():
        tail = log.read_text()[-1500:]
        print(f"{label}: train.py failed ({rc}); last lines of {log}:\n{tail}", flush=True)
        return {"label": label, "flags": full, "ok": False, "returncode": rc, "log": str(log)}
    s = json.loads(summary_file.read_text())
    ev = s.get("eval", {})
    times = step_times(out_dir / "metrics.csv")
    row = {"label": label, "flags": full, "ok": True, "log": str(log), "process_s": seconds,
           "steps": s["steps"], "wall_s": s["wall_s"], "tokens_per_s": s["tokens_per_s_per_device"],
           "median_step_ms": 1e3 * float(np.median(times)) if times else None,
           "final_vtm": _get(s, "last_losses", "vtm"), "final_loss": _get(s, "last_losses", "loss")}
    for view in ("all_frames", "one_frame"):
        sfx = "" if view == "all_frames" else "_1f"
        row["t2v_r1" + sfx] = _get(ev, "after", view, "t2v_r1")
        row["motion" + sfx] = _get(ev, "after", view, "temporal_acc_motion")
        row["order" + sfx] = _get(ev, "after", view, "temporal_acc_order")
    if test is not None:
        for by in ("sim", "vtm"):
            row[f"mc_{by}"] = evaluate_mc(out_dir / "final", test["mc"], test["root"], by, env,
                                          runs_dir / f"{name}.mc_{by}.log")
    print(f"{label}: {row['steps']} steps in {row['wall_s']:.0f} s, R@1 {row['t2v_r1']}, motion "
          f"{row['motion']}, order {row['order']}, VTM {row['final_vtm']}", flush=True)
    return row


def fmt(x, digits=3):
    return None if x is None else round(x, digits)


def table(rows):
    body = []
    for r in rows:
        if not r["ok"]:
            body.append([r["study"], r["label"], f"failed ({r['returncode']})"] + [None] * 11)
            continue
        body.append([r["study"], r["label"], r["steps"], fmt(r["wall_s"], 0), fmt(r["median_step_ms"], 0),
                     fmt(r["tokens_per_s"], 0), fmt(r["t2v_r1"], 1), fmt(r["motion"]), fmt(r["order"]),
                     f"{fmt(r['motion_1f'])} / {fmt(r['order_1f'])}", fmt(r["final_vtm"]),
                     fmt(r.get("mc_sim"), 1), fmt(r.get("mc_vtm"), 1)])
    return markdown_table(["study", "run", "steps", "train s", "median step ms", "tokens/s",
                           "t2v R@1 %", "motion", "order", "1 frame motion / order",
                           f"final VTM loss (prior {VTM_PRIOR})", "MC by sim %", "MC by VTM %"], body)


def plot(payload, path):
    plt = pyplot()
    rows = [r for r in payload["results"] if r["ok"]]
    if plt is None or not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    a1, a2, a3 = axes
    for study, ls in (("drop", "-"), ("time", "--")):
        sr = [r for r in rows if r["study"] == study]
        if not sr:
            continue
        x = [float(r["flags"]["--drop-ratio"]) for r in sr]
        what = "equal steps" if study == "drop" else "equal time"
        a1.plot(x, [r["order"] for r in sr], "s" + ls, color="tab:blue", label=f"order, {what}")
        a1.plot(x, [r["motion"] for r in sr], "^" + ls, color="tab:red", label=f"motion, {what}")
        a1.plot(x, [r["t2v_r1"] / 100 for r in sr], "o" + ls, color="tab:green", label=f"t2v R@1/100, {what}")
        if study == "drop":
            a2.bar(range(len(sr)), [r["wall_s"] for r in sr], color="tab:gray")
            a2.set_xticks(range(len(sr)), [str(v) for v in x])
            a2.set_xlabel("drop ratio")
            a2.set_ylabel(f"training wall time, {sr[0]['steps']} steps (s)")
    a1.axhline(0.25, color="tab:red", ls=":", lw=0.8)
    a1.axhline(0.5, color="tab:blue", ls=":", lw=0.8)
    a1.set_xlabel("drop ratio")
    a1.set_ylabel("after training (dotted: chance)")
    a1.legend(fontsize=7)
    a1.set_title("accuracy against drop ratio")
    a2.set_title("time for the same steps")
    other = [r for r in rows if r["study"] in ("mask", "reverse")]
    if other:
        xs = range(len(other))
        a3.bar([i - 0.2 for i in xs], [r["final_vtm"] or 0 for r in other], 0.4, label="final VTM loss")
        a3.bar([i + 0.2 for i in xs], [(r.get("mc_vtm") or 0) / 100 for r in other], 0.4, label="MC by VTM")
        a3.axhline(VTM_PRIOR, color="k", ls=":", lw=0.8, label="VTM prior")
        a3.set_xticks(list(xs), [r["label"] for r in other], rotation=20, fontsize=8)
        tw = a3.twinx()
        tw.plot(list(xs), [r["median_step_ms"] or np.nan for r in other], "ko-", label="median step ms")
        tw.set_ylabel("median step (ms)")
        a3.legend(fontsize=7, loc="upper left")
        a3.set_title("MLM mask ratio and reversed negatives")
    fig.suptitle(f"ablations on {payload['machine']['gpu'] or payload['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(payload, out):
    cfg, rows, info = payload["config"], payload["results"], payload["machine"]
    notes = [f"each run: `hvfm/train.py --deepspeed {Path(cfg['deepspeed']).name} "
             f"--epochs {cfg['epochs']} {' '.join(cfg['train_args'])}` on the built-in default (video "
             f"corpus, from the built-in image CLIP) plus the run's flags; base: drop 0.5, mask 0.5, "
             f"every clip also reversed, temporal LR x100, motion channel on",
             "time: each drop ratio trained for the steps that fit, at its own median step time, "
             "in the training time of the drop-0.5 run",
             "accuracies after training on the built-in test split, 8 frames (1 frame where said); "
             "chance: motion 0.25, order 0.5",
             "MC: each test clip's caption among the captions of its temporal group, picked by "
             "similarity or by VTM match probability (chance 37.5%: groups of 4 and 2)",
             "runs are sequential, not interleaved: times are comparable on a quiet machine only"]
    write_markdown(Path(out) / "ablate_drop.md", "ablate_drop: drop ratio, mask ratio, reversed negatives",
                   info, table(rows), notes)
    return plot(payload, Path(out) / "ablate_drop.png")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 epilog="Unknown flags are passed to hvfm/train.py.")
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=STUDIES)
    ap.add_argument("--ratios", nargs="+", default=["0", "0.5", "0.75", "0.9"], help="drop ratios")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per run (equal-step studies)")
    ap.add_argument("--deepspeed", default=str(ROOT / "ds_configs" / "z2.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per run")
    ap.add_argument("--runs-dir", help="where the runs go (default: RESULTS/tmp/ablate-<time>); "
                    "runs already finished there are read back, so an interrupted ablation "
                    "continues where it stopped")
    ap.add_argument("--out", default=str(RESULTS), help="folder for ablate_drop.json/.md/.png")
    args, extra = ap.parse_known_args(argv)
    clash = [f for f in extra if f.split("=")[0] in OWNED]
    if clash:
        ap.error(f"{', '.join(clash)}: set by this script (use --studies/--ratios/--epochs/--runs-dir)")
    if "time" in args.studies and ("drop" not in args.studies or "0.5" not in args.ratios):
        ap.error("the time study needs the drop study with ratio 0.5 (its time budget)")
    runs_dir = Path(args.runs_dir or RESULTS / "tmp" / time.strftime("ablate-%Y%m%d-%H%M%S"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"machine: {describe(info)}")
    env = child_env()
    test = None
    if "--eval-json" not in extra:
        from hvfm.data.synthetic.clips import ensure_corpus
        corpus = ensure_corpus(workers=os.cpu_count())
        test = {"mc": mc_file(corpus.test_json, runs_dir / "test_mc.json"), "root": corpus.test_root}
    rows, done = [], {}
    payload = {"benchmark": "ablate_drop", "machine": info, "config": {**vars(args), "train_args": extra},
               "runs_dir": str(runs_dir), "results": rows}
    out = Path(args.out)

    def record(study, label, flags, steps=None):
        key = (key_of(flags), steps)
        if key not in done:
            done[key] = run_one(args, label, flags, extra, env, runs_dir, steps, test)
        rows.append({**done[key], "study": study, "label": label})
        write_json(out / "ablate_drop.json", payload)
        return done[key]

    for study in args.studies:
        if study == "time":
            drops = {r["flags"]["--drop-ratio"]: r for r in rows if r["study"] == "drop" and r["ok"]}
            budget_s = drops["0.5"]["wall_s"]
            for ratio, r in drops.items():
                steps = r["steps"] if ratio == "0.5" else int(budget_s / (r["median_step_ms"] / 1e3))
                record("time", f"drop {ratio}, {budget_s:.0f} s", {"--drop-ratio": ratio},
                       None if ratio == "0.5" else steps)
            continue
        for label, flags in variants(study, args.ratios):
            record(study, label, flags)
    png = write_report(payload, out)
    print(table(rows))
    print(f"wrote {out / 'ablate_drop.json'}" + (f", {png}" if png else ""))
    if not all(r["ok"] for r in rows):
        sys.exit(1)
    return payload


if __name__ == "__main__":
    main()
