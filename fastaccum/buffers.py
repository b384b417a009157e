"""Flat fp32 accumulation buffers and flat optimizer state, one *bucket* at a time.

A bucket is the parameters of one param group that share a device and a dtype (grouping
by (device, dtype) before any fused launch, as ``torch.optim.Optimizer`` does). Each
parameter owns a segment of every flat tensor; segments start on 64-byte boundaries
(16 fp32 elements) so kernels can use aligned vector loads.

* ``grad``: the fp32 accumulation buffer. fp32 parameters get ``p.grad`` as a view of their
  segment, so autograd accumulates in place. bf16/fp16 parameters get ``p.main_grad`` (the
  fp32 view) and, as ``p.grad``, a :class:`GradView`: a tensor that presents the parameter's
  dtype (so torch accepts it as ``p.grad``) and holds the fp32 segment, so that trainers'
  ``clip_grad_norm_`` and grad-norm logging see the true accumulated gradient.
* ``exp_avg``/``exp_avg_sq``/... : flat state, allocated at the first step (as torch
  allocates state lazily), exposed per parameter as views in ``optimizer.state[p]``.

This module is the only one that writes ``p.grad``, ``p.main_grad`` or a bucket's flags:
the optimizer says *what happened* (a hook fired, a step consumed the window, the user
cleared the gradients) and the bucket keeps the segment protocol consistent.

fastaccum never assumes it owns ``p.grad``: a tensor there that is not our view (assigned
by the user, by gradient surgery, or by a trainer) replaces the segment, a ``None`` on an
fp32 parameter means "no gradient" (skipped, like torch.optim), and the fp32 view is
attached again. Invariant: an fp32 ``p.grad`` is our view only while its segment is fresh,
so autograd never adds into a stale segment.

During a backward, the bf16/fp16 gradients of GradView parameters may wait in a
:class:`PendingFolds` (the batched fold: one launch for many of them). The flags always say
what the buffer means; ``pending[i]`` says segment ``i``'s bytes are still on their way, and
every method that reads or writes a segment folds what waits first (``_sync_folds``).
"""
from __future__ import annotations

import functools
import math
import operator
import os
import weakref
from itertools import repeat
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves, tree_map_only

from .backends import Backend

ALIGN = 16  # elements; 16 fp32 = 64 bytes = one cache line / one AVX-512 register
_grad_of = operator.attrgetter("grad")

try:  # DTensor: the parameters (and gradients) of FSDP2's fully_shard
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = None


def is_sharded(t: Optional[Tensor]) -> bool:
    """Whether ``t`` is a DTensor (a shard of a parameter or gradient under FSDP2)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The tensor that holds this rank's elements: the local shard of a DTensor, else ``t``.

    Looked up on every use, never cached: FSDP2 may give a parameter a new local tensor
    (its lazy init pads uneven shards into fresh storage).
    """
    return t._local_tensor if is_sharded(t) else t


def like(p: Tensor, local_view: Tensor) -> Tensor:
    """``local_view`` as what belongs next to ``p``: a DTensor with ``p``'s sharding for a
    sharded ``p`` (sharing ``local_view``'s memory), else ``local_view`` itself."""
    if not is_sharded(p):
        return local_view
    with torch.no_grad():
        return DTensor.from_local(local_view, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())


_graph_task_id = torch._C._current_graph_task_id
_STRIDED = torch.strided


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


def _plain(p: Tensor) -> bool:
    # Parameters that are tensor subclasses (DTensor shards, quantised weights) bring their
    # own gradient types: they keep the release-in-the-hook protocol.
    return type(p) in (Tensor, torch.nn.Parameter)


class GradView(Tensor):
    """``p.grad`` of a bf16/fp16 parameter: it presents the parameter's dtype and holds the
    parameter's fp32 segment of the accumulation buffer (no low-precision copy exists).

    Why a tensor subclass: every trainer clips and logs through
    ``torch.nn.utils.clip_grad_norm_(model.parameters(), ...)``, which reads ``p.grad``; torch
    refuses a ``p.grad`` whose dtype differs from the parameter's, and a released (``None``)
    gradient makes the trainer see a norm of 0 and clip nothing. Through this view:

    * autograd's accumulation into ``p.grad`` (``p.grad += new``, what AccumulateGrad does
      from the second micro-batch on) is the backend's fused fold into the fp32 segment;
    * ``torch.linalg.vector_norm`` (the norm ``clip_grad_norm_`` takes of a subclass
      gradient) is computed on the fp32 segment, returned in fp32: the exact norm, one read
      pass, as fastaccum's own clipping;
    * a multiplication by a finite scalar >= 0 (the clip ``g.mul_(clip_coef)``) is recorded
      in the bucket and folded into the update multiplier: no second pass over the buffer;
    * anything else applies the recorded scale first and then runs on the fp32 segment
      (results come back as plain fp32 tensors, in-place ops write the segment).
    """

    _inner: Tensor
    _index: int
    _bucket: Callable[[], Optional["Bucket"]]

    # plain results stay plain: no re-wrapping of outputs by torch function handling
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, inner: Tensor, dtype: torch.dtype, bucket: Optional["Bucket"], index: int) -> "GradView":
        self = Tensor._make_wrapper_subclass(
            cls, inner.shape, strides=inner.stride(), dtype=dtype, device=inner.device, requires_grad=False
        )
        self._inner = inner
        self._index = index
        # weak: the bucket holds its parameters, whose .grad holds this view
        self._bucket = weakref.ref(bucket) if bucket is not None else (lambda: None)
        return self

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"GradView(dtype={self.dtype}, fp32={self.fp32()!r})"

    def fp32(self) -> Tensor:
        """The fp32 gradient (any recorded scale applied)."""
        self._materialize()
        return self._inner

    def untyped_storage(self) -> Any:  # type: ignore[override]
        # the memory behind this gradient is the fp32 buffer: memory accounting counts it
        # once (data_ptr() still raises, so no kernel reads fp32 bytes as bf16 by mistake)
        return self._inner.untyped_storage()

    def _materialize(self) -> None:
        bucket = self._bucket()
        if bucket is not None:
            bucket.materialize(self._index)

    # A copy or a pickle is a standalone view of a copy of the fp32 values: the bucket it
    # came from is not part of it (a copied optimizer recognises it by its data pointer).
    def __deepcopy__(self, memo: Dict[int, Any]) -> "GradView":
        import copy

        self._materialize()
        return GradView(copy.deepcopy(self._inner, memo), self.dtype, None, self._index)

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._materialize()
        return (_rebuild_grad_view, (self._inner, self.dtype, self._index))

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten.add_.Tensor and isinstance(args[0], GradView) and not isinstance(args[1], GradView):
            bucket = args[0]._bucket()
            if bucket is not None and bucket.fold(args[0]._index, args[1], kwargs.get("alpha", 1)):
                return args[0]
        elif func is aten.linalg_vector_norm.default and isinstance(args[0], GradView):
            bucket = args[0]._bucket()
            if bucket is not None:
                norm = bucket.segment_norm(args[0]._index, *args[1:], **kwargs)
                if norm is not None:
                    return norm
        elif func in (aten.mul_.Tensor, aten.mul_.Scalar) and isinstance(args[0], GradView) and not kwargs:
            bucket = args[0]._bucket()
            if bucket is not None and bucket.defer_scale(args[0]._index, args[1]):
                return args[0]
        elif func in (aten._foreach_mul_.Tensor, aten._foreach_mul_.Scalar, aten._foreach_mul_.ScalarList):
            tensors, coef = args[0], args[1]
            coefs = coef if isinstance(coef, (list, tuple)) else [coef] * len(tensors)
            for t, c in zip(tensors, coefs):
                t.mul_(c)  # each GradView defers (or applies) its own; plain tensors multiply
            return None
        return cls._on_fp32(func, args, kwargs)

    @staticmethod
    def _on_fp32(func: Any, args: Any, kwargs: Any) -> Any:
        views = [a for a in tree_leaves((args, kwargs)) if isinstance(a, GradView)]
        for v in views:
            v._materialize()
        uargs, ukwargs = tree_map_only(GradView, lambda v: v._inner, (args, kwargs))
        out = func(*uargs, **ukwargs)
        if func._schema.is_mutable:
            for v in views:
                bucket = v._bucket()
                if bucket is not None:
                    bucket.written(v._index)
        # in-place and out= ops return the tensor they wrote: hand back the view itself
        by_inner = {id(v._inner): v for v in views}
        return tree_map_only(Tensor, lambda t: by_inner.get(id(t), t), out)


def _rebuild_grad_view(inner: Tensor, dtype: torch.dtype, index: int) -> GradView:
    return GradView(inner, dtype, None, index)


#: the least a batched fold holds by default (MiB), and on a device whose memory is not known
MIN_FOLD_CAP_MB = 32.0
#: by default a batched fold holds up to this share of the device's memory in bf16/fp16 gradients
DEFAULT_FOLD_CAP_SHARE = 0.01


def fold_cap_bytes(device: Optional[torch.device] = None) -> int:
    """The cap of :class:`PendingFolds` on ``device``: see :func:`batched_fold_cap` (the device's
    memory when it is a GPU; nothing known otherwise)."""
    cuda = device is not None and device.type == "cuda"
    return batched_fold_cap(torch.cuda.get_device_properties(device).total_memory if cuda else None)


def batched_fold_cap(device_memory: Optional[int] = None) -> int:
    """Bytes of bf16/fp16 gradients a batched fold holds: ``FASTACCUM_FOLD_CAP_MB`` (MiB, read
    when an optimizer is built), else 1 % of ``device_memory`` (bytes) and at least
    :data:`MIN_FOLD_CAP_MB` (that alone when the memory is not known). 0 turns the batched fold
    off: every gradient is folded in its own launch as it arrives (the per-parameter fold).
    ``fastaccum plan`` counts the same bytes.

    Why a share of the device: each flush costs the host a fixed ~0.1-1 ms (the table, its
    copy, the launch; measured on an H100's host), so a flush must fold enough bytes to keep
    the device busy that long, and a device's bandwidth grows with its memory. On an 80 GB
    H100 (1 %: 815 MiB), an 8-micro-batch window of a 1.3B bf16 model took 93 ms with 1 GiB
    held, 114 ms with 128 MiB and 170 ms with 32 MiB; on a 6 GB GPU the default is 61 MiB."""
    raw = os.environ.get("FASTACCUM_FOLD_CAP_MB", "").strip()
    if not raw:
        floor = int(MIN_FOLD_CAP_MB * 2**20)
        return max(floor, int(device_memory * DEFAULT_FOLD_CAP_SHARE)) if device_memory else floor
    try:
        mb = float(raw)
    except ValueError:
        mb = float("nan")
    if not (mb >= 0 and math.isfinite(mb)):
        raise ValueError(f"FASTACCUM_FOLD_CAP_MB={raw!r}: set it to a number of MiB >= 0 (0 folds every gradient "
                         "in its own launch), or unset it for the default")
    return int(mb * 2**20)


class PendingFolds:
    """bf16/fp16 gradients that reached their parameters' hooks and wait to be folded into the
    fp32 buffers together, in one launch (``Backend.fold_many_``); one per optimizer and device.

    Why: a backward delivers one gradient per parameter, and folding each in its own launch
    (plus, through a GradView, a Python dispatch) makes a micro-batch of a large model cost more
    host time than memory time. Held here instead (a reference, as DDP's reducer holds the
    gradients of a bucket), they are folded once enough bytes have arrived.

    Memory: a gradient that the per-parameter fold would free at once stays alive until the
    flush. Adding one that brings the held bytes to ``cap`` or more flushes, so besides the
    gradient being folded a backward holds less than ``cap`` bytes of gradients more than the
    per-parameter fold does, plus a table of 40 bytes per gradient (and, with
    track_noise_scale, 4 bytes per 2048 elements of partial sums).

    Flushed: when the cap is reached; at the end of the backward that delivered them (a
    callback queued on autograd's engine, which also covers ``loss.backward()`` called by the
    user); by ``opt.backward`` when its backward raised; and before anything reads or writes a
    segment while gradients wait (every Bucket method that does calls :meth:`Bucket._sync_folds`:
    the step, ``clip_grad_norm_``, any use of a GradView, ``state_dict``, ``zero_grad``...).
    A backward that raises leaves its gradients waiting, to be folded by the next of these:
    nothing that reached a hook is lost, as with the per-parameter fold. An entry leaves the
    queue only once its launch has been issued, so a flush that fails (and is retried) folds
    nothing twice, and a second gradient for a segment that still has one waiting flushes first.
    """

    def __init__(self, backend: Backend, cap: int, device: torch.device) -> None:
        self.backend = backend
        self.cap = cap
        self.align = backend.batched_fold_align
        self._cuda = device.index if device.type == "cuda" else None
        self._init_transient()

    def _init_transient(self) -> None:
        # (bucket, index, gradient, copy, the stream it was made on) in arrival order
        self.entries: List[Tuple["Bucket", int, Tensor, bool, Any]] = []
        self.nbytes = 0
        self.task = -1  # the autograd graph task whose end-of-backward callback is queued
        self.detached: List["Bucket"] = []  # buckets with views detached for the running backward
        self.launches = 0  # batched launches issued so far (read by tests and the benchmark)

    def __getstate__(self) -> Dict[str, Any]:
        self.finish()  # a copy holds no gradient of the original's backward
        state = self.__dict__.copy()
        for key in ("entries", "nbytes", "task", "detached", "launches"):
            state.pop(key)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_transient()

    def reserve(self, task: int) -> bool:
        """In the backward ``task`` (``torch._C._current_graph_task_id()``, -1 outside any),
        make sure its end will flush: the callback is queued once per backward. False outside a
        backward (the gradient is then folded at once)."""
        if task < 0:
            return False
        if task != self.task:
            if self.entries:
                # left by a backward that raised (its end never came), or by the outer backward
                # of a reentrant one: folded now, before anything of this backward
                self.fold_waiting()
            try:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
            except RuntimeError:  # an engine that takes no final callbacks: fold at once
                return False
            self.task = task
        return True

    # What launches or moves p.grad runs eagerly: inside a backward that a compiled function
    # called, torch.compile would otherwise trace the engine's callback (and the fold's launch).
    @torch.compiler.disable
    def _end_of_backward(self) -> None:
        self.task = -1
        self.finish()

    def add(self, bucket: "Bucket", i: int, grad: Tensor, copy: bool, nbytes: int) -> None:
        """Hold ``grad`` for segment ``i`` of ``bucket`` (after :meth:`reserve`)."""
        stream = torch._C._cuda_getCurrentStream(self._cuda) if self._cuda is not None else None
        self.entries.append((bucket, i, grad, copy, stream))
        bucket.pending[i] = True
        bucket._n_pending += 1
        self.nbytes += nbytes
        if self.nbytes >= self.cap:
            self.fold_waiting()

    @torch.compiler.disable
    def fold_waiting(self) -> None:
        """Fold every waiting gradient: one launch per source dtype (one, but for a mix of bf16
        and fp16 parameters)."""
        while self.entries:
            self._fold_some()

    @torch.compiler.disable
    def finish(self) -> None:
        """The backward is over: fold what waits and give the views detached for it back to
        ``p.grad`` (the parameters that got no gradient in it keep theirs)."""
        self.fold_waiting()
        if self.detached:
            buckets, self.detached = self.detached, []
            for b in buckets:
                b._reattach_views()

    def _fold_some(self) -> None:
        """One launch: the waiting gradients of the first entry's dtype (grouped by bucket when
        measured, so that each bucket's sum of squares is one slice of the partial sums)."""
        dtype = self.entries[0][2].dtype
        group = [e for e in self.entries if e[2].dtype == dtype]
        measure = any(e[0].measure for e in group)
        if measure:
            order = {b: k for k, b in enumerate(dict.fromkeys(e[0] for e in group))}
            group.sort(key=lambda e: order[e[0]])
        srcs = [e[2] for e in group]
        dsts = [e[0].grad_views[e[1]] for e in group]
        copy = [e[3] for e in group]
        fold = self.backend.fold_many_
        if self._cuda is not None:
            self._order_streams(group)
            if torch.cuda.is_current_stream_capturing():
                # a graph being captured would replay the table's host copy with whatever the
                # pinned buffer holds then: one op per gradient instead
                fold = functools.partial(Backend.fold_many_, self.backend)
        # (every entry was checked by Bucket._pend as it arrived)
        partials, first = fold(srcs, dsts, copy, measure, checked=True)
        # issued: from here on these entries are folded, whatever happens next
        self.launches += 1
        self.entries = [e for e in self.entries if e[2].dtype != dtype]
        self.nbytes = sum(e[0]._fold_bytes[e[1]] for e in self.entries)
        k = 0
        while k < len(group):
            b = group[k][0]
            k0 = k
            while k < len(group) and group[k][0] is b:
                b.pending[group[k][1]] = False
                k += 1
            b._n_pending -= k - k0
            if b.measure and partials is not None:
                b._add_micro_sumsq(partials[first[k0]:first[k]].sum(dtype=torch.float64))

    def _order_streams(self, group: List[Tuple["Bucket", int, Tensor, bool, Any]]) -> None:
        """A gradient made on another stream than the one folding it (hooks run on the stream of
        their parameter's backward): wait for that stream, and keep the gradient's memory from
        being reused by it before the fold has read it."""
        here = torch._C._cuda_getCurrentStream(self._cuda)
        others = {e[4] for e in group} - {here}
        if not others:
            return
        current = torch.cuda.current_stream(self._cuda)
        for sid, index, kind in others:
            current.wait_stream(torch.cuda.Stream(stream_id=sid, device_index=index, device_type=kind))
        for e in group:
            if e[4] != here:
                e[2].record_stream(current)


class Bucket:
    def __init__(self, params: List[Tensor], group_index: int, backend: Backend, with_buffer: bool = True,
                 grad_views: bool = True, folds: Optional[PendingFolds] = None) -> None:
        self.params = params
        self.group_index = group_index
        self.device = params[0].device
        # (what a gradient's get_device() says on this device: an int, compared per gradient)
        self.device_index = params[0].get_device()
        self.dtype = params[0].dtype
        self.backend = backend
        # FSDP2: the buffer and the state hold this rank's shards only
        self.sharded = is_sharded(params[0])
        self.shapes = [local(p).shape for p in params]
        self.numels = [local(p).numel() for p in params]
        self.offsets: List[int] = []
        total = 0
        for n in self.numels:
            self.offsets.append(total)
            total += _round_up(max(n, 1), ALIGN)
        self.numel = total
        # float64 parameters keep float64 gradients (as torch.optim does); all others fp32.
        self.grad_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        # No accumulation buffer with step_in_backward: each gradient is used once, in its hook.
        self.grad: Optional[Tensor] = (
            torch.zeros(total, dtype=self.grad_dtype, device=self.device) if with_buffer else None
        )
        self.grad_views: List[Tensor] = self.views(self.grad) if with_buffer else []
        # live[i]: in torch's terms, p.grad would be a tensor (not None) now. Only live
        # parameters are updated, so that parameters that got no gradient are skipped
        # exactly as torch.optim skips ``p.grad is None``.
        self.live = [False] * len(params)
        # The buffer is never zeroed after an update: a consumed segment is *stale* (its
        # values are logically zero) and the window's first gradient overwrites it instead of
        # adding to it. That saves the 4 bytes/param zeroing write, which is the difference
        # between the update and torch's fused AdamW step.
        #   fresh[i]:   the segment holds this window's gradient
        #   garbage[i]: the segment is stale and may hold non-zero values
        self.fresh = [False] * len(params)
        self.garbage = [False] * len(params)
        # DDP (bf16/fp16): segments all-reduced by the communication hook in this window, and
        # parameters whose p.grad DDP is about to overwrite with the (zero) bucket it reduced.
        self.reduced = [False] * len(params)
        self.ddp_wrote = [False] * len(params)
        # bf16/fp16 parameters whose p.grad is a GradView of their segment (plain tensors)
        self.grad_viewed = [self.low_precision and with_buffer and grad_views and _plain(p) for p in params]
        # what p.grad is while a segment is fresh, when that is not the view itself (a GradView,
        # or the DTensor over the view under FSDP2), made once per parameter
        self._wrappers: List[Optional[Tensor]] = [None] * len(params)
        self._init_fast_state()
        self._init_folds(folds)
        # scale[i]: a factor applied to a fresh segment's gradient through its GradView (a
        # trainer's clip) and not written into the buffer yet: the update folds it into its
        # multiplier, so clipping costs no pass of its own.
        self.scale = [1.0] * len(params)
        self.flat_state: Dict[str, Tensor] = {}
        self.state_views: Dict[str, List[Tensor]] = {}
        # step counts per parameter, float32 like torch.optim; state[p]["step"] are views.
        self.steps = torch.zeros(len(params), dtype=torch.float32)
        # Gradient noise scale (optimizer's track_noise_scale): the squared norm of the
        # micro-batch in progress, measured where a gradient passes through a kernel anyway
        # (the copy of a window's first gradient, every bf16/fp16 fold). A gradient that
        # autograd added into an fp32 view in place is not seen: the micro-batch is then
        # incomplete (``micro_missed``) and does not report (noise_scale.py).
        # ``device_measures``: the device-resident step, where the norms stay device tensors
        # (summed without a read) instead of floats.
        self.measure = False
        self.device_measures = False
        self.micro_sumsq: Any = 0.0
        self.micro_seen: set = set()
        self.micro_missed = False

    def _init_folds(self, folds: Optional[PendingFolds]) -> None:
        # The batched fold: the gradients of GradView parameters wait in ``folds`` (shared by the
        # optimizer's buckets on this device) during a backward, and are folded in groups.
        #   pending[i]:  a gradient for segment i waits there
        #   detached[i]: opt.backward set p.grad None over fresh segment i for its backward, so
        #                that autograd hands the gradient to the hook instead of adding it through
        #                the GradView (a Python dispatch per parameter); the hook adds it
        n = len(self.params)
        self.folds = folds if folds is not None and any(self.grad_viewed) else None
        self.pending = [False] * n
        self.detached = [False] * n
        self._n_pending = 0
        self._n_detached = 0
        size = torch.empty((), dtype=self.dtype).element_size()
        self._fold_bytes = [n * size for n in self.numels]  # what each held gradient keeps alive
        self._micro_sumsq_dev: Optional[Tensor] = None  # measured by batched folds, summed on the device

    @property
    def low_precision(self) -> bool:
        return self.dtype in (torch.bfloat16, torch.float16)

    def views(self, flat: Tensor) -> List[Tensor]:
        return [flat[o : o + n].view(s) for o, n, s in zip(self.offsets, self.numels, self.shapes)]

    def data(self, i: int) -> Tensor:
        """The tensor the kernels update for parameter ``i`` (its local shard under FSDP2)."""
        return local(self.params[i])

    def wrapped(self, i: int, view: Tensor) -> Tensor:
        """A state or gradient view of parameter ``i`` as the user sees it (a DTensor under FSDP2)."""
        return like(self.params[i], view)

    def allocate_state(self, name: str, dtype: torch.dtype) -> List[Tensor]:
        """Per-parameter views of the flat state tensor ``name``, allocated (zeroed) on first use."""
        if name not in self.flat_state:
            self.flat_state[name] = torch.zeros(self.numel, dtype=dtype, device=self.device)
            # made once: building the views on every step cost more than a small model's update
            self.state_views[name] = self.views(self.flat_state[name])
        return self.state_views[name]

    def _init_fast_state(self) -> None:
        n = len(self.params)
        # external[i]: a gradient the user assigned to p.grad (a plain contiguous tensor of the
        # buffer's dtype) that the update reads in place instead of copying it into the
        # segment (which then stays stale). Cleared when the segment is used or written.
        self.external: List[Optional[Tensor]] = [None] * n
        # seg_sumsq[i]: sum of squares (fp64) of fresh segment i as its last fold left it,
        # returned by the fold kernel itself (backend.fuses_result_norm), so that the step
        # needs no norm pass. Valid only while the buffer's version counter is the one seen
        # after our own last write: any other in-place write through a view of the buffer
        # (autograd adding into an fp32 p.grad, a trainer's p.grad.mul_) bumps it.
        self.seg_sumsq: List[Optional[float]] = [None] * n
        self._known_version = -1
        # what p.grad is while every segment is fresh (see settled()), built on first use
        self._expected: Optional[List[Tensor]] = None
        self._all_idx = list(range(n))

    def __getstate__(self) -> Dict[str, Any]:
        # a copy gets its own GradViews; the recorded scales are written first so the copy's
        # buffer holds the gradient as it is
        self._sync_folds()
        self.apply_scales()
        state = self.__dict__.copy()
        state["_wrappers"] = [None] * len(self.params)
        state["_expected"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("device_measures", False)  # pickled before it existed
        if "external" not in state:  # pickled before these existed
            self._init_fast_state()
        if "pending" not in state:  # pickled before the batched fold: folds gradients one by one
            self._init_folds(None)
        self.seg_sumsq = [None] * len(self.params)  # a copy's buffer has its own version counter
        self._known_version = -1

    # ------------------------------------------------------------ the batched fold
    def _sync_folds(self) -> None:
        """Fold every gradient still waiting for this bucket's segments and re-attach the views
        detached for a backward: called first by every method that reads or writes a segment,
        or reads ``p.grad`` (a no-op, two integer tests, when nothing waits)."""
        if self._n_pending or self._n_detached:
            self.folds.finish()

    def _sync_segment(self, i: int) -> None:
        """Before segment ``i`` alone is read or written: fold what waits for it (with the rest)."""
        if self.pending[i]:
            self.folds.fold_waiting()

    @torch.compiler.disable
    def finish_folds(self) -> None:
        """The backward is over (or raised): nothing of it waits any more."""
        self._sync_folds()

    def _pend(self, i: int, grad: Tensor, copy: bool) -> bool:
        """Hold ``grad`` (this micro-batch's gradient of parameter ``i``) for the batched fold:
        ``copy`` makes it the segment (a stale one, or a gradient that replaces the window's),
        else it is added. False when it cannot wait: outside a backward, or a gradient the
        kernel cannot read as it is (another dtype, strided, misaligned, a subclass).
        What is checked here is all the batched fold needs (it packs its table unchecked)."""
        # (this runs once per parameter and micro-batch: every call here is host time)
        folds = self.folds
        n = self.numels[i]
        if (type(grad) is not Tensor or grad.dtype is not self.dtype or grad.layout is not _STRIDED
                or grad.get_device() != self.device_index or grad.requires_grad or not n
                or grad.numel() != n or not grad.is_contiguous() or grad.data_ptr() % folds.align):
            return False
        if self.pending[i]:
            folds.fold_waiting()  # (a backward that raised left one waiting) segment i gets them in order
        task = _graph_task_id()
        if task < 0 or (task != folds.task and not folds.reserve(task)):
            return False
        if copy:
            self._mark_fresh(i)
        elif self.scale[i] != 1.0:
            self.apply_scale(i)  # a trainer's recorded clip applies to what came before
        self._wrote(self.grad._version, i, None)  # the segment changes: no cached sum of squares holds
        if self.measure:
            self.micro_seen.add(i)  # its sum of squares comes with the flush
        folds.add(self, i, grad, copy, self._fold_bytes[i])
        return True

    @torch.compiler.disable
    def detach_for_batched_fold(self) -> None:
        """``opt.backward`` is about to run a backward: the GradViews of fresh segments leave
        ``p.grad``, so that autograd hands each new gradient to the hook (which holds it for
        the batched fold, as an add) instead of adding it through the GradView. The views come
        back when the backward ends (the views of parameters that got no gradient included)."""
        if self.folds is None:
            return
        n = 0
        wrappers, fresh, det = self._wrappers, self.fresh, self.detached
        for i, p in enumerate(self.params):
            w = wrappers[i]
            if w is not None and fresh[i] and not det[i] and p.grad is w:
                p.grad = None
                det[i] = True
                n += 1
        if n:
            self._n_detached += n
            self.folds.detached.append(self)

    def _reattach_views(self) -> None:
        """The backward ended: every view still detached goes back to ``p.grad``."""
        if not self._n_detached:
            return
        for i, p in enumerate(self.params):
            if not self.detached[i]:
                continue
            self.detached[i] = False
            self._n_detached -= 1
            g = p.grad
            if g is not None and not self.owns_grad(i, g):
                # autograd delivered a gradient that no hook of ours saw (a hook before ours
                # raised): it was meant to be added to the fresh segment, as through the view
                self.receive(i, local(g), measured=True)
            p.grad = self._attached(i)

    def _add_micro_sumsq(self, s: Tensor) -> None:
        """The sum of squares (an fp64 device value) of this bucket's gradients in a batched fold:
        kept on the device (resident step: never read; host step: read once per micro-batch)."""
        if self.device_measures:
            self.micro_sumsq = s if not isinstance(self.micro_sumsq, Tensor) else self.micro_sumsq + s
        else:
            self._micro_sumsq_dev = s if self._micro_sumsq_dev is None else self._micro_sumsq_dev + s

    # ------------------------------------------------------------ writes we make
    def _wrote(self, version_before: int, i: int, sumsq: Optional[float]) -> None:
        """We wrote segment ``i`` (its new sum of squares when the kernel returned it)."""
        if version_before != self._known_version:
            # someone else wrote the buffer since our last write: no cached sum holds
            self.seg_sumsq = [None] * len(self.params)
        self.seg_sumsq[i] = sumsq
        self._known_version = self.grad._version

    def receive(self, i: int, grad: Tensor, measured: bool = False) -> None:
        """Fold an incoming gradient into segment ``i``: add when fresh, overwrite when stale.
        ``measured``: a micro-batch's gradient from a hook (its squared norm is recorded when
        ``measure`` is on)."""
        self._sync_segment(i)
        if self.fresh[i]:
            self.apply_scale(i)
            self._accumulate(i, grad, 1.0, measured)
        else:
            self.assign(i, grad, measured)

    def _accumulate(self, i: int, grad: Tensor, alpha: float, measured: bool) -> None:
        """``segment_i += alpha * grad`` with the one side output the kernel can give: the
        incoming gradient's squared norm when the noise scale measures this micro-batch, else
        the result's squared norm (the fused norm of the last fold) where the backend has it."""
        v0 = self.grad._version
        result_sumsq = None
        if measured and self.measure:
            # the accumulate kernel's side output where the backend has one (cpu, triton)
            s = self.backend.accumulate_sumsq_(self.grad_views[i], grad, alpha)
            self._record_sumsq(i, s, alpha * alpha)
        elif self.backend.fuses_result_norm:
            result_sumsq = self.backend.accumulate_(self.grad_views[i], grad, alpha, result_sumsq=True)
        else:
            self.backend.accumulate_(self.grad_views[i], grad, alpha)
        self._wrote(v0, i, result_sumsq)

    def _record_sumsq(self, i: int, s: Any, factor: float = 1.0) -> None:
        """Add ``factor · s`` (``s``: a float or a 0-dim tensor) to the micro-batch's squared norm."""
        if self.device_measures and isinstance(s, Tensor):
            # summed in fp64 on the device, one op per fold (add promotes and scales in fp64)
            s = s.detach().reshape(())
            if not isinstance(self.micro_sumsq, Tensor):  # (a batched fold's gradients may be seen, not summed yet)
                s = s.to(torch.float64)
                self.micro_sumsq = s * factor if factor != 1.0 else s
            else:
                self.micro_sumsq = torch.add(self.micro_sumsq, s, alpha=factor)
        else:
            self.micro_sumsq += float(s) * factor
        self.micro_seen.add(i)

    def assign(self, i: int, grad: Tensor, measured: bool = False) -> None:
        """Make segment ``i`` exactly ``grad`` (a p.grad that is the whole gradient)."""
        self._sync_segment(i)
        v0 = self.grad._version
        self.grad_views[i].copy_(local(grad).reshape(self.grad_views[i].shape))
        self._wrote(v0, i, None)
        if measured and self.measure:
            # one read of the gradient just copied (no backend has a copy kernel with a
            # sum-of-squares output yet); once per window for fp32 parameters
            self._record_sumsq(i, self.backend.sumsq(self.grad_views[i].reshape(-1)))
        self._mark_fresh(i)

    def take_micro_sumsq(self) -> Tuple[Any, bool]:
        """(squared norm of the micro-batch that just ended, whether every gradient of it was
        measured); resets the counters for the next micro-batch."""
        self._sync_folds()
        total = self.micro_sumsq
        if self._micro_sumsq_dev is not None:  # the host step's batched folds: one read per micro-batch
            total += float(self._micro_sumsq_dev)
            self._micro_sumsq_dev = None
        out = (total, not self.micro_missed)
        self.micro_sumsq = 0.0
        self.micro_seen = set()
        self.micro_missed = False
        return out

    def zero_segment(self, i: int) -> None:
        """A zero gradient for parameter ``i`` (``zero_grad(set_to_none=False)``)."""
        self._sync_segment(i)
        v0 = self.grad._version
        self.grad_views[i].zero_()
        self._wrote(v0, i, 0.0)
        self._mark_fresh(i)

    def _mark_fresh(self, i: int) -> None:
        self.fresh[i] = True
        self.garbage[i] = False
        self.live[i] = True
        self.scale[i] = 1.0
        self.external[i] = None

    def consume(self, i: int) -> None:
        """Segment ``i`` was used (or dropped): its values are now logically zero."""
        self._sync_segment(i)
        self.reduced[i] = False
        self.scale[i] = 1.0
        self.external[i] = None
        if self.fresh[i]:
            self.fresh[i] = False
            self.garbage[i] = True
            self.seg_sumsq[i] = None

    def clean(self, idx=None) -> None:
        """Zero stale segments that may hold old values (before reading them as zeros)."""
        self._sync_folds()
        for i in range(len(self.params)) if idx is None else idx:
            if self.garbage[i]:
                v0 = self.grad._version
                self.grad_views[i].zero_()
                self._wrote(v0, i, None)
                self.garbage[i] = False

    # ------------------------------------------------------------ what the update reads
    def update_grads(self, idx: Sequence[int]) -> List[Tensor]:
        """The gradient tensor of each parameter in ``idx``: its segment, or the user's
        tensor read in place."""
        self._sync_folds()
        ext, views = self.external, self.grad_views
        return [views[i] if ext[i] is None else ext[i] for i in idx]

    def has_external(self) -> bool:
        # (not list.count(None): that compares each tensor to None through Tensor.__eq__, ~4 us each)
        return any(map(operator.is_not, self.external, repeat(None)))

    def own_external(self) -> None:
        """Copy the gradients read in place into their segments (a checkpoint saves the buffer)."""
        self._sync_folds()
        for i, g in enumerate(self.external):
            if g is not None:
                self.assign(i, g)
                self.params[i].grad = self._attached(i)

    def grad_sumsq(self) -> Optional[float]:
        """Squared L2 norm (fp64) of the gradient the update reads: fresh segments and the
        user's tensors read in place (stale segments are zeros). None when this backend has
        no host-side sum of squares and no fused sums are cached: the caller then runs the
        backend's norm pass over the buffer, and adds :meth:`external_sumsq`."""
        self._sync_folds()
        fresh = self.fresh
        cached = self.seg_sumsq
        if self.grad._version == self._known_version and all(
                s is not None for s, f in zip(cached, fresh) if f):
            total = sum(s for s, f in zip(cached, fresh) if f)
        elif self.backend.fuses_result_norm:
            if all(fresh):
                total = self.backend.sumsq_of([self.grad])  # the padding between segments is zero
            else:
                total = self.backend.sumsq_of([v.reshape(-1) for v, f in zip(self.grad_views, fresh) if f])
        else:
            return None
        return total + self.external_sumsq()

    def external_sumsq(self) -> float:
        if not self.has_external():
            return 0.0
        return self.backend.sumsq_of([g.reshape(-1) for g in self.external if g is not None])

    def settled(self) -> bool:
        """Every ``p.grad`` is the very view attached to its fresh segment (what a backward
        over the whole model leaves): there is nothing to fold, and every parameter is live."""
        self._sync_folds()
        if self.grad is None or self.sharded or not all(self.fresh) or not all(self.live) or any(self.ddp_wrote):
            return False
        exp = self._expected
        if exp is None:
            exp = [self._attached(i) for i in range(len(self.params))]
            if any(e is None for e in exp):
                return False
            self._expected = exp
        return all(map(operator.is_, map(_grad_of, self.params), exp))

    def detach_for_fused_norm(self) -> None:
        """The window's last backward is about to run: detach the fp32 views of fresh
        segments, so that autograd hands each gradient to the hook (instead of adding it
        into the view itself) and the hook's fold returns the segment's norm in its pass."""
        if self.grad is None or self.low_precision or self.sharded or not self.backend.fuses_result_norm:
            return
        for i, p in enumerate(self.params):
            g = p.grad
            if self.fresh[i] and g is not None and g is self.grad_views[i]:
                p.grad = None

    def use_steps(self, steps: Tensor) -> None:
        """Keep the step counts in ``steps`` (a view of the optimizer-wide device tensor)."""
        self.steps = steps

    # ------------------------------------------------------------ through a GradView
    def fold(self, i: int, grad: Tensor, alpha: Any) -> bool:
        """``p.grad += alpha * grad`` on a GradView (autograd's accumulation): the fused fold.
        False when it is not a plain gradient of the parameter's shape (the caller does the op)."""
        view = self.grad_views[i]
        if (self.folds is not None and not isinstance(alpha, Tensor) and alpha == 1 and self.fresh[i]
                and type(grad) is Tensor and grad.shape == view.shape and grad.device == view.device
                and self._pend(i, grad, copy=False)):
            return True  # inside a backward: held for the batched fold
        self._sync_segment(i)
        if not (self.fresh[i] and isinstance(grad, Tensor) and grad.shape == view.shape
                and grad.device == view.device and grad.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and not grad.is_sparse and not isinstance(alpha, Tensor)):
            return False
        self.apply_scale(i)
        self._accumulate(i, grad.detach(), float(alpha), True)
        return True

    def segment_norm(self, i: int, ord: Any = 2, dim: Any = None, keepdim: bool = False, *,
                     dtype: Optional[torch.dtype] = None) -> Optional[Tensor]:
        """The norm of segment ``i``'s gradient (its recorded scale included), in fp32 or
        ``dtype``; None for what the caller must compute itself (a norm over some dims)."""
        self._sync_folds()
        if dim is not None or keepdim or not self.fresh[i]:
            return None
        view = self.grad_views[i]
        if float(ord) == 2.0:
            # the backend's norm: the same read pass (and accumulation) as fastaccum's clipping
            norm = self.backend.grad_norm(view.reshape(-1)).to(device=view.device, dtype=torch.float32)
        else:
            norm = torch.linalg.vector_norm(view, ord)
        norm = norm * self.scale[i] if self.scale[i] != 1.0 else norm
        return norm.to(dtype) if dtype is not None else norm

    def defer_scale(self, i: int, coef: Any) -> bool:
        """``p.grad.mul_(coef)`` on a GradView: record a finite scalar ``coef >= 0`` instead of
        writing the segment. False for anything else (the caller does the op)."""
        self._sync_folds()
        if isinstance(coef, Tensor):
            if coef.numel() != 1 or coef.dim() != 0 or coef.is_complex():
                return False
            coef = coef.item()
        if isinstance(coef, bool) or not isinstance(coef, (int, float)):
            return False
        c = float(coef)
        if not self.fresh[i] or not (math.isfinite(c) and c >= 0.0):
            return False  # NaN/inf/negative: written now, as torch would (the step then sees it)
        self.scale[i] *= c
        return True

    def apply_scale(self, i: int) -> None:
        """Write segment ``i``'s recorded scale into the buffer."""
        if self.scale[i] != 1.0:
            self._sync_segment(i)  # the scale applies to the gradient waiting too
            if self.fresh[i]:
                v0 = self.grad._version
                self.grad_views[i].mul_(self.scale[i])
                self._wrote(v0, i, None)
            self.scale[i] = 1.0

    def materialize(self, i: int) -> None:
        """Segment ``i`` as ``p.grad`` means it: a gradient waiting for it folded, its scale applied."""
        self._sync_segment(i)
        self.apply_scale(i)

    def apply_scales(self) -> None:
        self._sync_folds()
        if self.scale.count(1.0) == len(self.scale):
            return
        for i in range(len(self.params)):
            self.apply_scale(i)

    def pending_scales(self) -> List[float]:
        """The recorded scales of the segments that hold this window's gradient."""
        if self.scale.count(1.0) == len(self.scale):  # (1.0 counts: a clip torch wrote into fp32 views)
            return [1.0] if True in self.fresh else []
        return [self.scale[i] for i in range(len(self.params)) if self.fresh[i]]

    def written(self, i: int) -> None:
        """Something wrote segment ``i`` through its GradView: a stale segment is no longer zeros."""
        if not self.fresh[i]:
            self.garbage[i] = True

    def _attached(self, i: int) -> Optional[Tensor]:
        """What ``p.grad`` is while segment ``i`` is fresh: the fp32 view, a GradView of it,
        or None (low-precision parameters that are tensor subclasses)."""
        if not self.low_precision:
            if not self.sharded:
                return self.grad_views[i]
            w = self._wrappers[i]
            if w is None:
                # a DTensor under FSDP2, made once: wrapping cost more per window than
                # the copy of the gradient into the segment (see bench/dist_window.py)
                w = self._wrappers[i] = self.wrapped(i, self.grad_views[i])
            return w
        if not self.grad_viewed[i]:
            return None
        w = self._wrappers[i]
        if w is None:
            w = self._wrappers[i] = GradView(self.grad_views[i], self.dtype, self, i)
        return w

    # ------------------------------------------------------------ the p.grad protocol
    def adopt(self, i: int) -> None:
        """Registration: expose the buffer and keep a gradient computed before the optimizer existed."""
        if self.grad is None:
            return
        self._sync_folds()
        p = self.params[i]
        existing = p.grad
        if self.low_precision:
            p.main_grad = self.wrapped(i, self.grad_views[i])
        if existing is not None:
            self.assign(i, existing)
            p.grad = self._attached(i)
        # Otherwise an fp32 p.grad stays None until the parameter's first gradient, which
        # the hook moves into the view: a parameter that never gets a gradient keeps
        # p.grad None, as with torch.optim (code that tests `p.grad is None` still works).

    def hold(self, i: int, p: Tensor, g: Tensor, add_to_fresh: bool) -> bool:
        """The hook's common case under the batched fold, kept short (it runs once per parameter
        and micro-batch): autograd handed over a plain bf16/fp16 gradient (``p.grad`` was None,
        or detached by opt.backward), which waits for the batched fold while ``p.grad`` becomes
        the segment's GradView again. False, with nothing changed, for anything else
        (:meth:`take_from_hook` then sorts it out)."""
        detached = self.detached[i]
        # opt.backward detaches fresh segments only: their gradient is added; otherwise it
        # replaces the segment unless the optimizer owns the window (managed mode)
        if not self.grad_viewed[i] or not self._pend(i, g, copy=not (detached or (add_to_fresh and self.fresh[i]))):
            return False
        if detached:
            self.detached[i] = False
            self._n_detached -= 1
        w = self._wrappers[i]
        p.grad = w if w is not None else self._attached(i)
        return True

    def take_from_hook(self, i: int, g: Tensor, add_to_fresh: bool = False) -> None:
        """Post-accumulate-grad hook: fold what autograd produced (``g``, the parameter's
        ``p.grad``) into segment ``i``.

        ``add_to_fresh``: the optimizer owns the window's accumulation (managed mode, inside
        a window), so an fp32 gradient that autograd did not add into our view (the user
        called ``model.zero_grad()`` between micro-batches) is added to the fresh segment
        instead of replacing the window's earlier micro-batches, as for bf16/fp16.
        A bf16/fp16 gradient (GradView parameters) that can wait for the batched fold never
        gets here: :meth:`hold` took it first.
        """
        p = self.params[i]
        if self.folds is not None and self.grad_viewed[i] and self.detached[i]:
            # opt.backward detached the view of this fresh segment and hold() could not keep the
            # gradient (outside a backward, or one the kernel cannot read): it is added now
            self.detached[i] = False
            self._n_detached -= 1
            self.receive(i, local(g), measured=True)
            w = self._wrappers[i]
            p.grad = w if w is not None else self._attached(i)
            return
        if self.low_precision and not self.grad_viewed[i]:
            self.receive(i, local(g), measured=True)  # add into a fresh segment, overwrite a stale one
            p.grad = None  # the bf16/fp16 gradient never outlives this hook
            self.ddp_wrote[i] = False
        elif add_to_fresh and self.fresh[i] and not self.owns_grad(i, g):
            # model.zero_grad() inside a managed window: the earlier micro-batches stay
            self.receive(i, local(g), measured=True)
            p.grad = self._attached(i)
        elif not self.owns_grad(i, g):
            # p.grad was None (the first micro-batch of a window, or model.zero_grad()) or
            # replaced: autograd handed over the whole gradient, so it replaces the segment
            # (a copy, where accumulating into a zeroed buffer would be an add). A bf16/fp16
            # gradient is released here: p.grad becomes the GradView of the segment.
            self.assign(i, g, measured=True)
            p.grad = self._attached(i)
        elif i not in self.micro_seen:
            # autograd added into our fp32 view in place (not measured), or folded through
            # the GradView without the fused fold: this micro-batch's norm is incomplete
            self.micro_missed = True
        # (a gradient autograd added into our view, or folded through the GradView, needs no
        # bookkeeping: the view is attached only while its segment is fresh, hence live)

    def release(self, i: int) -> None:
        """Step-in-backward: the gradient was used in its hook and is dropped."""
        self.params[i].grad = None

    def foreign_grads(self) -> Iterator[Tuple[int, Tensor, Optional[Tensor]]]:
        """(i, param, p.grad) for every parameter whose p.grad is not our view (or that moved device)."""
        self._sync_folds()
        for i, p in enumerate(self.params):
            g = p.grad
            if p.device != self.device or (g is not None and not self.owns_grad(i, g)):
                yield i, p, g

    def fold_user_grads(self) -> bool:
        """Make the segments hold exactly what ``p.grad`` means now; True when a segment changed."""
        self._sync_folds()
        changed = False
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                # no gradient this window (or cleared by model.zero_grad()): skipped.
                # Unwrapped bf16/fp16 gradients always live in the buffer, so for them
                # only a stale segment means none arrived.
                if not self.low_precision or self.grad_viewed[i]:
                    self.consume(i)
                    self.live[i] = False
                elif not self.fresh[i]:
                    self.live[i] = False
            elif self.low_precision and self.ddp_wrote[i]:
                # DDP copied the bucket our communication hook handed back (zeros: the
                # gradient is in the buffer, reduced in fp32) into p.grad: not a user's gradient
                p.grad = None
                self.ddp_wrote[i] = False
            elif g is self.external[i]:
                pass  # already folded (read in place): clip_grad_norm_ then step()
            elif not self.owns_grad(i, g):
                if self._readable_in_place(i, g):
                    # the update reads the user's tensor where it is (no copy: a copy moved
                    # 8 bytes/param more than the whole fp32 step); p.grad stays theirs
                    self.consume(i)
                    self.external[i] = g
                    self.live[i] = True
                else:
                    self.assign(i, g)
                    p.grad = self._attached(i)
                changed = True
        return changed

    def _readable_in_place(self, i: int, g: Tensor) -> bool:
        """A user's p.grad the kernels can read as the gradient itself: a plain, dense,
        contiguous tensor of the buffer's dtype (fp32, float64 for float64 parameters) and
        the parameter's shape. Anything else (bf16/fp16, strided, a subclass) is copied."""
        return (
            type(g) is Tensor and self.grad is not None and not self.sharded
            and g.dtype == self.grad_dtype and g.layout == torch.strided and g.device == self.device
            and g.shape == self.shapes[i] and g.is_contiguous()
        )

    def clear(self, set_to_none: bool) -> None:
        """``zero_grad``: no gradients (set_to_none) or zero gradients for those that had one."""
        self._sync_folds()
        for i, p in enumerate(self.params):
            if set_to_none:
                self.consume(i)
                self.live[i] = False
                p.grad = None
            elif self.live[i] or p.grad is not None:
                self.zero_segment(i)
                p.grad = self._attached(i)

    def consume_all(self, settled: bool = False) -> None:
        """The window's gradients are used: segments go stale, fp32 views are detached so
        that the next backward hands autograd's gradient over instead of adding to them
        (and a user's gradient read in place is released, as a copied one would have been)."""
        self._sync_folds()
        n = len(self.params)
        if settled:  # every p.grad is its attached view (settled() said so, and nothing ran since)
            for p in self.params:
                p.grad = None
            self.garbage = [True] * n  # every segment was fresh
        else:
            external = self.external
            for i, p in enumerate(self.params):  # consume(i) for every i, the flags below in one go
                g = p.grad
                if g is not None and (g is external[i] or self.owns_grad(i, g)):
                    p.grad = None
            self.garbage = [g or f for g, f in zip(self.garbage, self.fresh)]
        self.fresh = [False] * n
        self.reduced = [False] * n
        self.scale = [1.0] * n
        self.external = [None] * n
        self.seg_sumsq = [None] * n

    def consume_one(self, i: int) -> None:
        """step_in_backward: parameter ``i`` was updated in its hook from its segment, which
        goes stale; its fp32 view is detached (as :meth:`consume_all` does for all)."""
        self._sync_folds()
        self.consume(i)
        p = self.params[i]
        if p.grad is not None and self.owns_grad(i, p.grad):
            p.grad = None

    def zero_stale(self, idx: Sequence[int]) -> None:
        """A live parameter without a fresh segment (nor a gradient read in place) has a zero
        gradient: make it read as one."""
        self._sync_folds()
        if self.fresh.count(False) == 0:
            return
        self.clean([i for i in idx if not self.fresh[i] and self.external[i] is None])

    def live_indices(self) -> List[int]:
        if self.live.count(False) == 0:
            return self._all_idx
        return [i for i, is_live in enumerate(self.live) if is_live]

    def restore(self, buf: Optional[Tensor], live: Sequence[bool], fresh: Sequence[bool]) -> None:
        """Load a saved window: the partial gradients and which segments hold them."""
        self._sync_folds()
        self.live = list(live)
        self.scale = [1.0] * len(self.params)
        self.external = [None] * len(self.params)
        self.seg_sumsq = [None] * len(self.params)
        if self.grad is None:  # step_in_backward: no buffer
            return
        if buf is not None:
            self.grad.copy_(buf)
        self.fresh = list(fresh)
        self.garbage = [not f for f in self.fresh]  # whatever the buffer held before is stale
        for i, p in enumerate(self.params):
            # the restored partial gradients are what p.grad shows; nothing else is attached
            if self.fresh[i] and self._attached(i) is not None:
                p.grad = self._attached(i)
            elif p.grad is not None and self.owns_grad(i, p.grad):
                p.grad = None

    def check_saved(self, buf: Any, live: Any, fresh: Any) -> None:
        """Refuse a saved window that does not fit this bucket (before anything is loaded)."""
        n = len(self.params)
        for name, flags in (("live", live), ("fresh", fresh)):
            if not isinstance(flags, (list, tuple)) or len(flags) != n or not all(isinstance(f, bool) for f in flags):
                raise ValueError(f"the state_dict's {name!r} flags must be a list of {n} bools for this bucket, "
                                 f"got {flags!r}: the checkpoint is corrupt or from another parameter layout")
        if buf is not None:
            if not isinstance(buf, Tensor) or buf.dim() != 1 or buf.numel() != self.numel:
                raise ValueError(f"the state_dict's accumulation buffer must be a flat tensor of {self.numel} "
                                 f"elements for this bucket, got {getattr(buf, 'shape', type(buf).__name__)}")
            if not buf.is_floating_point():
                raise ValueError(f"the state_dict's accumulation buffer has dtype {buf.dtype}; expected {self.grad_dtype}")
        elif any(fresh) and self.grad is not None and not self.sharded:  # FSDP2 saves accum_grad per parameter
            raise ValueError("the state_dict marks gradients as accumulated but carries no accumulation buffer")

    def detach_from_params(self, idx: Optional[Sequence[int]] = None) -> None:
        """The optimizer is gone: parameters keep their gradients but not the flat buffer.

        ``p.main_grad`` (a view that would keep the whole bucket's buffer alive) is removed,
        and an fp32 ``p.grad`` that is our view becomes a tensor of its own.
        """
        if self.grad is None:
            return
        self._sync_folds()
        for i in range(len(self.params)) if idx is None else idx:
            p = self.params[i]
            mg = getattr(p, "main_grad", None)
            if mg is not None and self.owns_grad(i, mg):
                del p.main_grad
            g = p.grad
            if g is not None and self.owns_grad(i, g):
                if self.fresh[i]:
                    # a gradient of its own, in the parameter's dtype (a GradView's fp32
                    # segment is rounded to bf16/fp16, as torch would have held it)
                    self.apply_scale(i)
                    p.grad = self.wrapped(i, self.grad_views[i].to(self.dtype, copy=True))
                else:
                    p.grad = None

    def owns_grad(self, i: int, grad: Optional[Tensor]) -> bool:
        """Whether ``grad`` is this bucket's view for parameter ``i`` (autograd accumulated in place)."""
        view = self.grad_views[i]
        if grad is view or (grad is not None and grad is self._wrappers[i]):
            return True  # the common case: autograd accumulated into the very tensor we attached
        if type(grad) is Tensor and grad.layout == torch.strided and grad.data_ptr() != view.data_ptr():
            return False  # a user's tensor elsewhere in memory (the checks below, cheapest first)
        if isinstance(grad, GradView):  # a copied optimizer's view (see GradView.__deepcopy__)
            grad = grad._inner
        grad = local(grad) if grad is not None else None
        return (
            grad is not None
            and grad.layout == torch.strided
            and grad.device == view.device
            and grad.numel() > 0  # empty tensors (an FSDP2 rank's empty shard) all have data_ptr 0
            and grad.data_ptr() == view.data_ptr()
            and grad.shape == view.shape
        )

    # ------------------------------------------------------------ DDP (bf16/fp16 parameters)
    def span_for_reduce(self, idx: Sequence[int]) -> Tuple[Tensor, Optional[Callable[[Tensor], None]]]:
        """The fp32 gradients of parameters ``idx`` as one tensor to all-reduce in place, and
        the copy-back to run on the result (None when the tensor is the buffer itself).

        DDP buckets follow the parameters (reversed), so ``idx`` is normally one run of
        neighbouring segments: the slice of the buffer that spans it is reduced with no copy
        (the alignment padding between segments is zero on every rank). Otherwise the
        segments are gathered. Stale segments are zeroed first (a rank that got no gradient
        for a parameter contributes zeros), and afterwards every segment holds the reduced
        gradient: fresh, so that later gradients add to it. Whether the parameter is *live*
        (had a gradient on some rank) is decided at step time, across ranks.
        """
        self._sync_folds()
        idx = sorted(idx)
        self.clean([i for i in idx if not self.fresh[i]])
        for i in idx:
            self.seg_sumsq[i] = None  # the collective writes it
            self.external[i] = None
            self.fresh[i] = True
            self.garbage[i] = False
            self.reduced[i] = True
            self.ddp_wrote[i] = True
        lo, hi = idx[0], idx[-1]
        if hi - lo + 1 == len(idx):
            end = self.offsets[hi] + _round_up(max(self.numels[hi], 1), ALIGN)
            return self.grad[self.offsets[lo] : end], None
        views = [self.grad_views[i].view(-1) for i in idx]
        gathered = torch.cat(views)

        def copy_back(reduced: Tensor) -> None:
            for v, r in zip(views, torch.split(reduced, [v.numel() for v in views])):
                v.copy_(r)

        return gathered, copy_back

    def reduced_indices(self) -> List[int]:
        return [i for i, r in enumerate(self.reduced) if r]

    def set_live(self, idx: Sequence[int], live: Sequence[bool]) -> None:
        """Liveness across ranks: a reduced segment is live when some rank had a gradient."""
        for i, is_live in zip(idx, live):
            self.live[i] = bool(is_live)

    def layout(self) -> list:
        """What a saved accumulation buffer must match to be loaded into this bucket."""
        # whole-parameter sizes: under FSDP2 every rank checks the same layout (its shard
        # sizes differ from the other ranks')
        return [self.group_index, str(self.dtype), [p.numel() for p in self.params]]
