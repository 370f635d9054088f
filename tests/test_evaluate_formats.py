"""The benchmarks' annotation files as their releases ship them (issue 19).

Each test writes a tiny file in a public format from the public schema (no downloads), the same
rows in hvfm's own list format, and checks the two give the same numbers (the same similarity
matrix and the same R@k / MdR / MnR); the multiple-choice files give multiple-choice accuracy.
One tiny export, loaded once; 6 synthetic clips linked under the names each release uses."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from hvfm.data import Annotations, DataError, read_annotations
from hvfm.data.loading.evaluation import read_eval_annotations
from hvfm.data.sources.formats import FORMATS, detect
from hvfm.data.synthetic.clips import generate
from hvfm.data.text.tokens import build_tokenizer, clean_caption
from hvfm.evaluate import evaluate, evaluate_mc, main
from hvfm.load import load_export
from exports import moved_export

KW = dict(frames=4, size=32, workers=0)
KEYS = [f"{d}_{k}" for d in ("t2v", "v2t") for k in ("r1", "r5", "r10", "medr", "meanr")]
IDS = [7010 + 3 * i for i in range(6)]  # MSR-VTT video ids
YT = ["QOlSCBRmfWY", "ehGHCYKzyZ8", "nwznKOuZM7w", "ogQozSI5V8U", "3jSFD3BHe3s", "xF7JfK0h8WQ"]
FLICKR = [f"{10015567 + i}@N08_36550842{i}1_d8b58466f{i}.mov" for i in range(6)]


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """Tiny models: one intra-op thread (see conftest)."""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """6 synthetic clips, two sentences each; an export of a tiny model (loaded once)."""
    root = tmp_path_factory.mktemp("formats")
    corpus = generate(root / "syn", n_train=1, n_test=6, frames=4, size=32, seed=0)
    entries = json.loads(Path(corpus.test_json).read_text())
    clips = [Path(corpus.test_root) / e["video"] for e in entries]
    sentences = [[e["caption"], f"{e['caption']} and then it stops"] for e in entries]
    tok = build_tokenizer([s for ss in sentences for s in ss], root / "tok", vocab_size=400)
    moved_export(root / "final", tok)
    model, tok = load_export(root / "final")
    return dict(root=root, clips=clips, sentences=sentences, model=model, tok=tok,
                final=root / "final")


def link(root, names, clips):
    """The clips under `names` in `root` (a folder per release layout)."""
    for name, clip in zip(names, clips):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(clip, root / name)
    return root


def write_json(path, obj):
    path.write_text(json.dumps(obj))
    return path


def reference(env, tmp_path, videos, sentences, root, paragraph=False):
    """Metrics and similarity matrix of the same rows in hvfm's own list format."""
    path = write_json(tmp_path / "ref.json", [{"video": v, "caption": s}
                                              for v, s in zip(videos, sentences)])
    ann = read_annotations(path, root, paragraph=paragraph, clean=clean_caption)
    return score(env, tmp_path / "ref.npy", ann)


def score(env, npy, ann):
    m = evaluate(env["model"], env["tok"], ann, dump_scores=npy, **KW)
    return m, np.load(npy)


def same_numbers(env, tmp_path, path, root, ref, **read):
    ann, answers = read_eval_annotations(path, root, **read)
    assert answers is None
    m, s = score(env, tmp_path / "fmt.npy", ann)
    np.testing.assert_array_equal(s, ref[1])
    for k in KEYS:
        assert m[k] == ref[0][k], k
    assert (m["videos"], m["captions"]) == (ref[0]["videos"], ref[0]["captions"])
    return ann, m


# ---------------------------------------------------------------------------- MSR-VTT

def test_msrvtt_jsfusion_csv_is_the_1ka_pairs(env, tmp_path):
    """MSRVTT_JSFUSION_test.csv (key,vid_key,video_id,sentence): one pair per row, videoNNNN.mp4;
    Frozen-in-Time's videos/all layout found too; a byte-order mark changes nothing."""
    root = link(tmp_path / "videos", [f"video{i}.mp4" for i in IDS], env["clips"])
    rows = ["key,vid_key,video_id,sentence"] + [
        f'ret{k},msr{i},video{i},"{s[0]}"' for k, (i, s) in enumerate(zip(IDS, env["sentences"]))]
    path = tmp_path / "MSRVTT_JSFUSION_test.csv"
    path.write_text("\n".join(rows) + "\n")
    assert detect(path).format == "msrvtt_csv"
    ref = reference(env, tmp_path, [f"video{i}.mp4" for i in IDS],
                    [s[0] for s in env["sentences"]], root)
    ann, m = same_numbers(env, tmp_path, path, root, ref)
    assert (ann.format, ann.merged, ann.found) == ("msrvtt_csv", 0, {"videoNNNN.mp4": 6})
    assert (m["videos"], m["captions"]) == (6, 6)  # 1k-A: one sentence per video
    assert ann.note.startswith("6 pairs") and "1,000" in ann.note
    frozen = link(tmp_path / "frozen" / "videos", [f"all/video{i}.mp4" for i in IDS], env["clips"])
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    ann, _ = same_numbers(env, tmp_path, bom, frozen, ref)
    assert ann.found == {"all/videoNNNN.mp4": 6}


def _msrvtt_data(env, train_ids=(9001, 9002)):
    """MSRVTT_data.json: videos with their split, sentences interleaved across videos."""
    videos = [{"category": 9, "url": "https://www.youtube.com/watch?v=x", "video_id": f"video{i}",
               "start time": 1.0, "end time": 11.0, "split": "test", "id": i} for i in IDS]
    videos += [{"category": 1, "url": "u", "video_id": f"video{i}", "start time": 0.0,
                "end time": 9.0, "split": "train", "id": i} for i in train_ids]
    sentences, sen = [], 0
    for k in range(2):
        for i, s in zip(list(IDS) + list(train_ids), env["sentences"] + [["a", "b"], ["c", "d"]]):
            sentences.append({"caption": s[k], "video_id": f"video{i}", "sen_id": sen})
            sen += 1
    return {"info": {"contributor": "Microsoft", "year": "2016"}, "videos": videos,
            "sentences": sentences}


def test_msrvtt_data_json_split_and_the_9k_training_csv(env, tmp_path):
    root = link(tmp_path / "videos", [f"video{i}.mp4" for i in IDS], env["clips"])
    data = write_json(tmp_path / "MSRVTT_data.json", _msrvtt_data(env))
    assert detect(data).format == "msrvtt_json"
    ref = reference(env, tmp_path, [f"video{i}.mp4" for i in IDS], env["sentences"], root)
    ann, m = same_numbers(env, tmp_path, data, root, ref)  # default split: test
    assert (m["videos"], m["captions"], ann.merged) == (6, 12, 6)  # 20 sentences/video in MSR-VTT
    train = read_annotations(data, root, split="train")
    assert train.num_videos == 2 and train.captions_of(1) == ["c", "d"]
    with pytest.raises(DataError, match="no video of split 'val'.*test, train.*--split"):
        read_annotations(data, root, split="val")
    # MSRVTT_train.9k.csv lists ids only: its sentences come from MSRVTT_data.json beside it,
    # each row with all its sentences (the training reader is the trainer's --train-csv/-json)
    nine_k = tmp_path / "MSRVTT_train.9k.csv"
    nine_k.write_text("video_id\n" + "".join(f"video{i}\n" for i in IDS))
    assert detect(nine_k).format == "msrvtt_split_csv"
    tr = read_annotations(nine_k, root, clean=clean_caption)
    assert tr.num_videos == 6 and len(tr) == 12
    assert [tr.captions_of(v) for v in range(6)] == [[clean_caption(c) for c in s]
                                                     for s in env["sentences"]]
    same_numbers(env, tmp_path, nine_k, root, ref)
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "MSRVTT_train.7k.csv").write_text("video_id\nvideo1\n")
    with pytest.raises(DataError, match="MSRVTT_train.7k.csv: lists only video ids.*MSRVTT_data.json"):
        read_annotations(alone / "MSRVTT_train.7k.csv", root)


def test_one_entry_per_sentence_is_one_gallery_video(env, tmp_path):
    """A UMT / Singularity list (or ClipBERT JSON Lines) with the video repeated per sentence:
    one gallery entry with both sentences, as the grouped list scores it; unmerged, the gallery
    holds duplicates and every rank gets worse."""
    names = [f"video{i}.mp4" for i in IDS]
    root = link(tmp_path / "videos", names, env["clips"])
    ref = reference(env, tmp_path, names, env["sentences"], root)
    per_sentence = [{"video": v, "caption": s[k]} for k in range(2)
                    for v, s in zip(names, env["sentences"])]
    path = write_json(tmp_path / "msrvtt_ret_test.json", per_sentence)
    ann, m = same_numbers(env, tmp_path, path, root, ref)
    assert (ann.format, ann.merged, m["videos"], m["captions"]) == ("list", 6, 6, 12)
    dup = Annotations("dup", root, [e["video"] for e in per_sentence],
                      [[clean_caption(e["caption"])] for e in per_sentence])
    unmerged, _ = score(env, tmp_path / "dup.npy", dup)
    assert unmerged["t2v_meanr"] > m["t2v_meanr"] and unmerged["videos"] == 12
    # ClipBERT JSON Lines: clip_name without extension
    lines = [json.dumps({"caption": e["caption"], "clip_name": e["video"][:-4],
                         "retrieval_key": f"ret{k}"}) for k, e in enumerate(per_sentence)]
    jl = tmp_path / "test.jsonl"
    jl.write_text("\n".join(lines) + "\n")
    ann, _ = same_numbers(env, tmp_path, jl, root, ref)
    assert (ann.format, ann.merged, ann.found) == ("jsonl", 6, {"NAME.mp4": 6})


def test_webvid_csv_with_a_byte_order_mark(env, tmp_path):
    root = link(tmp_path / "videos", [f"{1000 + i}.mp4" for i in range(6)], env["clips"])
    rows = ["videoid,contentUrl,duration,page_dir,name"] + [
        f'{1000 + i},https://x/{i}.mp4,PT00H00M10S,000,"{s[0]}"' for i, s in enumerate(env["sentences"])]
    path = tmp_path / "results_2M_val.csv"
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    assert detect(path).format == "webvid_csv"
    ref = reference(env, tmp_path, [f"{1000 + i}.mp4" for i in range(6)],
                    [s[0] for s in env["sentences"]], root)
    same_numbers(env, tmp_path, path, root, ref)
    assert read_annotations(path, root).num_videos == 6  # the training reader too


# ---------------------------------------------------------------------------- DiDeMo, ActivityNet

def _didemo(env):
    """LocalizingMoments test_data.json: one entry per moment, a video's moments apart."""
    return [{"annotation_id": 100 * k + i, "description": s[k], "video": v,
             "times": [[k, k + 1], [k, k + 2]], "download_link": "https://www.flickr.com/x",
             "num_segments": 6}
            for k in range(2) for i, (v, s) in enumerate(zip(FLICKR, env["sentences"]))]


def test_didemo_is_paragraph_to_video(env, tmp_path):
    """DiDeMo names keep their own extension; a .mov converted to NAME.mp4 is found too."""
    on_disk = [n if i % 2 else n[:-4] + ".mp4" for i, n in enumerate(FLICKR)]
    root = link(tmp_path / "videos", on_disk, env["clips"])
    path = write_json(tmp_path / "test_data.json", _didemo(env))
    assert detect(path).format == "didemo"
    para = reference(env, tmp_path, on_disk, env["sentences"], root, paragraph=True)
    ann, m = same_numbers(env, tmp_path, path, root, para)  # default: paragraphs
    assert (ann.paragraph, ann.merged, m["captions"]) == (True, 6, 6)
    assert ann.found == {"NAME.mp4": 3, "listed name (own extension)": 3}
    sent = reference(env, tmp_path, on_disk, env["sentences"], root)
    ann, m = same_numbers(env, tmp_path, path, root, sent, paragraph=False)  # --no-paragraph
    assert (ann.paragraph, m["captions"]) == (False, 12)


def test_activitynet_cli_paragraphs_names_and_output(env, tmp_path, capsys):
    """val_1.json ({"v_ID": {duration, timestamps, sentences}}) through the CLI: the format line,
    one warning line counting v_ID.mp4 and ID.mp4, the output keys, paragraph-to-video."""
    on_disk = [f"v_{y}.mp4" if i < 4 else f"{y}.mp4" for i, y in enumerate(YT)]
    root = link(tmp_path / "videos", on_disk, env["clips"])
    val = {f"v_{y}": {"duration": 82.7, "timestamps": [[0.0, 40.1], [38.2, 82.7]],
                      "sentences": [f" {s[0]}", f"  {s[1]} "]}
           for y, s in zip(YT, env["sentences"])}
    path = write_json(tmp_path / "val_1.json", val)
    para = reference(env, tmp_path, on_disk, env["sentences"], root, paragraph=True)
    main(["--checkpoint", str(env["final"]), "--ann", str(path), "--video-root", str(root),
          "--frames", "4", "--workers", "0", "--dump-scores", str(tmp_path / "cli.npy")])
    out, err = capsys.readouterr()
    m = json.loads(out.strip().splitlines()[-1])
    np.testing.assert_allclose(np.load(tmp_path / "cli.npy"), para[1], atol=1e-6)
    for k in KEYS:
        assert m[k] == pytest.approx(para[0][k]), k
    assert (m["format"], m["task"], m["videos"], m["captions"], m["merged"], m["paragraph"]) == \
        ("activitynet", "retrieval", 6, 6, 0, True)
    fmt = [line for line in err.splitlines() if line.startswith("format: ")]
    assert len(fmt) == 1 and "activitynet" in fmt[0] and "paragraph-to-video" in fmt[0]
    warn = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warn) == 1 and "4 as v_ID.mp4" in warn[0] and "2 as ID.mp4" in warn[0], err
    main(["--checkpoint", str(env["final"]), "--ann", str(path), "--video-root", str(root),
          "--frames", "4", "--workers", "0", "--no-paragraph"])
    m = json.loads(capsys.readouterr()[0].strip().splitlines()[-1])
    assert (m["captions"], m["paragraph"]) == (12, False)
    # --split means MSRVTT_data.json's splits: on a file without splits it is one error line
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(env["final"]), "--ann", str(path), "--video-root", str(root),
              "--frames", "4", "--workers", "0", "--split", "val"])
    err = capsys.readouterr()[1]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert e.value.code == 2 and len(lines) == 1 and "activitynet" in lines[0] and "--split" in lines[0], err


# ---------------------------------------------------------------------------- multiple choice

def test_umt_multiple_choice_is_accuracy_not_retrieval(env, tmp_path, capsys):
    """msrvtt_mc_test.json ({"video", "caption": [5 options], "answer"}): multiple-choice
    accuracy, the same as hvfm's {"video", "options", "answer"}; never R@k."""
    names = [f"video{i}.mp4" for i in IDS]
    root = link(tmp_path / "videos", names, env["clips"])
    firsts = [s[0] for s in env["sentences"]]
    questions = [{"video": v, "answer": k % 5, "qid": f"mc{k}",
                  "caption": [firsts[(k + j - k % 5) % 6] for j in range(5)]}
                 for k, v in enumerate(names)]
    assert all(q["caption"][q["answer"]] == firsts[k] for k, q in enumerate(questions))
    umt = write_json(tmp_path / "msrvtt_mc_test.json", questions)
    own = write_json(tmp_path / "mc.json", [{"video": q["video"], "options": q["caption"],
                                             "answer": q["answer"]} for q in questions])
    assert detect(umt).format == "list_mc" and detect(umt).task == "multiple_choice"
    ref_ann, ref_answers = read_eval_annotations(own, root)
    ref = evaluate_mc(env["model"], env["tok"], ref_ann, ref_answers, **KW)
    ann, answers = read_eval_annotations(umt, root)
    assert answers.tolist() == [q["answer"] for q in questions]
    main(["--checkpoint", str(env["final"]), "--ann", str(umt), "--video-root", str(root),
          "--frames", "4", "--workers", "0"])
    out, err = capsys.readouterr()
    m = json.loads(out.strip().splitlines()[-1])
    assert (m["format"], m["task"], m["questions"], m["captions"]) == \
        ("list_mc", "multiple_choice", 6, 30)
    assert m["mc_acc"] == pytest.approx(ref["mc_acc"]) and m["mc_chance"] == pytest.approx(20.0)
    assert not any(k.startswith(("t2v", "v2t")) for k in m)
    assert "multiple choice" in [line for line in err.splitlines() if line.startswith("format: ")][0]
    jl = tmp_path / "mc.jsonl"  # ClipBERT MC JSON Lines
    jl.write_text("\n".join(json.dumps({"clip_name": q["video"][:-4], "options": q["caption"],
                                        "answer": q["answer"]}) for q in questions))
    ann, answers = read_eval_annotations(jl, root)
    assert ann.format == "jsonl" and answers.tolist() == ref_answers.tolist()
    assert evaluate_mc(env["model"], env["tok"], ann, answers, **KW)["mc_acc"] == \
        pytest.approx(ref["mc_acc"])
    with pytest.raises(DataError, match="multiple-choice file"):  # not training pairs
        read_annotations(umt, root)


# ---------------------------------------------------------------------------- errors

AMBIGUOUS = {
    "none.json": ('[{"video": "a.mp4", "question": "q?", "answer": "yes"}]', "fits none", None),
    "two.json": ('[{"video": "a.mp4", "caption": "x", "description": "y"}]', "fits 2 formats",
                 ("list", "didemo")),
    "two.csv": ("videoid,name,video_id,sentence\n1,x,video1,y\n", "fits 2 formats",
                ("webvid_csv", "msrvtt_csv")),
    "none.csv": ("id,text\n1,x\n", "fits none", None),
    "dict.json": ('{"video": "a.mp4", "caption": "x"}', "fits none", None),
}


@pytest.mark.parametrize("name", sorted(AMBIGUOUS))
def test_a_file_that_fits_no_format_or_two_is_one_line(env, tmp_path, capsys, name):
    text, words, formats = AMBIGUOUS[name]
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(env["final"]), "--ann", str(path), "--video-root",
              str(tmp_path), "--frames", "4", "--workers", "0"])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and not out.strip() and "Traceback" not in err, err
    assert str(path) in lines[0] and words in lines[0]
    for f in formats or FORMATS:  # the two it fits, or every format hvfm reads
        assert f in lines[0], f


# ---------------------------------------------------------------------------- fine-tuning data

def test_trainer_reads_the_9k_split_and_evaluates_with_the_protocol(env, tmp_path, monkeypatch,
                                                                     capsys):
    """The trainer's --train-csv / --train-json take MSR-VTT's 9k CSV (each video with all its
    sentences, one training pair each) and --eval-json a DiDeMo file (paragraphs), as the README's
    fine-tuning command gives them."""
    import torch.distributed as dist

    from hvfm.builtin_run import prepare_data
    from hvfm.config import parse_args

    root = link(tmp_path / "videos", [f"video{i}.mp4" for i in IDS], env["clips"])
    link(root, FLICKR, env["clips"])
    write_json(tmp_path / "MSRVTT_data.json", _msrvtt_data(env))
    nine_k = tmp_path / "MSRVTT_train.9k.csv"
    nine_k.write_text("video_id\n" + "".join(f"video{i}\n" for i in IDS))
    didemo = write_json(tmp_path / "test_data.json", _didemo(env))
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 1)
    monkeypatch.setattr(dist, "barrier", lambda *a: None)
    for flag in ("--train-csv", "--train-json"):
        args = parse_args(["--deepspeed", "ds_configs/z2.json", flag, str(nine_k), "--video-root",
                           str(root), "--tokenizer", str(tmp_path), "--eval-json", str(didemo),
                           "--eval-video-root", str(root)])
        train, evaluation, _ = prepare_data(args, tmp_path / "out", 0)
        assert (train.format, train.num_videos, len(train)) == ("msrvtt_split_csv", 6, 12)
        assert train.captions_of(2) == [clean_caption(c) for c in env["sentences"][2]]
        assert train.pair_video.tolist() == np.repeat(np.arange(6), 2).tolist()
        assert (evaluation.format, evaluation.paragraph, evaluation.num_videos, len(evaluation)) == \
            ("didemo", True, 6, 6)
        out = capsys.readouterr().out.splitlines()  # the run says what it read each file as
        assert [line.split(",")[0] for line in out] == ["data (train): msrvtt_split_csv",
                                                         "data (eval): didemo"], out


def test_readme_benchmark_commands_parse():
    """Every command of the README's Benchmarks section is one the CLIs accept."""
    import shlex

    from hvfm.config import parse_args as train_args
    from hvfm.evaluate import parse_args as eval_args

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    commands = [c.replace("\\\n", " ") for block in section.split("```bash")[1:]
                for c in block.split("```")[0].replace("\\\n", " ").splitlines()
                if c.strip() and not c.startswith("#")]
    evals = [shlex.split(c)[3:] for c in commands if c.startswith("python -m hvfm.evaluate")]
    trains = [shlex.split(c)[4:] for c in commands if c.startswith("deepspeed")]
    assert len(evals) == 6 and len(trains) == 1
    for argv in evals:
        assert eval_args(argv).ann
    args = train_args(trains[0])
    assert args.train_csv.endswith("MSRVTT_train.9k.csv") and args.eval_json.endswith(".csv")
    for name in FORMATS:
        assert f"`{name}`" in section, name
