"""Attention backends compute the same function (float64, outputs and gradients)."""
import importlib
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
A = importlib.import_module("hvfm.model.attention")  # the module (the package exports the function)

H, D = 2, 8


def naive(q, k, v, lq, lk, causal):
    """Per-sequence explicit softmax; rows without keys are zero."""
    out, oq, ok = [], 0, 0
    for a, b in zip(lq, lk):
        qi, ki, vi = q[oq:oq + a], k[ok:ok + b], v[ok:ok + b]
        s = torch.einsum("ihd,jhd->hij", qi, ki) / D ** 0.5
        allowed = torch.ones(a, b, dtype=torch.bool)
        if causal:
            allowed = torch.arange(b)[None, :] <= torch.arange(a)[:, None] + (b - a)
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        out.append(torch.einsum("hij,jhd->ihd", p, vi))
        oq, ok = oq + a, ok + b
    return torch.cat(out)


def make(lq, lk, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(sum(n), H, D, generator=g, dtype=torch.float64, requires_grad=True)
               for n in (lq, lk, lk))
    cu = lambda n: torch.tensor([0] + list(torch.tensor(n).cumsum(0)), dtype=torch.int32)  # noqa
    return q, k, v, cu(lq), cu(lk)


def run(fn, q, k, v, seed=1):
    out = fn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v), allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, (q, k, v))]


CASES = [  # (Lq per sequence, Lk per sequence)
    ([3, 0, 1, 5], [3, 0, 1, 5]),          # self-attention incl. empty and single
    ([2, 4, 1, 0, 3], [5, 1, 3, 2, 0]),    # cross lengths, Lq > Lk and Lq < Lk, Lk = 0
    ([0, 0], [0, 0]),                      # nothing at all
]


@pytest.mark.parametrize("lq,lk", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_backends_match_naive(lq, lk, causal):
    q, k, v, cq, ck = make(lq, lk)
    ref, ref_g = run(lambda *a: naive(*a, lq, lk, causal), q, k, v)
    mq, mk = max(lq), max(lk)
    variants = {
        "sdpa": lambda q, k, v: A.attention(q, k, v, cq, ck, mq, mk, causal, backend="sdpa"),
        "torch-varlen loop": lambda q, k, v: A.attention(q, k, v, cq, ck, mq, mk, causal,
                                                         "torch-varlen", seqlens_q=lq, seqlens_k=lk),
        "torch-varlen dense": lambda q, k, v: A.attention(q, k, v, cq, ck, mq, mk, causal,
                                                          "torch-varlen"),
    }
    for name, fn in variants.items():
        out, grads = run(fn, q, k, v)
        assert out.shape == ref.shape, name
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12, msg=name)
        for g, r in zip(grads, ref_g):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=name)


def test_causal_is_bottom_right():
    # one sequence, Lq=2, Lk=4: query 0 sees keys 0..2, query 1 sees all four
    q, k, v, cq, ck = make([2], [4])
    v = torch.eye(4, dtype=torch.float64)[:, None, :].expand(4, H, 4).repeat(1, 1, 2)[..., :D]
    out = A.attention(q.detach(), k.detach(), v.contiguous(), cq, ck, 2, 4, causal=True)
    assert (out[0, :, 3] == 0).all() and (out[0, :, :3] > 0).all()
    assert (out[1, :, :4] > 0).all()
    # Lq > Lk: the first Lq - Lk queries see nothing and give zeros
    q, k, v, cq, ck = make([4], [2])
    out = A.attention(q, k, v, cq, ck, 4, 2, causal=True, backend="torch-varlen")
    assert (out[:2] == 0).all() and (out[2:] != 0).all()


def test_unknown_backend_names_choices():
    with pytest.raises(ValueError, match="unknown attention backend 'nope'.*sdpa.*torch-varlen"):
        A.get_backend("nope")


@pytest.mark.parametrize("name", ["flash_attn", "xformers"])
def test_fallback_warns_once(name, monkeypatch):
    pytest.importorskip("torch")
    try:
        __import__(name)
        pytest.skip(f"{name} is installed")
    except ImportError:
        pass
    monkeypatch.setattr(A, "_WARNED", set())
    monkeypatch.setattr(A, "_REGISTRY", dict(A._REGISTRY))
    with pytest.warns(RuntimeWarning, match=f"'{name}' is not available.*using 'sdpa'") as rec:
        fn = A.get_backend(name)
    assert fn is A._sdpa and len(rec) == 1 and "\n" not in str(rec[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert A.get_backend(name) is A._sdpa  # no second warning


def test_register_backend(monkeypatch):
    monkeypatch.setattr(A, "_REGISTRY", dict(A._REGISTRY))
    calls = []

    def mine(q, k, v, cu_q, cu_k, mq, mk, causal=False):
        calls.append((mq, mk, causal))
        return A._sdpa(q, k, v, cu_q, cu_k, mq, mk, causal)

    A.register_backend("triton", mine)
    q, k, v, cq, ck = make([2, 3], [1, 4])
    A.attention(q, k, v, cq, ck, 3, 4, causal=True, backend="triton")
    assert calls == [(3, 4, True)]
