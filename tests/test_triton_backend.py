"""Triton kernels against the torch backend (under TRITON_INTERPRET=1 on CPU tensors here).

fp32: assert_close(rtol=1e-5, atol=1e-6); bf16/fp16: error against fp64 at most 2x the
torch backend's error in the same dtype."""
import copy

import pytest
import torch

import fastaccum
from fastaccum.backends import AdamHyper, AdamSegments, SGDHyper, SGDSegments
from conftest import OddNet, batches, fp64_error

triton = pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON = fastaccum.get_backend("triton", DEVICE)
TORCH = fastaccum.get_backend("torch")

SIZES = (1, 7, 4097)


def _adam_state(n, pdtype, sdtype, master, amsgrad, seed):
    g = torch.Generator().manual_seed(seed)
    p32 = torch.randn(n, generator=g)
    st = dict(
        param=p32.to(pdtype).to(DEVICE),
        master=p32.clone().to(DEVICE) if master else None,
        m=(torch.randn(n, generator=g) * 0.1).to(sdtype).to(DEVICE),
        v=(torch.rand(n, generator=g) * 0.01).to(sdtype).to(DEVICE),
        vmax=(torch.rand(n, generator=g) * 0.01).to(sdtype).to(DEVICE) if amsgrad else None,
    )
    return st


def _run_adam(backend, st, grads, hp_kw, steps):
    st = copy.deepcopy(st)
    for t in range(steps):
        grad = grads[t].clone()
        segs = AdamSegments(
            params=[st["param"]], grads=[grad], exp_avgs=[st["m"]], exp_avg_sqs=[st["v"]],
            max_exp_avg_sqs=[st["vmax"]] if st["vmax"] is not None else None,
            masters=[st["master"]] if st["master"] is not None else None, steps=[t + 1],
        )
        backend.adam_(segs, AdamHyper(**hp_kw, seed=1234 + t))
        assert torch.equal(grad, grads[t]), "the update only reads the gradient"
    return st


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("decoupled,amsgrad,maximize", [(True, False, False), (False, True, True)])
def test_adam_fp32_matches_torch_backend(n, decoupled, amsgrad, maximize):
    st = _adam_state(n, torch.float32, torch.float32, False, amsgrad, seed=n)
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(t)).to(DEVICE) * 100 for t in range(10)]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=decoupled,
              maximize=maximize, grad_multiplier=0.01, stochastic_rounding=False)
    a, b = _run_adam(TRITON, st, grads, hp, 10), _run_adam(TORCH, st, grads, hp, 10)
    for k in a:
        if a[k] is not None:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("pdtype,master,sdtype", [
    (torch.bfloat16, True, torch.float32),
    (torch.float16, True, torch.float32),
    (torch.bfloat16, False, torch.float32),
    (torch.float32, False, torch.bfloat16),
])
def test_adam_low_precision_error_at_most_twice_torch(pdtype, master, sdtype):
    n = 4097
    st = _adam_state(n, pdtype, sdtype, master, False, seed=3)
    grads = [torch.randn(n, generator=torch.Generator().manual_seed(t)).to(DEVICE) for t in range(10)]
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, maximize=False,
              grad_multiplier=1.0, stochastic_rounding=(sdtype == torch.bfloat16) or not master)
    # fp64 reference from the same starting point
    ref = {k: (v.double() if v is not None else None) for k, v in st.items()}
    p64 = ref["master"] if master else ref["param"]
    for t in range(10):
        from fastaccum.reference import adam_math
        adam_math(p64, grads[t].double(), ref["m"], ref["v"], None, step=t + 1, lr=1e-3, beta1=0.9,
                  beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, maximize=False, grad_multiplier=1.0)
    a, b = _run_adam(TRITON, st, grads, hp, 10), _run_adam(TORCH, st, grads, hp, 10)
    for k in ("param", "m", "v"):
        ref_k = p64 if k == "param" else ref[k]
        ea, eb = fp64_error(a[k], ref_k), fp64_error(b[k], ref_k)
        assert ea <= 2 * eb + 1e-12, f"{k}: triton error {ea:.3g} vs torch backend {eb:.3g}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_matches_torch_backend(n, momentum, nesterov):
    g = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=g).to(DEVICE)
    out = {}
    for name, be in (("triton", TRITON), ("torch", TORCH)):
        p, buf = p0.clone(), torch.zeros_like(p0)
        for t in range(10):
            grad = torch.randn(n, generator=torch.Generator().manual_seed(t)).to(DEVICE)
            be.sgd_(SGDSegments([p], [grad], [buf] if momentum else None, None, [t + 1]),
                    SGDHyper(lr=0.1, momentum=momentum, dampening=0.0, nesterov=nesterov, weight_decay=0.01,
                             maximize=False, grad_multiplier=0.5, stochastic_rounding=False, seed=0))
        out[name] = (p, buf)
    for x, y in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", SIZES + (1_000_003,))
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_and_norm(n, src_dtype):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(n, generator=g).to(src_dtype).to(DEVICE)
    a, b = torch.randn(n, generator=g).to(DEVICE), None
    b = a.clone()
    TRITON.accumulate_(a, src, 0.5)
    TORCH.accumulate_(b, src, 0.5)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(TRITON.grad_norm(a), TORCH.grad_norm(a), rtol=1e-5, atol=1e-6)
    a[n // 2] = float("inf")
    assert not torch.isfinite(TRITON.grad_norm(a))
    a[n // 2] = float("nan")
    assert torch.isnan(TRITON.grad_norm(a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_run_matches_torch_backend(dtype):
    """>= 10 steps with accumulation, clipping, loss scaling, token weights: params and all state."""
    torch.manual_seed(0)
    a = OddNet(dtype=dtype).to(DEVICE)
    b = copy.deepcopy(a)
    kw = dict(lr=1e-2, accumulation_steps=2, max_grad_norm=0.05, loss_scale="dynamic")
    oa = fastaccum.AdamW(a.groups(), backend="triton", **kw)
    ob = fastaccum.AdamW(b.groups(), backend="torch", **kw)
    for t, x in enumerate(batches(20, dtype=dtype)):
        x = x.to(DEVICE)
        for m, o in ((a, oa), (b, ob)):
            o.backward(m(x).float().mean(), weight=1 + t % 3)
            o.step()
            o.zero_grad()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    for k in sb:
        for name in sb[k]:
            # on the CPU: the resident step keeps step counts on the device, like torch's fused Adam
            torch.testing.assert_close(sa[k][name].cpu(), sb[k][name].cpu(), **tol, msg=f"{k}/{name}")
