"""The first hour of a new user: a hub ID that cannot be fetched fails at once with the whole
message, every flag of every CLI has help, and the libraries' noise stays hidden unless --verbose."""
import argparse
import importlib
import io
import logging
import os
import re
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hvfm import distributed

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "openai/clip-vit-base-patch16"


# ----------------------------------------------------------------------------- a hub ID offline

def _no_download(monkeypatch):
    """transformers' from_pretrained on a hub ID would retry a dead network for ~25 s: it must not
    be reached; nor may huggingface_hub back off between retries."""
    import huggingface_hub.utils._http as http
    from transformers import AutoTokenizer, CLIPModel

    def refuse(*a, **k):
        raise AssertionError(f"reached for the network: {a[:1]}")
    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(lambda cls, name, *a, **k: refuse(name)))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(lambda cls, name, *a, **k: refuse(name)))
    monkeypatch.setattr(http.time, "sleep", lambda s: refuse(f"sleep {s}"))


def _empty_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def _online_but_unreachable(monkeypatch):
    """Not offline, and the hub endpoint a local port nobody listens on (refused at once)."""
    import huggingface_hub.constants as hub
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "ENDPOINT", endpoint)
    return endpoint


def _assert_whole_line(msg, *words):
    assert "\n" not in msg and HUB_ID in msg, msg
    # the recipe, whole, to its last words; no sentence cut off in the middle
    assert msg.endswith("and pass --clip DIR"), msg
    assert f"CLIPModel.from_pretrained('{HUB_ID}').save_pretrained('DIR')" in msg
    assert "see how to run )" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_hub_id_with_hf_hub_offline_fails_at_once(monkeypatch, tmp_path):
    from hvfm.model.clip import load_clip
    import huggingface_hub.constants as hub
    cache = _empty_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    _no_download(monkeypatch)
    import huggingface_hub.utils as hub_utils
    monkeypatch.setattr(hub_utils, "get_session", lambda: pytest.fail("offline: no request at all"))
    with pytest.raises(ValueError) as e:
        load_clip(HUB_ID)
    _assert_whole_line(str(e.value), "HF_HUB_OFFLINE is set", str(cache))


def test_hub_id_without_network_fails_at_once(monkeypatch, tmp_path):
    from hvfm.model.clip import load_clip
    _empty_cache(monkeypatch, tmp_path)
    endpoint = _online_but_unreachable(monkeypatch)
    _no_download(monkeypatch)
    with pytest.raises(ValueError) as e:
        load_clip(HUB_ID)
    _assert_whole_line(str(e.value), endpoint, "ConnectError", "out of reach")


def test_hub_id_with_the_hub_in_reach_goes_to_transformers_and_keeps_its_whole_message(monkeypatch, tmp_path):
    """A hub that answers (a local HTTP server as HF_ENDPOINT): the probe lets transformers fetch;
    its error comes back whole, on one line."""
    import http.server
    import socketserver
    import threading

    import huggingface_hub.constants as hub
    from transformers import CLIPModel

    from hvfm.model.clip import hub_unreachable, load_clip

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(302)
            self.send_header("Location", "/somewhere")
            self.end_headers()

        def log_message(self, *a):
            pass
    _empty_cache(monkeypatch, tmp_path)
    _online_but_unreachable(monkeypatch)
    srv = socketserver.TCPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{srv.server_address[1]}")
        assert hub_unreachable() is None
        long = "We couldn't find it.\n" + "word " * 80 + "THE END."
        asked = []

        def fetch(cls, name, *a, **k):
            asked.append(name)
            raise OSError(long)
        monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(fetch))
        with pytest.raises(ValueError) as e:
            load_clip(HUB_ID)
    finally:
        srv.shutdown()
        srv.server_close()
    assert asked == [HUB_ID]
    _assert_whole_line(str(e.value), "THE END.", "OSError")


def _cached_tiny_clip(monkeypatch, tmp_path, hub_id):
    """A tiny CLIP laid out in a Hugging Face cache as a download leaves it."""
    from hvfm.model.testing import tiny_clip, tiny_tokenizer
    cache = _empty_cache(monkeypatch, tmp_path)
    repo = cache / ("models--" + hub_id.replace("/", "--"))
    snap = repo / "snapshots" / ("b" * 40)
    tok = tiny_tokenizer()
    tiny_clip(tok).save_pretrained(str(snap))
    tok.save_pretrained(str(snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    return snap


@pytest.mark.parametrize("why", ["offline", "unreachable"])
def test_hub_id_in_the_cache_loads_without_the_network(monkeypatch, tmp_path, why):
    import huggingface_hub.constants as hub
    import huggingface_hub.utils._http as http
    from hvfm.model.clip import load_clip
    _cached_tiny_clip(monkeypatch, tmp_path, "org/tiny-clip")
    monkeypatch.setattr(http.time, "sleep", lambda s: pytest.fail(f"retried a dead network (sleep {s})"))
    if why == "offline":
        monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    else:
        _online_but_unreachable(monkeypatch)
    model, tokenizer = load_clip("org/tiny-clip")
    assert model.config.vision_config.hidden_size == 32 and tokenizer.mask_token == "<|mask|>"


def test_train_with_a_hub_id_offline_exits_2_in_one_line(monkeypatch, tmp_path, capsys):
    """The trainer's start (resolve_clip, every rank): exit 2, one error line, nothing written."""
    import huggingface_hub.constants as hub
    from hvfm import train as train_mod
    from hvfm.data.synthetic.clips import generate
    corpus = generate(tmp_path / "syn", n_train=16, n_test=4, frames=8, size=32, seed=0)
    _empty_cache(monkeypatch, tmp_path)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    _no_download(monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        train_mod.main(["--deepspeed", "ds_configs/z2.json", "--train-csv", str(corpus.train_csv),
                        "--video-root", str(corpus.train_root), "--frames", "4", "--size", "32",
                        "--workers", "1", "--no-eval", "--clip", HUB_ID, "--output-dir", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    _assert_whole_line(lines[0], "HF_HUB_OFFLINE is set")
    assert not out.exists()


# ----------------------------------------------------------------------------- help on every flag

# Every CLI in hvfm: (module, the function that builds its parser and parses argv).
CLIS = [("hvfm.config", "parse_args"), ("hvfm.evaluate", "parse_args"), ("hvfm.export", "main"),
        ("hvfm.data.synthetic.clips", "main"), ("hvfm.distributed", "main"), ("hvfm.data.prepare", "main")]


class _Parser(Exception):
    pass


def parser_of(module, function, monkeypatch):
    """The ArgumentParser `module.function` builds, taken when it parses (nothing runs after)."""
    def grab(self, *a, **k):
        raise _Parser(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    with pytest.raises(_Parser) as e:
        getattr(importlib.import_module(module), function)([])
    monkeypatch.undo()
    return e.value.args[0]


def shown_help(parser, action):
    """The help text `--help` prints for `action` (its default appended by the formatter), on one line."""
    formatter = parser.formatter_class(prog=parser.prog, width=10_000)
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


@pytest.mark.parametrize("module,function", CLIS)
def test_every_flag_has_help_and_no_none_default(module, function, monkeypatch):
    parser = parser_of(module, function, monkeypatch)
    checked = 0
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert (action.help or "").strip(), f"{module}: {name} has no help text"
        text = shown_help(parser, action)
        assert "(default: None)" not in text and "default: None" not in text, f"{module}: {name}: {text}"
        checked += 1
    assert checked >= 2, (module, checked)  # the walk saw the options


def test_help_check_catches_a_missing_help_and_a_none_default(monkeypatch):
    """The check above fails on what it is for."""
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bare = parser.add_argument("--bare")
    required = parser.add_argument("--needed", required=True, help="a required flag")
    assert not bare.help
    assert "(default: None)" in shown_help(parser, required)


# ----------------------------------------------------------------------------- the libraries' noise

@pytest.fixture
def quiet(monkeypatch):
    """quiet_libraries() in this process, undone afterwards."""
    from transformers.utils import logging as hf_logging
    ds = logging.getLogger("DeepSpeed")
    level, filters, hf_level = ds.level, list(ds.filters), hf_logging.get_verbosity()
    monkeypatch.setitem(distributed.QUIET, "on", False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        distributed.quiet_libraries()
        yield
    ds.setLevel(level)
    ds.filters[:] = filters
    hf_logging.set_verbosity(hf_level)
    hf_logging.enable_progress_bar()
    from huggingface_hub.utils import enable_progress_bars
    enable_progress_bars()


def _warn_from(module, category):
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("`torch.distributed.all_gather_into_tensor` is deprecated", category,
                               filename=module.replace(".", "/") + ".py", lineno=83, module=module)
    return [str(w.message) for w in seen]


def test_quiet_hides_the_libraries_future_warnings_only(quiet):
    assert _warn_from("torch.distributed.c10d_logger", FutureWarning) == []
    assert _warn_from("deepspeed.runtime.zero.partition_parameters", FutureWarning) == []
    assert _warn_from("hvfm.loop", FutureWarning)  # hvfm's own: shown
    assert _warn_from("torch.distributed.c10d_logger", UserWarning)  # other kinds: shown


def test_quiet_hides_zero3s_note_but_not_other_deepspeed_warnings(quiet):
    ds = logging.getLogger("DeepSpeed")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    ds.addHandler(handler)
    try:
        ds.warning("A module has unknown inputs or outputs type (<class 'VideoOutput'>) and the tensors")
        ds.warning("a real problem")
        ds.info("engine report")
    finally:
        ds.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["a real problem"]


@pytest.mark.parametrize("quiet_on", [True, False])
def test_init_distributed_hides_only_the_comm_op_build_line(monkeypatch, capsys, quiet_on):
    import deepspeed
    import torch.distributed as dist

    def fake_init(**kw):
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("something else DeepSpeed says")
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    for k, v in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(k, v)
    monkeypatch.setitem(distributed.QUIET, "on", quiet_on)
    assert distributed.init_distributed(cuda=False) == (0, 1)
    out = capsys.readouterr().out
    assert "something else DeepSpeed says" in out
    assert ("built successfully" in out) is (not quiet_on)


# A line the libraries print on their own: DeepSpeed's logger ("[2026-01-01 12:00:00,000] [INFO]
# [launch.py:...]"), its comm-op build line, Python warnings.
NOISE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[|built successfully|Warning: |^\s+return func\(")


@pytest.mark.slow  # ~35 s: the only launch with the README's `deepspeed -q` and ZeRO-3's warnings
def test_a_zero3_launch_with_q_prints_no_library_line(tmp_path):
    """`deepspeed -q` with 2 ranks and ZeRO-3 (its FutureWarnings, its note on module outputs, the
    CPU comm-op build line on each rank): only hvfm's own lines on the screen."""
    from hvfm.data.synthetic.clips import generate
    corpus = generate(tmp_path / "syn", n_train=16, n_test=4, frames=8, size=32, seed=0)
    out = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["deepspeed", "-q", "--num_gpus", "2", "--master_port", str(port), "hvfm/train.py",
           "--deepspeed", "ds_configs/z3.json", "--train-csv", str(corpus.train_csv),
           "--video-root", str(corpus.train_root), "--frames", "4", "--size", "32", "--workers", "1",
           "--batch-size", "4", "--max-steps", "2", "--model", "tiny", "--no-eval",
           "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    lines = [line for text in (r.stdout, r.stderr) for line in re.split(r"[\r\n]", text) if line.strip()]
    assert any(line.startswith("done: output in") for line in lines), r.stdout[-2000:]
    noise = [line for line in lines if NOISE.search(line)]
    assert noise == [], noise


def test_noise_pattern_matches_what_the_libraries_print():
    """The launch test above would see these lines (copied from a ZeRO-3 launch without -q)."""
    for line in ["[2026-12-06 20:49:05,659] [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile",
                 "[2026-12-06 20:49:08,458] [INFO] [launch.py:152:main] WORLD INFO DICT: {'localhost': [0]}",
                 "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
                 "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_"
                 "tensor` is deprecated.", "  return func(*args, **kwargs)"]:
        assert NOISE.search(line), line
    for line in ["data (train): webvid_csv, WebVid CSV (videoid, name, ...): 16 videos",
                 "done: output in /tmp/x (the model: /tmp/x/final, metrics.csv, summary.json)"]:
        assert not NOISE.search(line), line
