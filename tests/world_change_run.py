"""A checkpoint saved on 2 ranks, resumed on 1 (tests/test_resume_scale.py runs this in
subprocesses so the test process keeps no process group):

    python tests/world_change_run.py save 2 CKPT OUT.json     # 3 steps, save step 3, step 4
    python tests/world_change_run.py resume 1 CKPT OUT.json   # resume with accumulation 1 (an
                                                              # error), then 2 (the same global batch)

(a 5th argument names another ds_configs/ file than z2, e.g. z1 or z3)

Each rank builds the mini model and the trainer's own engine (hvfm.build.build_engine from
ds_configs/z2.json, bf16, the trainer's LR groups and warm-up + cosine schedule), steps with the
trainer's `train_step` and saves / resumes with hvfm.checkpoint; rank 0 writes what it measured
to OUT.json: LRs, step counts, sums of the fp32 master weights and Adam moments over all ranks'
partitions, losses, the loader state the resume handed over."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MICRO, STEPS = 2, 10


def build(world, accum, config="z2"):
    import torch
    from hvfm.build import build_engine
    from hvfm.config import read_ds_config
    from hvfm.model import VideoLanguageModel
    from hvfm.model.testing import tiny_clip, tiny_tokenizer
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = VideoLanguageModel.from_clip(tiny_clip(tok, dtype=torch.float32), tok, fusion_layers=1,
                                         max_frames=4, motion=True)
    cfg = read_ds_config(ROOT / "ds_configs" / f"{config}.json", world, MICRO)
    cfg["gradient_accumulation_steps"] = accum
    args = SimpleNamespace(lr=None, warmup_steps=1, temporal_lr_mult=100.0, fresh_lr_mult=10.0)
    engine, scheduler, _, dtype, _ = build_engine(model, cfg, "bf16", args, STEPS)
    return engine, scheduler, dtype, tok


def step(engine, tok, dtype, step, accum, rank):
    """One optimizer step of `accum` micro-batches (batch contents differ by rank and micro-step)."""
    import numpy as np
    import torch
    from hvfm.model.testing import tiny_batch
    from hvfm.loop import train_step
    args = SimpleNamespace(drop_ratio="0.5", reverse_negatives=1.0, vtm_hardness=0.0)
    losses = []
    for m in range(accum):
        batch = tiny_batch(tok, ["a red ball moves left", "the blue box"], [2, 2], image=32,
                           seed=100 * step + 10 * rank + m)
        out = train_step(engine, batch, np.random.SeedSequence([0, step, m, rank]), args,
                         {"vtc": 1.0, "vtm": 1.0, "mlm": 1.0}, dtype, torch.zeros(()))
        losses.append(float(out["loss"].detach()))
    return losses


def optimizer_sums(engine):
    """Sums over every rank's partition: fp32 master weights, Adam's exp_avg, exp_avg_sq; and
    Adam's step count (the same on every rank)."""
    import torch
    import torch.distributed as dist
    opt = engine.optimizer
    sums = torch.zeros(3, dtype=torch.float64)
    steps = set()
    groups = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
    for p in groups:
        st = opt.optimizer.state[p]
        sums += torch.stack([p.double().abs().sum(), st["exp_avg"].double().abs().sum(),
                             st["exp_avg_sq"].double().sum()])
        steps.add(int(st["step"]))
    dist.all_reduce(sums)
    return {"master": sums[0].item(), "exp_avg": sums[1].item(), "exp_avg_sq": sums[2].item(),
            "adam_step": sorted(steps)}


class Loader:
    """What the checkpoint asks of a loader: a state per rank, and the state it is handed back."""

    def __init__(self, rank):
        self.rank, self.got = rank, None

    def state_dict(self):
        return {"epoch": 1, "position": 12, "skipped": 1 + self.rank, "bad_drawn": self.rank,
                "timeouts": 0, "crashes": 0, "shard_raw": [{"k": 12, "r": 15, "buf": [13, 14]}],
                "shard_layout": [2, 1]}

    def load_state_dict(self, state):
        self.got = state


def worker(rank, world, port, mode, ckpt, out, config):
    import deepspeed
    import torch
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    from hvfm import checkpoint
    result = {}
    try:
        loader = Loader(rank)
        if mode == "save":
            engine, scheduler, dtype, tok = build(world, 1, config)
            for s in range(3):
                step(engine, tok, dtype, s, 1, rank)
            result["saved"] = {"lr": scheduler.get_last_lr(), "global_steps": engine.global_steps,
                               **optimizer_sums(engine)}
            checkpoint.save(engine, ckpt, 3, checkpoint.client_state(3, loader, 1.5, 0, 3))
            step(engine, tok, dtype, 3, 1, rank)
            result["next_lr"] = scheduler.get_last_lr()
        else:
            engine, *_ = build(world, 1, config)  # half the global batch: refused before any conversion
            try:
                checkpoint.resume(engine, ckpt, loader, rank, world)
                result["error"] = None
            except checkpoint.CheckpointError as e:
                result["error"] = str(e)
                result["converted_before_check"] = any(Path(ckpt).glob("*universal*"))
            del engine
            engine, scheduler, dtype, tok = build(world, 2, config)
            client = checkpoint.resume(engine, ckpt, loader, rank, world)
            result["resumed"] = {"lr": scheduler.get_last_lr(), "global_steps": engine.global_steps,
                                 "client_step": client["step"], **optimizer_sums(engine)}
            result["loader"] = loader.got
            result["losses"] = step(engine, tok, dtype, 3, 2, rank)
            result["next_lr"] = scheduler.get_last_lr()
            checkpoint.save(engine, ckpt, 4, checkpoint.client_state(4, loader, 2.0, 0, 5))
            result["saved_layout"] = checkpoint.saved_layout(Path(ckpt) / "step00000004")
        if rank == 0:
            Path(out).write_text(json.dumps(result))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    import torch.multiprocessing as mp
    mode, world, ckpt, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    config = sys.argv[5] if len(sys.argv) > 5 else "z2"
    from hvfm.distributed import free_port
    port = free_port()
    mp.spawn(worker, args=(world, port, mode, ckpt, out, config), nprocs=world)
