"""The training step and the DeepSpeed set-up on real engines (2 ranks, gloo on CPU; one launch
of tests/engine_checks.py for the module): a non-finite loss or non-finite gradients skip the
update on every rank without a host sync of ours between forward and backward; ZeRO-3's shipped
thresholds partition even a mini model; bf16 under ZeRO accumulates in fp32; the CLIP towers
learn at a lower LR than the fresh layers and the parameters of time. Plus the config-level
checks (hvfm.config) and, on a GPU only, a whole step under CUDA's sync debug mode."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hvfm.config import ConfigError, engine_config, read_ds_config

ROOT = Path(__file__).resolve().parents[1]
CASES = ("partition:z3", "partition:z3_offload", "nonfinite:z2:fp32", "nonfinite:z1:bf16",
         "nonfinite:z3:fp32", "nonfinite:z2:fp32:0", "groups:z2")


# One launch for the module: ~25 s of CPU, 60-90 s of wall time on 2 shared cores (start-up of 2
# ranks and 7 engines). CI runs these: nothing else covers the engine-level behaviour.
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    out = tmp_path_factory.mktemp("engines") / "checks.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "tests/engine_checks.py", str(out), "2", *CASES], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@SLOW
@pytest.mark.parametrize("config", ["z3", "z3_offload"])
def test_zero3_thresholds_partition_the_mini_model(engines, config):
    params = engines[f"partition:{config}"]["params"]
    # Partitioned: not kept whole (not persistent), this rank holds a shard smaller than the
    # parameter, and nothing of it lives in the module between uses.
    split = [p for p in params if not p["persist"] and p["shard"] < p["ds_numel"] and p["local"] < p["ds_numel"]]
    assert split, "no parameter is partitioned"
    assert "video.embeddings.patch_weight" in {p["name"] for p in split}
    assert all(p["shard"] == -(-p["ds_numel"] // 2) for p in split)  # half each, rounded up
    assert all(p["ds_numel"] > engines[f"partition:{config}"]["zero"]["stage3_param_persistence_threshold"]
               for p in split)


@SLOW
@pytest.mark.parametrize("case", ["nonfinite:z2:fp32", "nonfinite:z1:bf16", "nonfinite:z3:fp32"])
def test_nonfinite_loss_and_gradients_skip_the_update_on_every_rank(engines, case):
    res = engines[case]
    loss, grad, clean = res["steps"]
    assert not res["host_check"]
    # NaN loss on rank 1 only: backward and step ran, DeepSpeed skipped the update (both ranks
    # agree: rank 0 reports the skip too), the device counter says "loss", weights untouched.
    assert loss == {"fault": "loss@1", "returned": True, "skipped": 1, "bad_loss": 1.0,
                    "changed": False, "finite": True}
    # NaN gradients on rank 0 with a finite loss: skipped, counter 0 ("gradient").
    assert grad == {"fault": "grad@0", "returned": True, "skipped": 1, "bad_loss": 0.0,
                    "changed": False, "finite": True}
    assert clean["skipped"] == 0 and clean["changed"] and clean["finite"] and clean["bad_loss"] == 0.0


@SLOW
def test_without_zero_a_nonfinite_loss_is_caught_before_the_backward(engines):
    res = engines["nonfinite:z2:fp32:0"]
    loss, clean = res["steps"]
    assert res["host_check"]
    assert loss["returned"] is False and not loss["changed"] and loss["finite"]
    assert clean["returned"] and clean["changed"] and clean["finite"]


@SLOW
def test_bf16_under_zero_accumulates_gradients_in_fp32(engines):
    assert engines["nonfinite:z1:bf16"]["data_types"] == {"grad_accum_dtype": "fp32"}
    assert engines["nonfinite:z1:bf16"]["optimizer"] == "BF16_Optimizer"  # DeepSpeed's fp32-accumulating one
    assert engines["nonfinite:z2:fp32"]["data_types"] is None


def test_engine_config_adds_fp32_accumulation_under_bf16_zero():
    cfg = {"zero_optimization": {"stage": 2}, "optimizer": {"params": {"lr": 1e-4}}}
    assert engine_config(cfg, "bf16")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in engine_config({}, "bf16")  # no ZeRO: DeepSpeed has no such mode
    assert "data_types" not in engine_config(cfg, "fp32")
    mine = {**cfg, "data_types": {"grad_accum_dtype": "bf16"}}
    assert engine_config(mine, "bf16")["data_types"] == {"grad_accum_dtype": "bf16"}  # the file's wins
    assert engine_config(cfg, "bf16", lr=3e-4)["optimizer"]["params"]["lr"] == 3e-4
    assert cfg["optimizer"]["params"]["lr"] == 1e-4  # the caller's config is not changed


@SLOW
def test_clip_towers_learn_slower_than_fresh_layers_and_time(engines):
    res = engines["groups:z2"]
    base = res["config_lr"]
    lr_of = {}
    for g in res["groups"]:
        for name in g["names"]:
            lr_of[name] = g["lr"]
    towers = [n for n in lr_of if n.startswith(("video.layers.", "text.layers.", "video.embeddings.patch_weight"))]
    fresh = [n for n in lr_of if ".cross_attn." in n or "vtm_head" in n or "mlm_head" in n]
    time_ = [n for n in lr_of if n in ("video.embeddings.temporal_embedding", "video.embeddings.motion_weight")]
    assert towers and fresh and len(time_) == 2
    assert [lr_of[n] for n in towers] == pytest.approx([base] * len(towers))
    assert [lr_of[n] for n in fresh] == pytest.approx([10 * base] * len(fresh))
    assert [lr_of[n] for n in time_] == pytest.approx([100 * base] * 2)


def test_shipped_configs_are_valid_and_have_no_dead_sections(tmp_path):
    for path in sorted((ROOT / "ds_configs").glob("*.json")):
        cfg = read_ds_config(path, 1)
        # activation checkpointing is --activation-checkpointing (the model's own per-block
        # recompute); a DeepSpeed section for it would be read by nothing
        assert "activation_checkpointing" not in cfg, path
        z = cfg["zero_optimization"]
        if z.get("offload_optimizer"):
            assert z["offload_optimizer"]["pin_memory"] is True and z["offload_param"]["pin_memory"] is True
    bad = tmp_path / "ac.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "activation_checkpointing": {}}))
    with pytest.raises(ConfigError, match="--activation-checkpointing"):
        read_ds_config(bad, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the sync debug mode is a CUDA feature")
def test_one_training_step_has_no_host_sync_of_ours(tmp_path):
    """One whole step (forward, backward, engine.step) of the trainer's GPU path (triton attention,
    the fused Triton patch embedding) under torch.cuda.set_sync_debug_mode("error"), except two
    known syncs run with the mode off:
    DeepSpeed's overflow check and gradient norm inside engine.step() (its own, needed to skip a
    step), and losses.host_pairs (the VTM pairs' packed layout needs host lengths)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "sync.json"
    r = subprocess.run([sys.executable, "tests/engine_checks.py", str(out), "1", "syncfree:z2:bf16"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())["syncfree:z2:bf16"]
    assert res["ok"] and res["skipped"] == 0
    assert res["attn"] == "triton" and res["patch_embed"] == "triton"  # not the sdpa path
