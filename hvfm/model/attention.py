"""One attention interface for the whole model, in flash-attn's varlen style.

    attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, backend)

q is `(total_q, H, D)`, k/v are `(total_k, H, D)`; sequence i owns rows
`cu_seqlens_q[i]:cu_seqlens_q[i+1]` of q and `cu_seqlens_k[i]:cu_seqlens_k[i+1]` of k/v
(int32 tensors `(B+1,)` on the compute device, max_seqlen_* Python ints). The scale is D**-0.5.
`causal=True` is aligned bottom-right as in flash-attn: query i of a sequence with lengths
(Lq, Lk) sees keys j <= i + Lk - Lq; a query row that sees no key (or a sequence with Lk = 0)
outputs zeros. Zero-length sequences are allowed.

Backends (`BACKENDS` lists the names):
  sdpa          unfused baseline: scatter to padded (B, H, Lmax, D), key-padding mask, torch SDPA.
  torch-varlen  pure-torch packed reference. Without host lengths it builds a block-diagonal
                mask over the packed rows (no host sync, O(total_q * total_k) memory); given
                host lengths (`seqlens_q`/`seqlens_k`, lists of ints) it loops per sequence.
  flash_attn    flash_attn_varlen_func (half precision inputs), when importable.
  xformers      memory_efficient_attention + BlockDiagonalMask, when importable (needs host
                lengths; computes them with one host sync when not given).
  triton        `kernels.varlen_attention` when importable and Triton can run: on CUDA, or on
                CPU under the interpreter (TRITON_INTERPRET=1, slow; tests only).
                `register_backend` can install any.
An optional backend that cannot be imported falls back to sdpa with one warning line.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

_REGISTRY: dict[str, tuple[Callable, bool]] = {}  # name -> (fn, wants host lengths)
_OPTIONAL = ("flash_attn", "xformers", "triton")
_WARNED: set[str] = set()


def to_device(x, device=None) -> torch.Tensor:
    """Host array/tensor -> `device` without a host sync (pinned + non_blocking on accelerators).

    A plain `.to(cuda)` from pageable memory synchronises the stream; this does not.
    """
    t = torch.as_tensor(x)
    if device is None or torch.device(device).type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass(frozen=True)
class Varlen:
    """Packing of a batch of sequences: device `cu_seqlens`, host `lengths` and `max_seqlen`."""

    cu_seqlens: torch.Tensor  # int32 (B+1,) on the compute device
    lengths: tuple[int, ...]  # host copy of the per-sequence lengths
    max_seqlen: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device=None) -> "Varlen":
        """Build from host lengths; the only transfer is host -> device (no sync)."""
        lengths = tuple(int(n) for n in lengths)
        cu = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=cu[1:])
        return cls(to_device(cu, device), lengths, max(lengths, default=0))

    @property
    def total(self) -> int:
        return int(sum(self.lengths))

    @property
    def batch(self) -> int:
        return len(self.lengths)


def register_backend(name: str, fn: Callable, host_lengths: bool = False) -> None:
    """Install `fn(q, k, v, cu_q, cu_k, max_q, max_k, causal=False)` under `name`.

    With `host_lengths=True` it is also passed `seqlens_q=`/`seqlens_k=` (lists or None).
    """
    _REGISTRY[name] = (fn, host_lengths)
    _WARNED.discard(name)


def _fallback(name: str, why: str):
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"attention backend '{name}' is not available ({why}); using 'sdpa' instead",
                      RuntimeWarning, stacklevel=3)
    return _REGISTRY["sdpa"]


def _resolve(name: str) -> tuple[Callable, bool]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name not in _OPTIONAL:
        raise ValueError(f"unknown attention backend '{name}'; valid: {', '.join(BACKENDS)}")
    try:
        if name == "flash_attn":
            from flash_attn import flash_attn_varlen_func  # noqa: F401
            register_backend(name, _flash_attn)
        elif name == "xformers":
            from xformers.ops import fmha  # noqa: F401
            register_backend(name, _xformers, host_lengths=True)
        else:
            if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
                return _fallback(name, "no CUDA device and TRITON_INTERPRET is not 1")
            from kernels import varlen_attention  # noqa: F401
            register_backend(name, _triton)
    except Exception as e:  # ImportError, or a broken install raising something else
        return _fallback(name, f"{type(e).__name__}: {e}".splitlines()[0])
    return _REGISTRY[name]


def get_backend(name: str) -> Callable:
    """The attention function registered as `name` (optional ones fall back to sdpa, warning once)."""
    return _resolve(name)[0]


def attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
              causal: bool = False, backend: str = "sdpa", seqlens_q=None, seqlens_k=None):
    """Packed multi-head attention; see the module docstring. Returns `(total_q, H, D)`."""
    fn, wants_host = _resolve(backend)
    if wants_host:
        return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                  seqlens_q=seqlens_q, seqlens_k=seqlens_k)
    return fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal)


# ---------------------------------------------------------------------------------------------
# helpers shared by the pure-torch backends


def _segments(cu: torch.Tensor, total: int):
    """Sequence id and position within it of each packed row (device ops, no sync)."""
    rows = torch.arange(total, device=cu.device)
    seg = torch.searchsorted(cu[1:].long(), rows, right=True)
    return seg, rows - cu.long()[seg]


def _allowed(pos_q, len_q, pos_k, len_k, causal: bool):
    """Boolean mask (..., Lq, Lk): key inside its sequence and, if causal, not in the future."""
    ok = pos_k[..., None, :] < len_k[..., None, None]
    if causal:  # bottom-right: j <= i + Lk - Lq
        ok = ok & (pos_k[..., None, :] <= (pos_q + (len_k - len_q)[..., None])[..., :, None])
    return ok


def _masked_sdpa(q, k, v, ok):
    """SDPA with a boolean mask; rows without any allowed key give exact zeros (as flash-attn)."""
    has_key = ok.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=ok | ~has_key)
    return out * has_key.to(out.dtype)


# ---------------------------------------------------------------------------------------------
# backends


def _sdpa(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    """Unfused baseline: packed -> padded (B, H, Lmax, D) -> SDPA with padding mask -> packed."""
    B, H, D = cu_q.shape[0] - 1, q.shape[1], q.shape[2]
    seg_q, pos_q = _segments(cu_q, q.shape[0])
    seg_k, pos_k = _segments(cu_k, k.shape[0])
    Lq, Lk = max(max_q, 1), max(max_k, 1)
    qp = q.new_zeros(B, Lq, H, D).index_put((seg_q, pos_q), q)
    kp = k.new_zeros(B, Lk, H, D).index_put((seg_k, pos_k), k)
    vp = v.new_zeros(B, Lk, H, D).index_put((seg_k, pos_k), v)
    len_q, len_k = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
    ok = _allowed(torch.arange(Lq, device=q.device).expand(B, Lq), len_q,
                  torch.arange(Lk, device=q.device).expand(B, Lk), len_k, causal)
    out = _masked_sdpa(qp.transpose(1, 2), kp.transpose(1, 2), vp.transpose(1, 2), ok[:, None])
    return out.transpose(1, 2)[seg_q, pos_q]


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, seqlens_q=None, seqlens_k=None):
    """Packed reference: per-sequence loop with host lengths, else a block-diagonal mask."""
    if seqlens_q is not None and seqlens_k is not None:
        outs, oq, ok_ = [], 0, 0
        for lq, lk in zip(seqlens_q, seqlens_k):
            if lk == 0:
                outs.append(q[oq:oq + lq] * 0)  # keeps the graph connected
            else:
                qi = q[oq:oq + lq].transpose(0, 1)
                ki, vi = k[ok_:ok_ + lk].transpose(0, 1), v[ok_:ok_ + lk].transpose(0, 1)
                mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
                if causal:  # bottom-right aligned
                    mask = mask.tril(lk - lq)
                outs.append(_masked_sdpa(qi, ki, vi, mask).transpose(0, 1))
            oq, ok_ = oq + lq, ok_ + lk
        return torch.cat(outs) if outs else q * 0
    if k.shape[0] == 0:
        return q * 0
    seg_q, pos_q = _segments(cu_q, q.shape[0])
    seg_k, pos_k = _segments(cu_k, k.shape[0])
    len_q, len_k = (cu_q[1:] - cu_q[:-1]).long(), (cu_k[1:] - cu_k[:-1]).long()
    ok = seg_q[:, None] == seg_k[None, :]
    if causal:
        ok = ok & (pos_k[None, :] <= (pos_q + len_k[seg_q] - len_q[seg_q])[:, None])
    out = _masked_sdpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), ok)
    return out.transpose(0, 1)


def _flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    from flash_attn import flash_attn_varlen_func
    return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)


def _triton(q, k, v, cu_q, cu_k, max_q, max_k, causal=False):
    from kernels import varlen_attention
    return varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal)


def _xformers(q, k, v, cu_q, cu_k, max_q, max_k, causal=False, seqlens_q=None, seqlens_k=None):
    from xformers.ops import fmha
    sq = list(seqlens_q) if seqlens_q is not None else (cu_q[1:] - cu_q[:-1]).tolist()  # sync
    sk = list(seqlens_k) if seqlens_k is not None else (cu_k[1:] - cu_k[:-1]).tolist()  # sync
    mask_cls = fmha.attn_bias.BlockDiagonalCausalFromBottomRightMask if causal \
        else fmha.attn_bias.BlockDiagonalMask
    bias = mask_cls.from_seqlens(sq, sk)
    return fmha.memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]


register_backend("sdpa", _sdpa)
register_backend("torch-varlen", _torch_varlen, host_lengths=True)
BACKENDS = ("sdpa", "torch-varlen") + _OPTIONAL


def sequence_rows(xs: Varlen, idx, device=None) -> tuple[torch.Tensor, Varlen]:
    """Rows of a packing `xs` that sequences `idx` (host ints, repeats allowed) occupy, in that
    order, as one device index (int64, host-computed, no sync), and the packing they form."""
    idx = np.asarray(idx, np.int64)
    lens = np.asarray(xs.lengths, np.int64)
    starts = np.cumsum(lens) - lens
    sel = lens[idx]
    out_starts = np.cumsum(sel) - sel
    flat = np.repeat(starts[idx] - out_starts, sel) + np.arange(int(sel.sum()))
    return to_device(flat, device), Varlen.from_lengths(sel, device)


def gather_sequences(x: torch.Tensor, xs: Varlen, idx) -> tuple[torch.Tensor, Varlen]:
    """Pack sequences `idx` (host ints, repeats allowed) of packed `x` in that order."""
    rows, packed = sequence_rows(xs, idx, x.device)
    return x[rows], packed


def concat_sequences(a: torch.Tensor, a_s: Varlen, b: torch.Tensor, b_s: Varlen):
    """Packing of a's sequences followed by b's (indices B_a + j refer to b's sequence j)."""
    return torch.cat([a, b]), Varlen.from_lengths(a_s.lengths + b_s.lengths, a.device)
