"""Argument checks shared by the optimizers: each names the argument and says how to fix it.

They run before anything changes, so a refused argument leaves parameters and state as
they were.
"""
from __future__ import annotations

import math
from numbers import Number
from typing import Any, Tuple

from torch import Tensor


def is_number(x: Any) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool)


def as_float(name: str, value: Any) -> float:
    """``value`` as a Python float; a one-element tensor is read (a host sync on a GPU)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element, got shape {tuple(value.shape)}")
        return float(value.item())
    if not is_number(value):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} ({value!r})")
    return float(value)


def device_lr(lr: Any) -> Any:
    """The lr for a bucket kernel: a tensor stays one (the kernel reads it on the device), else a float."""
    return lr if isinstance(lr, Tensor) else as_float("lr", lr)


def check_scalar_tensor(name: str, value: Tensor) -> None:
    """What the host can check of a tensor hyper-parameter without reading it."""
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"Invalid {name}: a tensor {name} must be one floating-point number, "
                         f"got shape {tuple(value.shape)} {value.dtype}")


def check_nonneg(name: str, value: Any) -> float:
    v = as_float(name, value)
    if not (v >= 0.0) or math.isinf(v):  # `not >=` also rejects NaN
        raise ValueError(f"Invalid {name}: {v}; it must be a finite number >= 0")
    return v


def check_betas(betas: Any) -> Tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {betas!r}; pass two numbers (beta1, beta2) in [0, 1)") from None
    b1, b2 = as_float("betas[0]", b1), as_float("betas[1]", b2)
    for k, b in ((0, b1), (1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {k}: {b}; betas must be in [0, 1)")
    return b1, b2
