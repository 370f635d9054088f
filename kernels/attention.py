"""Varlen (packed) multi-head attention in Triton, FlashAttention-2 style.

Forward: one program per (block of BLOCK_M queries, sequence*head); it streams key blocks with
an online softmax (base 2) and saves the row log-sum-exp. Backward: a preprocess kernel computes
delta = rowsum(dO * O); a dK/dV kernel holds a key block and loops over query blocks; a dQ kernel
holds a query block and loops over key blocks. Probabilities are recomputed from the saved LSE,
no atomics (deterministic), no O(L^2) memory.

Sequence bounds come from cu_seqlens loaded inside the kernels; max_seqlen only sizes the grid
and never reaches a kernel, so new lengths do not recompile. Programs past their sequence's end
return at once. Nothing here reads a device value on the host (no sync).

Tiles are loaded in the inputs' dtype and fed to tl.dot as they are (fp32 accumulation); only
the computed probabilities / dS are cast down. Autotuning is per head dim, causal flag and shape
class (`_config.attention_class` of the host max lengths): video self-attention and the fusion
encoder's cross-attention (~20 queries) are tuned apart, each over its own configs.
"""

import math
import numbers

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._config import (INTERPRET, attention_class, attention_dkdv_table, attention_dq_table,
                      attention_fwd_table, preprocess_configs)

LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _operand(x, ptr, DOT_F32: tl.constexpr):
    """A computed fp32 tile as a tl.dot operand: fp32 under the interpreter, the input dtype
    (tensor cores) on a GPU."""
    if not DOT_F32:
        x = x.to(ptr.dtype.element_ty)
    return x


@triton.jit
def _bounds(CU, b):
    start = tl.load(CU + b)
    return start, tl.load(CU + b + 1) - start


@triton.jit
def _tile(ptr, rows, row_ok, st, offs_d, d_ok, TRANS: tl.constexpr, DOT_F32: tl.constexpr):
    """(rows, d) tile of a packed (total, H, D) tensor at head offset already in `ptr`; (d, rows)
    with TRANS. Masked entries are 0. Loaded in the tensor's own dtype, ready for tl.dot (no
    upcast: an fp32 copy of a bf16 tile doubles its registers); with DOT_F32 (the interpreter,
    which holds bf16 as raw integers and dots in fp32) upcast to fp32 right after the load."""
    r = rows.to(tl.int64)
    if TRANS:
        x = tl.load(ptr + r[None, :] * st + offs_d[:, None], mask=row_ok[None, :] & d_ok[:, None],
                    other=0.0)
    else:
        x = tl.load(ptr + r[:, None] * st + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
    if DOT_F32:
        x = x.to(tl.float32)
    return x


_FWD = attention_fwd_table()
_DKDV = attention_dkdv_table()
_DQ = attention_dq_table()
# tune_class (see _config.attention_class) is an autotune key only: the kernels ignore it, and
# it is not specialised, so it never causes a compilation of its own
_KEY = ["HEAD_DIM", "CAUSAL", "tune_class"]


@autotune(configs=_FWD.configs, key=_KEY, name="attention_fwd", prune=_FWD.prune)
@triton.jit(do_not_specialize=["tune_class"])
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, qk_scale, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h,
                so_t, so_h, H, tune_class, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                CAUSAL: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    q0, Lq = _bounds(CU_Q, b)
    k0, Lk = _bounds(CU_K, b)
    m_start = pid_m * BLOCK_M
    if m_start >= Lq:
        return
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < Lq, offs_d < HEAD_DIM
    q = _tile(Q + h * sq_h, q0 + rows, row_ok, sq_t, offs_d, d_ok, False, DOT_F32)
    if CAUSAL:  # bottom-right: row i sees keys j <= i + Lk - Lq
        last = tl.minimum(m_start + BLOCK_M, Lq) - 1
        hi = tl.minimum(tl.maximum(last + 1 + Lk - Lq, 0), Lk)
    else:
        hi = Lk
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n_start in range(0, hi, BLOCK_N):
        cols = n_start + offs_n
        col_ok = cols < Lk
        kT = _tile(K + h * sk_h, k0 + cols, col_ok, sk_t, offs_d, d_ok, True, DOT_F32)
        v = _tile(V + h * sv_h, k0 + cols, col_ok, sv_t, offs_d, d_ok, False, DOT_F32)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale
        ok = col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # row saw no key yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(_operand(p, V, DOT_F32), v, input_precision="ieee")
        m_i = m_new
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # rows without keys: acc = 0 -> zeros
    r = (q0 + rows).to(tl.int64)
    tl.store(O + h * so_h + r[:, None] * so_t + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))  # inf: p = 0 in the backward
    tl.store(LSE + r * H + h, lse, mask=row_ok)


@autotune(configs=preprocess_configs(), key=["HEAD_DIM"], name="attention_delta")
@triton.jit(do_not_specialize=["n_rows"])
def _delta_kernel(O, DO, DELTA, n_rows, so_t, so_h, sd_t, sd_h, H, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < n_rows, offs_d < HEAD_DIM
    o = _tile(O + h * so_h, rows, row_ok, so_t, offs_d, d_ok, False, True)  # fp32 math
    do = _tile(DO + h * sd_h, rows, row_ok, sd_t, offs_d, d_ok, False, True)
    tl.store(DELTA + rows.to(tl.int64) * H + h, tl.sum(o * do, 1), mask=row_ok)


@autotune(configs=_DKDV.configs, key=_KEY, name="attention_dkdv", prune=_DKDV.prune)
@triton.jit(do_not_specialize=["tune_class"])
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K, qk_scale, sm_scale,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sd_t, sd_h, sdk_t, sdk_h, sdv_t, sdv_h,
                 H, tune_class, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    q0, Lq = _bounds(CU_Q, b)
    k0, Lk = _bounds(CU_K, b)
    n_start = pid_n * BLOCK_N
    if n_start >= Lk:
        return
    cols = n_start + tl.arange(0, BLOCK_N)
    offs_m, offs_d = tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    col_ok, d_ok = cols < Lk, offs_d < HEAD_DIM
    k = _tile(K + h * sk_h, k0 + cols, col_ok, sk_t, offs_d, d_ok, False, DOT_F32)
    v = _tile(V + h * sv_h, k0 + cols, col_ok, sv_t, offs_d, d_ok, False, DOT_F32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:  # the first query row that sees key n_start
        lo = tl.maximum(n_start - (Lk - Lq), 0)
    else:
        lo = 0
    for m_start in range(lo, Lq, BLOCK_M):
        rows = m_start + offs_m
        row_ok = rows < Lq
        qT = _tile(Q + h * sq_h, q0 + rows, row_ok, sq_t, offs_d, d_ok, True, DOT_F32)
        doT = _tile(DO + h * sd_h, q0 + rows, row_ok, sd_t, offs_d, d_ok, True, DOT_F32)
        r = (q0 + rows).to(tl.int64)
        lse = tl.load(LSE + r * H + h, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + r * H + h, mask=row_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision="ieee") * qk_scale
        ok = col_ok[:, None] & row_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[:, None] <= rows[None, :] + (Lk - Lq))
        pT = tl.where(ok, tl.exp2(sT - lse[None, :]), 0.0)
        dv += tl.dot(_operand(pT, V, DOT_F32), tl.trans(doT), input_precision="ieee")
        dpT = tl.dot(v, doT, input_precision="ieee")
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(_operand(dsT, K, DOT_F32), tl.trans(qT), input_precision="ieee")
    c = (k0 + cols).to(tl.int64)
    m2 = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + h * sdk_h + c[:, None] * sdk_t + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=m2)
    tl.store(DV + h * sdv_h + c[:, None] * sdv_t + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=m2)


@autotune(configs=_DQ.configs, key=_KEY, name="attention_dq", prune=_DQ.prune)
@triton.jit(do_not_specialize=["tune_class"])
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, qk_scale, sm_scale,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sd_t, sd_h, sdq_t, sdq_h,
               H, tune_class, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
               DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    q0, Lq = _bounds(CU_Q, b)
    k0, Lk = _bounds(CU_K, b)
    m_start = pid_m * BLOCK_M
    if m_start >= Lq:
        return
    rows = m_start + tl.arange(0, BLOCK_M)
    offs_n, offs_d = tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D)
    row_ok, d_ok = rows < Lq, offs_d < HEAD_DIM
    q = _tile(Q + h * sq_h, q0 + rows, row_ok, sq_t, offs_d, d_ok, False, DOT_F32)
    do = _tile(DO + h * sd_h, q0 + rows, row_ok, sd_t, offs_d, d_ok, False, DOT_F32)
    r = (q0 + rows).to(tl.int64)
    lse = tl.load(LSE + r * H + h, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + r * H + h, mask=row_ok, other=0.0)
    if CAUSAL:
        last = tl.minimum(m_start + BLOCK_M, Lq) - 1
        hi = tl.minimum(tl.maximum(last + 1 + Lk - Lq, 0), Lk)
    else:
        hi = Lk
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n_start in range(0, hi, BLOCK_N):
        cols = n_start + offs_n
        col_ok = cols < Lk
        kT = _tile(K + h * sk_h, k0 + cols, col_ok, sk_t, offs_d, d_ok, True, DOT_F32)
        vT = _tile(V + h * sv_h, k0 + cols, col_ok, sv_t, offs_d, d_ok, True, DOT_F32)
        s = tl.dot(q, kT, input_precision="ieee") * qk_scale
        ok = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            ok = ok & (cols[None, :] <= rows[:, None] + (Lk - Lq))
        p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vT, input_precision="ieee")
        ds = p * (dp - delta[:, None])
        dq += tl.dot(_operand(ds, K, DOT_F32), tl.trans(kT), input_precision="ieee")
    tl.store(DQ + h * sdq_h + r[:, None] * sdq_t + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _head_args(x):
    return x.stride(0), x.stride(1)


def _common(q):
    D = q.shape[2]
    return dict(HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), DOT_F32=INTERPRET)


# Launch arguments, built in one place for the launches below and for kernels._compile_check
# (which compiles every config from the same arguments, specialised as a launch would).

def fwd_args(q, k, v, o, lse, cu_q, cu_k, scale, causal, tune_class):
    H = q.shape[1]
    args = (q, k, v, o, lse, cu_q, cu_k, scale * LOG2E, *_head_args(q), *_head_args(k),
            *_head_args(v), *_head_args(o), H, tune_class)
    return args, dict(CAUSAL=causal, **_common(q))


def delta_args(o, do, delta):
    c = _common(o)
    return (o, do, delta, o.shape[0], *_head_args(o), *_head_args(do), o.shape[1]), \
        dict(HEAD_DIM=c["HEAD_DIM"], BLOCK_D=c["BLOCK_D"])


def bwd_args(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, scale, causal, tune_class):
    """(dK/dV args, dQ args, shared kwargs)."""
    H = q.shape[1]
    head = (cu_q, cu_k, scale * LOG2E, scale, *_head_args(q), *_head_args(k), *_head_args(v),
            *_head_args(do))
    dkdv = (q, k, v, do, lse, delta, dk, dv, *head, *_head_args(dk), *_head_args(dv), H,
            tune_class)
    dqa = (q, k, v, do, lse, delta, dq, *head, *_head_args(dq), H, tune_class)
    return dkdv, dqa, dict(CAUSAL=causal, **_common(q))


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, out):
        total_q, H, _ = q.shape
        B = cu_q.shape[0] - 1
        o = torch.empty_like(q) if out is None else out
        lse = torch.empty(total_q, H, device=q.device, dtype=torch.float32)
        if out is not None:
            ctx.mark_dirty(o)
        tune = attention_class(max_q, max_k)
        if total_q and B * H and max_q > 0:
            grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), B * H)  # noqa: E731
            args, kw = fwd_args(q, k, v, o, lse, cu_q, cu_k, scale, causal, tune)
            _fwd_kernel[grid](*args, **kw)
        ctx.save_for_backward(q, k, v, o, lse, cu_q, cu_k)
        ctx.meta = (max_q, max_k, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale = ctx.meta
        do = do.contiguous()
        total_q, H, _ = q.shape
        B = cu_q.shape[0] - 1
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        if total_q == 0 or k.shape[0] == 0 or B * H == 0 or max_q <= 0 or max_k <= 0:
            return dq, dk, dv, *([None] * 7)
        delta = torch.empty_like(lse)
        args, kw = delta_args(o, do, delta)
        _delta_kernel[lambda meta: (triton.cdiv(total_q, meta["BLOCK_M"]), H)](*args, **kw)
        dkdv, dqa, kw = bwd_args(q, k, v, do, lse, delta, dq, dk, dv, cu_q, cu_k, scale, causal,
                                 attention_class(max_q, max_k))
        _dkdv_kernel[lambda meta: (triton.cdiv(max_k, meta["BLOCK_N"]), B * H)](*dkdv, **kw)
        _dq_kernel[lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), B * H)](*dqa, **kw)
        return dq, dk, dv, *([None] * 7)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                     *, causal: bool = False, softmax_scale: float | None = None, out=None):
    """Packed attention: q `(total_q, H, D)`, k/v `(total_k, H, D)` -> `(total_q, H, D)`.

    Sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1] of q and cu_seqlens_k[i]:... of k/v
    (int32 `(B+1,)` on q's device); `max_seqlen_*` are host ints >= every length (they size the
    grid only). fp32/fp16/bf16 with fp32 accumulation; any head dim <= 128. `causal` is aligned
    bottom-right (query i sees keys j <= i + Lk - Lq); rows that see no key give zeros.
    Softmax scale defaults to D**-0.5. `out`: optional buffer to write into (a test hook; rows
    outside every sequence are left untouched). No host sync.
    """
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape or q.shape[1:] != k.shape[1:]:
        raise ValueError(f"expected q (total_q, H, D) and k, v (total_k, H, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"varlen_attention supports float32/float16/bfloat16 (all the same); got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] > 128:
        raise ValueError(f"head dim {q.shape[2]} > 128 is not supported")
    if cu_seqlens_q.shape != cu_seqlens_k.shape or cu_seqlens_q.dim() != 1:
        raise ValueError("cu_seqlens_q and cu_seqlens_k must both be (batch+1,)")
    if not all(isinstance(m, numbers.Integral) for m in (max_seqlen_q, max_seqlen_k)):
        raise TypeError("max_seqlen_q / max_seqlen_k must be Python ints (host values, no sync)")
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype):
        raise ValueError("out must match q's shape and dtype")
    scale = q.shape[2] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not math.isfinite(scale):
        raise ValueError(f"softmax_scale {scale} is not finite")
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cu_q, cu_k = (c.to(torch.int32).contiguous() for c in (cu_seqlens_q, cu_seqlens_k))
    return _VarlenAttention.apply(q, k, v, cu_q, cu_k, int(max_seqlen_q), int(max_seqlen_k),
                                  bool(causal), scale, out)
