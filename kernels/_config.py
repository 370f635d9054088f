"""Block sizes. One fixed config under the Triton interpreter (TRITON_INTERPRET=1: few, large
blocks keep the number of interpreted programs small; nothing to tune); autotuning (kernels.
_autotune: `triton.autotune` + an on-disk cache of the choices) over a few configs on a GPU.
Autotune keys are the head dim (+ causal) / embedding width and, for attention, a shape class
(`attention_class`), never a sequence length: a new batch of lengths neither recompiles nor,
within its class, re-tunes.

Attention shape classes: video self-attention (hundreds of queries and keys) and the fusion
encoder's cross-attention (a caption's ~20 queries over hundreds of video keys) want different
tiles, so each class is tuned on its own and offered its own configs (the `prune` functions
below pick them): a short-query class gets small query blocks.

Arch families: Hopper (sm_90: H100, H200; 228 KB of shared memory per SM, up to 227 KB per
block, warpgroup MMA over 64-row tiles) gets its own lists with 128-query tiles at 8 warps, 3
stages or 128-key tiles; every other GPU runs the sm_80 lists. The prune reads the family from
the launch's device (`device_family`), so one import serves any GPU and none is queried before
the first launch. At most three configs per class, kernel and family (there were up to five,
about 55 compiles and benchmarks per process; with the disk cache only the first process on a
machine pays them).

Checked with `python -m kernels._compile_check --max-spill 0` (Triton 3.7.1 and its bundled
ptxas): every config of each family compiles for its arch (sm_80 / sm_90), bf16 and fp16, head
dims 64 and 128 (a fifth entry limits a row to head dim 64), causal or not, within shared memory
and registers and without spilling (280 variants, 0 over). Removed after that check on sm_80: the
configs that spilled, worst of all the dK/dV tiles with 128 keys at head dim 128 (8.1-13.1 KB of
spill stores per thread), the tiles at the 255-register cap (128x64 or 64x64 at 4 warps) that
spilled 20-650 bytes, forward 128x64 at 8 warps and dQ 32x64 at 8 warps (16-40 bytes, causal,
head dim 128) and the patch-embed tile 128x256x32 (~600 bytes). Pruned on sm_90 (spills at head
dim 128, bytes stored+loaded): forward 64x128 and 128x64 at 4 warps (120-264), dK/dV 64x128 at
8 warps (48-72: kept for head dim 64), 64x64 at 4 warps (112-320) and 16x128 at 4 warps (~2.6 KB),
dQ 128x128 at 8 warps (152-176) and 32x128 at 4 warps (64); forward 128x128 at 8 warps sits at
248-255 registers at head dim 128, so it too is offered for head dim 64 only.

Triton 3.6.0 (the lent GPU machine's; its own ptxas), the same check: all sm_90 variants are
clean; six sm_80 dK/dV variants, causal only, sit at 255 registers and spill 12-36 bytes
(store+load): 64x32 at 4 warps and 128x32 at 8 warps at head dim 128, 32x64 at 8 warps at head
dim 64, bf16 and fp16 alike. Kept: a few bytes, on A100s with that Triton only.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHORT = 128  # max_seqlen at or below this: the short class (captions: CLIP's context is 77)


def _cfg(num_warps=4, num_stages=1, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def attention_class(max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Autotune class of an attention call from its host max lengths: 2 * (queries short) +
    (keys short). 0: long self-attention (video); 1: long queries, short keys; 2: short queries
    over long keys (fusion cross-attention); 3: both short (text towers, fusion self-attention)."""
    return 2 * int(max_seqlen_q <= SHORT) + int(max_seqlen_k <= SHORT)


def short_queries(tune_class: int) -> bool:
    return tune_class >= 2


# Rows (BLOCK_M, BLOCK_N, num_warps, num_stages[, largest head dim]) per kernel, arch family and
# query class. A fifth entry limits a row to BLOCK_D <= that head dim (its registers fit there
# only).
# At most three per class: every new autotune key compiles and benchmarks each of its candidates.
_FWD = {
    "sm80": {"long": [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
             "short": [(16, 64, 4, 2), (16, 128, 4, 2), (32, 64, 8, 2)]},
    # Hopper: 128-query tiles at 8 warps (two warpgroups of wgmma), 3 stages or 128 keys
    "sm90": {"long": [(128, 64, 8, 3), (128, 128, 8, 2, 64), (64, 64, 4, 3)],
             "short": [(16, 64, 4, 3), (16, 128, 4, 2), (32, 64, 4, 3)]},
}
# dK/dV holds BLOCK_N keys and loops over BLOCK_M queries; dQ holds BLOCK_M queries
_DKDV = {
    "sm80": {"long": [(64, 32, 4, 3), (128, 32, 8, 2), (32, 64, 8, 2)],
             "short": [(16, 32, 4, 2), (16, 64, 4, 2), (32, 64, 8, 2)]},
    "sm90": {"long": [(32, 128, 8, 2), (64, 128, 8, 2, 64), (64, 64, 8, 2)],
             "short": [(16, 64, 4, 2), (16, 128, 8, 2)]},
}
_DQ = {
    "sm80": {"long": [(64, 32, 4, 3), (64, 32, 8, 2), (32, 64, 4, 2)],
             "short": [(16, 32, 4, 2), (16, 64, 8, 2), (32, 64, 4, 2)]},
    "sm90": {"long": [(128, 64, 8, 2), (64, 128, 8, 2), (64, 64, 4, 3)],
             "short": [(16, 64, 4, 3), (16, 128, 8, 2), (32, 64, 4, 2)]},
}
ARCH_FAMILIES = ("sm80", "sm90")
_CAPABILITY = {}


def arch_family(capability) -> str:
    """Tile family of a compute capability (major, minor): Hopper (9.x, 227 KiB of shared memory
    per block) has its own tiles; every other GPU runs the sm_80 tiles (compiled and checked for
    sm_80, the most constrained of the Ampere+ targets in shared memory per register file)."""
    return "sm90" if capability[0] == 9 else "sm80"


def family_of_arch(arch: int) -> str:
    return arch_family(divmod(arch, 10))


def cuda_index(named_args):
    """The CUDA device index of the first tensor among a launch's arguments; None when that
    tensor is on the CPU (the interpreter) or there is none."""
    import torch
    for v in named_args.values():
        if isinstance(v, torch.Tensor):
            if v.device.type != "cuda":
                return None
            return v.device.index if v.device.index is not None else torch.cuda.current_device()
    return None


def device_family(named_args) -> str:
    """Arch family of the first CUDA tensor among a launch's arguments (cached per device, no
    sync: a device-properties query); 'sm80' for CPU tensors (the interpreter)."""
    import torch
    idx = cuda_index(named_args)
    if idx is None:
        return "sm80"
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = arch_family(torch.cuda.get_device_capability(idx))
    return _CAPABILITY[idx]


class _Table:
    """Configs of one kernel per arch family and query class; `configs` is their union (the
    autotuner's list), `prune` the autotuner's early_config_prune picking the call's arch, class
    and head dim."""

    def __init__(self, table, interpret):
        if interpret:
            one = _cfg(BLOCK_M=64, BLOCK_N=64)
            self.rows = {(f, c): [(one, 128)] for f in ARCH_FAMILIES for c in ("long", "short")}
        else:
            made = {}
            self.rows = {}
            for fam, classes in table.items():
                for c, rows in classes.items():
                    self.rows[fam, c] = [
                        (made.setdefault(t[:4], _cfg(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2],
                                                     num_stages=t[3])),
                         t[4] if len(t) > 4 else 128) for t in rows]
        self.configs = list({id(c): c for rows in self.rows.values() for c, _ in rows}.values())

    def for_call(self, tune_class: int, family: str = "sm80", block_d: int = 128):
        rows = self.rows[family, "short" if short_queries(tune_class) else "long"]
        return [c for c, max_d in rows if block_d <= max_d]

    def for_class(self, tune_class: int, family: str = "sm80"):
        """Every config of a class on a family, whatever the head dim."""
        return self.for_call(tune_class, family, 0)

    def entries(self, family: str):
        """(config, largest head dim, classes) of each config a family uses."""
        out = {}
        for (fam, c), rows in self.rows.items():
            if fam == family:
                for cfg, max_d in rows:
                    out.setdefault(id(cfg), [cfg, max_d, []])[2].append(c)
        return [(cfg, d, "+".join(cls)) for cfg, d, cls in out.values()]

    def prune(self, configs, named_args, **kwargs):
        cls = named_args.get("tune_class", kwargs.get("tune_class", 0))
        block_d = int(kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 0)) or 0)
        keep = {id(c) for c in self.for_call(int(cls), device_family(named_args), block_d)}
        return [c for c in configs if id(c) in keep]


def attention_fwd_table(interpret: bool = INTERPRET) -> _Table:
    return _Table(_FWD, interpret)


def attention_dkdv_table(interpret: bool = INTERPRET) -> _Table:
    return _Table(_DKDV, interpret)


def attention_dq_table(interpret: bool = INTERPRET) -> _Table:
    return _Table(_DQ, interpret)


def preprocess_configs(interpret: bool = INTERPRET):
    if interpret:
        return [_cfg(BLOCK_M=64)]
    # one config: a row-wise reduction too small to repay compiling and timing several
    return [_cfg(BLOCK_M=64, num_warps=4)]


def patch_embed_configs(interpret: bool = INTERPRET):
    if interpret:
        return [_cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)]
    return [_cfg(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
            for m, n, k, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                                  (64, 64, 64, 4, 4)]]
