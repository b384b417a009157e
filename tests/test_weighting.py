"""Token-weighted normalisation: micro-batches of different lengths give exactly the
full-batch token mean (the Oct 2024 class of bug: averaging per-micro-batch means)."""
import copy

import pytest
import torch

import fastaccum
from conftest import OddNet


def _ragged(seed=3, lengths=(2, 9, 1, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, 7, generator=g) for n in lengths]


def _full_batch_reference(model, xs, steps, **kw):
    """One optimizer step per window on the mean over *all* tokens of the window."""
    opt = torch.optim.AdamW(model.parameters(), **kw)
    for _ in range(steps):
        loss = torch.cat([model(x).reshape(-1) for x in xs]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


@pytest.mark.parametrize("style", ["managed", "classic"])
def test_token_weighted_mean_is_exact(style):
    torch.manual_seed(0)
    model = OddNet()
    ref = copy.deepcopy(model)
    naive = copy.deepcopy(model)
    xs = _ragged()
    _full_batch_reference(ref, xs, steps=5, lr=1e-2)

    accum = len(xs) if style == "managed" else 1
    opt = fastaccum.AdamW(model.parameters(), lr=1e-2, accumulation_steps=accum, backend="torch")
    for _ in range(5):
        for x in xs:
            opt.backward(model(x).mean(), weight=x.shape[1])  # mean over this micro-batch's tokens
            if style == "managed":
                opt.step()
                opt.zero_grad()
        if style == "classic":
            opt.step()
            opt.zero_grad()

    # the per-micro-batch-mean average that mis-weights tokens
    nopt = fastaccum.AdamW(naive.parameters(), lr=1e-2, accumulation_steps=len(xs), backend="torch")
    for _ in range(5):
        for x in xs:
            nopt.backward(naive(x).mean())
            nopt.step()
            nopt.zero_grad()

    for (n, p), q, r in zip(model.named_parameters(), ref.parameters(), naive.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"parameter {n}")
    moved_wrong = max((r - q).abs().max().item() for r, q in zip(naive.parameters(), ref.parameters()))
    assert moved_wrong > 1e-4, "the mean of means must differ from the token mean here, or the test proves nothing"


def test_weight_tensor_and_scale_loss():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = fastaccum.SGD([p], lr=1.0, accumulation_steps=2, backend="torch")
    # grads: 3 tokens of gradient [1, 1] and 1 token of gradient [5, -5] -> mean [2, -0.5]
    opt.scale_loss((p * torch.tensor([1.0, 1.0])).sum(), weight=torch.tensor(3)).backward()
    opt.step()
    opt.backward((p * torch.tensor([5.0, -5.0])).sum(), weight=1)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0 - 2.0, -2.0 + 0.5]))


def test_unweighted_managed_mode_is_mean_over_micro_batches():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = fastaccum.SGD([p], lr=1.0, accumulation_steps=3, backend="torch")
    for k in range(3):
        (p * float(k + 1)).sum().backward()  # plain backward, no weights: mean of 1, 2, 3
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(p.detach(), torch.full((3,), -2.0))
