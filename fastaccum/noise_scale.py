r"""The gradient noise scale, measured from gradient accumulation itself.

McCandlish et al. 2018, "An Empirical Model of Large-Batch Training"
(https://arxiv.org/abs/1812.06162): the *simple noise scale*

    B_simple = tr(Σ) / |G|²

(Σ the per-example gradient covariance, G the true gradient) predicts the critical batch:
batches well below it are noise-dominated (a bigger batch still buys almost proportionally
fewer steps), batches well above it waste data -- a step at batch B uses about
``1 + B/B_simple`` times the minimum number of examples and ``1 + B_simple/B`` times the
minimum number of steps.

Derivation (the estimator this module implements)
-------------------------------------------------
Let a "unit" be whatever the micro-batch ``weight`` counts (tokens with ``weight=n_tokens``,
samples, or micro-batches when no weight is given), and let the per-unit gradients be
independent with mean G and covariance Σ. A batch of ``b`` units whose loss is the *mean*
over its units has the mean gradient ``g_b``, and

    E|g_b|² = |G|² + tr(Σ)/b.                                                     (1)

Accumulation gives two batch sizes for free. Micro-batch ``i`` of a window has weight
``b_i`` and mean gradient ``g_i``; the window's update direction is the weighted mean
``G_B = Σ b_i g_i / B`` with ``B = Σ b_i`` (what fastaccum's ``weight=`` normalisation
computes). Suppose only the micro-batches in a set R report ``s_i = |g_i|²`` (the optimizer
can measure the first micro-batch of a window for fp32 parameters, every one for bf16/fp16;
the micro-batches may be uneven). By (1), weighting each report by its own ``b_i``,

    E[Σ_R b_i s_i] = W_R·|G|² + k·tr(Σ),      W_R = Σ_R b_i,  k = |R|,           (2)
    E|G_B|²        = |G|²     + tr(Σ)/B.                                         (3)

Two linear equations in the two unknowns; with ``S1 = Σ_R b_i s_i`` and ``S = |G_B|²``,

    tr(Σ)^ = (S1/W_R − S) / (k/W_R − 1/B) = (S1/W_R − S) · W_R·B / (k·B − W_R),
    |G|²^  = S − tr(Σ)^ / B,

unbiased because they are linear in the measured norms (the correlation between ``g_i`` and
``G_B`` -- ``g_i`` is part of ``G_B`` -- does not enter expectations). This is McCandlish's
two-batch-size estimator (their appendix A.1) with ``B_small = W_R / k`` (the mean reported
micro-batch weight) and ``B_big = B``; weighting by ``b_i`` gives bigger, less noisy
micro-batches more say. When every micro-batch reports, ``S1/B − S = Σ b_i |g_i − G_B|² / B``
and the estimate is the weighted sample variance ``tr(Σ)^ = Σ b_i |g_i − G_B|² / (k − 1)``.
The window is *not estimable* when ``k·B <= W_R`` (only one micro-batch, i.e. no
accumulation, or nothing reported): it is then left out.

Single-window estimates are very noisy (|G|²^ can be negative), so, like McCandlish (their
appendix A.1), the estimate is a ratio of exponential moving averages,
``B_simple = EMA(tr(Σ)^) / EMA(|G|²^)``, not an average of ratios.

Across ranks
------------
(2) and (3) only need *sums*: ``S1``, ``W_R`` and ``k`` add up over ranks, and a rank's
micro-batches are micro-batches of the global window. So a data-parallel optimizer adds the
three numbers ``(Σ_R b_i s_i, Σ_R b_i, k)`` of each rank to the one small all-reduce it
already does at step time (weight sum and found-inf), computes ``S = |G_B|²`` from the
*reduced* buffer with ``B`` the global weight sum, and calls :meth:`update_from_sums` on every
rank with the reduced numbers: every rank then holds the same estimate. A rank's own
(local, pre-reduction) window mean gradient is itself a valid small batch of weight ``W_r``;
passing it as one more report (with weight ``W_r``) is also unbiased, and gives an estimate
even when no micro-batch norm is measurable (e.g. under DDP without accumulation).

Laziness
--------
Inputs may be Python numbers or 0-dim tensors (e.g. the fp64 ``sum(x**2)`` side output of
the accumulate kernel, on the GPU). With tensor inputs :meth:`NoiseScaleEstimator.update`
never reads a tensor back: the EMAs (and the count of windows, which skips non-finite
windows with ``torch.where`` instead of a branch) stay tensors on the inputs' device, and a
device sync happens only when :attr:`~NoiseScaleEstimator.value`, ``.g2``, ``.trace``,
``.windows`` or :meth:`~NoiseScaleEstimator.state_dict` is read. Whether a window is
estimable depends only on the weights: with host numbers it is decided on the host; a
device-resident optimizer passes its weights (tensor weights, or sums all-reduced on the
device) and whether its step was applied (the skip is decided on the device too) as tensors
to :meth:`~NoiseScaleEstimator.update_from_sums`, and the decision is then a mask as well.
With float inputs everything is float math on the host.

This module imports only ``math``, ``typing`` and ``torch``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["NoiseScaleEstimator", "two_batch_estimates", "mean_grad_sumsq"]

Number = Union[float, int, Tensor]
_MARGIN = 1e-9  # relative: k·B must exceed W_R by this much for the system to be solvable


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive number (e.g. the token count)")
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor with {value.numel()} elements; expected one number")
        value = value.item()  # weights are host numbers in fastaccum (scale_loss reads them once)
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} ({type(value).__name__}); expected a positive number") from None
    if not (w > 0 and math.isfinite(w)):
        raise ValueError(f"Invalid {name}: {value!r}; a batch weight must be a finite number > 0")
    return w


def _sumsq(name: str, value: Any) -> Number:
    """A squared norm as a float, or as a 0-dim floating tensor (kept on its device, fp64 where
    the device has it; never read back here)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor with {value.numel()} elements; expected a 0-dim squared norm")
        t = value.detach().reshape(())
        if t.device.type != "mps":  # MPS has no float64
            t = t.to(torch.float64)
        elif not t.is_floating_point():
            t = t.to(torch.float32)
        return t
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected a squared norm (a number >= 0)")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} ({type(value).__name__}); expected a squared norm") from None
    if x < 0:
        raise ValueError(f"Invalid {name}: {x}; a squared norm is >= 0")
    return x


def mean_grad_sumsq(raw_sumsq: Number, multiplier: float) -> Number:
    """``|g|²`` of a mean gradient from the squared norm of a gradient that was multiplied by
    ``multiplier`` before it was measured: ``raw_sumsq / multiplier**2``.

    fastaccum's backward scales the loss by ``loss_scale · weight``, so the accumulate
    kernel's side output for micro-batch ``i`` is ``|loss_scale · w_i · g_i|²`` (multiplier
    ``loss_scale · w_i``), and the raw buffer after a window holds
    ``loss_scale · Σ w_i g_i`` (multiplier ``loss_scale · B`` for ``|G_B|²``).
    """
    m = float(multiplier)
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"Invalid multiplier: {multiplier!r}; expected a finite number > 0")
    return raw_sumsq / (m * m)


def _solvable(small_weight: Number, small_count: Number, big_weight: Number) -> Any:
    """Whether the two batch sizes differ (``k·B > W_R``, by a relative margin): a bool for
    numbers, a bool tensor (decided on the device) when any input is a tensor."""
    k, w_r, big = small_count, small_weight, big_weight
    return (k > 0) & (w_r > 0) & (big > 0) & (k * big - w_r > _MARGIN * k * big)


def _solve(s1: Number, w_r: Number, k: Number, big_sumsq: Number, big: Number) -> Tuple[Number, Number]:
    """The two equations of the module docstring solved for ``(|G|², tr(Σ))``: the one place
    the estimator's formula is written (numbers or tensors alike, no branch)."""
    trace = (s1 / w_r - big_sumsq) * (w_r * big / (k * big - w_r))
    g2 = big_sumsq - trace / big
    return g2, trace


def two_batch_estimates(
    small_weighted_sumsq: Number,
    small_weight: float,
    small_count: float,
    big_sumsq: Number,
    big_weight: float,
) -> Optional[Tuple[Number, Number]]:
    """Unbiased single-window ``(|G|², tr(Σ))`` from the sufficient statistics, or None when
    the two batch sizes coincide (``small_count · big_weight <= small_weight``).

    ``small_weighted_sumsq = Σ_R b_i |g_i|²``, ``small_weight = Σ_R b_i``,
    ``small_count = |R|`` over the reported small batches; ``big_sumsq = |G_B|²`` of the
    window's weighted mean gradient and ``big_weight = B``. See the module docstring for the
    derivation. Tensors in, tensors out (no host sync).
    """
    w_r = float(small_weight)
    k = float(small_count)
    big = float(big_weight)
    if not _solvable(w_r, k, big):
        return None
    return _solve(small_weighted_sumsq, w_r, k, big_sumsq, big)


def _device_weight(name: str, value: Any, allow_zero: bool = False) -> Number:
    """A weight or count for the device fold: a 0-dim fp64 tensor (kept on its device, never
    read here) or a checked host number (0 allowed for a window without reports)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor with {value.numel()} elements; expected one number")
        t = value.detach().reshape(())
        return t.to(torch.float64) if t.device.type != "mps" else t.to(torch.float32)
    if allow_zero and not isinstance(value, bool) and value == 0:
        return 0.0
    return _weight(name, value)


def _finite(x: Number) -> Any:
    return torch.isfinite(x) if isinstance(x, Tensor) else math.isfinite(x)


def _to_float(x: Number) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


class NoiseScaleEstimator:
    """Running estimate of ``B_simple = tr(Σ)/|G|²`` in units of the micro-batch ``weight``.

    Call :meth:`update` (or :meth:`update_from_sums`, for pre-reduced statistics) once per
    accumulation window that was applied (not for windows skipped for inf/nan). Read
    :attr:`value` (``None`` until estimable), :attr:`g2` (``|G|²``) and :attr:`trace`
    (``tr(Σ)``, per unit of weight).

    ``ema``: decay of the two moving averages (McCandlish et al. 2018, appendix A.1: the
    estimate is a ratio of EMAs). Both are bias-corrected like Adam's moments, so early
    windows are not pulled toward 0. ``min_windows``: estimable windows needed before
    :attr:`value` is reported.
    """

    def __init__(self, ema: float = 0.95, *, min_windows: int = 1) -> None:
        if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not (0.0 <= float(ema) < 1.0):
            raise ValueError(f"Invalid ema: {ema!r}; expected a decay in [0, 1), e.g. 0.95")
        if isinstance(min_windows, bool) or not isinstance(min_windows, int) or min_windows < 1:
            raise ValueError(f"Invalid min_windows: {min_windows!r}; expected an integer >= 1")
        self.ema = float(ema)
        self.min_windows = min_windows
        self.reset()

    def reset(self) -> None:
        """Forget everything (e.g. after a change of learning-rate phase or data mix)."""
        self._g2: Number = 0.0  # EMA of |G|²^ (not bias-corrected)
        self._trace: Number = 0.0  # EMA of tr(Σ)^
        self._n: Number = 0  # estimable, finite windows folded in
        self._unestimable: Number = 0  # windows left out because the two batch sizes coincided

    @property
    def unestimable_windows(self) -> int:
        """Windows left out because the two batch sizes coincided (reading it syncs when the
        decision was made on the device)."""
        return int(_to_float(self._unestimable))

    @unestimable_windows.setter
    def unestimable_windows(self, value: int) -> None:
        self._unestimable = int(value)

    # ------------------------------------------------------------------ feeding
    def update(
        self,
        micro_sumsqs: Sequence[Optional[Number]],
        micro_weights: Sequence[float],
        window_sumsq: Number,
        window_weight: Optional[float] = None,
    ) -> bool:
        """Fold in one accumulation window.

        ``micro_sumsqs[i]``: ``|g_i|²`` of micro-batch ``i``'s *mean* gradient (the gradient
        of a loss that is a mean over its units), or ``None`` where it was not measured.
        ``micro_weights[i]``: its weight ``b_i`` (the ``weight=`` passed to backward; 1 when
        none was). ``window_sumsq``: ``|G_B|²`` of the window's weighted mean gradient (the
        update direction before clipping). ``window_weight``: ``B``; defaults to
        ``sum(micro_weights)`` (pass the global sum under data parallelism, see the module
        docstring). Squared norms may be floats or 0-dim tensors (never read back here).

        Returns True when the window was estimable (at least one report and ``B`` above the
        mean reported weight), False when it was left out.
        """
        if isinstance(micro_sumsqs, (Tensor, str, bytes)) or isinstance(micro_weights, (Tensor, str, bytes)):
            raise ValueError("Invalid micro_sumsqs/micro_weights: expected sequences with one entry per micro-batch")
        if len(micro_sumsqs) != len(micro_weights):
            raise ValueError(
                f"Invalid micro_sumsqs: {len(micro_sumsqs)} entries for {len(micro_weights)} micro_weights; "
                "pass one entry per micro-batch (None where no norm was measured)"
            )
        weights = [_weight(f"micro_weights[{i}]", w) for i, w in enumerate(micro_weights)]
        big = sum(weights) if window_weight is None else _weight("window_weight", window_weight)
        s1: Number = 0.0
        w_r = 0.0
        k = 0
        for i, (s, w) in enumerate(zip(micro_sumsqs, weights)):
            if s is None:
                continue
            s1 = s1 + w * _sumsq(f"micro_sumsqs[{i}]", s)
            w_r += w
            k += 1
        return self._fold(s1, w_r, k, _sumsq("window_sumsq", window_sumsq), big)

    def update_from_sums(
        self,
        weighted_sumsq: Number,
        reported_weight: Number,
        reported_count: Number,
        window_sumsq: Number,
        window_weight: Number,
        *,
        applied: Optional[Tensor] = None,
    ) -> Any:
        """Fold in one window given as sums -- the form to all-reduce across ranks.

        ``weighted_sumsq = Σ_R b_i |g_i|²``, ``reported_weight = Σ_R b_i`` and
        ``reported_count = |R|`` over the micro-batches (of all ranks) that reported a norm;
        ``window_sumsq = |G_B|²`` of the global window mean and ``window_weight = B``, its
        global weight. Returns True when the window was estimable.

        On the device (nothing read back): the weights and the count may be 0-dim tensors
        (sums all-reduced on the device, tensor weights), and ``applied`` a bool tensor that is
        False when the window's step was skipped there -- such a window is not counted at all,
        as a skipped window is never passed on the host. Whether the window is estimable is
        then decided on the device as well, and the return value is a bool tensor.
        """
        weights = (reported_weight, reported_count, window_weight)
        if applied is None and not any(isinstance(x, Tensor) for x in weights):
            if reported_count == 0:
                self._unestimable = self._unestimable + 1
                return False
            w_r = _weight("reported_weight", reported_weight)
            k = _weight("reported_count", reported_count)
            big = _weight("window_weight", window_weight)
            return self._fold(
                _sumsq("weighted_sumsq", weighted_sumsq), w_r, k, _sumsq("window_sumsq", window_sumsq), big
            )
        if applied is not None and (not isinstance(applied, Tensor) or applied.dtype != torch.bool):
            raise ValueError(f"Invalid applied: {applied!r}; expected a bool tensor (False: the step was skipped)")
        no_reports = not isinstance(reported_count, Tensor) and reported_count == 0
        w_r, k, big = (
            _device_weight(name, x, allow_zero=no_reports)
            for name, x in zip(("reported_weight", "reported_count", "window_weight"), weights)
        )
        return self._fold_on_device(
            _sumsq("weighted_sumsq", weighted_sumsq), w_r, k, _sumsq("window_sumsq", window_sumsq), big, applied
        )

    def _fold(self, s1: Number, w_r: float, k: float, window_sumsq: Number, big: float) -> bool:
        """One window whose weights are host numbers (estimability decided here)."""
        if not _solvable(w_r, k, big):
            self._unestimable = self._unestimable + 1
            return False
        g2, trace = _solve(s1, w_r, k, window_sumsq, big)
        if isinstance(g2, Tensor):
            self._ema_on_device(g2, trace, None)
            return True
        if not (_finite(g2) and _finite(trace)):
            return False
        a = self.ema
        self._g2 = a * self._g2 + (1 - a) * g2
        self._trace = a * self._trace + (1 - a) * trace
        self._n = self._n + 1
        return True

    def _fold_on_device(self, s1: Number, w_r: Number, k: Number, window_sumsq: Number, big: Number,
                        applied: Optional[Tensor]) -> Any:
        """One window whose estimability (or whose step) is known only on the device."""
        no_reports = not isinstance(k, Tensor) and k == 0
        solvable = False if no_reports else _solvable(w_r, k, big)
        if isinstance(solvable, bool) and not solvable:
            # left out, known here; it counts as left out only if its step was applied
            self._unestimable = self._unestimable + (1 if applied is None else applied)
            return False
        counted = applied if solvable is True else solvable if applied is None else applied & solvable
        if isinstance(solvable, Tensor):
            self._unestimable = self._unestimable + (~solvable if applied is None else applied & ~solvable)
        g2, trace = _solve(s1, w_r, k, window_sumsq, big)  # garbage where not solvable: masked below
        self._ema_on_device(g2, trace, counted)
        return counted

    def _ema_on_device(self, g2: Tensor, trace: Tensor, counted: Any) -> None:
        # a non-finite window (an overflowed norm), or one that does not count, is dropped by
        # a mask, not by an `if` that would need its value on the host. One isfinite for both
        # (a composite of four kernels on a GPU): inf or nan in either makes the sum non-finite,
        # and two finite estimates of squared norms do not add up to fp64's overflow.
        ok = torch.isfinite(g2 + trace)
        if counted is not None and counted is not True:
            ok = ok & counted
        a = self.ema
        self._g2 = torch.where(ok, a * self._g2 + (1 - a) * g2, self._g2)
        self._trace = torch.where(ok, a * self._trace + (1 - a) * trace, self._trace)
        self._n = self._n + ok

    # ------------------------------------------------------------------ reading (syncs)
    @property
    def windows(self) -> int:
        """Estimable windows folded in so far."""
        return int(_to_float(self._n))

    def _corrected(self) -> Optional[Tuple[float, float]]:
        n = self.windows
        if n < self.min_windows or n == 0:
            return None
        c = 1.0 - self.ema**n
        return _to_float(self._g2) / c, _to_float(self._trace) / c

    @property
    def g2(self) -> Optional[float]:
        """Smoothed estimate of ``|G|²`` (can be <= 0 when the signal is below the noise at
        these batch sizes), or None before ``min_windows`` estimable windows."""
        c = self._corrected()
        return None if c is None else c[0]

    @property
    def trace(self) -> Optional[float]:
        """Smoothed estimate of ``tr(Σ)`` per unit of weight, or None before ``min_windows``."""
        c = self._corrected()
        return None if c is None else c[1]

    @property
    def value(self) -> Optional[float]:
        """``B_simple = EMA(tr(Σ)) / EMA(|G|²)`` in units of ``weight``; None until
        ``min_windows`` estimable windows were seen, and while the smoothed ``|G|²`` is not
        positive (the gradient signal is not resolved yet). A negative smoothed trace (noise
        below resolution) reads as 0."""
        c = self._corrected()
        if c is None:
            return None
        g2, trace = c
        if not (g2 > 0 and math.isfinite(g2) and math.isfinite(trace)):
            return None
        return max(trace, 0.0) / g2

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """Plain numbers (reads tensors back once) so that a checkpoint needs no device."""
        return {
            "ema": self.ema,
            "min_windows": self.min_windows,
            "g2_ema": _to_float(self._g2),
            "trace_ema": _to_float(self._trace),
            "windows": self.windows,
            "unestimable_windows": self.unestimable_windows,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        try:
            ema = float(state["ema"])
            min_windows = int(state["min_windows"])
            g2, trace = float(state["g2_ema"]), float(state["trace_ema"])
            n, skipped = int(state["windows"]), int(state["unestimable_windows"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"Invalid noise-scale state: {e!r}; expected a dict from NoiseScaleEstimator.state_dict()") from None
        self.__init__(ema, min_windows=min_windows)  # type: ignore[misc]
        self._g2, self._trace, self._n, self.unestimable_windows = g2, trace, n, skipped

    def __repr__(self) -> str:
        return f"NoiseScaleEstimator(ema={self.ema}, windows={self.windows}, value={self.value})"
