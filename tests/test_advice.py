"""Batch-size advice from the measured noise scale (fastaccum.advice): one test per verdict."""
from __future__ import annotations

import pytest
import torch

from fastaccum.advice import (
    ABOVE_NOISE_SCALE,
    BELOW_NOISE_SCALE,
    NEAR_NOISE_SCALE,
    NOT_ENOUGH_DATA,
    Advice,
    advise,
    assess,
)
from fastaccum.batch_scaling import scale_betas

BASE = dict(grad_norm=1.5, loss_scale=None, skipped_steps=0)


def test_accumulation_far_above_noise_scale_is_wasteful_and_gives_beta2():
    stats = dict(BASE, effective_batch=8192, noise_scale=512.0, accumulation_steps=16, betas=(0.9, 0.95))
    a = assess(stats)
    assert isinstance(a, Advice) and a.verdict == ABOVE_NOISE_SCALE
    assert a.ratio == pytest.approx(16.0)
    assert a.data_factor == pytest.approx(17.0) and a.step_factor == pytest.approx(1 + 1 / 16)
    assert a.suggested_batch == 512 and a.suggested_accumulation_steps == 1
    expected_b2 = scale_betas((0.9, 0.95), 8192, 512)[1]
    assert a.suggested_betas == (0.9, expected_b2)
    assert "wasteful" in a.message and "8,192" in a.message and "16x" in a.message
    assert f"{expected_b2:.6g}" in a.message and "\n" not in a.message
    assert advise(stats) == a.message


def test_above_without_accumulation_suggests_a_smaller_batch():
    a = assess(dict(BASE, effective_batch=4096, noise_scale=100.0, accumulation_steps=1, betas=(0.9, 0.99)))
    assert a.verdict == ABOVE_NOISE_SCALE
    assert "wasteful" not in a.message and "smaller batch" in a.message
    assert a.suggested_batch == 100.0
    assert a.suggested_betas[1] == pytest.approx(0.99 ** (100 / 4096))


def test_below_noise_scale_says_larger_batches_help():
    a = assess(dict(BASE, effective_batch=512, noise_scale=3000.0, micro_batch_weight=512))
    assert a.verdict == BELOW_NOISE_SCALE
    assert a.suggested_accumulation_steps == 6 and a.suggested_batch == 3072
    assert a.suggested_betas is None  # betas not given
    assert "noise-dominated" in a.message and "3,000" in a.message


def test_near_noise_scale():
    a = assess(dict(BASE, effective_batch=1000, noise_scale=800.0))
    assert a.verdict == NEAR_NOISE_SCALE and a.suggested_batch is None
    assert "critical batch" in a.message


@pytest.mark.parametrize(
    "extra, why",
    [
        (dict(effective_batch=512, noise_scale=None, accumulation_steps=1), "accumulation_steps >= 2"),
        (dict(effective_batch=2048, noise_scale=None, accumulation_steps=4), "not estimable yet"),
        (dict(effective_batch=None, noise_scale=None), "no accumulation window"),
    ],
)
def test_not_enough_data(extra, why):
    a = assess(dict(BASE, **extra))
    assert a.verdict == NOT_ENOUGH_DATA and why in a.message and a.ratio is None


def test_health_notes_and_tensor_values():
    stats = dict(grad_norm=torch.tensor(float("inf")), loss_scale=32768.0, skipped_steps=3,
                 effective_batch=torch.tensor(2048.0), noise_scale=torch.tensor(2000.0))
    a = assess(stats)
    assert a.verdict == NEAR_NOISE_SCALE
    assert any("3 update(s) skipped" in n and "32768" in n for n in a.notes)
    assert any("inf" in n for n in a.notes)
    assert a.notes[0] in a.message


def test_far_threshold():
    stats = dict(BASE, effective_batch=3000, noise_scale=1000.0)
    assert assess(stats).verdict == ABOVE_NOISE_SCALE
    assert assess(stats, far=4.0).verdict == NEAR_NOISE_SCALE


@pytest.mark.parametrize(
    "stats, name",
    [
        (dict(grad_norm=1.0, loss_scale=None, skipped_steps=0, effective_batch=8), "noise_scale"),
        (dict(BASE, effective_batch=8, noise_scale="lots"), "noise_scale"),
        (dict(BASE, effective_batch=8, noise_scale=-1.0), "noise_scale"),
        (dict(BASE, effective_batch=8, noise_scale=1.0, accumulation_steps=0), "accumulation_steps"),
        ([1, 2], "stats"),
    ],
)
def test_errors(stats, name):
    with pytest.raises(ValueError, match=name):
        assess(stats)
