"""The optimizer's checkpoint format: state_dict() and a load that checks everything first.

A fastaccum state_dict is torch.optim's (``state`` and ``param_groups``, so a torch.optim
state_dict of the same algorithm loads too) plus a ``fastaccum`` entry with what a run
resumed mid-window needs: the accumulation buffers that hold gradients, the segment flags,
the window, the loss scaler, the noise-scale estimator. Under FSDP2 the same goes into the
first param group and per-parameter ``accum_grad`` entries, because
torch.distributed.checkpoint keeps only ``state`` and ``param_groups``. A load validates
the whole state_dict before it changes anything: a refused load leaves the optimizer as it was.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Tuple

import torch
from torch import Tensor

from .buffers import local
from .checks import as_float
from .noise_scale import NoiseScaleEstimator
from .scaling import LossScaler

if TYPE_CHECKING:  # annotations only: the optimizer imports this module, not the other way
    from .optimizer import AccumOptimizer

_STATE_FORMAT_VERSION = 1


class CheckpointMixin:
    """state_dict / load_state_dict of :class:`~fastaccum.optimizer.AccumOptimizer`."""

    def state_dict(self) -> Dict[str, Any]:
        """torch.optim's state_dict plus what a run resumed mid-window needs (see the module).

        Under FSDP2 with ``set_requires_gradient_sync(False)``, the window's micro-batches so
        far are in FSDP2's unsharded gradients: they are reduce-scattered into fastaccum's
        sharded buffers first (FSDP2's own reduction, as the window's last micro-batch would
        run it), so the checkpoint holds them. That is a collective: call ``state_dict()``
        (or ``get_state_dict``/``get_optimizer_state_dict``, as torch.distributed.checkpoint
        does) on every rank.
        """
        self._flush_fsdp2()
        for b in self._buckets:  # a saved buffer holds the gradient as p.grad shows it
            b.apply_scales()
            b.own_external()
        self._norm_cache = None
        sd = super().state_dict()
        if self._resident is not None:
            # The device-resident step creates a parameter's state before the device knows
            # whether the step is skipped; state that no update has used yet (step 0) is not
            # state in torch's sense, so it is left out, as a host step would never create it.
            steps = self._resident.steps.tolist()  # one read, as any checkpoint waits for the device
            order = [p for g in self.param_groups for p in g["params"]]
            for k in [k for k in sd["state"] if k < len(order)]:
                bi, i = self._where[order[k]]
                if steps[self._resident.slot(bi, i)] == 0:
                    del sd["state"][k]
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
            "noise_scale": self._noise.state_dict() if self._noise is not None else None,
            # the device-resident step's stochastic-rounding seed of each bucket (None: not drawn
            # yet): a resumed run rounds as the run that saved it would have
            "device_seeds": [self.__dict__.get("_device_seeds", {}).get(bi) for bi in range(len(self._buckets))],
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
        index = {id(p): k for k, p in enumerate(p for g in self.param_groups for p in g["params"])}
        for b in sharded:
            for i, p in enumerate(b.params):
                if id(p) in index and index[id(p)] in sd["state"]:
                    sd["state"][index[id(p)]]["accum_grad"] = b.wrapped(i, b.grad_views[i])
        sd["param_groups"][0] = {**sd["param_groups"][0], "fastaccum": extra}
        return sd

    # Hyper-parameters every checkpoint of this algorithm has (older torch versions included);
    # a group without them was saved by another optimizer. Other keys missing from an older
    # checkpoint (maximize, foreach, decoupled_weight_decay...) take this optimizer's defaults.
    _required_group_keys: Tuple[str, ...] = ("lr",)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a fastaccum state_dict, or a ``torch.optim`` one of the same optimizer kind.

        Everything is checked before anything changes: a refused state_dict leaves the
        optimizer as it was. Unlike ``torch.optim``, state is not cast to the parameter
        dtype: fp32 moments and master weights of bf16 parameters stay fp32.
        """
        state_dict = state_dict.copy()  # shallow, as torch.optim does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, placed, extra = self._validate_state_dict(state_dict)

        # ---- nothing below raises on a validated state_dict
        self._state_epoch += 1
        self.param_groups = groups
        for bucket in self._buckets:  # parameters without saved state start afresh
            bucket.steps.zero_()
            for flat in bucket.flat_state.values():
                flat.zero_()
        self.state.clear()
        for p, (step, tensors) in placed.items():
            bi, i = self._where[p]
            bucket = self._buckets[bi]
            spec = self._bucket_spec(bucket, self.param_groups[bucket.group_index])
            state = self.state[p]
            state["step"] = bucket.steps[i]
            bucket.steps[i] = step
            for name, dtype in spec.items():
                view = bucket.allocate_state(name, dtype)[i]
                if name in tensors:
                    view.copy_(local(tensors[name]).reshape(view.shape))
                elif name == "master_param":
                    view.copy_(bucket.data(i).detach())
                else:
                    view.zero_()
                state[name] = bucket.wrapped(i, view)
            if "accum_grad" in tensors and bucket.grad is not None:  # FSDP2: this rank's shard of the buffer
                bucket.grad_views[i].copy_(tensors["accum_grad"].reshape(bucket.grad_views[i].shape))
        if extra is not None:
            for b, buf, live, fresh in zip(self._buckets, extra["grad_buffers"], extra["live"], extra["fresh"]):
                b.restore(buf, live, fresh)
            self._window.load_state_dict(extra)
            self.skipped_steps = int(extra["skipped_steps"])
            if self._scaler is not None and extra["loss_scaler"] is not None:
                self._scaler.load_state_dict(extra["loss_scaler"])
            if self._noise is not None and extra.get("noise_scale") is not None:
                self._noise.load_state_dict(extra["noise_scale"])
            if extra.get("device_seeds") is not None:  # (older checkpoints: seeds drawn afresh)
                self._device_seeds = {bi: seed for bi, seed in enumerate(extra["device_seeds"]) if seed is not None}
        self._norm_cache = None
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _validate_state_dict(self, state_dict: Dict[str, Any]) -> Tuple[List[Dict[str, Any]], Dict[Tensor, Any], Any]:
        """Check a state_dict completely and resolve what loading it means, changing nothing.

        Returns the new param groups, ``{param: (step, {state name: tensor})}`` with every
        tensor already detached from this optimizer's own storage (loading our own
        state_dict must not read what it is overwriting), and the fastaccum extra.
        """
        if not isinstance(state_dict, dict) or "param_groups" not in state_dict or "state" not in state_dict:
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups' entries")
        saved_groups = copy.deepcopy(state_dict["param_groups"])
        extra = state_dict.get("fastaccum")
        for g in saved_groups:  # an FSDP2 checkpoint keeps it in the first param group
            extra = g.pop("fastaccum", None) or extra
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(saved_groups)} parameter groups, this optimizer has "
                             f"{len(self.param_groups)}: it was saved for another parameter layout")
        index_to_param: Dict[Any, Tensor] = {}
        groups = []
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"a parameter group has {len(g['params'])} parameters here but "
                                 f"{len(sg['params'])} in the state_dict: it was saved for another parameter layout")
            missing = [k for k in self._required_group_keys if k not in sg]
            if missing:
                raise ValueError(f"the state_dict's parameter group lacks {missing}: it was saved by another kind "
                                 f"of optimizer than {type(self).__name__}")
            index_to_param.update(zip(sg["params"], g["params"]))
            new = {**{k: v for k, v in self.defaults.items()}, **sg, "params": g["params"]}
            if "param_names" in g and "param_names" not in sg:
                new["param_names"] = g["param_names"]
            try:
                self._check_group(new)
            except (TypeError, ValueError) as e:
                raise ValueError(f"the state_dict's parameter group is invalid: {e}") from e
            groups.append(new)
        own = self._own_storages()
        placed: Dict[Tensor, Any] = {}
        for key, st in state_dict["state"].items():
            p = index_to_param.get(key)
            if p is None:
                raise ValueError(f"state_dict has state for parameter index {key!r}, which no group names")
            if not isinstance(st, dict):
                raise ValueError(f"the state of parameter {key!r} is a {type(st).__name__}, expected a dict")
            bi, i = self._where[p]
            bucket = self._buckets[bi]
            spec = self._bucket_spec(bucket, groups[bucket.group_index])
            tensors: Dict[str, Tensor] = {}
            for name, v in st.items():
                if name == "step" or v is None:
                    continue  # torch.optim.SGD keeps momentum_buffer=None for momentum 0
                if name not in spec and name != "accum_grad":  # accum_grad: FSDP2's shard of the buffer
                    raise ValueError(f"state_dict has state {name!r} for parameter {key!r}, which "
                                     f"{type(self).__name__} with these hyper-parameters does not keep (it keeps "
                                     f"{sorted(spec)}): it was saved by another kind of optimizer")
                if not isinstance(v, Tensor) or v.numel() != p.numel():
                    raise ValueError(f"state {name!r} has {getattr(v, 'numel', lambda: '?')()} elements but its "
                                     f"parameter has {p.numel()} (shape {tuple(p.shape)}): the state_dict was saved "
                                     "for another parameter layout")
                if v.is_complex() or not v.is_floating_point():
                    raise ValueError(f"state {name!r} of parameter {key!r} has dtype {v.dtype}; expected floating point")
                if v.device.type == "meta":
                    raise ValueError(f"state {name!r} of parameter {key!r} is on the meta device (it has no data)")
                v = local(v)  # FSDP2: this rank's shard
                tensors[name] = v.detach().clone() if _storage_key(v) in own else v.detach()
            if "step" in st:
                try:
                    step = as_float("step", st["step"])
                except (TypeError, ValueError) as e:
                    raise ValueError(f"the step of parameter {key!r} is invalid: {e}") from None
                if not (math.isfinite(step) and step >= 0 and step == int(step)):
                    raise ValueError(f"the step of parameter {key!r} is {step}; it must be a whole number >= 0")
            else:
                # torch.optim.SGD keeps no step: a saved momentum buffer means at least one
                # step was taken, so the next one must not restart the momentum from the gradient
                step = 1.0 if tensors else 0.0
            placed[p] = (step, tensors)
        if extra is not None:
            extra = self._validate_extra(self._local_extra(extra), own)
        return groups, placed, extra

    def _local_extra(self, extra: Any) -> Any:
        """An FSDP2 checkpoint keeps per-rank values as DTensors (one element per rank): this rank's."""
        if not isinstance(extra, dict) or not isinstance(extra.get("weight_sum"), Tensor):
            return extra
        flags = {}
        for name in ("live", "fresh"):
            values = [bool(x) for x in local(extra[name]).reshape(-1).tolist()]
            flags[name] = [values[sum(len(b.params) for b in self._buckets[:k]):][: len(b.params)]
                           for k, b in enumerate(self._buckets)]
        return {**extra, **flags, "weight_sum": float(local(extra["weight_sum"]).reshape(-1)[0])}

    def _validate_extra(self, extra: Any, own: set) -> Dict[str, Any]:
        if not isinstance(extra, dict):
            raise ValueError(f"the state_dict's 'fastaccum' entry is a {type(extra).__name__}, expected a dict")
        needed = ("layout", "grad_buffers", "live", "fresh", "skipped_steps", "loss_scaler")
        missing = [k for k in needed if k not in extra]
        if missing:
            raise ValueError(f"the state_dict's 'fastaccum' entry lacks {missing}: it is corrupt")
        layout = [b.layout() for b in self._buckets]
        if not isinstance(extra["layout"], (list, tuple)) or [list(x) for x in extra["layout"]] != layout:
            raise ValueError("the state_dict's accumulation buffers were saved for another parameter layout "
                             f"(saved {extra['layout']}, here {layout})")
        n = len(self._buckets)
        for key in ("grad_buffers", "live", "fresh"):
            if not isinstance(extra[key], (list, tuple)) or len(extra[key]) != n:
                raise ValueError(f"the state_dict's {key!r} must be a list with one entry per bucket ({n}), got "
                                 f"{extra[key]!r:.80}: the checkpoint is corrupt")
        for b, buf, live, fresh in zip(self._buckets, extra["grad_buffers"], extra["live"], extra["fresh"]):
            b.check_saved(buf, live, fresh)
        self._window.check_state(extra)
        sk = extra["skipped_steps"]
        if isinstance(sk, bool) or not isinstance(sk, int) or sk < 0:
            raise ValueError(f"the state_dict's skipped_steps is {sk!r}; it must be an int >= 0")
        if extra["loss_scaler"] is not None:
            LossScaler.check_state(extra["loss_scaler"])
        if extra.get("noise_scale") is not None:
            NoiseScaleEstimator().load_state_dict(extra["noise_scale"])  # raises on a corrupt entry
        seeds = extra.get("device_seeds")
        if seeds is not None and (not isinstance(seeds, (list, tuple)) or len(seeds) != n or not all(
                s is None or (isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2**62) for s in seeds)):
            raise ValueError(f"the state_dict's 'device_seeds' must be one int in [0, 2**62) or None per bucket ({n}), "
                             f"got {seeds!r:.80}: the checkpoint is corrupt")
        mid_window = bool(extra["weighted"]) or any(any(f) for f in extra["fresh"])
        if mid_window and bool(extra["weighted"]) and (extra["loss_scaler"] is None) != (self._scaler is None):
            # the saved partial gradients carry the saved loss scale: read with another one
            # they would be applied 65536x too large (or small)
            raise ValueError(
                "the state_dict was saved in the middle of an accumulation window with "
                f"loss_scale={'None' if extra['loss_scaler'] is None else 'set'}, but this optimizer has "
                f"loss_scale={'None' if self._scaler is None else 'set'}: resume with the same loss_scale "
                "setting, or save the checkpoint at a window boundary")
        extra = dict(extra)
        extra["grad_buffers"] = [
            None if buf is None else (buf.detach().clone() if _storage_key(buf) in own else buf.detach())
            for buf in extra["grad_buffers"]
        ]
        return extra

    def _own_storages(self) -> set:
        own = set()
        for b in self._buckets:
            for t in (b.grad, b.steps, *b.flat_state.values()):
                if t is not None:
                    own.add(_storage_key(t))
        return own



def _from_local(t: Tensor, mesh: Any) -> Tensor:
    """``t`` as this rank's shard of a DTensor over ``mesh`` (one element per rank)."""
    from torch.distributed.tensor import DTensor, Shard

    return DTensor.from_local(t, mesh, [Shard(0)], run_check=False)


def _mid_window_unsaved(opt: "AccumOptimizer", where: str) -> None:
    if opt._window.micro_step:
        warnings.warn(
            f"fastaccum: state_dict() inside an accumulation window (micro-batch {opt._window.micro_step} of "
            f"{opt.accumulation_steps}) does not hold the gradients kept in {where}; a run resumed from it "
            "would lose them. Checkpoint when opt.micro_step == 0, or shard every parameter with fully_shard",
            RuntimeWarning,
            stacklevel=3,
        )


def _storage_key(t: Tensor) -> Tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())
