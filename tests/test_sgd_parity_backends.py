"""fastaccum.SGD against torch.optim.SGD on every backend that runs CPU tensors here,
momentum 0 and 0.9, with accumulation (managed loop), params and momentum buffers compared."""
import pytest
import torch

import fastaccum
from conftest import batches, make_pair

STEPS = 10
BACKENDS = [b for b in ("torch", "cpu") if b in fastaccum.available_backends()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.05, momentum=0.9),
                                dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)],
                         ids=["momentum0", "momentum0.9", "nesterov_wd"])
def test_sgd_matches_torch_optim_sgd(backend, kw):
    accum = 3
    model, ref_model = make_pair()
    opt = fastaccum.SGD(model.parameters(), backend=backend, accumulation_steps=accum, **kw)
    ref_opt = torch.optim.SGD(ref_model.parameters(), **kw)
    for t, x in enumerate(batches(STEPS * accum)):
        (ref_model(x).mean() / accum).backward()
        if (t + 1) % accum == 0:
            ref_opt.step()
            ref_opt.zero_grad()
        opt.backward(model(x).mean())
        opt.step()
        opt.zero_grad()
    tol = dict(rtol=1e-6, atol=1e-7) if backend == "torch" else dict(rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **tol)
        if kw.get("momentum"):
            if ref_opt.state[q]:
                torch.testing.assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], **tol)
