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
import warnings
import weakref
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .backends import resolve_backend
from .buffers import Bucket, is_sharded, local
from .checks import as_float
from .scaling import LossScaler, LossScaleArg
from .window import AccumulationWindow, dist_world

__all__ = ["AccumOptimizer", "ddp_comm_hook"]

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
        # squared raw norms (replicated, sharded) of the buffers, valid until new gradients arrive
        self._norm_cache: Optional[Tuple[float, float]] = None
        self._ddp_hooked = False  # ddp_comm_hook has run: DDP reduces our fp32 buffers
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
            _check_param_kind(p)
        merged = {**self.defaults, **param_group}
        self._check_group(merged)
        backends = {p.device: resolve_backend(self._backend_request, p.device) for p in params}

        super().add_param_group({**param_group, "params": params})
        group_index = len(self.param_groups) - 1
        by_key: Dict[Tuple[torch.device, torch.dtype, bool], List[Tensor]] = {}
        for p in self.param_groups[-1]["params"]:  # FSDP2's shards get buckets of their own
            by_key.setdefault((p.device, p.dtype, is_sharded(p)), []).append(p)
        for (device, _, _), ps in by_key.items():
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
        if bucket.sharded and not self.step_in_backward:
            # FSDP2: the state exists from the start (step 0, zero moments), so that a fresh
            # optimizer's state_dict has every entry a checkpoint has. torch.distributed.checkpoint
            # loads *into* that state_dict, and its helpers would otherwise run a fake step()
            # to create it, which inside an accumulation window counts a micro-batch.
            self._prepare_state(bucket, [i for i, p in enumerate(bucket.params) if p.requires_grad], count=False)

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
            g32 = local(g).to(torch.float32, memory_format=torch.contiguous_format).view(bucket.shapes[i])
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
        self._check_replicas()
        total = self._window.grad_norm(self._raw_norm)
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

    def _raw_norm(self) -> Tuple[float, float]:
        """Squared L2 norms of the raw buffers (one read pass): (replicated, sharded).

        The sharded part (FSDP2's local shards) is summed across ranks by the window; both
        are non-finite when any element is.
        """
        if self._norm_cache is None:
            for b in self._buckets:  # stale segments count as zeros
                b.clean()
            norms = [(b.sharded, b.backend.grad_norm(b.grad)) for b in self._buckets]
            sq = [0.0, 0.0]
            for sharded, n in norms:  # one host sync per bucket, as before
                sq[sharded] += float(n.item()) ** 2
            self._norm_cache = (sq[0], sq[1])
        return self._norm_cache

    def _check_replicas(self) -> None:
        """bf16/fp16 replicas under DDP need our communication hook, or DDP reduces nothing."""
        if self._ddp_hooked or dist_world() is None:
            return
        if any(b.low_precision and not b.sharded for b in self._buckets):
            raise RuntimeError(
                "fastaccum: bf16/fp16 parameters under torch.distributed accumulate into fp32 buffers that DDP does "
                "not see, so it would average nothing and the replicas would drift apart. Register fastaccum's "
                "communication hook, which all-reduces those buffers in fp32 while backward runs: "
                "ddp_model.register_comm_hook(opt, fastaccum.ddp_comm_hook) (or keep fp32 parameters and use "
                "torch.autocast, or shard them with FSDP2's fully_shard)"
            )

    def _ddp_reduce(self, gb: Any) -> "torch.futures.Future":
        """DDP communication hook body (see :func:`ddp_comm_hook`)."""
        self._ddp_hooked = True
        buffer = gb.buffer()
        if self.accumulation_steps > 1 and not self._window.sync_gradients:
            # inside a managed window: nothing to reduce yet (DDP's bucket holds either
            # local fp32 views, copied back unchanged, or zeros of released bf16 gradients)
            done = torch.futures.Future()
            done.set_result(buffer)
            return done
        ours: Dict[int, List[int]] = {}
        others = False  # fp32 parameters, or parameters this optimizer does not own
        for p in gb.parameters():
            where = self._where.get(p)
            if where is None or not self._buckets[where[0]].low_precision:
                others = True
            else:
                ours.setdefault(where[0], []).append(where[1])
        futures = []
        copy_backs = []
        for bi, idx in ours.items():
            tensor, copy_back = self._buckets[bi].span_for_reduce(idx)
            futures.append(self._window.mean_across_ranks_async(tensor))
            if copy_back is not None:
                copy_backs.append((copy_back, tensor))
        if others:  # DDP's own bucket, reduced as DDP would (the bf16 parts hold zeros)
            futures.append(self._window.mean_across_ranks_async(buffer))
        self._norm_cache = None

        def finish(_: Any) -> Tensor:
            for copy_back, tensor in copy_backs:
                copy_back(tensor)
            return buffer

        return torch.futures.collect_all(futures).then(finish)

    def _check_groups(self) -> None:
        for group in self.param_groups:
            self._check_group(group)

    def _update(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        self._check_groups()  # a NaN lr set by hand is refused before anything changes
        self._check_replicas()
        self._fold_grads()
        # DDP with bf16/fp16 parameters: a reduced parameter is live when any rank had a
        # gradient for it (as DDP leaves .grad None only for parameters unused everywhere)
        reduced = [(b, b.reduced_indices()) for b in self._buckets] if self._ddp_hooked else []
        live = [b.live[i] for b, idx in reduced for i in idx] if self._ddp_hooked else None
        multiplier = self._window.grad_multiplier(
            self._raw_norm,
            grad_scaler_scale=as_float("grad_scale", grad_scale) if grad_scale is not None else None,
            found_inf=found_inf is not None and as_float("found_inf", found_inf) > 0,
            max_grad_norm=self.max_grad_norm,
            live=live,
        )
        pos = 0
        for b, idx in reduced:
            b.set_live(idx, live[pos : pos + len(idx)])
            pos += len(idx)
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

    def _prepare_state(self, bucket: Bucket, idx: Sequence[int], count: bool = True) -> Dict[str, List[Tensor]]:
        """Flat state for the bucket (allocated once) and per-parameter state views;
        ``count``: the parameters are about to be updated (their step counts advance)."""
        group = self.param_groups[bucket.group_index]
        spec = list(self._state_spec(group))
        if bucket.low_precision and self.master_weights:
            spec.append(("master_param", torch.float32))
        views = {name: bucket.allocate_state(name, dtype) for name, dtype in spec}
        for i in idx:
            p = bucket.params[i]
            st = self.state[p]
            fresh_state = not st
            if fresh_state:
                st["step"] = bucket.steps[i]
                for name, _ in spec:
                    st[name] = bucket.wrapped(i, views[name][i])  # a DTensor under FSDP2, as torch's
            if "master_param" in views and (fresh_state or (count and float(bucket.steps[i]) == 0)):
                # the master starts from the parameter as it is at its first update, so
                # weights loaded after the optimizer was built are picked up
                views["master_param"][i].copy_(bucket.data(i).detach())
        if count:
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
        sd = super().state_dict()
        extra = {
            "version": _STATE_FORMAT_VERSION,
            "layout": [b.layout() for b in self._buckets],
            # only mid-window buffers hold gradients; a checkpoint taken after a step (the
            # usual case) does not carry 4 bytes/param of stale values
            "grad_buffers": [b.grad if any(b.fresh) and not b.sharded else None for b in self._buckets],
            "live": [list(b.live) for b in self._buckets],
            "fresh": [list(b.fresh) for b in self._buckets],
            **self._window.state_dict(),
            "skipped_steps": self.skipped_steps,
            "loss_scaler": self._scaler.state_dict() if self._scaler is not None else None,
        }
        sharded = [b for b in self._buckets if b.sharded and b.grad is not None]
        if not sharded:
            sd["fastaccum"] = extra
            return sd
        # FSDP2. torch.distributed.checkpoint's helpers keep only "state" and "param_groups",
        # save a plain tensor once (from one rank) and load into a state_dict of the same
        # structure. So: every parameter's shard of the accumulation buffer is a state entry
        # (a DTensor, always present), the window goes into the first param group, and this
        # rank's weight sum becomes its element of a DTensor sharded over the ranks.
        mesh = sharded[0].params[0].device_mesh
        extra["weight_sum"] = _from_local(torch.tensor([self._window.weight_sum], dtype=torch.float64), mesh)
        for name in ("live", "fresh"):  # per rank too: a rank whose shard of a parameter is empty differs
            flags = [x for b in self._buckets for x in getattr(b, name)]
            extra[name] = _from_local(torch.tensor([flags], dtype=torch.uint8).reshape(1, len(flags)), mesh)
        if len(self._buckets) != len(sharded):
            _mid_window_unsaved(self, "parameters that are not sharded by FSDP2")
        elif self._window.micro_step and not any(any(b.fresh) for b in sharded):
            _mid_window_unsaved(self, "FSDP2's unsharded gradients (set_requires_gradient_sync(False))")
        index = {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for b in sharded:
            for i, p in enumerate(b.params):
                if id(p) in index and index[id(p)] in sd["state"]:
                    sd["state"][index[id(p)]]["accum_grad"] = b.wrapped(i, b.grad_views[i])
        sd["param_groups"][0] = {**sd["param_groups"][0], "fastaccum": extra}
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a fastaccum state_dict, or a ``torch.optim`` one of the same optimizer kind.

        Everything is checked before anything changes. Unlike ``torch.optim``, state is not
        cast to the parameter dtype: fp32 moments and master weights of bf16 parameters stay fp32.
        """
        saved_groups = [dict(g) for g in state_dict["param_groups"]]
        extra = state_dict.get("fastaccum")
        for g in saved_groups:  # an FSDP2 checkpoint keeps it in the first param group
            extra = g.pop("fastaccum", None) or extra
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
        # torch.distributed.checkpoint loads into our own state_dict: the incoming tensors may
        # be our state's memory, which is reset below, so those are copied first
        ours = {t.untyped_storage().data_ptr() for b in self._buckets
                for t in [b.steps, *b.flat_state.values(), *([b.grad] if b.grad is not None else [])]}
        incoming = {
            key: {name: (local(v).clone() if isinstance(v, Tensor) and local(v).untyped_storage().data_ptr() in ours
                         else v) for name, v in st.items()}
            for key, st in state_dict["state"].items()
        }
        # torch restores the groups' hyper-parameters (and their hooks); state is ours to place.
        super().load_state_dict({"state": {}, "param_groups": saved_groups})
        for bucket in self._buckets:  # parameters without saved state start afresh
            bucket.steps.zero_()
            for flat in bucket.flat_state.values():
                flat.zero_()
        for key, st in incoming.items():
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
                    view.copy_(local(st[name]).reshape(view.shape))
                elif name == "master_param":
                    view.copy_(bucket.data(i).detach())
                else:
                    view.zero_()
                state[name] = bucket.wrapped(i, view)
            if "accum_grad" in st and bucket.grad is not None:  # FSDP2: this rank's shard of the buffer
                bucket.grad_views[i].copy_(local(st["accum_grad"]).reshape(bucket.grad_views[i].shape))
        if extra is not None:
            weight_sum = extra["weight_sum"]
            if isinstance(weight_sum, Tensor):  # FSDP2: this rank's elements
                flags = {}
                for name in ("live", "fresh"):
                    values = [bool(x) for x in local(extra[name]).reshape(-1).tolist()]
                    flags[name] = [values[sum(len(b.params) for b in self._buckets[:k]):][: len(b.params)]
                                   for k, b in enumerate(self._buckets)]
                extra = {**extra, **flags, "weight_sum": float(local(weight_sum).reshape(-1)[0])}
            for b, buf, live, fresh in zip(self._buckets, extra["grad_buffers"], extra["live"], extra["fresh"]):
                b.restore(buf, live, fresh)
            self._window.load_state_dict(extra)
            self.skipped_steps = int(extra["skipped_steps"])
            if self._scaler is not None and extra["loss_scaler"] is not None:
                self._scaler.load_state_dict(extra["loss_scaler"])
        self._norm_cache = None


def _from_local(t: Tensor, mesh: Any) -> Tensor:
    """``t`` as this rank's shard of a DTensor over ``mesh`` (one element per rank)."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)


def _mid_window_unsaved(opt: "AccumOptimizer", where: str) -> None:
    if opt._window.micro_step:
        warnings.warn(
            f"fastaccum: state_dict() inside an accumulation window (micro-batch {opt._window.micro_step} of "
            f"{opt.accumulation_steps}) does not hold the gradients kept in {where}; a run resumed from it "
            "would lose them. Checkpoint when opt.micro_step == 0, or let FSDP2 reduce-scatter every "
            "micro-batch (the partial sums then live in fastaccum's sharded buffers)",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_param_kind(p: Tensor) -> None:
    """Parameters fastaccum can own: plain tensors (one device, DDP replicas) and FSDP2's
    shards (a DTensor sharded on a 1-D mesh over all ranks). Other DTensor layouts (tensor
    parallel, HSDP's 2-D mesh, replicated or partial placements) would need the norm and the
    skip decision reduced over other groups: refused here, before anything is registered."""
    if not is_sharded(p):
        return
    mesh, placements = p.device_mesh, p.placements
    fsdp_like = (
        mesh.ndim == 1 and len(placements) == 1 and placements[0].is_shard()
        and torch.distributed.is_initialized() and mesh.size() == torch.distributed.get_world_size()
    )
    if not fsdp_like:
        raise ValueError(
            f"fastaccum supports DTensor parameters sharded by FSDP2 (fully_shard on a 1-D mesh over all ranks); "
            f"got a parameter of shape {tuple(p.shape)} with placements {tuple(placements)} on a mesh of shape "
            f"{tuple(mesh.shape)}. Tensor parallel, HSDP and other layouts are not supported yet: use "
            "torch.optim for them, or fully_shard over a 1-D mesh of all ranks"
        )


def ddp_comm_hook(state, bucket):  # no annotations: DDP checks them against dist.GradBucket
    """DDP communication hook that all-reduces fastaccum's fp32 buffers, once per window.

    ``ddp_model.register_comm_hook(opt, fastaccum.ddp_comm_hook)``: DDP calls it for each
    bucket as soon as backward has produced the bucket's gradients (so communication still
    overlaps backward). For the bf16/fp16 parameters ``opt`` owns, the fp32 accumulation
    buffer (already holding this micro-batch's gradient) is averaged across ranks in fp32 —
    never a bf16 gradient; other parameters in the bucket (fp32, or not owned by ``opt``)
    are averaged in DDP's bucket as DDP does by default. Inside a managed window
    (``accumulation_steps > 1``) nothing is sent until the window's last micro-batch,
    ``no_sync()`` or not. The default process group is used (that of DDP by default).
    """
    return state._ddp_reduce(bucket)


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
