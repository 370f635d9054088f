"""profiling/bench_rerank.py: plain and re-ranked evaluation alternated in one process."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from test_evaluate_cli import _one_thread, env  # noqa: E402,F401  (the tiny export and clips)


def test_bench_rerank_reports_both_and_the_ratio(env, tmp_path, capsys):
    from profiling.bench_rerank import main
    payload = main(["--checkpoint", str(env["final"]), "--ann", str(env["json"]),
                    "--video-root", str(env["test_root"]), "--k", "3", "--repeats", "2", "--warmup", "0",
                    "--frames", "4", "--out", str(tmp_path)])
    runs = payload["runs"]
    assert [(r["repeat"], r["k"]) for r in runs] == [(0, 0), (0, 3), (1, 3), (1, 0)]
    assert all(r["seconds"] > 0 for r in runs)
    # the same model and clips: plain runs agree with each other, re-ranked runs with each other
    assert runs[0]["t2v_r1"] == runs[3]["t2v_r1"] and runs[1]["t2v_r1"] == runs[2]["t2v_r1"]
    saved = json.loads((tmp_path / "bench_rerank.json").read_text())
    assert saved["summary"]["ratio_median"] > 0 and len(saved["summary"]["ratios"]) == 2
    assert "rerank / plain" in (tmp_path / "bench_rerank.md").read_text()
