"""Adam and AdamW: group checks, the state they keep, a group's hyper-parameters.

The update itself is :func:`fastaccum.reference.adam_math` (and the kernels that match it).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import AdamHyper, AdamSegments
from .batch_scaling import beta_for_halflife
from .buffers import Bucket
from .checks import (as_float, check_betas, check_nonneg, check_tensor_betas, check_tensor_lr, device_lr,
                     suggest_keywords)
from .arguments import document_args
from .optimizer import AccumOptimizer
from .scaling import LossScaleArg

__all__ = ["Adam", "AdamW"]

# The docstrings' entries for Adam's own arguments; torch's common ones and fastaccum's are in
# fastaccum.arguments.ARG_DOCS.
_BETAS = ("tuple[float, float], optional", "decay rates (beta1, beta2) of the running averages of the gradient "
          "and of its square, each in [0, 1)")
_EPS = ("float, optional", "term added to the denominator for numerical stability, > 0")
_AMSGRAD = ("bool, optional", "use the AMSGrad variant: the state also keeps the running maximum of exp_avg_sq")
_HALFLIFE = ("float, optional", "instead of a fixed betas[1]: the half-life of exp_avg_sq in tokens (the "
             "weight= of opt.backward), so that every update uses beta2 = beta_for_halflife(this, tokens of its "
             "window) (Marek et al. 2025); refused together with a betas[1] other than 0.999")
_ADAM_ARGS = {
    "beta2_halflife_tokens": _HALFLIFE,
    "betas": _BETAS,
    "eps": _EPS,
    "weight_decay": ("float, optional", "weight decay coefficient: an L2 penalty added to the gradient, or, with "
                     "decoupled_weight_decay=True, decoupled from it as in AdamW"),
    "amsgrad": _AMSGRAD,
    "decoupled_weight_decay": ("bool, optional", "True applies the weight decay to the parameters "
                               "directly instead of to the gradient, which makes this AdamW"),
}
_ADAMW_ARGS = {
    "beta2_halflife_tokens": _HALFLIFE,
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

    ``beta2_halflife_tokens``: instead of a fixed ``betas[1]``, keep the half-life of
    ``exp_avg_sq`` fixed in *tokens* (Marek et al. 2025, https://arxiv.org/abs/2507.07101):
    every update uses ``β2 = beta_for_halflife(beta2_halflife_tokens, tokens)`` with
    ``tokens`` the weight sum of its window -- the ``weight=`` passed to
    ``opt.backward``/``scale_loss`` (``weight=n_tokens``: tokens; across ranks the global
    sum). Without weights the unit is micro-batches (``accumulation_steps`` per update).
    The group's ``betas`` show the β2 used last; the half-life is stored in the param group
    (key ``beta2_halflife_tokens``), so it checkpoints. Refused together with a ``betas[1]``
    other than the default 0.999. Bias correction keeps Adam's ``1 - β2**step`` with the
    current β2 (exact for a constant token count per update). On the device-resident step
    (triton) with *tensor* weights the weight sum stays on the device: the first such
    window's sum is read once (one sync) and used for every later update.
    ``track_noise_scale``: see :class:`~fastaccum.AccumOptimizer` and ``opt.stats()``.
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
        track_noise_scale: bool = False,
        beta2_halflife_tokens: Optional[float] = None,
    ) -> None:
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastaccum; use torch.optim.Adam for "
                             "differentiable optimizers")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=bool(capturable), differentiable=False, fused=fused,
            decoupled_weight_decay=bool(decoupled_weight_decay), beta2_halflife_tokens=beta2_halflife_tokens,
        )
        # hyper-parameters are checked before the parameters are read, as torch.optim does
        check_tensor_lr(lr, foreach)
        check_tensor_betas(betas, foreach)
        _check_halflife_vs_betas(beta2_halflife_tokens, betas)
        self._check_group(defaults)
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            loss_scale=loss_scale, master_weights=master_weights, state_dtype=state_dtype, backend=backend,
            step_in_backward=step_in_backward, track_noise_scale=track_noise_scale,
        )

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "betas" in param_group:
            h = param_group.get("beta2_halflife_tokens", self.defaults.get("beta2_halflife_tokens"))
            _check_halflife_vs_betas(h, param_group["betas"])
        super().add_param_group(param_group)

    def _beta2(self, group: Dict[str, Any]) -> Optional[float]:
        """β2 for this update from the group's token half-life (written into the group's
        ``betas``); None when the group has a fixed β2."""
        h = group.get("beta2_halflife_tokens")
        if h is None:
            return None
        beta1 = check_betas(group["betas"])[0]
        beta2 = beta_for_halflife(h, self._tokens_per_step())
        group["betas"] = (beta1, beta2)
        return beta2

    def _check_group(self, group: Dict[str, Any]) -> None:
        check_nonneg("lr", group["lr"])
        check_betas(group["betas"])
        eps = as_float("eps", group["eps"])
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"Invalid epsilon value: {eps}; eps must be a finite number > 0 (e.g. 1e-8)")
        check_nonneg("weight_decay", group["weight_decay"])
        h = group.get("beta2_halflife_tokens")
        if h is not None:
            if isinstance(h, bool) or not isinstance(h, (int, float)) or not (h > 0 and math.isfinite(h)):
                raise ValueError(f"Invalid beta2_halflife_tokens: {h!r}; expected a finite number of tokens > 0 "
                                 "(e.g. the half-life your betas[1] had: fastaccum.halflife_tokens(0.95, tokens_per_step)), "
                                 "or None for a fixed betas[1]")

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
        self._beta2(group)
        beta1, beta2 = check_betas(group["betas"])
        return dict(lr=device_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
                    maximize=bool(group["maximize"]))

    def _hyper(self, group: Dict[str, Any], grad_multiplier: float, stochastic_rounding: bool, seed: int) -> AdamHyper:
        self._beta2(group)
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
        track_noise_scale: bool = False,
        beta2_halflife_tokens: Optional[float] = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm, loss_scale=loss_scale,
            master_weights=master_weights, state_dtype=state_dtype, backend=backend,
            step_in_backward=step_in_backward, track_noise_scale=track_noise_scale,
            beta2_halflife_tokens=beta2_halflife_tokens,
        )


_DEFAULT_BETA2 = 0.999


def _check_halflife_vs_betas(halflife: Any, betas: Any) -> None:
    """Refuse two answers to one question: a token half-life and an explicit β2."""
    if halflife is None:
        return
    try:
        beta2 = float(betas[1])
    except (TypeError, ValueError, IndexError):
        return  # check_betas names the problem
    if beta2 != _DEFAULT_BETA2:
        raise ValueError(
            f"Invalid betas: betas[1]={beta2} and beta2_halflife_tokens={halflife!r} both set beta2; pass one: "
            "beta2_halflife_tokens chooses beta2 per update from the tokens of its window (leave betas[1] at its "
            "default), or drop beta2_halflife_tokens to keep betas[1] fixed"
        )
