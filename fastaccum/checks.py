"""Argument checks shared by the optimizers: each names the argument and says how to fix it.

They run before anything changes, so a refused argument leaves parameters and state as
they were.
"""
from __future__ import annotations

import difflib
import functools
import inspect
import math
from numbers import Number, Real
from typing import Any, Callable, Tuple, TypeVar

import torch
from torch import Tensor

_F = TypeVar("_F", bound=Callable[..., Any])


def is_number(x: Any) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)


def as_float(name: str, value: Any) -> float:
    """``value`` as a Python float; a one-element tensor is read (a host sync on a GPU)."""
    t = type(value)
    if t is float or t is int:  # the common case first: every step checks its hyper-parameters
        return float(value)
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element, got shape {tuple(value.shape)}")
        if value.is_complex() or not (value.is_floating_point() or value.dtype in _INT_DTYPES):
            raise TypeError(f"Invalid {name}: expected a real number, got a {value.dtype} tensor")
        if value.is_meta:
            raise ValueError(f"Invalid {name}: a tensor on the meta device has no value; pass a number or a "
                             "tensor on a real device")
        return float(value.item())
    if isinstance(value, Number) and not isinstance(value, (Real, bool)):
        raise TypeError(f"Invalid {name}: expected a real number, got {type(value).__name__} ({value!r})")
    if not is_number(value):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} ({value!r})")
    return float(value)


_INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)

# torch.optim's wording where it has one, so that code matching its messages keeps working
_TORCH_NAMES = {"lr": "Invalid learning rate", "eps": "Invalid epsilon value"}


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
        what = _TORCH_NAMES.get(name, f"Invalid {name} value")
        raise ValueError(f"{what}: {value}; {name} must be a finite number >= 0")
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


def check_tensor_lr(lr: Any, foreach: Any = None) -> None:
    """torch.optim's rules for a Tensor ``lr`` (its wording)."""
    if isinstance(lr, Tensor):
        if foreach:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")


def check_tensor_betas(betas: Any, foreach: Any = None) -> None:
    """torch.optim.Adam's rules for Tensor betas (its wording)."""
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        return  # check_betas names the problem
    if isinstance(b1, Tensor) or isinstance(b2, Tensor):
        if not (isinstance(b1, Tensor) and isinstance(b2, Tensor)):
            raise ValueError("betas must be either both floats or both Tensors")
        if foreach:
            raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")
        for k, b in enumerate((b1, b2)):
            if b.numel() != 1:
                raise ValueError(f"Tensor betas[{k}] must be 1-element")


def suggest_keywords(init: _F) -> _F:
    """Decorate a constructor so that a misspelled keyword argument is refused as Python
    refuses it (``AdamW.__init__() got an unexpected keyword argument 'accumulation_step'``),
    plus the closest argument name when there is one. The signature is unchanged
    (``inspect.signature`` follows ``__wrapped__``), and nothing runs before the check.
    """
    params = inspect.signature(init).parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)][1:]  # no self
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return init
    known = frozenset(named)

    @functools.wraps(init)
    def checked(self: Any, *args: Any, **kwargs: Any) -> Any:
        for key in kwargs:
            if key not in known:
                msg = f"{init.__qualname__}() got an unexpected keyword argument {key!r}"
                close = difflib.get_close_matches(key, named, n=1)
                raise TypeError(msg + (f"; did you mean {close[0]!r}?" if close else ""))
        return init(self, *args, **kwargs)

    return checked  # type: ignore[return-value]
