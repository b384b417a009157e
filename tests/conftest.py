"""Shared helpers: small models with odd parameter sizes and deterministic data."""
from __future__ import annotations

import copy
import os
from typing import Dict, List

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# No GPU here: Triton kernels run in Triton's interpreter on CPU tensors. This must be set
# before triton decorates any kernel, i.e. before fastaccum's triton backend is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ODD_SIZES = (1, 7, 4097)


class OddNet(nn.Module):
    """Parameters of odd sizes (1, 7, 4097), two shapes of matrix, and one parameter that
    never gets a gradient (``unused``), so that every loop also checks torch's rule of
    skipping parameters whose ``.grad`` is None."""

    def __init__(self, d_in: int = 7, hidden: int = 13, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, d_in, dtype=dtype) * 0.3)
        self.b1 = nn.Parameter(torch.randn(hidden, dtype=dtype) * 0.1)
        self.big = nn.Parameter(torch.randn(4097, dtype=dtype) * 0.1)
        self.w2 = nn.Parameter(torch.randn(1, hidden, dtype=dtype) * 0.3)
        self.scale = nn.Parameter(torch.ones(1, dtype=dtype))
        self.odd = nn.Parameter(torch.randn(7, dtype=dtype) * 0.1)
        self.unused = nn.Parameter(torch.randn(3, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, tokens, d_in) -> per-token loss terms (batch, tokens)
        h = torch.tanh(x @ self.w1.t() + self.b1)
        y = (h @ self.w2.t()).squeeze(-1) * self.scale
        y = y + 1e-3 * self.big.sum() + 1e-2 * self.odd.pow(2).sum()
        return (y - 0.5).pow(2)

    def groups(self, lr: float = 1e-2) -> List[Dict]:
        """Two param groups with their own hyper-parameters."""
        return [
            {"params": [self.w1, self.b1, self.big, self.unused]},
            {"params": [self.w2, self.scale, self.odd], "lr": lr * 0.5, "weight_decay": 0.0},
        ]


# what a host read of a device value dispatches (.item(), float(t), bool(t), .tolist())
HOST_SYNC_OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default)


class AtenOps(TorchDispatchMode):
    """The aten ops dispatched while the mode is on, in order (``seen``); with ``keep``, only
    those it accepts (e.g. ``HOST_SYNC_OPS.__contains__``)."""

    def __init__(self, keep=None):
        super().__init__()
        self.keep = keep
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.keep is None or self.keep(func):
            self.seen.append(func)
        return func(*args, **(kwargs or {}))


def fp64_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """L2 distance of ``x`` from an fp64 reference."""
    return (x.double() - ref).norm().item()


def finish_rank() -> None:
    """The end of a spawned rank whose results are on disk.

    Every rank is done (rank 0's result file is written and closed) before any tears gloo
    down. Then leave without the interpreter's shutdown: a gloo worker thread that frees a
    finished collective's tensors after Python started shutting down cannot take the GIL and
    aborts the process ("terminate called without an active exception"; about 1 run in 15
    here), which would fail a test whose results are already on disk. (DDP and FSDP2 keep the
    process group alive here, so destroy_process_group cannot join those threads first, as
    examples/ddp.py does.)
    """
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def make_pair(dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    a = OddNet(dtype=dtype)
    return a, copy.deepcopy(a)


def batches(n: int, seed: int = 1, batch: int = 3, tokens: int = 5, d_in: int = 7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, d_in, generator=g).to(dtype) for _ in range(n)]


def assert_state_close(opt_a, opt_b, rtol: float, atol: float) -> None:
    """Every state tensor of ``opt_b`` (e.g. torch.optim) matches ``opt_a``'s."""
    sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
    assert set(sa) == set(sb), f"state for params {sorted(sa)} vs {sorted(sb)}"
    for k in sb:
        for name, vb in sb[k].items():
            va = sa[k][name]
            # compared on the CPU: step counts may live on the device (as with torch's fused Adam)
            torch.testing.assert_close(va.float().cpu(), vb.float().cpu(), rtol=rtol, atol=atol,
                                       msg=f"param {k} state {name}")


def assert_params_close(model_a, model_b, rtol: float, atol: float) -> None:
    for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a.float(), b.float(), rtol=rtol, atol=atol, msg=f"parameter {n}")


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # tests choose backends explicitly; a developer's FASTACCUM_BACKEND must not leak in
    monkeypatch.delenv("FASTACCUM_BACKEND", raising=False)


@pytest.fixture
def triton_launches(monkeypatch):
    """The names of the bucket kernels launched from now on (every launch goes through
    ``triton_kernels._launch``), in order."""
    from fastaccum.backends import triton_kernels as K

    names = []
    real = K._launch

    def counting(spec, grid, *args, **kw):
        names.append(spec.kernel.fn.__name__ if hasattr(spec.kernel, "fn") else str(spec.kernel))
        return real(spec, grid, *args, **kw)

    monkeypatch.setattr(K, "_launch", counting)
    return names
