"""The accumulation window: micro-batches, their weights, ranks, and the one update multiplier.

Everything that turns the raw accumulated buffers into the gradient the user means is
folded into a single number, computed here and nowhere else::

    grad_multiplier = clip_coef / (loss_scale * grad_scaler_scale * weight_divisor)

so that unscaling, token-weighted normalisation and clipping never cost a pass of their
own: the backends multiply the raw buffer by it inside the update kernel.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

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

    def grad_norm(self, raw_norm: Callable[[], Tuple[float, float]]) -> float:
        """The norm of the gradient the update will use (unscaled, normalised), from the raw buffers' norm.

        ``raw_norm()`` gives the squared norms ``(replicated, sharded)`` of this rank's
        buffers; the sharded part (FSDP2's local shards) is summed across ranks.
        """
        scale, divisor = self.scale_and_divisor()
        rep_sq, shard_sq = raw_norm()
        divisor, _, shard_sq = self.reduce_across_ranks(divisor, not math.isfinite(rep_sq + shard_sq), shard_sq)
        return math.sqrt(rep_sq + shard_sq) / (scale * divisor)

    def grad_multiplier(
        self,
        raw_norm: Callable[[], Tuple[float, float]],
        *,
        grad_scaler_scale: Optional[float],
        found_inf: bool,
        max_grad_norm: Optional[float],
        live: Optional[List[bool]] = None,
    ) -> Optional[float]:
        """The update's one multiplier, or None when the step must be skipped (inf/nan).

        ``raw_norm()`` (a read pass over the buffers; squared norms of the replicated and of
        the sharded buffers) is called only when a loss scale or clipping needs it; it is
        also the inf/nan check. ``live`` (DDP with bf16/fp16 parameters: whether each
        reduced parameter had a gradient on this rank) is replaced by its OR across ranks,
        in the same all-reduce.
        """
        scale, divisor = self.scale_and_divisor()
        if grad_scaler_scale is not None:
            scale *= grad_scaler_scale
        max_norm = self.clip_request if self.clip_request is not None else max_grad_norm
        need_norm = self.scaler is not None or grad_scaler_scale is not None or max_norm is not None
        rep_sq, shard_sq = raw_norm() if need_norm else (0.0, 0.0)
        divisor, nonfinite, shard_sq = self.reduce_across_ranks(
            divisor, found_inf or not math.isfinite(rep_sq + shard_sq), shard_sq, live)
        if nonfinite:
            return None
        inv = 1.0 / (scale * divisor)
        coef = 1.0
        if max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s formula, on the unscaled, normalised norm
            coef = min(1.0, max_norm / (math.sqrt(rep_sq + shard_sq) * inv + 1e-6))
        return inv * coef

    def reduce_across_ranks(self, divisor: float, nonfinite: bool, sharded_sq: float = 0.0,
                            live: Optional[List[bool]] = None) -> Tuple[float, bool, float]:
        """One small all-reduce of (weight sum, found-inf, sharded squared norm[, live flags])
        when torch.distributed runs.

        DDP and FSDP2 average gradients over ranks, so the global token-weighted mean is
        ``world_size * grad / sum_r(weights_r)``: exact even when ranks saw different token
        counts. The found-inf flag is shared so that every rank skips together; the squared
        norms of the local shards add up to the global squared norm (clipping by the global
        norm). float64, so token counts stay exact far beyond 2**24.
        """
        world = dist_world()
        if world is None:
            return divisor, nonfinite, sharded_sq
        size, backend = world
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        head = [divisor if self.weighted else 0.0, float(nonfinite), sharded_sq]
        t = torch.tensor(head + [float(x) for x in (live or [])], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        values = t.tolist()
        weight_sum, any_nonfinite, sharded_sq = values[:3]
        if live is not None:
            live[:] = [x > 0 for x in values[3:]]
        return (weight_sum / size if self.weighted else divisor), any_nonfinite > 0, sharded_sq

    @staticmethod
    def mean_across_ranks_async(t: Tensor) -> "torch.futures.Future":
        """All-reduce ``t`` in place to its mean over ranks, without waiting (DDP's overlap).

        A mean, not a sum, like DDP's own reduction: reducing a buffer that already holds
        the mean of earlier micro-batches (a loop without ``no_sync``) leaves that part
        unchanged, so the result is right however often DDP syncs. NCCL averages in the
        collective; other backends divide first (as DDP's default hook does).
        """
        dist = torch.distributed
        if dist.get_backend() == "nccl":
            work = dist.all_reduce(t, op=dist.ReduceOp.AVG, async_op=True)
        else:
            t.div_(dist.get_world_size())
            work = dist.all_reduce(t, async_op=True)
        return work.get_future()

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
