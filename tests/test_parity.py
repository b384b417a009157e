"""The torch backend against torch.optim: same hyper-parameters, same averaged gradients,
>= 10 steps, several param groups, a scheduler, params and every state tensor compared."""
import pytest
import torch

import fastaccum
from conftest import batches, make_pair

KINDS = {
    "adamw": (fastaccum.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    "adam_l2": (fastaccum.Adam, torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    "adamw_amsgrad_maximize": (fastaccum.AdamW, torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, maximize=True)),
    "sgd": (fastaccum.SGD, torch.optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (fastaccum.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "sgd_nesterov": (fastaccum.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
}

STEPS = 10


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative difference of the tensor as a whole."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def assert_parity(model, ref_model, opt, ref_opt, tol=1e-6):
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert max_rel_diff(p, q) <= tol, f"parameter {name}: {max_rel_diff(p, q):.3g}"
    sa, sb = opt.state_dict()["state"], ref_opt.state_dict()["state"]
    assert set(sb) <= set(sa), f"params with state: {sorted(sa)} vs torch {sorted(sb)}"
    order = [p for g in ref_opt.param_groups for p in g["params"]]
    unused = [i for i, p in enumerate(order) if p is ref_model.unused]
    assert not set(unused) & set(sa), "a parameter that never got a gradient must get no state (torch skips it)"
    for k, st in sb.items():
        assert set(st) <= set(sa[k]), f"state keys {set(sa[k])} vs torch {set(st)}"
        for key, v in st.items():
            assert max_rel_diff(sa[k][key], v) <= tol, f"state[{k}][{key}]: {max_rel_diff(sa[k][key], v):.3g}"


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("accum,style", [(1, "classic"), (4, "classic"), (4, "managed")])
def test_matches_torch_optim(kind, accum, style):
    fa_cls, torch_cls, kw = KINDS[kind]
    model, ref_model = make_pair()
    opt = fa_cls(model.groups(kw["lr"]), backend="torch",
                 accumulation_steps=accum if style == "managed" else 1, **kw)
    ref_opt = torch_cls(ref_model.groups(kw["lr"]), **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 0.9**s)

    for t, x in enumerate(batches(STEPS * accum)):
        boundary = (t + 1) % accum == 0
        (ref_model(x).mean() / accum).backward()
        if boundary:
            ref_opt.step()
            ref_opt.zero_grad()
            ref_sched.step()
        if style == "managed":
            opt.backward(model(x).mean())
            opt.step()
            opt.zero_grad()
        else:
            (model(x).mean() / accum).backward()
            if boundary:
                opt.step()
                opt.zero_grad()
        if boundary:
            sched.step()
    assert opt.state_dict()["state"][0]["step"].item() == STEPS
    assert_parity(model, ref_model, opt, ref_opt)
    assert opt.param_groups[1]["lr"] == pytest.approx(ref_opt.param_groups[1]["lr"])


def test_zero_grad_set_to_none_false_updates_like_torch():
    """With set_to_none=False torch keeps zero gradients, and parameters that had a gradient
    once keep being updated (weight decay, momentum); fastaccum follows."""
    model, ref_model = make_pair()
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="torch")
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for t, x in enumerate(batches(12)):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad(set_to_none=False)
            # every third step the w2 branch gets no gradient at all
            loss = m(x).mean() if t % 3 else m.big.sum() * 1e-3
            loss.backward()
            o.step()
    assert_parity(model, ref_model, opt, ref_opt)


@pytest.mark.parametrize("how", ["model_zero_grad", "surgery", "assign"])
def test_foreign_grads_are_folded(how):
    """Trainers and users clear or replace p.grad; results stay equal to torch.optim."""
    model, ref_model = make_pair()
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, backend="torch")
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    for t, xs in enumerate(zip(*[iter(batches(20))] * 2)):
        for m, o in ((model, opt), (ref_model, ref_opt)):
            for x in xs:
                (m(x).mean() / 2).backward()
            if how == "model_zero_grad" and t % 2:
                # a trainer clearing gradients mid-window (p.grad = None), then more backward
                m.zero_grad()
                m(xs[1]).mean().backward()
            elif how == "surgery":
                for p in m.parameters():
                    if p.grad is not None:
                        p.grad = p.grad.clamp(-0.05, 0.05) * 0.5  # a new tensor, not the view
            elif how == "assign":
                m.w2.grad = torch.full_like(m.w2, 0.01 * (t + 1))
            o.step()
            m.zero_grad()  # what Hugging Face's Trainer calls: sets p.grad = None
    assert_parity(model, ref_model, opt, ref_opt)
