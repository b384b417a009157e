"""The torch backend must run on Apple MPS, which has no float64. No Mac is available, so
the whole optimizer runs under a dispatch mode that rejects any float64 tensor."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import fastaccum
from conftest import OddNet, batches


class NoFloat64(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"float64 input to {func}")
        if kwargs.get("dtype") == torch.float64:
            raise AssertionError(f"float64 requested by {func}")
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                raise AssertionError(f"float64 output of {func}")
        return out


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, dict(loss_scale="dynamic", max_grad_norm=0.1)),
        (torch.bfloat16, dict(master_weights=True, state_dtype=torch.bfloat16)),
        (torch.bfloat16, dict(master_weights=False, amsgrad=True)),
    ],
)
def test_torch_backend_uses_no_float64(dtype, kw):
    torch.manual_seed(0)
    model = OddNet(dtype=dtype)
    opt = fastaccum.AdamW(model.groups(), lr=1e-2, accumulation_steps=2, backend="torch", **kw)
    with NoFloat64():
        for t, x in enumerate(batches(6, dtype=dtype)):
            opt.backward(model(x).float().mean(), weight=t + 1)
            if t == 3:
                opt.clip_grad_norm_(0.5)
            opt.step()
            opt.zero_grad()
        sd = opt.state_dict()
    assert sd["state"][0]["step"].item() == 3


def test_sgd_uses_no_float64():
    model = OddNet()
    opt = fastaccum.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, backend="torch")
    with NoFloat64():
        for x in batches(3):
            model(x).mean().backward()
            opt.step()
            opt.zero_grad()
