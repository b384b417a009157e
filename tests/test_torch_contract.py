"""The contracts of ``torch.optim.Optimizer`` that a drop-in replacement must keep.

Driven by torch's own per-optimizer inputs (``torch.testing._internal.common_optimizers``:
the hyper-parameter sets and error cases torch checks its Adam/AdamW/SGD with); the tests
themselves are fastaccum's. Complex and sparse parameters are refused on purpose
(documented in README.md and RELIABILITY.md).
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import fastaccum

pytest.importorskip("expecttest")  # torch's testing helpers import it
from torch.testing._internal.common_optimizers import optim_db  # noqa: E402

INFOS = {info.optim_cls: info for info in optim_db}
PAIRS = [(fastaccum.Adam, torch.optim.Adam), (fastaccum.AdamW, torch.optim.AdamW), (fastaccum.SGD, torch.optim.SGD)]


def _cases():
    out = []
    for fa_cls, t_cls in PAIRS:
        for oi in INFOS[t_cls].optim_inputs_func(device="cpu"):
            kw = dict(oi.kwargs)
            if kw.get("capturable") or kw.get("differentiable"):
                continue  # refused with a clear error (see test_capturable_and_differentiable_refused)
            out.append(pytest.param(fa_cls, t_cls, kw, id=f"{fa_cls.__name__}-{oi.desc.replace(' ', '_')}"))
    return out


CASES = _cases()


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(dtype)
    return m


def _kw(kw):
    """A fresh copy (a Tensor lr must not be shared between two optimizers)."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _loss(model, i, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    x = torch.randn(4, 5, generator=g).to(dtype)
    return model(x).pow(2).mean()


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        opt.zero_grad()
        _loss(model, i, next(model.parameters()).dtype).backward()
        opt.step()


def _close(a, b, dtype=torch.float32):
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, **tol, msg=f"parameter {n}")


# ------------------------------------------------------------------ the update itself
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_matches_torch_optim_and_goes_downhill(fa_cls, t_cls, kw, dtype):
    a, b = _model(dtype), _model(dtype)
    oa, ob = fa_cls(a.parameters(), **_kw(kw)), t_cls(b.parameters(), **_kw(kw))
    before = _loss(a, 0, dtype).item()
    _train(a, oa, 8)
    _train(b, ob, 8)
    _close(a, b, dtype)
    if not kw.get("maximize"):
        assert _loss(a, 0, dtype).item() < before
    for p in a.parameters():
        for name, v in oa.state[p].items():
            if name != "step":
                assert v.dtype == dtype, f"state {name} of a {dtype} parameter is {v.dtype}"


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_param_groups_with_their_own_lr_and_weight_decay(fa_cls, t_cls, kw):
    a, b = _model(), _model()

    def groups(m):
        kw2 = _kw(kw)
        kw2.pop("lr", None)
        return [{"params": m[0].parameters(), "lr": 0.05, "weight_decay": 0.2}, {"params": m[2].parameters()}], kw2

    ga, kwa = groups(a)
    gb, kwb = groups(b)
    oa, ob = fa_cls(ga, **kwa), t_cls(gb, **kwb)
    sa = torch.optim.lr_scheduler.StepLR(oa, step_size=2, gamma=0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, step_size=2, gamma=0.5)
    for i in range(6):
        _train(a, oa, 1, i)
        _train(b, ob, 1, i)
        sa.step()
        sb.step()
    _close(a, b)


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_step_without_gradients_changes_nothing(fa_cls, t_cls, kw):
    m = _model()
    opt = fa_cls(m.parameters(), **_kw(kw))
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_zero_gradients_move_nothing_without_weight_decay(fa_cls, t_cls, kw):
    m = _model()
    opt = fa_cls(m.parameters(), **_kw(kw))
    if opt.defaults["weight_decay"] != 0:
        pytest.skip("weight decay moves parameters with zero gradients, in torch too")
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before))
    assert all(len(opt.state[p]) > 0 for p in m.parameters())  # state exists, as torch's


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_optimizer_prints(fa_cls, t_cls, kw):
    text = repr(fa_cls(_model().parameters(), **_kw(kw)))
    assert fa_cls.__name__ in text and "lr" in text


# ------------------------------------------------------------------ named parameters
@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_named_parameters(fa_cls, t_cls, kw):
    a, b = _model(), _model()
    oa, ob = fa_cls(a.named_parameters(), **_kw(kw)), t_cls(b.named_parameters(), **_kw(kw))
    _train(a, oa, 3)
    _train(b, ob, 3)
    _close(a, b)
    sd = oa.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in a.named_parameters()]
    c = copy.deepcopy(a)
    oc = fa_cls(c.named_parameters(), **_kw(kw))
    oc.load_state_dict(sd)
    _train(a, oa, 2, 3)
    _train(c, oc, 2, 3)
    _close(a, c)


def test_named_and_unnamed_parameters_do_not_mix():
    m = _model()
    named = list(m.named_parameters())
    with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
        fastaccum.AdamW([named[0], named[1][1]])
    opt = fastaccum.AdamW(named[:2])
    with pytest.raises(ValueError, match="all optimizer param groups should be with/without names"):
        opt.add_param_group({"params": [p for _, p in named[2:]]})


# ------------------------------------------------------------------ copies and checkpoints
@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_deepcopy_steps_like_the_original(fa_cls, t_cls, kw):
    m = _model()
    opt = fa_cls(m.parameters(), **_kw(kw))
    _train(m, opt, 3)
    # a copy of model and optimizer together, as trainers snapshot them
    m2, opt2 = copy.deepcopy((m, opt))
    assert {k for k in vars(opt) if not k.startswith("_")} == {k for k in vars(opt2) if not k.startswith("_")}
    _train(m, opt, 3, 3)
    _train(m2, opt2, 3, 3)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))
    # the optimizer alone: it optimizes copies of the parameters, as torch.optim's copy does
    opt3 = copy.deepcopy(opt)
    opt3.zero_grad()
    for p in (q for g in opt3.param_groups for q in g["params"]):
        p.grad = torch.ones_like(p)
    opt3.step()


def test_torch_save_whole_optimizer_mid_window():
    m = _model(torch.bfloat16)
    opt = fastaccum.AdamW(m.parameters(), accumulation_steps=2, loss_scale="dynamic")
    _loss(m, 0, torch.bfloat16).float().backward()
    opt.step()
    buf = io.BytesIO()
    torch.save((m, opt), buf)
    buf.seek(0)
    m2, opt2 = torch.load(buf, weights_only=False)
    for mm, oo in ((m, opt), (m2, opt2)):
        _loss(mm, 1, torch.bfloat16).float().backward()
        oo.step()
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), m2.parameters()))


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_state_dict_round_trip_with_weights_only_load(fa_cls, t_cls, kw):
    a = _model()
    oa = fa_cls(a.parameters(), **_kw(kw))
    _train(a, oa, 3)
    buf = io.BytesIO()
    torch.save(oa.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    b = copy.deepcopy(a)
    ob = fa_cls(b.parameters(), **_kw(kw))
    ob.load_state_dict(sd)
    assert ob.state_dict()["param_groups"] == oa.state_dict()["param_groups"]
    _train(a, oa, 3, 3)
    _train(b, ob, 3, 3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_older_state_dict_without_newer_keys_loads(fa_cls, t_cls, kw):
    a = _model()
    oa = fa_cls(a.parameters(), **_kw(kw))
    _train(a, oa, 2)
    sd = copy.deepcopy(oa.state_dict())
    for g in sd["param_groups"]:  # keys added to torch.optim over the years
        for key in ("maximize", "foreach", "fused", "capturable", "differentiable", "decoupled_weight_decay"):
            g.pop(key, None)
    for st in sd["state"].values():
        st["step"] = float(st["step"])  # older torch kept the step as a number
    b = copy.deepcopy(a)
    ob = fa_cls(b.parameters(), **{**_kw(kw), "maximize": kw.get("maximize", False)})
    ob.load_state_dict(sd)
    oa.param_groups[0]["maximize"] = kw.get("maximize", False)
    _train(a, oa, 2, 2)
    _train(b, ob, 2, 2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fa_cls,t_cls,kw", CASES)
def test_torch_optim_checkpoint_continues_exactly(fa_cls, t_cls, kw):
    """A checkpoint of the torch class loads into the fastaccum class and training goes on
    as if torch had continued (SGD's momentum buffer included: torch keeps no step for it)."""
    a = _model()
    ta = t_cls(a.parameters(), **_kw(kw))
    _train(a, ta, 3)
    b = copy.deepcopy(a)
    fb = fa_cls(b.parameters(), **_kw(kw))
    fb.load_state_dict(ta.state_dict())
    _train(a, ta, 3, 3)
    _train(b, fb, 3, 3)
    _close(a, b)


def test_adamw_checkpoint_of_older_torch_without_decoupled_key():
    a = _model()
    ta = torch.optim.AdamW(a.parameters(), lr=0.01)
    _train(a, ta, 2)
    sd = copy.deepcopy(ta.state_dict())
    for g in sd["param_groups"]:
        del g["decoupled_weight_decay"], g["maximize"]
    b = copy.deepcopy(a)
    fb = fastaccum.AdamW(b.parameters(), lr=0.01)
    fb.load_state_dict(sd)
    assert fb.param_groups[0]["decoupled_weight_decay"] is True
    _train(a, ta, 2, 2)
    _train(b, fb, 2, 2)
    _close(a, b)


# ------------------------------------------------------------------ hooks
def _with_step_hooks():
    """A model, its optimizer, and the list that the optimizer's step pre/post hooks append
    "pre"/"post" to."""
    m = _model()
    opt = fastaccum.AdamW(m.parameters(), lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    return m, opt, calls


def test_global_step_hooks_and_a_hook_that_replaces_the_arguments():
    m, opt, calls = _with_step_hooks()
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("gpost"))]
    try:
        _train(m, opt, 1)
    finally:
        for h in handles:
            h.remove()
    assert calls == ["gpre", "pre", "post", "gpost"]
    closures = []
    opt.register_step_pre_hook(lambda o, a, k: ((a[0], lambda: closures.append(1)), k))
    _train(m, opt, 1)
    assert closures == [1]


def test_step_is_labelled_for_the_profiler():
    m = _model()
    opt = fastaccum.AdamW(m.parameters(), lr=0.01)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _train(m, opt, 1)
    assert "Optimizer.step#AdamW.step" in {e.name for e in prof.events()}


def test_step_and_state_dict_hooks():
    m, opt, calls = _with_step_hooks()
    _train(m, opt, 1)
    assert calls == ["pre", "post"]
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def sd_post(o, sd):
        sd["extra"] = 1
        return sd

    opt.register_state_dict_post_hook(sd_post)
    sd = opt.state_dict()
    assert calls[-1] == "sd_pre" and sd["extra"] == 1 and "fastaccum" in sd

    seen = {}

    def load_pre(o, sd):
        seen["state"] = len(sd["state"])
        sd = dict(sd)
        sd["param_groups"] = copy.deepcopy(sd["param_groups"])
        sd["param_groups"][0]["lr"] = 0.123
        return sd

    def load_post(o):
        seen["step"] = float(o.state[next(m.parameters())]["step"])

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(load_post)
    opt.load_state_dict(sd)
    assert seen == {"state": 4, "step": 1.0}  # the pre hook saw the state; the post hook saw it loaded
    assert opt.param_groups[0]["lr"] == 0.123


# ------------------------------------------------------------------ dtypes and kinds
def test_mixed_dtypes_in_one_group_and_default_dtype_float64():
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m = _model(torch.float64)
        extra = nn.Parameter(torch.randn(3, dtype=torch.float32))
        half = nn.Parameter(torch.randn(5, dtype=torch.bfloat16))
        opt = fastaccum.AdamW([*m.parameters(), extra, half], lr=0.01)
        for _ in range(2):
            opt.zero_grad()
            (_loss(m, 0, torch.float64) + extra.sum() + half.float().sum()).backward()
            opt.step()
        assert all(torch.isfinite(p).all() for p in opt.param_groups[0]["params"])
        assert opt.state[extra]["exp_avg"].dtype == torch.float32
    finally:
        torch.set_default_dtype(prev)


@pytest.mark.parametrize("fa_cls", [fastaccum.Adam, fastaccum.AdamW, fastaccum.SGD])
def test_complex_and_sparse_are_refused_with_the_fix(fa_cls):
    with pytest.raises(TypeError, match="view_as_real"):
        fa_cls([nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    p = nn.Parameter(torch.randn(4))
    opt = fa_cls([p])
    p.grad = torch.zeros(4).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()


def test_capturable_and_differentiable_refused():
    with pytest.raises(ValueError, match="capturable"):
        fastaccum.AdamW(_model().parameters(), capturable=True)
    with pytest.raises(ValueError, match="differentiable"):
        fastaccum.SGD(_model().parameters(), differentiable=True)


# ------------------------------------------------------------------ errors
def _error_cases():
    out = []
    for fa_cls, t_cls in PAIRS:
        for i, ei in enumerate(INFOS[t_cls].optim_error_inputs_func(device="cpu", dtype=torch.float32)):
            out.append(pytest.param(fa_cls, ei, id=f"{fa_cls.__name__}-{i}-{ei.optimizer_error_input.desc[:40]}"))
    return out


@pytest.mark.parametrize("fa_cls,ei", _error_cases())
def test_errors_with_torch_wording(fa_cls, ei):
    oi = ei.optimizer_error_input
    params = oi.params if oi.params is not None else [nn.Parameter(torch.randn(2, 2))]
    expect = pytest.warns if issubclass(ei.error_type, Warning) else pytest.raises
    with expect(ei.error_type, match=ei.error_regex):
        opt = fa_cls(params, **oi.kwargs)
        for p in (q for g in opt.param_groups for q in g["params"]):
            p.grad = torch.ones_like(p)
        opt.step()


def test_hyper_parameters_are_checked_before_the_parameters_are_read():
    read = []

    def params():
        read.append(1)
        yield nn.Parameter(torch.randn(2))

    for make in (lambda g: fastaccum.AdamW(g, lr=-1.0), lambda g: fastaccum.AdamW(g, betas=(1.5, 0.9)),
                 lambda g: fastaccum.SGD(g, momentum=-0.5), lambda g: fastaccum.Adam(g, eps=0.0)):
        with pytest.raises(ValueError):
            make(params())
    assert read == []
