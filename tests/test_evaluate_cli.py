"""`python -m hvfm.evaluate` end to end on a tiny synthetic test split: an export, the plain-CLIP
image baseline, re-ranking, dual softmax, test-time drop with views, multiple choice, merging,
missing / undecodable videos (excluded and counted) and bad input (one line, exit 2)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hvfm.data import read_annotations
from hvfm.data.synthetic.clips import generate
from hvfm.data.text.tokens import build_tokenizer, clean_caption
from hvfm.data.transforms.device import prepare_batch
from hvfm.data.loading.evaluation import EvalClipDataset, EvalCollator
from hvfm.evaluate import evaluate, main
from hvfm.metrics import dual_softmax, retrieval_metrics, topk_indices
from hvfm.load import load_export
from exports import moved_export

ROOT = Path(__file__).resolve().parents[1]
FRAMES = ["--frames", "4", "--workers", "0"]



@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models: one intra-op thread (see conftest)."""

@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """6 test clips (3 groups) of 4 frames at 32 px, a tiny CLIP folder, and an export of a model
    inflated from it with every weight moved (a stand-in for a post-pretrained one)."""
    root = tmp_path_factory.mktemp("evalcli")
    corpus = generate(root / "syn", n_train=1, n_test=6, frames=4, size=32, seed=0)
    ann = read_annotations(corpus.test_json, corpus.test_root, clean=clean_caption)
    tok = build_tokenizer(list(ann.pair_caption), root / "tok", vocab_size=400)
    clip = moved_export(root / "final", tok)
    clip.save_pretrained(root / "clip")
    tok.save_pretrained(root / "clip")
    entries = json.loads(Path(corpus.test_json).read_text())
    return dict(root=root, corpus=corpus, entries=entries, ann=ann, clip=root / "clip",
                final=root / "final", test_root=corpus.test_root, json=corpus.test_json)


def cli(capsys, *argv):
    """Run the CLI in process: (output object, stdout, stderr)."""
    main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return json.loads(lines[-1]), out, err


def expect_exit_2(capsys, argv, *words):
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err and not out.strip(), err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_export_retrieval_output(env, capsys, tmp_path):
    m, out, err = cli(capsys, "--checkpoint", env["final"], "--ann", env["json"], "--video-root",
                      env["test_root"], *FRAMES, "--dump-scores", tmp_path / "s.npy")
    assert len(out.strip().splitlines()) == 1  # stdout: the JSON object only
    for key in ("t2v_r1", "t2v_r5", "t2v_r10", "t2v_medr", "t2v_meanr",
                "v2t_r1", "v2t_r5", "v2t_r10", "v2t_medr", "v2t_meanr", "temporal_acc"):
        assert key in m, key
    assert m["kind"] == "hvfm" and m["checkpoint"] == str(env["final"]) and m["ann"] == str(env["json"])
    assert (m["videos"], m["captions"], m["excluded"], m["frames"]) == (6, 6, 0, 4)
    assert (m["rerank_k"], m["dsl"], m["merge_alpha"], m["views"], m["drop_ratio"]) == (0, False, None, 1, None)
    assert m["task"] == "retrieval" and m["pool"] == "joint"
    assert "R@1" in err and "t2v" in err  # the table, on stderr
    scores = np.load(tmp_path / "s.npy")
    assert scores.shape == (6, 6)
    ref = retrieval_metrics(scores.astype(np.float64), np.arange(6))
    assert all(m[k] == pytest.approx(v, abs=1e-9) for k, v in ref.items())
    m2, out2, _ = cli(capsys, "--checkpoint", env["final"], "--ann", env["json"], "--video-root",
                      env["test_root"], *FRAMES, "--table")
    assert "R@1" in out2 and json.loads(out2.strip().splitlines()[-1])["t2v_r1"] == m["t2v_r1"]


def test_clip_folder_is_the_image_baseline(env, capsys, tmp_path):
    """A transformers-saved CLIPModel: every frame encoded as an image, embeddings averaged."""
    from transformers import CLIPModel
    m, _, _ = cli(capsys, "--checkpoint", env["clip"], "--ann", env["json"], "--video-root",
                  env["test_root"], "--frames", "2", "--workers", "0", "--dump-scores", tmp_path / "s.npy")
    assert m["kind"] == "clip" and m["pool"] == "mean"
    hf = CLIPModel.from_pretrained(str(env["clip"])).eval()
    ann = env["ann"]
    from hvfm.data.text.tokens import load_tokenizer
    tok = load_tokenizer(env["clip"])
    batch = prepare_batch(EvalCollator(tok)([EvalClipDataset(ann, range(6), 2, 32)[i] for i in range(6)]), "cpu")
    enc = tok(list(ann.pair_caption), padding=True, return_tensors="pt")
    with torch.no_grad():
        frames = batch["pixels"].flatten(0, 1)  # every clip decoded 2 frames
        img = hf.get_image_features(pixel_values=frames)
        img = getattr(img, "pooler_output", img)
        img = torch.nn.functional.normalize(img, dim=-1).unflatten(0, (6, 2)).mean(1)
        img = torch.nn.functional.normalize(img, dim=-1)
        txt = hf.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        txt = torch.nn.functional.normalize(getattr(txt, "pooler_output", txt), dim=-1)
    assert (batch["num_frames"] == 2).all()
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), (txt @ img.T).numpy(), atol=2e-5)


def test_dsl_and_rerank_through_the_model(env, capsys, tmp_path):
    model, tok = load_export(env["final"])
    ann = env["ann"]
    kw = dict(frames=4, size=32, workers=0)
    base = evaluate(model, tok, ann, dump_scores=tmp_path / "s.npy", **kw)
    sims = np.load(tmp_path / "s.npy").astype(np.float64)
    # DSL: the metrics of the hand-written formula on the raw similarities
    dsl = evaluate(model, tok, ann, dsl=True, dsl_temp=50.0, **kw)
    t2v, v2t = dual_softmax(sims, 50.0)
    ref = retrieval_metrics(t2v, np.arange(6), v2t)
    assert all(dsl[k] == pytest.approx(v, abs=1e-6) for k, v in ref.items())
    assert dsl["dsl"] and dsl["dsl_temp"] == 50.0
    # re-ranking the top 5 of 6 keeps R@5 (same top-5 sets), re-ranking all 6 is pure VTM order
    r5 = evaluate(model, tok, ann, rerank_k=5, **kw)
    assert (r5["t2v_r5"], r5["v2t_r5"]) == (base["t2v_r5"], base["v2t_r5"]) and r5["rerank_k"] == 5
    full = evaluate(model, tok, ann, rerank_k=6, rerank_score="prob", **kw)
    both = evaluate(model, tok, ann, rerank_k=6, **kw)  # default: VTM log-odds + VTC logit
    batch = prepare_batch(EvalCollator(tok)([EvalClipDataset(ann, range(6), 4, 32)[i] for i in range(6)]), "cpu")
    caps = list(ann.pair_caption)
    enc = tok(caps, padding=True, return_tensors="pt")
    vtm = np.zeros((6, 6))
    with torch.no_grad():  # VTM probability of every (caption, video) pair, one pair at a time
        for i in range(6):
            n = int(enc["attention_mask"][i].sum())
            ids, am = enc["input_ids"][i:i + 1, :n], enc["attention_mask"][i:i + 1, :n]
            for j in range(6):
                vtm[i, j] = float(model.vtm_score(batch["pixels"][j:j + 1],
                                                  batch["num_frames"][j:j + 1], ids, am))
    ref = retrieval_metrics(vtm, np.arange(6))
    for k, v in ref.items():
        assert full[k] == pytest.approx(v), k
    assert not np.allclose(topk_indices(vtm, 6), topk_indices(sims, 6))  # VTM did reorder
    scale = float(model.logit_scale.detach().exp().clamp(max=100))
    ref = retrieval_metrics(np.log(vtm / (1 - vtm)) + scale * sims, np.arange(6))
    for k, v in ref.items():
        assert both[k] == pytest.approx(v), k
    assert both["rerank_score"] == "sum"
    # the CLI flags and the output record
    m, _, _ = cli(capsys, "--checkpoint", env["final"], "--ann", env["json"], "--video-root",
                  env["test_root"], *FRAMES, "--rerank-k", "6", "--dsl")
    assert m["rerank_k"] == 6 and m["dsl"] is True and m["rerank_score"] == "sum"
    assert m["t2v_r1"] == pytest.approx(both["t2v_r1"])  # top 6 of 6: DSL no longer matters


def test_test_time_drop_views_are_seeded(env, capsys, tmp_path):
    argv = ["--checkpoint", env["final"], "--ann", env["json"], "--video-root", env["test_root"],
            *FRAMES, "--eval-drop-ratio", "0.5", "--views", "3"]
    a, _, _ = cli(capsys, *argv, "--dump-scores", tmp_path / "a.npy")
    b, _, _ = cli(capsys, *argv, "--dump-scores", tmp_path / "b.npy")
    c, _, _ = cli(capsys, *argv, "--seed", "1", "--dump-scores", tmp_path / "c.npy")
    full, _, _ = cli(capsys, *argv[:-4], "--dump-scores", tmp_path / "f.npy")
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))
    assert not np.allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "f.npy"))
    assert (a["views"], a["drop_ratio"], c["seed"], full["views"]) == (3, "0.5", 1, 1)
    expect_exit_2(capsys, argv[:-4] + ["--views", "2"], "--views", "--eval-drop-ratio")
    expect_exit_2(capsys, argv[:-4] + ["--eval-drop-ratio", "1.5"], "--eval-drop-ratio")


def _mc_file(env, path):
    """MSR-VTT-MC style questions: each clip with the captions of its group as the options."""
    groups = {}
    for e in env["entries"]:
        groups.setdefault(e["group"], []).append(e)
    out = []
    for e in env["entries"]:
        opts = [o["caption"] for o in groups[e["group"]]]
        out.append({"video": e["video"], "options": opts, "answer": opts.index(e["caption"])})
    path.write_text(json.dumps(out))
    return path, out


@pytest.mark.parametrize("by", ["sim", "vtm"])
def test_multiple_choice(env, capsys, tmp_path, by):
    path, questions = _mc_file(env, tmp_path / "mc.json")
    m, _, err = cli(capsys, "--checkpoint", env["final"], "--ann", path, "--video-root",
                    env["test_root"], *FRAMES, "--mc-by", by)
    assert m["task"] == "multiple_choice" and m["mc_by"] == by and m["questions"] == 6
    assert 0.0 <= m["mc_acc"] <= 100.0 and "accuracy" in err
    assert m["mc_chance"] == pytest.approx(100 * np.mean([1 / len(q["options"]) for q in questions]))
    # the same choice from the model by hand
    model, tok = load_export(env["final"])
    ann = env["ann"]
    batch = prepare_batch(EvalCollator(tok)([EvalClipDataset(ann, range(6), 4, 32)[i] for i in range(6)]), "cpu")
    hits = []
    with torch.no_grad():
        for q, clip_i in zip(questions, range(6)):
            opts = [clean_caption(o) for o in q["options"]]
            enc = tok(opts, padding=True, return_tensors="pt")
            if by == "sim":
                v = model.encode_video(batch["pixels"][clip_i:clip_i + 1], batch["num_frames"][clip_i:clip_i + 1])
                s = (model.encode_text(enc["input_ids"], enc["attention_mask"]) @ v.T)[:, 0]
            else:
                n = len(opts)
                s = model.vtm_score(batch["pixels"][clip_i:clip_i + 1].expand(n, -1, -1, -1, -1),
                                    batch["num_frames"][clip_i:clip_i + 1].expand(n),
                                    enc["input_ids"], enc["attention_mask"])
            s = s.numpy()
            top = np.abs(s - s.max()) <= 1e-6
            hits.append(1 / top.sum() if top[q["answer"]] else 0.0)
    assert m["mc_acc"] == pytest.approx(100 * np.mean(hits), abs=1e-6)
    # a question whose video is missing is excluded; the others keep their answers
    gone = [{"video": "gone.mp4", "options": ["a", "b"], "answer": 1}]
    (tmp_path / "mc2.json").write_text(json.dumps(gone + questions[:3] + gone + questions[3:]))
    m2, _, err = cli(capsys, "--checkpoint", env["final"], "--ann", tmp_path / "mc2.json",
                     "--video-root", env["test_root"], *FRAMES, "--mc-by", by)
    assert (m2["questions"], m2["excluded"]) == (6, 2) and m2["mc_acc"] == pytest.approx(m["mc_acc"])
    assert "2 of 8 video(s) missing" in err


def test_missing_and_undecodable_videos_are_excluded_and_counted(env, capsys, tmp_path):
    root = tmp_path / "videos"
    root.mkdir()
    for e in env["entries"]:
        os.symlink(Path(env["test_root"]) / e["video"], root / e["video"])
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    entries = (env["entries"][:3] + [{"video": "gone/first.mp4", "caption": ["a", "b"]},
                                     {"video": "garbage.mp4", "caption": "c"},
                                     {"video": "gone/second.mp4", "caption": "d"}] + env["entries"][3:])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(entries))
    m, _, err = cli(capsys, "--checkpoint", env["final"], "--ann", ann, "--video-root", root, *FRAMES,
                    "--dump-scores", tmp_path / "s.npy")
    assert (m["videos"], m["captions"], m["excluded"], m["excluded_captions"]) == (6, 6, 3, 4)
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, err
    assert "2 of 9 video(s) missing" in warnings[0] and str(root / "gone" / "first.mp4") in warnings[0]
    assert "1 of 7 video(s) do not decode" in warnings[1] and "garbage.mp4" in warnings[1]
    # the remaining videos score exactly as in the clean annotation
    clean, _, _ = cli(capsys, "--checkpoint", env["final"], "--ann", env["json"], "--video-root",
                      env["test_root"], *FRAMES, "--dump-scores", tmp_path / "c.npy")
    np.testing.assert_allclose(np.load(tmp_path / "s.npy"), np.load(tmp_path / "c.npy"), atol=1e-6)
    assert clean["t2v_r1"] == m["t2v_r1"]
    # the trainer's in-run evaluation keeps raising on a missing video
    from hvfm.data import DataError
    model, tok = load_export(env["final"])
    with pytest.raises(DataError, match="2 video\\(s\\) missing"):
        evaluate(model, tok, read_annotations(ann, root), frames=4, size=32)


def test_paragraph_joins_captions(env, capsys, tmp_path):
    entries = [{"video": e["video"], "caption": [e["caption"], "then it stops"]} for e in env["entries"]]
    ann = tmp_path / "para.json"
    ann.write_text(json.dumps(entries))
    several, _, _ = cli(capsys, "--checkpoint", env["final"], "--ann", ann, "--video-root",
                        env["test_root"], *FRAMES)
    para, _, _ = cli(capsys, "--checkpoint", env["final"], "--ann", ann, "--video-root",
                     env["test_root"], *FRAMES, "--paragraph")
    assert (several["captions"], several["paragraph"]) == (12, False)
    assert (para["captions"], para["paragraph"]) == (6, True)


BAD_FILES = {
    "empty": "",
    "not_json": "{not json",
    "empty_list": "[]",
    "not_a_list": '{"video": "a.mp4", "caption": "x"}',
    "no_caption": '[{"video": "a.mp4"}]',
    "one_option": '[{"video": "a.mp4", "options": ["x"], "answer": 0}]',
    "bad_answer": '[{"video": "a.mp4", "options": ["x", "y"], "answer": 2}]',
    "no_answer": '[{"video": "a.mp4", "options": ["x", "y"]}]',
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_malformed_annotation_exits_2(env, capsys, tmp_path, kind):
    path = tmp_path / f"{kind}.json"
    path.write_text(BAD_FILES[kind])
    expect_exit_2(capsys, ["--checkpoint", env["final"], "--ann", path, "--video-root",
                           env["test_root"], *FRAMES], str(path))


def test_bad_checkpoints_and_flags_exit_2(env, capsys, tmp_path):
    base = ["--ann", env["json"], "--video-root", env["test_root"], *FRAMES]
    (tmp_path / "empty").mkdir()
    expect_exit_2(capsys, ["--checkpoint", tmp_path / "empty", *base], "expected an hvfm export")
    expect_exit_2(capsys, ["--checkpoint", tmp_path / "nothing", *base], "does not exist")
    expect_exit_2(capsys, ["--checkpoint", env["final"], *base, "--merge-with-clip", "0.5"],
                  "--merge-with-clip needs --clip")
    expect_exit_2(capsys, ["--checkpoint", env["final"], *base, "--clip", env["clip"]],
                  "--merge-with-clip")
    expect_exit_2(capsys, ["--checkpoint", env["final"], "--ann", env["json"], "--video-root",
                           tmp_path / "nowhere"], "video root")
    expect_exit_2(capsys, ["--checkpoint", env["final"], *base[:-4], "--frames", "9"], "--frames 9")


def test_merge_with_clip_is_recorded(env, capsys, tmp_path):
    base = ["--checkpoint", env["final"], "--ann", env["json"], "--video-root", env["test_root"],
            *FRAMES]
    plain, _, _ = cli(capsys, *base, "--dump-scores", tmp_path / "p.npy")
    m0, _, _ = cli(capsys, *base, "--merge-with-clip", "0", "--clip", env["clip"],
                   "--dump-scores", tmp_path / "m0.npy")
    m1, _, err = cli(capsys, *base, "--merge-with-clip", "1", "--clip", env["clip"],
                     "--dump-scores", tmp_path / "m1.npy")
    assert plain["merge_alpha"] is None and m0["merge_alpha"] == 0.0 and m1["merge_alpha"] == 1.0
    assert m1["merge_clip"] == str(env["clip"]) and m1["merged_tensors"] > 0
    assert "merge alpha 1.0" in err
    np.testing.assert_array_equal(np.load(tmp_path / "m0.npy"), np.load(tmp_path / "p.npy"))
    assert not np.allclose(np.load(tmp_path / "m1.npy"), np.load(tmp_path / "p.npy"))


@pytest.mark.slow  # 15-30 s on 2 busy cores; the only test of the multi-rank path
def test_torchrun_two_ranks_match_one_process(env, tmp_path):
    """Each rank encodes a shard of videos, captions and re-rank pairs; the gathered result is the
    single-process result."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--checkpoint", str(env["final"]), "--ann", str(env["json"]), "--video-root",
            str(env["test_root"]), *FRAMES, "--rerank-k", "2", "--batch-size", "2"]
    envv = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), "-m", "hvfm.evaluate", *args,
                        "--dump-scores", str(tmp_path / "two.npy")],
                       cwd=ROOT, env=envv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints
    two = json.loads(lines[0])
    assert two["world_size"] == 2 and (two["videos"], two["captions"]) == (6, 6)
    model, tok = load_export(env["final"])
    ref = evaluate(model, tok, env["ann"], frames=4, size=32, rerank_k=2, batch_size=2,
                   dump_scores=tmp_path / "one.npy")
    np.testing.assert_allclose(np.load(tmp_path / "two.npy"), np.load(tmp_path / "one.npy"), atol=1e-6)
    for k in ("t2v_r1", "t2v_r5", "t2v_meanr", "v2t_r1", "v2t_r5", "v2t_meanr", "temporal_acc"):
        assert two[k] == pytest.approx(ref[k]), k


@pytest.fixture(scope="module")
def groups_env(env):
    """18 test clips: 3 motion groups (4 clips) and 3 order groups (2 clips), 4 frames at 32 px."""
    corpus = generate(env["root"] / "syn18", n_train=1, n_test=18, frames=4, size=32, seed=0)
    return dict(json=corpus.test_json, test_root=corpus.test_root,
                entries=json.loads(Path(corpus.test_json).read_text()))


def test_time_diagnostics_per_kind_in_the_output(env, groups_env, capsys, tmp_path):
    from hvfm.metrics import group_bootstrap_ci, temporal_hits, v2t_in_group
    entries = groups_env["entries"]
    groups = [e["group"] for e in entries]
    for ckpt, pool in ((env["final"], "joint"), (env["clip"], "mean")):  # export, image CLIP
        m, out, _ = cli(capsys, "--checkpoint", ckpt, "--ann", groups_env["json"], "--video-root",
                        groups_env["test_root"], *FRAMES, "--table", "--bootstrap", "200",
                        "--dump-scores", tmp_path / "s.npy")
        assert m["pool"] == pool and m["bootstrap"] == 200 and m["videos"] == 18
        scores = np.load(tmp_path / "s.npy").astype(np.float64)
        hits, _ = temporal_hits(scores, np.arange(18), groups)
        v2t, _ = v2t_in_group(scores, np.arange(18), groups)
        for kind, size in (("motion", 4), ("order", 2)):
            rows = np.array([e["kind"] == kind for e in entries])
            assert m[f"{kind}_groups"] == 3
            assert m[f"{kind}_acc"] == pytest.approx(m[f"temporal_acc_{kind}"])
            assert m[f"{kind}_acc"] == pytest.approx(hits[rows].mean(), abs=1e-6)
            assert m[f"{kind}_ci"] == pytest.approx(
                list(group_bootstrap_ci(hits[rows], np.array(groups)[rows], 200, 0)), abs=1e-6)
            lo, hi = m[f"{kind}_ci"]
            assert lo <= m[f"{kind}_acc"] <= hi
            assert m[f"{kind}_v2t_in_group"] == pytest.approx(v2t[rows].mean(), abs=1e-6)
            assert m[f"{kind}_v2t_in_group_chance"] == pytest.approx(1 / size)
            assert 0.0 <= m[f"{kind}_caption_spread"] <= 2.0
            assert 0.0 <= m[f"{kind}_probe_acc"] <= 1.0  # 2 groups to fit, 1 held out
            assert m[f"{kind}_probe_chance"] == pytest.approx(1 / size)
            line = next(ln for ln in out.splitlines() if ln.startswith(f"{kind} "))
            assert f"{m[f'{kind}_acc']:.3f} [{lo:.2f}, {hi:.2f}] (chance {1 / size:.2f}) over 3 groups" in line
            assert "caption spread" in line and "video probe" in line
        if pool == "joint":  # the built-in run's closing table carries the same intervals
            from hvfm.builtin_run import comparison_table
            table = comparison_table({}, {"all_frames": m}, 4)
            for kind in ("motion", "order"):
                lo, hi = m[f"{kind}_ci"]
                assert f"{m[f'{kind}_acc']:.3f} [{lo:.2f}, {hi:.2f}]" in table


def test_probe_labels_of_the_synthetic_split_name_the_variant(groups_env):
    """The probe's label (rank of a caption among its group's) is the same variant in every
    group: the direction for motion; for order, which of the two objects comes first."""
    from hvfm.metrics import group_rank_labels
    entries = groups_env["entries"]
    for kind in ("motion", "order"):
        es = [e for e in entries if e["kind"] == kind]
        labels = group_rank_labels([e["caption"] for e in es], [e["group"] for e in es])
        if kind == "motion":  # the same direction has the same label in every group
            pairs = {(e["variant"], int(lab)) for e, lab in zip(es, labels)}
            assert pairs == {("down", 0), ("left", 1), ("right", 2), ("up", 3)}
        else:  # label 0: the first object's words sort first ("a X appears, then a Y")
            for e, lab in zip(es, labels):
                first, second = e["caption"].split(" appears, then ")
                assert int(lab) == int(first > second), e["caption"]
            assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
