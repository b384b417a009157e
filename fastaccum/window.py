"""The accumulation window: micro-batches, their weights, ranks, and the one update multiplier.

Everything that turns the raw accumulated buffers into the gradient the user means is
folded into a single number, computed here and nowhere else::

    grad_multiplier = clip_coef / (loss_scale * grad_scaler_scale * weight_divisor)

so that unscaling, token-weighted normalisation and clipping never cost a pass of their
own: the backends multiply the raw buffer by it inside the update kernel.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .scaling import LossScaler


def dist_world() -> Optional[Tuple[int, str]]:
    """The default process group's (world size, backend) when torch.distributed runs, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_backend()
    return None


class AccumulationWindow:
    """Micro-step count, weight sum and clip request of the window in progress.

    ``weight_sum`` is the sum of the ``weight=`` of every micro-batch passed through
    ``scale_loss``/``backward`` (``weighted`` says whether any was); without weights the
    divisor is the number of micro-batches (managed loop) or 1 (classic loop, where the
    user has divided the loss).
    """

    def __init__(self, accumulation_steps: int, scaler: Optional[LossScaler], step_in_backward: bool) -> None:
        self.accumulation_steps = accumulation_steps
        self.scaler = scaler
        self.step_in_backward = step_in_backward
        self.micro_step = 0
        self.weight_sum = 0.0
        self.weighted = False
        self.clip_request: Optional[float] = None  # max_norm from clip_grad_norm_ for this window
        self._warned_low_precision_ddp = False

    # ----------------------------------------------------------------- micro-batches
    @property
    def sync_gradients(self) -> bool:
        """True when the next ``step()`` updates."""
        return self.micro_step + 1 >= self.accumulation_steps

    def loss_factor(self, weight: float) -> float:
        """Record a micro-batch's ``weight``; the factor its loss is multiplied by."""
        if self.step_in_backward:
            self.weight_sum = weight  # every backward is its own step
        else:
            self.weight_sum += weight
        self.weighted = True
        return weight * (self.scaler.scale if self.scaler is not None else 1.0)

    def advance(self) -> bool:
        """Count one ``step()`` call; True when it is the window's last (the update is due).

        The last call does not count itself: if the update then refuses bad input, nothing
        has changed and ``step()`` can be called again.
        """
        if self.micro_step + 1 < self.accumulation_steps:
            self.micro_step += 1
            return False
        return True

    def end(self) -> None:
        self.micro_step = 0
        self.weight_sum = 0.0
        self.weighted = False
        self.clip_request = None

    # ----------------------------------------------------------------- the multiplier
    def scale_and_divisor(self) -> Tuple[float, float]:
        """(loss scale applied to the buffers, this rank's normalisation divisor)."""
        if self.weighted:
            return (self.scaler.scale if self.scaler is not None else 1.0), self.weight_sum
        return 1.0, float(self.accumulation_steps)

    def unclipped_multiplier(self) -> float:
        """The multiplier without a norm: step-in-backward, where no global norm exists."""
        scale, divisor = self.scale_and_divisor()
        return 1.0 / (scale * divisor)

    def grad_norm(self, raw_norm: Callable[[], float], warn_low_precision: bool = False,
                  deferred_scale: float = 1.0) -> float:
        """The norm of the gradient the update will use (unscaled, normalised), from the raw buffers' norm."""
        scale, divisor = self.scale_and_divisor()
        raw = raw_norm()
        divisor, _ = self.reduce_across_ranks(divisor, not math.isfinite(raw), warn_low_precision)
        return raw * deferred_scale / (scale * divisor)

    def grad_multiplier(
        self,
        raw_norm: Callable[[], float],
        *,
        grad_scaler_scale: Optional[float],
        found_inf: bool,
        max_grad_norm: Optional[float],
        warn_low_precision: bool = False,
        deferred_scale: float = 1.0,
    ) -> Optional[float]:
        """The update's one multiplier, or None when the step must be skipped (inf/nan).

        ``raw_norm()`` (a read pass over the buffers) is called only when a loss scale or
        clipping needs it; it is also the inf/nan check. ``deferred_scale`` (>= 0) is a factor
        already applied to the gradient but not written into the buffers: a trainer's
        ``clip_grad_norm_`` on bf16/fp16 ``p.grad`` views (see ``buffers.GradView``).
        """
        scale, divisor = self.scale_and_divisor()
        if grad_scaler_scale is not None:
            scale *= grad_scaler_scale
        max_norm = self.clip_request if self.clip_request is not None else max_grad_norm
        need_norm = self.scaler is not None or grad_scaler_scale is not None or max_norm is not None
        raw = raw_norm() if need_norm else 0.0
        divisor, nonfinite = self.reduce_across_ranks(divisor, found_inf or not math.isfinite(raw), warn_low_precision)
        if nonfinite:
            return None
        inv = deferred_scale / (scale * divisor)
        coef = 1.0
        if max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s formula, on the unscaled, normalised norm
            coef = min(1.0, max_norm / (raw * inv + 1e-6))
        return inv * coef

    def reduce_across_ranks(self, divisor: float, nonfinite: bool, warn_low_precision: bool = False) -> Tuple[float, bool]:
        """One small all-reduce of (weight sum, found-inf) when torch.distributed runs.

        DDP averages gradients over ranks, so the global token-weighted mean is
        ``world_size * grad / sum_r(weights_r)``: exact even when ranks saw different token
        counts. The found-inf flag is shared so that every rank skips together.
        """
        world = dist_world()
        if world is None:
            return divisor, nonfinite
        size, backend = world
        if warn_low_precision and not self._warned_low_precision_ddp:
            # DDP reads p.grad after our hook has folded and released it, so it reduces
            # zeros for these parameters: the replicas would silently drift apart.
            warnings.warn(
                "fastaccum: bf16/fp16 parameters are not averaged across ranks yet (their gradient "
                "lives in the fp32 buffer, which DDP does not see); keep fp32 parameters under DDP "
                "and use torch.autocast for bf16 compute",
                RuntimeWarning,
                stacklevel=4,
            )
            self._warned_low_precision_ddp = True
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor([divisor if self.weighted else 0.0, float(nonfinite)], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(t)
        weight_sum, any_nonfinite = t.tolist()
        return (weight_sum / size if self.weighted else divisor), any_nonfinite > 0

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return {
            "micro_step": self.micro_step,
            "weight_sum": self.weight_sum,
            "weighted": self.weighted,
            "clip_request": self.clip_request,
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.micro_step = int(sd["micro_step"])
        self.weight_sum = float(sd["weight_sum"])
        self.weighted = bool(sd["weighted"])
        self.clip_request = sd.get("clip_request")
