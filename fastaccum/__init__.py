"""fastaccum: exact, fused gradient accumulation optimizers for PyTorch.

Swap ``torch.optim.AdamW(...)`` for ``fastaccum.AdamW(...)``: gradients accumulate into flat
fp32 buffers (exact for bf16/fp16 parameters too), and unscale, inf check, clipping,
token-weighted normalisation, the update and the buffer zeroing run as one or two fused
passes. See README.md for the loop styles.
"""
from . import backends
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    register_backend,
    resolve_backend,
)
from .optimizer import SGD, AccumOptimizer, Adam, AdamW
from .scaling import LossScaler

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "Adam",
    "SGD",
    "AccumOptimizer",
    "LossScaler",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "backends",
    "__version__",
]
