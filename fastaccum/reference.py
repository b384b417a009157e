"""The update math, once, in plain fp32 PyTorch.

Every backend is tested against these functions, and the ``torch`` backend is built from
them. They follow the single-tensor code paths of ``torch.optim.Adam``/``AdamW``/``SGD``
operation by operation, so that with fp32 parameters the results match ``torch.optim`` to
the last few ulps (see ``tests/test_parity.py``).

All tensors passed in are fp32 and of the same shape. ``grad`` is the *raw* accumulated
buffer; ``grad_multiplier`` is the single multiplier that turns it into the gradient the user
means: ``1 / (loss_scale * weight_sum) * clip_coef``. Folding it into the update is what
saves the separate unscale / normalise / clip passes.

These functions are MPS-safe: no float64, no device-specific ops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "adam_math",
    "sgd_math",
    "stochastic_round_",
    "write_back_",
]


def adam_math(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Optional[Tensor],
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
    grad_multiplier: float,
) -> None:
    """One Adam/AdamW step on fp32 tensors, in place (``step`` already incremented)."""
    g = grad if grad_multiplier == 1.0 else grad * grad_multiplier
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * weight_decay)
        else:
            g = g.add(param, alpha=weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    if max_exp_avg_sq is not None:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    else:
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def sgd_math(
    param: Tensor,
    grad: Tensor,
    momentum_buffer: Optional[Tensor],
    *,
    first_step: bool,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    grad_multiplier: float,
) -> None:
    """One SGD(+momentum) step on fp32 tensors, in place.

    ``momentum_buffer`` is preallocated; on the first step it is set to the gradient
    (torch creates it as ``clone(grad)``, without dampening).
    """
    g = grad if grad_multiplier == 1.0 else grad * grad_multiplier
    if maximize:
        g = -g
    if weight_decay != 0:
        g = g.add(param, alpha=weight_decay)
    if momentum != 0:
        assert momentum_buffer is not None
        if first_step:
            momentum_buffer.copy_(g)
        else:
            momentum_buffer.mul_(momentum).add_(g, alpha=1 - dampening)
        g = g.add(momentum_buffer, alpha=momentum) if nesterov else momentum_buffer
    param.add_(g, alpha=-lr)


def stochastic_round_(dst: Tensor, src: Tensor, generator: Optional[torch.Generator] = None) -> None:
    """Write fp32 ``src`` into bf16 ``dst`` with stochastic rounding.

    Adding 16 uniform random bits below the bf16 mantissa and truncating rounds up with
    probability equal to the distance to the lower neighbour, so E[dst] == src: small
    updates that round-to-nearest would drop accumulate correctly on average
    (Gupta et al. 2015, https://arxiv.org/abs/1502.02551). Pure int32 ops, MPS-safe.
    """
    bits = src.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    # -65536 == 0xFFFF0000 as int32: clear the 16 bits bf16 does not keep.
    rounded = (bits + noise).bitwise_and_(-65536).view(torch.float32)
    # A NaN must stay NaN whatever its payload: 0x7FFFFFFF (the NaN CUDA produces) plus
    # noise wraps to -0.0, and a payload only in the low 16 bits truncates to inf.
    rounded = torch.where(src.reshape(rounded.shape).isnan(), src.reshape(rounded.shape), rounded)
    dst.copy_(rounded.view_as(dst))


def write_back_(dst: Tensor, src: Tensor, stochastic: bool) -> None:
    """Store fp32 ``src`` into ``dst`` (fp32/bf16/fp16): exact, nearest-even, or stochastic (bf16 only)."""
    if stochastic and dst.dtype == torch.bfloat16:
        stochastic_round_(dst, src)
    else:
        dst.copy_(src)
