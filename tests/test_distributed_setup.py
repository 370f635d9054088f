"""Device binding and precision on GPUs, with CUDA mocked: what gloo on a CPU cannot show."""
import json

import pytest
import torch

from hvfm import config, distributed
from hvfm import train as tm


def _record(monkeypatch, calls, rank=1):
    import deepspeed
    import torch.distributed as dist
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(deepspeed, "init_distributed",
                        lambda **kw: calls.append(("init_process_group", kw["dist_backend"])))
    monkeypatch.setattr(dist, "get_rank", lambda: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda box, src=0: calls.append(("broadcast_object_list", src)))
    for k, v in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2)):
        monkeypatch.setenv(k, str(v))


def test_each_rank_binds_its_gpu_before_the_first_collective(monkeypatch):
    calls = []
    _record(monkeypatch, calls)
    assert distributed.init_distributed(cuda=True) == (1, 2)
    distributed.broadcast("runs/x")  # the trainer's first object collective (no --output-dir)
    # NCCL object collectives stage on the current device: it must be cuda:LOCAL_RANK by then
    assert calls == [("set_device", 1), ("init_process_group", "nccl"), ("broadcast_object_list", 0)]


def test_cpu_binds_nothing(monkeypatch):
    calls = []
    _record(monkeypatch, calls, rank=0)
    distributed.init_distributed(cuda=False)
    assert calls == [("init_process_group", "gloo")]


@pytest.mark.parametrize("stated,flag,want", [
    (None, "auto", None),  # probed
    ("bf16", "auto", "bf16"), ("fp16", "auto", "fp16"),  # the config is obeyed
    ("bf16", "bf16", "bf16"), (None, "fp32", "fp32"),
])
def test_precision_follows_the_config(stated, flag, want):
    cfg = {"train_micro_batch_size_per_gpu": 1}  # no precision section ("bf16" off would be fp32)
    if stated:
        cfg[stated] = {"enabled": True}
    precision, why = config.pick_precision(flag, cuda=True, cfg=cfg, source="c.json")
    assert precision == (want or "bf16")  # auto on a GPU: bf16
    assert why and "\n" not in why
    if stated and flag == "auto":
        assert "c.json" in why


@pytest.mark.parametrize("stated,flag", [("bf16", "fp32"), ("fp16", "bf16"), ("bf16", "fp16")])
def test_a_flag_that_contradicts_the_config_is_one_error(stated, flag):
    cfg = {stated: {"enabled": True}}
    with pytest.raises(config.ConfigError) as e:
        config.pick_precision(flag, cuda=True, cfg=cfg, source="c.json")
    msg = str(e.value)
    assert "\n" not in msg and f"--precision {flag}" in msg and "c.json" in msg and stated in msg


def test_shipped_configs_state_no_precision():
    from pathlib import Path
    for path in sorted((Path(tm.__file__).parents[1] / "ds_configs").glob("*.json")):
        cfg = json.loads(path.read_text())
        assert "bf16" not in cfg and "fp16" not in cfg and "bfloat16" not in cfg, path.name


def test_clip_hub_id_offline_fails_in_one_line_with_the_recipe(monkeypatch):
    from hvfm.model.clip import load_clip, looks_like_hub_id
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert looks_like_hub_id("openai/clip-vit-base-patch16") and looks_like_hub_id("clip-vit")
    assert not looks_like_hub_id("/models/clip") and not looks_like_hub_id("./clip")
    assert not looks_like_hub_id("a/b/c")
    with pytest.raises(ValueError) as e:
        load_clip("openai/clip-vit-base-patch16")
    msg = str(e.value)
    assert "\n" not in msg and "openai/clip-vit-base-patch16" in msg
    assert "save_pretrained('DIR')" in msg and "--clip DIR" in msg
    with pytest.raises(ValueError, match="does not exist"):
        load_clip("/nonexistent/clip")
