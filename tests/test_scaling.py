"""Loss scaling and skipped steps: inf/nan anywhere skips the whole update and loses nothing."""
import copy
import io

import pytest
import torch

import fastaccum
from conftest import OddNet, batches


def _snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])


def _assert_same(snap_a, snap_b):
    (ma, sa), (mb, sb) = snap_a, snap_b
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert set(sa) == set(sb)
    for k in sa:
        for name in sa[k]:
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_scale_skips_on_inf_and_recovers(dtype):
    torch.manual_seed(0)
    model = OddNet(dtype=dtype)
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2, loss_scale="dynamic", backend="torch")
    assert opt.loss_scale == 2.0**16
    xs = batches(8, dtype=dtype)
    for x in xs[:4]:  # two clean windows
        opt.backward(model(x).float().mean())
        opt.step()
        opt.zero_grad()
    before = _snapshot(model, opt)
    opt.backward(model(xs[4]).float().mean())
    opt.step()
    opt.backward(model(xs[5]).float().mean() * float("inf"))  # overflow in the last micro-batch
    opt.step()
    opt.zero_grad()
    _assert_same(before, _snapshot(model, opt))
    assert opt.skipped_steps == 1
    assert opt.loss_scale == 2.0**15
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters() if p in opt.state)
    assert not any(any(b.fresh) for b in opt._buckets), "the dropped window's gradients are all stale"
    # the next window starts from its own gradients alone, not on top of the dropped ones
    ref = copy.deepcopy(model)
    params = list(ref.parameters())
    loss = ref(xs[6]).float().mean() * opt.loss_scale
    expected = torch.autograd.grad(loss, [q for q in params if q is not ref.unused])
    opt.backward(model(xs[6]).float().mean())
    used = [p for p in model.parameters() if p is not model.unused]
    for p, e in zip(used, expected):
        bi, i = opt._where[p]
        torch.testing.assert_close(opt._buckets[bi].grad_views[i], e.float(), rtol=0, atol=0)
    opt.step()
    opt.zero_grad()
    for x in xs[7:]:  # training continues
        opt.backward(model(x).float().mean())
        opt.step()
        opt.zero_grad()
    assert opt.state[model.w1]["step"].item() == 3
    assert not torch.equal(before[0]["w1"], model.w1.detach())


def test_scaled_equals_unscaled():
    """A static loss scale is folded into the update multiplier: same result as no scaling."""
    torch.manual_seed(0)
    a = OddNet()
    b = copy.deepcopy(a)
    oa = fastaccum.AdamW(a.parameters(), lr=1e-2, accumulation_steps=3, backend="torch")
    ob = fastaccum.AdamW(b.parameters(), lr=1e-2, accumulation_steps=3, loss_scale=1024.0, backend="torch")
    for x in batches(9):
        for m, o in ((a, oa), (b, ob)):
            o.backward(m(x).mean())
            o.step()
            o.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_scaler_driven_equals_builtin():
    """torch.amp.GradScaler driving the optimizer (grad_scale/found_inf folded in) equals the
    built-in dynamic scaling, including the skipped step; both equal torch.optim + GradScaler."""
    torch.manual_seed(0)
    builtin_m = OddNet()
    scaler_m, torch_m = copy.deepcopy(builtin_m), copy.deepcopy(builtin_m)
    builtin = fastaccum.AdamW(builtin_m.parameters(), lr=1e-2, loss_scale="dynamic", backend="torch")
    driven = fastaccum.AdamW(scaler_m.parameters(), lr=1e-2, backend="torch")
    ref = torch.optim.AdamW(torch_m.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu")
    ref_scaler = torch.amp.GradScaler("cpu")
    for t, x in enumerate(batches(8)):
        poison = float("nan") if t == 3 else 1.0
        builtin.backward(builtin_m(x).mean() * poison)
        builtin.step()
        builtin.zero_grad()
        for m, o, s in ((scaler_m, driven, scaler), (torch_m, ref, ref_scaler)):
            s.scale(m(x).mean() * poison).backward()
            s.step(o)
            s.update()
            o.zero_grad()
    assert builtin.skipped_steps == 1 and driven.skipped_steps == 1
    assert builtin.loss_scale == scaler.get_scale() == ref_scaler.get_scale() == 2.0**15
    for p, q, r in zip(builtin_m.parameters(), scaler_m.parameters(), torch_m.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(q, r, rtol=1e-6, atol=1e-7)


def test_grad_scaler_unscale_then_clip_recipe():
    """The AMP recipe with unscale_ + torch's clip_grad_norm_ works on the fp32 views."""
    torch.manual_seed(0)
    m = OddNet()
    r = copy.deepcopy(m)
    opt = fastaccum.AdamW(m.parameters(), lr=1e-2, backend="torch")
    ref = torch.optim.AdamW(r.parameters(), lr=1e-2)
    sa, sb = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for x in batches(5):
        for model, o, s in ((m, opt, sa), (r, ref, sb)):
            s.scale(model(x).mean()).backward()
            s.unscale_(o)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
            s.step(o)
            s.update()
            o.zero_grad()
    for p, q in zip(m.parameters(), r.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_dynamic_growth_and_state_roundtrip():
    s = fastaccum.LossScaler.from_arg("dynamic")
    for _ in range(2000):
        s.update(found_inf=False)
    assert s.scale == 2.0**17
    s.update(found_inf=True)
    assert s.scale == 2.0**16 and s.growth_tracker == 0
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    t = fastaccum.LossScaler.from_arg("dynamic")
    buf.seek(0)
    t.load_state_dict(torch.load(buf))
    assert t.state_dict() == s.state_dict()
