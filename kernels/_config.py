"""Block sizes. One fixed config under the Triton interpreter (TRITON_INTERPRET=1: few, large
blocks keep the number of interpreted programs small; the interpreter cannot autotune over
several); `triton.autotune` over several configs on a GPU. Autotune keys are the head dim
(+ causal) / embedding width and, for attention, a shape class (`attention_class`), never a
sequence length: a new batch of lengths neither recompiles nor, within its class, re-tunes.

Attention shape classes: video self-attention (hundreds of queries and keys) and the fusion
encoder's cross-attention (a caption's ~20 queries over hundreds of video keys) want different
tiles, so each class is tuned on its own and offered its own configs (the `prune` functions
below pick them): a short-query class gets small query blocks.

Every attention config below compiles for sm_80 and sm_90 (bf16 and fp16, head dims 64 and 128,
causal or not; `python -m kernels._compile_check`) within shared memory and registers and without
spilling. Removed after that check: the configs that spilled, worst of all the dK/dV tiles with
128 keys on sm_80 at head dim 128 (8.1-13.1 KB of spill stores per thread: 16x128 and 32x128 at
4 warps, 64x128 at 8 warps), and the tiles at the 255-register cap (128x64 or 64x64 at 4 warps,
...) that spilled 20-650 bytes (stores + loads), mostly on sm_80; also forward 128x64 at 8 warps
and dQ 32x64 at 8 warps (16-40 bytes, causal, head dim 128) and the patch-embed tile 128x256x32
(~600 bytes). Numbers: Triton 3.7.1 and its bundled ptxas.
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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and query class
_FWD = {"long": [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
        "short": [(16, 64, 4, 2), (16, 128, 4, 2), (32, 64, 8, 2), (32, 128, 4, 2),
                  (64, 128, 8, 2)]}
# dK/dV holds BLOCK_N keys and loops over BLOCK_M queries; dQ holds BLOCK_M queries
_DKDV = {"long": [(64, 32, 4, 3), (64, 32, 8, 2), (128, 32, 8, 2), (32, 64, 8, 2), (32, 64, 8, 3)],
         "short": [(16, 32, 4, 2), (16, 64, 4, 2), (16, 64, 8, 2), (32, 64, 8, 2)]}
_DQ = {"long": [(64, 32, 4, 3), (64, 32, 8, 2), (32, 64, 4, 2)],
       "short": [(16, 32, 4, 2), (16, 64, 8, 2), (16, 128, 4, 2), (32, 64, 4, 2)]}


class _Table:
    """Configs of one kernel per query class; `configs` is their union (the autotuner's list),
    `prune` the autotuner's early_config_prune picking the call's class."""

    def __init__(self, table, interpret):
        if interpret:
            one = _cfg(BLOCK_M=64, BLOCK_N=64)
            self.by_class = {"long": [one], "short": [one]}
        else:
            made = {}
            self.by_class = {c: [made.setdefault(t, _cfg(BLOCK_M=t[0], BLOCK_N=t[1], num_warps=t[2],
                                                         num_stages=t[3])) for t in rows]
                             for c, rows in table.items()}
        self.configs = list({id(c): c for rows in self.by_class.values() for c in rows}.values())

    def for_class(self, tune_class: int):
        return self.by_class["short" if short_queries(tune_class) else "long"]

    def prune(self, configs, named_args, **kwargs):
        cls = named_args.get("tune_class", kwargs.get("tune_class", 0))
        keep = {id(c) for c in self.for_class(int(cls))}
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
    return [_cfg(BLOCK_M=m, num_warps=w) for m, w in [(64, 4), (128, 4), (128, 8)]]


def patch_embed_configs(interpret: bool = INTERPRET):
    if interpret:
        return [_cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)]
    return [_cfg(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
            for m, n, k, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                                  (64, 64, 64, 4, 4)]]
