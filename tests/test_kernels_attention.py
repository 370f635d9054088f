"""kernels.varlen_attention against a float64 torch reference (flash-attn's error rule).

Runs on CPU under the Triton interpreter (TRITON_INTERPRET=1, set by conftest without a GPU) and
on CUDA when present. Rule: max |kernel - ref64| <= 2x (3x for gradients) the error of the same
computation done in torch at the input precision, plus a small absolute term.

Two kinds of cases:
- `test_matches_reference`: the public call (autotuned path) on one batch of edge lengths, in
  fp32 / fp16 / bf16, head dims 40-128, strided layouts.
- `test_tiles_match_float64`: every tile config of the device's arch family (kernels._config:
  Hopper has its own), forced one by one, forward and backward, bf16 and fp16, on the shapes the
  model makes: causal text and fusion cross-attention (cu_q != cu_k, ~20 queries over hundreds of
  keys) for the short-query tiles (BLOCK_M = 16/32), video self-attention and causal cross
  lengths (bottom-right, Lq < Lk and Lq > Lk) for the long tiles, and up to 4k tokens. The 4k
  shapes run on CUDA only (the interpreter would take minutes); they are the same test code.

On CUDA the module sets HVFM_AUTOTUNE=off (each autotune key takes its first config: this file
proves results, the tile sweep covers every config). Compiled variants, cold: 74 distinct
(kernel, constexprs, config, dtypes, ==1 / 16-divisible specialisation) launches counted under
the interpreter (fwd 22, dQ 22, dK/dV 20, preprocess 10; the 4k shapes reuse the tiles of the
small ones), + ~7 for the CUDA-only recompile/sync test: ~80 compiles. At ~1 s each on an H100
host (an estimate: no GPU has run it yet) that is ~80 s, plus well under 20 s of runs (the
float64 references of the 4k shapes included).
"""
import inspect
import os
import warnings

import pytest
import torch
import triton

import kernels
from kernels import _config
from kernels import attention as KA
from kernels.reference import varlen_attention_ref

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = (["cpu"] if INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}
H = 2
# one batch with: Lq=0 & Lk>0, length 1, equal lengths not a multiple of 64, Lk=0 & Lq>0,
# max >> mean (130), Lq < Lk, both empty, Lq > Lk (causal: the first 7 rows see no key)
LQ = [0, 1, 70, 5, 130, 3, 0, 9]
LK = [4, 1, 70, 0, 130, 40, 0, 2]
CASES = [(torch.float32, 64, False), (torch.float32, 64, True), (torch.float16, 64, False),
         (torch.bfloat16, 64, True), (torch.bfloat16, 128, False), (torch.float16, 40, True),
         (torch.float32, 80, False)]


@pytest.fixture(autouse=True)
def _no_autotune_search(monkeypatch):
    """CUDA: one config per autotune key (its first), so the file compiles what it tests."""
    if torch.cuda.is_available() and not INTERPRET:
        monkeypatch.setenv("HVFM_AUTOTUNE", "off")


def cu(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def make(lq, lk, D, dtype, device, strided=False, seed=0):
    """q, k, v (float64 masters on `device`); `strided`: non-default head/row strides."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lq), H, D + 8 * strided, generator=g, dtype=torch.float64)[..., :D]
    k = torch.randn(H, sum(lk), D, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lk), H, D, generator=g, dtype=torch.float64)
    k = k.transpose(0, 1) if strided else k.transpose(0, 1).contiguous()
    return [x.to(device) for x in (q, k, v)]


def forward_backward(fn, qkv, dtype, do, **kw):
    leaves = [x.detach().to(dtype).requires_grad_() for x in qkv]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, do.to(dtype))
    return out.detach(), grads


def check(name, got, ref64, ref_low, factor, atol):
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    base = (ref_low.double() - ref64).abs().max().item() if got.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item()) if got.numel() else 1.0
    assert err <= factor * base + atol * scale, \
        f"{name}: kernel error {err:.3g} > {factor} x torch error {base:.3g} + {atol * scale:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_reference(device, case):
    dtype, D, causal = CASES[case]
    q, k, v = make(LQ, LK, D, dtype, device, strided=case % 2 == 1, seed=case)
    cq, ck = cu(LQ, device), cu(LK, device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(100 + case),
                     dtype=torch.float64).to(device)
    args = (cq, ck, max(LQ), max(LK))
    poisoned = torch.full(q.shape, float("nan"), dtype=dtype, device=device)

    def kernel(q, k, v):
        return kernels.varlen_attention(q, k, v, *args, causal=causal, out=poisoned)

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, *args, causal=causal)

    out, grads = forward_backward(kernel, (q, k, v), dtype, do)
    out64, grads64 = forward_backward(ref, (q, k, v), torch.float64, do)
    out_lo, grads_lo = forward_backward(ref, (q, k, v), dtype, do)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all(), "some output rows were not written"
    check("out", out, out64, out_lo, 2, ATOL[dtype])
    for name, g, g64, g_lo in zip(("dq", "dk", "dv"), grads, grads64, grads_lo):
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        check(name, g, g64, g_lo, 3, ATOL[dtype])


# (name, query lengths, key lengths, causal, CUDA only). Short-query shapes pick the short tiles
# (kernels._config.attention_class), long ones the long tiles.
SHAPES = {
    "text_causal": ([1, 9, 16, 17, 40, 77], [1, 9, 16, 17, 40, 77], True, False),
    "fusion_cross": ([20, 3, 0, 33, 1], [130, 257, 5, 64, 200], False, False),
    "video_self": ([130, 200, 65, 1], [130, 200, 65, 1], False, False),
    "causal_cross": ([150, 140, 3], [260, 70, 40], True, False),  # Lq < Lk, Lq > Lk, tiny
    "video_4k": ([4096, 1500, 9], [4096, 1500, 9], False, True),
    "causal_4k": ([4096, 1000], [3000, 4096], True, True),
    "fusion_cross_4k": ([77, 20, 5], [4096, 3001, 64], False, True),
}
TILES = 3  # configs per class and kernel (kernels._config keeps at most three)
SWEEP = [pytest.param(name, tile, marks=pytest.mark.skipif(
    SHAPES[name][3] and not torch.cuda.is_available(),
    reason="4k-token shapes run on CUDA only (minutes under the interpreter)"))
    for name in SHAPES for tile in range(TILES if not SHAPES[name][3] else 2)]


def family(device):
    if device == "cuda":
        return _config.arch_family(torch.cuda.get_device_capability())
    return "sm90"  # the interpreter runs any tile shape: the Hopper tiles are the larger ones


def forced_attention(q, k, v, cq, ck, mq, mk, causal, configs, do):
    """Forward and backward with the given (fwd, dK/dV, dQ) configs, launched like the autograd
    wrapper launches them (the same argument builders)."""
    total_q, heads, D = q.shape
    B = cq.shape[0] - 1
    scale = D ** -0.5
    tune = _config.attention_class(mq, mk)
    o = torch.empty_like(q)
    lse = torch.empty(total_q, heads, device=q.device, dtype=torch.float32)
    fwd, dkdv, dq_cfg = configs
    args, kw = KA.fwd_args(q, k, v, o, lse, cq, ck, scale, causal, tune)
    KA._fwd_kernel.fn[(triton.cdiv(mq, fwd.kwargs["BLOCK_M"]), B * heads)](
        *args, **kw, **fwd.all_kwargs())
    delta = torch.empty_like(lse)
    args, kw = KA.delta_args(o, do, delta)
    KA._delta_kernel[lambda meta: (triton.cdiv(total_q, meta["BLOCK_M"]), heads)](*args, **kw)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    a_kv, a_q, kw = KA.bwd_args(q, k, v, do, lse, delta, dq, dk, dv, cq, ck, scale, causal, tune)
    KA._dkdv_kernel.fn[(triton.cdiv(mk, dkdv.kwargs["BLOCK_N"]), B * heads)](
        *a_kv, **kw, **dkdv.all_kwargs())
    KA._dq_kernel.fn[(triton.cdiv(mq, dq_cfg.kwargs["BLOCK_M"]), B * heads)](
        *a_q, **kw, **dq_cfg.all_kwargs())
    return o, (dq, dk, dv)


@pytest.mark.parametrize("name,tile", SWEEP)
def test_tiles_match_float64(name, tile):
    """Tile `tile` of the shape's class on this device's arch family (cycled where a kernel has
    fewer), forward and backward against float64. Dtype alternates with the tile (bf16, fp16,
    bf16): both precisions on every shape, each tile compiled once."""
    lq, lk, causal, _ = SHAPES[name]
    device = DEVICES[-1]  # CUDA when present
    dtype = (torch.bfloat16, torch.float16)[tile % 2]
    D = 64
    cls, fam = _config.attention_class(max(lq), max(lk)), family(device)
    configs = []
    for table in (_config.attention_fwd_table, _config.attention_dkdv_table,
                  _config.attention_dq_table):
        offered = table(False).for_call(cls, fam, D)
        configs.append(offered[tile % len(offered)])
    if cls >= 2:  # short queries: the short-query tiles
        assert configs[0].kwargs["BLOCK_M"] <= 32 and configs[2].kwargs["BLOCK_M"] <= 32
    seed = 10 * list(SHAPES).index(name) + tile
    q, k, v = make(lq, lk, D, dtype, device, seed=seed)
    cq, ck = cu(lq, device), cu(lk, device)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1),
                     dtype=torch.float64).to(device)
    out, grads = forced_attention(*(x.to(dtype) for x in (q, k, v)), cq, ck, max(lq), max(lk),
                                  causal, configs, do.to(dtype))
    args = (cq, ck, max(lq), max(lk))

    def ref(q, k, v):
        return varlen_attention_ref(q, k, v, *args, causal=causal)
    out64, grads64 = forward_backward(ref, (q, k, v), torch.float64, do)
    out_lo, grads_lo = forward_backward(ref, (q, k, v), dtype, do)
    assert torch.isfinite(out).all()
    check(f"{name} {configs[0]} out", out, out64, out_lo, 2, ATOL[dtype])
    for g_name, g, g64, g_lo, cfg in zip(("dq", "dk", "dv"), grads, grads64, grads_lo,
                                         (configs[2], configs[1], configs[1])):
        assert torch.isfinite(g).all(), g_name
        check(f"{name} {cfg} {g_name}", g, g64, g_lo, 3, ATOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_without_keys_are_exact_zeros(device):
    lq, lk = [3, 6, 0, 2], [0, 2, 5, 2]  # no keys at all; causal Lq > Lk; no queries
    q, k, v = (x.float().requires_grad_() for x in make(lq, lk, 32, torch.float32, device))
    out = kernels.varlen_attention(q, k, v, cu(lq, device), cu(lk, device), 6, 5, causal=True)
    dq, dk, dv = torch.autograd.grad(out.square().sum(), (q, k, v))
    empty = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0], dtype=torch.bool, device=device)
    assert (out[empty] == 0).all() and (dq[empty] == 0).all() and (out[~empty] != 0).all()
    assert (dk[2:7] == 0).all() and (dv[2:7] == 0).all()  # keys of the query-less sequence
    # bottom-right alignment: Lq=2, Lk=2 -> row 0 sees key 0 only: its output is v[key 0]
    torch.testing.assert_close(out[9], v[7].detach(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batches(device):
    for lq, lk in [([0, 0], [0, 0]), ([0, 0], [3, 1]), ([], [])]:
        q, k, v = (x.float().requires_grad_() for x in make(lq, lk, 16, torch.float32, device))
        out = kernels.varlen_attention(q, k, v, cu(lq, device), cu(lk, device),
                                       max(lq, default=0), max(lk, default=0))
        assert out.shape == q.shape
        grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
        assert all(g is None or (g == 0).all() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_softmax_scale_and_input_checks(device):
    lq = lk = [5, 17]
    q, k, v = (x.float() for x in make(lq, lk, 16, torch.float32, device))
    args = (cu(lq, device), cu(lk, device), 17, 17)
    out = kernels.varlen_attention(q, k, v, *args, softmax_scale=0.1)
    torch.testing.assert_close(out, varlen_attention_ref(q, k, v, *args, softmax_scale=0.1),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        kernels.varlen_attention(q.double(), k.double(), v.double(), *args)
    with pytest.raises(TypeError, match="Python ints"):
        kernels.varlen_attention(q, k, v, *args[:2], torch.tensor(17), 17)
    with pytest.raises(ValueError, match="head dim"):
        big = torch.zeros(22, 1, 160, device=device)
        kernels.varlen_attention(big, big, big, *args)


def _python_fn(kernel):
    fn = kernel
    while not inspect.isfunction(fn):
        fn = fn.fn
    return fn


def test_no_sequence_length_reaches_a_kernel():
    """max_seqlen sizes the grid only: no kernel takes a length, constexpr or not."""
    for kernel in (KA._fwd_kernel, KA._dkdv_kernel, KA._dq_kernel, KA._delta_kernel):
        params = inspect.signature(_python_fn(kernel)).parameters
        assert not any("seqlen" in n.lower() or n.lower().startswith("max") for n in params)
        const = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert const <= {"HEAD_DIM", "BLOCK_D", "CAUSAL", "DOT_F32", "BLOCK_M", "BLOCK_N"}, const


def test_self_and_cross_attention_are_tuned_apart():
    """Video self-attention and the fusion's cross-attention (~20 queries) have different
    autotune keys and, on a GPU, different candidate configs; the interpreter keeps one."""
    from kernels import _config
    video_self = _config.attention_class(393, 393)  # ViT-B/16, 8 frames, 75% dropped, + CLS
    fusion_cross = _config.attention_class(20, 393)
    assert len({video_self, fusion_cross, _config.attention_class(20, 20)}) == 3
    for kernel in (KA._fwd_kernel, KA._dkdv_kernel, KA._dq_kernel):
        assert "tune_class" in kernel.keys
    if INTERPRET:
        assert all(len(kn.configs) == 1 for kn in (KA._fwd_kernel, KA._dkdv_kernel, KA._dq_kernel,
                                                  KA._delta_kernel))
    for make in (_config.attention_fwd_table, _config.attention_dkdv_table,
                 _config.attention_dq_table):
        table = make(False)  # the GPU lists
        seen = set()
        for fam in _config.ARCH_FAMILIES:
            long_ = table.for_class(video_self, fam)
            short = table.for_class(fusion_cross, fam)
            assert long_ and short and {id(c) for c in long_} != {id(c) for c in short}
            assert min(c.kwargs["BLOCK_M"] for c in short) < min(c.kwargs["BLOCK_M"] for c in long_)
            assert max(len(long_), len(short)) <= 3  # a small search per key
            seen |= {id(c) for c in long_ + short}
        assert seen == {id(c) for c in table.configs}
        # the autotuner's prune: CPU tensors (no arch) -> the sm_80 list; head dim limits
        pruned = table.prune(table.configs, {"tune_class": video_self, "Q": torch.zeros(1)},
                             BLOCK_D=128)
        assert [id(c) for c in pruned] == [id(c) for c in table.for_call(video_self, "sm80", 128)]


def test_hopper_has_its_own_tiles():
    """sm_90 (H100, H200) gets larger tiles than sm_80 and its own lists; other archs sm_80's."""
    assert _config.arch_family((9, 0)) == "sm90"
    assert {_config.arch_family(c) for c in [(8, 0), (8, 6), (8, 9), (10, 0)]} == {"sm80"}
    fwd = _config.attention_fwd_table(False)
    area = {fam: max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in fwd.for_class(0, fam))
            for fam in _config.ARCH_FAMILIES}
    assert area["sm90"] > area["sm80"] and area["sm90"] >= 128 * 64
    for make in (_config.attention_fwd_table, _config.attention_dkdv_table,
                 _config.attention_dq_table):
        t = make(False)
        assert {id(c) for c in t.for_class(0, "sm90")} != {id(c) for c in t.for_class(0, "sm80")}
        # a tile limited to head dim 64 is offered at 64, not at 128
        for c in t.for_class(0, "sm90"):
            if c not in t.for_call(0, "sm90", 128):
                assert c in t.for_call(0, "sm90", 64)


@pytest.mark.skipif(not DEVICES, reason="needs CUDA or TRITON_INTERPRET=1")
def test_launches_pass_their_shape_class(monkeypatch):
    seen = {}

    def spy(name, kernel):
        real = kernel.run

        def run(*args, **kw):
            seen.setdefault(name, []).append(dict(zip(kernel.arg_names, args))["tune_class"])
            return real(*args, **kw)
        monkeypatch.setattr(kernel, "run", run)
    for name in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel"):
        spy(name, getattr(KA, name))
    dev = DEVICES[0]
    for lq, lk in [([150, 3], [150, 3]), ([20, 7], [150, 40])]:
        q, k, v = (x.float().requires_grad_() for x in make(lq, lk, 16, torch.float32, dev))
        out = kernels.varlen_attention(q, k, v, cu(lq, dev), cu(lk, dev), max(lq), max(lk))
        out.sum().backward()
    from kernels._config import attention_class
    want = [attention_class(150, 150), attention_class(20, 150)]
    assert seen == {n: want for n in ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel")}, seen


def _cache_size(kernel):
    """Compiled variants of an autotuned kernel (triton 3.x JITFunction.device_caches layout)."""
    caches = getattr(kernel.fn, "device_caches", None)
    if caches is None:
        pytest.skip("this triton has no JITFunction.device_caches")
    return sum(len(c[0]) for c in caches.values())


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
def test_cuda_no_recompile_no_sync_deterministic():
    dev = "cuda"
    sizes = []
    for lq, lk in [([5, 300, 7], [9, 300, 1]), ([1, 2, 3], [3, 2, 1]), ([1000, 17, 64], [64, 1000, 17])]:
        q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in make(lq, lk, 64, None, dev))
        out = kernels.varlen_attention(q, k, v, cu(lq, dev), cu(lk, dev), max(lq), max(lk),
                                       causal=True)
        out.sum().backward()
        torch.cuda.synchronize()
        sizes.append([_cache_size(kn) for kn in (KA._fwd_kernel, KA._dkdv_kernel, KA._dq_kernel,
                                                KA._delta_kernel)])
    assert sizes[0] == sizes[1] == sizes[2], sizes
    # no host sync once tuned (the first call of a new key autotunes, which syncs);
    # bitwise deterministic gradients
    lq, lk = [5, 300, 7], [9, 300, 1]
    q, k, v = (x.to(torch.bfloat16).requires_grad_() for x in make(lq, lk, 64, None, dev))
    cq, ck = cu(lq, dev), cu(lk, dev)

    def step():
        out = kernels.varlen_attention(q, k, v, cq, ck, 300, 300)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    runs = [step()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runs.append(step())
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_hvfm_triton_backend(monkeypatch):
    A = __import__("hvfm.model.attention", fromlist=["x"])
    monkeypatch.setattr(A, "_WARNED", set())
    monkeypatch.setattr(A, "_REGISTRY", dict(A._REGISTRY))
    A._REGISTRY.pop("triton", None)
    if DEVICES:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert A.get_backend("triton") is A._triton
    # no CUDA and no interpreter: Triton cannot run -> sdpa, one warning
    A._REGISTRY.pop("triton", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.warns(RuntimeWarning, match="'triton' is not available.*TRITON_INTERPRET") as rec:
        assert A.get_backend("triton") is A._sdpa
    assert len(rec) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.get_backend("triton") is A._sdpa
