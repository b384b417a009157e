"""Adam and AdamW: group checks, the state they keep, a group's hyper-parameters.

The update itself is :func:`fastaccum.reference.adam_math` (and the kernels that match it).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import AdamHyper, AdamSegments
from .buffers import Bucket
from .checks import (as_float, check_betas, check_nonneg, check_tensor_betas, check_tensor_lr, device_lr,
                     suggest_keywords)
from .optimizer import AccumOptimizer, document_args
from .scaling import LossScaleArg

__all__ = ["Adam", "AdamW"]

# The docstrings' entries for Adam's own arguments; torch's common ones and fastaccum's are in
# fastaccum.optimizer.ARG_DOCS.
_BETAS = ("tuple[float, float], optional", "decay rates (beta1, beta2) of the running averages of the gradient "
          "and of its square, each in [0, 1)")
_EPS = ("float, optional", "term added to the denominator for numerical stability, > 0")
_AMSGRAD = ("bool, optional", "use the AMSGrad variant: the state also keeps the running maximum of exp_avg_sq")
_ADAM_ARGS = {
    "betas": _BETAS,
    "eps": _EPS,
    "weight_decay": ("float, optional", "weight decay coefficient: an L2 penalty added to the gradient, or, with "
                     "decoupled_weight_decay=True, decoupled from it as in AdamW"),
    "amsgrad": _AMSGRAD,
    "decoupled_weight_decay": ("bool, optional", "True applies the weight decay to the parameters "
                               "directly instead of to the gradient, which makes this AdamW"),
}
_ADAMW_ARGS = {
    "betas": _BETAS,
    "eps": _EPS,
    "weight_decay": ("float, optional", "weight decay coefficient, decoupled from the gradient: "
                     "each update first shrinks the parameters by the factor 1 - lr * weight_decay"),
    "amsgrad": _AMSGRAD,
}


@document_args(_ADAM_ARGS)
class Adam(AccumOptimizer):
    """Adam with flat fp32 gradient accumulation and a fused update, like :class:`torch.optim.Adam`
    (``decoupled_weight_decay=True`` makes it AdamW).

    Same arguments and defaults as :class:`torch.optim.Adam`, plus fastaccum's keyword-only
    arguments (``accumulation_steps`` to ``step_in_backward``). ``foreach`` and ``fused`` are
    accepted for drop-in use and ignored: the update is always one fused pass per bucket.
    """

    _decoupled_default = False
    _kernel = "adam_"
    _required_group_keys = ("lr", "betas", "eps", "weight_decay", "amsgrad")

    @suggest_keywords
    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        foreach: Optional[bool] = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: Optional[bool] = False,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        loss_scale: LossScaleArg = None,
        master_weights: bool = True,
        state_dtype: torch.dtype = torch.float32,
        backend: Optional[str] = "auto",
        step_in_backward: bool = False,
    ) -> None:
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastaccum; use torch.optim.Adam for "
                             "differentiable optimizers")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=bool(capturable), differentiable=False, fused=fused,
            decoupled_weight_decay=bool(decoupled_weight_decay),
        )
        # hyper-parameters are checked before the parameters are read, as torch.optim does
        check_tensor_lr(lr, foreach)
        check_tensor_betas(betas, foreach)
        self._check_group(defaults)
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            loss_scale=loss_scale, master_weights=master_weights, state_dtype=state_dtype, backend=backend,
            step_in_backward=step_in_backward,
        )

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas(group["betas"])
        eps = as_float("eps", group["eps"])
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"Invalid epsilon value: {eps}; eps must be a finite number > 0 (e.g. 1e-8)")
        check_nonneg("weight_decay", group["weight_decay"])

    def _state_spec(self, group: Dict[str, Any]) -> List[Tuple[str, torch.dtype]]:
        spec = [("exp_avg", self.state_dtype), ("exp_avg_sq", self.state_dtype)]
        if group["amsgrad"]:
            spec.append(("max_exp_avg_sq", self.state_dtype))
        return spec

    def _segments(self, bucket: Bucket, idx: Sequence[int], views: Dict[str, List[Tensor]],
                  grads: List[Tensor], steps: List[int]) -> AdamSegments:
        pick = lambda name: [views[name][i] for i in idx] if name in views else None  # noqa: E731
        return AdamSegments(
            params=[bucket.data(i) for i in idx], grads=grads, exp_avgs=pick("exp_avg"),
            exp_avg_sqs=pick("exp_avg_sq"), max_exp_avg_sqs=pick("max_exp_avg_sq"), masters=pick("master_param"),
            steps=steps,
        )

    def _flat_state_args(self, bucket: Bucket) -> List[Optional[Tensor]]:
        st = bucket.flat_state
        return [st["exp_avg"], st["exp_avg_sq"], st.get("max_exp_avg_sq"), st.get("master_param")]

    def _device_hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        beta1, beta2 = check_betas(group["betas"])
        return dict(lr=device_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
                    maximize=bool(group["maximize"]))

    def _hyper(self, group: Dict[str, Any], grad_multiplier: float, stochastic_rounding: bool, seed: int) -> AdamHyper:
        beta1, beta2 = check_betas(group["betas"])
        return AdamHyper(
            lr=as_float("lr", group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]), grad_multiplier=grad_multiplier,
            stochastic_rounding=stochastic_rounding, seed=seed,
        )


@document_args(_ADAMW_ARGS)
class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2) with flat fp32 gradient accumulation and a
    fused update, like :class:`torch.optim.AdamW`.

    Same arguments and defaults as :class:`torch.optim.AdamW`, plus fastaccum's keyword-only
    arguments (``accumulation_steps`` to ``step_in_backward``). ``foreach`` and ``fused`` are
    accepted for drop-in use and ignored: the update is always one fused pass per bucket.
    """

    _decoupled_default = True

    @suggest_keywords
    def __init__(
        self,
        params: Iterable[Any],
        lr: Union[float, Tensor] = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        loss_scale: LossScaleArg = None,
        master_weights: bool = True,
        state_dtype: torch.dtype = torch.float32,
        backend: Optional[str] = "auto",
        step_in_backward: bool = False,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm, loss_scale=loss_scale,
            master_weights=master_weights, state_dtype=state_dtype, backend=backend,
            step_in_backward=step_in_backward,
        )
