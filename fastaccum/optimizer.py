"""The optimizers: state management around the backends' fused kernels.

The math lives in :mod:`fastaccum.reference` (and the kernels that match it); this module
only decides *what* to update and with which single gradient multiplier:

    multiplier = clip_coef / (loss_scale * weight_divisor)

so that unscaling, token-weighted normalisation and clipping never cost a pass of their
own. A step is at most two passes over the buffers: one read-only norm/inf pass (only when
a loss scale or clipping asks for it) and the fused update pass, which also zeroes the
accumulation buffer.
"""
from __future__ import annotations

import math
import warnings
import weakref
from numbers import Number
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import (
    AdamHyper,
    AdamSegments,
    BackendUnavailableError,
    SGDHyper,
    SGDSegments,
    get_backend,
    resolve_backend,
)
from .buffers import Bucket
from .scaling import LossScaler, LossScaleArg

__all__ = ["AccumOptimizer", "AdamW", "Adam", "SGD"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_FORMAT_VERSION = 1


def _is_number(x: Any) -> bool:
    return isinstance(x, Number) and not isinstance(x, bool)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have one element, got shape {tuple(value.shape)}")
        return float(value.item())
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} ({value!r})")
    return float(value)


def _check_nonneg(name: str, value: Any) -> float:
    v = _as_float(name, value)
    if not (v >= 0.0) or math.isinf(v):  # `not >=` also rejects NaN
        raise ValueError(f"Invalid {name}: {v}; it must be a finite number >= 0")
    return v


def _dist_world():
    """The default process group's (world size, backend) when torch.distributed runs, else None."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size(), dist.get_backend()
    return None


class AccumOptimizer(torch.optim.Optimizer):
    """Base class: flat fp32 accumulation buckets, loss scaling, normalisation, clipping.

    Subclasses give the per-group hyper-parameter checks (:meth:`_check_group`), the state
    they keep (:meth:`_state_spec`) and the backend call (:meth:`_update_bucket`).
    """

    # torch.amp.GradScaler.step(opt) then hands us `grad_scale`/`found_inf` instead of
    # unscaling .grad itself: the unscale is folded into our update multiplier.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        defaults: Dict[str, Any],
        *,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        loss_scale: LossScaleArg = None,
        master_weights: bool = True,
        state_dtype: torch.dtype = torch.float32,
        backend: Optional[str] = "auto",
        step_in_backward: bool = False,
    ) -> None:
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int):
            raise TypeError(f"Invalid accumulation_steps: {accumulation_steps!r}; pass an int >= 1")
        if accumulation_steps < 1:
            raise ValueError(
                f"Invalid accumulation_steps: {accumulation_steps}; it must be >= 1 (1 = step on every step() call)"
            )
        if max_grad_norm is not None:
            max_grad_norm = _as_float("max_grad_norm", max_grad_norm)
            if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
                raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}; it must be a finite number > 0, or None")
        if state_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"Invalid state_dtype: {state_dtype}; use torch.float32 or torch.bfloat16")
        if not isinstance(master_weights, bool):
            raise TypeError(f"Invalid master_weights: {master_weights!r}; pass True or False")
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"Invalid backend: {backend!r}; pass a name such as 'auto', 'torch' or 'cpu'")
        scaler = LossScaler.from_arg(loss_scale)
        if step_in_backward:
            if accumulation_steps != 1:
                raise ValueError(
                    "step_in_backward=True updates each parameter during backward, so it cannot accumulate: "
                    "use accumulation_steps=1 (or step_in_backward=False)"
                )
            if max_grad_norm is not None:
                raise ValueError(
                    "step_in_backward=True cannot clip by the global norm (parameters are updated before all "
                    "gradients exist): drop max_grad_norm or use step_in_backward=False"
                )
            if scaler is not None and scaler.dynamic:
                raise ValueError(
                    "step_in_backward=True cannot skip a whole step on inf/nan: use a static loss_scale, "
                    "bf16 parameters (no scaling needed) or step_in_backward=False"
                )

        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.step_in_backward = bool(step_in_backward)
        self.skipped_steps = 0
        self._scaler = scaler
        self._backend_request = backend
        self._buckets: List[Bucket] = []
        self._where: Dict[Tensor, Tuple[int, int]] = {}  # param -> (bucket index, position)
        self._hook_handles: List[Any] = []
        self._micro_step = 0
        self._weight_sum = 0.0
        self._weighted = False  # scale_loss()/backward() was used in this window
        self._norm_cache: Optional[float] = None  # raw buffer norm, valid until new gradients arrive
        self._clip_request: Optional[float] = None  # max_norm from clip_grad_norm_ for this window
        self._warned_low_precision_ddp = False
        super().__init__(params, defaults)
        weakref.finalize(self, _remove_hooks, self._hook_handles)

    # ------------------------------------------------------------------ setup
    def _check_group(self, group: Dict[str, Any]) -> None:
        raise NotImplementedError

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs; pass a list")
        else:
            params = list(params)
        # Everything is checked before anything is registered, so a bad group leaves the
        # optimizer as it was.
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"fastaccum optimizes Tensors, got {type(p).__name__}")
            if p.is_complex():
                raise TypeError(f"fastaccum does not support complex parameters (got {p.dtype}); "
                                "view them as real with torch.view_as_real")
            if not p.is_floating_point():
                raise TypeError(f"fastaccum optimizes floating-point parameters, got a {p.dtype} parameter of "
                                f"shape {tuple(p.shape)}; leave integer tensors out of the optimizer")
            if p.dtype not in (torch.float32, *_LOW_PRECISION):
                raise TypeError(f"fastaccum supports float32, bfloat16 and float16 parameters, got {p.dtype}")
            if p.dtype == torch.float16 and not self.master_weights:
                raise ValueError("master_weights=False is supported for bfloat16 parameters only (stochastic "
                                 "rounding); float16 parameters need master_weights=True")
        merged = {**self.defaults, **param_group}
        self._check_group(merged)
        backends = {p.device: resolve_backend(self._backend_request, p.device) for p in params}

        super().add_param_group({**param_group, "params": params})
        group_index = len(self.param_groups) - 1
        by_key: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
        for p in self.param_groups[-1]["params"]:
            by_key.setdefault((p.device, p.dtype), []).append(p)
        for (device, _), ps in by_key.items():
            self._add_bucket(Bucket(ps, group_index, backends[device], with_buffer=not self.step_in_backward))

    def _add_bucket(self, bucket: Bucket) -> None:
        bi = len(self._buckets)
        self._buckets.append(bucket)
        ref = weakref.ref(self)
        for i, p in enumerate(bucket.params):
            self._where[p] = (bi, i)
            if p.requires_grad:
                self._hook_handles.append(p.register_post_accumulate_grad_hook(_make_hook(ref, bi, i)))
            if bucket.grad is None:
                continue
            existing = p.grad
            if bucket.low_precision:
                p.main_grad = bucket.grad_views[i]
            if existing is not None:  # gradients computed before the optimizer existed are kept
                bucket.assign(i, existing)
                p.grad = None if bucket.low_precision else bucket.grad_views[i]
            # Otherwise an fp32 p.grad stays None until the parameter's first gradient, which
            # the hook moves into the view: a parameter that never gets a gradient keeps
            # p.grad None, as with torch.optim (code that tests `p.grad is None` still works).
            # Invariant: an fp32 p.grad is our view only while its segment is fresh, so
            # autograd never adds into a stale segment.

    # --------------------------------------------------------------- gradients
    def _check_grad(self, bucket: Bucket, p: Tensor, g: Tensor) -> None:
        if g.is_sparse:
            raise TypeError(f"fastaccum does not support sparse gradients (parameter of shape {tuple(p.shape)}); "
                            "use nn.Embedding(..., sparse=False) or torch.optim.SparseAdam")
        if g.is_complex():
            raise TypeError(f"fastaccum does not support complex gradients (parameter of shape {tuple(p.shape)})")
        if p.device != bucket.device or g.device != bucket.device:
            raise ValueError(
                f"a parameter of shape {tuple(p.shape)} is on {p.device} (gradient on {g.device}) but was on "
                f"{bucket.device} when the optimizer was created; create the optimizer after model.to(device)"
            )

    def _grad_ready(self, bi: int, i: int, p: Tensor) -> None:
        """Post-accumulate-grad hook: fold what autograd produced into the fp32 buffer."""
        bucket = self._buckets[bi]
        g = p.grad
        if g is None:
            return
        self._check_grad(bucket, p, g)
        if self.step_in_backward:
            # the gradient is used once, here, and released: none outlives its backward
            scale, divisor = self._window_scale_divisor()
            g32 = g.to(torch.float32, memory_format=torch.contiguous_format).view(p.shape)
            with torch.no_grad():
                self._update_bucket(bucket, [i], 1.0 / (scale * divisor), grads=[g32])
            p.grad = None
            return
        if bucket.low_precision:
            bucket.receive(i, g)  # add into a fresh segment, overwrite a stale one
            p.grad = None  # the bf16/fp16 gradient never outlives this hook
        elif not bucket.owns_grad(i, g):
            # p.grad was None (the first micro-batch of a window, or model.zero_grad()) or
            # replaced: autograd handed over the whole gradient, so it replaces the segment
            # (a copy, where accumulating into a zeroed buffer would be an add).
            bucket.assign(i, g)
            p.grad = bucket.grad_views[i]
        # (an fp32 gradient autograd added into our view needs no bookkeeping: the view is
        # attached only while its segment is fresh, hence live)
        self._norm_cache = None

    def _fold_grads(self) -> None:
        """Make the buffers hold exactly what the user means as gradient now.

        fastaccum never assumes it owns ``p.grad``: a tensor there that is not our view
        (assigned by the user, by gradient surgery, or by a trainer) replaces the segment, a
        ``None`` on an fp32 parameter means "no gradient" (skipped, like torch.optim), and the
        fp32 view is attached again.
        """
        for bucket in self._buckets:  # check everything first: a bad gradient changes nothing
            for i, p in enumerate(bucket.params):
                g = p.grad
                if p.device != bucket.device or (g is not None and not bucket.owns_grad(i, g)):
                    self._check_grad(bucket, p, p if g is None else g)
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                g = p.grad
                if g is None:
                    # no gradient this window (or cleared by model.zero_grad()): skipped.
                    # bf16/fp16 gradients always live in the buffer, so only a stale
                    # segment means none arrived.
                    if not bucket.low_precision:
                        bucket.consume(i)
                        bucket.live[i] = False
                    elif not bucket.fresh[i]:
                        bucket.live[i] = False
                elif not bucket.owns_grad(i, g):
                    bucket.assign(i, g)
                    p.grad = None if bucket.low_precision else bucket.grad_views[i]
                    self._norm_cache = None

    # ------------------------------------------------------------ user API
    @property
    def loss_scale(self) -> Optional[float]:
        """The current loss scale, or None without loss scaling."""
        return self._scaler.scale if self._scaler is not None else None

    @property
    def micro_step(self) -> int:
        """Micro-batches seen in the current accumulation window."""
        return self._micro_step

    @property
    def sync_gradients(self) -> bool:
        """True when the next ``step()`` updates: use it to skip DDP's all-reduce (``no_sync``) otherwise."""
        return self._micro_step + 1 >= self.accumulation_steps

    def scale_loss(self, loss: Tensor, weight: Union[None, float, Tensor] = None) -> Tensor:
        """``loss * loss_scale * weight``, recording ``weight`` for the normalisation.

        With ``weight=n_tokens`` of a micro-batch whose ``loss`` is a mean over its tokens,
        the update uses the exact token mean over the whole accumulated batch, however the
        tokens are spread over micro-batches (the divisor is known only at step time, so it
        is applied there, folded into the update).
        """
        if not isinstance(loss, Tensor):
            raise TypeError(f"Invalid loss: expected a Tensor, got {type(loss).__name__}")
        if weight is None:
            w = 1.0
        else:
            w = _as_float("weight", weight)
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"Invalid weight: {w}; a micro-batch weight (e.g. its token count) must be a "
                                 "finite number > 0; skip empty micro-batches instead of passing 0")
        if self.step_in_backward:
            self._weight_sum = w  # every backward is its own step
        else:
            self._weight_sum += w
        self._weighted = True
        factor = w * (self._scaler.scale if self._scaler is not None else 1.0)
        return loss * factor if factor != 1.0 else loss

    def backward(self, loss: Tensor, weight: Union[None, float, Tensor] = None, **backward_kwargs: Any) -> None:
        """``scale_loss(loss, weight).backward()``."""
        self.scale_loss(loss, weight).backward(**backward_kwargs)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip by the global L2 norm at the next update; return the total norm now.

        The norm is that of the gradient the update will use (unscaled and normalised), like
        ``torch.nn.utils.clip_grad_norm_`` after ``GradScaler.unscale_``. It is computed once:
        the step reuses it instead of a second norm pass.
        """
        max_norm = _as_float("max_norm", max_norm)
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"Invalid max_norm: {max_norm}; it must be a finite number > 0")
        if float(norm_type) != 2.0:
            raise ValueError(f"Invalid norm_type: {norm_type}; fastaccum clips by the L2 norm (norm_type=2.0)")
        if self.step_in_backward:
            raise RuntimeError("clip_grad_norm_ cannot work with step_in_backward=True: parameters are already "
                               "updated during backward")
        self._fold_grads()
        scale, divisor = self._window_scale_divisor()
        raw = self._raw_norm()
        divisor, _ = self._sync_ranks(divisor, not math.isfinite(raw))
        total = raw / (scale * divisor)
        self._clip_request = max_norm
        device = self._buckets[0].device if self._buckets else torch.device("cpu")
        return torch.tensor(total, dtype=torch.float32, device=device)

    clip_grad_norm = clip_grad_norm_  # the name some trainers look for

    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients, as ``torch.optim.Optimizer.zero_grad`` does.

        ``set_to_none=True`` (the default) costs no memory pass: the buffer is kept (no
        re-allocation) and its segments become stale, to be overwritten by the next
        gradients. ``set_to_none=False`` gives every parameter that has a gradient a zero
        one, which the next step applies (weight decay, momentum) as torch does.
        In managed mode (``accumulation_steps > 1``) this is a no-op while a window is in
        progress, so ``zero_grad()`` may be called after every micro-batch.
        """
        if self._micro_step != 0 or self.step_in_backward:
            return
        for bucket in self._buckets:
            for i, p in enumerate(bucket.params):
                if set_to_none:
                    bucket.consume(i)
                    bucket.live[i] = False
                    p.grad = None
                elif bucket.live[i] or p.grad is not None:
                    bucket.zero_segment(i)
                    p.grad = None if bucket.low_precision else bucket.grad_views[i]
        self._end_window()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None) -> Any:
        """Count a micro-batch; on the last one of the window, update every parameter.

        ``grad_scale``/``found_inf`` are what ``torch.amp.GradScaler`` provides (it sets them
        as attributes when driving this optimizer); they are folded into the same update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if self.step_in_backward:
            return loss
        if self._micro_step + 1 < self.accumulation_steps:
            self._micro_step += 1
            return loss
        # the window's last micro-batch; if the update refuses bad input, nothing (not even
        # the micro-step count) has changed and step() can be called again
        self._update(grad_scale, found_inf)
        return loss

    # --------------------------------------------------------------- internals
    def _window_scale_divisor(self) -> Tuple[float, float]:
        """(loss scale applied to the buffers, this rank's normalisation divisor) for the window.

        The divisor is the sum of the micro-batch weights when ``scale_loss``/``backward`` was
        used; otherwise the number of micro-batches in managed mode, or 1 in the classic loop
        (where the user has already divided the loss).
        """
        if self._weighted:
            return (self._scaler.scale if self._scaler is not None else 1.0), self._weight_sum
        return 1.0, float(self.accumulation_steps)

    def _sync_ranks(self, divisor: float, nonfinite: bool) -> Tuple[float, bool]:
        """One small all-reduce of (weight sum, found-inf) when torch.distributed runs.

        DDP averages gradients over ranks, so the global token-weighted mean is
        ``world_size * grad / sum_r(weights_r)``: exact even when ranks saw different token
        counts. The found-inf flag is shared so that every rank skips together.
        """
        world = _dist_world()
        if world is None:
            return divisor, nonfinite
        size, backend = world
        if not self._warned_low_precision_ddp and any(b.low_precision for b in self._buckets):
            # DDP reads p.grad after our hook has folded and released it, so it reduces
            # zeros for these parameters: the replicas would silently drift apart.
            warnings.warn(
                "fastaccum: bf16/fp16 parameters are not averaged across ranks yet (their gradient "
                "lives in the fp32 buffer, which DDP does not see); keep fp32 parameters under DDP "
                "and use torch.autocast for bf16 compute",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_low_precision_ddp = True
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        t = torch.tensor([divisor if self._weighted else 0.0, float(nonfinite)], dtype=torch.float32, device=device)
        torch.distributed.all_reduce(t)
        weight_sum, any_nonfinite = t.tolist()
        return (weight_sum / size if self._weighted else divisor), any_nonfinite > 0

    def _raw_norm(self) -> float:
        """L2 norm of all raw buffers (one read pass); non-finite when any element is."""
        if self._norm_cache is None:
            for b in self._buckets:  # stale segments count as zeros
                b.clean()
            norms = [b.backend.grad_norm(b.grad) for b in self._buckets]
            if not norms:
                self._norm_cache = 0.0
            elif len(norms) == 1:
                self._norm_cache = float(norms[0].item())
            else:
                dev = norms[0].device
                self._norm_cache = float(torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms])).item())
        return self._norm_cache

    def _check_groups(self) -> None:
        for group in self.param_groups:
            self._check_group(group)

    def _update(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        self._check_groups()  # a NaN lr set by hand is refused before anything changes
        self._fold_grads()
        scale, divisor = self._window_scale_divisor()
        if grad_scale is not None:
            scale *= _as_float("grad_scale", grad_scale)
        max_norm = self._clip_request if self._clip_request is not None else self.max_grad_norm
        external_inf = found_inf is not None and _as_float("found_inf", found_inf) > 0
        # the read-only norm pass runs only when something needs it; it is also the inf check
        need_norm = self._scaler is not None or grad_scale is not None or max_norm is not None
        raw = self._raw_norm() if need_norm else 0.0
        divisor, nonfinite = self._sync_ranks(divisor, external_inf or not math.isfinite(raw))
        if nonfinite:
            self._skip()
            return
        inv = 1.0 / (scale * divisor)
        coef = 1.0
        if max_norm is not None:
            # torch.nn.utils.clip_grad_norm_'s formula, on the unscaled, normalised norm
            coef = min(1.0, max_norm / (raw * inv + 1e-6))
        multiplier = inv * coef
        for bucket in self._buckets:
            live = [i for i, is_live in enumerate(bucket.live) if is_live]
            if live:
                # a live parameter without a fresh segment has a zero gradient
                bucket.clean([i for i in live if not bucket.fresh[i]])
                self._update_bucket(bucket, live, multiplier)
            self._consume(bucket)
        if self._scaler is not None:
            self._scaler.update(found_inf=False)
        self._end_window()

    def _consume(self, bucket: Bucket) -> None:
        """The window's gradients are used: segments go stale, fp32 views are detached so
        that the next backward hands autograd's gradient over instead of adding to them."""
        for i, p in enumerate(bucket.params):
            bucket.consume(i)
            if p.grad is not None and bucket.owns_grad(i, p.grad):
                p.grad = None

    def _skip(self) -> None:
        """inf/nan in the gradients: no parameter or state changes, the window is dropped."""
        for bucket in self._buckets:
            self._consume(bucket)
        self.skipped_steps += 1
        if self._scaler is not None:
            self._scaler.update(found_inf=True)
        self._end_window()

    def _end_window(self) -> None:
        self._micro_step = 0
        self._weight_sum = 0.0
        self._weighted = False
        self._norm_cache = None
        self._clip_request = None

    def _state_spec(self, group: Dict[str, Any]) -> List[Tuple[str, torch.dtype]]:
        """(state key, dtype) of the flat state this optimizer keeps, besides 'step'."""
        raise NotImplementedError

    def _prepare_state(self, bucket: Bucket, idx: Sequence[int]) -> Dict[str, List[Tensor]]:
        """Flat state for the bucket (allocated once) and per-parameter state views."""
        group = self.param_groups[bucket.group_index]
        spec = list(self._state_spec(group))
        if bucket.low_precision and self.master_weights:
            spec.append(("master_param", torch.float32))
        views = {name: bucket.allocate_state(name, dtype) for name, dtype in spec}
        for i in idx:
            p = bucket.params[i]
            st = self.state[p]
            if not st:
                st["step"] = bucket.steps[i]
                for name, _ in spec:
                    st[name] = views[name][i]
                if "master_param" in views:
                    # the master starts from the parameter as it is at its first update, so
                    # weights loaded after the optimizer was built are picked up
                    views["master_param"][i].copy_(p.detach())
        bucket.steps[list(idx)] += 1
        return views

    def _rng_seed(self, needed: bool) -> int:
        # stochastic rounding draws its seed from torch's RNG: runs are reproducible
        # under torch.manual_seed and differ from step to step.
        return int(torch.randint(0, 2**62, (1,)).item()) if needed else 0

    def _stochastic(self, bucket: Bucket) -> bool:
        return self.state_dtype == torch.bfloat16 or (bucket.dtype == torch.bfloat16 and not self.master_weights)

    def _update_bucket(
        self, bucket: Bucket, idx: Sequence[int], multiplier: float, grads: Optional[List[Tensor]] = None
    ) -> None:
        """Update parameters ``idx`` of the bucket from their buffer segments (or ``grads``)."""
        raise NotImplementedError

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        sd["fastaccum"] = {
            "version": _STATE_FORMAT_VERSION,
            "layout": [b.layout() for b in self._buckets],
            # only mid-window buffers hold gradients; a checkpoint taken after a step (the
            # usual case) does not carry 4 bytes/param of stale values
            "grad_buffers": [b.grad if any(b.fresh) else None for b in self._buckets],
            "live": [list(b.live) for b in self._buckets],
            "fresh": [list(b.fresh) for b in self._buckets],
            "micro_step": self._micro_step,
            "weight_sum": self._weight_sum,
            "weighted": self._weighted,
            "clip_request": self._clip_request,
            "skipped_steps": self.skipped_steps,
            "loss_scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a fastaccum state_dict, or a ``torch.optim`` one of the same optimizer kind.

        Everything is checked before anything changes. Unlike ``torch.optim``, state is not
        cast to the parameter dtype: fp32 moments and master weights of bf16 parameters stay fp32.
        """
        extra = state_dict.get("fastaccum")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}: it was saved for another parameter layout")
        index_to_param: Dict[int, Tensor] = {}
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"a parameter group has {len(g['params'])} parameters here but "
                                 f"{len(sg['params'])} in the state_dict: it was saved for another parameter layout")
            index_to_param.update(zip(sg["params"], g["params"]))
        for key, st in state_dict["state"].items():
            p = index_to_param.get(key)
            if p is None:
                raise ValueError(f"state_dict has state for parameter index {key!r}, which no group names")
            for name, v in st.items():
                if name != "step" and isinstance(v, Tensor) and v.numel() != p.numel():
                    raise ValueError(f"state {name!r} has {v.numel()} elements but its parameter has {p.numel()} "
                                     f"(shape {tuple(p.shape)}): the state_dict was saved for another parameter layout")
        if extra is not None:
            layout = [b.layout() for b in self._buckets]
            if [list(x) for x in extra["layout"]] != layout:
                raise ValueError("the state_dict's accumulation buffers were saved for another parameter layout "
                                 f"(saved {extra['layout']}, here {layout})")
        # torch restores the groups' hyper-parameters (and their hooks); state is ours to place.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for bucket in self._buckets:  # parameters without saved state start afresh
            bucket.steps.zero_()
            for flat in bucket.flat_state.values():
                flat.zero_()
        for key, st in state_dict["state"].items():
            p = index_to_param[key]
            bi, i = self._where[p]
            bucket = self._buckets[bi]
            group = self.param_groups[bucket.group_index]
            spec = dict(self._state_spec(group))
            if bucket.low_precision and self.master_weights:
                spec["master_param"] = torch.float32
            state = self.state[p]
            state["step"] = bucket.steps[i]
            bucket.steps[i] = float(st["step"]) if "step" in st else 0.0
            for name, dtype in spec.items():
                view = bucket.allocate_state(name, dtype)[i]
                if name in st:
                    view.copy_(st[name].reshape(view.shape))
                elif name == "master_param":
                    view.copy_(p.detach())
                else:
                    view.zero_()
                state[name] = view
        if extra is not None:
            for b, buf, live, fresh in zip(self._buckets, extra["grad_buffers"], extra["live"], extra["fresh"]):
                b.live = list(live)
                if b.grad is None:  # step_in_backward: no buffer
                    continue
                if buf is not None:
                    b.grad.copy_(buf)
                b.fresh = list(fresh)
                b.garbage = [not f for f in b.fresh]  # whatever the buffer held before is stale
                for i, p in enumerate(b.params):
                    # the restored partial gradients are what p.grad shows; nothing else is attached
                    if b.fresh[i] and not b.low_precision:
                        p.grad = b.grad_views[i]
                    elif p.grad is not None and b.owns_grad(i, p.grad):
                        p.grad = None
            self._micro_step = int(extra["micro_step"])
            self._weight_sum = float(extra["weight_sum"])
            self._weighted = bool(extra["weighted"])
            self._clip_request = extra.get("clip_request")
            self.skipped_steps = int(extra["skipped_steps"])
            if self._scaler is not None and extra["loss_scaler"] is not None:
                self._scaler.load_state_dict(extra["loss_scaler"])
        self._norm_cache = None


def _make_hook(ref: "weakref.ref[AccumOptimizer]", bi: int, i: int) -> Callable[[Tensor], None]:
    # The hook holds the optimizer weakly: a dropped optimizer frees its buffers.
    def hook(p: Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._grad_ready(bi, i, p)

    return hook


def _remove_hooks(handles: List[Any]) -> None:
    for h in handles:
        h.remove()


def _check_betas(betas: Any) -> Tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {betas!r}; pass two numbers (beta1, beta2) in [0, 1)") from None
    b1, b2 = _as_float("betas[0]", b1), _as_float("betas[1]", b2)
    for k, b in ((0, b1), (1, b2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"Invalid beta parameter at index {k}: {b}; betas must be in [0, 1)")
    return b1, b2


class Adam(AccumOptimizer):
    """Adam with flat fp32 accumulation and a fused update (``decoupled_weight_decay=True`` is AdamW).

    Same arguments and defaults as :class:`torch.optim.Adam`, plus the keyword-only fastaccum
    extras of :class:`AccumOptimizer`. ``foreach``/``fused`` are accepted for drop-in use and
    ignored: the update is always one fused pass.
    """

    _decoupled_default = False

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
        decoupled_weight_decay: Optional[bool] = None,
        accumulation_steps: int = 1,
        max_grad_norm: Optional[float] = None,
        loss_scale: LossScaleArg = None,
        master_weights: bool = True,
        state_dtype: torch.dtype = torch.float32,
        backend: Optional[str] = "auto",
        step_in_backward: bool = False,
    ) -> None:
        if capturable or differentiable:
            raise ValueError("capturable=True and differentiable=True are not supported by fastaccum; "
                             "use torch.optim.Adam for CUDA-graph capture or differentiable optimizers")
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._decoupled_default
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=False, differentiable=False, fused=fused,
            decoupled_weight_decay=bool(decoupled_weight_decay),
        )
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            loss_scale=loss_scale, master_weights=master_weights, state_dtype=state_dtype, backend=backend,
            step_in_backward=step_in_backward,
        )

    def _check_group(self, group: Dict[str, Any]) -> None:
        _check_nonneg("lr", group["lr"])
        _check_betas(group["betas"])
        eps = _as_float("eps", group["eps"])
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"Invalid epsilon value: {eps}; eps must be a finite number > 0 (e.g. 1e-8)")
        _check_nonneg("weight_decay", group["weight_decay"])

    def _state_spec(self, group: Dict[str, Any]) -> List[Tuple[str, torch.dtype]]:
        spec = [("exp_avg", self.state_dtype), ("exp_avg_sq", self.state_dtype)]
        if group["amsgrad"]:
            spec.append(("max_exp_avg_sq", self.state_dtype))
        return spec

    def _update_bucket(
        self, bucket: Bucket, idx: Sequence[int], multiplier: float, grads: Optional[List[Tensor]] = None
    ) -> None:
        group = self.param_groups[bucket.group_index]
        views = self._prepare_state(bucket, idx)
        steps = bucket.steps.tolist()
        pick = lambda name: [views[name][i] for i in idx] if name in views else None  # noqa: E731
        segs = AdamSegments(
            params=[bucket.params[i] for i in idx],
            grads=grads if grads is not None else [bucket.grad_views[i] for i in idx],
            exp_avgs=pick("exp_avg"),
            exp_avg_sqs=pick("exp_avg_sq"),
            max_exp_avg_sqs=pick("max_exp_avg_sq"),
            masters=pick("master_param"),
            steps=[int(steps[i]) for i in idx],
        )
        beta1, beta2 = _check_betas(group["betas"])
        stochastic = self._stochastic(bucket)
        hp = AdamHyper(
            lr=_as_float("lr", group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), decoupled=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]), grad_scale=multiplier, stochastic_rounding=stochastic,
            seed=self._rng_seed(stochastic),
        )
        bucket.backend.adam_(segs, hp)


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2), like :class:`torch.optim.AdamW`."""

    _decoupled_default = True

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
        **extras: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            **extras,
        )


class SGD(AccumOptimizer):
    """SGD with momentum/Nesterov, like :class:`torch.optim.SGD`, with fastaccum's accumulation."""

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
    ) -> None:
        if differentiable:
            raise ValueError("differentiable=True is not supported by fastaccum; use torch.optim.SGD")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=False, fused=fused)
        super().__init__(
            params, defaults, accumulation_steps=accumulation_steps, max_grad_norm=max_grad_norm,
            loss_scale=loss_scale, master_weights=master_weights, state_dtype=torch.float32, backend=backend,
            step_in_backward=step_in_backward,
        )

    def _check_group(self, group: Dict[str, Any]) -> None:
        _check_nonneg("lr", group["lr"])
        momentum = _check_nonneg("momentum", group["momentum"])
        dampening = _as_float("dampening", group["dampening"])
        _check_nonneg("weight_decay", group["weight_decay"])
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")

    def _state_spec(self, group: Dict[str, Any]) -> List[Tuple[str, torch.dtype]]:
        return [("momentum_buffer", torch.float32)] if group["momentum"] != 0 else []

    def _update_bucket(
        self, bucket: Bucket, idx: Sequence[int], multiplier: float, grads: Optional[List[Tensor]] = None
    ) -> None:
        group = self.param_groups[bucket.group_index]
        views = self._prepare_state(bucket, idx)
        steps = bucket.steps.tolist()
        segs = SGDSegments(
            params=[bucket.params[i] for i in idx],
            grads=grads if grads is not None else [bucket.grad_views[i] for i in idx],
            momentum_buffers=[views["momentum_buffer"][i] for i in idx] if "momentum_buffer" in views else None,
            masters=[views["master_param"][i] for i in idx] if "master_param" in views else None,
            steps=[int(steps[i]) for i in idx],
        )
        stochastic = self._stochastic(bucket)
        hp = SGDHyper(
            lr=_as_float("lr", group["lr"]), momentum=float(group["momentum"]),
            dampening=float(group["dampening"]), nesterov=bool(group["nesterov"]),
            weight_decay=float(group["weight_decay"]), maximize=bool(group["maximize"]),
            grad_scale=multiplier, stochastic_rounding=stochastic, seed=self._rng_seed(stochastic),
        )
        bucket.backend.sgd_(segs, hp)
