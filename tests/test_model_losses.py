"""VTC across ranks equals VTC on the concatenated batch; VTM never samples a positive."""
import math
import os
import socket
import tempfile

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from hvfm.model.losses import host_pairs, sample_hard_negatives, vtc_loss  # noqa: E402

B, WORLD, DIM = 3, 2, 5
KEYS = torch.tensor([7, 1, 2, 7, 3, 1])  # captions 0 & 3 and 1 & 5 identical, across ranks


def _problem():
    g = torch.Generator().manual_seed(0)
    xt, xv, xr = (torch.randn(B * WORLD, DIM, generator=g, dtype=torch.float64) for _ in range(3))
    torch.manual_seed(0)
    ft = torch.nn.Linear(DIM, 4).double()
    fv = torch.nn.Linear(DIM, 4).double()
    scale = torch.nn.Parameter(torch.tensor(math.log(10.0), dtype=torch.float64))
    return xt, xv, xr, ft, fv, scale


def _loss_and_grads(rows):
    xt, xv, xr, ft, fv, scale = _problem()
    loss, _ = vtc_loss(ft(xt[rows]), fv(xv[rows]), scale, KEYS[rows], reverse_video_emb=fv(xr[rows]))
    loss.backward()
    params = [*ft.parameters(), *fv.parameters(), scale]
    return loss.detach(), [p.grad for p in params]


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    loss, grads = _loss_and_grads(slice(rank * B, (rank + 1) * B))
    for t in [loss, *grads]:  # what DDP / DeepSpeed do with gradients; loss = mean over ranks
        dist.all_reduce(t)
        t /= WORLD
    if rank == 0:
        torch.save((loss, grads), out)
    dist.destroy_process_group()


def test_vtc_two_ranks_equals_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "rank0.pt")
        mp.spawn(_worker, args=(port, out), nprocs=WORLD, join=True)
        loss2, grads2 = torch.load(out)
    loss1, grads1 = _loss_and_grads(slice(None))
    torch.testing.assert_close(loss2, loss1, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads2, grads1):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_vtc_identical_captions_and_reverse_column():
    g = torch.Generator().manual_seed(0)
    t, v, r = (torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.tensor(math.log(100.0) + 1.0, dtype=torch.float64)  # clamped to ln 100
    keys = torch.tensor([5, 5, 6, 7])
    loss, local = vtc_loss(t, v, scale, keys, reverse_video_emb=r)
    tn, vn, rn = (torch.nn.functional.normalize(x, dim=-1) for x in (t, v, r))
    s = 100.0 * tn @ vn.t()
    s[0, 1] = s[1, 0] = -math.inf
    t2v = torch.cat([s, 100.0 * (tn * rn).sum(-1, keepdim=True)], 1)
    lab = torch.arange(4)
    ref = (torch.nn.functional.cross_entropy(t2v, lab) +
           torch.nn.functional.cross_entropy(s.t(), lab)) / 2
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(local, s)


def test_vtm_never_samples_a_positive():
    torch.manual_seed(0)
    keys = torch.tensor([1, 2, 1, 3, 3, 3, 4])
    positive = keys[:, None] == keys[None, :]
    sim = torch.randn(7, 7) * 3
    sim.diagonal().add_(10.0)  # positives are the most similar: the tempting wrong picks
    counts = torch.zeros(7, 7)
    for _ in range(3000):
        nv, nt, ok_t, ok_v = sample_hard_negatives(sim, positive)
        assert ok_t.all() and ok_v.all()
        assert not positive[torch.arange(7), nv].any() and not positive[nt, torch.arange(7)].any()
        counts[torch.arange(7), nv] += 1
    # frequencies follow softmax(sim) renormalised over the negatives
    expect = sim.masked_fill(positive, -math.inf).softmax(1)
    assert (counts / 3000 - expect).abs().max() < 0.05
    # a batch of identical captions has no negative at all: flagged, and dropped by host_pairs
    same = torch.ones(3, 3, dtype=torch.bool)
    nv, nt, ok_t, ok_v = sample_hard_negatives(torch.randn(3, 3), same)
    assert not ok_t.any() and not ok_v.any()
    ti, vi, lab = host_pairs(nv, nt, ok_t, ok_v, 3, reverse=True)
    assert ti.tolist() == [0, 1, 2, 0, 1, 2] and vi.tolist() == [0, 1, 2, 3, 4, 5]
    assert lab.tolist() == [1, 1, 1, 0, 0, 0]


def test_host_pairs_layout():
    nv, nt = torch.tensor([2, 0, 1]), torch.tensor([1, 2, 0])
    ok = torch.tensor([True, False, True])
    ti, vi, lab = host_pairs(nv, nt, ok, torch.ones(3, dtype=torch.bool), 3, reverse=False)
    assert ti.tolist() == [0, 1, 2, 0, 2, 1, 2, 0]
    assert vi.tolist() == [0, 1, 2, 2, 1, 0, 1, 2]
    assert lab.tolist() == [1, 1, 1, 0, 0, 0, 0, 0] and np.issubdtype(lab.dtype, np.integer)
