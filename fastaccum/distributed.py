"""What fastaccum does across ranks besides the window's small all-reduce (window.py).

DDP with bf16/fp16 parameters: their gradients live in fastaccum's fp32 buffers, which
DDP does not see, so a communication hook (:func:`ddp_comm_hook`) averages those buffers
in fp32 while backward runs. FSDP2: the buckets hold the local shards (buffers.py); which
DTensor layouts are accepted is decided in one place, :func:`check_param_kind`.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor

from .buffers import is_sharded
from .window import dist_world


class DistributedMixin:
    """The DDP side of :class:`~fastaccum.optimizer.AccumOptimizer`."""

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
