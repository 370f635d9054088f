"""Compile every autotune config of the kernels for NVIDIA targets without a GPU, and report
shared memory, registers and spills per kernel / config / arch.

    python -m kernels._compile_check                  # all configs, sm_80 + sm_90, bf16 + fp16
    python -m kernels._compile_check --subset         # the representative subset CI runs
    python -m kernels._compile_check --arch 80 --dtype bf16 --head-dim 128 --kernel dkdv

Each variant is specialised the way a launch specialises it: the launch arguments come from the
same builders the autograd wrappers use (`attention.fwd_args`, ...), on CPU tensors of the
runtime's layout, and go through Triton's own argument binder (constexprs, dtypes, 16-byte
alignment and divisibility of the strides) before `triton.compile(..., GPUTarget("cuda", arch,
32))`. Registers and spills come from running the bundled ptxas -v on the generated PTX with the
flags Triton uses. Exit status 1 if a variant fails to compile or exceeds the hardware (shared
memory per block: 163 KiB on sm_80, 227 KiB on sm_90; 255 registers per thread), or spills when
`--max-spill` is given and exceeded. Under TRITON_INTERPRET=1 the kernels are interpreter
functions, so it reruns itself in a fresh process without that variable.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time

SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGS = 255
ARCHS = (80, 90)
DTYPES = ("bf16", "fp16")
# head dims: ViT-B/16, ViT-L/14 and their text towers (64) and the kernels' largest tile (128:
# head dims 65-128, e.g. ViT-H/14's 80, compile to it). Others with --head-dim (tiny preset: 32)
HEAD_DIMS = (64, 128)
KERNELS = ("fwd", "dkdv", "dq", "delta", "patch_embed")
# CI subset: every Hopper (sm_90) attention config, bf16, causal and not, each at the largest head
# dim it is offered for (128, or 64 for the tiles limited to 64), where registers and shared
# memory are tightest: 34 compiles, under a minute on 2 cores. The sm_80 lists only lost configs
# since their full-grid check; the full grid (both archs, fp16, both head dims, delta and
# patch-embed kernels: 280 compiles, ~6 min on 2 cores) is opt-in
# (`python -m kernels._compile_check --max-spill 0`)
SUBSET = dict(archs=(90,), dtypes=("bf16",), head_dims=HEAD_DIMS, causal=(False, True),
              kernels=("fwd", "dkdv", "dq"), largest_only=True)


def _spec(cfg) -> dict:
    return dict(kwargs=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _variants(archs, dtypes, head_dims, causal_modes, kernels, largest_only=False):
    """(kernel, arch, dtype, head_dim, causal, config spec, classes) of every compile: each arch
    compiles the configs of its own family (`_config.family_of_arch`), each at the head dims it
    is offered for (a config limited to head dim 64 is not compiled at 128); `largest_only`: at
    the largest of those only (where registers and shared memory are tightest)."""
    from . import _config
    tables = {"fwd": _config.attention_fwd_table(False),
              "dkdv": _config.attention_dkdv_table(False),
              "dq": _config.attention_dq_table(False)}
    out = []
    for arch in archs:
        fam = _config.family_of_arch(arch)
        for dt in dtypes:
            for name in kernels:
                if name in tables:
                    for cfg, max_d, cls in tables[name].entries(fam):
                        dims = [d for d in head_dims if d <= max_d]
                        dims = dims[-1:] if largest_only else dims
                        out += [(name, arch, dt, d, c, _spec(cfg), cls) for d in dims
                                for c in causal_modes]
                elif name == "delta":
                    out += [(name, arch, dt, d, False, _spec(cfg), "-") for d in head_dims
                            for cfg in _config.preprocess_configs(False)]
                else:
                    out += [(name, arch, dt, 0, False, _spec(cfg), "-")
                            for cfg in _config.patch_embed_configs(False)]
    return out


def _launch(name, dt, head_dim, causal):
    """(autotuner, launch args, launch kwargs) as the runtime would pass them."""
    import torch

    from . import attention, patch_embed
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dt]
    H, L, B = 12, 64, 2
    cu = torch.tensor([0, L, 2 * L], dtype=torch.int32)
    if name == "patch_embed":
        # ViT-B/16 at 224 px, 8 frames, pixels cast to the weight's dtype (as VideoEmbeddings)
        T, W, p, hw = 8, 768, 16, 14
        pixels = torch.zeros(B, T, 3, hw * p, hw * p, dtype=dtype)
        keep = torch.zeros(B * L, dtype=torch.int64)
        weight = torch.zeros(W, 3, p, p, dtype=dtype)
        pos_s, pos_t = torch.zeros(hw * hw, W, dtype=dtype), torch.zeros(T, W, dtype=dtype)
        out = torch.empty(B * L, W, dtype=dtype)
        args, kw = patch_embed.launch_args(pixels, keep, cu, weight, None, pos_s, pos_t, out)
        return patch_embed._patch_embed_kernel, args, kw
    q, k, v, do = (torch.zeros(B * L, H, head_dim, dtype=dtype) for _ in range(4))
    o, dq, dk, dv = (torch.empty_like(q) for _ in range(4))
    lse, delta = (torch.empty(B * L, H) for _ in range(2))
    if name == "delta":
        args, kw = attention.delta_args(o, do, delta)
        return attention._delta_kernel, args, kw
    if name == "fwd":
        args, kw = attention.fwd_args(q, k, v, o, lse, cu, cu, 0.125, causal, 0)
        return attention._fwd_kernel, args, kw
    dkdv, dqa, kw = attention.bwd_args(q, k, v, do, lse, delta, dq, dk, dv, cu, cu, 0.125,
                                       causal, 0)
    return (attention._dkdv_kernel, dkdv, kw) if name == "dkdv" else \
        (attention._dq_kernel, dqa, kw)


def _ptxas_stats(ptx: str, options, logged=None) -> dict:
    """Registers / spills / stack of the PTX, from the bundled ptxas -v with Triton's flags;
    kept next to Triton's cache (a cached compile does not run ptxas again)."""
    import hashlib

    from triton import knobs
    from triton.backends.nvidia.compiler import get_ptxas
    key = hashlib.sha256((ptx + repr((options.enable_fp_fusion, options.ptx_options))).encode())
    path = os.path.join(knobs.cache.dir, "hvfm_ptxas", key.hexdigest() + ".json")
    if logged is None and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    stats = logged or _run_ptxas(ptx, options, knobs, get_ptxas)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(stats, f)
    os.replace(tmp, path)
    return stats


def _run_ptxas(ptx, options, knobs, get_ptxas):
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    cap = int(re.match(r"sm_(\d+)", arch).group(1))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        fmad = [] if options.enable_fp_fusion else ["--fmad=false"]
        extra = options.ptx_options.split(" ") if options.ptx_options else []
        line = ["-lineinfo"] if not knobs.compilation.disable_line_info else []
        cmd = [get_ptxas(cap).path, *line, *fmad, "-v", "--regAllocOptLevel=2", *extra,
               f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return _parse_ptxas(log)


def _parse_ptxas(log: str):
    if not re.search(r"Used \d+ registers", log):
        return None

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return dict(regs=num(r"Used (\d+) registers"), spill_store=num(r"(\d+) bytes spill stores"),
                spill_load=num(r"(\d+) bytes spill loads"), stack=num(r"(\d+) bytes stack frame"))


def compile_one(variant) -> dict:
    """Compile one variant; a row of the table (status 'ok' or 'FAILED: ...')."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature

    import triton

    name, arch, dt, head_dim, causal, spec, cls = variant
    row = dict(kernel=name, arch=arch, dtype=dt, head_dim=head_dim, causal=causal, classes=cls)
    t0 = time.perf_counter()
    try:
        cfg = triton.Config(dict(spec["kwargs"]), num_warps=spec["num_warps"],
                            num_stages=spec["num_stages"])
        tuner, args, kw = _launch(name, dt, head_dim or 64, causal)
        jit = tuner.fn
        row.update(config=dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        kw = {**kw, **cfg.all_kwargs()}
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        kw = {**kw, "debug": bool(jit.debug or knobs.runtime.debug),
              "instrumentation_mode": knobs.compilation.instrumentation_mode}
        bound, spec, opts = binder(*args, **kw)
        options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, opts)
        knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v when it runs ptxas itself
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = triton_compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                               options=options.__dict__)
        ptx = k.asm["ptx"]
        # Triton's own ptxas -v log, or none on a cache hit (then ours, cached too)
        stats = _ptxas_stats(ptx, options, _parse_ptxas(log.getvalue()))
        row.update(shared=int(k.metadata.shared), **stats,
                   dot="wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma")
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001 -- reported as a failed row
        first = str(e).splitlines()[0][:200] if str(e) else ""
        row["status"] = f"FAILED: {type(e).__name__}: {first}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def verdict(row, max_spill=None) -> str:
    """'' when the row is within the limits, else why not."""
    if row["status"] != "ok":
        return row["status"]
    why = []
    limit = SHARED_LIMIT.get(row["arch"])
    if limit is not None and row["shared"] > limit:
        why.append(f"shared {row['shared']} B > {limit} B")
    if row["regs"] > MAX_REGS:
        why.append(f"{row['regs']} registers > {MAX_REGS}")
    if max_spill is not None and row["spill_store"] + row["spill_load"] > max_spill:
        why.append(f"spills {row['spill_store']}+{row['spill_load']} B > {max_spill} B")
    return "; ".join(why)


def format_table(rows, max_spill=None) -> str:
    head = (f"{'kernel':<11} {'arch':<5} {'dtype':<5} {'D':>3} {'causal':<6} {'class':<10} "
            f"{'BM':>3} {'BN':>3} {'BK':>3} {'w':>2} {'s':>2} {'shared KiB':>10} {'regs':>4} "
            f"{'spill st/ld B':>13} {'dot':<6} verdict")
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r.get("config", {})
        ok = r["status"] == "ok"
        why = verdict(r, max_spill)
        lines.append(
            f"{r['kernel']:<11} sm_{r['arch']:<2} {r['dtype']:<5} {r['head_dim'] or '-':>3} "
            f"{str(r['causal'])[0]:<6} {r['classes']:<10} {c.get('BLOCK_M', '-'):>3} "
            f"{c.get('BLOCK_N', '-'):>3} {c.get('BLOCK_K', '-'):>3} {r.get('num_warps', '-'):>2} "
            f"{r.get('num_stages', '-'):>2} "
            f"{(r['shared'] / 1024 if ok else float('nan')):>10.1f} {r.get('regs', '-'):>4} "
            f"{(str(r['spill_store']) + '/' + str(r['spill_load'])) if ok else '-':>13} "
            f"{r.get('dot', '-'):<6} {'OVER: ' + why if why else 'ok'}")
    return "\n".join(lines)


def run(archs=ARCHS, dtypes=DTYPES, head_dims=HEAD_DIMS, causal=(False, True), kernels=KERNELS,
        jobs=None, max_spill=None, out=print, largest_only=False):
    """Compile the grid; returns (rows, number over the limits or failed)."""
    # delta: no causal flag, patch-embed: no head dim (the ViT-B/16 embedding), so each is
    # compiled once per arch/dtype (and head dim for delta)
    todo = _variants(archs, dtypes, head_dims, causal, kernels, largest_only)
    jobs = jobs or min(len(todo), os.cpu_count() or 1)
    t0 = time.perf_counter()
    if jobs > 1:
        import multiprocessing as mp
        with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as ex:
            rows = list(ex.map(compile_one, todo))
    else:
        rows = [compile_one(v) for v in todo]
    bad = sum(bool(verdict(r, max_spill)) for r in rows)
    out(format_table(rows, max_spill))
    out(f"{len(rows)} variants compiled in {time.perf_counter() - t0:.0f} s with {jobs} "
        f"process(es); {bad} over the limits or failed")
    return rows, bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                    help="compute capabilities (default: 80 90)")
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=DTYPES)
    ap.add_argument("--head-dim", type=int, nargs="+", default=list(HEAD_DIMS))
    ap.add_argument("--causal", choices=["both", "no", "yes"], default="both")
    ap.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=KERNELS)
    ap.add_argument("--subset", action="store_true",
                    help="the CI subset: every sm_90 attention config, bf16, causal and not, at "
                         "its largest head dim (overrides the other grid options)")
    ap.add_argument("--max-spill", type=int, default=None,
                    help="also fail a variant spilling more than this many bytes (store+load)")
    ap.add_argument("--jobs", type=int, default=None, help="compile processes (default: cores)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":  # interpreter functions: start over without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "kernels._compile_check", *argv], env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        print("error: this triton has no NVIDIA backend (kernels._compile_check needs "
              "triton.backends.nvidia and its bundled ptxas); install the CUDA build of triton",
              file=sys.stderr)
        return 2
    causal = {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]
    grid = dict(archs=args.arch, dtypes=args.dtype, head_dims=args.head_dim, causal=causal,
                kernels=args.kernel)
    if args.subset:
        grid = dict(SUBSET)
    rows, bad = run(**grid, jobs=args.jobs, max_spill=args.max_spill)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
