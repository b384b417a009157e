"""Bad input: a clear ValueError/TypeError naming the argument, and nothing changed."""
import copy

import pytest
import torch
from torch import nn

import fastaccum
from conftest import OddNet, batches


def _params():
    return [nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2, 3))]


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(betas=(1.0, 0.999)), ValueError, "beta"),
        (dict(betas=(0.9, -0.1)), ValueError, "beta"),
        (dict(betas=0.9), ValueError, "betas"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
        (dict(accumulation_steps=0), ValueError, "accumulation_steps"),
        (dict(accumulation_steps=2.5), TypeError, "accumulation_steps"),
        (dict(max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (dict(loss_scale="static"), ValueError, "loss_scale"),
        (dict(loss_scale=-2.0), ValueError, "loss_scale"),
        (dict(state_dtype=torch.float16), ValueError, "state_dtype"),
        (dict(backend="nope"), ValueError, "unknown fastaccum backend 'nope'"),
        (dict(step_in_backward=True, accumulation_steps=2, loss_scale="dynamic"), ValueError, "static loss_scale"),
        (dict(step_in_backward=True, max_grad_norm=1.0), ValueError, "max_grad_norm"),
        (dict(step_in_backward=True, loss_scale="dynamic"), ValueError, "static loss_scale"),
        (dict(capturable=True), ValueError, "capturable"),
    ],
)
def test_bad_constructor_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastaccum.AdamW(_params(), **kw)


@pytest.mark.parametrize(
    "param,exc,match",
    [
        (torch.zeros(3, dtype=torch.int64), TypeError, "floating-point"),
        (torch.zeros(3, dtype=torch.complex64), TypeError, "complex"),
        (torch.zeros(3, dtype=torch.float8_e4m3fn), TypeError, "float64, float32, bfloat16 and float16"),
    ],
)
def test_bad_parameters(param, exc, match):
    with pytest.raises(exc, match=match):
        fastaccum.AdamW([param])


def test_bad_param_group_leaves_optimizer_unchanged():
    opt = fastaccum.AdamW(_params(), backend="torch")
    groups = copy.deepcopy(opt.param_groups)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lr": -3.0})
    assert len(opt.param_groups) == 1 and len(opt._buckets) == 1
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
    opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lr": 3.0})  # a good one works
    assert len(opt._buckets) == 2


def _trained():
    torch.manual_seed(0)
    model = OddNet()
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="torch")
    for x in batches(2):
        model(x).mean().backward()
        opt.step()
        opt.zero_grad()
    model(batches(1, seed=9)[0]).mean().backward()
    return model, opt, copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()["state"])


def _unchanged(model, opt, params_before, state_before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, params_before[k]), k
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert torch.equal(v, state_before[k][name]), (k, name)


def test_nan_lr_set_later_is_refused_at_step():
    model, opt, pb, sb = _trained()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    _unchanged(model, opt, pb, sb)


def test_refused_step_in_managed_mode_can_be_retried():
    torch.manual_seed(0)
    model = OddNet()
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2, backend="torch")
    for x in batches(2):
        opt.backward(model(x).mean())
        if opt.micro_step == 1:
            opt.param_groups[0]["lr"] = float("nan")
            with pytest.raises(ValueError, match="lr"):
                opt.step()
            assert opt.micro_step == 1 and not opt.state, "the window is still open, nothing applied"
            opt.param_groups[0]["lr"] = 1e-2
        opt.step()
    assert opt.micro_step == 0 and opt.state[model.w1]["step"].item() == 1


def test_sparse_gradient_is_refused():
    model, opt, pb, sb = _trained()
    model.odd.grad = torch.zeros(7).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    _unchanged(model, opt, pb, sb)


def test_parameter_moved_to_another_device_is_refused():
    model, opt, pb, sb = _trained()
    moved = nn.Parameter(torch.empty(7, device="meta"))
    torch.utils.swap_tensors(model.odd, moved)  # what model.to(other_device) does in place
    with pytest.raises(ValueError, match="model.to\\(device\\)"):
        opt.step()
    torch.utils.swap_tensors(model.odd, moved)
    _unchanged(model, opt, pb, sb)


@pytest.mark.parametrize("weight", [0, -1.0, float("nan"), float("inf"), "3"])
def test_bad_weight(weight):
    p = nn.Parameter(torch.randn(3))
    opt = fastaccum.AdamW([p], accumulation_steps=2, backend="torch")
    with pytest.raises((ValueError, TypeError), match="weight"):
        opt.backward(p.sum(), weight=weight)
    assert p.grad is None and opt._window.weight_sum == 0.0, "nothing was accumulated"


def test_unavailable_backend_raises_with_reason(monkeypatch):
    from fastaccum import backends

    def broken():
        raise ImportError("the extension was not built (FASTACCUM_NO_EXT=1)")

    monkeypatch.setitem(backends._REGISTRY, "broken", backends._Entry("broken", broken, ("cpu",), 100))
    with pytest.raises(fastaccum.BackendUnavailableError, match="FASTACCUM_NO_EXT"):
        fastaccum.AdamW(_params(), backend="broken")
    opt = fastaccum.AdamW(_params(), backend="auto")  # auto falls back silently
    assert opt._buckets[0].backend.name != "broken"
