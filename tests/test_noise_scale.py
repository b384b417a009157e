"""Gradient noise scale from accumulation (fastaccum.noise_scale) on synthetic gradients with a
known covariance: per-unit gradient = G + N(0, σ² I) in d dims, so B_simple = d σ² / |G|²."""
from __future__ import annotations

import math
from typing import Sequence

import pytest
import torch

from conftest import HOST_SYNC_OPS, AtenOps
from fastaccum.noise_scale import NoiseScaleEstimator, mean_grad_sumsq, two_batch_estimates

D = 2048
TRUE_B = 96.0  # B_simple in units of weight


class World:
    """Draws micro-batch mean gradients: the mean of b iid N(G, σ² I) units is N(G, σ²/b I)."""

    def __init__(self, seed: int = 0, d: int = D, true_b: float = TRUE_B) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        g = torch.randn(d, generator=self.gen, dtype=torch.float64)
        self.G = g / g.norm()  # |G|² = 1
        self.sigma2 = true_b / d  # tr(Σ) = d σ² = true_b · |G|²
        self.d = d

    def micro(self, b: float) -> torch.Tensor:
        return self.G + math.sqrt(self.sigma2 / b) * torch.randn(self.d, generator=self.gen, dtype=torch.float64)

    def window(self, sizes: Sequence[float]):
        gs = [self.micro(b) for b in sizes]
        B = float(sum(sizes))
        GB = sum(b * g for b, g in zip(sizes, gs)) / B
        return [float(g.dot(g)) for g in gs], float(GB.dot(GB)), B


def run(sizes_fn, windows: int, report=lambda i: True, seed: int = 0, ema: float = 0.95):
    world = World(seed)
    est = NoiseScaleEstimator(ema=ema)
    rng = torch.Generator().manual_seed(seed + 1)
    for _ in range(windows):
        sizes = sizes_fn(rng)
        s, S, B = world.window(sizes)
        est.update([x if report(i) else None for i, x in enumerate(s)], sizes, S, B)
    return est


def even(rng):
    return [8.0] * 8


def uneven(rng):
    # 2..9 micro-batches of 1..40 units each: the weighting by b_i must be exact
    n = int(torch.randint(2, 10, (1,), generator=rng))
    return [float(x) for x in torch.randint(1, 41, (n,), generator=rng)]


@pytest.mark.parametrize("sizes_fn", [even, uneven], ids=["even", "uneven"])
@pytest.mark.parametrize("only_first", [False, True], ids=["all-report", "first-only"])
def test_within_15_percent_of_the_truth(sizes_fn, only_first):
    report = (lambda i: i == 0) if only_first else (lambda i: True)
    est = run(sizes_fn, windows=300, report=report)
    assert est.windows == 300
    assert est.value == pytest.approx(TRUE_B, rel=0.15)
    assert est.g2 == pytest.approx(1.0, rel=0.15)
    assert est.trace == pytest.approx(TRUE_B, rel=0.15)


def test_single_window_estimates_are_unbiased_with_uneven_sizes():
    """Average raw per-window estimates (no EMA): the formula, not the smoothing, must be right.
    A mean of |g_i|² paired with the mean b_i (unweighted) would be off by ~2x here."""
    world = World(3, d=256)
    g2s, trs = [], []
    for _ in range(4000):
        sizes = [1.0, 31.0, 4.0]
        s, S, B = world.window(sizes)
        reported = [0, 1]  # micro-batch 2 did not report
        s1 = sum(sizes[i] * s[i] for i in reported)
        est = two_batch_estimates(s1, sum(sizes[i] for i in reported), len(reported), S, B)
        g2s.append(est[0])
        trs.append(est[1])
    assert sum(g2s) / len(g2s) == pytest.approx(1.0, rel=0.03)
    assert sum(trs) / len(trs) == pytest.approx(TRUE_B, rel=0.03)


def test_ranks_as_sums_equal_the_flat_list():
    """Per-rank sums (what an all-reduce produces) give the same numbers as all micro-batches
    of all ranks in one list, and a rank-local window is a valid small batch too."""
    world = World(5)
    flat, sums, per_rank = NoiseScaleEstimator(), NoiseScaleEstimator(), NoiseScaleEstimator()
    for _ in range(200):
        ranks = [[4.0, 12.0], [16.0], [3.0, 5.0, 8.0], [7.0, 9.0]]  # 4 ranks, uneven tokens
        sizes = [b for r in ranks for b in r]
        gs = [world.micro(b) for b in sizes]
        B = sum(sizes)
        GB = sum(b * g for b, g in zip(sizes, gs)) / B
        S = float(GB.dot(GB))
        s = [float(g.dot(g)) for g in gs]
        reported = [None if j % 2 else x for j, x in enumerate(s)]  # some don't report
        flat.update(reported, sizes, S, B)
        sums.update_from_sums(
            sum(b * x for b, x in zip(sizes, reported) if x is not None),
            sum(b for b, x in zip(sizes, reported) if x is not None),
            sum(x is not None for x in reported),
            S,
            B,
        )
        # each rank's local window mean (before the all-reduce) as the small batch
        local, j = [], 0
        for r in ranks:
            Wr = sum(r)
            Gr = sum(sizes[j + t] * gs[j + t] for t in range(len(r))) / Wr
            local.append((float(Gr.dot(Gr)), Wr))
            j += len(r)
        per_rank.update([x for x, _ in local], [w for _, w in local], S, B)
    assert sums.value == pytest.approx(flat.value, rel=1e-12)
    assert flat.value == pytest.approx(TRUE_B, rel=0.15)
    assert per_rank.value == pytest.approx(TRUE_B, rel=0.15)


def test_none_until_estimable():
    est = NoiseScaleEstimator()
    assert est.value is None and est.g2 is None and est.trace is None and est.windows == 0
    # no accumulation: the only micro-batch *is* the window, one batch size
    assert est.update([2.0], [8.0], 2.0) is False
    # nothing reported
    assert est.update([None, None], [8.0, 8.0], 1.5) is False
    assert est.value is None and est.unestimable_windows == 2
    assert est.update([3.0, None], [8.0, 8.0], 2.0) is True
    assert est.windows == 1 and est.value is not None
    # |G|² estimate <= 0 (noise swamps signal at these sizes): no value yet
    est2 = NoiseScaleEstimator()
    est2.update([1.0, None], [1.0, 1.0], 0.9)  # tr = (1 - .9)*2 = .2, g2 = .9 - .1 = .8 > 0
    assert est2.value == pytest.approx(0.25)
    est3 = NoiseScaleEstimator()
    est3.update([10.0, None], [1.0, 1.0], 4.0)  # tr = 12, g2 = 4 - 6 < 0
    assert est3.g2 < 0 and est3.value is None


def test_min_windows_and_non_finite_windows_are_dropped():
    est = NoiseScaleEstimator(min_windows=2)
    est.update([3.0, None], [8.0, 8.0], 2.0)
    assert est.value is None
    assert est.update([math.inf, None], [8.0, 8.0], 2.0) is False
    est.update([3.0, None], [8.0, 8.0], 2.0)
    assert est.windows == 2
    assert est.value == pytest.approx(16.0)  # tr = (3-2)*16 = 16, g2 = 2 - 1 = 1


def test_tensor_inputs_are_lazy_and_equal_float_inputs():
    world = World(7)
    floats, tensors = NoiseScaleEstimator(), NoiseScaleEstimator()
    mode = AtenOps(keep=HOST_SYNC_OPS.__contains__)
    for w in range(50):
        sizes = [5.0, 11.0, 16.0]
        s, S, B = world.window(sizes)
        floats.update([s[0], None, s[2]], sizes, S, B)
        ts = [torch.tensor(x, dtype=torch.float32 if w % 2 else torch.float64) for x in s]
        with mode:
            tensors.update([ts[0], None, ts[2]], sizes, torch.tensor(S), B)
    # one NaN window: masked on the device, not counted
    with mode:
        tensors.update([torch.tensor(math.nan), None, torch.tensor(1.0)], [5.0, 11.0, 16.0], torch.tensor(1.0))
    assert mode.seen == []
    assert tensors.windows == 50
    assert tensors.value == pytest.approx(floats.value, rel=1e-6)


def test_decisions_on_the_device_equal_host_decisions():
    """The device-resident optimizer's form: weights and counts as tensors, and an ``applied``
    mask for windows whose step the device skipped. Same estimate and counts as passing only
    the applied windows with host numbers -- skipped windows count neither as estimable nor as
    left out, even when they are not solvable -- and nothing is read back while feeding."""
    world = World(11)
    host, dev, mixed = NoiseScaleEstimator(), NoiseScaleEstimator(), NoiseScaleEstimator()
    mode = AtenOps(keep=HOST_SYNC_OPS.__contains__)
    unsolvable = 0
    for w in range(60):
        sizes = [[5.0, 11.0, 16.0], [7.0], [3.0, 9.0], [4.0, 4.0, 4.0, 4.0]][w % 4]
        s, S, B = world.window(sizes)
        reports = [0] if w % 5 else []  # some windows report nothing: left out
        s1 = sum(sizes[i] * s[i] for i in reports)
        w_r, k = sum(sizes[i] for i in reports), float(len(reports))
        if w % 13 == 6:
            S = math.inf  # an overflowed norm: masked, counted nowhere
        applied = w % 7 != 3
        if applied:
            host.update_from_sums(s1, w_r, k, S, B)
            unsolvable += len(sizes) == 1 or not reports
        t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
        with mode:
            out = dev.update_from_sums(t(s1), t(w_r), t(k), t(S), t(B), applied=torch.tensor(applied))
            mixed.update_from_sums(t(s1), w_r, k, t(S), B, applied=torch.tensor(applied))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    assert mode.seen == []
    assert host.unestimable_windows == unsolvable > 0
    for est in (dev, mixed):
        assert est.windows == host.windows and est.unestimable_windows == host.unestimable_windows
        assert est.value == pytest.approx(host.value, rel=1e-12)
        assert est.state_dict() == pytest.approx(host.state_dict(), rel=1e-12)
    with pytest.raises(ValueError, match="applied"):
        dev.update_from_sums(1.0, 1.0, 1.0, 1.0, 2.0, applied=torch.tensor(1.0))


def test_state_dict_round_trip():
    est = run(even, windows=20)
    other = NoiseScaleEstimator(ema=0.5)
    other.load_state_dict(est.state_dict())
    assert other.value == est.value and other.windows == est.windows and other.ema == est.ema
    with pytest.raises(ValueError, match="noise-scale state"):
        other.load_state_dict({"ema": 0.9})


def test_mean_grad_sumsq_undoes_loss_scale_and_weight():
    g = torch.tensor([3.0, 4.0])  # |g|² = 25
    raw = float(((1024.0 * 7.0) * g).pow(2).sum())
    assert mean_grad_sumsq(raw, 1024.0 * 7.0) == pytest.approx(25.0)
    with pytest.raises(ValueError, match="multiplier"):
        mean_grad_sumsq(raw, 0.0)


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda e: e.update([1.0], [1.0, 2.0], 1.0), "micro_sumsqs"),
        (lambda e: e.update([1.0, 2.0], [1.0, 0.0], 1.0), r"micro_weights\[1\]"),
        (lambda e: e.update([1.0, -2.0], [1.0, 1.0], 1.0), r"micro_sumsqs\[1\]"),
        (lambda e: e.update([1.0, 2.0], [1.0, 1.0], 1.0, window_weight=-3), "window_weight"),
        (lambda e: e.update([1.0, 2.0], [1.0, 1.0], "x"), "window_sumsq"),
        (lambda e: e.update(torch.ones(2), [1.0, 1.0], 1.0), "micro_sumsqs"),
        (lambda e: NoiseScaleEstimator(ema=1.0), "ema"),
        (lambda e: NoiseScaleEstimator(min_windows=0), "min_windows"),
    ],
)
def test_errors_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call(NoiseScaleEstimator())
