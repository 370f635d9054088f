"""The built-in default, an orchestrator above the training loop (hvfm/loop.py), which it calls
like any user would: the built-in corpora (clips, or stills in stage 1) and tokenizer, stage 1
(the built-in image CLIP, trained once by the same loop and cached), stage 2, the before/after
evaluation and the closing comparison table."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hvfm import loop
from hvfm.config import (BUILTIN_IMAGE, SWAP_WEIGHT, check_run, is_builtin, parse_args,
                         schedule_defaults)
from hvfm.data import read_annotations
from hvfm.data.text.tokens import clean_caption
from hvfm.distributed import broadcast
from hvfm.loop import read_data, read_eval_data, tok_dir_needed


def run(args):
    """The built-in default (no data flags): stage 1 once (cached) unless --clip names an image
    CLIP, then the loop on the built-in corpus of --stage, the image CLIP evaluated before and
    the video model after, and the table. Returns the loop's summary."""
    import torch
    cuda = torch.cuda.is_available()
    check_run(args, cuda)  # bad flags: one error line before any corpus or stage 1 is built
    rank, _ = loop.start_process(args, cuda)
    if args.stage != "image" and args.clip is None:  # the built-in default harvests: stage 1 first
        args.clip = str(ensure_image_clip(args, rank))  # (once, cached), then this stage
    summary = train_builtin(args)
    print_comparison(summary, args)
    return summary


def train_builtin(args, label=None):
    """The loop on the built-in corpus of --stage, with the built-in schedule where the flags
    leave it open (steps or epochs, the image stage's LR, the time cap) and `evaluator`."""
    args.max_steps = schedule_defaults(args, True, args.stage == "image")
    return loop.train(args, data=lambda out_dir, rank: prepare_data(args, out_dir, rank),
                      label=label, evaluate=evaluator(args, label))


def evaluator(args, label=None):
    """The loop's `evaluate` hook: "before", the image CLIP the run starts from with each frame an
    image (frames mean-pooled; none in the image stage, which starts from random weights);
    "after", the trained model. Retrieval and temporal accuracy, one line per view."""
    import torch
    image = args.stage == "image"

    def evaluate(model, tokenizer, ann, size, when):
        if when == "before":
            if image:
                return None
            # In fp32, before DeepSpeed casts the weights, so the numbers are the ones `python -m
            # hvfm.evaluate --checkpoint CLIP_FOLDER` gives.
            return run_eval(model, tokenizer, ann, args, size, torch.float32,
                            "image CLIP, frames mean-pooled", 0, pool="mean")
        return run_eval(model, tokenizer, ann, args, size, torch.float32,
                        label or ("image CLIP" if image else "harvested"), 0)
    return evaluate


def print_comparison(summary, args):
    """The closing table, when the run evaluated before and after (rank 0 evaluates; the other
    ranks' summaries hold no results)."""
    results = summary.get("eval", {})
    if "before" in results and "after" in results:
        print(comparison_table(results["before"], results["after"], args.frames), flush=True)


def prepare_data(args, out_dir, rank):
    """(train annotations, eval annotations or None, tokenizer folder or None). With no data flags
    rank 0 generates the built-in corpus of the stage (stills or clips) and the built-in tokenizer;
    the others wait at the barrier and load them. With data flags: the loop's `read_data`."""
    import torch.distributed as dist
    from hvfm.data.synthetic.clips import ensure_corpus
    from hvfm.data.synthetic.stills import ensure_images

    if not is_builtin(args):
        return read_data(args, out_dir, rank)
    train = evaluation = None
    if args.stage == "image":
        if rank == 0:
            ensure_images(seed=args.seed, workers=os.cpu_count(), progress=True)
        dist.barrier()
        root = ensure_images(seed=args.seed)
        train = read_annotations(root / "images.json", root, clean=clean_caption)
        if not args.eval_json:
            evaluation = read_annotations(root / "images_test.json", root, clean=clean_caption)
    else:
        if rank == 0:
            ensure_corpus(workers=os.cpu_count(), progress=True)
        dist.barrier()
        corpus = ensure_corpus()
        train = read_annotations(corpus.train_csv, corpus.train_root, clean=clean_caption)
        if not args.eval_json:
            evaluation = read_annotations(corpus.test_json, corpus.test_root, clean=clean_caption)
    if args.eval_json:  # the benchmark's protocol: paragraphs for DiDeMo / ActivityNet
        evaluation = read_eval_data(args)
    tok_dir = args.tokenizer
    if tok_dir_needed(args):  # one tokenizer for both built-in corpora; it travels with the image CLIP
        from hvfm.data.synthetic.tokenizer import builtin_tokenizer_dir, ensure_builtin_tokenizer
        if rank == 0:
            ensure_builtin_tokenizer(seed=args.seed)
        dist.barrier()
        tok_dir = builtin_tokenizer_dir(seed=args.seed)
    return train, evaluation, tok_dir



def run_eval(model, tokenizer, ann, args, size, dtype, label, rank, pool="joint"):
    """Retrieval with all frames and with one frame (an image model's view); the image stage
    evaluates stills (one frame). pool "mean": every frame encoded as an image, embeddings
    averaged (the image CLIP baseline)."""
    from hvfm.evaluate import evaluate, time_lines
    results = {}
    views = ((1, "one_frame"),) if args.stage == "image" else ((args.frames, "all_frames"), (1, "one_frame"))
    for frames, key in views:
        results[key] = evaluate(model, tokenizer, ann, frames=frames, size=size,
                                workers=min(args.workers, 2), drop_ratio=args.eval_drop_ratio,
                                dtype=dtype, pool=pool)
    if args.stage == "image" and is_builtin(args):  # place and colour: own caption vs its twin
        from hvfm.data.synthetic.stills import ensure_probes
        from hvfm.evaluate import evaluate_probes
        results["probes"] = evaluate_probes(model, tokenizer, ensure_probes(seed=args.seed),
                                            size=size, dtype=dtype)
    if rank == 0:
        for key, r in results.items():
            if key == "probes":
                from hvfm.evaluate import probe_lines
                for line in probe_lines(r):
                    print(f"[{label}, probe stills] {line}", flush=True)
                continue
            what = "1 frame" if key == "one_frame" else f"{args.frames} frames"
            line = (f"[{label}, {what}] t2v R@1/5/10 {r['t2v_r1']:.1f}/{r['t2v_r5']:.1f}/{r['t2v_r10']:.1f}  "
                    f"v2t R@1/5/10 {r['v2t_r1']:.1f}/{r['v2t_r5']:.1f}/{r['v2t_r10']:.1f}")
            if "temporal_acc" in r:  # per kind, each with its own chance (1 / group size)
                line += "  temporal acc " + ", ".join(
                    f"{k} {r[f'temporal_acc_{k}']:.3f} (chance {r[f'temporal_chance_{k}']:.2f})"
                    for k in ("motion", "order") if f"temporal_acc_{k}" in r)
            print(line, flush=True)
            for kind_line in time_lines(r):  # per kind: interval over groups, blind-tower checks
                print(f"[{label}, {what}] {kind_line}", flush=True)
    return results


def acc_with_ci(r, kind):
    """'0.273 [0.21, 0.34]': a kind's temporal accuracy and its 95% interval over groups."""
    acc, ci = r.get(f"temporal_acc_{kind}"), r.get(f"{kind}_ci")
    if acc is None:
        return "n/a"
    return f"{acc:.3f}" if ci is None else f"{acc:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def comparison_table(before, after, frames):
    """The built-in default's closing table: the image CLIP against the harvested video model."""
    head = (f"{'':44}{'t2v R@1':>8}{'R@5':>6}{'R@10':>6}{'v2t R@1':>9}{'R@5':>6}{'R@10':>6}"
            f"{'motion':>21}{'order':>21}")
    lines = [head]
    for name, res in (("image CLIP (frames mean-pooled)", before), ("harvested video model", after)):
        for key, what in (("all_frames", f"{frames} frames"), ("one_frame", "1 frame")):
            r = res.get(key)
            if r is None:
                continue
            lines.append(f"{name + ', ' + what:44}{r['t2v_r1']:8.1f}{r['t2v_r5']:6.1f}{r['t2v_r10']:6.1f}"
                         f"{r['v2t_r1']:9.1f}{r['v2t_r5']:6.1f}{r['v2t_r10']:6.1f}"
                         f"{acc_with_ci(r, 'motion'):>21}{acc_with_ci(r, 'order'):>21}")
    lines.append("temporal accuracy [95% bootstrap interval over groups]: chance 0.25 for motion "
                 "(4 directions), 0.5 for order (2)")
    return "\n".join(lines)


def image_clip_key(args):
    """What the built-in image CLIP depends on: a change of any of these builds a new one."""
    from hvfm.data.synthetic.tokenizer import TOKENIZER_VERSION
    from hvfm.data.synthetic.stills import DEFAULT_IMAGES, IMAGE_VERSION
    return {"preset": args.model, "seed": args.seed, "images": DEFAULT_IMAGES,
            "image_generator": IMAGE_VERSION, "tokenizer": TOKENIZER_VERSION, **BUILTIN_IMAGE,
            "max_steps": args.image_steps or BUILTIN_IMAGE["max_steps"],
            "swap_weight": SWAP_WEIGHT["image"]}


def ensure_image_clip(args, rank):
    """The built-in image CLIP (stage 1 on the built-in stills), trained once by this trainer and
    cached in HVFM_CACHE/image_clip/ keyed by `image_clip_key`. Every rank takes part.

    A stage 1 stopped by its time cap (8 minutes of training, `BUILTIN_IMAGE`) before its steps
    is cached as cut short: the marker records the steps done and planned. The rule: a later run
    reuses it (a rebuild on the same machine would most likely stop at the same cap) and says so
    on its own line, with the steps done, every time; --rebuild-image-clip trains it again and
    replaces it, and fewer --image-steps give a whole one of their own."""
    import hashlib
    import uuid

    import torch.distributed as dist
    from hvfm.data.synthetic.common import cache_root

    key = image_clip_key(args)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_root() / "image_clip" / f"{args.model}-{digest}"
    marker = folder / "hvfm_image_clip.json"
    if marker.exists() and not args.rebuild_image_clip:
        if rank == 0:
            entry = read_image_clip_entry(marker, key)
            print(f"image CLIP: the built-in one, cached in {folder}"
                  f"{'' if not entry['cut_short'] else ' -- ' + cut_short_note(entry)}", flush=True)
        return folder
    tmp = Path(broadcast(str(folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"))))
    if rank == 0:
        print(f"image CLIP: {'rebuilding' if marker.exists() else 'building'} the built-in one once "
              f"(stage 1: the {args.model} preset on the built-in stills, cached in {folder})", flush=True)
    argv = ["--deepspeed", args.deepspeed, "--stage", "image", "--model", args.model,
            "--seed", str(args.seed), "--attn", args.attn, "--precision", args.precision,
            "--workers", str(args.workers), "--output-dir", str(tmp),
            "--max-steps", str(key["max_steps"]), "--max-minutes", str(key["max_minutes"]),
            "--drop-ratio", key["drop_ratio"], "--swap-weight", str(key["swap_weight"]),
            *(["--verbose"] if args.verbose else [])]
    summary = train_builtin(parse_args(argv), label="image CLIP")  # the same loop, stage 1
    if rank == 0:
        entry = {"key": key, "steps_done": summary["steps"], "steps_planned": key["max_steps"],
                 "cut_short": summary["steps"] < key["max_steps"],
                 "summary": {k: summary[k] for k in ("steps", "wall_s", "eval") if k in summary}}
        (tmp / "final" / marker.name).write_text(json.dumps(entry, indent=2))
        if entry["cut_short"]:
            print(f"image CLIP: cached as cut short -- {cut_short_note(entry)}", flush=True)
        if folder.exists():  # a half-written one (no marker), or the one --rebuild-image-clip replaces
            shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp / "final", folder)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return folder


def read_image_clip_entry(marker, key):
    """A cached image CLIP's marker with `steps_done`, `steps_planned` and `cut_short` (markers
    written before they were recorded: from the summary's steps and the key's)."""
    entry = json.loads(Path(marker).read_text())
    planned = entry.get("steps_planned", key["max_steps"])
    done = entry.get("steps_done", entry.get("summary", {}).get("steps", planned))
    return {**entry, "steps_done": done, "steps_planned": planned, "cut_short": done < planned}


def cut_short_note(entry):
    """Why a cached image CLIP is weaker than a whole one, and what to do about it."""
    return (f"cut short by its {entry['key']['max_minutes']:g}-minute time cap at {entry['steps_done']} "
            f"of {entry['steps_planned']} steps (a weaker baseline and start than a whole one); "
            f"--rebuild-image-clip trains it again, --image-steps {entry['steps_done']} gives a whole "
            f"one of that many steps")
