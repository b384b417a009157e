"""Effective batch size and the β2 rule that keeps Adam's second-moment half-life fixed in tokens.

Marek et al. 2025, "Small Batch Size Training for Language Models: When Vanilla SGD Works,
and Why Gradient Accumulation Is Wasteful" (https://arxiv.org/abs/2507.07101): when the batch
changes from ``B`` to ``B*`` sequences (of ``T`` and ``T*`` tokens), hold the *half-life of
exp_avg_sq measured in tokens* fixed instead of β2 itself. One optimizer step consumes
``B·T`` tokens and an EMA with decay β forgets half of its past after ``ln(1/2)/ln(β)``
steps, so the half-life in tokens is ``B·T·ln(1/2)/ln(β)``; equating it for both batches
gives

    β* = β ** (B*·T* / (B·T)).

Going down from batch 512 at β2 = 0.95 to batch 1 gives β2 ≈ 0.9999; from batch 16 at 0.95
to batch 1 gives ≈ 0.997. The same paper recommends, on one device, training at the batch
that fits without accumulation and rescaling β2 this way.

This module imports only ``math``, ``typing`` and ``torch`` so that the optimizer, the tools
and the examples can all use it without import cycles.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "effective_batch_size",
    "scale_betas",
    "halflife_tokens",
    "beta_for_halflife",
]

_LN_HALF = math.log(0.5)


def _positive_int(name: str, value: object) -> int:
    # bool is an int subclass; True as a batch size is a bug, not a 1
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"Invalid {name}: {value!r} ({type(value).__name__}); expected a positive integer, e.g. {name}=8"
        )
    if value < 1:
        raise ValueError(f"Invalid {name}: {value}; it must be a positive integer (>= 1)")
    return value


def _positive_real(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected a positive number")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor with {value.numel()} elements; expected one number")
        value = value.item()
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} ({type(value).__name__}); expected a positive number") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number > 0")
    return x


def _beta(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r}; expected a number in [0, 1)")
    try:
        b = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} ({type(value).__name__}); expected a number in [0, 1)") from None
    if not (0.0 <= b < 1.0):
        raise ValueError(f"Invalid {name}: {value!r}; it must be in [0, 1) (an EMA decay rate, e.g. 0.999)")
    return b


def _dist_world_size() -> int:
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def effective_batch_size(micro_batch: int, accumulation_steps: int, world_size: Optional[int] = None) -> int:
    """``micro_batch × accumulation_steps × world_size``: the batch one optimizer update sees.

    ``micro_batch`` is per device and per forward/backward (sequences, samples or tokens: the
    result is in the same unit). ``world_size=None`` reads it from ``torch.distributed`` when a
    process group is initialised, else 1 (data-parallel replicas: every rank contributes a
    micro-batch to each accumulation step).

    Raises ``ValueError`` naming the argument for a non-integer or non-positive input.
    """
    mb = _positive_int("micro_batch", micro_batch)
    acc = _positive_int("accumulation_steps", accumulation_steps)
    ws = _dist_world_size() if world_size is None else _positive_int("world_size", world_size)
    return mb * acc * ws


def scale_betas(
    betas: Sequence[float],
    from_batch: float,
    to_batch: float,
    *,
    from_seq_len: Optional[float] = None,
    to_seq_len: Optional[float] = None,
    scale_beta1: bool = False,
    min_beta2: Optional[float] = None,
    max_beta2: Optional[float] = None,
) -> Tuple[float, float]:
    """Rescale Adam's ``(β1, β2)`` tuned at ``from_batch`` for ``to_batch`` (Marek et al. 2025).

    ``β* = β ** (to_batch·to_seq_len / (from_batch·from_seq_len))``: the half-life of the
    EMA, counted in tokens, is the same before and after. Batches may be counted in sequences
    (then pass both ``*_seq_len`` when they differ) or directly in tokens (leave both
    ``*_seq_len`` out). Only β2 is rescaled unless ``scale_beta1=True``: the paper's rule is
    about β2; rescaling β1 the same way keeps the momentum's token half-life fixed too. ``min_beta2`` / ``max_beta2`` clamp the rescaled
    β2 (e.g. ``max_beta2=0.9999`` to keep some adaptivity at batch 1).

    Returns ``(β1, β2)`` as a tuple of floats. β = 0 stays 0 (no averaging at any batch).

    Raises ``ValueError`` naming the argument for betas outside [0, 1) or not a pair, a
    non-positive batch or sequence length, a sequence length given on one side only, or
    ``min_beta2 > max_beta2``.
    """
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r}; expected a pair (beta1, beta2), e.g. (0.9, 0.95)")
    b1 = _beta("betas[0]", betas[0])
    b2 = _beta("betas[1]", betas[1])
    fb = _positive_real("from_batch", from_batch)
    tb = _positive_real("to_batch", to_batch)
    if (from_seq_len is None) != (to_seq_len is None):
        given, missing = ("from_seq_len", "to_seq_len") if to_seq_len is None else ("to_seq_len", "from_seq_len")
        raise ValueError(
            f"Invalid {missing}: None while {given} is set; pass both sequence lengths (batches in "
            "sequences of different lengths) or neither (batches already in tokens, or same length)"
        )
    fs = 1.0 if from_seq_len is None else _positive_real("from_seq_len", from_seq_len)
    ts = 1.0 if to_seq_len is None else _positive_real("to_seq_len", to_seq_len)
    lo = None if min_beta2 is None else _beta("min_beta2", min_beta2)
    hi = None if max_beta2 is None else _beta("max_beta2", max_beta2)
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"Invalid min_beta2/max_beta2: min_beta2={lo} > max_beta2={hi}")

    ratio = (tb * ts) / (fb * fs)  # tokens per step after / before
    new_b2 = b2 ** ratio
    if lo is not None:
        new_b2 = max(new_b2, lo)
    if hi is not None:
        new_b2 = min(new_b2, hi)
    new_b1 = b1 ** ratio if scale_beta1 else b1
    return (float(new_b1), float(new_b2))


def halflife_tokens(beta: float, tokens_per_step: float) -> float:
    """Tokens after which an EMA with decay ``beta``, fed ``tokens_per_step`` tokens per
    update, has halved the weight of what it saw: ``tokens_per_step · ln(1/2) / ln(beta)``.

    ``beta = 0`` gives 0 (nothing is remembered past the current step). Inverse of
    :func:`beta_for_halflife`.
    """
    b = _beta("beta", beta)
    t = _positive_real("tokens_per_step", tokens_per_step)
    if b == 0.0:
        return 0.0
    return t * _LN_HALF / math.log(b)


def beta_for_halflife(halflife_tokens: float, tokens_per_step: float) -> float:
    """The EMA decay whose half-life is ``halflife_tokens`` at ``tokens_per_step`` tokens per
    update: ``0.5 ** (tokens_per_step / halflife_tokens)``. Inverse of :func:`halflife_tokens`."""
    h = _positive_real("halflife_tokens", halflife_tokens)
    t = _positive_real("tokens_per_step", tokens_per_step)
    return 0.5 ** (t / h)
