"""Global-norm clipping folded into the update, equal to torch's clip_grad_norm_ + AdamW."""
import copy

import pytest
import torch

import fastaccum
from conftest import OddNet, batches


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("how", ["max_grad_norm", "clip_grad_norm_"])
def test_clipping_matches_torch(how, accum):
    torch.manual_seed(0)
    model = OddNet()
    ref = copy.deepcopy(model)
    kw = {"max_grad_norm": 0.05} if how == "max_grad_norm" else {}
    opt = fastaccum.AdamW(model.groups(), lr=1e-2, accumulation_steps=accum, loss_scale=256.0,
                          backend="torch", **kw)
    ref_opt = torch.optim.AdamW(ref.groups(), lr=1e-2)
    norms, ref_norms = [], []
    for t, x in enumerate(batches(6 * accum)):
        (ref(x).mean() / accum).backward()
        opt.backward(model(x).mean())
        if (t + 1) % accum == 0:
            ref_norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05))
            ref_opt.step()
            ref_opt.zero_grad()
            if how == "clip_grad_norm_":
                norms.append(opt.clip_grad_norm_(0.05))
        opt.step()
        opt.zero_grad()
    assert min(float(n) for n in ref_norms) > 0.05, "clipping must be active for the test to mean anything"
    for n, r in zip(norms, ref_norms):
        torch.testing.assert_close(n, r, rtol=1e-5, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_clip_norm_is_not_recomputed(monkeypatch):
    torch.manual_seed(0)
    model = OddNet()
    opt = fastaccum.AdamW(model.parameters(), backend="torch", max_grad_norm=1.0)
    calls = []
    backend = opt._buckets[0].backend
    orig = type(backend).grad_norm
    monkeypatch.setattr(type(backend), "grad_norm", lambda self, buf: calls.append(1) or orig(self, buf))
    model(batches(1)[0]).mean().backward()
    opt.clip_grad_norm_(1.0)
    opt.step()
    assert len(calls) == 1, "the step reuses the norm computed by clip_grad_norm_"


def test_norm_pass_is_accurate_on_large_buffers():
    """The clip norm of a large buffer stays at fp32 pairwise accuracy (torch.linalg.vector_norm
    on CPU accumulates serially and drifts by ~1e-3 at this size)."""
    buf = torch.randn(8_000_000, generator=torch.Generator().manual_seed(0))
    exact = buf.double().norm().item()
    got = fastaccum.get_backend("torch").grad_norm(buf).item()
    assert abs(got - exact) / exact < 1e-6


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_stale_segments_never_leak_into_norm_or_update(backend):
    """Segments are not zeroed after a step but marked stale; a parameter that sits out a
    window must count as zero in the clip norm and be skipped, as in torch."""
    torch.manual_seed(0)
    model = OddNet()
    ref = copy.deepcopy(model)
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, max_grad_norm=0.05, loss_scale="dynamic", backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for t, x in enumerate(batches(9)):
        # every third window only `big` gets a gradient; the others keep stale segments
        loss_of = (lambda m: m.big.pow(2).sum()) if t % 3 == 2 else (lambda m: m(x).mean())
        opt.backward(loss_of(model))
        opt.step()
        opt.zero_grad()
        loss_of(ref).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        ref_opt.step()
        ref_opt.zero_grad()
    tol = dict(rtol=1e-6, atol=1e-7) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, **tol)
