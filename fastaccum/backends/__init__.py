"""Backend registry.

A backend registers a *loader*: a callable that imports whatever it needs and returns a
:class:`~fastaccum.backends.base.Backend`, or raises ``ImportError``/``RuntimeError`` with
the reason it cannot run here. Adding a backend touches nothing in the optimizer.

Resolution (:func:`resolve_backend`):

* ``"auto"`` (or ``None``): ``FASTACCUM_BACKEND`` wins when set (and is then treated as an
  explicit request); otherwise the highest-priority registered backend whose loader works
  and which supports the device. A loader that fails is skipped, logged once per device type
  (with the reason and the backend used instead): at INFO when the backend is not installed
  (its loader raised ``ModuleNotFoundError``), as a warning when it is installed but broken.
  ``torch`` supports every device, so ``auto`` always finds one.
* an explicit name: that backend, or :class:`BackendUnavailableError` with the reason.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .base import AdamHyper, AdamSegments, Backend, SGDHyper, SGDSegments, hyper_kwargs

__all__ = [
    "Backend",
    "AdamSegments",
    "AdamHyper",
    "SGDSegments",
    "SGDHyper",
    "hyper_kwargs",
    "BackendUnavailableError",
    "register_backend",
    "get_backend",
    "resolve_backend",
    "available_backends",
    "registered_backends",
]

logger = logging.getLogger("fastaccum")

ENV_VAR = "FASTACCUM_BACKEND"


class BackendUnavailableError(ValueError):
    """An explicitly requested backend is unknown or cannot run here."""


@dataclass
class _Entry:
    name: str
    loader: Callable[[], Backend]
    device_types: Sequence[str]
    priority: int
    instance: Optional[Backend] = None
    error: Optional[BaseException] = None


_REGISTRY: Dict[str, _Entry] = {}
_logged_fallbacks: set = set()


def register_backend(
    name: str, loader: Callable[[], Backend], *, device_types: Sequence[str], priority: int = 0
) -> None:
    """Register (or replace) a backend. Higher ``priority`` is preferred by ``auto``."""
    _REGISTRY[name] = _Entry(name, loader, tuple(device_types), priority)


def registered_backends() -> List[str]:
    return sorted(_REGISTRY)


def _load(entry: _Entry) -> Backend:
    if entry.instance is None and entry.error is None:
        try:
            entry.instance = entry.loader()
        except (ImportError, RuntimeError, OSError) as e:  # a broken optional backend never breaks import
            entry.error = e
    if entry.error is not None:
        raise BackendUnavailableError(f"fastaccum backend {entry.name!r} is unavailable: {entry.error}") from entry.error
    assert entry.instance is not None
    return entry.instance


def get_backend(name: str, device: Union[str, torch.device, None] = None) -> Backend:
    """The backend called ``name``; raises :class:`BackendUnavailableError` with the reason if it cannot run."""
    if name not in _REGISTRY:
        raise BackendUnavailableError(
            f"unknown fastaccum backend {name!r}; choose one of {['auto', *registered_backends()]}"
        )
    entry = _REGISTRY[name]
    backend = _load(entry)
    if device is not None:
        device = torch.device(device)
        if not backend.supports(device):
            raise BackendUnavailableError(
                f"fastaccum backend {name!r} does not run on {device.type} tensors "
                f"(it supports {list(entry.device_types)}); use backend='auto' or 'torch'"
            )
    return backend


def resolve_backend(requested: Optional[str], device: Union[str, torch.device]) -> Backend:
    """Pick the backend for tensors on ``device`` (see the module docstring)."""
    device = torch.device(device)
    if requested in (None, "auto"):
        env = os.environ.get(ENV_VAR, "").strip()
        if env and env != "auto":
            return get_backend(env, device)
        skipped: List[Tuple[_Entry, BackendUnavailableError]] = []
        for entry in sorted(_REGISTRY.values(), key=lambda e: -e.priority):
            if device.type not in entry.device_types:
                continue
            try:
                backend = get_backend(entry.name, device)
            except BackendUnavailableError as e:
                skipped.append((entry, e))
                continue
            for skipped_entry, e in skipped:
                _log_fallback(skipped_entry, e, device, backend.name)
            return backend
        raise BackendUnavailableError(f"no fastaccum backend runs on {device.type} tensors")
    return get_backend(requested, device)


def _log_fallback(entry: _Entry, error: BackendUnavailableError, device: torch.device, used: str) -> None:
    """Say once per (backend, device type) that ``auto`` passed a faster backend over: at INFO when
    it is not installed (its loader raised ``ModuleNotFoundError``, itself or as the cause: not built,
    not wanted, FASTACCUM_NO_EXT=1), as a WARNING when it is installed but fails to load (a stale or
    broken build), since that is a slower run nobody asked for."""
    key = (entry.name, device.type)
    if key in _logged_fallbacks:
        return
    _logged_fallbacks.add(key)
    cause = entry.error
    missing = isinstance(cause, ModuleNotFoundError) or isinstance(getattr(cause, "__cause__", None),
                                                                   ModuleNotFoundError)
    logger.log(
        logging.INFO if cause is None or missing else logging.WARNING,
        "fastaccum: backend=%r on %s tensors uses %r instead of %r: %s",
        "auto", device.type, used, entry.name, error,
    )


def available_backends(device: Union[str, torch.device, None] = None) -> List[str]:
    """Names of the backends that load here (and run on ``device``, when given), best first."""
    out = []
    for entry in sorted(_REGISTRY.values(), key=lambda e: -e.priority):
        try:
            get_backend(entry.name, device)
        except BackendUnavailableError:
            continue
        out.append(entry.name)
    return out


def _load_torch() -> Backend:
    from .torch_backend import TorchBackend

    return TorchBackend()


def _load_cpu() -> Backend:
    from .cpu.backend import CpuBackend  # raises ImportError with the reason when the extension is missing

    return CpuBackend()


def _load_triton() -> Backend:
    from .triton_backend import TritonBackend  # raises ImportError with the reason when triton is missing

    return TritonBackend()


register_backend("torch", _load_torch, device_types=("cpu", "cuda", "mps", "xpu", "meta"), priority=0)
register_backend("cpu", _load_cpu, device_types=("cpu",), priority=10)
register_backend("triton", _load_triton, device_types=("cuda",), priority=20)
