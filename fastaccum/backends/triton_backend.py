"""The ``triton`` backend: fused Triton kernels for CUDA/ROCm tensors.

Each kernel is one pass over memory. The update kernel reads the raw fp32 gradient, the
moments and the fp32 master (or the parameter), applies the one gradient multiplier
(unscale x normalise x clip), the math of :mod:`fastaccum.reference` in fp32, writes the
moments, the master and the rounded parameter: Apex's fused Adam plus the unscale and
normalisation it leaves to separate passes. The gradient is only read (the optimizer
marks it stale instead of zeroing it).

Two ways in. The optimizer's step runs the *bucket* kernels of
:mod:`~fastaccum.backends.triton_kernels` (``device_resident = True``): one launch per bucket
per pass, every decision (norm, skip, clip, loss scale, step counts) made on the device, so a
step never waits for the GPU. The per-segment methods of the :class:`Backend` contract
(``adam_``/``sgd_`` below, one launch per parameter) remain for step-in-backward, where one
parameter is updated at a time from its own gradient.

Tested on CPU tensors under ``TRITON_INTERPRET=1`` (the Triton interpreter), where
``supports()`` also accepts CPU tensors when the backend is requested by name; ``auto``
only ever picks it for CUDA tensors.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .base import AdamHyper, AdamSegments, Backend, SGDHyper, SGDSegments

try:
    import triton
    import triton.language as tl
except ImportError as e:  # the registry reports the reason when triton is asked for by name
    raise ImportError(f"the triton backend needs the triton package ({e}); pip install triton") from e

_BLOCK = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _sumsq_kernel(buf_ptr, partial_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(buf_ptr + offs, mask=offs < n, other=0.0)
    # inf/nan propagate into the block sum: the norm pass is the inf check
    tl.store(partial_ptr + tl.program_id(0), tl.sum(x * x, axis=0))


# How a kernel stores an fp32 value into a tensor (a constexpr per tensor).
_PLAIN, _BF16_RNE, _BF16_SR = 0, 1, 2


@triton.jit
def _round_store(ptr, offs, mask, x, seed, MODE: tl.constexpr):
    """Store fp32 ``x`` into ``ptr``'s dtype.

    bf16 is rounded with integer ops on the fp32 bits, to nearest-even (the cast's rounding
    is not the same everywhere: Triton's interpreter truncates) or stochastically
    (see reference.stochastic_round_); the final cast is then exact.
    """
    # A NaN stays NaN whatever its payload (0x7FFFFFFF + the rounding bias wraps to -0.0):
    # it is stored as the canonical quiet NaN 0x7FC00000, as the cast does.
    if MODE == 1:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        x = tl.where(x != x, 0x7FC00000, bits).to(tl.float32, bitcast=True)
    elif MODE == 2:
        bits = x.to(tl.int32, bitcast=True)
        noise = (tl.randint(seed, offs) & 0xFFFF).to(tl.int32)
        x = tl.where(x != x, 0x7FC00000, (bits + noise) & -65536).to(tl.float32, bitcast=True)
    tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


def _mode(t: Tensor, stochastic: bool) -> int:
    if t.dtype != torch.bfloat16:
        return _PLAIN
    return _BF16_SR if stochastic else _BF16_RNE


@triton.jit
def _load_grad_param(g_ptr, p_ptr, master_ptr, offs, mask, grad_multiplier, MAXIMIZE: tl.constexpr,
                     HAS_MASTER: tl.constexpr):
    """The gradient the user means (raw buffer x the one multiplier) and the fp32 weights."""
    g = tl.load(g_ptr + offs, mask=mask, other=0.0) * grad_multiplier
    if MAXIMIZE:
        g = g * -1.0  # Triton <= 3.6 lowers -g to 0 - g: +0.0 for -0.0 (see triton_kernels' docstring)
    if HAS_MASTER:
        p = tl.load(master_ptr + offs, mask=mask, other=0.0)
    else:
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return g, p


@triton.jit
def _store_param(p_ptr, master_ptr, offs, mask, p, seed, HAS_MASTER: tl.constexpr, P_MODE: tl.constexpr):
    """Write the master and the (rounded) parameter. The gradient is left as it is: the
    optimizer marks it stale and the next window overwrites it."""
    if HAS_MASTER:
        tl.store(master_ptr + offs, p, mask=mask)
    _round_store(p_ptr, offs, mask, p, seed, P_MODE)


@triton.jit
def _adam_kernel(
    p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, master_ptr, n,
    lerp_weight, beta2, one_minus_beta2, eps, weight_decay, decay_factor, grad_multiplier, step_size, bc2_sqrt,
    seed, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MASTER: tl.constexpr,
    P_MODE: tl.constexpr, S_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g, p = _load_grad_param(g_ptr, p_ptr, master_ptr, offs, mask, grad_multiplier, MAXIMIZE, HAS_MASTER)
    if DECOUPLED:
        p = p * decay_factor
    else:
        g = g + weight_decay * p
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # torch's lerp(m, g, w): two formulas, by the side of 0.5 the weight is on. 1 - beta1,
    # 1 - beta2 and 1 - lr * wd come from the host (fp64, rounded once), as torch's scalar
    # operands do: computed here from fp32 arguments they are off by an ulp of the weight,
    # which on the GPU cost 3x the torch backend's error in the moments
    w1 = lerp_weight
    if w1 < 0.5:
        m = m + w1 * (g - m)
    else:
        m = g - (g - m) * (1 - w1)
    v = v * beta2 + one_minus_beta2 * g * g
    if AMSGRAD:
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask, other=0.0).to(tl.float32), v)
        _round_store(vmax_ptr, offs, mask, vmax, seed + 2, S_MODE)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    _round_store(m_ptr, offs, mask, m, seed, S_MODE)
    _round_store(v_ptr, offs, mask, v, seed + 1, S_MODE)
    _store_param(p_ptr, master_ptr, offs, mask, p, seed + 3, HAS_MASTER, P_MODE)


@triton.jit
def _sgd_kernel(
    p_ptr, g_ptr, buf_ptr, master_ptr, n,
    lr, momentum, dampening, weight_decay, grad_multiplier, seed,
    HAS_MOMENTUM: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    HAS_MASTER: tl.constexpr, P_MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g, p = _load_grad_param(g_ptr, p_ptr, master_ptr, offs, mask, grad_multiplier, MAXIMIZE, HAS_MASTER)
    g = g + weight_decay * p
    if HAS_MOMENTUM:
        if FIRST:
            b = g
        else:
            b = tl.load(buf_ptr + offs, mask=mask, other=0.0) * momentum + (1 - dampening) * g
        tl.store(buf_ptr + offs, b, mask=mask)
        if NESTEROV:
            g = g + momentum * b
        else:
            g = b
    p = p - lr * g
    _store_param(p_ptr, master_ptr, offs, mask, p, seed, HAS_MASTER, P_MODE)


def _grid(n: int):
    return (triton.cdiv(max(n, 1), _BLOCK),)


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda",)
    device_resident = True
    batched_fold = True
    batched_fold_align = 16  # triton_fold.SRC_ALIGN_BYTES: 8 bf16/fp16 per 128-bit load

    def __init__(self) -> None:
        from . import triton_fold, triton_kernels

        #: the bucket kernels (SegmentTable, sumsq, finalize, adam_, sgd_, window slots)
        self.bucket = triton_kernels
        self._fold = triton_fold

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (_interpreting() and device.type == "cpu")

    def accumulate_(self, dst: Tensor, src: Tensor, alpha: float = 1.0) -> None:
        # One aten add (bf16/fp16 read and upcast element-wise into the fp32 segment): the
        # same bytes as a Triton launch at a fraction of its host cost, which is what a
        # per-parameter fold during backward pays. Measured on an H100, 8 bf16 micro-batches
        # of a 1.3B-shaped model: 136 ms against 169 ms with the Triton launch.
        dst.add_(src.reshape(dst.shape), alpha=alpha)

    def fold_many_(self, srcs, dsts, copy, sumsq: bool = False, checked: bool = False):
        # every pair in one launch (triton_fold): the fold of many gradients costs the host one
        # table and one launch instead of one launch per gradient
        return self._fold.fold_(srcs, dsts, copy, sumsq, checked)

    def grad_norm(self, buf: Tensor) -> Tensor:
        n = buf.numel()
        partial = torch.empty(_grid(n)[0], dtype=torch.float32, device=buf.device)
        _sumsq_kernel[_grid(n)](buf, partial, n, BLOCK=_BLOCK)
        return partial.sum().sqrt()

    def adam_(self, segs: AdamSegments, hp: AdamHyper) -> None:
        for i, param in enumerate(segs.params):
            master = segs.masters[i] if segs.masters is not None else None
            vmax = segs.max_exp_avg_sqs[i] if segs.max_exp_avg_sqs is not None else None
            step = segs.steps[i]
            bc1 = 1 - hp.beta1**step
            bc2_sqrt = (1 - hp.beta2**step) ** 0.5
            n = param.numel()
            _adam_kernel[_grid(n)](
                param, segs.grads[i], segs.exp_avgs[i], segs.exp_avg_sqs[i],
                vmax if vmax is not None else segs.exp_avg_sqs[i],
                master if master is not None else segs.grads[i], n,
                1 - hp.beta1, hp.beta2, 1 - hp.beta2, hp.eps, hp.weight_decay, 1 - hp.lr * hp.weight_decay,
                hp.grad_multiplier, hp.lr / bc1, bc2_sqrt, (hp.seed + 7919 * i) & 0x7FFFFFFF,
                DECOUPLED=hp.decoupled, MAXIMIZE=hp.maximize, AMSGRAD=vmax is not None,
                HAS_MASTER=master is not None,
                P_MODE=_mode(param, hp.stochastic_rounding and master is None),
                S_MODE=_mode(segs.exp_avgs[i], hp.stochastic_rounding), BLOCK=_BLOCK,
            )

    def sgd_(self, segs: SGDSegments, hp: SGDHyper) -> None:
        for i, param in enumerate(segs.params):
            master = segs.masters[i] if segs.masters is not None else None
            buf = segs.momentum_buffers[i] if segs.momentum_buffers is not None else None
            n = param.numel()
            _sgd_kernel[_grid(n)](
                param, segs.grads[i], buf if buf is not None else segs.grads[i],
                master if master is not None else segs.grads[i], n,
                hp.lr, hp.momentum, hp.dampening, hp.weight_decay, hp.grad_multiplier,
                (hp.seed + 7919 * i) & 0x7FFFFFFF,
                HAS_MOMENTUM=buf is not None, FIRST=segs.steps[i] == 1, NESTEROV=hp.nesterov,
                MAXIMIZE=hp.maximize, HAS_MASTER=master is not None,
                P_MODE=_mode(param, hp.stochastic_rounding and master is None), BLOCK=_BLOCK,
            )
