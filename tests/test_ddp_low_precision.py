"""bf16 parameters under DDP (two CPU processes, gloo): fastaccum's communication hook
all-reduces the fp32 accumulation buffer, once per window, in fp32.

One spawn runs every scenario; the tests read what the ranks wrote.
"""
import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import fastaccum

sys.path.insert(0, os.path.dirname(__file__))
from conftest import OddNet, finish_rank  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

WORLD = 2
WINDOWS = 4
LENGTHS = {0: (2, 9, 1), 1: (6, 3, 4)}  # tokens per micro-batch, unequal across ranks


def _data(rank, window):
    g = torch.Generator().manual_seed(100 * window + rank)
    return [torch.randn(1, n, 7, generator=g) for n in LENGTHS[rank]]


def _masters(model, opt):
    return [opt.state[p]["master_param"].clone() if "master_param" in opt.state[p] else p.detach().float().clone()
            for p in model.parameters()]


def _oddnet_run(dtype, use_no_sync=True):
    torch.manual_seed(0)
    model = OddNet().to(dtype)
    ddp = DDP(model, find_unused_parameters=True)  # OddNet.unused never gets a gradient
    opt = fastaccum.AdamW(ddp.parameters(), lr=1e-2, accumulation_steps=len(LENGTHS[0]), max_grad_norm=0.05,
                          backend="cpu")
    ddp.register_comm_hook(opt, fastaccum.ddp_comm_hook)
    rank = dist.get_rank()
    for w in range(WINDOWS):
        for x in _data(rank, w):
            # the fp32 loop, unchanged: skip DDP's sync except on the window's last micro-batch
            with ddp.no_sync() if use_no_sync and not opt.sync_gradients else torch.enable_grad():
                opt.backward(ddp(x.to(dtype)).float().mean(), weight=x.shape[1])
            opt.step()
            opt.zero_grad()
    return _masters(model, opt)


class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))

    def forward(self, c):
        return (self.p.float() * c).sum()


def _fp32_reduction_run():
    """Rank 0's gradient is 1, rank 1's is 2**-10: their bf16 mean rounds to 0.5, the fp32
    mean is 0.5 + 2**-11. SGD with lr=1 writes minus the mean into the fp32 master."""
    model = _Scaled()
    ddp = DDP(model)  # every parameter used: DDP writes its bucket back into p.grad
    opt = fastaccum.SGD(ddp.parameters(), lr=1.0, backend="torch")
    ddp.register_comm_hook(opt, fastaccum.ddp_comm_hook)
    c = 1.0 if dist.get_rank() == 0 else 2.0**-10
    for _ in range(2):
        ddp(torch.tensor(c)).backward()
        opt.step()
        opt.zero_grad()
    return opt.state[model.p]["master_param"].clone()


def _no_hook_error():
    model = _Scaled()
    ddp = DDP(model)
    with warnings.catch_warnings(record=True) as caught:  # no max_grad_norm: trainers' clips would see nothing
        warnings.simplefilter("always")
        opt = fastaccum.SGD(ddp.parameters(), lr=1.0, backend="torch")
    _no_hook_error.warned = any("clips nothing" in str(w.message) for w in caught)
    ddp(torch.tensor(1.0)).backward()
    try:
        opt.step()
    except RuntimeError as e:
        return str(e), model.p.detach().clone()
    return None, model.p.detach().clone()


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    out = {
        "fp32": _oddnet_run(torch.float32),
        "bf16": _oddnet_run(torch.bfloat16),
        "bf16_always_sync": _oddnet_run(torch.bfloat16, use_no_sync=False),
        "fp32_reduction": _fp32_reduction_run(),
        "no_hook": _no_hook_error(),
    }
    out["warned_without_clip"] = _no_hook_error.warned
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finish_rank()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp_bf16")
    mp.spawn(_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


def test_ddp_bf16_ranks_agree_bit_for_bit(ranks):
    for key in ("bf16", "bf16_always_sync", "fp32_reduction"):
        a, b = ranks[0][key], ranks[1][key]
        for x, y in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(x, y), key


def test_ddp_bf16_tracks_fp32_parameters(ranks):
    torch.manual_seed(0)
    init = [p.detach() for p in OddNet().parameters()]
    init16 = [p.to(torch.bfloat16).float() for p in init]
    moved = 0
    for p0, p16, m32, m16 in zip(init, init16, ranks[0]["fp32"], ranks[0]["bf16"]):
        d32, d16 = m32 - p0, m16 - p16
        if d32.norm() == 0:
            assert d16.norm() == 0  # no gradient on any rank: skipped, as torch skips .grad None
            continue
        moved += 1
        assert float((d16 - d32).norm() / d32.norm()) < 3e-2
    assert moved == 6


def test_ddp_bf16_sync_on_every_micro_batch_changes_nothing(ranks):
    # without no_sync, DDP calls the hook on every micro-batch; inside a managed window it
    # sends nothing, so the result is the same
    for x, y in zip(ranks[0]["bf16"], ranks[0]["bf16_always_sync"]):
        assert torch.equal(x, y)


def test_ddp_bf16_reduction_is_fp32(ranks):
    mean32 = 0.5 + 2.0**-11
    assert torch.tensor(mean32).to(torch.bfloat16).item() == 0.5  # what a bf16 reduction would give
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r]["fp32_reduction"], torch.full((4,), -2 * mean32), rtol=0, atol=0)


def test_trainer_clipping_that_would_see_nothing_is_warned_about(ranks):
    assert all(ranks[r]["warned_without_clip"] for r in range(WORLD))


def test_ddp_bf16_without_the_hook_is_an_error_not_a_no_op(ranks):
    for r in range(WORLD):
        msg, p = ranks[r]["no_hook"]
        assert msg is not None and "register_comm_hook(opt, fastaccum.ddp_comm_hook)" in msg
        assert torch.equal(p, torch.zeros(4, dtype=torch.bfloat16))
