"""profiling/ablate_time.py: run names, and the report from finished run folders."""
import json

from profiling import ablate_time as at


def test_run_names_round_trip():
    for stage, w, s, tag in ((1, 0.05, 1, None), (1, 0.0, 0, None), (2, 0.2, 0, "s1_w0.2_seed0")):
        name = at.run_name(stage, w, s, tag)
        assert at.parse_name(name) == (stage, tag, w, s)
        assert at.parse_name(name, with_variant=True) == (stage, tag, w, s, None)
        for variant in ("mirror1", "ho1"):
            name = at.run_name(stage, w, s, tag, variant)
            assert at.parse_name(name, with_variant=True) == (stage, tag, w, s, variant)
    assert at.parse_name("something_else") is None and at.parse_name("attr_base_seed0") is None


def _probe(x):
    return {k: {"own_vs_alt": x, "own_vs_alt_ci": [x - 0.1, x + 0.05], "t2i": x,
                "t2i_ci": [x - 0.1, x], "caption_spread": 0.1, "image_spread": 0.004,
                "image_probe_acc": 0.61 if k.startswith("place") else None, "groups": 200, "chance": 0.5}
            for k in at.PROBE_KINDS}


def _time(motion, order):
    return {"t2v_r1": 30.0, "t2v_r1_ci": [27.0, 33.0], "v2t_r1": 20.0, "v2t_r1_ci": [18.0, 22.0],
            "temporal_acc_motion": motion, "motion_ci": [motion - 0.05, motion + 0.02],
            "temporal_acc_order": order, "order_ci": [order - 0.04, order], "motion_caption_spread": 0.2}


def test_report_reads_the_runs(tmp_path):
    runs = tmp_path / "runs"
    for w, s, place, variant in ((0.2, 0, 0.97, None), (0.0, 0, 0.52, None), (0.2, 0, 0.81, "mirror1"),
                                 (0.2, 0, 0.64, "long")):
        out = runs / at.run_name(1, w, s, variant=variant)
        (out / "final").mkdir(parents=True)
        if variant:
            flags = {"mirror1": {"mirror_negatives": 1.0, "max_steps": 1200}, "long": {"max_steps": 2400}}
            (out / "run_config.json").write_text(json.dumps({"args": flags[variant]}))
        (out / "summary.json").write_text(json.dumps({"steps": 1200, "wall_s": 600.0}))
        (out / "ablate_eval.json").write_text(json.dumps({"probes": _probe(place), "t2i_r1": 45.0,
                                                          "t2i_r1_ci": [40.0, 50.0], "i2t_r1": 44.0,
                                                          "i2t_r1_ci": [39.0, 49.0]}))
    for variant, motion in ((None, 0.93), ("ho1", 0.91)):
        out = runs / at.run_name(2, 0.0, 0, "s1_w0.2_seed0", variant)
        (out / "final").mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps({
            "steps": 500, "wall_s": 900.0, "last_losses": {"vtm": 0.12},
            "eval": {"before": {"all_frames": _time(0.25, 0.5)},
                     "after": {"all_frames": _time(motion, 0.99), "one_frame": _time(0.26, 0.5)}}}))
        if variant:  # VTM over the last 50 steps from metrics.csv: rows 460..500, not 440 or 450
            (out / "metrics.csv").write_text("step,vtm,mlm\n" + "".join(
                f"{k},{0.9 if k < 460 else 0.2 + (k - 460) / 1000},1\n" for k in range(440, 501, 10)))
    at.main(["report", "--runs-dir", str(runs), "--out", str(tmp_path / "out")])
    md = (tmp_path / "out" / "ablate_time.md").read_text()
    assert "0.97 [0.87, 1.02]" in md and "0.52 [0.42, 0.57]" in md  # both stage-1 runs
    assert "| --mirror-negatives 1 |" in md and "0.81 [0.71, 0.86]" in md  # the variant's own row
    assert "0.10 / 0.00, 0.10 / 0.00 | 0.61" in md  # caption / image spreads, the image probe
    assert "0.93 [0.88, 0.95]" in md and "0.120" in md  # stage 2: motion, VTM loss
    assert "| corpus seed 1 |" in md and "0.91 [0.86, 0.93]" in md  # the heldout run's rows
    assert "| 0.220 |" in md  # its VTM: mean of 0.20 .. 0.24
    rows = json.loads((tmp_path / "out" / "ablate_time.json").read_text())
    assert [(r["variant"], r["weight"]) for r in rows["stage1"]] == \
        [("", 0.0), ("", 0.2), ("--max-steps 2400", 0.2), ("--mirror-negatives 1", 0.2)]
    assert [(r["clip"], r["variant"]) for r in rows["stage2"]] == \
        [("s1_w0.2_seed0", ""), ("s1_w0.2_seed0", "corpus seed 1")]


def test_attribution_variants_are_valid_flags():
    from hvfm import config
    variants = at.attribution_variants()
    assert len(variants) == len(at.ADDITIONS) + 3 and len({v[1] for v in variants}) == len(variants)
    parsed = {tag: config.parse_args(["--deepspeed", "ds_configs/z2.json", *flags])
              for _, tag, _, flags in variants}
    base, every = parsed["base"], parsed["all"]
    assert (base.reverse_negatives, base.motion_channel, base.temporal_lr_mult, base.swap_weight) == \
        (0.0, False, 1.0, 0.0)
    assert (every.reverse_negatives, every.motion_channel, every.temporal_lr_mult) == (1.0, True, 100.0)
    assert every.swap_weight > 0
    # all but the stage-1 term: the same flags as all, from the weight-0 image CLIP
    assert variants[-1][1] == "allbut0" and variants[-1][3] == variants[-2][3]
    assert variants[-2][2] and not variants[-1][2]
    # each "alone" variant differs from the base in exactly one thing
    for _, tag, swap_clip, _ in variants[1:-2]:
        a = parsed[tag]
        changed = [k for k in ("reverse_negatives", "motion_channel", "temporal_lr_mult", "swap_weight")
                   if getattr(a, k) != getattr(base, k)] + (["clip"] if swap_clip else [])
        assert len(changed) == 1, (tag, changed)


def test_heldout_runs_train_on_another_seeds_clips_as_user_data(tmp_path, monkeypatch):
    from hvfm import config
    from hvfm.data.synthetic import clips
    asked = []
    monkeypatch.setattr(clips, "ensure_corpus", lambda **kw: asked.append(kw) or clips.CorpusPaths.of(tmp_path))
    flags = at.heldout_flags(3)
    assert asked[0]["seed"] == 3
    args = config.parse_args(["--deepspeed", "ds_configs/z2.json", "--clip", str(tmp_path), *flags])
    assert not config.is_builtin(args) and args.epochs == 2 and args.frames == 8
    assert (args.train_csv, args.eval_json) == (str(clips.CorpusPaths.of(tmp_path).train_csv),
                                                str(clips.CorpusPaths.of(tmp_path).test_json))
    assert args.swap_weight == config.SWAP_WEIGHT["video"]  # the video stage's default recipe
