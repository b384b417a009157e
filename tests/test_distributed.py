"""Across ranks: DDP on two CPU processes (gloo) with different token counts per rank; the
update equals the global token-weighted mean computed in one process."""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastaccum

sys.path.insert(0, os.path.dirname(__file__))
from conftest import OddNet, finish_rank  # noqa: E402

WORLD = 2
STEPS = 3
# token counts per micro-batch: rank 0 and rank 1 see different totals
LENGTHS = {0: (2, 9, 1), 1: (6, 3, 4)}


def _data(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(1, n, 7, generator=g) for n in LENGTHS[rank]]


def _worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(OddNet(), find_unused_parameters=True)
    # SGD: unlike Adam, its update is not invariant to a constant gradient factor, so a
    # wrong divisor (e.g. each rank's own token count) would show
    opt = fastaccum.SGD(model.parameters(), lr=0.5, momentum=0.9, accumulation_steps=len(LENGTHS[rank]),
                        backend="torch")
    for step in range(STEPS):
        for x in _data(rank, step):
            # skip DDP's all-reduce except on the micro-batch that ends the window
            ctx = model.no_sync() if not opt.sync_gradients else torch.enable_grad()
            with ctx:
                opt.backward(model(x).mean(), weight=x.shape[1])
            opt.step()
            opt.zero_grad()
    if rank == 0:
        torch.save(model.module.state_dict(), out_file)
    finish_rank()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ddp_global_token_mean(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)

    torch.manual_seed(0)
    ref = OddNet()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9)
    for step in range(STEPS):
        tokens = [ref(x).reshape(-1) for r in range(WORLD) for x in _data(r, step)]
        torch.cat(tokens).mean().backward()
        opt.step()
        opt.zero_grad()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


def _inf_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    p = torch.nn.Parameter(torch.ones(3))
    opt = fastaccum.SGD([p], lr=0.1, loss_scale="dynamic", backend="torch")
    for step in range(3):
        # only rank 1 overflows, only at step 1: without a shared found-inf flag rank 0
        # would step while rank 1 skips, and the replicas would drift apart
        bad = float("inf") if (rank == 1 and step == 1) else 1.0
        opt.backward((p * bad).sum())
        opt.step()
        opt.zero_grad()
    if rank == 0:
        torch.save({"skipped": opt.skipped_steps, "scale": opt.loss_scale, "p": p.detach()}, out_file)
    finish_rank()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_ranks_skip_together(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(_inf_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    assert got["skipped"] == 1 and got["scale"] == 2.0**15
    torch.testing.assert_close(got["p"], torch.full((3,), 1.0 - 2 * 0.1))


def _noise_worker(rank, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    got = {}
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(OddNet(), find_unused_parameters=True)
        opt = fastaccum.AdamW(model.parameters(), lr=0.01, accumulation_steps=len(LENGTHS[rank]), backend=backend,
                              track_noise_scale=True, loss_scale="dynamic")
        for step in range(5):
            for k, x in enumerate(_data(rank, step)):
                ctx = model.no_sync() if not opt.sync_gradients else torch.enable_grad()
                with ctx:
                    loss = model(x).mean()
                    if (rank, step, k) == (1, 2, 1):  # one rank overflows: every rank skips, uncounted
                        loss = loss * float("inf")
                    opt.backward(loss, weight=x.shape[1])
                opt.step()
                opt.zero_grad()
        est = opt.noise_scale_estimator
        got[backend] = dict(resident=opt._resident is not None, skipped=opt.skipped_steps, windows=est.windows,
                            unestimable=est.unestimable_windows, value=est.value, g2=est.g2, trace=est.trace)
    if rank == 0:
        torch.save(got, out_file)
    finish_rank()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
def test_noise_scale_across_ranks_on_the_resident_step(tmp_path):
    """The device-resident step sums the ranks' noise-scale reports in its one device all-reduce
    (with the weight sum and the found-inf flag): the same estimate as the host-decided step's
    fp64 all-reduce, ranks with different token counts, a window skipped on one rank's inf."""
    if "triton" not in fastaccum.available_backends():
        pytest.skip("triton backend not available")
    out = tmp_path / "rank0.pt"
    mp.spawn(_noise_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    host, resident = torch.load(out)["torch"], torch.load(out)["triton"]
    assert resident["resident"] and not host["resident"]
    for key in ("skipped", "windows", "unestimable"):
        assert resident[key] == host[key], key
    assert host["skipped"] == 1 and host["windows"] == 4 and host["value"] > 0
    for key in ("value", "g2", "trace"):
        assert resident[key] == pytest.approx(host[key], rel=2e-6), key
