"""state_dict round trips: resume mid-accumulation bit for bit; torch.optim state loads;
a state_dict of another layout is refused without changing anything."""
import copy
import io

import pytest
import torch

import fastaccum
from conftest import OddNet, batches


def _make(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    model = OddNet(dtype=dtype)
    opt = fastaccum.AdamW(model.groups(), lr=1e-2, accumulation_steps=4, loss_scale="dynamic",
                          max_grad_norm=0.5, backend="torch", **kw)
    return model, opt


def _micro(model, opt, x, t):
    opt.backward(model(x).float().mean(), weight=1 + t % 3)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_mid_accumulation_is_bit_exact(dtype):
    xs = batches(14, dtype=dtype)
    model, opt = _make(dtype)
    for t, x in enumerate(xs):
        _micro(model, opt, x, t)

    model2, opt2 = _make(dtype)
    for t, x in enumerate(xs[:6]):  # stop in the middle of the second window
        _micro(model2, opt2, x, t)
    assert opt2.micro_step == 2
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model3, opt3 = _make(dtype)
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.micro_step == 2 and opt3.loss_scale == opt2.loss_scale
    for t, x in enumerate(xs[6:], start=6):
        _micro(model3, opt3, x, t)

    for p, q in zip(model.parameters(), model3.parameters()):
        assert torch.equal(p, q)
    sa, sb = opt.state_dict()["state"], opt3.state_dict()["state"]
    assert set(sa) == set(sb)
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)
    if dtype == torch.bfloat16:
        assert sb[0]["master_param"].dtype == torch.float32, "master weights are not cast to bf16 on load"


def test_loads_torch_optim_state_dict():
    torch.manual_seed(0)
    model = OddNet()
    ref = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for x in batches(3):
        ref(x).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model.load_state_dict(ref.state_dict())
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="torch")
    opt.load_state_dict(ref_opt.state_dict())
    for x in batches(3, seed=7):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(x).mean().backward()
            o.step()
            o.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_other_layout_is_refused_and_changes_nothing():
    model, opt = _make()
    for t, x in enumerate(batches(4)):
        _micro(model, opt, x, t)
    before = copy.deepcopy(opt.state_dict())
    other = torch.nn.Linear(3, 2)
    other_opt = fastaccum.AdamW(other.parameters(), backend="torch")
    other(torch.randn(1, 3)).sum().backward()
    other_opt.step()
    with pytest.raises(ValueError, match="another parameter layout"):
        opt.load_state_dict(other_opt.state_dict())
    # same number of tensors, other shapes
    swapped = copy.deepcopy(before)
    swapped["state"][0], swapped["state"][2] = swapped["state"][2], swapped["state"][0]
    with pytest.raises(ValueError, match="another parameter layout"):
        opt.load_state_dict(swapped)
    after = opt.state_dict()
    for k in before["state"]:
        for name in before["state"][k]:
            assert torch.equal(before["state"][k][name], after["state"][k][name])
    assert before["param_groups"] == after["param_groups"]


def test_checkpoint_after_a_step_carries_no_buffer():
    model, opt = _make()
    for t, x in enumerate(batches(4)):
        _micro(model, opt, x, t)
    assert opt.state_dict()["fastaccum"]["grad_buffers"] == [None, None]  # two param groups
    _micro(model, opt, batches(1, seed=5)[0], 0)
    bufs = opt.state_dict()["fastaccum"]["grad_buffers"]
    assert all(b is not None and b.abs().sum() > 0 for b in bufs)
