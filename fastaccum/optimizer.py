"""AccumOptimizer: parameter groups -> buckets, hooks, and the orchestration of a step.

What each part does lives in its own module, and this one only calls them in order:
the window (:mod:`fastaccum.window`) counts micro-batches and computes the one update
multiplier, the buckets (:mod:`fastaccum.buffers`) keep the p.grad/segment protocol, the
algorithms (:mod:`fastaccum.adam`, :mod:`fastaccum.sgd`) say which state they keep and
which kernel they call, and a backend (:mod:`fastaccum.backends`) runs the kernels.

A step is at most two passes over the buffers: one read-only norm/inf pass (only when a
loss scale or clipping asks for it) and the fused update pass. The buffer is never zeroed:
the update only reads it, and its consumed segments go stale until the next window's first
gradient overwrites them.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import resolve_backend
from .buffers import Bucket
from .checks import as_float
from .scaling import LossScaler, LossScaleArg
from .window import AccumulationWindow

__all__ = ["AccumOptimizer"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
_STATE_FORMAT_VERSION = 1


class AccumOptimizer(torch.optim.Optimizer):
    """Base class: flat fp32 accumulation buckets, loss scaling, normalisation, clipping.

    Subclasses (one file per algorithm) give the per-group hyper-parameter checks
    (:meth:`_check_group`), the state they keep (:meth:`_state_spec`), the segments and
    hyper-parameters of a bucket's update (:meth:`_segments`, :meth:`_hyper`) and the name
    of the backend kernel that runs it (``_kernel``).
    """

    _kernel: str  # the Backend method that updates a bucket: "adam_" or "sgd_"

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
            max_grad_norm = as_float("max_grad_norm", max_grad_norm)
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
        self._window = AccumulationWindow(accumulation_steps, scaler, self.step_in_backward)
        self._backend_request = backend
        self._buckets: List[Bucket] = []
        self._where: Dict[Tensor, Tuple[int, int]] = {}  # param -> (bucket index, position)
        self._hook_handles: List[Any] = []
        self._norm_cache: Optional[float] = None  # raw buffer norm, valid until new gradients arrive
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
            bucket.adopt(i)

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
            g32 = g.to(torch.float32, memory_format=torch.contiguous_format).view(p.shape)
            with torch.no_grad():
                self._update_bucket(bucket, [i], self._window.unclipped_multiplier(), grads=[g32])
            bucket.release(i)
            return
        bucket.take_from_hook(i)
        self._norm_cache = None

    def _fold_grads(self) -> None:
        """Make the buffers hold exactly what the user means as gradient now (see buffers.py)."""
        for bucket in self._buckets:  # check everything first: a bad gradient changes nothing
            for _, p, g in bucket.foreign_grads():
                self._check_grad(bucket, p, p if g is None else g)
        for bucket in self._buckets:
            if bucket.fold_user_grads():
                self._norm_cache = None

    # ------------------------------------------------------------ user API
    @property
    def loss_scale(self) -> Optional[float]:
        """The current loss scale, or None without loss scaling."""
        return self._scaler.scale if self._scaler is not None else None

    @property
    def micro_step(self) -> int:
        """Micro-batches seen in the current accumulation window."""
        return self._window.micro_step

    @property
    def sync_gradients(self) -> bool:
        """True when the next ``step()`` updates: use it to skip DDP's all-reduce (``no_sync``) otherwise."""
        return self._window.sync_gradients

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
            w = as_float("weight", weight)
            if not (w > 0 and math.isfinite(w)):
                raise ValueError(f"Invalid weight: {w}; a micro-batch weight (e.g. its token count) must be a "
                                 "finite number > 0; skip empty micro-batches instead of passing 0")
        factor = self._window.loss_factor(w)
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
        max_norm = as_float("max_norm", max_norm)
        if not (max_norm > 0 and math.isfinite(max_norm)):
            raise ValueError(f"Invalid max_norm: {max_norm}; it must be a finite number > 0")
        if float(norm_type) != 2.0:
            raise ValueError(f"Invalid norm_type: {norm_type}; fastaccum clips by the L2 norm (norm_type=2.0)")
        if self.step_in_backward:
            raise RuntimeError("clip_grad_norm_ cannot work with step_in_backward=True: parameters are already "
                               "updated during backward")
        self._fold_grads()
        total = self._window.grad_norm(self._raw_norm, self._any_low_precision(), self._deferred_scale())
        self._window.clip_request = max_norm
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
        if self._window.micro_step != 0 or self.step_in_backward:
            return
        for bucket in self._buckets:
            bucket.clear(set_to_none)
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
        if self._window.advance():
            self._update(grad_scale, found_inf)
        return loss

    # --------------------------------------------------------------- internals
    def _any_low_precision(self) -> bool:
        return any(b.low_precision for b in self._buckets)

    def _deferred_scale(self) -> float:
        """The factor trainers applied through bf16/fp16 ``p.grad`` views (``clip_grad_norm_``'s
        ``g.mul_(coef)``) and that the buffers do not hold yet: one factor for the whole
        gradient is folded into the update multiplier (no pass); differing factors (a
        clip over some of the parameters only) are written into the buffers now."""
        scales = {s for b in self._buckets for s in b.pending_scales()}
        if len(scales) <= 1:
            return scales.pop() if scales else 1.0
        for b in self._buckets:
            b.apply_scales()
        self._norm_cache = None
        return 1.0

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
        multiplier = self._window.grad_multiplier(
            self._raw_norm,
            grad_scaler_scale=as_float("grad_scale", grad_scale) if grad_scale is not None else None,
            found_inf=found_inf is not None and as_float("found_inf", found_inf) > 0,
            max_grad_norm=self.max_grad_norm,
            warn_low_precision=self._any_low_precision(),
            deferred_scale=self._deferred_scale(),
        )
        if multiplier is None:
            self._skip()
            return
        for bucket in self._buckets:
            live = bucket.live_indices()
            if live:
                bucket.zero_stale(live)
                self._update_bucket(bucket, live, multiplier)
            bucket.consume_all()
        if self._scaler is not None:
            self._scaler.update(found_inf=False)
        self._end_window()

    def _skip(self) -> None:
        """inf/nan in the gradients: no parameter or state changes, the window is dropped."""
        for bucket in self._buckets:
            bucket.consume_all()
        self.skipped_steps += 1
        if self._scaler is not None:
            self._scaler.update(found_inf=True)
        self._end_window()

    def _end_window(self) -> None:
        self._window.end()
        self._norm_cache = None

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

    def _segments(self, bucket: Bucket, idx: Sequence[int], views: Dict[str, List[Tensor]],
                  grads: List[Tensor], steps: List[int]) -> Any:
        """The backend's segments dataclass for parameters ``idx`` of the bucket."""
        raise NotImplementedError

    def _hyper(self, group: Dict[str, Any], grad_multiplier: float, stochastic_rounding: bool, seed: int) -> Any:
        """The backend's hyper-parameter dataclass for a param group."""
        raise NotImplementedError

    def _update_bucket(
        self, bucket: Bucket, idx: Sequence[int], multiplier: float, grads: Optional[List[Tensor]] = None
    ) -> None:
        """Update parameters ``idx`` of the bucket from their buffer segments (or ``grads``)."""
        group = self.param_groups[bucket.group_index]
        views = self._prepare_state(bucket, idx)
        steps = bucket.steps.tolist()
        segs = self._segments(
            bucket, idx, views,
            grads if grads is not None else [bucket.grad_views[i] for i in idx],
            [int(steps[i]) for i in idx],
        )
        stochastic = self._stochastic(bucket)
        hp = self._hyper(group, multiplier, stochastic, self._rng_seed(stochastic))
        getattr(bucket.backend, self._kernel)(segs, hp)

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> Dict[str, Any]:
        for b in self._buckets:  # a saved buffer holds the gradient as p.grad shows it
            b.apply_scales()
        self._norm_cache = None
        sd = super().state_dict()
        sd["fastaccum"] = {
            "version": _STATE_FORMAT_VERSION,
            "layout": [b.layout() for b in self._buckets],
            # only mid-window buffers hold gradients; a checkpoint taken after a step (the
            # usual case) does not carry 4 bytes/param of stale values
            "grad_buffers": [b.grad if any(b.fresh) else None for b in self._buckets],
            "live": [list(b.live) for b in self._buckets],
            "fresh": [list(b.fresh) for b in self._buckets],
            **self._window.state_dict(),
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
                b.restore(buf, live, fresh)
            self._window.load_state_dict(extra)
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
