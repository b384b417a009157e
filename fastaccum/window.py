"""The accumulation window: micro-batches, their weights, ranks, and the one update multiplier.

Everything that turns the raw accumulated buffers into the gradient the user means is
folded into a single number, computed here and nowhere else::

    grad_multiplier = clip_coef / (loss_scale * grad_scaler_scale * weight_divisor)

so that unscaling, token-weighted normalisation and clipping never cost a pass of their
own: the backends multiply the raw buffer by it inside the update kernel.

Two ways to compute it. On the host (:meth:`AccumulationWindow.grad_multiplier`), from the
buffers' norm read back as a float: free on a CPU. On the device (the window is
:meth:`~AccumulationWindow.to_device`), for backends with bucket kernels: the norm, the
found-inf flag, the skip decision, the multiplier, the dynamic loss scale and the step
counts are all computed by one ``finalize`` kernel (:meth:`AccumulationWindow.finalize_on_device`)
and read by the update kernels, so no step waits for the GPU. Tensor weights, GradScaler's
tensors, the cross-rank all-reduce and the noise scale's sums then stay on the device too.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .scaling import LossScaler


_DIST = torch.distributed if torch.distributed.is_available() else None


def dist_world() -> Optional[Tuple[int, str]]:
    """The default process group's (world size, backend) when torch.distributed runs, else None."""
    if _DIST is not None and _DIST.is_initialized() and _DIST.get_world_size() > 1:
        return _DIST.get_world_size(), _DIST.get_backend()
    return None


def _fp64_on(device: torch.device, x: Union[float, Tensor]) -> Tensor:
    """``x`` as a 0-dim fp64 tensor on ``device``; a host number by a fill on the device (no copy:
    a host-to-device copy of pageable memory would wait for the device)."""
    if isinstance(x, Tensor):
        return x.reshape(()).to(device, torch.float64)
    return torch.full((), float(x), dtype=torch.float64, device=device)


def _div_sq(x: Any, *factors: Any) -> Any:
    """``x / (f1 · f2 · ...)²``. A tensor factor (an fp32 loss scale, a device weight sum) divides
    ``x`` on its own, so that each division runs in ``x``'s precision (fp64) instead of rounding
    a product to fp32 first; host numbers are multiplied first (no op for 1)."""
    host = 1.0
    for f in factors:
        if isinstance(f, Tensor):
            x = x / f / f
        else:
            host *= f
    return x / (host * host) if host != 1.0 else x


def _fp32(x: Union[float, Tensor]) -> Union[float, Tensor]:
    return x.float() if isinstance(x, Tensor) and x.dtype != torch.float32 else x


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
        # Weights are counted in units of the window's first weight (one process only), so
        # the loss is multiplied by w / weight_ref ~ 1 instead of w: a token count of 4096
        # times a loss scale of 2**16 overflows an fp16 backward, w / weight_ref does not.
        # The update is unchanged: sum(w_i/ref * g_i) / sum(w_i/ref). Across ranks the
        # weight sum is all-reduced, so there the unit stays 1 on every rank.
        self.weight_ref: Optional[float] = None
        self.clip_request: Optional[float] = None  # max_norm from clip_grad_norm_ for this window
        # device-resident: the kernels module, its window-state tensor, the weights passed as
        # device tensors this window (summed on the device) and a flag for invalid ones
        self.kernels: Any = None
        self.state: Optional[Tensor] = None
        self.weight_sum_t: Optional[Tensor] = None
        self.bad_weight_t: Optional[Tensor] = None
        # Gradient noise scale (noise_scale.py): the micro-batches that reported a squared
        # norm this window, in the window's weight units and before unscaling:
        # (Σ_R raw_i / u_i, Σ_R u_i, |R|), with raw_i the squared norm of what micro-batch i
        # added to the buffers (its loss was multiplied by loss_scale · u_i, see loss_factor)
        # and u_i its weight in units of weight_ref. Floats, or device tensors on a resident
        # window (nothing is read back); noise_totals() turns them into absolute units.
        # ``measure_norm``: the optimizer tracks the noise scale, so every step runs the norm
        # pass (it gives |G_B|²).
        self.measure_norm = False
        self.reports: List[Any] = [0.0, 0.0, 0.0]
        self._open_units: Any = 0.0  # weight units committed since the last micro-batch closed
        # what the last applied (or skipped) window was, for stats() and the noise scale:
        # its global weight sum in absolute units (None while tensor weights keep it on the
        # device), its unscaled normalised norm (None without a norm pass), and the reduced
        # noise sums with |G_B|² (None when not measured; tensors on a resident window, with
        # ``last_applied``, a bool tensor: False when the device skipped the step)
        self.last_weight_total: Optional[float] = None
        self.last_grad_norm: Optional[float] = None
        self.last_noise: Optional[Tuple[Any, Any, Any, Any, Any]] = None
        self.last_applied: Optional[Tensor] = None

    # ----------------------------------------------------------------- device residence
    def to_device(self, kernels: Any, device: torch.device) -> None:
        """Keep the window's numbers (and the loss scale) on ``device`` from now on."""
        self.kernels = kernels
        self.state = kernels.new_window_state(device, self.scaler.scale if self.scaler is not None else 1.0)
        if self.scaler is not None:
            self.scaler.attach(self.state, kernels.W_LOSS_SCALE, kernels.W_GROWTH_TRACKER)

    @property
    def resident(self) -> bool:
        return self.state is not None

    def record_tensor_weight(self, weight: Tensor) -> None:
        """A device tensor weight, summed and checked on the device (reading it would sync):
        a weight that is not a finite number > 0 makes the window's step skip."""
        w = weight.detach().reshape(()).to(self.state.device, torch.float32)
        if self.weight_sum_t is None:
            self.weight_sum_t = torch.zeros((), dtype=torch.float32, device=self.state.device)
            self.bad_weight_t = torch.zeros((), dtype=torch.float32, device=self.state.device)
        self.weight_sum_t += w
        self.bad_weight_t += (~(torch.isfinite(w) & (w > 0))).float()
        if self.measure_norm:  # (the micro-batch's weight for its noise-scale report)
            opened = self._open_units
            self._open_units = w if isinstance(opened, float) and opened == 0.0 else opened + w

    # ----------------------------------------------------------------- micro-batches
    @property
    def sync_gradients(self) -> bool:
        """True when the next ``step()`` updates."""
        return self.micro_step + 1 >= self.accumulation_steps

    def _ref(self, weight: Union[float, Tensor]) -> Union[float, Tensor]:
        if self.weight_ref is not None and not self.step_in_backward:  # every backward is its own window there
            return self.weight_ref
        return weight if dist_world() is None else 1.0

    def loss_factor(self, weight: Union[float, Tensor], record: bool = True) -> Union[float, Tensor]:
        """The factor a micro-batch's loss is multiplied by; records ``weight`` unless
        ``record=False`` (then :meth:`commit` records it once its backward succeeded).

        On a resident window the factor is a device tensor when a loss scale or a tensor
        weight is involved: nothing is read back."""
        if self.resident and self.scaler is not None:
            scale: Union[float, Tensor] = self.scaler.scale_tensor()
        else:
            scale = self.scaler.scale if self.scaler is not None else 1.0
        factor = weight / self._ref(weight) * scale
        if record:
            self.commit(weight)
        return factor

    def commit(self, weight: Union[float, Tensor]) -> None:
        """Count a micro-batch's ``weight`` in the window (after its backward succeeded)."""
        ref = self._ref(weight)
        self.weight_ref = ref
        unit = weight / ref
        if isinstance(unit, Tensor):  # a device weight (or unit): summed on the device
            self.record_tensor_weight(unit)
        elif self.step_in_backward:
            self.weight_sum = unit  # every backward is its own step
        else:
            self.weight_sum += unit
            if self.measure_norm:
                self._open_units = self._open_units + unit
        self.weighted = True

    def close_micro(self, raw_sumsq: Any) -> None:
        """A micro-batch ended (a ``step()`` call): record its squared-norm report.

        ``raw_sumsq`` is the squared norm of what reached the buffers in that micro-batch,
        i.e. of ``loss_scale · (w_i/weight_ref) · g_i`` (see :meth:`loss_factor`): a float, a
        device tensor (resident: not read), or None when it was not measured completely (then
        the micro-batch does not report). Its weight may be a device tensor too.
        """
        unit = self._open_units if self.weighted else 1.0
        self._open_units = 0.0
        if raw_sumsq is None or (not isinstance(unit, Tensor) and not unit > 0):
            return
        r = self.reports
        first = r[2] == 0
        r[0] = raw_sumsq / unit if first else r[0] + raw_sumsq / unit
        r[1] = unit if first else r[1] + unit
        r[2] += 1.0

    def drop_reports(self) -> None:
        """The buffers no longer hold what the reports measured (a gradient assigned by hand)."""
        self.reports = [0.0, 0.0, 0.0]

    def noise_totals(self, scale: Any) -> Tuple[Any, Any, float]:
        """This window's reports in the unit of ``weight=``, unscaled: ``(Σ_R b_i |g_i|²,
        Σ_R b_i, |R|)`` (noise_scale.py), with ``b_i = u_i · weight_ref`` and
        ``|g_i|² = raw_i / (u_i · scale)²``; ``scale``: what the losses were multiplied by
        besides the weights (the loss scale; GradScaler's scale), constant within a window."""
        s, units, k = self.reports
        if k == 0:
            return 0.0, 0.0, 0.0
        ref = self.weight_ref if (self.weighted and self.weight_ref is not None) else 1.0
        return _div_sq(s * ref, scale), units * ref, k

    def host_weight_total(self, divisor: float, world: int = 1) -> Optional[float]:
        """The window's weight sum in the unit of ``weight=`` (tokens with ``weight=n_tokens``;
        micro-batches without weights) from the normalisation divisor; None when tensor
        weights keep it on the device."""
        if self.weight_sum_t is not None:
            return None
        ref = float(self.weight_ref) if (self.weighted and self.weight_ref is not None) else 1.0
        return divisor * world * ref

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
        self.weight_ref = None
        self.clip_request = None
        self.weight_sum_t = None
        self.bad_weight_t = None
        self.reports = [0.0, 0.0, 0.0]
        self._open_units = 0.0

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

    def grad_norm(self, raw_norm: Callable[[], Tuple[float, float]], deferred_scale: float = 1.0) -> float:
        """The norm of the gradient the update will use (unscaled, normalised), from the raw buffers' norm.

        ``raw_norm()`` gives the squared norms ``(replicated, sharded)`` of this rank's
        buffers; the sharded part (FSDP2's local shards) is summed across ranks.
        ``deferred_scale``: see :meth:`grad_multiplier`.
        """
        scale, divisor = self.scale_and_divisor()
        rep_sq, shard_sq = raw_norm()
        divisor, _, shard_sq = self.reduce_across_ranks(divisor, not math.isfinite(rep_sq + shard_sq), shard_sq)
        return math.sqrt(rep_sq + shard_sq) * deferred_scale / (scale * divisor)

    def grad_multiplier(
        self,
        raw_norm: Callable[[], Tuple[float, float]],
        *,
        grad_scaler_scale: Optional[float],
        found_inf: bool,
        max_grad_norm: Optional[float],
        live: Optional[List[bool]] = None,
        deferred_scale: float = 1.0,
    ) -> Optional[float]:
        """The update's one multiplier, or None when the step must be skipped (inf/nan).

        ``raw_norm()`` (a read pass over the buffers; squared norms of the replicated and of
        the sharded buffers) is called only when a loss scale or clipping needs it; it is
        also the inf/nan check. ``live`` (DDP with bf16/fp16 parameters: whether each
        reduced parameter had a gradient on this rank) is replaced by its OR across ranks,
        in the same all-reduce.
        ``deferred_scale`` (>= 0) is a factor already applied to the gradient but not
        written into the buffers: a trainer's ``clip_grad_norm_`` on bf16/fp16 ``p.grad``
        views (see ``buffers.GradView``).
        """
        scale, divisor = self.scale_and_divisor()
        if grad_scaler_scale is not None:
            scale *= grad_scaler_scale
        max_norm = self.clip_request if self.clip_request is not None else max_grad_norm
        need_norm = (self.scaler is not None or grad_scaler_scale is not None or max_norm is not None
                     or self.measure_norm)
        rep_sq, shard_sq = raw_norm() if need_norm else (0.0, 0.0)
        noise = list(self.noise_totals(scale)) if self.measure_norm else None
        divisor, nonfinite, shard_sq = self.reduce_across_ranks(
            divisor, found_inf or not math.isfinite(rep_sq + shard_sq), shard_sq, live, noise)
        world = dist_world()
        self.last_weight_total = self.host_weight_total(divisor, world[0] if world else 1)
        inv = deferred_scale / (scale * divisor)
        sq = rep_sq + shard_sq
        self.last_grad_norm = math.sqrt(sq) * inv if need_norm and math.isfinite(sq) else None
        # |G_B|² of the update direction before clipping (a trainer's clip through the
        # GradViews is recorded in deferred_scale, left out here: the noise scale is a
        # property of the gradient, not of the clipped step)
        self.last_noise, self.last_applied = None, None
        if noise is not None and not nonfinite and self.last_weight_total is not None:
            self.last_noise = (*noise, sq / (scale * divisor) ** 2, self.last_weight_total)
        if nonfinite:
            return None
        coef = 1.0
        if max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s formula, on the unscaled, normalised norm
            coef = min(1.0, max_norm / (math.sqrt(sq) * inv + 1e-6))
        return inv * coef

    def reduce_across_ranks(self, divisor: float, nonfinite: bool, sharded_sq: float = 0.0,
                            live: Optional[List[bool]] = None,
                            noise: Optional[List[float]] = None) -> Tuple[float, bool, float]:
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
        tail = list(noise) if noise is not None else []  # the noise scale's (S1, W_R, k): sums
        t = torch.tensor(head + tail + [float(x) for x in (live or [])], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        values = t.tolist()
        weight_sum, any_nonfinite, sharded_sq = values[:3]
        if noise is not None:
            noise[:] = values[3 : 3 + len(tail)]
        if live is not None:
            live[:] = [x > 0 for x in values[3 + len(tail):]]
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

    # ----------------------------------------------------------------- on the device
    def _device_divisor(self) -> Union[float, Tensor]:
        """This rank's divisor: a float, or a device tensor when tensor weights were passed."""
        if not self.weighted:
            return float(self.accumulation_steps)
        if self.weight_sum_t is None:
            return self.weight_sum
        return self.weight_sum_t + self.weight_sum if self.weight_sum else self.weight_sum_t

    def _device_tensor(self, x: Optional[Tensor]) -> Optional[Tensor]:
        return None if x is None else x.reshape(()).to(self.state.device, torch.float32)

    def _device_inputs(self, found_inf: Optional[Tensor], noise: Optional[Tuple[Any, Any, float]] = None
                       ) -> Tuple[Union[float, Tensor], Optional[Tensor], Optional[Tuple[Any, Any, Any]]]:
        """(divisor, found-inf flag, noise sums) for finalize, reduced across ranks on the device
        (the divisor is then an fp64 tensor: :func:`_fp32` makes the kernel's argument)."""
        divisor = self._device_divisor()
        flags = [f for f in (found_inf, self.bad_weight_t) if f is not None]
        flag = None
        if flags:
            flag = torch.stack([self._device_tensor(f) for f in flags]).sum()
        world = dist_world()
        if world is not None:
            size, _ = world
            # one small all-reduce of (weight sum, found-inf[, the noise scale's sums]), queued
            # on the device (no sync); float64, so token counts stay exact beyond 2**24
            parts = [divisor if self.weighted else 0.0, flag if flag is not None else 0.0, *(noise or ())]
            t = torch.stack([_fp64_on(self.state.device, x) for x in parts])
            torch.distributed.all_reduce(t)
            divisor = t[0] / size if self.weighted else divisor
            flag = t[1].float()
            if noise is not None:
                noise = (t[2], t[3], t[4])
        return divisor, flag, noise

    def finalize_on_device(self, partials: Optional[Tensor], steps: Tensor, step_index: Tensor, *,
                           grad_scaler_scale: Optional[Tensor], found_inf: Optional[Tensor],
                           max_grad_norm: Optional[float], written_scale: float = 1.0) -> None:
        """Compute the multiplier, the skip flag, the norm, the loss scale and the step counts
        into the window's device state (one kernel); ``partials`` are the buckets' sums of
        squares, None when nothing needs the norm.

        When the noise scale is measured, also queue (no sync) the window's noise sums and
        ``|G_B|²`` into :attr:`last_noise`, and into :attr:`last_applied` whether finalize let
        the step through. ``written_scale``: a factor the buffers hold that is not part of the
        gradient (a trainer's clip through bf16/fp16 ``p.grad`` views, written before the step):
        ``|G_B|²`` leaves it out, as on the host."""
        gs = self._device_tensor(grad_scaler_scale)
        measure = self.measure_norm and partials is not None
        noise, big_sumsq = None, None
        if measure:
            # the scale the losses were multiplied by: read (queued) before finalize updates it
            scale: Any = self.scaler.scale_tensor() if (self.scaler is not None and self.weighted) else 1.0
            if gs is not None:
                scale = scale * gs
            noise = self.noise_totals(scale)
        divisor, flag, noise = self._device_inputs(found_inf, noise)
        if measure:
            big_sumsq = _div_sq(partials.sum(dtype=torch.float64), scale, divisor, written_scale)
        max_norm = self.clip_request if self.clip_request is not None else max_grad_norm
        self.kernels.finalize(
            partials, self.state, steps, step_index, weight_divisor=_fp32(divisor), max_norm=max_norm,
            grad_scale=gs, found_inf=flag, check_finite=partials is not None,
            dynamic=self.scaler is not None and self.scaler.dynamic, scale_applied=self.weighted,
            **({} if self.scaler is None else dict(growth_factor=self.scaler.growth_factor,
                                                 backoff_factor=self.scaler.backoff_factor,
                                                 growth_interval=self.scaler.growth_interval)),
        )
        self.last_noise, self.last_applied = None, None
        if measure:
            world = dist_world()
            ref = self.weight_ref if (self.weighted and self.weight_ref is not None) else 1.0
            self.last_noise = (*noise, big_sumsq, divisor * (world[0] if world else 1) * ref)
            self.last_applied = self.state[self.kernels.W_SKIP] == 0

    def device_grad_norm(self, partials: Tensor) -> Tensor:
        """The unscaled, normalised norm from the buckets' partial sums of squares, on the device."""
        divisor, _, _ = self._device_inputs(None)
        scale = self.scaler.scale_tensor() if (self.scaler is not None and self.weighted) else 1.0
        return partials.double().sum().sqrt().float() / (scale * _fp32(divisor))

    def needs_norm(self, grad_scaler_scale: Optional[Any], max_grad_norm: Optional[float]) -> bool:
        """Whether the step needs the norm pass (loss scaling's inf check, or clipping)."""
        max_norm = self.clip_request if self.clip_request is not None else max_grad_norm
        return (self.scaler is not None or grad_scaler_scale is not None or max_norm is not None
                or self.measure_norm)

    def skipped_on_device(self) -> int:
        return int(self.state[self.kernels.W_SKIPPED]) if self.resident else 0

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        weight_sum = self.weight_sum
        if self.weight_sum_t is not None:  # a checkpoint reads the device sum (a sync, as any save)
            weight_sum += float(self.weight_sum_t)
        return {
            "micro_step": self.micro_step,
            "weight_sum": weight_sum,
            "weighted": self.weighted,
            "weight_ref": float(self.weight_ref) if isinstance(self.weight_ref, Tensor) else self.weight_ref,
            "clip_request": self.clip_request,
        }

    def check_state(self, sd: Dict[str, Any]) -> None:
        """Refuse a saved window that would become NaN weights, a stall or an IndexError."""
        for key in ("micro_step", "weight_sum", "weighted"):
            if key not in sd:
                raise ValueError(f"the state_dict's accumulation window lacks {key!r}: it is corrupt or not fastaccum's")
        ms = sd["micro_step"]
        if isinstance(ms, bool) or not isinstance(ms, int) or not 0 <= ms < self.accumulation_steps:
            raise ValueError(f"the state_dict's micro_step is {ms!r}, outside [0, accumulation_steps="
                             f"{self.accumulation_steps}): the checkpoint is corrupt or was saved with a larger "
                             "accumulation_steps (finish the window before changing it)")
        ws = sd["weight_sum"]
        if not isinstance(ws, (int, float)) or isinstance(ws, bool) or not (math.isfinite(ws) and ws >= 0):
            raise ValueError(f"the state_dict's weight_sum is {ws!r}; it must be a finite number >= 0")
        if sd["weighted"] and not ws > 0:
            raise ValueError(f"the state_dict's window is weighted but its weight_sum is {ws!r}; it must be > 0")
        ref = sd.get("weight_ref")
        if ref is not None and not (isinstance(ref, (int, float)) and math.isfinite(ref) and ref > 0):
            raise ValueError(f"the state_dict's weight_ref is {ref!r}; it must be a finite number > 0")
        clip = sd.get("clip_request")
        if clip is not None and not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip > 0):
            raise ValueError(f"the state_dict's clip_request is {clip!r}; it must be a finite number > 0 or None")

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state(sd)
        self.micro_step = int(sd["micro_step"])
        self.weight_sum = float(sd["weight_sum"])
        self.weighted = bool(sd["weighted"])
        # a window saved before weights had a unit counted them in absolute terms (unit 1)
        self.weight_ref = sd.get("weight_ref", 1.0 if self.weighted else None)
        self.clip_request = sd.get("clip_request")
