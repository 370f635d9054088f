"""kernels.patch_embed_gather against a float64 torch reference; kernels.sample_keep_idx."""
import os

import numpy as np
import pytest
import torch

import kernels
from kernels.reference import patch_embed_gather_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


@pytest.fixture(autouse=True)
def _no_autotune_search(monkeypatch):
    """CUDA: one config per key (the first listed), 3 compiles instead of 12 + timing runs;
    kernels._compile_check compiles every config."""
    if torch.cuda.is_available() and not INTERPRET:
        monkeypatch.setenv("HVFM_AUTOTUNE", "off")
# (weight dtype, pixel dtype, channels, patch, width D, bias/pos given, counts per sample)
CASES = [
    (torch.float32, torch.float32, 3, 8, 40, True, [7, 0, 60, 1]),  # K = 192, D % 64 != 0
    (torch.float16, torch.float16, 2, 7, 64, False, [0, 0, 5, 0, 3, 1, 0, 9, 2]),  # K = 98
    (torch.bfloat16, torch.float32, 3, 8, 96, True, [20]),  # mixed: fp32 pixels, bf16 weights
]


def batch(case, device, seed=0):
    wdt, pdt, C, p, D, extras, counts = case
    B, T = len(counts), 3
    g = torch.Generator().manual_seed(seed)
    # frames 5p+3 x 6p+2 (extra pixel rows/cols ignored), sliced out of a larger buffer
    big = torch.randn(B, T, C, 5 * p + 3, 6 * p + 4, generator=g, dtype=torch.float64)
    pixels = big[..., 1:].to(pdt).to(device)
    hw = 5 * 6
    n = torch.full((B,), T * hw)
    keep, _, cu = kernels.sample_keep_idx(torch.tensor(counts), n, T * hw, generator=g)
    params = [torch.randn(D, C, p, p, generator=g, dtype=torch.float64) * 0.1]
    params += [torch.randn(*s, generator=g, dtype=torch.float64) if extras else None
               for s in [(D,), (hw, D), (T, D)]]
    return pixels, keep.to(device), cu.to(device), [x if x is None else x.to(device) for x in params]


def run(fn, pixels, keep, cu, params, dtype, g):
    leaves = [x if x is None else x.detach().to(dtype).requires_grad_() for x in params]
    out = fn(pixels, keep, cu, *leaves)
    used = [x for x in leaves if x is not None]
    return out.detach(), torch.autograd.grad(out, used, g.to(out.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(device, case):
    wdt = CASES[case][0]
    pixels, keep, cu, params = batch(CASES[case], device, seed=case)
    g = torch.randn(keep.shape[0], params[0].shape[0], dtype=torch.float64).to(device)
    out, grads = run(kernels.patch_embed_gather, pixels, keep, cu, params, wdt, g)
    out64, grads64 = run(patch_embed_gather_ref, pixels.double(), keep, cu, params, torch.float64, g)
    out_lo, grads_lo = run(patch_embed_gather_ref, pixels, keep, cu, params, wdt, g)
    assert out.shape == out64.shape and out.dtype == wdt and torch.isfinite(out).all()
    for name, factor, a, r64, rlo in [("out", 2, out, out64, out_lo)] + [
            (f"grad {i}", 3, *x) for i, x in enumerate(zip(grads, grads64, grads_lo))]:
        err = (a.double() - r64).abs().max().item()
        base = (rlo.double() - r64).abs().max().item()
        bound = factor * base + ATOL[wdt] * max(1.0, r64.abs().max().item())
        assert err <= bound, f"{name}: kernel error {err:.3g} > {bound:.3g} (torch {base:.3g})"


@pytest.mark.parametrize("device", DEVICES)
def test_pixels_with_grad_rejected(device):
    pixels, keep, cu, params = batch(CASES[0], device)
    with pytest.raises(ValueError, match="no gradient for pixels"):
        kernels.patch_embed_gather(pixels.requires_grad_(), keep, cu, params[0].float())
    with pytest.raises(ValueError, match="pos_temporal has shape"):
        kernels.patch_embed_gather(pixels.detach(), keep, cu, params[0].float(), None, None,
                                   torch.zeros(7, 40))


def test_no_length_is_constexpr():
    import inspect
    from kernels import patch_embed as P
    fn = P._patch_embed_kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    params = inspect.signature(fn).parameters
    const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
    assert const == {"HAS_BIAS", "HAS_POS_S", "HAS_POS_T", "DOT_F32", "BLOCK_M", "BLOCK_N",
                     "BLOCK_K"}, const


def test_sample_keep_idx_matches_hvfm():
    from hvfm.model.video import sample_keep
    num_patches = np.array([16, 48, 32, 16, 48])
    counts = np.array([3, 48, 1, 16, 20])
    ref = sample_keep(counts, num_patches, 48, generator=torch.Generator().manual_seed(3))
    idx, rows, cu = kernels.sample_keep_idx(torch.from_numpy(counts), torch.from_numpy(num_patches),
                                            48, total=int(counts.sum()),
                                            generator=torch.Generator().manual_seed(3))
    assert torch.equal(idx, ref.keep_idx) and torch.equal(rows, ref.rows)
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + np.cumsum(counts).tolist()
    for i, chunk in enumerate(torch.split(idx, counts.tolist())):
        assert (chunk.diff() > 0).all() and chunk.min() >= 0 and chunk.max() < num_patches[i]
