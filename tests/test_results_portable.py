"""Committed results carry no path of the machine that wrote them (relative to the repository, or
a placeholder), and the writers see to it."""
import json
import re
import tempfile
from pathlib import Path

from profiling.machine import ROOT, portable, write_json

ABSOLUTE = re.compile(r"(?<![\w.<~-])/(work|home|tmp|root|Users|var|opt|mnt|scratch)/")


def test_committed_results_hold_no_machine_paths():
    files = sorted((ROOT / "profiling" / "results").glob("*.json")) + \
        sorted((ROOT / "profiling" / "results").glob("*.md"))
    assert files
    for path in files:
        bad = ABSOLUTE.findall(path.read_text())
        assert not bad, f"{path.name}: absolute paths ({bad[:3]}); write it through profiling.machine.write_json"


def test_writer_makes_paths_portable(tmp_path, monkeypatch):
    monkeypatch.setenv("HVFM_CACHE", "/data/cache")
    payload = {"config": f"{ROOT}/ds_configs/z2.json", "out": str(ROOT),
               "cmd": f"hvfm/train.py --deepspeed {ROOT}/ds_configs/z2.json --output-dir {tempfile.gettempdir()}/run",
               "corpus": ["/data/cache/synthetic/x"], "ratio": "3/4", "n": 3}
    written = json.loads(write_json(tmp_path / "r.json", payload).read_text())
    assert written == {"config": "ds_configs/z2.json", "out": ".",
                       "cmd": "hvfm/train.py --deepspeed ds_configs/z2.json --output-dir <tmp>/run",
                       "corpus": ["<HVFM_CACHE>/synthetic/x"], "ratio": "3/4", "n": 3}
    sibling = portable(f"{ROOT}x/y")  # a sibling folder is not the repository (it may be a temp path)
    assert sibling.endswith(f"{ROOT.name}x/y") and not sibling.startswith(("x/", "./"))
