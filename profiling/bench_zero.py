"""What ZeRO stages, optimizer offload and activation checkpointing buy: per-rank memory, step time.

The model gets a fusion encoder large enough for its parameters to matter (default on CPU 4 layers
of width 512 over the tiny towers, ~20M parameters; on GPU 6 layers of width 1024 over ViT-B/16).
It is trained through the DeepSpeed engine with each of ds_configs/z1.json, z2.json, z3.json and
z3_offload.json, each without and with activation checkpointing, on 2 ranks (CPU, gloo) or on the
GPUs present (nccl), a few steps each on in-memory batches (random pixels, random caption ids over a
CLIP-sized vocabulary), with the trainer's precision choice, LR groups and engine config. Per rank it reports:

  params      bytes of the storages behind the module's parameters (ZeRO-3: its partitions
              ds_tensor, plus the small parameters kept whole), in the training dtype
  grads       gradient storages right after backward: the parameters' .grad and the ZeRO
              optimizer's gradient partitions/buffers (attributes named *grad*)
  optimizer   the inner optimizer's parameters (DeepSpeed's fp32 master partitions) and its state
              (AdamW exp_avg, exp_avg_sq), after the first step created them
  buffers     any other tensor the ZeRO optimizer holds (e.g. reduce buckets)
Each storage is counted once, in the first of these groups that holds it (views into one flat
buffer are one storage). "offloaded" is the part of these on the host while the model runs on a
GPU. Peak memory: torch.cuda.max_memory_allocated over the steps on GPU; on CPU the process's
peak resident set (VmHWM, reset before each configuration), which also holds Python, torch and
the batch. "step +GiB" is that peak minus the memory held when the step started: mostly
activations, what checkpointing saves.

    python profiling/bench_zero.py [--configs z1 z2 z3 z3_offload] [--checkpointing off on]
                                   [--ranks 2] [--fusion-layers 4 --fusion-width 512]
                                   [--preset tiny --frames 4 --size 96 --batch 4 --drop 0.5]
                                   [--steps 2 --warmup 1] [--out profiling/results]

It launches itself with `python -m torch.distributed.run --nproc_per_node RANKS`, once per
configuration (fresh processes: no leftovers of the previous engine in the peaks). Writes
bench_zero.json, bench_zero.md and bench_zero.png (when matplotlib is installed) into --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

CUDA = torch.cuda.is_available()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if not CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from profiling.machine import (RESULTS, describe, machine_info, markdown_table, pyplot,  # noqa: E402
                               reset_peak_rss, rss_bytes, run_logged, write_json, write_markdown)

GIB, MIB = 2.0 ** 30, 2.0 ** 20
CPU_DEFAULTS = dict(preset="tiny", frames=4, size=96, batch=4, fusion_layers=4, fusion_width=512,
                    steps=2, warmup=1)
GPU_DEFAULTS = dict(preset="vit-b16", frames=8, size=224, batch=16, fusion_layers=6, fusion_width=1024,
                    steps=2, warmup=1)
GROUPS = ("params", "grads", "optimizer", "buffers")


# ------------------------------------------------------------------------------------ accounting

def _storage(t):
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes(), t.device.type


def _tensors(obj, name="", depth=0):
    """(attribute path, tensor) of tensors held directly or in lists/tuples/dicts (not objects)."""
    if torch.is_tensor(obj):
        yield name, obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _tensors(x, f"{name}[{i}]", depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensors(x, f"{name}[{k}]", depth + 1)


class Ledger:
    """Unique storages per group and device."""

    def __init__(self):
        self.seen, self.bytes = set(), {}

    def add(self, group, t):
        if t is None or not torch.is_tensor(t):
            return
        ptr, n, dev = _storage(t)
        if n == 0 or ptr in self.seen:
            return
        self.seen.add(ptr)
        key = (group, "host" if dev == "cpu" else "device")
        self.bytes[key] = self.bytes.get(key, 0) + n


def model_state_bytes(engine):
    """Per-rank bytes of params / grads / optimizer / buffers (see the module docstring)."""
    led = Ledger()
    params = list(engine.module.parameters())
    for p in params:
        led.add("params", p.data)
        if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
            led.add("params", p.ds_tensor)
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)
    for group in getattr(inner, "param_groups", []):
        for p in group["params"]:
            led.add("optimizer", p)
    for state in getattr(inner, "state", {}).values():
        for _, t in _tensors(state):
            led.add("optimizer", t)
    for p in params:
        led.add("grads", p.grad)
    attrs = vars(zero) if zero is not inner else {}
    for attr, value in attrs.items():
        if attr == "optimizer":
            continue
        low = attr.lower()
        group = "grads" if "grad" in low else "optimizer" if ("fp32" in low or "master" in low) \
            else "buffers"
        for _, t in _tensors(value, attr):
            led.add(group, t)
    out = {}
    for g in GROUPS:
        dev, host = led.bytes.get((g, "device"), 0), led.bytes.get((g, "host"), 0)
        out[g] = dev + host if not CUDA else dev
        out[f"{g}_offloaded"] = host if CUDA else 0
    return out


# ------------------------------------------------------------------------------------ worker

class _Vocab:
    """What VideoLanguageModel.from_clip needs of a tokenizer: a size and a mask id."""
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, n):
        self.n, self.mask_token_id = n, n - 1

    def __len__(self):
        return self.n


def build_model(args):
    """The preset over a CLIP-sized vocabulary (`--vocab`), random weights: what ZeRO partitions."""
    from transformers import CLIPModel

    from hvfm.model import VideoLanguageModel, preset_config
    tok = _Vocab(args.vocab)
    config = preset_config(args.preset, len(tok), tok.bos_token_id, tok.eos_token_id,
                           tok.pad_token_id, image_size=args.size)
    torch.manual_seed(args.seed)
    clip = CLIPModel(config)
    model = VideoLanguageModel.from_clip(clip, tok, fusion_layers=args.fusion_layers,
                                         fusion_width=args.fusion_width, attn="sdpa",
                                         max_frames=max(args.frames, 16),
                                         checkpointing=args.activation_checkpointing)
    return model, tok


def synthetic_batches(args, tok, device, dtype, count=2):
    """`count` loader-style batches: pixels already on the device in the step's dtype (the copy
    from a pinned loader batch overlaps compute in training, so it is not timed), ids, mask,
    MLM ids and labels on the host as the loader gives them."""
    lo, hi = (int(x) for x in args.caption_tokens.split(":"))
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    out = []
    for _ in range(count):
        B, T, S = args.batch, args.frames, args.size
        pixels = torch.randn(B, T, 3, S, S, generator=g).to(device, dtype)
        lens = rng.integers(lo, hi + 1, B)
        L = int(lens.max())
        ids = torch.full((B, L), tok.pad_token_id, dtype=torch.int64)
        am = torch.zeros(B, L, dtype=torch.int64)
        words = torch.randint(3, tok.mask_token_id, (B, L), generator=g)
        masked = torch.zeros(B, L, dtype=torch.bool)
        for i, n in enumerate(lens):
            ids[i, 0], ids[i, 1:n - 1], ids[i, n - 1] = tok.bos_token_id, words[i, :n - 2], tok.eos_token_id
            am[i, :n] = 1
            masked[i, 1:n - 1] = torch.rand(n - 2, generator=g) < args.mask_ratio
            masked[i, 1] = True  # at least one masked word per caption
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        mlm_ids = torch.where(masked, torch.full_like(ids, tok.mask_token_id), ids)
        out.append(dict(pixels=pixels, num_frames=torch.full((B,), T, dtype=torch.int64),
                        input_ids=ids, attention_mask=am, mlm_input_ids=mlm_ids, mlm_labels=labels,
                        index=torch.arange(B)))
    return out


def mem_reset():
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    reset_peak_rss()
    return rss_bytes("VmRSS")


def mem_now():
    return torch.cuda.memory_allocated() if CUDA else rss_bytes("VmRSS")


def mem_peak():
    return torch.cuda.max_memory_allocated() if CUDA else rss_bytes("VmHWM")


def sync():
    if CUDA:
        torch.cuda.synchronize()


def run_config(args, name, checkpointing, precision, dtype, device):
    import torch.distributed as dist

    from hvfm.build import build_engine
    from hvfm.config import FRESH_LR_MULT, TEMPORAL_LR_MULT, read_ds_config
    from profiling.bench_train import variant
    margs = argparse.Namespace(**{**vars(args), "activation_checkpointing": checkpointing,
                                  "vocab": args.vocab})
    base = mem_reset()
    model, tok = build_model(margs)
    variant(model, args.fused)
    # ds_configs/NAME.json as the trainer reads it (--batch-size `batch`), and the trainer's engine:
    # the precision stated, fp32 gradient accumulation under bf16 with ZeRO, its LR groups
    cfg = read_ds_config(ROOT / "ds_configs" / f"{name}.json", dist.get_world_size(), args.batch)
    schedule = argparse.Namespace(lr=None, warmup_steps=None, temporal_lr_mult=TEMPORAL_LR_MULT,
                                  fresh_lr_mult=FRESH_LR_MULT)
    engine = build_engine(model, cfg, precision, schedule, args.warmup + args.steps)[0]
    batches = synthetic_batches(margs, tok, device, dtype)
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    steps, states, start_mem, peak = [], None, None, 0
    for i in range(args.warmup + args.steps):
        b = batches[i % len(batches)]
        seed = 100 + i
        gen = torch.Generator(device=engine.device).manual_seed(seed)
        timed = i >= args.warmup
        if timed and start_mem is None:
            sync()
            start_mem = mem_reset()
        sync()
        t0 = time.perf_counter()
        out = engine(b, drop_ratio=args.drop, rng=np.random.default_rng(seed), generator=gen,
                     reverse_negatives=True)
        sync()
        t1 = time.perf_counter()
        engine.backward(out["loss"])
        sync()
        t2 = time.perf_counter()
        if timed and states is None:
            states = model_state_bytes(engine)  # grads exist now; optimizer state since warm-up
        engine.step()
        sync()
        t3 = time.perf_counter()
        if timed:
            steps.append(dict(forward_s=t1 - t0, backward_s=t2 - t1, optimizer_s=t3 - t2, step_s=t3 - t0))
    peak = mem_peak()
    res = dict(config=name, checkpointing=checkpointing, parameters=n_params,
               step_ms=1e3 * float(np.mean([s["step_s"] for s in steps])),
               forward_ms=1e3 * float(np.mean([s["forward_s"] for s in steps])),
               backward_ms=1e3 * float(np.mean([s["backward_s"] for s in steps])),
               optimizer_ms=1e3 * float(np.mean([s["optimizer_s"] for s in steps])),
               peak_mem_gib=peak / GIB, start_mem_gib=start_mem / GIB,
               step_mem_gib=(peak - start_mem) / GIB, before_engine_gib=base / GIB,
               **{f"{k}_mib": v / MIB for k, v in states.items()})
    res["model_states_mib"] = sum(res[f"{g}_mib"] for g in GROUPS)
    del engine, model, batches, out
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()
    return res


def worker(args):
    import warnings
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed renames, per call
    import deepspeed
    import torch.distributed as dist
    local = int(os.environ.get("LOCAL_RANK", 0))
    if CUDA:
        torch.cuda.set_device(local)
    if args.threads:
        torch.set_num_threads(args.threads)
    deepspeed.init_distributed(dist_backend="nccl" if CUDA else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    from hvfm.config import pick_precision
    precision, _ = pick_precision(args.precision, CUDA)  # the trainer's choice
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    device = f"cuda:{local}" if CUDA else "cpu"
    name, ck = args.worker_config, args.worker_checkpointing
    try:
        res = run_config(args, name, ck == "on", precision, dtype, device)
        res["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported in the table; the other configurations go on
        res = dict(config=name, checkpointing=ck == "on", ok=False,
                   error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    per_rank = [None] * world
    dist.all_gather_object(per_rank, res)
    if rank == 0:
        write_json(args.result_file, {"world_size": world, "precision": precision,
                                      "row": aggregate(per_rank)})
    dist.barrier()
    dist.destroy_process_group()


def aggregate(per_rank):
    """Rank 0's row plus per-rank lists; memory maxima over ranks, time the slowest rank's."""
    if not all(r["ok"] for r in per_rank):
        bad = next(r for r in per_rank if not r["ok"])
        return dict(config=bad["config"], checkpointing=bad["checkpointing"], ok=False, error=bad["error"])
    row = dict(per_rank[0])
    for k, v in per_rank[0].items():
        if isinstance(v, float):
            vals = [r[k] for r in per_rank]
            row[k] = max(vals)
            row[f"{k}_per_rank"] = vals
    return row


# ------------------------------------------------------------------------------------ launcher

def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(rows, device):
    body = []
    for r in rows:
        ck = "on" if r["checkpointing"] else "off"
        if not r["ok"]:
            body.append([r["config"], ck, f"failed: {r['error']}"] + [None] * 7)
            continue
        off = sum(r.get(f"{g}_offloaded_mib", 0) for g in GROUPS)
        mib = [f"{r[k]:.1f}" for k in ("params_mib", "grads_mib", "optimizer_mib", "buffers_mib",
                                        "model_states_mib")]
        body.append([r["config"], ck, *mib, f"{off:.1f}" if device == "cuda" else "-",
                     r["peak_mem_gib"], r["step_mem_gib"], r["step_ms"]])
    peak = "peak alloc GiB" if device == "cuda" else "peak RSS GiB"
    return markdown_table(["config", "ckpt", "params MiB", "grads MiB", "optimizer MiB",
                           "buffers MiB", "model states MiB", "offloaded MiB", peak,
                           "step +GiB", "step ms"], body)


def plot(payload, path):
    plt = pyplot()
    rows = [r for r in payload["results"] if r["ok"]]
    if plt is None or not rows:
        return None
    labels = [f"{r['config']}\n{'ckpt' if r['checkpointing'] else 'no ckpt'}" for r in rows]
    x = np.arange(len(rows))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.5))
    bottom = np.zeros(len(rows))
    for g, color in zip(GROUPS, ("tab:blue", "tab:orange", "tab:purple", "tab:gray")):
        vals = np.array([r[f"{g}_mib"] for r in rows])
        a1.bar(x, vals, 0.6, bottom=bottom, color=color, label=g)
        bottom += vals
    a1.plot(x, [r["peak_mem_gib"] * 1024 for r in rows], "kD", label="peak memory")
    a1.set_xticks(x, labels, fontsize=8)
    a1.set_ylabel("MiB per rank (max over ranks)")
    a1.set_title("model states per rank, and the peak")
    a1.legend(fontsize=8)
    a2.bar(x, [r["step_ms"] for r in rows], 0.6, color="tab:green")
    a2.set_xticks(x, labels, fontsize=8)
    a2.set_ylabel("ms per step (slowest rank)")
    a2.set_title("step time")
    fig.suptitle(f"{payload['parameters'] / 1e6:.1f}M parameters, {payload['world_size']} ranks, "
                 f"{payload['precision']}, on {payload['machine']['gpu'] or payload['machine']['cpu']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["z1", "z2", "z3", "z3_offload"],
                    help="names of ds_configs/*.json")
    ap.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--ranks", type=int, help="processes (default: 2 on CPU, the GPU count on CUDA)")
    ap.add_argument("--preset", choices=["tiny", "vit-b16", "vit-l14"])
    ap.add_argument("--frames", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--batch", type=int, help="clips per rank per step")
    ap.add_argument("--fusion-layers", type=int)
    ap.add_argument("--fusion-width", type=int)
    ap.add_argument("--drop", default="0.5")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--fused", help="attn/patch_embed (default as bench_train: triton/triton on CUDA, "
                                    "torch-varlen/gather on CPU)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--caption-tokens", default="8:32")
    ap.add_argument("--mask-ratio", type=float, default=0.5)
    ap.add_argument("--threads", type=int, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per configuration")
    ap.add_argument("--out", default=str(RESULTS), help="folder for bench_zero.json/.md/.png")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    ap.add_argument("--worker-config", help=argparse.SUPPRESS)
    ap.add_argument("--worker-checkpointing", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for k, v in (GPU_DEFAULTS if CUDA else CPU_DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.vocab is None:
        args.vocab = 512 if args.preset == "tiny" else 49409
    if args.fused is None:
        args.fused = "triton/triton" if CUDA else "torch-varlen/gather"
    if args.ranks is None:
        args.ranks = torch.cuda.device_count() if CUDA else 2
    if args.threads is None and not CUDA:
        args.threads = max(1, (os.cpu_count() or 1) // args.ranks)
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    info = machine_info()
    print(f"machine: {describe(info)}")
    import importlib.util
    if importlib.util.find_spec("deepspeed") is None:  # found, not imported: the ranks import it
        print("bench_zero needs deepspeed (pip install deepspeed); skipped")
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not CUDA:
        env.setdefault("DS_ACCELERATOR", "cpu")
        env["OMP_NUM_THREADS"] = str(args.threads)
    # the per-configuration logs: beside a results folder of its own, in the ignored tmp/ otherwise
    logs = RESULTS / "tmp" / "bench_zero_logs" if out.resolve() == RESULTS.resolve() else out / "logs" / "bench_zero"
    logs.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows, got = [], {}
    for name in args.configs:
        for ck in args.checkpointing:  # fresh processes per configuration: clean peaks, no leftovers
            result_file = logs / f".{name}-{ck}.{os.getpid()}.json"
            log = logs / f"{name}-ckpt-{ck}.log"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
                   "--nproc_per_node", str(args.ranks), "--master_addr", "127.0.0.1",
                   "--master_port", str(free_port()), str(Path(__file__).resolve()), *argv,
                   "--worker", "--worker-config", name, "--worker-checkpointing", ck,
                   "--result-file", str(result_file)]
            rc = run_logged(cmd, log, env, args.timeout)
            if rc == 0 and result_file.exists():
                got = json.loads(result_file.read_text())
                result_file.unlink()
                row = got["row"]
            else:
                tail = log.read_text()[-1200:]
                row = dict(config=name, checkpointing=ck == "on", ok=False,
                           error=f"{args.ranks}-rank launch failed ({rc}); see {log}", log_tail=tail)
            rows.append(row)
            print(f"{name}, checkpointing {ck}: " + (
                f"{row['step_ms']:.0f} ms/step, model states {row['model_states_mib']:.0f} MiB/rank, "
                f"peak {row['peak_mem_gib']:.2f} GiB" if row["ok"] else f"FAILED {row['error']}"), flush=True)
            report(args, info, rows, got, start, out)
    payload = report(args, info, rows, got, start, out, final=True)
    print(table(rows, payload["device"]))
    print(f"wrote {out / 'bench_zero.json'}" + (f", {out / 'bench_zero.png'}" if payload.get("png") else ""))
    return payload


def report(args, info, rows, got, start, out, final=False):
    """Write bench_zero.json/.md (every configuration so far) and, at the end, the plot."""
    ok = [r for r in rows if r["ok"]]
    payload = {"benchmark": "bench_zero", "machine": info, "config": vars(args),
               "device": "cuda" if CUDA else "cpu", "world_size": got.get("world_size", args.ranks),
               "precision": got.get("precision", args.precision), "parameters": ok[0]["parameters"] if ok else None,
               "launch_s": time.perf_counter() - start, "results": rows}
    payload["complete"] = final
    write_json(out / "bench_zero.json", payload)
    notes = [f"{payload['world_size']} ranks, {payload['precision']}; fusion encoder "
             f"{args.fusion_layers} x {args.fusion_width} over the {args.preset} towers "
             f"({(payload['parameters'] or 0) / 1e6:.1f}M parameters); batch {args.batch} per rank, "
             f"{args.frames} frames x {args.size} px, drop {args.drop}",
             "MiB columns: per rank, the maximum over ranks, each storage counted once: params = "
             "the module's parameters (ZeRO-3: its partitions), grads = after backward, optimizer = "
             "fp32 master partitions + AdamW moments, buffers = other tensors the ZeRO optimizer holds",
             "peak: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS (Python, "
             "torch and the batch included); step +GiB = peak minus the memory at the step's start"]
    if not CUDA:
        notes.append("on CPU 'offload' moves nothing (the accelerator is the host): only its "
                     "bookkeeping and copies show in the time; on a CPU shared with other jobs the "
                     "step times (one run per configuration, not interleaved) are noisy")
    write_markdown(out / "bench_zero.md", "bench_zero: ZeRO stages and activation checkpointing",
                   info, table(rows, payload["device"]), notes)
    if final:
        payload["png"] = bool(plot(payload, out / "bench_zero.png"))
    return payload


if __name__ == "__main__":
    main()
