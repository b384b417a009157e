"""bf16/fp16 p.grad is a GradView: the parameter's dtype outside, the fp32 buffer segment inside.

What trainers do with p.grad (torch.nn.utils.clip_grad_norm_, clip_grad_value_, grad-norm
logging, model.zero_grad(), scaling by hand) acts on the fp32 accumulated gradient, and the
clip's scaling costs no pass: it is folded into the update multiplier."""
import copy
import io

import pytest
import torch

import fastaccum
from conftest import OddNet, batches

ACCUM = 3


def _backward(model, xs, dtype):
    for x in xs:
        (model(x.to(dtype)).float().mean() / len(xs)).backward()


def _fp32_norm(model):
    return float(sum(p.main_grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None)) ** 0.5


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_clip_grad_norm_equals_max_grad_norm(dtype, backend):
    torch.manual_seed(0)
    a = OddNet(dtype=dtype)
    b = copy.deepcopy(a)
    oa = fastaccum.AdamW(a.parameters(), lr=1e-2, backend=backend)
    ob = fastaccum.AdamW(b.parameters(), lr=1e-2, backend=backend, max_grad_norm=0.05)
    xs = batches(5 * ACCUM)
    for s in range(5):
        window = xs[s * ACCUM:(s + 1) * ACCUM]
        _backward(a, window, dtype)
        _backward(b, window, dtype)
        assert a.w1.grad.dtype == dtype and isinstance(a.w1.grad, fastaccum.GradView)
        assert a.unused.grad is None, "a parameter without a gradient keeps p.grad None, as in torch"
        raw = [p.main_grad.clone() for p in a.parameters() if p.grad is not None]
        truth = _fp32_norm(a)
        norm = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.05)
        assert norm.dtype == torch.float32 and norm.item() == pytest.approx(truth, rel=1e-5)
        # the clip wrote nothing: its scale waits for the update (no second pass)
        for r, p in zip(raw, (p for p in a.parameters() if p.grad is not None)):
            assert torch.equal(r, p.main_grad)
        oa.step(); oa.zero_grad()
        ob.step(); ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        # the two norms sum the same squares in another order: equal up to a rare last-bit flip
        torch.testing.assert_close(p, q)
    assert all(p.grad is None for p in a.parameters())


def test_clip_over_mixed_dtypes_equals_max_grad_norm():
    """fp32 and bf16 parameters in one clip: the fp32 views are scaled by torch, the bf16
    scale is written into its buffer before the update; the result equals max_grad_norm=."""
    torch.manual_seed(0)
    a = OddNet()
    for name in ("big", "odd"):
        getattr(a, name).data = getattr(a, name).data.to(torch.bfloat16)
    b = copy.deepcopy(a)
    oa = fastaccum.AdamW(a.parameters(), lr=1e-2, backend="torch")
    ob = fastaccum.AdamW(b.parameters(), lr=1e-2, backend="torch", max_grad_norm=0.05)
    for x in batches(4):
        for m in (a, b):
            m(x).float().mean().backward()
        assert torch.nn.utils.clip_grad_norm_(a.parameters(), 0.05) > 0.05  # the clip engages
        oa.step(); oa.zero_grad()
        ob.step(); ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_model_zero_grad_drops_the_window_like_torch():
    torch.manual_seed(0)
    a = OddNet(dtype=torch.bfloat16)
    b = copy.deepcopy(a)
    oa = fastaccum.AdamW(a.parameters(), lr=1e-2, backend="torch")
    ob = fastaccum.AdamW(b.parameters(), lr=1e-2, backend="torch")
    x0, x1 = batches(2)
    a(x0.bfloat16()).float().mean().backward()
    a.zero_grad()  # what a trainer calls: the gradient so far is dropped, as torch drops it
    for m in (a, b):
        m(x1.bfloat16()).float().mean().backward()
    oa.step(); ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_edits_through_p_grad_act_on_the_fp32_gradient():
    torch.manual_seed(0)
    model = OddNet(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="torch")
    _backward(model, batches(2), torch.bfloat16)
    live = [p for p in model.parameters() if p.grad is not None]
    before = [p.main_grad.clone() for p in live]
    for p in live:
        p.grad.mul_(0.5)  # recorded
    assert all(torch.equal(b, p.main_grad) for b, p in zip(before, live))
    torch.nn.utils.clip_grad_value_(live, 1e-3)  # any other op applies the recorded scale first
    for b, p in zip(before, live):
        assert torch.equal(p.main_grad, (b * 0.5).clamp(-1e-3, 1e-3))
        assert torch.equal(p.grad.float(), p.main_grad) and p.grad.data.dtype == torch.float32
    live[0].grad.mul_(-2.0)  # a negative factor is written at once
    assert torch.equal(live[0].main_grad, (before[0] * 0.5).clamp(-1e-3, 1e-3) * -2.0)
    live[1].grad.zero_()
    assert not live[1].main_grad.any()
    opt.step()


def test_checkpoint_after_a_trainer_clip_resumes_exactly():
    torch.manual_seed(0)
    a = OddNet(dtype=torch.bfloat16)
    b = copy.deepcopy(a)
    oa = fastaccum.AdamW(a.parameters(), lr=1e-2, backend="torch")
    xs = batches(4)
    for m in (a, b):
        _backward(m, xs[:2], torch.bfloat16)
    torch.nn.utils.clip_grad_norm_(a.parameters(), 1e-2)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    ob = fastaccum.AdamW(b.parameters(), lr=1e-2, backend="torch")
    buf.seek(0)
    ob.load_state_dict(torch.load(buf))
    for p, q in zip(a.parameters(), b.parameters()):
        if p.grad is not None:
            assert torch.equal(p.grad.fp32(), q.grad.fp32())
    for m, o in ((a, oa), (b, ob)):
        o.step(); o.zero_grad()
        _backward(m, xs[2:], torch.bfloat16)
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_copy_and_pickle_keep_the_fp32_values():
    torch.manual_seed(0)
    model = OddNet(dtype=torch.bfloat16)
    opt = fastaccum.AdamW(model.parameters(), backend="torch")
    _backward(model, batches(2), torch.bfloat16)
    g = model.w1.grad
    g.mul_(0.25)
    # memory accounting sees the fp32 buffer behind it (no bf16 copy exists)
    assert g.untyped_storage().data_ptr() == model.w1.main_grad.untyped_storage().data_ptr()
    for c in (copy.deepcopy(g), torch.load(_saved(g), weights_only=False)):
        assert isinstance(c, fastaccum.GradView) and c.dtype == torch.bfloat16
        assert torch.equal(c.fp32(), model.w1.main_grad) and torch.equal(c.fp32(), g.fp32())
    del opt


def _saved(t):
    buf = io.BytesIO()
    torch.save(t, buf)
    buf.seek(0)
    return buf
