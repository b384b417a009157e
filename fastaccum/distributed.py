"""What fastaccum does across ranks besides the window's small all-reduce (window.py).

DDP with bf16/fp16 parameters: their gradients live in fastaccum's fp32 buffers, which
DDP does not see, so a communication hook (:func:`ddp_comm_hook`) averages those buffers
in fp32 while backward runs. FSDP2: the buckets hold the local shards (buffers.py); which
DTensor layouts are accepted is decided in one place, :func:`check_param_kind`; the
gradients FSDP2 keeps unsharded between micro-batches without gradient sync are handed to
fastaccum's sharded buffers before a checkpoint (:meth:`DistributedMixin._flush_fsdp2`).
"""
from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .buffers import is_sharded
from .window import dist_world


class DistributedMixin:
    """The DDP and FSDP2 sides of :class:`~fastaccum.optimizer.AccumOptimizer`."""

    # True while _flush_fsdp2 runs FSDP2's reduction: the hooks it fires only fold
    # (step_in_backward must not update from a partial window's gradient)
    _flushing = False

    def _flush_fsdp2(self) -> bool:
        """Reduce-scatter what FSDP2 holds unsharded for our parameters into our buffers.

        With ``set_requires_gradient_sync(False)`` FSDP2 accumulates a window's micro-batches
        in each parameter's *unsharded* gradient (``_unsharded_param.grad``, or the fp32
        ``unsharded_accumulated_grad`` under a MixedPrecisionPolicy with ``reduce_dtype``),
        which no state_dict holds. This runs FSDP2's own post-backward on the parameter
        groups that hold such gradients, with gradient sync on for that call only: the same
        reduce-scatter (``reduce_dtype``, divide factors, uneven-shard padding) the window's
        last micro-batch would run, after which FSDP2 hands each shard to the parameters'
        post-accumulate-grad hooks — ours — and forgets its unsharded gradient. Linear, so the
        window's sum is the same, up to the rounding of a reduction split in two.

        A collective: every rank must call it (DCP and state_dict are called on every rank,
        and in lockstep training every rank holds the same groups' gradients). True when
        something was reduced.
        """
        params = [p for b in self._buckets if b.sharded and b.grad is not None for p in b.params]
        if not params:
            return False
        groups = fsdp2_param_groups(params)
        if groups is None:
            if self._window.micro_step:
                warnings.warn(
                    f"fastaccum: this torch version's FSDP2 ({torch.__version__}) is not laid out as fastaccum knows, "
                    "so state_dict() inside an accumulation window cannot reduce-scatter the gradients FSDP2 may "
                    "hold unsynced (set_requires_gradient_sync(False)) into the checkpoint; a run resumed from it "
                    "would lose them. Checkpoint when opt.micro_step == 0, or sync gradients every micro-batch",
                    RuntimeWarning, stacklevel=3)
            return False
        groups = [g for g in groups if any(_unsynced(fp) for fp in g.fsdp_params)]
        if not groups:
            return False
        TrainingState = _fsdp2_internals()[2]
        # FSDP2's internals this drives, checked before any collective starts
        needed = ("post_backward", "finalize_backward", "reduce_grads", "all_reduce_grads", "_training_state",
                  "comm_ctx")
        missing = [a for a in needed if not all(hasattr(g, a) for g in groups)]
        if missing or not hasattr(groups[0].comm_ctx, "reduce_scatter_states"):
            raise RuntimeError(
                f"fastaccum: this torch version's FSDP2 ({torch.__version__}) lacks "
                f"{missing or 'reduce_scatter_states'}, which fastaccum uses to reduce-scatter the gradients "
                "FSDP2 holds unsynced before a checkpoint; without that the checkpoint would lose them. "
                "Checkpoint when opt.micro_step == 0, or call model.set_requires_gradient_sync(True) every "
                "micro-batch")
        busy = [g for g in groups if g._training_state != TrainingState.IDLE]
        if busy:
            raise RuntimeError(
                "fastaccum: state_dict() was called while FSDP2 runs a forward or backward (it is in "
                f"{busy[0]._training_state}): checkpoint between micro-batches, after opt.step()")
        self._flushing = True
        try:
            for g in groups:
                saved = (g.reduce_grads, g.all_reduce_grads)
                g.reduce_grads = g.all_reduce_grads = True
                try:
                    g.post_backward()
                finally:
                    g.reduce_grads, g.all_reduce_grads = saved
                    g._training_state = TrainingState.IDLE
            # what FSDP2's end-of-backward callback does: the reduced shards are visible to
            # the current stream, and the reduce-scatter inputs are released
            for g in groups:
                g.finalize_backward()
            ctx = groups[0].comm_ctx
            for rs in ctx.reduce_scatter_states:
                if rs.event is not None:  # (none on the CPU)
                    getattr(torch, "accelerator", torch.cuda).current_stream().wait_event(rs.event)
            ctx.reduce_scatter_states.clear()
        finally:
            self._flushing = False
        for b in self._buckets:
            # the flushed shards are several micro-batches' sum: not a micro-batch's norm
            b.take_micro_sumsq()
        self._norm_cache = None
        return True

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


def _fsdp2_internals() -> Optional[Tuple[Any, Any, Any]]:
    """(module -> state registry, FSDPState, TrainingState) of this torch's FSDP2, or None."""
    import importlib

    try:
        from torch.distributed._composable_state import _module_state_mapping
    except ImportError:
        return None
    for package in ("torch.distributed.fsdp._fully_shard", "torch.distributed._composable.fsdp"):
        try:
            state = importlib.import_module(package + "._fsdp_state").FSDPState
            training = importlib.import_module(package + "._fsdp_common").TrainingState
        except (ImportError, AttributeError):
            continue
        return _module_state_mapping, state, training
    return None


def fsdp2_param_groups(params: Sequence[Tensor]) -> Optional[List[Any]]:
    """FSDP2's parameter groups (``FSDPParamGroup``) that hold any of ``params``, in the order
    ``fully_shard`` registered them (the same on every rank, so their collectives match);
    None when this torch's FSDP2 is not laid out as fastaccum knows.

    Found through the registry FSDP2 itself looks states up in (module -> state): an
    optimizer knows its parameters, not the model they belong to.
    """
    internals = _fsdp2_internals()
    if internals is None:
        return None
    mapping, fsdp_state, _ = internals
    ours = {id(p) for p in params}
    seen: set = set()
    groups = []
    for ref in list(mapping.values()):
        state = ref()
        if not isinstance(state, fsdp_state) or id(state) in seen:
            continue
        seen.add(id(state))
        state_groups = getattr(state, "_fsdp_param_groups", None)
        if state_groups is None:  # torch before per-parameter meshes: one group per state
            one = getattr(state, "_fsdp_param_group", None)
            state_groups = [one] if one is not None else []
        for g in state_groups:
            if any(id(fp.sharded_param) in ours for fp in g.fsdp_params):
                groups.append(g)
    return groups


def _unsynced(fsdp_param: Any) -> bool:
    """Whether FSDP2 holds an unsharded gradient of this parameter that it has not reduced."""
    if getattr(fsdp_param, "unsharded_accumulated_grad", None) is not None:
        return True
    unsharded = getattr(fsdp_param, "_unsharded_param", None)  # made at its first all-gather
    return unsharded is not None and unsharded.grad is not None


def check_param_kind(p: Tensor) -> None:
    """Parameters fastaccum can own: plain tensors (one device, DDP replicas) and FSDP2's
    shards (a DTensor sharded on a 1-D mesh over all ranks). Other DTensor layouts (tensor
    parallel, HSDP's 2-D mesh, replicated or partial placements) would need the norm and the
    skip decision reduced over other groups: refused here, before anything is registered.
    One function on purpose: the kinds of parameter fastaccum takes are decided here only."""
    if p.is_meta:
        raise ValueError(f"a parameter of shape {tuple(p.shape)} is on the meta device (it has no data): "
                         "materialise the model (e.g. model.to_empty(device=...) and initialise it) before "
                         "creating the optimizer")
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
