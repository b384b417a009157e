"""The C++ cpu backend (fastaccum.backends.cpu._C) kernel by kernel against the torch backend.

fp32: ``assert_close(rtol=1e-5, atol=1e-6)``. bf16/fp16: error against an fp64 reference at
most 2x the torch backend's error in the same dtype. Sizes around the vector widths
(1, 15, 16, 17, 4097, 1_000_003), segments at odd (unaligned) offsets of one flat buffer,
>= 10 steps with 4 accumulations each, parameters and every state tensor compared. Every
ISA the machine supports (avx512, avx2, scalar) runs the kernels.
"""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from fastaccum import reference
from fastaccum.backends import AdamHyper, AdamSegments, BackendUnavailableError, SGDHyper, SGDSegments, get_backend

try:
    CPU = get_backend("cpu")
except BackendUnavailableError as e:  # built with FASTACCUM_NO_EXT=1, or the build failed
    pytest.skip(f"cpu backend not built: {e}", allow_module_level=True)

from fastaccum.backends.cpu import _C  # noqa: E402

TORCH = get_backend("torch")
ISAS = _C.supported_isas()
SIZES = (1, 15, 16, 17, 4097)
BIG = 1_000_003
STEPS = 10
ACCUM = 4
LOW = (torch.bfloat16, torch.float16)


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.isa()
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(before)


def _flat_views(sizes, dtype, gen, scale=1.0, offset=1, positive=False):
    """Segments of one flat buffer, starting at an odd element offset (unaligned)."""
    total = offset + sum(sizes)
    flat = torch.randn(total, generator=gen) * scale
    if positive:
        flat = flat.abs()
    flat = flat.to(dtype)
    out, o = [], offset
    for n in sizes:
        out.append(flat[o:o + n])
        o += n
    return out


# ------------------------------------------------------------------------------------
# accumulate


@pytest.mark.parametrize("n", SIZES + (BIG,))
def test_accumulate_fp32_matches_torch(isa, n):
    gen = torch.Generator().manual_seed(n)
    dst, src = _flat_views([n, n], torch.float32, gen)
    ref = dst.clone()
    TORCH.accumulate_(ref, src, 0.37)
    assert CPU.accumulate_(dst, src, 0.37) is None
    torch.testing.assert_close(dst, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("n", (17, 4097))
def test_accumulate_low_precision_vs_fp64(isa, dtype, n):
    gen = torch.Generator().manual_seed(n)
    (dst,) = _flat_views([n], torch.float32, gen)
    (src,) = _flat_views([n], dtype, gen)
    exact = dst.double() + 0.37 * src.double()
    ours, theirs = dst.clone(), dst.clone()
    CPU.accumulate_(ours, src, 0.37)
    TORCH.accumulate_(theirs, src, 0.37)
    err, err_torch = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
    assert err <= 2 * err_torch, (err, err_torch)


@pytest.mark.parametrize("dtype", (torch.float32,) + LOW)
@pytest.mark.parametrize("n", (1, 17, BIG))
def test_accumulate_returns_sumsq_of_incoming_grad(isa, dtype, n):
    gen = torch.Generator().manual_seed(3)
    (src,) = _flat_views([n], dtype, gen)
    dst = torch.zeros(n)
    s = CPU.accumulate_(dst, src, 2.0, return_sumsq=True)
    exact = src.double().square().sum().item()
    # fp64 accumulation of fp32 squares: relative error ~ n * 2^-53, far below 1e-12 here
    assert s == pytest.approx(exact, rel=1e-12)
    torch.testing.assert_close(dst, 2.0 * src.float(), rtol=0, atol=0)


def test_accumulate_falls_back_for_non_contiguous_src():
    src = torch.randn(6, 5).t()  # (5, 6), not contiguous
    dst = torch.zeros(5, 6)
    s = CPU.accumulate_(dst, src, 1.0, return_sumsq=True)
    torch.testing.assert_close(dst, src)
    assert s == pytest.approx(src.double().square().sum().item(), rel=1e-12)


# ------------------------------------------------------------------------------------
# norm and inf/nan check


@pytest.mark.parametrize("n", SIZES + (BIG,))
def test_grad_norm_matches_torch(isa, n):
    gen = torch.Generator().manual_seed(n)
    (buf,) = _flat_views([n], torch.float32, gen)
    got = CPU.grad_norm(buf)
    assert got.dtype == torch.float32 and got.dim() == 0
    # Against the exact (fp64) norm rather than rtol=1e-5 of the torch backend: torch's fp32
    # vector_norm is itself off by 1.2e-5 relative at 1M elements, while the kernel
    # accumulates in fp64 and is exact to the final fp32 rounding.
    exact = buf.double().norm().item()
    assert got.item() == pytest.approx(exact, rel=2**-23)
    assert abs(got.item() - exact) <= abs(TORCH.grad_norm(buf).item() - exact)


@pytest.mark.parametrize("bad", (float("inf"), float("-inf"), float("nan")))
@pytest.mark.parametrize("where", ("first", "body", "last"))
@pytest.mark.parametrize("n", (1, 17, 4097, BIG))
def test_grad_norm_detects_inf_nan(isa, bad, where, n):
    buf = torch.randn(n)
    buf[{"first": 0, "body": n // 2, "last": n - 1}[where]] = bad
    assert not math.isfinite(CPU.grad_norm(buf).item())


def test_grad_norm_does_not_overflow_on_large_finite_values():
    buf = torch.full((1000,), 1e30)  # squares overflow fp32, not the fp64 accumulator
    assert CPU.grad_norm(buf).item() == pytest.approx(1e30 * math.sqrt(1000), rel=1e-6)


def test_sums_do_not_depend_on_thread_count():
    buf = torch.randn(3 * (1 << 16) + 5)
    old = torch.get_num_threads()
    try:
        vals = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            vals.append(CPU.grad_norm(buf).item())
    finally:
        torch.set_num_threads(old)
    assert vals[0] == vals[1] == vals[2]


# ------------------------------------------------------------------------------------
# Adam / AdamW


def _adam_state(sizes, pdtype, sdtype, master, amsgrad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = _flat_views(sizes, pdtype, gen, scale=0.5)
    st = dict(
        params=params,
        grads=_flat_views(sizes, torch.float32, gen, scale=0.0),
        exp_avgs=_flat_views(sizes, sdtype, gen, scale=0.0),
        exp_avg_sqs=_flat_views(sizes, sdtype, gen, scale=0.0),
        max_exp_avg_sqs=_flat_views(sizes, sdtype, gen, scale=0.0) if amsgrad else None,
        masters=[p.float().clone() for p in params] if master else None,
    )
    for k, ts in st.items():  # zero the state (scale=0 may leave -0.0)
        if ts is not None and k != "params" and k != "masters":
            for t in ts:
                t.zero_()
    return st


def _clone_state(st):
    return {k: ([t.clone() for t in ts] if ts is not None else None) for k, ts in st.items()}


def _segs(st, step):
    return AdamSegments(steps=[step] * len(st["params"]), **st)


def _micro_grads(sizes, step, gen_seed=1234):
    gen = torch.Generator().manual_seed(gen_seed + step)
    return [[torch.randn(n, generator=gen) * 0.1 for n in sizes] for _ in range(ACCUM)]


def _run_adam(backend, st, hp_kw, sizes, steps=STEPS, grad_dtype=torch.float32):
    for step in range(1, steps + 1):
        for micro in _micro_grads(sizes, step):
            for g, gm in zip(st["grads"], micro):
                backend.accumulate_(g, gm.to(grad_dtype), 1.0)
        hp = AdamHyper(seed=1000 + step, **hp_kw)
        before = [g.clone() for g in st["grads"]]
        backend.adam_(_segs(st, step), hp)
        for g, b in zip(st["grads"], before):
            assert torch.equal(g, b), "the update only reads the gradient"
            g.zero_()  # what the optimizer's overwrite-when-stale amounts to
    return st


ADAM_KINDS = {
    "adamw": dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled=True, maximize=False),
    "adam_l2": dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.05, decoupled=False, maximize=False),
    "amsgrad_maximize": dict(lr=3e-3, beta1=0.8, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
                             maximize=True),
    "beta1_small": dict(lr=1e-2, beta1=0.3, beta2=0.9, eps=1e-8, weight_decay=0.01, decoupled=True, maximize=False),
}


def _assert_state_close(a, b, rtol, atol, keys=None):
    for k in keys or a:
        if a[k] is None:
            continue
        for i, (x, y) in enumerate(zip(a[k], b[k])):
            torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol, msg=lambda m: f"{k}[{i}]: {m}")


@pytest.mark.parametrize("kind", sorted(ADAM_KINDS))
def test_adam_fp32_matches_torch(isa, kind):
    sizes = list(SIZES)
    amsgrad = kind.startswith("amsgrad")
    hp_kw = dict(ADAM_KINDS[kind], grad_multiplier=1.0 / (ACCUM * 8.0), stochastic_rounding=False)
    ours = _adam_state(sizes, torch.float32, torch.float32, False, amsgrad)
    theirs = _clone_state(ours)
    _run_adam(CPU, ours, hp_kw, sizes)
    _run_adam(TORCH, theirs, hp_kw, sizes)
    _assert_state_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_adam_fp32_matches_torch_big():
    sizes = [BIG, 17]
    hp_kw = dict(ADAM_KINDS["adamw"], grad_multiplier=0.25, stochastic_rounding=False)
    ours = _adam_state(sizes, torch.float32, torch.float32, False, True)
    theirs = _clone_state(ours)
    _run_adam(CPU, ours, hp_kw, sizes)
    _run_adam(TORCH, theirs, hp_kw, sizes)
    _assert_state_close(ours, theirs, rtol=1e-5, atol=1e-6)


def _fp64_adam(st, hp_kw, sizes, steps=STEPS):
    """The same run in float64: master, moments and param all exact to ~1e-16."""
    p = [(m if m is not None else q).double().clone() for q, m in
         zip(st["params"], st["masters"] or [None] * len(sizes))]
    m = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    v = [torch.zeros(n, dtype=torch.float64) for n in sizes]
    for step in range(1, steps + 1):
        micro = _micro_grads(sizes, step)
        for i in range(len(sizes)):
            g = sum(mg[i].double() for mg in micro)
            reference.adam_math(p[i], g, m[i], v[i], None, step=step, **{
                k: hp_kw[k] for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "decoupled", "maximize",
                                      "grad_multiplier")})
    return p, m, v


def _err(ts, refs, rms):
    if rms:  # stochastic rounding: the RMS error concentrates, the max does not
        sq = sum((t.double() - r).square().sum() for t, r in zip(ts, refs))
        return math.sqrt(sq / sum(r.numel() for r in refs))
    return max((t.double() - r).abs().max().item() for t, r in zip(ts, refs))


LOW_CASES = [
    # (param dtype, state dtype, master weights, stochastic rounding)
    (torch.bfloat16, torch.float32, True, False),
    (torch.float16, torch.float32, True, False),
    (torch.bfloat16, torch.float32, False, True),   # bf16 params, stochastic write-back
    (torch.float16, torch.float32, False, False),   # fp16 params without master: nearest
    (torch.float32, torch.bfloat16, False, True),   # bf16 moments
    (torch.bfloat16, torch.bfloat16, True, True),
]


@pytest.mark.parametrize("pdtype,sdtype,master,sr", LOW_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_adam_low_precision_error_vs_fp64_at_most_2x_torch(pdtype, sdtype, master, sr):
    sizes = [4097, 17, 20000]
    hp_kw = dict(ADAM_KINDS["adamw"], grad_multiplier=1.0 / ACCUM, stochastic_rounding=sr)
    ours = _adam_state(sizes, pdtype, sdtype, master, False)
    theirs = _clone_state(ours)
    p64, m64, v64 = _fp64_adam(ours, hp_kw, sizes)
    torch.manual_seed(0)  # the torch backend's stochastic rounding draws from torch's RNG
    _run_adam(CPU, ours, hp_kw, sizes)
    _run_adam(TORCH, theirs, hp_kw, sizes)
    checks = [("params", p64), ("exp_avgs", m64), ("exp_avg_sqs", v64)]
    if master:
        checks.append(("masters", p64))
    for key, ref in checks:
        # with stochastic rounding anywhere the trajectories carry random noise: compare RMS errors
        e_ours, e_torch = _err(ours[key], ref, sr), _err(theirs[key], ref, sr)
        assert e_ours <= 2 * e_torch, f"{key}: error {e_ours:.3g} vs torch backend {e_torch:.3g}"


def test_adam_isas_and_thread_counts_agree_bit_for_bit():
    """Same seed: every ISA and thread count gives identical bits, stochastic rounding included
    (the noise is a hash of the element index, and the vector code rounds like the scalar)."""
    sizes = [1, 17, 3 * (1 << 16) + 3]
    hp_kw = dict(ADAM_KINDS["adamw"], grad_multiplier=0.5, stochastic_rounding=True)
    results = []
    before, old_threads = _C.isa(), torch.get_num_threads()
    try:
        for isa_name in ISAS:
            for threads in (1, 2, 3):
                _C.set_isa(isa_name)
                torch.set_num_threads(threads)
                st = _adam_state(sizes, torch.bfloat16, torch.bfloat16, False, True)
                results.append(((isa_name, threads), _run_adam(CPU, st, hp_kw, sizes, steps=3)))
    finally:
        _C.set_isa(before)
        torch.set_num_threads(old_threads)
    (name0, ref), others = results[0], results[1:]
    for name, st in others:
        for k in ref:
            if ref[k] is not None:
                for x, y in zip(ref[k], st[k]):
                    assert torch.equal(x, y), f"{name} differs from {name0} in {k}"


def test_adam_routes_non_contiguous_params_to_torch():
    w = torch.randn(8, 5).t()  # a user's transposed parameter: not contiguous
    sizes = [w.numel(), 17]
    st = _adam_state(sizes, torch.float32, torch.float32, False, False)
    st["params"][0] = w
    st["grads"][0] = st["grads"][0].view(5, 8)
    for key in ("exp_avgs", "exp_avg_sqs"):
        st[key][0] = st[key][0].view(5, 8)
    theirs = _clone_state(st)
    theirs["params"][0] = w.clone().t().contiguous().t()  # same values, same strides
    hp_kw = dict(ADAM_KINDS["adamw"], grad_multiplier=1.0, stochastic_rounding=False)

    def run(backend, s):
        for step in range(1, 4):
            for g in s["grads"]:
                g.copy_(torch.randn(g.shape, generator=torch.Generator().manual_seed(step)))
            backend.adam_(_segs(s, step), AdamHyper(seed=step, **hp_kw))

    run(CPU, st)
    run(TORCH, theirs)
    assert not st["params"][0].is_contiguous()
    _assert_state_close(st, theirs, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------
# SGD

SGD_KINDS = {
    "plain": dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False),
    "momentum": dict(lr=0.05, momentum=0.9, dampening=0.1, nesterov=False, weight_decay=0.01, maximize=False),
    "nesterov_maximize": dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=True, weight_decay=0.0,
                              maximize=True),
}


def _sgd_state(sizes, pdtype, momentum, master, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = _flat_views(sizes, pdtype, gen, scale=0.5)
    return dict(
        params=params,
        grads=[t.zero_() for t in _flat_views(sizes, torch.float32, gen)],
        momentum_buffers=[t.zero_() for t in _flat_views(sizes, torch.float32, gen)] if momentum else None,
        masters=[p.float().clone() for p in params] if master else None,
    )


def _run_sgd(backend, st, hp_kw, sizes, steps=STEPS):
    for step in range(1, steps + 1):
        for micro in _micro_grads(sizes, step):
            for g, gm in zip(st["grads"], micro):
                backend.accumulate_(g, gm, 1.0)
        before = [g.clone() for g in st["grads"]]
        backend.sgd_(SGDSegments(steps=[step] * len(sizes), **st), SGDHyper(seed=step, **hp_kw))
        for g, b in zip(st["grads"], before):
            assert torch.equal(g, b), "the update only reads the gradient"
            g.zero_()
    return st


@pytest.mark.parametrize("kind", sorted(SGD_KINDS))
def test_sgd_fp32_matches_torch(isa, kind):
    sizes = list(SIZES)
    hp_kw = dict(SGD_KINDS[kind], grad_multiplier=1.0 / ACCUM, stochastic_rounding=False)
    ours = _sgd_state(sizes, torch.float32, hp_kw["momentum"] != 0, False)
    theirs = _clone_state(ours)
    _run_sgd(CPU, ours, hp_kw, sizes)
    _run_sgd(TORCH, theirs, hp_kw, sizes)
    _assert_state_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pdtype", LOW)
def test_sgd_master_weights_match_torch(isa, pdtype):
    sizes = list(SIZES)
    hp_kw = dict(SGD_KINDS["momentum"], grad_multiplier=1.0 / ACCUM, stochastic_rounding=False)
    ours = _sgd_state(sizes, pdtype, True, True)
    theirs = _clone_state(ours)
    _run_sgd(CPU, ours, hp_kw, sizes)
    _run_sgd(TORCH, theirs, hp_kw, sizes)
    _assert_state_close(ours, theirs, rtol=1e-5, atol=1e-6, keys=["masters", "momentum_buffers"])
    # both round the same (to 1e-5) fp32 master to nearest: equal except at a rounding tie
    for x, y, m in zip(ours["params"], theirs["params"], ours["masters"]):
        assert torch.equal(x, m.to(pdtype))
        assert (x != y).float().mean() < 1e-3


# ------------------------------------------------------------------------------------
# stochastic rounding


def _sr_write(values: torch.Tensor, seed: int) -> torch.Tensor:
    """Round fp32 ``values`` into a bf16 param through the SGD kernel (lr=0: p = p)."""
    p = values.to(torch.bfloat16)  # placeholder storage, overwritten below
    master_free = dict(params=[p], grads=[torch.zeros_like(values)], momentum_buffers=None, masters=None)
    # p32 = bf16 value of p; to round an arbitrary fp32 value, put it in via the gradient:
    # p_new = p - lr * g with lr = 1 and g = p - values (exact in fp32 for these values).
    master_free["grads"][0].copy_(p.float() - values)
    CPU.sgd_(SGDSegments(steps=[1], **master_free),
             SGDHyper(lr=1.0, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
                      grad_multiplier=1.0, stochastic_rounding=True, seed=seed))
    return p


def test_stochastic_rounding_is_unbiased():
    n = 1 << 20
    lo = torch.tensor(1.0)
    ulp = 2.0**-7  # bf16 spacing in [1, 2)
    frac = 0.3
    x = torch.full((n,), float(lo + frac * ulp))
    assert x[0].item() != 1.0 and x[0].to(torch.bfloat16).item() == 1.0  # nearest rounding would lose it
    r = _sr_write(x, seed=12345).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + ulp}
    # each element is 1 + ulp * Bernoulli(frac): the mean has std ulp*sqrt(frac(1-frac)/n);
    # 6 sigma (false-alarm probability ~2e-9) for the mean over all elements...
    sigma = ulp * math.sqrt(frac * (1 - frac) / n)
    assert abs(r.double().mean().item() - x[0].item()) < 6 * sigma
    # ...and for every lane position of a 16-wide vector (a lane bug would show here)
    lanes = r.view(-1, 16).double().mean(0)
    sigma_lane = ulp * math.sqrt(frac * (1 - frac) / (n // 16))
    assert (lanes - x[0].item()).abs().max().item() < 6 * sigma_lane
    # different seeds give different draws; the same seed the same ones
    assert torch.equal(r, _sr_write(x, seed=12345).float())
    assert not torch.equal(r, _sr_write(x, seed=12346).float())


def test_stochastic_rounding_is_unbiased_across_seeds_for_one_element():
    ulp = 2.0**-7
    frac = 0.7
    x = torch.tensor([-(1.0 + frac * ulp)])  # negative: rounds away from zero with prob. frac
    draws = torch.stack([_sr_write(x, seed=s).float() for s in range(4000)])
    sigma = ulp * math.sqrt(frac * (1 - frac) / 4000)
    assert abs(draws.double().mean().item() - x.item()) < 6 * sigma


def test_stochastic_rounding_keeps_specials():
    """inf stays inf and nan stays nan (a quiet nan whatever its payload: adding the noise
    to the bits of a nan with a full payload would otherwise carry into the sign bit)."""
    x = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40])
    st = _adam_state([6], torch.float32, torch.bfloat16, False, False)
    st["grads"][0].copy_(x)
    CPU.adam_(_segs(st, 1), AdamHyper(seed=3, grad_multiplier=1.0, stochastic_rounding=True, **ADAM_KINDS["adamw"]))
    m = st["exp_avgs"][0].float()
    assert m[0].item() == math.inf and m[1].item() == -math.inf and math.isnan(m[2].item())


def test_bf16_second_moment_decays_with_stochastic_rounding():
    """Why bf16 moments use stochastic rounding: at beta2=0.999, 0.999*v rounds back to v
    in bf16 (relative spacing 2^-8 > 1e-3), so with nearest rounding exp_avg_sq never decays."""
    n = 1 << 16
    steps = 100
    out = {}
    for sr in (False, True):
        st = _adam_state([n], torch.float32, torch.bfloat16, False, False)
        st["exp_avg_sqs"][0].fill_(1.0)
        for step in range(1, steps + 1):
            CPU.adam_(_segs(st, step), AdamHyper(seed=step, grad_multiplier=1.0, stochastic_rounding=sr,
                                                  **dict(ADAM_KINDS["adamw"], lr=0.0)))
        out[sr] = st["exp_avg_sqs"][0].double().mean().item()
    expected = 0.999**steps
    assert out[False] == 1.0  # stalled
    # each step adds independent zero-mean noise of at most 1 ulp (2^-8 near 1): the mean over
    # n elements is within 6 * 2^-8 * sqrt(steps / n) of the exact decay
    assert abs(out[True] - expected) < 6 * 2.0**-8 * math.sqrt(steps / n)


# ------------------------------------------------------------------------------------
# registration, validation, availability


def test_opcheck_all_ops():
    ops = torch.ops.fastaccum
    dst, src = torch.randn(37), torch.randn(37).to(torch.bfloat16)
    torch.library.opcheck(ops.accumulate_, (dst, src, 0.5))
    torch.library.opcheck(ops.accumulate_sumsq_, (dst, src, 0.5))
    torch.library.opcheck(ops.grad_norm, (torch.randn(37),))
    for amsgrad, master in ((False, False), (True, True)):
        pdtype = torch.bfloat16 if master else torch.float32
        st = _adam_state([5, 33], pdtype, torch.float32, master, amsgrad)
        for g in st["grads"]:
            g.normal_()
        torch.library.opcheck(ops.adam_, (
            st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], st["max_exp_avg_sqs"] or [],
            st["masters"] or [], [1, 2]), dict(
            lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, maximize=False,
            grad_multiplier=0.5, stochastic_rounding=False, seed=7))
    st = _sgd_state([5, 33], torch.float32, True, False)
    torch.library.opcheck(ops.sgd_, (st["params"], st["grads"], st["momentum_buffers"], [], [1, 1]), dict(
        lr=0.1, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False,
        grad_multiplier=1.0, stochastic_rounding=False, seed=0))


def test_ops_reject_bad_tensors_with_a_clear_message():
    ops = torch.ops.fastaccum
    with pytest.raises(TypeError, match="dst has dtype torch.float64"):
        ops.accumulate_(torch.zeros(4, dtype=torch.float64), torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="src has 5 elements, expected 4"):
        ops.accumulate_(torch.zeros(4), torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match="buf is not contiguous"):
        ops.grad_norm(torch.zeros(4, 4).t())
    st = _adam_state([5], torch.float32, torch.float16, False, False)
    with pytest.raises(TypeError, match=r"exp_avgs\[0\] has dtype torch.float16"):
        ops.adam_(st["params"], st["grads"], st["exp_avgs"], st["exp_avg_sqs"], [], [], [1], lr=1e-3, beta1=0.9,
                  beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, maximize=False, grad_multiplier=1.0,
                  stochastic_rounding=False, seed=0)


def test_adam_routes_fp16_moments_to_torch():
    sizes = [17, 33]
    ours = _adam_state(sizes, torch.float32, torch.float16, False, False)
    theirs = _clone_state(ours)
    hp_kw = dict(ADAM_KINDS["adamw"], grad_multiplier=1.0, stochastic_rounding=False)
    _run_adam(CPU, ours, hp_kw, sizes, steps=3)
    _run_adam(TORCH, theirs, hp_kw, sizes, steps=3)
    _assert_state_close(ours, theirs, rtol=0, atol=0)


def test_set_isa_rejects_unknown_names():
    with pytest.raises(ValueError, match="choose one of"):
        _C.set_isa("avx9000")


def test_missing_extension_makes_backend_unavailable_not_import_error():
    code = (
        "import sys; sys.modules['fastaccum.backends.cpu._C'] = None\n"
        "import fastaccum\n"
        "from fastaccum.backends import get_backend, resolve_backend, BackendUnavailableError\n"
        "assert resolve_backend('auto', 'cpu').name == 'torch'\n"
        "try:\n"
        "    get_backend('cpu')\n"
        "except BackendUnavailableError as e:\n"
        "    assert 'fastaccum.backends.cpu._C' in str(e) and 'pip install' in str(e), e\n"
        "    print('OK')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr


def test_auto_picks_cpu_backend_for_cpu_tensors():
    from fastaccum.backends import resolve_backend

    assert resolve_backend("auto", "cpu").name == "cpu"


def test_kernels_run_on_torch_openmp_team_and_own_pool_alike():
    """With an OpenMP torch the kernels bind torch's own OpenMP team (no second runtime,
    no pool fighting torch's spin-waiting workers); the fallback pool gives the same bits."""
    from fastaccum.backends.cpu import ops

    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        assert ops.THREADING == "openmp" and _C.threading() == "openmp"
    sizes = [3 * (1 << 16) + 5, 17]
    hp_kw = dict(ADAM_KINDS["adamw"], grad_multiplier=0.5, stochastic_rounding=True)
    out = {}
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for mode in ("bound", "pool"):
            if mode == "pool":
                _C.use_openmp_runtime("")
                assert _C.threading() == "pool"
            st = _adam_state(sizes, torch.bfloat16, torch.bfloat16, False, False)
            out[mode] = _run_adam(CPU, st, hp_kw, sizes, steps=2)
            buf = torch.randn(sizes[0], generator=torch.Generator().manual_seed(0))
            out[mode]["norm"] = [CPU.grad_norm(buf)]
    finally:
        ops.bind_threads()
        torch.set_num_threads(old)
    for k, ts in out["bound"].items():
        if ts is not None:
            for x, y in zip(ts, out["pool"][k]):
                assert torch.equal(x, y), k


def test_backend_traces_under_torch_compile():
    """Under torch.compile the backend calls the registered ops (fake impls let it trace
    without graph breaks); eagerly it calls the kernels directly. Same numbers."""
    torch._dynamo.reset()

    def f(dst, src):
        CPU.accumulate_(dst, src, 0.5)
        return CPU.grad_norm(dst)

    dst, src = torch.randn(4097), torch.randn(4097).to(torch.bfloat16)
    ref_dst = dst.clone()
    ref = f(ref_dst, src)
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(dst, src)
    assert torch.equal(dst, ref_dst) and torch.equal(got, ref)


def test_moment_noise_is_uncorrelated():
    """exp_avg and exp_avg_sq take their rounding noise from the two halves of one hash:
    their round-up decisions must be independent. beta1 = beta2 = 0 makes exp_avg = g and
    exp_avg_sq = g*g exactly, so the fp32 values before rounding are known."""
    n = 1 << 20
    ulp = 2.0**-7
    x = 1.0 + 0.3 * ulp
    st = _adam_state([n], torch.float32, torch.bfloat16, False, False)
    st["grads"][0].fill_(x)
    hp = dict(ADAM_KINDS["adamw"], lr=0.0, beta1=0.0, beta2=0.0)
    CPU.adam_(_segs(st, 1), AdamHyper(seed=5, grad_multiplier=1.0, stochastic_rounding=True, **hp))
    x32 = torch.tensor(x)  # the fp32 values the kernel rounds: g and g*g, both in (1, 1 + ulp)
    frac_m, frac_v = ((x32 - 1) / ulp).item(), ((x32 * x32 - 1) / ulp).item()
    up_m = (st["exp_avgs"][0].float() > 1.0).double()
    up_v = (st["exp_avg_sqs"][0].float() > 1.0).double()
    for up, frac in ((up_m, frac_m), (up_v, frac_v)):
        assert abs(up.mean().item() - frac) < 6 * math.sqrt(frac * (1 - frac) / n)
    corr = torch.corrcoef(torch.stack([up_m, up_v]))[0, 1].item()
    assert abs(corr) < 6 / math.sqrt(n)  # 6 sigma of the sample correlation of independent draws
