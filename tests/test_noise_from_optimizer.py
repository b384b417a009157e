"""The optimizer measures the gradient noise scale from its own accumulation (track_noise_scale=True).

Synthetic gradients with known covariance: the loss of a micro-batch of ``b`` samples is the
mean over its samples of ``<theta, x_s>``, with per-sample gradients ``x_s = G + N(0, sigma²I)``,
so the true noise scale is ``B_simple = D·sigma² / |G|²`` samples. Micro-batches go through
``opt.backward(loss, weight=b)``.
"""
import math

import pytest
import torch

import fastaccum
from fastaccum import NoiseScaleEstimator

D = 2048
SIGMA2 = 48.0


def _truth(G):
    return D * SIGMA2 / float(G.double().pow(2).sum())


def _run(opt, theta, G, sizes, windows, gen, dtype):
    for _ in range(windows):
        for b in sizes:
            x = G + math.sqrt(SIGMA2) * torch.randn(b, D, generator=gen)
            loss = (theta.float() * x.to(dtype).float()).sum(-1).mean()
            opt.backward(loss, weight=b)
            opt.step()
            opt.zero_grad()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sizes", [[16, 16, 16, 16], [4, 24, 9, 27]], ids=["equal", "uneven"])
def test_noise_scale_within_15_percent(backend, dtype, sizes):
    if backend not in fastaccum.available_backends():
        pytest.skip(f"{backend} backend not built")
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(D, generator=gen)
    theta = torch.nn.Parameter(torch.zeros(D, dtype=dtype))
    opt = fastaccum.SGD([theta], lr=0.0, accumulation_steps=len(sizes), backend=backend, track_noise_scale=True)
    _run(opt, theta, G, sizes, 120, gen, dtype)
    est = opt.stats()["noise_scale"]
    truth = _truth(G)
    assert est is not None
    assert abs(est - truth) / truth < 0.15, (est, truth)
    st = opt.stats()
    assert st["effective_batch"] == pytest.approx(sum(sizes))
    assert st["noise_windows"] == 120
    # fp32: only the first micro-batch of a window is measured; bf16: every fold is
    reports = 1 if dtype == torch.float32 else len(sizes)
    assert opt._window.last_noise[2] == reports


def test_fp32_first_micro_only_matches_hand_estimator():
    """The optimizer's numbers are exactly what NoiseScaleEstimator gets from the true norms."""
    gen = torch.Generator().manual_seed(1)
    G = torch.randn(D, generator=gen)
    theta = torch.nn.Parameter(torch.zeros(D))
    opt = fastaccum.SGD([theta], lr=0.0, accumulation_steps=3, backend="torch", track_noise_scale=True,
                        loss_scale=1024.0)
    ref = NoiseScaleEstimator()
    for _ in range(5):
        grads, sizes = [], [5, 7, 11]
        for b in sizes:
            x = G + math.sqrt(SIGMA2) * torch.randn(b, D, generator=gen)
            grads.append(x.double().mean(0))
            opt.backward((theta * x).sum(-1).mean(), weight=b)
            opt.step()
        gb = sum(b * g for b, g in zip(sizes, grads)) / sum(sizes)
        ref.update([float(grads[0].pow(2).sum()), None, None], sizes, float(gb.pow(2).sum()))
    assert opt.noise_scale_estimator.value == pytest.approx(ref.value, rel=1e-4)
    assert opt.stats()["grad_norm"] == pytest.approx(float(gb.norm()), rel=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_scaler_scale_is_undone_in_the_micro_batch_norms_too(backend):
    """GradScaler's scale (handed to step() as grad_scale) multiplies every micro-batch's
    gradient: the micro-batch reports are unscaled by it as |G_B|² is, so the estimate does
    not depend on it (host-decided and device-resident step alike)."""
    if backend not in fastaccum.available_backends():
        pytest.skip(f"{backend} backend not available")
    values = []
    for gs in (None, 64.0):
        gen = torch.Generator().manual_seed(2)
        G = torch.randn(D, generator=gen)
        theta = torch.nn.Parameter(torch.zeros(D, dtype=torch.bfloat16))  # bf16: every fold reports
        opt = fastaccum.SGD([theta], lr=0.0, accumulation_steps=3, backend=backend, track_noise_scale=True)
        for _ in range(6):
            for b in (5, 7, 11):
                x = G + math.sqrt(SIGMA2) * torch.randn(b, D, generator=gen)
                loss = (theta.float() * x.to(torch.bfloat16).float()).sum(-1).mean()
                opt.backward(loss * (gs or 1.0), weight=b)
                opt.step(grad_scale=None if gs is None else torch.tensor(gs))
        assert opt.noise_scale_estimator.windows == 6
        values.append(opt.noise_scale_estimator.value)
    assert values[0] > 0 and values[1] == pytest.approx(values[0], rel=1e-9)


def test_skipped_windows_are_not_fed():
    theta = torch.nn.Parameter(torch.zeros(8))
    opt = fastaccum.AdamW([theta], accumulation_steps=2, backend="torch", track_noise_scale=True,
                          loss_scale="dynamic")
    for k in range(2):
        opt.backward((theta * torch.randn(8)).sum(), weight=3)
        opt.step()
    assert opt.noise_scale_estimator.windows + opt.noise_scale_estimator.unestimable_windows == 1
    opt.backward((theta * torch.full((8,), float("inf"))).sum(), weight=3)
    opt.step()
    opt.backward((theta * torch.randn(8)).sum(), weight=3)
    opt.step()
    assert opt.stats()["skipped_steps"] == 1
    assert opt.noise_scale_estimator.windows + opt.noise_scale_estimator.unestimable_windows == 1


def test_user_assigned_grad_drops_the_reports():
    theta = torch.nn.Parameter(torch.zeros(8))
    opt = fastaccum.SGD([theta], lr=0.0, accumulation_steps=2, backend="torch", track_noise_scale=True)
    opt.backward((theta * torch.randn(8)).sum(), weight=3)
    opt.step()
    opt.backward((theta * torch.randn(8)).sum(), weight=3)
    theta.grad = torch.ones(8)  # gradient surgery: nothing measured it
    opt.step()
    assert opt.noise_scale_estimator.unestimable_windows == 1 and opt.noise_scale_estimator.windows == 0


def test_stats_and_state_dict_round_trip():
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    opt = fastaccum.AdamW([theta], accumulation_steps=4, backend="torch", track_noise_scale=True)
    st = opt.stats()
    assert st["grad_norm"] is None and st["effective_batch"] is None and st["noise_scale"] is None
    assert st["accumulation_steps"] == 4 and st["betas"] == (0.9, 0.999) and st["skipped_steps"] == 0
    G = torch.randn(64)
    for _ in range(6 * 4):
        opt.backward((theta.float() * (G + torch.randn(3, 64)).mean(0)).sum(), weight=3)
        opt.step()
    st = opt.stats()
    assert st["effective_batch"] == 12 and st["micro_batch_weight"] == 3
    assert st["grad_norm"] > 0 and st["noise_windows"] == 6
    assert set(fastaccum.advice.REQUIRED_KEYS) <= set(st)
    sd = opt.state_dict()
    other = fastaccum.AdamW([torch.nn.Parameter(theta.detach().clone())], accumulation_steps=4, backend="torch",
                            track_noise_scale=True)
    other.load_state_dict(sd)
    assert other.noise_scale_estimator.state_dict() == opt.noise_scale_estimator.state_dict()
    bad = dict(sd, fastaccum=dict(sd["fastaccum"], noise_scale={"ema": "x"}))
    with pytest.raises(ValueError, match="noise-scale state"):
        other.load_state_dict(bad)


def test_advise_accepts_the_optimizer():
    theta = torch.nn.Parameter(torch.zeros(8))
    opt = fastaccum.AdamW([theta], accumulation_steps=2, backend="torch")
    assert "not enough data" in fastaccum.advise(opt)
    assert fastaccum.assess(opt).verdict == fastaccum.advice.NOT_ENOUGH_DATA


def test_bad_inputs():
    theta = torch.nn.Parameter(torch.zeros(8))
    with pytest.raises(TypeError, match="track_noise_scale"):
        fastaccum.AdamW([theta], track_noise_scale=1)
    with pytest.raises(ValueError, match="track_noise_scale"):
        fastaccum.AdamW([theta], track_noise_scale=True, step_in_backward=True)
    with pytest.raises(ValueError, match="stats"):
        fastaccum.advise(object())
