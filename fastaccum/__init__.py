"""fastaccum: exact, fused gradient accumulation optimizers for PyTorch.

Swap ``torch.optim.AdamW(...)`` for ``fastaccum.AdamW(...)``: gradients accumulate into flat
fp32 buffers (exact for bf16/fp16 parameters too), and unscale, inf check, clipping,
token-weighted normalisation and the update run as one or two fused passes (the buffer is
never zeroed: consumed segments go stale and the next gradient overwrites them). See
README.md for the loop styles and ARCHITECTURE.md for the layout.

This module holds the public names only.
"""
from . import backends
from .backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    register_backend,
    resolve_backend,
)
from .adam import Adam, AdamW
from .advice import Advice, advise, assess
from .batch_scaling import beta_for_halflife, effective_batch_size, halflife_tokens, scale_betas
from .buffers import GradView, batched_fold_cap
from .noise_scale import NoiseScaleEstimator
from .distributed import ddp_comm_hook
from .optimizer import AccumOptimizer
from .sgd import SGD
from .scaling import LossScaler

__version__ = "0.1.0"

__all__ = [
    "AdamW",
    "Adam",
    "SGD",
    "AccumOptimizer",
    "ddp_comm_hook",
    "GradView",
    "batched_fold_cap",
    "LossScaler",
    "effective_batch_size",
    "scale_betas",
    "halflife_tokens",
    "beta_for_halflife",
    "NoiseScaleEstimator",
    "Advice",
    "advise",
    "assess",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "register_backend",
    "resolve_backend",
    "backends",
    "__version__",
]
