"""The optimizers' argument documentation: one table, rendered into each class's docstring.

Each public class lists its constructor's arguments in signature order with their
defaults, built from the signature itself (:func:`document_args`), so the docstring cannot
disagree with it; an algorithm adds the entries of its own arguments.
"""
from __future__ import annotations

import inspect
import textwrap
from typing import Any, Callable, Dict, Tuple, TypeVar

# (type, meaning) of the constructor arguments the optimizers share: torch's common ones and
# fastaccum's own. An algorithm adds its own to :func:`document_args`; defaults are read from
# the signature, so the docstring cannot disagree with it.
ARG_DOCS: Dict[str, Tuple[str, str]] = {
    "params": ("iterable", "the parameters to optimize: tensors, (name, tensor) pairs from "
               "model.named_parameters(), or dicts defining parameter groups (a dict's keys override the "
               "hyper-parameters below for its group)"),
    "defaults": ("dict", "the algorithm's hyper-parameters, the defaults of every param group"),
    "lr": ("float or Tensor, optional", "learning rate (a one-element tensor is accepted, as in torch)"),
    "maximize": ("bool, optional", "maximize the objective instead of minimizing it"),
    "foreach": ("bool, optional", "accepted for drop-in use and ignored: the update is always fused"),
    "fused": ("bool, optional", "accepted for drop-in use and ignored: the update is always fused"),
    "capturable": ("bool, optional", "True promises that opt.step() can be captured in a CUDA graph; accepted "
                   "when the optimizer runs the device-resident step (backend 'triton' on one CUDA device), "
                   "refused otherwise. That step keeps every decision on the device either way"),
    "differentiable": ("bool, optional", "only False is accepted: the step runs without autograd"),
    "accumulation_steps": ("int, optional", "micro-batches per update. 1 steps on every step() call, as "
                           "torch.optim does (the classic loop: divide the loss yourself, call step() every N-th "
                           "micro-batch). N > 1 is the managed loop: call opt.backward(loss, weight=...), step() and "
                           "zero_grad() on every micro-batch; every N-th step() updates with the weighted mean "
                           "gradient of the window, the others return without touching the parameters"),
    "max_grad_norm": ("float, optional", "clip the global L2 norm of the gradient (over all param groups, after "
                      "unscaling and normalisation) to this value, fused into the step; None does not clip"),
    "loss_scale": ("None, float or 'dynamic', optional", "loss scale for fp16 training: a fixed factor, or "
                   "'dynamic' with torch.amp.GradScaler's defaults (2**16, doubled after 2000 clean steps, halved "
                   "on overflow). opt.backward() and opt.scale_loss() multiply the loss by it and the step divides "
                   "it out; a window whose gradients hold inf/nan is skipped (opt.skipped_steps)"),
    "master_weights": ("bool, optional", "keep an fp32 master copy of bf16/fp16 parameters in the state. False "
                       "(bf16 only) writes the update back with stochastic rounding instead, 4 bytes less per "
                       "parameter"),
    "state_dtype": ("torch.dtype, optional", "dtype of the moments (exp_avg, exp_avg_sq): torch.float32, or "
                    "torch.bfloat16 (math in fp32, stochastic rounding on store, 4 bytes less per moment)"),
    "backend": ("str, optional", "the kernels that run the buckets. 'auto' (or None) picks, per device, the "
                "fastest backend that loads ('triton' on CUDA, 'cpu' on CPU, else 'torch'; the environment "
                "variable FASTACCUM_BACKEND overrides it); a name ('torch', 'cpu', 'triton') requires that "
                "backend and raises with the reason when it cannot run. opt.backends says which backend each "
                "param group got"),
    "step_in_backward": ("bool, optional", "update each parameter in its gradient hook during backward, so no "
                         "gradient outlives its parameter's backward and no accumulation buffer is kept; "
                         "global clipping (max_grad_norm) and a dynamic loss scale are refused with it"),
    "track_noise_scale": ("bool, optional", "estimate the gradient noise scale (McCandlish et al. 2018) from the "
                          "accumulation itself, reported by opt.stats() and read by fastaccum.advise(opt); costs "
                          "one read of the first micro-batch's gradient per window for fp32 parameters"),
}

_Cls = TypeVar("_Cls", bound=type)


def document_args(own: Dict[str, Tuple[str, str]]) -> Callable[[_Cls], _Cls]:
    """Class decorator: append to the class docstring an ``Args:`` section, laid out as
    torch.optim's, with one entry per argument of its ``__init__`` in signature order
    (``own`` first, then :data:`ARG_DOCS`). An argument found in neither is left out, and
    ``tests/test_introspection.py`` fails until it is documented."""

    def decorate(cls: _Cls) -> _Cls:
        lines = ["", "Args:"]
        for name, p in list(inspect.signature(cls.__init__).parameters.items())[1:]:
            if name not in own and name not in ARG_DOCS:
                continue
            kind, text = own.get(name) or ARG_DOCS[name]
            if p.default is not inspect.Parameter.empty:  # kept on one line: a no-break space
                text += f" (default:\xa0{_default_text(p.default)})"
            lines += [line.replace("\xa0", " ") for line in textwrap.wrap(
                f"{name} ({kind}): {text}", width=96, initial_indent="    ", subsequent_indent="        ",
                break_long_words=False, break_on_hyphens=False)]
        cls.__doc__ = inspect.cleandoc(cls.__doc__ or "") + "\n" + "\n".join(lines) + "\n"
        return cls

    return decorate


def _default_text(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)
