"""The pure-PyTorch backend: the reference every kernel is tested against, and the
fallback on any device (CPU, CUDA, MPS).

It applies :mod:`fastaccum.reference` segment by segment. It must stay MPS-safe: no float64
and no device-specific ops (``tests/test_mps_safety.py`` runs it under a dispatch mode that
rejects float64).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import reference
from .base import AdamHyper, AdamSegments, Backend, SGDHyper, SGDSegments


_NORM_CHUNK = 1 << 20


def _fp32(t: Tensor) -> Tensor:
    """The tensor itself when already fp32 (math in place), else an fp32 working copy.

    float64 tensors (a float64 parameter's bucket: gradient, state and parameter all float64)
    are kept as they are: their math runs in float64, as in torch.optim.
    """
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class TorchBackend(Backend):
    name = "torch"
    device_types = ("cpu", "cuda", "mps", "xpu", "meta")

    def supports(self, device: torch.device) -> bool:
        return True

    def accumulate_(self, dst: Tensor, src: Tensor, alpha: float = 1.0) -> None:
        # add_ with a bf16/fp16 ``src`` upcasts element-wise into the fp32 ``dst``.
        dst.add_(src.reshape(dst.shape), alpha=alpha)

    def grad_norm(self, buf: Tensor) -> Tensor:
        # Not torch.linalg.vector_norm: on CPU it accumulates fp32 serially and is off by
        # ~1e-3 relative at 30M elements. sum() reduces pairwise (~1e-8 there); chunks keep
        # the squared temporary at 4 MB. fp32 only: MPS has no float64.
        if buf.numel() <= _NORM_CHUNK:
            return buf.square().sum().sqrt()
        return torch.stack([c.square().sum() for c in buf.split(_NORM_CHUNK)]).sum().sqrt()

    def adam_(self, segs: AdamSegments, hp: AdamHyper) -> None:
        for i, param in enumerate(segs.params):
            master = segs.masters[i] if segs.masters is not None else None
            p32 = master if master is not None else _fp32(param)
            m32, v32 = _fp32(segs.exp_avgs[i]), _fp32(segs.exp_avg_sqs[i])
            vmax = segs.max_exp_avg_sqs[i] if segs.max_exp_avg_sqs is not None else None
            vmax32 = _fp32(vmax) if vmax is not None else None
            reference.adam_math(
                p32, segs.grads[i], m32, v32, vmax32,
                step=segs.steps[i], lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                weight_decay=hp.weight_decay, decoupled=hp.decoupled, maximize=hp.maximize,
                grad_multiplier=hp.grad_multiplier,
            )
            # bf16 moments: round the fp32 result back (stochastically, so that small
            # decays of exp_avg_sq are not lost to round-to-nearest).
            for store, val in ((segs.exp_avgs[i], m32), (segs.exp_avg_sqs[i], v32), (vmax, vmax32)):
                if store is not None and store is not val:
                    reference.write_back_(store, val, hp.stochastic_rounding)
            if p32 is not param:
                reference.write_back_(param, p32, hp.stochastic_rounding and master is None)

    def sgd_(self, segs: SGDSegments, hp: SGDHyper) -> None:
        for i, param in enumerate(segs.params):
            master = segs.masters[i] if segs.masters is not None else None
            p32 = master if master is not None else _fp32(param)
            buf = segs.momentum_buffers[i] if segs.momentum_buffers is not None else None
            reference.sgd_math(
                p32, segs.grads[i], buf,
                first_step=segs.steps[i] == 1, lr=hp.lr, momentum=hp.momentum,
                dampening=hp.dampening, nesterov=hp.nesterov, weight_decay=hp.weight_decay,
                maximize=hp.maximize, grad_multiplier=hp.grad_multiplier,
            )
            if p32 is not param:
                reference.write_back_(param, p32, hp.stochastic_rounding and master is None)
