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

import functools
import inspect
import math
import warnings
import weakref
from itertools import repeat
from operator import is_
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.optim.optimizer as _torch_optimizer
from torch import Tensor

from .arguments import document_args
from .backends import get_backend, resolve_backend
from .buffers import Bucket, PendingFolds, fold_cap_bytes, is_sharded, local
from .checkpoint import CheckpointMixin
from .checks import as_float, check_scalar_tensor
from .distributed import DistributedMixin, check_param_kind, ddp_comm_hook
from .noise_scale import NoiseScaleEstimator
from .resident import ResidentStep
from .scaling import LossScaler, LossScaleArg
from .window import AccumulationWindow, dist_world

__all__ = ["AccumOptimizer", "ddp_comm_hook"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# consecutive skipped windows after which a run is told that it is not training
_SKIP_WARN_AFTER = 10

# id(parameter) -> the (weakly held) fastaccum optimizer whose hooks and buffers it uses now.
# Two optimizers cannot both own a parameter's gradient (the first hook releases a bf16
# gradient, fp32 views would be swapped back and forth): the newer one takes over.
# Keyed by id, not by a weak reference to the parameter: a weakref on a parameter breaks
# torch.utils.swap_tensors (model.to(...) with swapping). An id cannot be reused while its
# optimizer lives (it holds the parameter); dead entries are dropped by _release.
_OWNERS: Dict[int, "weakref.ref[AccumOptimizer]"] = {}


def _step_wrapper(step: Callable[..., Any]) -> Callable[..., Any]:
    """torch.optim wraps every ``step`` to run the step pre/post hooks and to label it for
    the profiler; its ``record_function`` costs a few microseconds per step even with no
    profiler running. This runs torch's own wrapper whenever a hook is registered, a
    profiler is on or torch.compile traces the step (which knows torch's wrapper), and the
    plain step otherwise (``hooked``: torch then leaves it as is)."""
    hooked = torch.optim.Optimizer.profile_hook_step(step)

    @functools.wraps(step)
    def wrapper(self: "AccumOptimizer", *args: Any, **kwargs: Any) -> Any:
        if (self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                or _torch_optimizer._global_optimizer_pre_hooks or _torch_optimizer._global_optimizer_post_hooks
                or torch.compiler.is_compiling() or torch._C._autograd._profiler_enabled()):
            return hooked(self, *args, **kwargs)
        return step(self, *args, **kwargs)

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


class AccumOptimizer(CheckpointMixin, DistributedMixin, torch.optim.Optimizer):
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
        track_noise_scale: bool = False,
    ) -> None:
        if not isinstance(track_noise_scale, bool):
            raise TypeError(f"Invalid track_noise_scale: {track_noise_scale!r}; pass True or False")
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
            # With accumulation_steps=N, micro-batches 1..N-1 fold into the buffer as usual and
            # the N-th updates each parameter in its hook (see _grad_ready). Dynamic loss
            # scaling stays refused there too: whether the window is finite is known only
            # after the last hook, when earlier parameters are already updated, and no exact
            # all-or-nothing scheme exists without keeping the last gradient (what this mode
            # exists to avoid).
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
            if track_noise_scale:
                raise ValueError(
                    "track_noise_scale=True needs the norm of the whole window, which step_in_backward=True never "
                    "assembles (each parameter is updated in its hook): use one or the other"
                )

        self.accumulation_steps = accumulation_steps
        self.max_grad_norm = max_grad_norm
        self.master_weights = master_weights
        self.state_dtype = state_dtype
        self.step_in_backward = bool(step_in_backward)
        # step_in_backward without accumulation keeps no buffer: each gradient is used in its hook
        self._no_buffer = self.step_in_backward and accumulation_steps == 1
        self.track_noise_scale = track_noise_scale
        # McCandlish et al. 2018's gradient noise scale, fed from the accumulation itself
        # (see _close_micro and noise_scale.py); None unless asked for
        self._noise: Optional[NoiseScaleEstimator] = NoiseScaleEstimator() if track_noise_scale else None
        self._device_stats: Optional[Tuple[bool, Any]] = None  # resident: (norm computed, weight sum)
        self._tokens_read_once: Optional[float] = None  # beta2_halflife_tokens with device weights
        self._skipped_on_host = 0
        self._resident: Optional[ResidentStep] = None
        self._scaler = scaler
        # step_in_backward without accumulation: every backward is its own window
        self._window = AccumulationWindow(accumulation_steps, scaler, self.step_in_backward and accumulation_steps == 1)
        self._window.measure_norm = track_noise_scale
        self._backend_request = backend
        self._buckets: List[Bucket] = []
        self._where: Dict[Tensor, Tuple[int, int]] = {}  # param -> (bucket index, position)
        self._hook_handles: List[Any] = []
        self._hooks: Dict[Tuple[int, int], Any] = {}  # (bucket, position) -> its hook's handle
        self._unhooked: List[Tuple[int, int]] = []  # parameters frozen at construction: hooked once unfrozen
        self._taken_over = False  # a newer fastaccum optimizer took (some of) our parameters
        self._consecutive_skips = 0
        # squared raw norms (replicated, sharded) of the buffers, valid until new gradients arrive
        self._norm_cache: Optional[Tuple[float, float]] = None
        # bucket -> the segments of its whole-bucket update, reused across steps (_cached_segments)
        self._segs_cache: Dict[int, Any] = {}
        self._settled: set = set()  # ids of the buckets _fold_grads found settled (see Bucket.settled)
        self._state_epoch = 0  # bumped when the state is replaced (load_state_dict)
        self._ddp_hooked = False  # ddp_comm_hook has run: DDP reduces our fp32 buffers
        # registered before any hook: a constructor that fails, or an optimizer that is
        # dropped, removes its hooks and lets go of its buffers (p.main_grad)
        weakref.finalize(self, _release, self._hook_handles, self._buckets)
        try:
            super().__init__(params, defaults)
            self._start_resident()
            if defaults.get("capturable") and self._resident is None:
                raise ValueError(
                    "capturable=True needs the device-resident step, where no step reads a device value on the "
                    "host: backend='triton' (or 'auto') with every parameter on one CUDA device, contiguous, "
                    "not float64, not FSDP2-sharded, and step_in_backward=False"
                )
            if self.max_grad_norm is None and dist_world() is not None and any(
                b.low_precision and not any(b.grad_viewed) for b in self._buckets if b.grad is not None
            ):
                # across ranks bf16/fp16 gradients are released in the hook (DDP's reducer owns
                # p.grad): a trainer's own clip_grad_norm_ would see no gradient and clip nothing
                warnings.warn(
                    "fastaccum: under torch.distributed, bf16/fp16 parameters keep their gradient in fastaccum's "
                    "fp32 buffers and p.grad stays None, so a trainer's clip_grad_norm_ (HF Trainer's "
                    "max_grad_norm, Lightning's gradient_clip_val) sees no gradient and clips nothing: pass "
                    "max_grad_norm= to the optimizer instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
        except BaseException:
            _release(self._hook_handles, self._buckets)
            raise

    def _start_resident(self) -> None:
        """Keep the step's decisions on the device when every bucket runs bucket kernels on
        one device (the triton backend): no step then reads a device value on the host."""
        backends = {b.backend for b in self._buckets}
        devices = {b.device for b in self._buckets}
        if (self.step_in_backward or len(backends) != 1 or len(devices) != 1
                or not all(b.backend.device_resident and not b.sharded for b in self._buckets)):
            return
        if self.track_noise_scale and self.defaults.get("capturable"):
            # the noise scale's bookkeeping makes new device tensors and host counts every
            # window, and its micro-batch reports come from the hooks, outside a captured
            # step: a graph would replay the capture's
            raise ValueError(
                "capturable=True (CUDA graphs) cannot track the noise scale: its per-micro-batch reports are "
                "new tensors every window, which a captured step would not see; drop track_noise_scale=True "
                "or capturable=True"
            )
        backend, device = backends.pop(), devices.pop()
        self._resident = ResidentStep(backend.bucket, device)
        self._window.to_device(backend.bucket, device)
        self._adopt_device_steps()
        for bucket in self._buckets:  # noise-scale reports stay on the device (never read back)
            bucket.device_measures = True

    def _adopt_device_steps(self) -> None:
        self._resident.adopt_steps(self._buckets)
        for bucket in self._buckets:  # state[p]["step"] follows the counts to the device
            for i, p in enumerate(bucket.params):
                if self.state.get(p):
                    self.state[p]["step"] = bucket.steps[i]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for inf/nan gradients (on a device-resident step, reading it syncs)."""
        return self._skipped_on_host + self._window.skipped_on_device()

    @skipped_steps.setter
    def skipped_steps(self, value: int) -> None:
        self._skipped_on_host = int(value) - self._window.skipped_on_device()

    # ------------------------------------------------------------ introspection
    # torch.optim group keys that fastaccum accepts for drop-in use and ignores: not in repr()
    _ignored_group_keys = ("foreach", "fused", "capturable", "differentiable")
    # fastaccum's constructor settings, shown by repr() when the class's signature has them
    _settings = ("accumulation_steps", "backend", "loss_scale", "master_weights", "max_grad_norm",
                 "state_dtype", "step_in_backward", "track_noise_scale")

    @property
    def backends(self) -> List[List[str]]:
        """Per param group, the names of the backends that run its buckets (each once, in bucket
        order), e.g. ``[["cpu"]]``. ``backend="auto"`` resolves per device; float64 parameters,
        and non-contiguous ones on a bucket-kernel backend, get buckets of the ``torch`` backend."""
        out: List[List[str]] = [[] for _ in self.param_groups]
        for bucket in self._buckets:
            names = out[bucket.group_index]
            if bucket.backend.name not in names:
                names.append(bucket.backend.name)
        return out

    def _setting(self, name: str) -> Any:
        if name == "backend":
            return self._backend_request
        if name == "loss_scale":  # the setting, not the current scale (reading it may sync a device)
            scaler = self._scaler
            return None if scaler is None else "dynamic" if scaler.dynamic else scaler.scale
        return getattr(self, name)

    def __repr__(self) -> str:
        accepted = inspect.signature(type(self)).parameters
        lines = [f"{type(self).__name__} (", "fastaccum settings"]
        lines += [f"    {name}: {self._setting(name)!r}" for name in sorted(self._settings) if name in accepted]
        backends = self.backends
        for i, group in enumerate(self.param_groups):
            lines += [f"Parameter Group {i}", f"    backends: {backends[i]}"]
            lines += [f"    {key}: {group[key]}" for key in sorted(group)
                      if key != "params" and key not in self._ignored_group_keys]
        return "\n".join(lines) + "\n)"

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
        # (name, param) pairs from model.named_parameters(): torch records the names
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        # Everything is checked before anything is registered, so a bad group leaves the
        # optimizer as it was.
        for p in tensors:
            if not isinstance(p, Tensor):
                raise TypeError(f"optimizer can only optimize Tensors, but one of the params is {type(p).__name__}")
            check_param_kind(p)
            if p.is_complex():
                raise TypeError(f"fastaccum does not support complex parameters (got {p.dtype}); "
                                "view them as real with torch.view_as_real")
            if not p.is_floating_point():
                raise TypeError(f"fastaccum optimizes floating-point parameters, got a {p.dtype} parameter of "
                                f"shape {tuple(p.shape)}; leave integer tensors out of the optimizer")
            if p.dtype not in (torch.float32, torch.float64, *_LOW_PRECISION):
                raise TypeError(f"fastaccum supports float64, float32, bfloat16 and float16 parameters, got {p.dtype}")
            if p.dtype == torch.float16 and not self.master_weights:
                raise ValueError("master_weights=False is supported for bfloat16 parameters only (stochastic "
                                 "rounding); float16 parameters need master_weights=True")
        merged = {**self.defaults, **param_group}
        self._check_group(merged)
        backends = {p.device: resolve_backend(self._backend_request, p.device) for p in tensors}
        if self._resident is not None and any(
            d != self._resident.device or not b.device_resident for d, b in backends.items()
        ):
            raise ValueError(
                f"this optimizer keeps its step on {self._resident.device} (backend {self._backend_request!r}); "
                "a param group on another device or backend cannot join it: create a second optimizer for it"
            )
        if any(p.dtype == torch.float64 for p in tensors):
            if self._resident is not None:
                raise ValueError("float64 parameters run on the torch backend, and this optimizer keeps its "
                                 "step on the device: create a second optimizer for them")
            # float64 buckets run on the torch backend (the kernels are fp32/bf16/fp16)
            backends[torch.float64] = get_backend("torch")

        super().add_param_group({**param_group, "params": params})
        group_index = len(self.param_groups) - 1
        by_key: Dict[Tuple[torch.device, torch.dtype, bool], List[Tensor]] = {}
        for p in self.param_groups[-1]["params"]:
            # bucket kernels write parameters in element order: a non-contiguous parameter
            # (channels_last, a transposed view) goes to a bucket of the torch backend; FSDP2's
            # shards get buckets of their own
            dense = p.is_contiguous() or not backends[p.device].device_resident
            by_key.setdefault((p.device, p.dtype, dense, is_sharded(p)), []).append(p)
        for (device, dtype, dense, _), ps in by_key.items():
            if dtype == torch.float64:
                backend = backends[torch.float64]
            else:
                backend = backends[device] if dense else resolve_backend("torch", device)
            # Across ranks, DDP's reducer reads and writes p.grad itself (it copies the bucket it
            # reduced back into it): bf16/fp16 gradients are then released in the hook and
            # reduced by ddp_comm_hook from the fp32 buffer, never exposed as GradViews.
            bucket = Bucket(ps, group_index, backend, with_buffer=not self._no_buffer,
                            grad_views=dist_world() is None, folds=self._folds_for(backend, device, dtype))
            bucket.measure = self.track_noise_scale
            bucket.device_measures = self._resident is not None
            self._add_bucket(bucket)
        if self._resident is not None:
            self._adopt_device_steps()

    def _folds_for(self, backend: Any, device: torch.device, dtype: torch.dtype) -> Optional[PendingFolds]:
        """The batched fold of this device's bf16/fp16 buckets (one per device, shared), where the
        backend has one and FASTACCUM_FOLD_CAP_MB is not 0; None: each gradient folds on arrival.
        step_in_backward keeps folding on arrival: the window's last gradient of a parameter is
        read right after its hook, and earlier ones would wait only to be flushed one by one."""
        if dtype not in _LOW_PRECISION or self.step_in_backward or not backend.batched_fold:
            return None
        for b in self._buckets:
            if b.folds is not None and b.device == device and b.folds.backend is backend:
                return b.folds
        cap = fold_cap_bytes(device)
        return PendingFolds(backend, cap, device) if cap > 0 else None

    def _add_bucket(self, bucket: Bucket) -> None:
        bi = len(self._buckets)
        self._buckets.append(bucket)
        for i, p in enumerate(bucket.params):
            self._where[p] = (bi, i)
            self._take_over(p)
            self._hook(bi, i)
            bucket.adopt(i)
        if bucket.sharded and not self._no_buffer:
            # FSDP2: the state exists from the start (step 0, zero moments), so that a fresh
            # optimizer's state_dict has every entry a checkpoint has. torch.distributed.checkpoint
            # loads *into* that state_dict, and its helpers would otherwise run a fake step()
            # to create it, which inside an accumulation window counts a micro-batch.
            self._prepare_state(bucket, [i for i, p in enumerate(bucket.params) if p.requires_grad], updating=False)

    def _hook(self, bi: int, i: int) -> None:
        """Register parameter i of bucket bi's hook (a frozen parameter is hooked once it is unfrozen)."""
        p = self._buckets[bi].params[i]
        if not p.requires_grad:
            self._unhooked.append((bi, i))
            return
        h = p.register_post_accumulate_grad_hook(_make_hook(weakref.ref(self), bi, i))
        self._hook_handles.append(h)
        self._hooks[(bi, i)] = h

    def _take_over(self, p: Tensor) -> None:
        prev = _OWNERS.get(id(p))
        old = prev() if prev is not None else None
        if old is not None and old is not self and old._where.get(p) is not None:
            old._give_up(p)
        _OWNERS[id(p)] = weakref.ref(self)

    def _give_up(self, p: Tensor) -> None:
        """A newer fastaccum optimizer over ``p`` takes it: our hook and buffer let go of it."""
        where = self._where.get(p)
        if where is None:
            return
        bi, i = where
        h = self._hooks.pop((bi, i), None)
        if h is not None:
            h.remove()
        if (bi, i) in self._unhooked:
            self._unhooked.remove((bi, i))
        self._buckets[bi].detach_from_params([i])
        self._taken_over = True

    def _hook_late_params(self) -> None:
        """Hook parameters unfrozen since construction; with step_in_backward, apply the
        gradient their first backward left in p.grad (no hook saw it)."""
        if not self._unhooked:
            return
        for bi, i in list(self._unhooked):
            p = self._buckets[bi].params[i]
            if p.requires_grad:
                self._unhooked.remove((bi, i))
                self._hook(bi, i)
                if self.step_in_backward and p.grad is not None:
                    self._grad_ready(bi, i, p)

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
        if bucket.folds is not None and bucket.hold(i, p, g, self.accumulation_steps > 1):
            # a bf16/fp16 gradient held for the batched fold (what a window spends most hooks on)
            self._norm_cache = None
            return
        if g.layout is not torch.strided or g.get_device() != bucket.device_index or g.is_complex():
            # (a cheap screen runs per gradient; this says what is wrong)
            self._check_grad(bucket, p, g)
        if self._no_buffer:
            # the gradient is used once, here, and released: none outlives its backward
            g32 = local(g).to(bucket.grad_dtype, memory_format=torch.contiguous_format).view(bucket.shapes[i])
            with torch.no_grad():
                self._update_bucket(bucket, [i], self._window.unclipped_multiplier(), grads=[g32])
            bucket.release(i)
            return
        # managed mode owns the window's accumulation: a model.zero_grad() between
        # micro-batches must not drop the earlier ones
        bucket.take_from_hook(i, g, add_to_fresh=self.accumulation_steps > 1)
        self._norm_cache = None
        if self.step_in_backward and self._window.sync_gradients and not self._flushing:
            # the window's last micro-batch: its gradient is in the segment now (added in place
            # or folded), so the parameter is updated here and the segment goes stale; no
            # separate update pass, and nothing of this parameter waits for step()
            with torch.no_grad():
                self._update_bucket(bucket, [i], self._window.unclipped_multiplier())
            bucket.consume_one(i)

    def _finish_window_in_backward(self) -> None:
        """step_in_backward with accumulation: the last micro-batch's hooks updated every
        parameter that got a gradient in it; parameters whose gradients came only from earlier
        micro-batches (or were assigned by hand) are updated here, with the same multiplier."""
        self._fold_grads()
        multiplier = self._window.unclipped_multiplier()
        with torch.no_grad():
            for bucket in self._buckets:
                idx = [i for i in bucket.live_indices() if bucket.fresh[i]]
                if idx:
                    self._update_bucket(bucket, idx, multiplier)
                bucket.consume_all()
        self._end_window()

    def _fold_grads(self) -> None:
        """Make the buffers hold exactly what the user means as gradient now (see buffers.py)."""
        # a bucket whose every p.grad is its attached view (a plain backward) has nothing to fold
        todo = []
        self._settled = set()
        for b in self._buckets:
            if b.settled():
                self._settled.add(id(b))
            else:
                todo.append(b)
        for bucket in todo:  # check everything first: a bad gradient changes nothing
            for _, p, g in bucket.foreign_grads():
                self._check_grad(bucket, p, p if g is None else g)
        for bucket in todo:
            if bucket.fold_user_grads():
                self._norm_cache = None
                # a gradient assigned by hand was never measured: this window's micro-batch
                # reports no longer describe the buffer
                self._window.drop_reports()

    def _close_micro(self) -> None:
        """A ``step()`` call ends a micro-batch: hand its squared norm (when every gradient of
        it was measured, see buffers.py) to the window, which keeps the noise-scale sums.
        On the device-resident step the norms are device tensors, added without a read."""
        total, complete = None, True
        for b in self._buckets:
            seen = bool(b.micro_seen)
            s, ok = b.take_micro_sumsq()
            if seen:
                total = s if total is None else total + s
            complete = complete and ok
        self._window.close_micro(total if complete else None)

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

    @property
    def noise_scale_estimator(self) -> Optional[NoiseScaleEstimator]:
        """The :class:`~fastaccum.NoiseScaleEstimator` fed by this optimizer
        (``track_noise_scale=True``), else None."""
        return self._noise

    def stats(self) -> Dict[str, Any]:
        """What the last window was, as plain numbers (the keys :func:`fastaccum.advise` reads).

        * ``grad_norm``: L2 norm of the last update's gradient (unscaled, normalised, before
          clipping), or None before any update and when no step computed the norm (it comes
          from the norm pass, which runs with clipping, loss scaling or ``track_noise_scale``).
        * ``loss_scale``, ``skipped_steps``.
        * ``effective_batch``: the weight sum of the last window (across ranks), in the unit of
          ``weight=`` (tokens with ``weight=n_tokens``; micro-batches without weights).
        * ``noise_scale``: the gradient noise scale B_simple in the same unit (McCandlish et
          al. 2018), None until estimable or without ``track_noise_scale=True``.
        * ``accumulation_steps``, ``micro_batch_weight`` (``effective_batch`` per micro-batch),
          ``betas`` (the first group's, for Adam: the β2 used last), ``noise_windows``.

        Cheap: no pass over any tensor. On the device-resident step the norm and a tensor
        weight sum stay on the device until this call reads them (one sync, here).
        """
        window = self._window
        grad_norm: Optional[float] = window.last_grad_norm
        effective: Any = window.last_weight_total
        if self._device_stats is not None:
            has_norm, divisor = self._device_stats
            grad_norm = float(window.state[window.kernels.W_NORM]) if has_norm else None
            if effective is None and isinstance(divisor, Tensor):
                ref = float(window.weight_ref) if isinstance(window.weight_ref, (int, float)) else 1.0
                effective = float(divisor) * ref
        group = self.param_groups[0] if self.param_groups else {}
        betas = group.get("betas")
        return {
            "grad_norm": grad_norm,
            "loss_scale": self.loss_scale,
            "skipped_steps": self.skipped_steps,
            "effective_batch": effective,
            "noise_scale": self._noise.value if self._noise is not None else None,
            "noise_windows": self._noise.windows if self._noise is not None else 0,
            "accumulation_steps": self.accumulation_steps,
            "micro_batch_weight": None if effective is None else effective / self.accumulation_steps,
            "betas": tuple(float(b) for b in betas) if betas is not None else None,
        }

    def scale_loss(self, loss: Tensor, weight: Union[None, float, Tensor] = None) -> Tensor:
        """``loss * loss_scale * weight``, recording ``weight`` for the normalisation.

        With ``weight=n_tokens`` of a micro-batch whose ``loss`` is a mean over its tokens,
        the update uses the exact token mean over the whole accumulated batch, however the
        tokens are spread over micro-batches (the divisor is known only at step time, so it
        is applied there, folded into the update).
        """
        w = self._check_loss_weight(loss, weight)
        factor = self._window.loss_factor(w)
        return loss * factor if isinstance(factor, Tensor) or factor != 1.0 else loss

    def _check_loss_weight(self, loss: Tensor, weight: Union[None, float, Tensor]) -> Union[float, Tensor]:
        if not isinstance(loss, Tensor):
            raise TypeError(f"Invalid loss: expected a Tensor, got {type(loss).__name__}")
        if weight is None:
            return 1.0
        if self._resident is not None and isinstance(weight, Tensor):
            # read on the device, not here (reading would wait for the GPU): a weight that is
            # not a finite number > 0 makes the window's step skip instead of raising
            if weight.numel() != 1 or weight.is_complex() or weight.device.type == "meta":
                raise ValueError(f"Invalid weight: a tensor weight must be one real number, got shape "
                                 f"{tuple(weight.shape)} {weight.dtype} on {weight.device}")
            return weight
        w = as_float("weight", weight)
        if not (w > 0 and math.isfinite(w)):
            raise ValueError(f"Invalid weight: {w}; a micro-batch weight (e.g. its token count) must be a "
                             "finite number > 0; skip empty micro-batches instead of passing 0")
        return w

    def backward(self, loss: Tensor, weight: Union[None, float, Tensor] = None, **backward_kwargs: Any) -> None:
        """``scale_loss(loss, weight).backward()``, counting ``weight`` only once the backward succeeded.

        If the backward raises (out of memory, a hook), the weight is not counted; gradients
        that reached the buffer before the error stay in it: call :meth:`discard_window` to
        drop the half-done window (or retry the micro-batch after ``discard_window()``).
        """
        w = self._check_loss_weight(loss, weight)
        self._hook_late_params()
        if self.step_in_backward:  # hooks update during this backward: the weight must be known
            self.scale_loss(loss, weight).backward(**backward_kwargs)
            return
        factor = self._window.loss_factor(w, record=False)
        if self._window.sync_gradients and self._window.micro_step > 0 and self._norm_wanted():
            # the window's last micro-batch: its folds return the accumulated gradient's
            # norm in their pass, so the step reads the buffer once, in the update
            for bucket in self._buckets:
                bucket.detach_for_fused_norm()
        for bucket in self._buckets:
            # bf16/fp16 gradients reach the hooks as plain tensors, held for the batched fold
            bucket.detach_for_batched_fold()
        try:
            (loss * factor if isinstance(factor, Tensor) or factor != 1.0 else loss).backward(**backward_kwargs)
        finally:
            # normally done by the end of the backward itself; after an error in it, the
            # gradients that reached their hooks are folded (kept, as the per-parameter fold
            # keeps them) and the views are back
            for bucket in self._buckets:
                bucket.finish_folds()
        self._window.commit(w)

    def _norm_wanted(self) -> bool:
        """Whether the step will need the gradient's norm (loss scaling's inf check, clipping)."""
        return self._scaler is not None or self.max_grad_norm is not None or self._window.clip_request is not None

    @torch.no_grad()
    def discard_window(self) -> None:
        """Drop the accumulation window in progress: its gradients, weights and micro-step count.

        Parameters, state, step counts, the loss scale and ``skipped_steps`` do not change.
        Use it after a micro-batch whose backward failed (gradients of some parameters may
        already be in the buffer), or to abandon a window on purpose.
        """
        for bucket in self._buckets:
            bucket.consume_all()
            bucket.clear(set_to_none=True)
        self._end_window()

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
        if self._resident is not None:
            self._resident.plan(self._buckets)
            partials = self._resident.sumsq()
            self._window.clip_request = max_norm
            if partials is None:
                return torch.zeros((), dtype=torch.float32, device=self._resident.device)
            return self._window.device_grad_norm(partials)
        total = self._window.grad_norm(self._raw_norm, self._deferred_scale())
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
        if torch.compiler.is_compiling():  # host bookkeeping only: run eagerly (a graph break)
            self._zero_grad_eagerly(set_to_none)
            return
        if self._window.micro_step != 0 or self._no_buffer:
            return
        for bucket in self._buckets:
            bucket.clear(set_to_none)
        self._end_window()

    @torch.compiler.disable
    def _zero_grad_eagerly(self, set_to_none: bool) -> None:
        self.zero_grad(set_to_none)

    @_step_wrapper
    def step(self, closure: Optional[Callable[[], Any]] = None, *, grad_scale: Optional[Tensor] = None,
             found_inf: Optional[Tensor] = None) -> Any:
        """Count a micro-batch; on the last one of the window, update every parameter.

        ``grad_scale``/``found_inf`` are what ``torch.amp.GradScaler`` provides (it sets them
        as attributes when driving this optimizer); they are folded into the same update.
        Inside a function compiled with ``torch.compile``: see :meth:`_step_compiled`.
        """
        if torch.compiler.is_compiling():
            return self._step_compiled(closure, grad_scale, found_inf)
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad(), without its context object per call
        try:
            return self._step(closure, grad_scale, found_inf)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def _step(self, closure: Optional[Callable[[], Any]], grad_scale: Optional[Tensor],
              found_inf: Optional[Tensor]) -> Any:
        if self._taken_over:
            raise RuntimeError("a newer fastaccum optimizer was created over some of this optimizer's parameters "
                               "and took them over (only one can own their gradient buffers): step the newer "
                               "optimizer, or create it after this one is gone")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._hook_late_params()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if self._no_buffer:
            return loss
        if self.step_in_backward:
            if self._window.advance():
                self._finish_window_in_backward()
            return loss
        if self._noise is not None:
            self._close_micro()
        if self._window.advance():
            self._update(grad_scale, found_inf)
        return loss

    # --------------------------------------------------------------- torch.compile
    def _step_compiled(self, closure: Optional[Callable[[], Any]], grad_scale: Optional[Tensor],
                       found_inf: Optional[Tensor]) -> Any:
        """``step()`` in a function that ``torch.compile`` traces.

        A step's host side (the window's count, the buckets' p.grad bookkeeping, the segment
        tables, every argument check) is Python over host state, different at every call: it
        runs eagerly, as a graph break (:meth:`_host_step`), with the bucket kernels' launches
        recorded instead of run. The launches are then replayed as the ``fastaccum::*`` custom
        ops (backends/triton_kernels.py), which the compiled graph calls: opaque to the
        compiler, with fake implementations and the tensors they write declared, so that the
        graph orders them with what surrounds the step (and a functionalising backend hands
        them copies, which they write). Without bucket kernels (cpu and torch backends,
        ``step_in_backward``) the whole step runs in the graph break. ``fullgraph=True`` cannot
        hold: a step always has host work.
        """
        loss, calls = self._host_step(closure, grad_scale, found_inf)
        if calls:
            with torch.no_grad():  # the ops write parameters in place
                self._resident.kernels.replay(calls)
        return loss

    @torch.compiler.disable
    def _host_step(self, closure: Optional[Callable[[], Any]], grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor]) -> Tuple[Any, List[Any]]:
        """The step, eagerly, and the bucket-kernel launches it recorded to run after it returns
        (a launch whose memory the step touches later runs at that point instead: see
        ``triton_kernels.deferred``)."""
        with torch.no_grad():
            if self._resident is None:
                return self._step(closure, grad_scale, found_inf), []
            with self._resident.kernels.deferred() as calls:
                loss = self._step(closure, grad_scale, found_inf)
            return loss, list(calls)

    # --------------------------------------------------------------- internals
    def _tokens_per_step(self) -> float:
        """The weight sum of the window being applied, in the unit of ``weight=`` (what
        ``beta2_halflife_tokens`` counts). With tensor weights on the device-resident step the
        sum stays on the device: the first such window's is read once and kept."""
        w = self._window
        if self.step_in_backward:
            total = w.host_weight_total(w.scale_and_divisor()[1])
        else:
            total = w.last_weight_total
        if total is not None:
            return total
        if getattr(self, "_tokens_read_once", None) is None:
            divisor = w._device_divisor()
            ref = float(w.weight_ref) if isinstance(w.weight_ref, (int, float)) else 1.0
            world = dist_world()
            self._tokens_read_once = float(divisor) * ref * (world[0] if world else 1)  # the one sync
        return self._tokens_read_once

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

    def _raw_norm(self) -> Tuple[float, float]:
        """Squared L2 norms of the raw buffers (one read pass): (replicated, sharded).

        The sharded part (FSDP2's local shards) is summed across ranks by the window; both
        are non-finite when any element is.
        """
        if self._norm_cache is None:
            sq = [0.0, 0.0]
            norms = []
            for b in self._buckets:
                # the norms the folds returned, or a host-side fp64 pass (cpu); else the
                # backend's norm pass over the buffer, stale segments cleaned to zeros
                s = b.grad_sumsq()
                if s is None:
                    b.clean()
                    norms.append((b.sharded, b.backend.grad_norm(b.grad)))
                    s = b.external_sumsq()
                sq[b.sharded] += s
            for sharded, n in norms:  # one host sync per bucket, as before
                sq[sharded] += float(n.item()) ** 2
            self._norm_cache = (sq[0], sq[1])
        return self._norm_cache

    def _check_groups(self) -> None:
        checked = self.__dict__.setdefault("_checked_groups", {})
        for group in self.param_groups:
            # a group holding the very objects checked last step (no tensors) is valid: a
            # scheduler changing lr makes one check, not one per parameter. (Identity, compared
            # in C: no value's __eq__ runs, and it is the cheapest test that runs every step.)
            values = list(group.values())
            seen = checked.get(id(group))
            if seen is not None and len(seen) == len(values) and all(map(is_, values, seen)):
                continue
            if any(map(isinstance, values, repeat(Tensor))):
                values = None
            if self._resident is not None and isinstance(group["lr"], Tensor):
                # the bucket kernels read a tensor lr themselves; reading it here would make
                # every step wait for the device, so only its shape is checked
                check_scalar_tensor("lr", group["lr"])
                group = {**group, "lr": 0.0}
            self._check_group(group)
            if values is not None:
                checked[id(group)] = values

    def _update(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        self._check_groups()  # a NaN lr set by hand is refused before anything changes
        self._check_replicas()
        self._fold_grads()
        if self._resident is not None:
            self._update_on_device(grad_scale, found_inf)
            return
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
            deferred_scale=self._deferred_scale(),
        )
        pos = 0
        for b, idx in reduced:
            b.set_live(idx, live[pos : pos + len(idx)])
            pos += len(idx)
        if multiplier is None:
            self._skip()
            return
        work = [(bucket, bucket.live_indices()) for bucket in self._buckets]
        # Everything that can fail before a kernel runs (state allocation, segments,
        # hyper-parameters) runs for every bucket first, so an error there changes no
        # parameter and no step count; if a kernel itself fails, the step counts go back,
        # so that a retry does not count a step twice.
        plans = []
        for bucket, live in work:
            if live:
                bucket.zero_stale(live)
                plans.append((bucket, live, self._plan_bucket(bucket, live, multiplier)))
        saved_steps = [bucket.steps.clone() for bucket, _, _ in plans]
        try:
            for bucket, live, plan in plans:
                self._run_bucket(bucket, live, plan)
        except BaseException:
            for (bucket, _, _), steps in zip(plans, saved_steps):
                bucket.steps.copy_(steps)
            raise
        settled = self._settled  # no user code ran since _fold_grads: their p.grad are still our views
        for bucket, _ in work:
            bucket.consume_all(settled=id(bucket) in settled)
        self._feed_noise()
        if self._scaler is not None:
            self._scaler.update(found_inf=False)
        self._consecutive_skips = 0
        self._end_window()

    def _update_on_device(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """The same step with every decision on the device: sumsq per bucket (when the norm is
        needed), one finalize, one update launch per bucket; the update kernels return at
        once when finalize decided to skip. Nothing here reads a device value."""
        written_scale = self._deferred_scale()
        if written_scale != 1.0:
            # a trainer's clip through bf16/fp16 p.grad views: written into the buffers (one
            # pass) rather than read back to the host as a multiplier
            for bucket in self._buckets:
                bucket.apply_scales()
        res = self._resident
        res.plan(self._buckets)
        divisor = self._window._device_divisor()
        self._window.last_weight_total = (
            None if isinstance(divisor, Tensor) else self._window.host_weight_total(divisor, (dist_world() or (1,))[0]))
        # The norm pass first: it writes only its partial sums, so the device starts on the
        # step's largest read while the host prepares the rest (the host time before the first
        # launch is device time lost).
        partials = res.sumsq() if self._window.needs_norm(grad_scale, self.max_grad_norm) else None
        # everything that can refuse runs before any kernel that changes state (state
        # allocation, hyper-parameters)
        launches = []
        for bi, bucket, table in res.work:
            self._prepare_state(bucket, bucket.live_indices())
            group = self.param_groups[bucket.group_index]
            launches.append((bucket, table, self._device_hyper(group), self._device_seed(bi, self._stochastic(bucket))))
        # a kernel that fails leaves the step counts and the window as they were (device
        # copies, no sync), so that a retry does not count a step twice
        saved_steps, saved_window = res.steps.clone(), self._window.state.clone()
        try:
            self._device_stats = (partials is not None, divisor)  # for stats(): read when it is called
            self._window.finalize_on_device(
                partials, res.steps, res.step_index, grad_scaler_scale=_as_tensor(grad_scale),
                found_inf=_as_tensor(found_inf), max_grad_norm=self.max_grad_norm, written_scale=written_scale,
            )
            for bucket, table, hyper, seed in launches:
                getattr(res.kernels, self._kernel)(
                    table, bucket.grad, *self._flat_state_args(bucket), res.steps, self._window.state,
                    **hyper, seed=seed,
                )
        except BaseException:
            res.steps.copy_(saved_steps)
            self._window.state.copy_(saved_window)
            raise
        for bucket in self._buckets:
            bucket.consume_all()
        self._feed_noise()
        self._end_window()

    def _feed_noise(self) -> None:
        """The window's noise sums to the estimator; a skipped window never counts (on the host
        it never gets here, on the device its ``last_applied`` is False)."""
        w = self._window
        if self._noise is not None and w.last_noise is not None:
            self._noise.update_from_sums(*w.last_noise, applied=w.last_applied)

    def _flat_state_args(self, bucket: Bucket) -> List[Optional[Tensor]]:
        """The algorithm's flat state tensors in its kernel's order (see adam.py / sgd.py)."""
        raise NotImplementedError

    def _device_hyper(self, group: Dict[str, Any]) -> Dict[str, Any]:
        """The group's hyper-parameters for the bucket kernel; a tensor lr stays a tensor (not read)."""
        raise NotImplementedError

    def _skip(self) -> None:
        """inf/nan in the gradients: no parameter or state changes, the window is dropped."""
        for bucket in self._buckets:
            bucket.consume_all()
        self.skipped_steps += 1
        self._consecutive_skips += 1
        if self._consecutive_skips == _SKIP_WARN_AFTER:
            warnings.warn(
                f"fastaccum: the last {_SKIP_WARN_AFTER} updates were all skipped (inf/nan gradients), so the "
                f"model is not training (loss scale {self.loss_scale}). Check the loss for inf/nan, lower "
                "loss_scale (or use loss_scale='dynamic'), or use bf16 instead of fp16 parameters",
                RuntimeWarning,
                stacklevel=3,
            )
        if self._scaler is not None:
            self._scaler.update(found_inf=True)
        self._end_window()

    def _end_window(self) -> None:
        self._window.end()
        self._norm_cache = None

    def _state_spec(self, group: Dict[str, Any]) -> List[Tuple[str, torch.dtype]]:
        """(state key, dtype) of the flat state this optimizer keeps, besides 'step'."""
        raise NotImplementedError

    def _prepare_state(self, bucket: Bucket, idx: Sequence[int], updating: bool = True) -> Dict[str, List[Tensor]]:
        """Flat state for the bucket (allocated once) and per-parameter state views;
        ``updating``: the parameters are about to be updated (not just given state)."""
        group = self.param_groups[bucket.group_index]
        spec = self._bucket_spec(bucket, group)
        views = {name: bucket.allocate_state(name, dtype) for name, dtype in spec.items()}
        for i in idx:
            p = bucket.params[i]
            st = self.state[p]
            fresh_state = not st
            if fresh_state:
                st["step"] = bucket.steps[i]
                for name in spec:
                    st[name] = bucket.wrapped(i, views[name][i])  # a DTensor under FSDP2, as torch's
            if "master_param" in views and (
                fresh_state or (updating and bucket.sharded and float(bucket.steps[i]) == 0)
            ):
                # the master starts from the parameter as it is at its first update, so
                # weights loaded after the optimizer was built are picked up (FSDP2's state
                # exists from construction: its first update copies again)
                views["master_param"][i].copy_(bucket.data(i).detach())
        return views

    def _bucket_spec(self, bucket: Bucket, group: Dict[str, Any]) -> Dict[str, torch.dtype]:
        """Every flat state tensor of the bucket and its dtype (the algorithm's, plus masters)."""
        spec = dict(self._state_spec(group))
        if bucket.dtype == torch.float64:  # float64 parameters keep float64 state, as torch.optim
            spec = {name: torch.float64 for name in spec}
        if bucket.low_precision and self.master_weights:
            spec["master_param"] = torch.float32
        return spec

    def _rng_seed(self, needed: bool) -> int:
        # stochastic rounding draws its seed from torch's RNG: runs are reproducible
        # under torch.manual_seed and differ from step to step.
        return int(torch.randint(0, 2**62, (1,)).item()) if needed else 0

    def _device_seed(self, bucket_index: int, needed: bool) -> int:
        """A bucket's stochastic-rounding seed on the device-resident step: drawn once from
        torch's RNG and kept, so that a step reads no host value and its kernels' arguments are
        the same every step (what a captured CUDA graph replays). The noise still changes from
        step to step: the kernels count it by the parameters' device step counts."""
        if not needed:
            return 0
        seeds = self.__dict__.setdefault("_device_seeds", {})
        if bucket_index not in seeds:
            seeds[bucket_index] = self._rng_seed(True)
        return seeds[bucket_index]

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
        self._run_bucket(bucket, idx, self._plan_bucket(bucket, idx, multiplier, grads))

    def _plan_bucket(
        self, bucket: Bucket, idx: Sequence[int], multiplier: float, grads: Optional[List[Tensor]] = None
    ) -> Tuple[Any, Any]:
        """The kernel's (segments, hyper-parameters); changes no parameter and no step count."""
        group = self.param_groups[bucket.group_index]
        segs = self._cached_segments(bucket, idx, grads)
        if segs is not None and bucket.backend.counts_steps and hasattr(segs, "step_counts"):
            segs.step_counts = bucket.steps  # the backend adds one to each count (_run_bucket does not)
        elif segs is not None:
            segs.steps = [int(s) + 1 for s in bucket.steps.tolist()]
        else:
            steps = bucket.steps.tolist()
            views = self._prepare_state(bucket, idx)
            segs = self._segments(
                bucket, idx, views,
                grads if grads is not None else bucket.update_grads(idx),
                [int(steps[i]) + 1 for i in idx],  # the step counts after this step
            )
        stochastic = self._stochastic(bucket)
        hp = self._hyper(group, multiplier, stochastic, self._rng_seed(stochastic))
        return segs, hp

    def _cached_segments(self, bucket: Bucket, idx: Sequence[int], grads: Optional[List[Tensor]]) -> Any:
        """The segments of a whole-bucket update from the buffer, made once and passed again
        on later steps (``reusable``: a backend keeps its pointer layout on them), while no
        state entry was added or removed since. None when this update is another kind."""
        # (FSDP2 may give a shard a new local tensor: its segments are made every step)
        if grads is not None or bucket.sharded or len(idx) != len(bucket.params):
            return None
        key = id(bucket)
        mark = (id(self.state), len(self.state), self._state_epoch,
                tuple(self._state_spec(self.param_groups[bucket.group_index])))
        hit = self._segs_cache.get(key)
        if hit is not None and hit[0] == mark and hit[1] is bucket:
            segs = hit[2]
            # the segments' own gradients, or this step's (a user's p.grad read in place)
            segs.grads = bucket.update_grads(idx) if bucket.has_external() else hit[3]
            return segs
        if bucket.has_external():
            return None  # laid out from the segments' own gradients only
        views = self._prepare_state(bucket, idx)
        segs = self._segments(bucket, idx, views, bucket.update_grads(idx), [])
        if hasattr(segs, "reusable"):
            segs.reusable = True
        mark = mark[:1] + (len(self.state),) + mark[2:]  # the state entries _prepare_state made
        self._segs_cache[key] = (mark, bucket, segs, segs.grads)
        return segs

    def _run_bucket(self, bucket: Bucket, idx: Sequence[int], plan: Tuple[Any, Any]) -> None:
        if getattr(plan[0], "step_counts", None) is not None:
            pass  # counted by the backend, once its update has run
        elif len(idx) == len(bucket.params):
            bucket.steps += 1
        else:
            bucket.steps[list(idx)] += 1
        getattr(bucket.backend, self._kernel)(*plan)

    # ------------------------------------------------------------ copy / pickle
    def __getstate__(self) -> Dict[str, Any]:
        # Everything (buffers, window, scaler, buckets) travels, so that a deep copy or a
        # torch.save(opt) steps like the original; hook handles are re-made on the copy's
        # parameters, and user hooks are left behind as torch.optim leaves them.
        state = self.__dict__.copy()
        for key in ("_hook_handles", "_hooks", "_optimizer_step_pre_hooks", "_optimizer_step_post_hooks",
                    "_optimizer_state_dict_pre_hooks", "_optimizer_state_dict_post_hooks",
                    "_optimizer_load_state_dict_pre_hooks", "_optimizer_load_state_dict_post_hooks",
                    "_segs_cache", "_checked_groups"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_buckets" not in state:  # torch.optim's own three-key state: nothing of ours to restore
            return
        self._hook_handles = []
        self._hooks = {}
        self._unhooked = []
        self._segs_cache = {}
        self._state_epoch = state.get("_state_epoch", 0)
        weakref.finalize(self, _release, self._hook_handles, self._buckets)
        for bi, bucket in enumerate(self._buckets):
            for i, p in enumerate(bucket.params):
                self._take_over(p)
                self._hook(bi, i)
                bucket.adopt(i)
            bucket.restore(None, bucket.live, bucket.fresh)


def _make_hook(ref: "weakref.ref[AccumOptimizer]", bi: int, i: int) -> Callable[[Tensor], None]:
    # The hook holds the optimizer weakly: a dropped optimizer frees its buffers.
    def grad_ready(p: Tensor) -> None:
        opt = ref()
        if opt is not None:
            opt._grad_ready(bi, i, p)

    # Autograd runs the hook inside a backward that a compiled function called, where
    # torch.compile would trace it (buffer bookkeeping, per-tensor kernel launches, a
    # recompilation per parameter): it runs eagerly instead. torch.compiler.disable's wrapper
    # costs microseconds per call, paid once per parameter and micro-batch (more than the rest
    # of the hook), so it is entered only when a compiler is watching frames.
    disabled = torch.compiler.disable(grad_ready)
    if _frame_callback is None:
        return disabled

    def hook(p: Tensor) -> None:
        if _frame_callback() is None:
            opt = ref()  # (grad_ready, inline: a call less per parameter and micro-batch)
            if opt is not None:
                opt._grad_ready(bi, i, p)
        else:
            disabled(p)

    _skip_frame(hook.__code__)
    return hook


def _eager_frame_probe() -> Tuple[Optional[Callable[[], Any]], Optional[Callable[[Any], None]]]:
    """(the current thread's frame callback of torch.compile, None when it is off; a function
    that keeps torch.compile out of one code object), or (None, None) on a torch without them."""
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback
        from torch._dynamo.eval_frame import skip_code
    except ImportError:
        return None, None
    return get_eval_frame_callback, skip_code


_frame_callback, _skip_frame = _eager_frame_probe()


def _as_tensor(x: Any) -> Optional[Tensor]:
    """GradScaler hands over tensors; a Python number becomes one (on the CPU: no sync)."""
    return x if x is None or isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float32)


def _release(handles: List[Any], buckets: List[Bucket]) -> None:
    """The optimizer is gone (or its constructor failed): remove its hooks, free its buffers."""
    for h in handles:
        h.remove()
    for b in buckets:
        b.detach_from_params()
        for p in b.params:
            ref = _OWNERS.get(id(p))
            if ref is not None and ref() is None:
                del _OWNERS[id(p)]


document_args({})(AccumOptimizer)
