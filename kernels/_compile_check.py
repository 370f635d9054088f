"""Compile the kernels for an NVIDIA target without a GPU (Triton frontend, MLIR passes, ptxas).

    python -m kernels._compile_check [--arch 90] [--dtype bf16 ...] [--all-configs]

Catches what the interpreter cannot (compiled-mode-only language rules, shared memory, whether
tl.dot maps to tensor cores). If the kernels were defined for the interpreter
(TRITON_INTERPRET=1), it reruns itself in a fresh process without that variable. Prints one line
per compiled variant; returns / exits 1 if any failed.
"""
import argparse
import os
import subprocess
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import _config, attention, patch_embed


def compile_variant(kernel, types, consts, config, target):
    jit = kernel.fn  # the autotuner's JITFunction
    consts = {**consts, **config.kwargs}
    sig = {n: "constexpr" if n in consts else types.get(n, "i32") for n in jit.arg_names}
    t = time.perf_counter()
    try:
        k = triton.compile(ASTSource(jit, sig, constexprs=consts), target=target,
                           options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    except Exception as e:  # noqa: BLE001
        print(f"FAILED {jit.__name__} {consts}: {type(e).__name__}: {str(e)[:300]}")
        return False
    ptx = k.asm.get("ptx", "")
    unit = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma"
    print(f"ok {jit.__name__} {consts} warps={config.num_warps} stages={config.num_stages} "
          f"shared={k.metadata.shared} dot={unit} ({time.perf_counter() - t:.1f}s)")
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, both "
                    "causal modes and head dims 64/128 (slow); default: one variant each")
    args = ap.parse_args(argv)
    if _config.INTERPRET:  # kernels here are interpreter functions: start over without it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        argv = sys.argv[1:] if argv is None else list(argv)
        return subprocess.call([sys.executable, "-m", "kernels._compile_check", *argv], env=env,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = GPUTarget("cuda", args.arch, 32)
    pick = (lambda cs: cs) if args.all_configs else (lambda cs: cs[:1])
    ok = True
    for dt in args.dtype:
        ptr = "*" + dt
        types = {n: ptr for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
        types.update(LSE="*fp32", DELTA="*fp32", CU_Q="*i32", CU_K="*i32", qk_scale="fp32",
                     sm_scale="fp32")
        variants = [(40, True)] if not args.all_configs else \
            [(d, c) for d in (64, 128) for c in (False, True)]
        for head_dim, causal in variants:
            base = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                        CAUSAL=causal, DOT_F32=False)
            for kernel, configs in [(attention._fwd_kernel, _config.attention_fwd_configs()),
                                    (attention._dkdv_kernel, _config.attention_bwd_configs()),
                                    (attention._dq_kernel, _config.attention_bwd_configs())]:
                for cfg in pick(configs):
                    ok &= compile_variant(kernel, types, base, cfg, target)
        for cfg in pick(_config.preprocess_configs()):
            ok &= compile_variant(attention._delta_kernel, types,
                                  dict(HEAD_DIM=40, BLOCK_D=64), cfg, target)
        pe = {"X": "*fp32", "IDX": "*i64", "CU": "*i32", "W": ptr, "BIAS": ptr, "POS_S": ptr,
              "POS_T": ptr, "OUT": ptr}
        for cfg in pick(_config.patch_embed_configs()):
            ok &= compile_variant(patch_embed._patch_embed_kernel, pe,
                                  dict(HAS_BIAS=True, HAS_POS_S=True, HAS_POS_T=True,
                                       DOT_F32=False), cfg, target)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
