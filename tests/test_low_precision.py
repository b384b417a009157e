"""bf16/fp16 parameters: exact fp32 accumulation, fp32 master weights, stochastic rounding.

Errors are measured against an fp64 reference and compared with what plain torch does in
the same dtype (never a loose absolute tolerance)."""
import copy

import pytest
import torch
from torch import nn

import fastaccum

MICRO = 32


def _micro_grads(model, xs):
    """The bf16 gradient autograd produces for each micro-batch, exactly as fastaccum's hook sees it."""
    out = []
    for x in xs:
        model.zero_grad()
        model(x).float().pow(2).mean().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_accumulation_is_fp32_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 4097), nn.Tanh(), nn.Linear(4097, 7)).to(dtype)
    xs = [torch.randn(4, 16).to(dtype) for _ in range(MICRO)]
    grads = _micro_grads(model, xs)
    ref = [sum(g[k].double() for g in grads) for k in range(len(grads[0]))]

    naive = copy.deepcopy(model)  # torch: .grad accumulates in the parameter dtype
    for x in xs:
        naive(x).float().pow(2).mean().backward()

    opt = fastaccum.AdamW(model.parameters(), backend="torch")
    for x in xs:
        model(x).float().pow(2).mean().backward()
    for p, q, r in zip(model.parameters(), naive.parameters(), ref):
        # no low-precision gradient is kept: p.grad presents the parameter's dtype over the fp32 segment
        assert isinstance(p.grad, fastaccum.GradView) and p.grad.dtype == dtype
        assert p.grad.fp32() is p.main_grad
        err_fa = (p.main_grad.double() - r).norm() / r.norm()
        err_naive = (q.grad.double() - r).norm() / r.norm()
        # fp32 accumulation of 32 terms: a few fp32 ulps; bf16/fp16 accumulation: ~ulps of the low dtype
        assert err_fa < 32 * 2**-24, f"fp32 accumulation error {err_fa:.3g}"
        assert err_naive > 100 * err_fa, f"naive {err_naive:.3g} vs fastaccum {err_fa:.3g}"
    del opt


def _train(model, opt, xs, steps, accum):
    for t in range(steps * accum):
        x = xs[t % len(xs)]
        loss = model(x.to(next(model.parameters()).dtype)).float().pow(2).mean() / accum
        loss.backward()
        if (t + 1) % accum == 0:
            opt.step()
            opt.zero_grad()


def _param_error(model, ref64):
    num = sum((p.double() - q).pow(2).sum() for p, q in zip(model.parameters(), ref64.parameters()))
    den = sum(q.pow(2).sum() for q in ref64.parameters())
    return (num / den).sqrt().item()


@pytest.mark.parametrize("master_weights", [True, False])
def test_bf16_training_tracks_fp64(master_weights):
    """40 AdamW steps at a small lr: fp32 masters (or stochastic rounding) track the fp64
    run far better than torch's AdamW on bf16 parameters, whose updates round away
    (stochastic rounding errs as sqrt(steps), round-to-nearest drops whole updates)."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 256), nn.Tanh(), nn.Linear(256, 1))
    xs = [torch.randn(16, 32) for _ in range(8)]
    ref64 = copy.deepcopy(base).bfloat16().double()  # same starting point as the bf16 runs
    _train(ref64, torch.optim.AdamW(ref64.parameters(), lr=1e-4), [x.double() for x in xs], 40, 4)
    plain = copy.deepcopy(base).bfloat16()
    _train(plain, torch.optim.AdamW(plain.parameters(), lr=1e-4), xs, 40, 4)
    ours = copy.deepcopy(base).bfloat16()
    torch.manual_seed(1)
    _train(ours, fastaccum.AdamW(ours.parameters(), lr=1e-4, master_weights=master_weights, backend="torch"), xs, 40, 4)
    err_plain, err_ours = _param_error(plain, ref64), _param_error(ours, ref64)
    print(f"master_weights={master_weights}: fastaccum {err_ours:.3g}, torch bf16 {err_plain:.3g}")
    assert err_ours < 0.5 * err_plain, f"fastaccum {err_ours:.3g} vs torch bf16 {err_plain:.3g}"


def test_master_weights_in_state_and_fp16_requires_them():
    p = nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
    opt = fastaccum.AdamW([p], backend="torch")
    (p.float() ** 2).sum().backward()
    opt.step()
    st = opt.state[p]
    assert st["master_param"].dtype == torch.float32 and st["exp_avg"].dtype == torch.float32
    assert torch.equal(st["master_param"].bfloat16(), p.detach())
    with pytest.raises(ValueError, match="master_weights=False"):
        fastaccum.AdamW([nn.Parameter(torch.randn(3, dtype=torch.float16))], master_weights=False)


def test_stochastic_rounding_is_unbiased():
    from fastaccum.reference import stochastic_round_

    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # 1/8 of a bf16 ulp above 1.0
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    torch.manual_seed(0)
    stochastic_round_(out, x)
    vals = out.float()
    assert set(vals.unique().tolist()) == {1.0, 1.0 + 2**-7}
    # mean within 5 standard errors of the true value (Bernoulli(1/8) steps of 2**-7)
    se = 2**-7 * (0.125 * 0.875 / x.numel()) ** 0.5
    assert abs(vals.double().mean().item() - (1.0 + 2**-10)) < 5 * se
    assert torch.equal(torch.full((3,), 1.0).bfloat16(), torch.tensor([1.0, 1.0, 1.0], dtype=torch.bfloat16))


def test_bf16_moments_close_to_fp32_moments():
    """state_dtype=bfloat16 keeps exp_avg/exp_avg_sq in bf16 (math in fp32, stochastic rounding):
    a short training run stays close to the fp32-moment run."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 1))
    xs = [torch.randn(16, 32) for _ in range(8)]
    runs = {}
    for sd in (torch.float32, torch.bfloat16):
        m = copy.deepcopy(base)
        opt = fastaccum.AdamW(m.parameters(), lr=1e-3, state_dtype=sd, backend="torch")
        _train(m, opt, xs, 30, 2)
        runs[sd] = m
        assert opt.state[next(m.parameters())]["exp_avg_sq"].dtype == sd
    rel = _param_error(runs[torch.bfloat16], copy.deepcopy(runs[torch.float32]).double())
    assert rel < 1e-3, f"bf16 moments drift {rel:.3g} from fp32 moments"
