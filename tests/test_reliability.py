"""Faults and misuse that must never corrupt or stall a run silently (RELIABILITY.md).

Each test names the promise it backs; each failed before the fix it pins down.
"""
from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest
import torch
from torch import nn

import fastaccum
from fastaccum.backends import AdamHyper, AdamSegments


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(dtype)


def _x(i, dtype=torch.float32):
    return torch.randn(3, 4, generator=torch.Generator().manual_seed(i)).to(dtype)


def _loss(m, i, dtype=torch.float32):
    out = m(_x(i, dtype))
    return (out.double() if dtype == torch.float64 else out.float()).pow(2).mean()


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()],
            {k: {n: (v.clone() if torch.is_tensor(v) else v) for n, v in st.items()}
             for k, st in opt.state_dict()["state"].items()},
            copy.deepcopy(opt.param_groups[0]["lr"]), opt.micro_step)


def _assert_unchanged(model, opt, snap):
    params, state, lr, micro = snap
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    now = opt.state_dict()["state"]
    assert set(now) == set(state)
    for k in state:
        for n, v in state[k].items():
            assert torch.equal(torch.as_tensor(now[k][n]), torch.as_tensor(v)), (k, n)
    assert opt.param_groups[0]["lr"] == lr and opt.micro_step == micro


# ------------------------------------------------------------------ 1. failed backward
class _Boom(RuntimeError):
    pass


def _raise(_):
    raise _Boom("backward failed")


def test_failed_backward_does_not_count_its_weight():
    a, b = _mlp(), _mlp()
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, accumulation_steps=2)
    ob = fastaccum.AdamW(b.parameters(), lr=0.01, accumulation_steps=2)
    bad = _loss(a, 9)
    bad.register_hook(_raise)  # fails before any parameter gradient exists, like an early OOM
    with pytest.raises(_Boom):
        oa.backward(bad, weight=49.0)
    for m, o in ((a, oa), (b, ob)):
        for i in range(2):
            o.backward(_loss(m, i), weight=1.0 + i)
            o.step()
    assert _same(a, b)


def test_discard_window_drops_a_half_done_window():
    a, b = _mlp(), _mlp()
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, accumulation_steps=2)
    ob = fastaccum.AdamW(b.parameters(), lr=0.01, accumulation_steps=2)
    oa.backward(_loss(a, 5), weight=3.0)
    oa.step()
    h = a[2].weight  # the last layer's gradient arrives, then the backward fails
    mid = a[1](a[0](_x(6)))
    mid.register_hook(_raise)
    with pytest.raises(_Boom):
        oa.backward(a[2](mid).pow(2).mean(), weight=2.0)
    assert h.grad is not None  # a partial gradient reached the buffer
    snap = _snapshot(a, oa)
    oa.discard_window()
    assert oa.micro_step == 0 and oa.skipped_steps == 0
    _assert_unchanged(a, oa, snap[:3] + (0,))
    for m, o in ((a, oa), (b, ob)):
        for i in range(4):
            o.backward(_loss(m, i), weight=1.0 + i)
            o.step()
            o.zero_grad()
    assert _same(a, b)
    assert [float(oa.state[p]["step"]) for p in a.parameters()] == [2.0] * 4


# ------------------------------------------------------------------ 2. fp16 and token weights
def test_fp16_token_weights_do_not_overflow():
    m = _mlp(torch.float16)
    opt = fastaccum.AdamW(m.parameters(), lr=1e-3, accumulation_steps=2, loss_scale=1024.0, backend="torch")
    before = [p.detach().clone() for p in m.parameters()]
    for i in range(6):
        opt.backward(_loss(m, i, torch.float16) * 40, weight=4096.0 + i)  # weight = tokens in the micro-batch
        opt.step()
    assert opt.skipped_steps == 0
    assert all(torch.isfinite(p).all() and not torch.equal(p, q) for p, q in zip(m.parameters(), before))


def test_token_weights_give_the_exact_weighted_mean():
    # w / w_ref scaling of the loss must leave the update equal to sum(w g) / sum(w)
    a, b = _mlp(torch.float64), _mlp(torch.float64)
    oa = fastaccum.SGD(a.parameters(), lr=0.1, accumulation_steps=3)
    ob = torch.optim.SGD(b.parameters(), lr=0.1)
    ws = [7.0, 1000.0, 3.0]
    for i, w in enumerate(ws):
        oa.backward(_loss(a, i, torch.float64), weight=w)
        oa.step()
        (_loss(b, i, torch.float64) * w / sum(ws)).backward()
    ob.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_a_run_that_keeps_skipping_is_told():
    p = nn.Parameter(torch.ones(3))
    opt = fastaccum.AdamW([p], loss_scale=2.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.backward((p * float("inf")).sum())
            opt.step()
            opt.zero_grad()
    msgs = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    assert opt.skipped_steps == 12 and len(msgs) == 1 and "not training" in msgs[0]
    assert torch.equal(p.detach(), torch.ones(3))


# ------------------------------------------------------------------ 3. load own state_dict
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_its_own_state_dict_keeps_everything(dtype):
    a, b = _mlp(dtype), _mlp(dtype)
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, accumulation_steps=2)
    ob = fastaccum.AdamW(b.parameters(), lr=0.01, accumulation_steps=2)
    for m, o in ((a, oa), (b, ob)):
        for i in range(5):  # ends mid-window
            o.backward(_loss(m, i, dtype), weight=i + 1.0)
            o.step()
    oa.load_state_dict(oa.state_dict())
    assert float(oa.state[a[0].weight]["step"]) == 2.0
    assert oa.state[a[0].weight]["exp_avg"].abs().sum() > 0
    for m, o in ((a, oa), (b, ob)):
        for i in range(5, 8):
            o.backward(_loss(m, i, dtype), weight=i + 1.0)
            o.step()
    assert _same(a, b)


# ------------------------------------------------------------------ 4. loss scale setting changed mid-window
def test_mid_window_checkpoint_with_another_loss_scale_setting_is_refused():
    a = _mlp()
    oa = fastaccum.AdamW(a.parameters(), accumulation_steps=2, loss_scale="dynamic")
    oa.backward(_loss(a, 0), weight=5.0)
    oa.step()
    sd = oa.state_dict()
    b = copy.deepcopy(a)
    ob = fastaccum.AdamW(b.parameters(), accumulation_steps=2)
    snap = _snapshot(b, ob)
    with pytest.raises(ValueError, match="loss_scale"):
        ob.load_state_dict(sd)
    _assert_unchanged(b, ob, snap)
    # at a window boundary the setting may change
    oa.backward(_loss(a, 1), weight=5.0)
    oa.step()
    ob.load_state_dict(oa.state_dict())


# ------------------------------------------------------------------ 5. two optimizers, one parameter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_second_optimizer_over_the_same_parameters_takes_over(dtype):
    m = _mlp(dtype)
    first = fastaccum.AdamW(m.parameters(), lr=0.01)
    second = fastaccum.AdamW(m.parameters(), lr=0.01)
    ref = _mlp(dtype)
    oref = fastaccum.AdamW(ref.parameters(), lr=0.01)
    for mm, o in ((m, second), (ref, oref)):
        _loss(mm, 0, dtype).backward()
        o.step()
        o.zero_grad()
    assert _same(m, ref)  # the new optimizer trains
    with pytest.raises(RuntimeError, match="took them over"):
        first.step()
    del first
    gc.collect()
    _loss(m, 1, dtype).backward()  # the old one's finalizer leaves the new one's buffers alone
    second.step()


# ------------------------------------------------------------------ 6. unfrozen after construction
def test_step_in_backward_updates_a_parameter_unfrozen_later():
    a, b = _mlp(), _mlp()
    a[0].weight.requires_grad_(False)
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, step_in_backward=True)
    ob = fastaccum.AdamW(b.parameters(), lr=0.01, step_in_backward=True)
    a[0].weight.requires_grad_(True)
    for i in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.backward(_loss(m, i))
            o.step()
            o.zero_grad()
    assert _same(a, b)


def test_unfrozen_parameter_accumulates_in_managed_mode():
    a, b = _mlp(torch.bfloat16), _mlp(torch.bfloat16)
    a[2].bias.requires_grad_(False)
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, accumulation_steps=2)
    ob = fastaccum.AdamW(b.parameters(), lr=0.01, accumulation_steps=2)
    a[2].bias.requires_grad_(True)
    oa.step()  # hooks the unfrozen parameter; an empty micro-step on both sides
    ob.step()
    for i in range(4):
        for m, o in ((a, oa), (b, ob)):
            o.backward(_loss(m, i, torch.bfloat16))
            o.step()
    assert _same(a, b)


# ------------------------------------------------------------------ 7. refused load changes nothing
def test_state_dict_of_another_optimizer_is_refused_without_change():
    m = _mlp()
    tsgd = torch.optim.SGD(copy.deepcopy(m).parameters(), lr=0.1, momentum=0.9)
    mm = copy.deepcopy(m)
    for p in tsgd.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    tsgd.step()
    opt = fastaccum.AdamW(m.parameters(), lr=0.01)
    _loss(m, 0).backward()
    opt.step()
    opt.zero_grad()
    snap = _snapshot(m, opt)
    with pytest.raises(ValueError, match="another kind of optimizer"):
        opt.load_state_dict(tsgd.state_dict())
    _assert_unchanged(m, opt, snap)
    _loss(m, 1).backward()
    opt.step()  # still works
    del mm


# ------------------------------------------------------------------ 8. del / failed constructor
def test_dropped_optimizer_lets_go_of_its_buffers():
    m = _mlp(torch.bfloat16)
    m32 = _mlp()
    opt = fastaccum.AdamW([*m.parameters(), *m32.parameters()], accumulation_steps=2)
    _loss(m, 0, torch.bfloat16).backward()
    _loss(m32, 0).backward()
    opt.step()
    g_before = m32[0].weight.grad.clone()
    del opt
    gc.collect()
    assert not any(hasattr(p, "main_grad") for p in m.parameters())
    g = m32[0].weight.grad
    assert torch.equal(g, g_before)  # the gradient stays, as with torch.optim
    assert g.untyped_storage().nbytes() == g.numel() * 4  # but not the whole flat buffer
    assert all(not p._post_accumulate_grad_hooks for p in m.parameters())


def test_failed_constructor_leaves_no_hooks():
    m = _mlp(torch.bfloat16)
    with pytest.raises(ValueError):
        fastaccum.AdamW([{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": -1.0}])
    gc.collect()
    for p in m.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None) and not hasattr(p, "main_grad")
    opt = fastaccum.AdamW(m.parameters())
    _loss(m, 0, torch.bfloat16).backward()
    opt.step()


# ------------------------------------------------------------------ 9. corrupt checkpoints
def _corrupt_cases():
    def fa(key, value):
        return lambda sd: sd["fastaccum"].__setitem__(key, value)

    return {
        "weight_sum_nan": fa("weight_sum", float("nan")),
        "weight_sum_negative": fa("weight_sum", -1.0),
        "micro_step_out_of_range": fa("micro_step", 7),
        "micro_step_negative": fa("micro_step", -1),
        "live_wrong_length": lambda sd: sd["fastaccum"]["live"].__setitem__(0, [True]),
        "fresh_wrong_length": lambda sd: sd["fastaccum"].__setitem__("fresh", []),
        "buffers_wrong_length": lambda sd: sd["fastaccum"]["grad_buffers"].append(None),
        "loss_scale_zero": lambda sd: sd["fastaccum"]["loss_scaler"].__setitem__("scale", 0.0),
        "loss_scale_nan": lambda sd: sd["fastaccum"]["loss_scaler"].__setitem__("scale", float("nan")),
        "growth_interval_zero": lambda sd: sd["fastaccum"]["loss_scaler"].__setitem__("growth_interval", 0),
        "step_nan": lambda sd: sd["state"][0].__setitem__("step", torch.tensor(float("nan"))),
        "step_negative": lambda sd: sd["state"][0].__setitem__("step", torch.tensor(-2.0)),
        "lr_nan": lambda sd: sd["param_groups"][0].__setitem__("lr", float("nan")),
        "state_wrong_size": lambda sd: sd["state"][0].__setitem__("exp_avg", torch.zeros(3)),
        "buffer_wrong_size": lambda sd: sd["fastaccum"]["grad_buffers"].__setitem__(0, torch.zeros(5)),
    }


@pytest.mark.parametrize("case", sorted(_corrupt_cases()))
def test_corrupt_checkpoint_values_are_refused(case):
    a = _mlp()
    oa = fastaccum.AdamW(a.parameters(), accumulation_steps=2, loss_scale="dynamic")
    for i in range(3):  # a step, then mid-window
        oa.backward(_loss(a, i), weight=2.0)
        oa.step()
    sd = copy.deepcopy(oa.state_dict())
    _corrupt_cases()[case](sd)
    b = copy.deepcopy(a)
    ob = fastaccum.AdamW(b.parameters(), accumulation_steps=2, loss_scale="dynamic")
    snap = _snapshot(b, ob)
    with pytest.raises(ValueError):
        ob.load_state_dict(sd)
    _assert_unchanged(b, ob, snap)


# ------------------------------------------------------------------ 10. failure between buckets
def test_failure_between_buckets_changes_nothing_and_a_retry_counts_once():
    a, b = _mlp(), _mlp()
    groups = lambda m: [{"params": m[0].parameters()}, {"params": m[2].parameters(), "lr": 0.02}]  # noqa: E731
    oa, ob = fastaccum.AdamW(groups(a), lr=0.01), fastaccum.AdamW(groups(b), lr=0.01)
    calls = []
    real = oa._hyper

    def flaky(group, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second bucket")
        return real(group, *args)

    oa._hyper = flaky
    _loss(a, 0).backward()
    with pytest.raises(RuntimeError, match="injected"):
        oa.step()
    assert all(float(oa.state[p]["step"]) == 0.0 for p in a.parameters() if p in oa.state)
    oa.step()  # retry
    _loss(b, 0).backward()
    ob.step()
    assert [float(oa.state[p]["step"]) for p in a.parameters()] == [1.0] * 4
    assert _same(a, b)


def test_kernel_failure_restores_step_counts():
    m = _mlp()
    opt = fastaccum.AdamW([{"params": m[0].parameters()}, {"params": m[2].parameters()}], backend="torch")
    bucket = opt._buckets[1]

    class Failing(type(bucket.backend)):
        def adam_(self, segs, hp):
            raise RuntimeError("device error")

    bucket.backend = Failing()
    _loss(m, 0).backward()
    with pytest.raises(RuntimeError, match="device error"):
        opt.step()
    assert all(float(b.steps.sum()) == 0.0 for b in opt._buckets)


# ------------------------------------------------------------------ 11. arguments and rounding
def test_arguments_are_named_in_errors():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(TypeError, match="lr"):
        fastaccum.AdamW([p], lr=1j)
    opt = fastaccum.AdamW([p], accumulation_steps=2)
    with pytest.raises(ValueError, match="weight"):
        opt.backward(p.sum(), weight=torch.tensor(3.0, device="meta"))
    with pytest.raises(ValueError, match="meta device"):
        fastaccum.AdamW([nn.Parameter(torch.empty(3, device="meta"))])
    with pytest.raises(TypeError, match="lr"):
        fastaccum.SGD([p], lr=torch.tensor(1j))


_NANS = [0x7FFFFFFF, 0x7F800001, 0xFFC00000, 0x7FC00000]


def _nan_floats():
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in _NANS], dtype=torch.int32).view(torch.float32)


def test_stochastic_rounding_keeps_nan_as_nan():
    from fastaccum import reference

    src = _nan_floats().repeat(64)
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    reference.stochastic_round_(dst, src)
    assert dst.isnan().all()


def _kernel_backends():
    out = list(fastaccum.available_backends("cpu"))
    try:
        fastaccum.get_backend("triton", "cpu")  # Triton's interpreter runs on CPU tensors here
        if "triton" not in out:
            out.append("triton")
    except Exception:  # noqa: BLE001 - an unavailable optional backend is simply not tested
        pass
    return out


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("master,stochastic", [(True, False), (False, True)])
def test_bf16_write_back_keeps_nan_as_nan(backend, master, stochastic):
    be = fastaccum.get_backend(backend, "cpu")
    n = 67  # a vector body and a scalar tail
    nans = _nan_floats().repeat(17)[:n]
    p32 = nans.clone()
    param = torch.zeros(n, dtype=torch.bfloat16)
    segs = AdamSegments(params=[param], grads=[torch.zeros(n)], exp_avgs=[torch.zeros(n)],
                        exp_avg_sqs=[torch.zeros(n)], max_exp_avg_sqs=None,
                        masters=[p32] if master else None, steps=[1])
    if not master:
        # without a master the parameter itself holds the NaN: feed it through the gradient
        segs.grads[0].copy_(nans)
    hp = AdamHyper(lr=0.0, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True, maximize=False,
                   grad_multiplier=1.0, stochastic_rounding=stochastic, seed=7)
    be.adam_(segs, hp)
    assert param.isnan().all(), f"{backend}: {param[:4]}"


# ------------------------------------------------------------------ 12. model.zero_grad() per micro-batch
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_zero_grad_every_micro_batch_in_managed_mode(dtype):
    a, b = _mlp(dtype), _mlp(dtype)
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, accumulation_steps=3)
    ob = fastaccum.AdamW(b.parameters(), lr=0.01, accumulation_steps=3)
    for i in range(6):
        a.zero_grad()  # the trainer's habit: clears p.grad before every micro-batch
        oa.backward(_loss(a, i, dtype))
        oa.step()
        ob.backward(_loss(b, i, dtype))
        ob.step()
        ob.zero_grad()
    assert _same(a, b)


# ------------------------------------------------------------------ 13. sharded parameters
def test_unsupported_dtensor_layouts_are_refused_at_construction():
    """FSDP2's shards are supported (tests/test_fsdp2.py); other layouts get a clear error
    at construction instead of a failure inside a gradient hook."""
    dist = torch.distributed
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.tensor import DeviceMesh, Replicate, distribute_tensor

    if dist.is_initialized():
        pytest.skip("a process group is already running")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        p = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
        with pytest.raises(ValueError, match="DTensor parameters sharded by FSDP2"):
            fastaccum.AdamW([p])
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ float64
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_float64_parameters_match_torch_optim(backend):
    a, b = _mlp(torch.float64), _mlp(torch.float64)
    oa = fastaccum.AdamW(a.parameters(), lr=0.01, backend=backend, max_grad_norm=1.0)
    ob = torch.optim.AdamW(b.parameters(), lr=0.01)
    for i in range(5):
        _loss(a, i, torch.float64).backward()
        oa.step()
        oa.zero_grad()
        _loss(b, i, torch.float64).backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        ob.step()
        ob.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
        assert oa.state[p]["exp_avg"].dtype == torch.float64
    assert math.isfinite(float(oa.state[a[0].weight]["step"]))
