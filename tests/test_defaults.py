"""Defaults for real runs (issue 18, point 5): checkpoints by time on your data, decided by rank
0's clock for every rank; loader workers from the launcher's local rank count; an explicit fp32
DeepSpeed config trains in fp32; a hub --clip fetched once per node; a .deepspeed_env for
multi-node runs; and an error that one rank raises alone ends every rank within seconds with the
same line (two ranks launched as two nodes would be: no launcher that kills the survivor)."""
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from hvfm import config, distributed
from hvfm.build import cached_snapshot, resolve_clip
from hvfm.data.loading.dataset import default_workers, local_ranks_from_env

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- precision

@pytest.mark.parametrize("cfg,want", [
    ({"bf16": {"enabled": False}}, "fp32"),  # bf16 switched off, no fp16: fp32 to DeepSpeed
    ({"bf16": {"enabled": False}, "fp16": {"enabled": False}}, "fp32"),
    ({"fp16": {"enabled": False}}, "fp32"),
    ({"bfloat16": {"enabled": False}}, "fp32"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"bf16": {"enabled": False}, "fp16": {"enabled": True}}, "fp16"),
    ({}, None),  # no precision section: --precision auto decides
])
def test_stated_precision_follows_deepspeed(cfg, want):
    assert config.stated_precision({"train_micro_batch_size_per_gpu": 1, **cfg}) == want


@pytest.mark.parametrize("cuda", [True, False])
def test_an_explicit_fp32_config_trains_in_fp32(cuda):
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}
    precision, why = config.pick_precision("auto", cuda=cuda, cfg=cfg, source="c.json")
    assert precision == "fp32" and "c.json" in why and "disables" in why
    engine_cfg = config.engine_config(cfg, precision)
    assert engine_cfg["bf16"]["enabled"] is False and engine_cfg["fp16"]["enabled"] is False
    assert "data_types" not in engine_cfg  # fp32: no bf16 accumulation setting
    assert config.pick_precision("fp32", cuda=cuda, cfg=cfg, source="c.json")[0] == "fp32"


def test_only_a_config_without_precision_leaves_it_to_auto():
    # on a GPU auto is bf16; the same config with bf16 disabled is fp32
    assert config.pick_precision("auto", cuda=True, cfg={"train_micro_batch_size_per_gpu": 1})[0] == "bf16"
    assert config.pick_precision("auto", cuda=True, cfg={"bf16": {"enabled": False}})[0] == "fp32"


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_a_flag_against_an_fp32_config_is_one_error(flag):
    with pytest.raises(config.ConfigError) as e:
        config.pick_precision(flag, cuda=True, cfg={"bf16": {"enabled": False}}, source="c.json")
    msg = str(e.value)
    assert "\n" not in msg and f"--precision {flag}" in msg and "c.json" in msg and "fp32" in msg


# ----------------------------------------------------------------------------- flags and their defaults

def help_text():
    out = io.StringIO()
    with pytest.raises(SystemExit):
        sys.stdout, saved = out, sys.stdout
        try:
            config.parse_args(["--help"])
        finally:
            sys.stdout = saved
    return " ".join(out.getvalue().split())


def test_help_states_the_new_defaults():
    text = help_text()
    assert "--save-every-minutes M checkpoint after every M minutes of training (default: 30 on your " \
           "data, 0 on the built-in corpora; 0: never by time)" in text
    assert "(default: 0, by steps never; a run always saves at its end)" in text
    assert "LOCAL_SIZE, set by the deepspeed launcher, or LOCAL_WORLD_SIZE, set by torchrun" in text


def checked(tmp_path, *extra):
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("videoid,contentUrl,duration,page_dir,name\n1,,PT00H00M01S,d,a clip\n")
    args = config.parse_args(["--deepspeed", str(ROOT / "ds_configs" / "z2.json"), "--precision", "fp32",
                              "--output-dir", str(tmp_path / "out"), *extra])
    config.check_run(args, cuda=False)
    return args


def test_real_data_saves_every_30_minutes_the_built_in_corpus_does_not(tmp_path):
    real = ["--train-csv", str(tmp_path / "train.csv"), "--video-root", str(tmp_path)]
    assert checked(tmp_path, *real).save_every_minutes == 30.0
    assert checked(tmp_path, *real, "--save-every-minutes", "0").save_every_minutes == 0.0
    assert checked(tmp_path, *real, "--save-every-minutes", "5").save_every_minutes == 5.0
    assert checked(tmp_path).save_every_minutes == 0.0  # the built-in default: as before
    assert checked(tmp_path).save_every == 0
    with pytest.raises(config.ConfigError, match="--save-every-minutes -1"):
        checked(tmp_path, *real, "--save-every-minutes", "-1")


# ----------------------------------------------------------------------------- loader workers

@pytest.mark.parametrize("env,ranks", [
    ({"LOCAL_SIZE": "4"}, 4),  # the deepspeed launcher
    ({"LOCAL_WORLD_SIZE": "2"}, 2),  # torchrun
    ({"LOCAL_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, 8),
    ({"LOCAL_SIZE": "junk", "LOCAL_WORLD_SIZE": "2"}, 2),
    ({}, 1),
])
def test_workers_follow_the_launchers_local_rank_count(monkeypatch, env, ranks):
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert local_ranks_from_env() == ranks
    assert default_workers(cpus=32) == max(1, 32 // ranks - 1)
    assert default_workers(cpus=16) == max(1, 16 // ranks - 1)


def test_deepspeed_launchers_local_size_sets_the_worker_default(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_SIZE", "8")
    assert default_workers(cpus=24) == 2  # 24 cores / 8 ranks - 1 (with LOCAL_SIZE unread: 8)
    args = config.parse_args(["--deepspeed", "x.json"])
    assert args.workers == default_workers()


# ----------------------------------------------------------------------------- --clip once per node

class FakeGroup:
    """all_gather of `world` threads: every rank blocks until all have contributed."""

    def __init__(self, world):
        self.world, self.box, self.barrier = world, [None] * world, threading.Barrier(world)
        self.local = threading.local()

    def gather(self, obj):
        self.box[self.local.rank] = obj
        self.barrier.wait(timeout=10)
        out = list(self.box)
        self.barrier.wait(timeout=10)
        return out


def run_ranks(world, local_ranks, target):
    results, errors = [None] * world, [None] * world

    def body(rank):
        try:
            results[rank] = target(rank, local_ranks[rank])
        except Exception as e:  # noqa: BLE001 - collected for the test's assertions
            errors[rank] = e
    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results, errors


def test_a_hub_clip_is_fetched_once_per_node_and_loaded_from_the_cache(tmp_path):
    world, local = 4, [0, 1, 0, 1]  # 2 nodes of 2 ranks
    group, events, lock = FakeGroup(world), [], threading.Lock()

    def fetch(name):
        with lock:
            events.append(("fetch", group.local.rank))
        time.sleep(0.2)  # a download: the other ranks must wait for it
        with lock:
            events.append(("fetched", group.local.rank))
        return ("model", "tokenizer", "fetched")

    def locate(name):
        with lock:
            events.append(("locate", group.local.rank))
        return f"/cache/{name}"

    def target(rank, local_rank):
        group.local.rank = rank
        return resolve_clip("openai/clip-vit-base-patch16", local_rank, fetch=fetch, locate=locate,
                            load=lambda folder: ("model", "tokenizer", folder), gather=group.gather)
    results, errors = run_ranks(world, local, target)
    assert errors == [None] * world
    assert sorted(r for kind, r in events if kind == "fetch") == [0, 2]  # local rank 0 of each node
    assert sorted(r for kind, r in events if kind == "locate") == [1, 3]
    last_fetch = max(i for i, (kind, _) in enumerate(events) if kind == "fetched")
    first_locate = min(i for i, (kind, _) in enumerate(events) if kind == "locate")
    assert last_fetch < first_locate  # nobody looks in the cache before every download is done
    assert results[0][2] == results[2][2] == "fetched"
    assert results[1][2] == results[3][2] == "/cache/openai/clip-vit-base-patch16"


def test_a_failed_fetch_on_one_node_is_the_same_error_on_every_rank():
    world, local = 4, [0, 1, 0, 1]
    group = FakeGroup(world)

    def fetch(name):
        if group.local.rank == 2:
            raise ValueError(f"--clip {name}: not a folder, and transformers could not load it (offline)")
        return ("model", "tokenizer")

    def target(rank, local_rank):
        group.local.rank = rank
        return resolve_clip("org/clip", local_rank, fetch=fetch, locate=lambda n: "/x",
                            load=lambda folder: ("model", "tokenizer"), gather=group.gather)
    _, errors = run_ranks(world, local, target)
    assert all(isinstance(e, config.ConfigError) for e in errors), errors
    assert {str(e) for e in errors} == {"--clip org/clip: not a folder, and transformers could not load it (offline)"}
    assert all(e.collective for e in errors)  # raised together: one line, the ranks end together


def test_a_folder_clip_is_loaded_by_every_rank_without_a_fetch(tmp_path):
    calls = []
    out = resolve_clip(str(tmp_path), 1, fetch=lambda n: calls.append(n), gather=lambda o: calls.append(o),
                       load=lambda folder: ("model", folder))
    assert out == ("model", str(tmp_path)) and calls == []


def test_cached_snapshot_finds_the_hub_cache_offline(tmp_path, monkeypatch):
    """The lookup the other ranks do, on a Hugging Face cache laid out as a download leaves it."""
    import huggingface_hub.constants as c
    cache = tmp_path / "hub"
    snap = cache / "models--org--clip" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (cache / "models--org--clip" / "refs").mkdir()
    (cache / "models--org--clip" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    found = cached_snapshot("org/clip")
    assert Path(found) == snap
    with pytest.raises(ValueError) as e:
        cached_snapshot("org/other")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- .deepspeed_env

def deepspeed_reads(path):
    """What the deepspeed launcher exports from a .deepspeed_env: its own parsing
    (deepspeed/launcher/runner.py) into its own runner's add_export."""
    from deepspeed.launcher.multinode_runner import PDSHRunner
    runner = PDSHRunner(SimpleNamespace(user_script="hvfm/train.py", user_args=[]), "e30=")
    with open(path) as fd:
        for var in fd.readlines():
            key, val = var.split("=", maxsplit=1)
            runner.add_export(key, val)
    return runner.exports


def test_deepspeed_env_launcher_file_name_and_places():
    from deepspeed.launcher import runner
    assert runner.DEEPSPEED_ENVIRONMENT_NAME == os.getenv("DS_ENV_FILE", ".deepspeed_env")
    assert runner.DEEPSPEED_ENVIRONMENT_PATHS == [os.path.expanduser("~"), "."]


def test_write_deepspeed_env_from_the_environment(tmp_path, monkeypatch, capsys):
    for name in distributed.DEEPSPEED_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", "/shared/hf home")  # a space: the launcher quotes it
    monkeypatch.setenv("HVFM_CACHE", "/shared/hvfm")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/local/triton")
    path = tmp_path / ".deepspeed_env"
    distributed.main(["--write-deepspeed-env", str(path)])
    assert path.read_text() == "HF_HOME=/shared/hf home\nHVFM_CACHE=/shared/hvfm\nTRITON_CACHE_DIR=/local/triton\n"
    assert "3 variables (HF_HOME, HVFM_CACHE, TRITON_CACHE_DIR)" in capsys.readouterr().out
    assert deepspeed_reads(path) == {"HF_HOME": '"/shared/hf home"', "HVFM_CACHE": "/shared/hvfm",
                                     "TRITON_CACHE_DIR": "/local/triton"}
    with pytest.raises(ValueError, match="HF_HOME"):
        distributed.deepspeed_env_lines({"HF_HOME": "a\nb"})


def test_the_shipped_example_is_what_the_launcher_reads():
    example = ROOT / "ds_configs" / "deepspeed_env.example"
    exports = deepspeed_reads(example)  # no comment or blank line: the launcher would crash on one
    assert {"HF_HOME", "HVFM_CACHE", "TRITON_CACHE_DIR"} <= set(exports)
    readme = (ROOT / "ds_configs" / "README.md").read_text()
    assert "cp ds_configs/deepspeed_env.example .deepspeed_env" in readme


# ----------------------------------------------------------------------------- one error ends every rank

def test_error_watch_the_same_line_and_code_on_every_rank():
    """Three watches on one store: rank 2 fails alone, ranks 0 and 1 learn it from their threads,
    each prints the same line, counts itself, and 'exits' with the failing rank's code."""
    import torch.distributed as dist
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    exits, outs, watches = {}, {}, []
    for rank in range(3):
        outs[rank] = io.StringIO()
        client = dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False)
        w = distributed.ErrorWatch(client, rank, 3, poll_s=0.05, grace_s=5,
                                   exit=lambda code, r=rank: exits.setdefault(r, code), out=outs[rank])
        w.thread.start()
        watches.append(w)
    t0 = time.monotonic()
    watches[2].fail(2, "bad.csv: row 7: no such file; fix the row")
    for w in watches:
        w.thread.join(timeout=5)
    assert exits == {0: 2, 1: 2, 2: 2}
    assert time.monotonic() - t0 < 5
    for rank in range(3):
        assert outs[rank].getvalue().strip() == "error: bad.csv: row 7: no such file; fix the row"
    assert server.add(watches[0].seen_key, 0) == 3  # everyone printed before the failing rank left


def test_error_watch_second_failure_reports_the_first():
    import torch.distributed as dist
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    exits, outs = {}, {0: io.StringIO(), 1: io.StringIO()}
    ws = [distributed.ErrorWatch(dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False),
                                 r, 2, poll_s=60, grace_s=2, exit=lambda code, r=r: exits.setdefault(r, code),
                                 out=outs[r]) for r in range(2)]
    ws[0].fail(2, "first.csv: bad")
    ws[1].fail(1, "rank 1 failed: RuntimeError: later")
    assert exits == {0: 2, 1: 2}
    assert outs[1].getvalue().strip() == "error: first.csv: bad"


def test_error_watch_stop_is_quiet():
    import torch.distributed as dist
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    exits = {}
    w = distributed.ErrorWatch(dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False),
                               0, 2, poll_s=0.05, exit=lambda code: exits.setdefault(0, code), out=io.StringIO())
    w.thread.start()
    time.sleep(0.2)
    w.stop()
    assert not w.thread.is_alive() and exits == {}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from hvfm.data.synthetic.clips import generate
    return generate(tmp_path_factory.mktemp("syn"), n_train=24, n_test=4, frames=4, size=32, seed=0)


def test_data_error_on_one_rank_ends_both_nodes_fast_after_a_save_by_time(corpus, tmp_path):
    """Two ranks started as two nodes of one rank each (RANK/WORLD_SIZE/MASTER_* set by hand, no
    launcher to kill the survivor, gloo). --save-every-minutes 0.0001 and --log-every 2: rank 0's
    clock asks for a save at step 2 and both ranks take it (ZeRO-2 saves each rank's optimizer
    shard: a rank that did not join would hang the save). Rank 1 then raises a DataError in its
    step 3 while rank 0 is in the step's collectives: both exit with code 2 within seconds of
    each other, each printing the same one line that names the file."""
    from hvfm.distributed import free_port
    cfg = json.loads((ROOT / "ds_configs" / "z2.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 2
    (tmp_path / "z2.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    flags = ["--deepspeed", str(tmp_path / "z2.json"), "--train-csv", str(corpus.train_csv),
             "--video-root", str(corpus.train_root), "--frames", "2", "--size", "32", "--workers", "0",
             "--no-eval", "--precision", "fp32", "--max-steps", "8", "--log-every", "2",
             "--save-every-minutes", "0.0001", "--output-dir", str(out)]
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2",
                   LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   HVFM_TEST_DATA_ERROR="3@1", OMP_NUM_THREADS="1")
        logs.append(open(tmp_path / f"rank{rank}.log", "w+"))
        procs.append(subprocess.Popen([sys.executable, "tests/fault_train.py", *flags], cwd=ROOT, env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    ended = {}
    deadline = time.monotonic() + 400
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, p in enumerate(procs):
                if rank not in ended and p.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for name in (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{r}" for r in range(2)):
            if os.path.exists(name):
                os.unlink(name)
    texts = [Path(f.name).read_text() for f in logs]
    assert len(ended) == 2, ("a rank still ran", texts[0][-2000:], texts[1][-2000:])
    assert abs(ended[0] - ended[1]) < 20, ended
    assert [p.returncode for p in procs] == [2, 2], (texts[0][-2000:], texts[1][-2000:])
    lines = [[line for line in t.splitlines() if line.startswith("error: ")] for t in texts]
    assert lines[0] == lines[1] and len(lines[0]) == 1, lines
    assert "injected.csv: row 3, column contentUrl" in lines[0][0] and "rank 1" in lines[0][0]
    assert "Traceback" not in texts[0] + texts[1]
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000002"  # saved by time (no --save-every)
    assert len(list((ckpt / "step00000002").glob("*optim_states.pt"))) == 2  # both ranks' shards
