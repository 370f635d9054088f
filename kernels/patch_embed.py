"""Fused patch embedding of kept patches: gather straight from the pixels, matmul, + bias + pos.

One launch, grid (cdiv(total_kept, BLOCK_M), cdiv(D, BLOCK_N)). Row r's sample is found by a
binary search of cu_seqlens inside the kernel; its flat index t*Hp*Wp + h*Wp + w gives the pixel
addresses of its C x p x p patch, read in BLOCK_K slices of the (c, y, x) axis and multiplied by
the matching weight slice with tl.dot. The backward (weight, bias, position grads; pixels take
none) re-gathers the patches with torch indexing on the device and uses one matmul and
index_add. Also `sample_keep_idx`: the device-side random choice of kept patches.
"""

import torch
import triton
import triton.language as tl

from ._autotune import autotune
from ._config import INTERPRET, patch_embed_configs
from .reference import patch_grid

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@autotune(configs=patch_embed_configs(), key=["D", "K"], name="patch_embed")
@triton.jit(do_not_specialize=["n_rows", "n_seq", "n_search"])
def _patch_embed_kernel(X, IDX, CU, W, BIAS, POS_S, POS_T, OUT, n_rows, n_seq, n_search,
                        sx_b, sx_t, sx_c, sx_h, sx_w, wp, hw, patch, D, K,
                        HAS_BIAS: tl.constexpr, HAS_POS_S: tl.constexpr,
                        HAS_POS_T: tl.constexpr, DOT_F32: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n_rows, cols < D
    # sample of each row: the largest b in [0, n_seq) with cu[b] <= row (binary search)
    lo = tl.zeros([BLOCK_M], tl.int32)
    hi = tl.zeros([BLOCK_M], tl.int32) + n_seq
    for _ in range(n_search):
        mid = (lo + hi) // 2
        go_right = tl.load(CU + mid, mask=row_ok, other=0) <= rows
        lo = tl.where(go_right, mid, lo)
        hi = tl.where(go_right, hi, mid)
    idx = tl.load(IDX + rows, mask=row_ok, other=0).to(tl.int64)
    t, s = idx // hw, idx % hw
    y0, x0 = (s // wp) * patch, (s % wp) * patch
    base = lo.to(tl.int64) * sx_b + t * sx_t + y0 * sx_h + x0 * sx_w  # top-left pixel, channel 0
    pp = patch * patch
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k  # flattened (c, y, x) of the conv weight
        k_ok = kk < K
        c, r = kk // pp, kk % pp
        off = c.to(tl.int64) * sx_c + (r // patch) * sx_h + (r % patch) * sx_w
        a = tl.load(X + base[:, None] + off[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(W + cols[None, :] * K + kk[:, None], mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if not DOT_F32:
            a, w = a.to(W.dtype.element_ty), w.to(W.dtype.element_ty)
        acc += tl.dot(a, w, input_precision="ieee")
    m2 = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_POS_S:
        acc += tl.load(POS_S + s[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_POS_T:
        acc += tl.load(POS_T + t[:, None] * D + cols[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(OUT + rows.to(tl.int64)[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=m2)


def launch_args(pixels, keep_idx, cu, weight, bias, pos_s, pos_t, out):
    """(args, kwargs) of a `_patch_embed_kernel` launch; also used by kernels._compile_check."""
    B, _, _, S_h, S_w = pixels.shape
    D, p = weight.shape[0], weight.shape[-1]
    hp, wp = S_h // p, S_w // p
    w2 = weight.reshape(D, -1).contiguous()
    extra = [x.contiguous() if x is not None else w2 for x in (bias, pos_s, pos_t)]
    args = (pixels, keep_idx, cu, w2, *extra, out, keep_idx.shape[0], B, B.bit_length() + 1,
            *pixels.stride(), wp, hp * wp, p, D, w2.shape[1])
    return args, dict(HAS_BIAS=bias is not None, HAS_POS_S=pos_s is not None,
                      HAS_POS_T=pos_t is not None, DOT_F32=INTERPRET)


class _PatchEmbedGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pixels, keep_idx, cu, weight, bias, pos_s, pos_t):
        B = pixels.shape[0]
        D = weight.shape[0]
        n = keep_idx.shape[0]
        out = torch.empty(n, D, device=weight.device, dtype=weight.dtype)
        if n and B:
            def grid(meta):
                return triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(D, meta["BLOCK_N"])
            args, kw = launch_args(pixels, keep_idx, cu, weight, bias, pos_s, pos_t, out)
            _patch_embed_kernel[grid](*args, **kw)
        ctx.save_for_backward(pixels, keep_idx, cu)
        ctx.meta = (weight.shape, bias is not None,
                    None if pos_s is None else pos_s.shape, None if pos_t is None else pos_t.shape)
        return out

    @staticmethod
    def backward(ctx, g):
        pixels, keep_idx, cu = ctx.saved_tensors
        w_shape, has_bias, ps_shape, pt_shape = ctx.meta
        need = ctx.needs_input_grad
        dw = db = dps = dpt = None
        _, t, hw, patches = patch_grid(pixels, keep_idx, cu, w_shape[-1])
        g32 = g.float()
        if need[3]:
            dw = (g.t() @ patches.to(g.dtype)).reshape(w_shape)
        if has_bias and need[4]:
            db = g32.sum(0).to(g.dtype)
        if ps_shape is not None and need[5]:
            dps = g32.new_zeros(ps_shape).index_add_(0, hw, g32).to(g.dtype)
        if pt_shape is not None and need[6]:
            dpt = g32.new_zeros(pt_shape).index_add_(0, t, g32).to(g.dtype)
        return None, None, None, dw, db, dps, dpt


def patch_embed_gather(pixels, keep_idx, cu_seqlens, weight, bias=None, pos_spatial=None,
                       pos_temporal=None):
    """Embeddings `(total_kept, D)` of the kept patches of `pixels` `(B, T, C, H, W)`.

    keep_idx `(total_kept,)`: flat index t*Hp*Wp + h*Wp + w of each kept patch within its own
    sample (Hp = H // p; extra pixel rows/cols are ignored); cu_seqlens int32 `(B+1,)` counts the
    kept patches per sample. weight `(D, C, p, p)` (a stride-p conv), bias `(D,)`, pos_spatial
    `(Hp*Wp, D)`, pos_temporal `(T, D)`, each optional. Output in weight's dtype (fp32 accumulate);
    differentiable in weight, bias and both position embeddings, not in pixels. No host sync.
    """
    if pixels.requires_grad:
        raise ValueError("patch_embed_gather gives no gradient for pixels; pass pixels.detach() "
                         "(or pixels that do not require grad)")
    if pixels.dim() != 5 or weight.dim() != 4 or weight.shape[-1] != weight.shape[-2] \
            or weight.shape[1] != pixels.shape[2]:
        raise ValueError(f"expected pixels (B, T, C, H, W) and weight (D, C, p, p); got "
                         f"{tuple(pixels.shape)}, {tuple(weight.shape)}")
    if weight.dtype not in DTYPES:
        raise TypeError(f"patch_embed_gather supports float32/float16/bfloat16 weights, got "
                        f"{weight.dtype}")
    B, T, _, S_h, S_w = pixels.shape
    D, p = weight.shape[0], weight.shape[-1]
    expect = {"bias": (bias, (D,)), "pos_spatial": (pos_spatial, ((S_h // p) * (S_w // p), D)),
              "pos_temporal": (pos_temporal, (T, D))}
    for name, (x, shape) in expect.items():
        if x is not None and tuple(x.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {shape}")
    if cu_seqlens.shape != (B + 1,):
        raise ValueError(f"cu_seqlens must be ({B + 1},), got {tuple(cu_seqlens.shape)}")
    return _PatchEmbedGather.apply(pixels, keep_idx.contiguous(), cu_seqlens.to(torch.int32),
                                   weight, bias, pos_spatial, pos_temporal)


def sample_keep_idx(counts, num_patches, max_patches: int, total: int | None = None,
                    generator=None):
    """Choose counts[i] of the num_patches[i] patches of each sample, uniformly, on the device.

    counts / num_patches: int64 `(B,)` tensors on the compute device; `total` = sum(counts) as a
    host int (required for device tensors: computing it would sync). Same draws and conventions
    as `hvfm.model.video.sample_keep`: random scores (B, max_patches), argsort per row, the first
    k_i, sorted within each sample. Returns (keep_idx int64, sample id per row, cu_seqlens int32).
    """
    dev = counts.device
    if total is None:
        if dev.type != "cpu":
            raise ValueError("pass total=sum(counts) as a host int (it would need a device sync)")
        total = int(counts.sum())
    B = counts.shape[0]
    k_t, n_t = counts.long(), num_patches.long()
    scores = torch.rand(B, max_patches, device=dev, generator=generator)
    scores = scores.masked_fill(torch.arange(max_patches, device=dev) >= n_t[:, None], float("inf"))
    order = scores.argsort(dim=1)  # valid patches first, in random order
    rows = torch.repeat_interleave(torch.arange(B, device=dev), k_t, output_size=total)
    ends = torch.cumsum(k_t, 0)
    starts = ends - k_t
    picked = order[rows, torch.arange(total, device=dev) - starts[rows]]
    keys = (rows * max_patches + picked).sort().values  # sorted within each sample
    cu = torch.cat([ends.new_zeros(1), ends]).to(torch.int32)
    return keys - rows * max_patches, rows, cu
