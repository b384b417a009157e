"""SGD with momentum, dampening and Nesterov: group checks, state, hyper-parameters.

The update itself is :func:`fastaccum.reference.sgd_math` (and the kernels that match it).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import SGDHyper, SGDSegments
from .buffers import Bucket
from .checks import as_float, check_nonneg, check_tensor_lr, device_lr, suggest_keywords
from .arguments import document_args
from .optimizer import AccumOptimizer
from .scaling import LossScaleArg

__all__ = ["SGD"]


# The docstring's entries for SGD's own arguments; torch's common ones and fastaccum's are in
# fastaccum.arguments.ARG_DOCS.
_SGD_ARGS = {
    "momentum": ("float, optional", "momentum factor (0 keeps no momentum buffer)"),
    "dampening": ("float, optional", "dampening of the momentum"),
    "weight_decay": ("float, optional", "weight decay coefficient: an L2 penalty added to the gradient"),
    "nesterov": ("bool, optional", "use Nesterov momentum (needs momentum > 0 and dampening 0)"),
}


@document_args(_SGD_ARGS)
class SGD(AccumOptimizer):
    """SGD with momentum and Nesterov, with flat fp32 gradient accumulation and a fused update,
    like :class:`torch.optim.SGD`.

    Same arguments and defaults as :class:`torch.optim.SGD`, plus fastaccum's keyword-only
    arguments (``accumulation_steps`` to ``step_in_backward``; the momentum buffer is always
    fp32, so there is no ``state_dtype``). ``foreach`` and ``fused`` are accepted for drop-in
    use and ignored: the update is always one fused pass per bucket.
    """

    _kernel = "sgd_"
    _required_group_keys = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

    @suggest_keywords
    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        loss_scale: LossScaleArg = None,
        master_weights: bool = True,
        backend: Optional[str] = "auto",
        step_in_backward: bool = False,
        track_noise_scale: bool = False,
    ) -> None:
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastaccum; use torch.optim.SGD")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=fused)
        # hyper-parameters are checked before the parameters are read, as torch.optim does
        check_tensor_lr(lr)
        self._check_group(defaults)
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            loss_scale=loss_scale, master_weights=master_weights, state_dtype=torch.float32, backend=backend,
            step_in_backward=step_in_backward, track_noise_scale=track_noise_scale,
        )

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        momentum = check_nonneg("momentum", group["momentum"])
        dampening = as_float("dampening", group["dampening"])
        check_nonneg("weight_decay", group["weight_decay"])
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def _state_spec(self, group: Dict[str, Any]) -> List[Tuple[str, torch.dtype]]:
        return [("momentum_buffer", torch.float32)] if group["momentum"] != 0 else []

    def _segments(self, bucket: Bucket, idx: Sequence[int], views: Dict[str, List[Tensor]],
                  grads: List[Tensor], steps: List[int]) -> SGDSegments:
        return SGDSegments(
            params=[bucket.data(i) for i in idx],
            grads=grads,
            momentum_buffers=[views["momentum_buffer"][i] for i in idx] if "momentum_buffer" in views else None,
            masters=[views["master_param"][i] for i in idx] if "master_param" in views else None,
            steps=steps,
        )

    def _flat_state_args(self, bucket: Bucket) -> List[Optional[Tensor]]:
        st = bucket.flat_state
        return [st.get("momentum_buffer"), st.get("master_param")]

    def _device_hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        return dict(lr=device_lr(group["lr"]), momentum=float(group["momentum"]),
                    dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
                    weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]))

    def _hyper(self, group: Dict[str, Any], grad_multiplier: float, stochastic_rounding: bool, seed: int) -> SGDHyper:
        return SGDHyper(
            lr=as_float("lr", group["lr"]), momentum=float(group["momentum"]),
            dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
            weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
            grad_multiplier=grad_multiplier, stochastic_rounding=stochastic_rounding, seed=seed,
        )
