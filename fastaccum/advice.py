"""What the measured gradient noise scale says about the batch size, in one line.

Two papers, one question ("is my accumulation worth it?"):

* McCandlish et al. 2018 (https://arxiv.org/abs/1812.06162): at batch ``B`` and noise scale
  ``B_noise``, training needs about ``1 + B/B_noise`` times the minimum number of examples
  and ``1 + B_noise/B`` times the minimum number of steps. Far above the noise scale, a
  bigger batch buys almost no fewer steps and costs proportionally more data.
* Marek et al. 2025 (https://arxiv.org/abs/2507.07101): on one device, train at the batch
  that fits without accumulation and keep Adam's β2 half-life fixed in tokens
  (:func:`fastaccum.batch_scaling.scale_betas`).

:func:`assess` turns a stats dict (what an optimizer or a training loop can report) into an
:class:`Advice`; :func:`advise` returns its one-line message. Both are pure functions. The
batch numbers (``effective_batch``, ``noise_scale``, ``micro_batch_weight``) must be in the
same unit -- the unit of the ``weight=`` passed to backward (tokens with
``weight=n_tokens``).

This module imports only ``math``, ``typing``, ``torch`` (through batch_scaling) and
fastaccum's own batch_scaling.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from .batch_scaling import scale_betas

__all__ = [
    "Advice",
    "assess",
    "advise",
    "NOT_ENOUGH_DATA",
    "ABOVE_NOISE_SCALE",
    "NEAR_NOISE_SCALE",
    "BELOW_NOISE_SCALE",
    "REQUIRED_KEYS",
]

NOT_ENOUGH_DATA = "not_enough_data"
ABOVE_NOISE_SCALE = "above_noise_scale"  # effective batch far above: accumulation wasteful
NEAR_NOISE_SCALE = "near_noise_scale"
BELOW_NOISE_SCALE = "below_noise_scale"  # a larger batch would still cut the steps

REQUIRED_KEYS = ("grad_norm", "loss_scale", "skipped_steps", "effective_batch", "noise_scale")


class Advice(NamedTuple):
    """Structured result of :func:`assess` (all batch numbers in units of ``weight``)."""

    verdict: str  # one of NOT_ENOUGH_DATA, ABOVE_NOISE_SCALE, NEAR_NOISE_SCALE, BELOW_NOISE_SCALE
    message: str  # one line, with the numbers
    effective_batch: Optional[float]
    noise_scale: Optional[float]
    ratio: Optional[float]  # effective_batch / noise_scale (inf when the noise scale is 0)
    data_factor: Optional[float]  # 1 + B/B_noise: examples used / minimum (McCandlish)
    step_factor: Optional[float]  # 1 + B_noise/B: steps taken / minimum
    suggested_batch: Optional[float]  # the batch the message recommends, if any
    suggested_accumulation_steps: Optional[int]
    suggested_betas: Optional[Tuple[float, float]]  # betas rescaled to suggested_batch
    notes: Tuple[str, ...]  # health remarks: skipped steps, non-finite norm


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _number(stats: Mapping[str, Any], key: str, *, allow_none: bool, positive: bool = False) -> Optional[float]:
    v = stats.get(key)
    if v is None:
        if allow_none:
            return None
        raise ValueError(f"Invalid stats[{key!r}]: None; expected a number")
    if isinstance(v, bool):
        raise ValueError(f"Invalid stats[{key!r}]: {v!r}; expected a number")
    if hasattr(v, "item"):  # a 0-dim tensor or numpy scalar
        v = v.item()
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"Invalid stats[{key!r}]: {v!r} ({type(v).__name__}); expected a number") from None
    if positive and not (x > 0 and math.isfinite(x)):
        raise ValueError(f"Invalid stats[{key!r}]: {v!r}; expected a finite number > 0")
    return x


def _health(stats: Mapping[str, Any]) -> Tuple[str, ...]:
    notes = []
    skipped = _number(stats, "skipped_steps", allow_none=True) or 0.0
    scale = _number(stats, "loss_scale", allow_none=True)
    gnorm = _number(stats, "grad_norm", allow_none=True)
    if skipped > 0:
        s = f"{int(skipped)} update(s) skipped for inf/nan gradients"
        if scale is not None:
            s += f" (loss scale now {scale:g})"
        notes.append(s)
    if gnorm is not None and not math.isfinite(gnorm):
        notes.append(f"last gradient norm is {gnorm}")
    return tuple(notes)


def assess(stats: Any, *, far: float = 2.0) -> Advice:
    """Compare the effective batch with the measured noise scale.

    ``stats``: a dict, or a fastaccum optimizer (its ``stats()`` is called; pass
    ``track_noise_scale=True`` to it for the noise scale). Keys (required; a value may be None where unknown): ``grad_norm``,
    ``loss_scale``, ``skipped_steps``, ``effective_batch`` (weight sum of the last window),
    ``noise_scale`` (None until estimable). Optional: ``micro_batch_weight`` (weight of one
    micro-batch; default ``effective_batch / accumulation_steps``), ``accumulation_steps``,
    ``betas`` (the ``(β1, β2)`` in use, taken as tuned at ``effective_batch``).

    The verdict is ABOVE_NOISE_SCALE when ``effective_batch > far · noise_scale``,
    BELOW_NOISE_SCALE when ``effective_batch < noise_scale / far``, NEAR_NOISE_SCALE in
    between, NOT_ENOUGH_DATA while either number is unknown.
    """
    if not isinstance(stats, Mapping) and callable(getattr(stats, "stats", None)):
        stats = stats.stats()  # a fastaccum optimizer (duck-typed: this module sits below it)
    if not isinstance(stats, Mapping):
        raise ValueError(f"Invalid stats: {type(stats).__name__}; expected a dict with keys {', '.join(REQUIRED_KEYS)} "
                         "or a fastaccum optimizer (anything with a stats() method returning one)")
    missing = [k for k in REQUIRED_KEYS if k not in stats]
    if missing:
        raise ValueError(
            f"Invalid stats: missing key(s) {', '.join(missing)}; pass None for a number not known yet"
        )
    if not (isinstance(far, (int, float)) and far > 1 and math.isfinite(far)):
        raise ValueError(f"Invalid far: {far!r}; expected a finite factor > 1, e.g. 2.0")
    notes = _health(stats)
    big = _number(stats, "effective_batch", allow_none=True)
    noise = _number(stats, "noise_scale", allow_none=True)
    acc_raw = _number(stats, "accumulation_steps", allow_none=True, positive=True)
    acc = None if acc_raw is None else int(acc_raw)
    micro = _number(stats, "micro_batch_weight", allow_none=True, positive=True)
    betas = stats.get("betas")
    if big is not None and not (big > 0 and math.isfinite(big)):
        big = None  # no window yet
    if micro is None and big is not None and acc:
        micro = big / acc
    if noise is not None and (math.isnan(noise) or noise < 0):
        raise ValueError(f"Invalid stats['noise_scale']: {noise}; expected None or a number >= 0")

    def done(verdict: str, text: str, **kw: Any) -> Advice:
        fields = dict(
            effective_batch=big, noise_scale=noise, ratio=None, data_factor=None, step_factor=None,
            suggested_batch=None, suggested_accumulation_steps=None, suggested_betas=None,
        )
        fields.update(kw)
        line = "; ".join((text,) + notes)
        return Advice(verdict=verdict, message=line, notes=notes, **fields)  # type: ignore[arg-type]

    if big is None or noise is None:
        if big is None:
            why = "no accumulation window finished yet"
        elif acc == 1:
            why = ("the noise scale needs two batch sizes, i.e. accumulation_steps >= 2 (or a per-rank "
                   "and a global norm under data parallelism)")
        else:
            why = "the gradient noise scale is not estimable yet (needs a few windows with the signal resolved)"
        return done(NOT_ENOUGH_DATA, f"not enough data for batch-size advice: {why}")

    ratio = math.inf if noise == 0 else big / noise
    data_factor = 1 + ratio
    step_factor = math.inf if big == 0 else 1 + noise / big
    head = (f"effective batch {_fmt(big)} is {_fmt(ratio)}x the measured gradient noise scale {_fmt(noise)}")
    cost = (f"McCandlish et al. 2018: ~{_fmt(data_factor)}x the minimum data for ~{_fmt(step_factor)}x "
            "the minimum steps")
    nums = dict(ratio=ratio, data_factor=data_factor, step_factor=step_factor)

    def betas_for(target: float) -> Tuple[Optional[Tuple[float, float]], str]:
        if betas is None:
            return None, ""
        new = scale_betas(tuple(betas), big, target)
        return new, f", beta2 {float(betas[1]):.6g} -> {new[1]:.6g} (scale_betas: same token half-life)"

    if ratio > far:
        if acc is not None and acc > 1 and micro is not None:
            new_betas, b_txt = betas_for(micro)
            text = (f"{head} ({cost}): accumulation is wasteful here -- per Marek et al. 2025 train at the "
                    f"micro-batch that fits ({_fmt(micro)}) without accumulation{b_txt}, and re-tune the "
                    "learning rate")
            if micro > far * noise:
                text += f"; even one micro-batch is {_fmt(micro / noise)}x the noise scale"
            return done(ABOVE_NOISE_SCALE, text, suggested_batch=micro, suggested_accumulation_steps=1,
                        suggested_betas=new_betas, **nums)
        # no accumulation to drop: the batch itself is too big; the critical batch is ~B_noise
        target = noise
        if target <= 0:
            return done(ABOVE_NOISE_SCALE, f"{head} ({cost}): a smaller batch would use data more efficiently",
                        **nums)
        new_betas, b_txt = betas_for(target)
        return done(ABOVE_NOISE_SCALE,
                    f"{head} ({cost}): a smaller batch, down to ~{_fmt(target)}, would use data more "
                    f"efficiently{b_txt}", suggested_batch=target, suggested_betas=new_betas, **nums)
    if ratio < 1 / far:
        sugg_acc = None
        if micro:
            sugg_acc = max(1, math.ceil(noise / micro))
            target = micro * sugg_acc
            how = f" (accumulation_steps={sugg_acc} at micro-batch {_fmt(micro)})"
        else:
            target, how = noise, ""
        new_betas, b_txt = betas_for(target)
        return done(BELOW_NOISE_SCALE,
                    f"{head} ({cost}): updates are noise-dominated; a larger batch, up to ~{_fmt(target)}"
                    f"{how}, would still cut the number of steps nearly in proportion{b_txt}",
                    suggested_batch=target, suggested_accumulation_steps=sugg_acc, suggested_betas=new_betas,
                    **nums)
    return done(NEAR_NOISE_SCALE,
                f"{head} ({cost}): the batch is near the critical batch, a good balance of steps and data",
                **nums)


def advise(stats: Any, *, far: float = 2.0) -> str:
    """One line of batch-size advice from ``stats`` or an optimizer (see :func:`assess`)."""
    return assess(stats, far=far).message
