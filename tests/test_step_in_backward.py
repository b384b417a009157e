"""step_in_backward: each parameter is updated in its hook, with the same numbers as a step after backward."""
import copy

import pytest
import torch

import fastaccum
from conftest import OddNet, batches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", [(fastaccum.AdamW, dict(lr=1e-2)), (fastaccum.SGD, dict(lr=0.1, momentum=0.9))])
def test_step_in_backward_equals_step(dtype, cls, kw):
    torch.manual_seed(0)
    a = OddNet(dtype=dtype)
    b = copy.deepcopy(a)
    oa = cls(a.parameters(), backend="torch", **kw)
    ob = cls(b.parameters(), backend="torch", step_in_backward=True, **kw)
    for t, x in enumerate(batches(6, dtype=dtype)):
        oa.backward(a(x).float().mean(), weight=t + 1)
        oa.step()
        oa.zero_grad()
        ob.backward(b(x).float().mean(), weight=t + 1)
        # parameters are already updated here; step()/zero_grad() are no-ops kept for loop compatibility
        ob.step()
        ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert ob.state[b.w1]["step"].item() == 6


def test_no_gradient_outlives_its_hook():
    model = OddNet(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(model.parameters(), backend="torch", step_in_backward=True)
    model(batches(1, dtype=torch.bfloat16)[0]).float().mean().backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="step_in_backward"):
        opt.clip_grad_norm_(1.0)


def test_no_accumulation_buffer_is_allocated():
    """step_in_backward saves the 4 bytes/param of the fp32 buffer: nothing holds gradients."""
    model = OddNet(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(model.parameters(), backend="torch", step_in_backward=True)
    assert all(b.grad is None for b in opt._buckets)
    model(batches(1, dtype=torch.bfloat16)[0]).float().mean().backward()
    assert opt.state[model.w1]["step"].item() == 1
    sd = opt.state_dict()
    opt.load_state_dict(sd)
