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


# ---------------------------------------------------------------- with accumulation
@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls,kw", [(fastaccum.AdamW, dict(lr=1e-2)), (fastaccum.SGD, dict(lr=0.1, momentum=0.9))])
def test_step_in_backward_with_accumulation_equals_managed(backend, dtype, cls, kw):
    if backend not in fastaccum.available_backends():
        pytest.skip(f"{backend} backend not built")
    torch.manual_seed(0)
    a = OddNet(dtype=dtype)
    b = copy.deepcopy(a)
    oa = cls(a.parameters(), backend=backend, accumulation_steps=4, **kw)
    ob = cls(b.parameters(), backend=backend, accumulation_steps=4, step_in_backward=True, **kw)
    for t, x in enumerate(batches(12, dtype=dtype)):
        for model, opt in ((a, oa), (b, ob)):
            opt.backward(model(x).float().mean(), weight=t % 5 + 1)
            opt.step()
            opt.zero_grad()
        if t % 4 == 3:  # after the window: every parameter updated, nothing waits for step()
            assert all(p.grad is None for p in b.parameters())
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-5, atol=1e-7)
    for p, q in zip(a.parameters(), b.parameters()):
        for name, v in oa.state[p].items():
            torch.testing.assert_close(ob.state[q][name].float(), v.float(), rtol=1e-5, atol=1e-7)
    assert ob.state[b.w1]["step"].item() == 3


def test_step_in_backward_accumulation_updates_in_the_last_backward():
    torch.manual_seed(0)
    model = OddNet()
    opt = fastaccum.AdamW(model.parameters(), backend="torch", accumulation_steps=2, step_in_backward=True)
    xs = batches(2)
    before = model.w1.detach().clone()
    opt.backward(model(xs[0]).mean(), weight=2)
    assert torch.equal(model.w1, before)  # micro-batch 1 only folds
    opt.step()
    opt.backward(model(xs[1]).mean(), weight=3)
    assert not torch.equal(model.w1, before)  # updated in its hook, before step()
    assert model.w1.grad is None
    opt.step()
    assert opt.micro_step == 0 and opt.state[model.w1]["step"].item() == 1


def test_step_in_backward_accumulation_parameter_without_last_gradient():
    """A parameter that got gradients only before the last micro-batch is updated by step()."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    v = torch.nn.Parameter(torch.randn(4))
    wa, va = copy.deepcopy(w), copy.deepcopy(v)
    oa = fastaccum.AdamW([wa, va], backend="torch", accumulation_steps=2)
    ob = fastaccum.AdamW([w, v], backend="torch", accumulation_steps=2, step_in_backward=True)
    for (p, q), opt in (((wa, va), oa), ((w, v), ob)):
        opt.backward((p * q).sum(), weight=1)
        opt.step()
        opt.backward(p.pow(2).sum(), weight=2)  # v gets no gradient in the last micro-batch
        opt.step()
    torch.testing.assert_close(v, va)
    torch.testing.assert_close(w, wa)


def test_step_in_backward_accumulation_refusals():
    model = OddNet()
    with pytest.raises(ValueError, match="cannot skip a whole step"):
        fastaccum.AdamW(model.parameters(), accumulation_steps=4, step_in_backward=True, loss_scale="dynamic")
    with pytest.raises(ValueError, match="global norm"):
        fastaccum.AdamW(model.parameters(), accumulation_steps=4, step_in_backward=True, max_grad_norm=1.0)
    opt = fastaccum.AdamW(model.parameters(), accumulation_steps=4, step_in_backward=True)
    with pytest.raises(RuntimeError, match="step_in_backward"):
        opt.clip_grad_norm_(1.0)


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the storages that ops allocate while the mode is on (live and peak); outputs
    that alias an input (in-place ops) are not allocations. A storage counts as freed when
    the tensor that first held it dies (torch keeps a tensor's Python object alive as long as
    C++ holds it, so autograd's saved and in-flight gradients are counted)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.ptrs = set()

    def _free(self, ptr, n):
        self.ptrs.discard(ptr)
        self.live -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr and ptr not in inputs and ptr not in self.ptrs:
                n = t.untyped_storage().nbytes()
                self.ptrs.add(ptr)
                self.live += n
                self.peak = max(self.peak, self.live)
                weakref.finalize(t, self._free, ptr, n)
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_in_backward_accumulation_peak_memory(dtype):
    """In the window's last micro-batch, at most one parameter's gradient is alive at a time
    and the update allocates nothing on top (cpu backend): the last gradient is folded and
    applied in its hook, never kept for step(). (fastaccum's managed path folds it on arrival
    too, so the two peaks are equal: what step-in-backward removes there is the separate
    update pass.)"""
    if "cpu" not in fastaccum.available_backends():
        pytest.skip("cpu backend not built")
    d, layers = 256, 4
    peaks = {}
    for sib in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(d, d, bias=False) for _ in range(layers)]).to(dtype)
        opt = fastaccum.AdamW(model.parameters(), accumulation_steps=2, step_in_backward=sib, backend="cpu")
        x = torch.randn(4, d, dtype=dtype)
        for _ in range(3):  # state allocated, buffers warm
            opt.backward(model(x).float().pow(2).mean(), weight=4)
            opt.step()
        loss = model(x).float().pow(2).mean()
        assert opt.sync_gradients
        with _LiveBytes() as m:
            opt.backward(loss, weight=4)
            opt.step()
        peaks[sib] = m.peak
        assert all(p.grad is None for p in model.parameters())
    one_grad = d * d * 4  # one parameter's gradient, fp32 bytes
    assert peaks[True] <= 1.1 * one_grad, peaks  # never two gradients (or a gradient copy) at once
    assert peaks[True] <= peaks[False], peaks
