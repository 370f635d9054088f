"""Block sizes. One fixed config under the Triton interpreter (TRITON_INTERPRET=1: few, large
blocks keep the number of interpreted programs small); `triton.autotune` over several configs on
a GPU. Autotune keys are the head dim (+ causal) / embedding width only (the autotuner adds the
tensors' dtypes itself): never a sequence length, so a new batch of lengths neither re-tunes nor
recompiles.
"""
from __future__ import annotations

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _cfg(num_warps=4, num_stages=1, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def attention_fwd_configs():
    if INTERPRET:
        return [_cfg(BLOCK_M=64, BLOCK_N=64)]
    return [_cfg(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for m, n, w, s in [(128, 64, 4, 2), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 2),
                               (64, 32, 4, 3), (128, 128, 8, 2)]]


def attention_bwd_configs():
    """For the dK/dV kernel (BLOCK_N keys held, loops over BLOCK_M queries) and the dQ kernel."""
    if INTERPRET:
        return [_cfg(BLOCK_M=64, BLOCK_N=64)]
    return [_cfg(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
            for m, n, w, s in [(64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2), (32, 128, 4, 2),
                               (64, 32, 4, 3), (128, 64, 8, 2)]]


def preprocess_configs():
    if INTERPRET:
        return [_cfg(BLOCK_M=64)]
    return [_cfg(BLOCK_M=m, num_warps=w) for m, w in [(64, 4), (128, 4), (128, 8)]]


def patch_embed_configs():
    if INTERPRET:
        return [_cfg(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)]
    return [_cfg(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s)
            for m, n, k, w, s in [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 3),
                                  (64, 64, 64, 4, 4), (128, 256, 32, 8, 3)]]
