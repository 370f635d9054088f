"""Checks that need a real DeepSpeed engine in a process group of their own (gloo on CPU, or NCCL
on GPUs), run by tests/test_train_step.py in a subprocess so that the test process keeps no
process group: `python tests/engine_checks.py OUT.json WORLD CASE:ARG:ARG ...` (the cases run
one after the other in one launch: start-up is most of the cost). Each rank builds a mini
model, the trainer's parameter groups and engine config (hvfm.optim, hvfm.config.engine_config)
from a shipped ds_configs/*.json, and rank 0 writes what it measured to OUT.json.

Cases:
  partition CONFIG   ZeRO-3: per parameter, its full size (ds_numel) and this rank's shard
  nonfinite CONFIG PRECISION   train_step with a NaN loss on rank 1 only, then NaN gradients on
                     rank 0 only, then a clean step: skips, the device counter, weights
  groups CONFIG      the LR of each optimizer group as the engine holds it
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build(config, precision="fp32", attn="sdpa", clip=None, **overrides):
    import deepspeed
    import torch
    from hvfm.config import engine_config, read_ds_config
    from hvfm.model import VideoLanguageModel
    from hvfm.model.testing import tiny_clip, tiny_tokenizer
    from hvfm.optim import lr_lambda, param_groups
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = VideoLanguageModel.from_clip(tiny_clip(tok, dtype=torch.float32, **(clip or {})), tok,
                                         fusion_layers=1, max_frames=4, motion=True, attn=attn)
    cfg = read_ds_config(ROOT / "ds_configs" / f"{config}.json", torch.distributed.get_world_size(), 2)
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), **overrides}
    cfg = engine_config(cfg, precision)
    opt = cfg["optimizer"]["params"]
    groups = param_groups(model, opt["weight_decay"], opt["lr"], 100.0, 10.0)
    names = {id(p): n for n, p in model.named_parameters()}
    group_names = [[names[id(p)] for p in g["params"]] for g in groups]  # in DeepSpeed's order
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=cfg,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(10, 1)))
    return engine, tok, cfg, group_names


def batch(tok, seed):
    from hvfm.model.testing import tiny_batch
    return tiny_batch(tok, ["a red ball moves left", "the blue box", "a green circle then a square",
                            "a box moves up"], [2, 2, 1, 2], image=32, seed=seed)


def case_partition(rank, config):
    engine, _, cfg, _ = build(config)
    params = [{"name": n, "ds_numel": int(p.ds_numel), "shard": int(p.ds_tensor.numel()),
               "local": int(p.data.numel()),
               "persist": bool(p.ds_persist)} for n, p in engine.module.named_parameters()]
    return {"params": params, "zero": cfg["zero_optimization"]}


def case_nonfinite(rank, config, precision, stage=None):
    import numpy as np
    import torch
    from fault_train import NaNGrad
    from hvfm.loop import train_step
    engine, tok, cfg, _ = build(config, precision, **({} if stage is None else {"stage": int(stage)}))
    host_check = engine.zero_optimization_stage() == 0
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    args = SimpleNamespace(drop_ratio="0.5", reverse_negatives=1.0, vtm_hardness=0.0)
    weights = {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}
    bad = torch.zeros((), device=engine.device)

    def snapshot():  # the fp32 master weights (this rank's partition), or the module's
        for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition"):
            if hasattr(engine.optimizer, attr):
                return [p.detach().float().clone() for p in getattr(engine.optimizer, attr)]
        return [p.detach().float().clone() for p in engine.module.parameters()]

    forward = engine.forward
    report = []
    for i, fault in enumerate(["loss@1", None] if host_check else ["loss@1", "grad@0", None]):
        kind, _, on = (fault or "").partition("@")

        def faulty(*a, **kw):
            out = forward(*a, **kw)
            if fault and int(on) == rank:
                out = {**out, "loss": out["loss"] * float("nan") if kind == "loss" else NaNGrad.apply(out["loss"])}
            return out
        engine.forward = faulty
        before, skipped = snapshot(), engine.skipped_steps
        seeds = np.random.SeedSequence([0, i, 0, rank])
        out = train_step(engine, batch(tok, i), seeds, args, weights, dtype, bad, host_check)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        after = snapshot()
        report.append({"fault": fault, "returned": out is not None, "skipped": engine.skipped_steps - skipped,
                       "bad_loss": bad.item(), "changed": any(not torch.equal(a, b) for a, b in zip(before, after)),
                       "finite": all(bool(torch.isfinite(a).all()) for a in after)})
        bad.zero_()
    engine.forward = forward
    return {"steps": report, "host_check": host_check, "data_types": cfg.get("data_types"), "optimizer": type(engine.optimizer).__name__}


def case_groups(rank, config):
    engine, _, cfg, group_names = build(config)
    base = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    return {"groups": [{"lr": g["lr"], "weight_decay": g["weight_decay"], "names": names}
                       for g, names in zip(base.param_groups, group_names)],
            "config_lr": cfg["optimizer"]["params"]["lr"]}


def case_syncfree(rank, config, precision):
    """One whole step on a GPU under torch.cuda.set_sync_debug_mode("error"); the two known syncs
    (DeepSpeed's engine.step: overflow check and gradient norm; losses.host_pairs: the VTM pairs'
    packed layout) run with the mode off. The model runs the trainer's GPU path: `triton`
    attention and the fused Triton patch embedding, at head dim 64 (2 heads of width 128) as the
    ViT-B towers, so the kernels compiled for them are reused from Triton's cache."""
    import numpy as np
    import torch
    import hvfm.model.model as model_mod
    from hvfm.model import get_backend
    from hvfm.loop import train_step
    if get_backend("triton") is get_backend("sdpa"):
        raise RuntimeError("the triton attention backend is not available (it would fall back to sdpa)")
    engine, tok, cfg, _ = build(config, precision, attn="triton", clip=dict(width=128, heads=2))
    if engine.module.video.patch_embed != "triton":
        raise RuntimeError(f"patch embedding {engine.module.video.patch_embed!r}, not the fused Triton one")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    args = SimpleNamespace(drop_ratio="0.5", reverse_negatives=1.0, vtm_hardness=0.0)
    weights = {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}
    bad = torch.zeros((), device=engine.device)

    def allowed(fn):
        def run(*a, **kw):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                return fn(*a, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(mode)
        return run
    engine.step = allowed(engine.step)
    model_mod.host_pairs = allowed(model_mod.host_pairs)
    b = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch(tok, 0).items()}
    train_step(engine, dict(b), np.random.SeedSequence([0, 0, 0, rank]), args, weights, dtype, bad)  # warm-up
    skipped = engine.skipped_steps
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = train_step(engine, dict(b), np.random.SeedSequence([0, 1, 0, rank]), args, weights, dtype, bad)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"ok": out is not None and bool(torch.isfinite(out["loss"]).item()),
            "skipped": engine.skipped_steps - skipped, "attn": engine.module.video.attn,
            "patch_embed": engine.module.video.patch_embed}


def worker(rank, world, port, specs, out):
    import deepspeed
    import torch
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)
    try:
        result = {}
        for spec in specs:
            case, *extra = spec.split(":")
            result[spec] = globals()[f"case_{case}"](rank, *extra)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    out, world, *specs = sys.argv[1:]
    from hvfm.distributed import free_port
    port = free_port()
    mp.spawn(worker, args=(int(world), port, specs, out), nprocs=int(world))
