"""What teaches time, measured with the real trainer (issue 20): the caption-swap term's weight in
the image stage and in the video stage, each run evaluated with 95% intervals.

Studies (each run is `hvfm/train.py` on the built-in corpora, a world of one; flags after `--`
go to every run):

- stage1: the built-in image stage (stills) at `--swap-weight W` for every weight and seed. Per
  run, on held-out stills: own caption against its mirrored twin (place left-right, top-bottom,
  relations) and against its recoloured twin (colour), from `hvfm.evaluate.evaluate_probes`, and
  text-to-image R@1 on the test stills; each with its 95% bootstrap interval.
- stage2: the harvest on the built-in clips from one image CLIP (`--clip`, default the stage-1 run
  at `--pick` weight, seed 0) with the term in the video stage at each weight: motion and order
  accuracy (all frames and one frame), t2v / v2t R@1, each with its interval, the final VTM
  loss against its prior, and the image CLIP's row.

- heldout: the issue's held-out protocol: stage 2 from that image CLIP with the video stage's
  default recipe on the clips of another seed (`--corpus-seed`), trained on as a user's data
  (`--train-csv`, 2 epochs, 8 frames) and evaluated on their test split, the image CLIP's row
  beside it.

- attribution: what each of hvfm's additions to the paper's recipe brings, alone and all
  together, 2 seeds each (stage 2 seed S from the stage-1 runs of seed S): the caption-swap term
  in the image stage (the image CLIP at `--pick` against weight 0), reversed-clip negatives,
  the motion channel, the temporal embedding's LR multiplier (x100 against x1), and the term in
  the video stage (weight 0.1). The base has none of them.

Runs are the same whatever the machine's load: steps are fixed (`--max-minutes` far out of
reach) and the precision is given (`--precision`, bf16 by default). `--jobs 2` runs two at a
time, `--threads` each; a run folder with a finished summary is reused, so a study can be
extended or resumed.

    python profiling/ablate_time.py stage1 --weights 0 0.05 0.1 0.2 0.5 --seeds 0 1 --jobs 2
    python profiling/ablate_time.py stage2 --pick 0.2 --weights 0 0.1 0.2 --jobs 2
    python profiling/ablate_time.py heldout --pick 0.2 --corpus-seed 1
    python profiling/ablate_time.py attribution --seeds 0 1 --jobs 2
    python profiling/ablate_time.py report            # tables from the runs so far

On this project's 2-core CPU a stage-1 run (1,200 steps of 64 stills, one thread) takes 10-13
minutes, a stage-2 run (2 epochs of the 4,000 clips) 10-15. Writes ablate_time.json and
ablate_time.md into --out; run folders and logs stay under --runs-dir.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from profiling.machine import RESULTS, machine_info, markdown_table, run_logged, write_json, write_markdown  # noqa: E402

VTM_PRIOR = 0.5623  # cross-entropy of 1 positive in 4 pairs (positive, 2 hard negatives, reversed)
PROBE_KINDS = ("place_lr", "place_tb", "relation", "colour")
HELDOUT = "ho"  # the heldout study's runs: ho{corpus seed}_s2_...
WEIGHTS = {"stage1": [0.0, 0.05, 0.1, 0.2, 0.5], "stage2": [0.0, 0.1, 0.2]}  # heldout: the default


def run_name(stage, weight, seed, tag=None, variant=None):
    """s1_w{weight}_seed{seed}; stage 2: s2_{tag of the image CLIP}_w{weight}_seed{seed}; a
    variant of the recipe or the data (its own table rows) goes first: {variant}_s1_..."""
    return f"{variant + '_' if variant else ''}s{stage}_{tag + '_' if tag else ''}w{weight:g}_seed{seed}"


def parse_name(name, with_variant=False):
    """(stage, tag, weight, seed) of a run folder's name, (+ variant) with `with_variant`."""
    m = re.fullmatch(r"(?:(?P<v>(?!s[12]_)[a-z][a-z0-9]*)_)?s(?P<stage>[12])_(?:(?P<tag>.+)_)?"
                     r"w(?P<w>[0-9.e-]+)_seed(?P<s>\d+)", name)
    if m is None:
        return None
    out = (int(m["stage"]), m["tag"], float(m["w"]), int(m["s"]))
    return out + (m["v"],) if with_variant else out


# (name, uses the swap-trained image CLIP, stage-2 flags); the base: none of the additions
ADDITIONS = (("swap term in stage 1", True, []),
             ("reversed-clip negatives", False, ["--reverse-negatives", "1"]),
             ("motion channel", False, ["--motion-channel"]),
             ("temporal LR x100", False, ["--temporal-lr-mult", "100"]),
             ("swap term in stage 2", False, ["--swap-weight", "0.1"]))
BASE = ["--reverse-negatives", "0", "--no-motion-channel", "--temporal-lr-mult", "1",
        "--swap-weight", "0"]


def attribution_variants():
    """(label, tag, uses the swap-trained image CLIP, flags): the base, each addition alone, all."""
    out = [("base: VTC + VTM + MLM, none of the additions", "base", False, BASE)]
    for i, (name, swap_clip, flags) in enumerate(ADDITIONS):
        out.append((f"+ {name}", f"add{i}", swap_clip, BASE + flags))
    every = BASE + [x for _, _, f in ADDITIONS for x in f]
    out.append(("all together", "all", True, every))
    # the additions interact (the term in stage 1 gives the video stage words to align; the LR
    # multiplier lets the temporal embedding move): the one taken out of all of them is the first
    out.append((f"all but the {ADDITIONS[0][0]}", "allbut0", False, every))
    return out


def child_env(threads):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):  # each run is a world of its own
        env.pop(k, None)
    return env


def finished(out):
    return (Path(out) / "summary.json").is_file() and (Path(out) / "final").is_dir()


def train(out, flags, args):
    """One training run into `out` (reused when it finished before); returns (out, exit code)."""
    out = Path(out)
    if finished(out):
        return out, 0
    if out.exists():  # an interrupted run: start it again (the runs are short)
        import shutil
        shutil.rmtree(out)
    cmd = [sys.executable, "hvfm/train.py", "--deepspeed", args.deepspeed, "--precision",
           args.precision, "--max-minutes", "100000", "--output-dir", str(out), *flags, *args.extra]
    print(f"run {out.name}: {' '.join(cmd[1:])}", flush=True)
    code = run_logged(cmd, out.parent / f"{out.name}.log", env=child_env(args.threads))
    print(f"run {out.name}: exit {code}", flush=True)
    return out, code


def heldout_flags(corpus_seed):
    """Data flags of the heldout study: the built-in generator's clips of another seed (generated
    once into the hvfm cache), trained on as a user's data (2 epochs, 8 frames) and evaluated on
    their own test split."""
    from hvfm.data.synthetic.clips import ensure_corpus
    c = ensure_corpus(seed=corpus_seed, workers=os.cpu_count(), progress=True)
    return ["--epochs", "2", "--frames", "8", "--train-csv", str(c.train_csv), "--video-root",
            str(c.train_root), "--eval-json", str(c.test_json), "--eval-video-root", str(c.test_root)]


def run_all(jobs, args):
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        return list(pool.map(lambda j: train(*j, args), jobs))


# ----------------------------------------------------------------------------- evaluation
def stage1_eval(out, seed):
    """Probe stills and test stills of a finished stage-1 run (cached in OUT/ablate_eval.json; a
    cache from before the image tower's diagnostics is computed again)."""
    cache = Path(out) / "ablate_eval.json"
    if cache.is_file():
        res = json.loads(cache.read_text())
        if all("image_spread" in p for p in res["probes"].values()):
            return res
    import torch
    from hvfm.data import read_annotations
    from hvfm.data.synthetic.stills import ensure_images, ensure_probes
    from hvfm.data.text.tokens import clean_caption
    from hvfm.evaluate import evaluate, evaluate_probes, load_checkpoint
    torch.manual_seed(0)
    model, tokenizer, _ = load_checkpoint(Path(out) / "final")
    model.eval()
    stills = ensure_images(seed=seed)
    test = read_annotations(stills / "images_test.json", stills, clean=clean_caption)
    r = evaluate(model, tokenizer, test, frames=1, size=96)
    res = {"probes": evaluate_probes(model, tokenizer, ensure_probes(seed=seed), size=96),
           "t2i_r1": r["t2v_r1"], "t2i_r1_ci": r["t2v_r1_ci"], "i2t_r1": r["v2t_r1"],
           "i2t_r1_ci": r["v2t_r1_ci"]}
    cache.write_text(json.dumps(res, indent=1))
    return res


def _ci(x, ci, fmt=".2f", scale=1.0):
    if x is None:
        return "-"
    if not ci:
        return f"{x * scale:{fmt}}"
    return f"{x * scale:{fmt}} [{ci[0] * scale:{fmt}}, {ci[1] * scale:{fmt}}]"


def finished_runs(runs_dir, stage):
    """(folder, (stage, tag, weight, seed, variant) of its name, its summary) of each finished
    run of `stage`, variants included."""
    for out in sorted(Path(runs_dir).glob(f"*s{stage}_*_seed*")):
        name = parse_name(out.name, with_variant=True)
        if finished(out) and name is not None and name[0] == stage:
            yield out, name, json.loads((out / "summary.json").read_text())


def vtm_tail(out, summary, steps=50):
    """The VTM loss over a run's last `steps` steps (mean of the metrics.csv rows logged there),
    or the summary's last logged value when the run has no metrics.csv."""
    import csv
    path = Path(out) / "metrics.csv"
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("vtm") not in (None, "")]
        if rows:
            last = int(rows[-1]["step"])
            tail = [float(r["vtm"]) for r in rows if int(r["step"]) > last - steps]
            return sum(tail) / len(tail)
    return summary.get("last_losses", {}).get("vtm")


def run_flags(out):
    """The flags of a run folder (its run_config.json), {} when it has none."""
    cfg = Path(out) / "run_config.json"
    return json.loads(cfg.read_text()).get("args", {}) if cfg.is_file() else {}


def variant_label(out, variant, stage=2):
    """What a variant run changed, from its own flags where it can tell."""
    if not variant:
        return ""
    from hvfm.config import BUILTIN_IMAGE
    flags = run_flags(out)
    said = [f"--{k.replace('_', '-')} {flags[k]:g}" for k in ("mirror_negatives", "vtm_hardness")
            if flags.get(k)]
    if stage == 1 and flags.get("max_steps") not in (None, BUILTIN_IMAGE["max_steps"]):
        said.append(f"--max-steps {flags['max_steps']}")
    if variant.startswith(HELDOUT) and variant[len(HELDOUT):].isdigit():
        said.insert(0, f"corpus seed {variant[len(HELDOUT):]}")
    return ", ".join(said) or variant


def stage1_rows(runs_dir):
    rows = [{"run": out.name, "weight": weight, "seed": seed, "variant": variant_label(out, v, 1),
             "steps": s["steps"], "wall_min": s["wall_s"] / 60, **stage1_eval(out, seed)}
            for out, (_, _, weight, seed, v), s in finished_runs(runs_dir, 1)]
    return sorted(rows, key=lambda r: (r["variant"], r["weight"], r["seed"]))


def stage2_rows(runs_dir):
    rows = [{"run": out.name, "weight": weight, "seed": seed, "clip": tag,
             "variant": variant_label(out, v), "steps": s["steps"],
             "wall_min": s["wall_s"] / 60, "vtm_loss": vtm_tail(out, s),
             "before": s["eval"].get("before"), "after": s["eval"].get("after")}
            for out, (_, tag, weight, seed, v), s in finished_runs(runs_dir, 2)]
    return sorted(rows, key=lambda r: (r["variant"], r["clip"], r["weight"], r["seed"]))


def attribution_rows(runs_dir):
    rows = []
    for label, tag, _, _ in attribution_variants():
        for out in sorted(Path(runs_dir).glob(f"attr_{tag}_seed*")):
            if not finished(out):
                continue
            s = json.loads((out / "summary.json").read_text())
            rows.append({"run": out.name, "variant": label, "seed": int(out.name.rsplit("seed", 1)[1]),
                         "steps": s["steps"], "wall_min": s["wall_s"] / 60,
                         "vtm_loss": vtm_tail(out, s),
                         "after": s["eval"].get("after")})
    return rows


def attribution_table(rows):
    head = ["variant", "seed", "motion", "order", "1-frame motion", "1-frame order", "t2v R@1",
            "v2t R@1", f"VTM loss, last 50 steps (prior {VTM_PRIOR})"]
    body = []
    for r in rows:
        a, o = r["after"]["all_frames"], r["after"].get("one_frame", {})
        body.append([r["variant"], str(r["seed"]), _kind(a, "motion"), _kind(a, "order"),
                     _kind(o, "motion"), _kind(o, "order"),
                     _ci(a["t2v_r1"], a.get("t2v_r1_ci"), ".1f"), _ci(a["v2t_r1"], a.get("v2t_r1_ci"), ".1f"),
                     "-" if r["vtm_loss"] is None else f"{r['vtm_loss']:.3f}"])
    return markdown_table(head, body)


def _probe_read(p):
    acc = p.get("image_probe_acc")
    return "-" if acc is None else f"{acc:.2f}"


def stage1_table(rows):
    head = ["swap weight", "variant", "seed", "steps", "place l-r", "place t-b", "relation",
            "colour", "caption / image spread: place l-r, relation",
            "place l-r: image probe (chance 0.5)", "t2i R@1", "i2t R@1", "train min"]
    body = []
    for r in rows:
        p = r["probes"]
        spread = ", ".join(f"{p[k]['caption_spread']:.2f} / {p[k].get('image_spread', float('nan')):.2f}"
                           for k in ("place_lr", "relation"))
        body.append([f"{r['weight']:g}", r.get("variant") or "-", str(r["seed"]), str(r["steps"]),
                     *[_ci(p[k]["own_vs_alt"], p[k]["own_vs_alt_ci"]) for k in PROBE_KINDS],
                     spread, _probe_read(p["place_lr"]),
                     _ci(r["t2i_r1"], r["t2i_r1_ci"], ".1f"), _ci(r["i2t_r1"], r["i2t_r1_ci"], ".1f"),
                     f"{r['wall_min']:.1f}"])
    return markdown_table(head, body)


def _kind(r, kind):
    return _ci(r.get(f"temporal_acc_{kind}"), r.get(f"{kind}_ci"))


def stage2_table(rows):
    head = ["from image CLIP", "corpus", "swap weight (stage 2)", "seed", "model", "motion", "order",
            "1-frame motion", "1-frame order", "t2v R@1", "v2t R@1", "motion spread",
            f"VTM loss, last 50 steps (prior {VTM_PRIOR})"]
    body, seen = [], set()
    for r in rows:
        for who, res in (("image CLIP", r["before"]), ("harvested", r["after"])):
            if not res or (who == "image CLIP" and (r["clip"], r["variant"]) in seen):
                continue
            a, o = res["all_frames"], res.get("one_frame", {})
            body.append([r["clip"], r["variant"] or "built-in",
                         "-" if who == "image CLIP" else f"{r['weight']:g}",
                         str(r["seed"]), who, _kind(a, "motion"), _kind(a, "order"),
                         _kind(o, "motion"), _kind(o, "order"),
                         _ci(a["t2v_r1"], [x for x in a.get("t2v_r1_ci", [])], ".1f"),
                         _ci(a["v2t_r1"], [x for x in a.get("v2t_r1_ci", [])], ".1f"),
                         f"{a.get('motion_caption_spread', float('nan')):.3f}",
                         "-" if who == "image CLIP" or r["vtm_loss"] is None else f"{r['vtm_loss']:.3f}"])
        seen.add((r["clip"], r["variant"]))
    return markdown_table(head, body)


def report(args):
    s1, s2 = stage1_rows(args.runs_dir), stage2_rows(args.runs_dir)
    attr = attribution_rows(args.runs_dir)
    info = machine_info()
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("before",)} for r in rows]  # noqa: E731
    write_json(Path(args.out) / "ablate_time.json", {"machine": info, "stage1": s1,
                                                      "stage2": strip(s2), "attribution": attr})
    body = ""
    if s1:
        body += ("## Stage 1: the caption-swap term's weight in the image stage\n\n"
                 "Own caption against its twin on held-out probe stills (200 groups per kind, "
                 "chance 0.5), text-to-image R@1 on the 500 test stills; [95% bootstrap interval].\n\n"
                 + stage1_table(s1) + "\n\n")
    if s2:
        body += ("## Stage 2: the term in the video stage, from one image CLIP\n\n"
                 "Test split of the corpus trained on (built-in: seed 0; `heldout`: the clips of "
                 "another seed, 200 groups per kind each), 8 frames; chance 0.25 for motion, 0.5 "
                 "for order; [95% bootstrap interval over groups].\n\n" + stage2_table(s2) + "\n")
    if attr:
        body += ("\n## Attribution: each addition alone and all together\n\n"
                 "Stage 2 on the built-in clips from the stage-1 run of the same seed (the swap-"
                 "trained one where the variant says so, else weight 0); the base has none of the "
                 "additions.\n\n" + attribution_table(attr) + "\n")
    notes = ["Steps are fixed per run (no time cap) and the precision is given, so load changes "
             "only the minutes, not the results; minutes were taken with two runs side by side."]
    write_markdown(Path(args.out) / "ablate_time.md", "What teaches time: the caption-swap term",
                   info, body or "(no finished runs)", notes)
    print(body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=("stage1", "stage2", "heldout", "attribution", "report"),
                    help="what to run")
    ap.add_argument("--weights", type=float, nargs="+", default=None,
                    help="caption-swap weights (default: 0 0.05 0.1 0.2 0.5 for stage1, 0 0.1 0.2 "
                         "for stage2, the video stage's default for heldout)")
    ap.add_argument("--corpus-seed", type=int, default=1,
                    help="heldout: the seed of the clip corpus stage 2 trains and is evaluated on "
                         "(the built-in one is seed 0) (default: 1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="seeds (default: 0 for stage2 and heldout, 0 1 otherwise)")
    ap.add_argument("--clip", default=None,
                    help="stage2, heldout: the image CLIP (default: RUNS_DIR/s1_w{--pick}_seed0/final)")
    ap.add_argument("--pick", type=float, default=0.2,
                    help="stage2, heldout: the stage-1 weight whose seed-0 run is the image CLIP "
                         "(default: 0.2)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (default: 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per run (default: the cores divided by --jobs)")
    ap.add_argument("--precision", default="bf16", help="every run's --precision (default: bf16)")
    ap.add_argument("--deepspeed", default="ds_configs/z2.json", help="DeepSpeed config")
    ap.add_argument("--runs-dir", default="runs/ablate_time", help="run folders and logs")
    ap.add_argument("--out", default=str(RESULTS), help="where the JSON and markdown go")
    args, extra = ap.parse_known_args(argv)
    args.extra = [x for x in extra if x != "--"]
    args.seeds = args.seeds or ([0] if args.study in ("stage2", "heldout") else [0, 1])
    if args.weights is None:
        from hvfm.config import SWAP_WEIGHT
        args.weights = WEIGHTS.get(args.study, [SWAP_WEIGHT["video"]])
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    if args.study == "stage1":
        jobs = [(runs / run_name(1, w, s), ["--stage", "image", "--swap-weight", f"{w:g}",
                                             "--seed", str(s)]) for w in args.weights for s in args.seeds]
        run_all(jobs, args)
    elif args.study in ("stage2", "heldout"):
        clip = args.clip or str(runs / run_name(1, args.pick, 0) / "final")
        if not Path(clip).is_dir():
            sys.exit(f"--clip {clip}: no such folder; run the stage1 study first or pass --clip")
        tag = Path(clip).parent.name if Path(clip).name == "final" else Path(clip).name
        variant, data = None, []
        if args.study == "heldout":  # the protocol: the image CLIP, then another seed's clips
            variant, data = f"{HELDOUT}{args.corpus_seed}", heldout_flags(args.corpus_seed)
        jobs = [(runs / run_name(2, w, s, tag, variant),
                 ["--clip", clip, "--swap-weight", f"{w:g}", "--seed", str(s), *data])
                for w in args.weights for s in args.seeds]
        run_all(jobs, args)
    elif args.study == "attribution":
        jobs = []
        for s in args.seeds:
            clips = {flag: runs / run_name(1, w, s) / "final" for flag, w in ((True, args.pick), (False, 0.0))}
            missing = [str(c) for c in clips.values() if not c.is_dir()]
            if missing:
                sys.exit(f"attribution: no image CLIP at {', '.join(missing)}; run "
                         f"`stage1 --weights 0 {args.pick:g} --seeds {s}` first")
            jobs += [(runs / f"attr_{tag}_seed{s}", ["--clip", str(clips[swap]), "--seed", str(s), *flags])
                     for _, tag, swap, flags in attribution_variants()]
        run_all(jobs, args)
    report(args)


if __name__ == "__main__":
    main()
