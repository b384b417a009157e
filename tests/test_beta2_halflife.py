"""beta2_halflife_tokens: β2 chosen per update from the tokens of its window."""
import pytest
import torch

import fastaccum
from fastaccum import beta_for_halflife


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(5, 3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_beta2_follows_the_tokens_of_each_window(backend):
    if backend not in fastaccum.available_backends():
        pytest.skip(f"{backend} backend not built")
    m = _model()
    opt = fastaccum.AdamW(m.parameters(), lr=1e-2, accumulation_steps=2, backend=backend,
                          beta2_halflife_tokens=1000.0)
    for tokens in [(30, 50), (7, 9), (200, 300)]:
        x = torch.randn(4, 5)
        for w in tokens:
            opt.backward(m(x).pow(2).mean(), weight=w)
            opt.step()
        assert opt.param_groups[0]["betas"] == (0.9, pytest.approx(beta_for_halflife(1000.0, sum(tokens))))
    assert opt.stats()["betas"][1] == pytest.approx(beta_for_halflife(1000.0, 500))
    assert opt.stats()["effective_batch"] == 500


def test_equals_fixed_beta2_when_tokens_are_constant():
    m, ref = _model(), _model()
    beta2 = beta_for_halflife(512.0, 64)
    opt = fastaccum.Adam(m.parameters(), lr=1e-2, accumulation_steps=4, backend="torch", beta2_halflife_tokens=512.0)
    ref_opt = fastaccum.Adam(ref.parameters(), lr=1e-2, betas=(0.9, beta2), accumulation_steps=4, backend="torch")
    for _ in range(12):
        x = torch.randn(4, 5)
        for model, o in ((m, opt), (ref, ref_opt)):
            o.backward(model(x).pow(2).mean(), weight=16)
            o.step()
    for p, q in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_unweighted_unit_is_micro_batches():
    m = _model()
    opt = fastaccum.AdamW(m.parameters(), accumulation_steps=3, backend="torch", beta2_halflife_tokens=30.0)
    for _ in range(3):
        opt.backward(m(torch.randn(2, 5)).sum())
        opt.step()
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.5 ** (3 / 30))


def test_checkpoints_and_refuses_conflicts():
    m = _model()
    opt = fastaccum.AdamW(m.parameters(), accumulation_steps=1, backend="torch", beta2_halflife_tokens=100.0)
    opt.backward(m(torch.randn(2, 5)).sum(), weight=10)
    opt.step()
    sd = opt.state_dict()
    assert sd["param_groups"][0]["beta2_halflife_tokens"] == 100.0
    other = fastaccum.AdamW(_model().parameters(), backend="torch")
    other.load_state_dict(sd)
    assert other.param_groups[0]["beta2_halflife_tokens"] == 100.0
    with pytest.raises(ValueError, match="betas.*beta2_halflife_tokens"):
        fastaccum.AdamW(m.parameters(), betas=(0.9, 0.95), beta2_halflife_tokens=100.0)
    with pytest.raises(ValueError, match="beta2_halflife_tokens"):
        fastaccum.AdamW(m.parameters(), beta2_halflife_tokens=-1.0)
    with pytest.raises(ValueError, match="beta2_halflife_tokens"):
        fastaccum.AdamW(m.parameters(), beta2_halflife_tokens=float("nan"))
    with pytest.raises(ValueError, match="both set beta2"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (0.9, 0.9)})
    # explicit betas[1] wins in a group that says so
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (0.9, 0.9),
                         "beta2_halflife_tokens": None})
