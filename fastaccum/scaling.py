"""Loss scaling: a fixed factor, or dynamic with ``torch.amp.GradScaler``'s defaults.

The scale multiplies the loss in :meth:`~fastaccum.optimizer.AccumOptimizer.scale_loss`;
unscaling is never a pass of its own: ``1 / scale`` is folded into the update multiplier.

On a device-resident step (the triton backend) the scale and its growth tracker live in the
window's device tensor and are updated there (:meth:`LossScaler.attach`): reading
``scale`` is then a host sync, made only when someone asks.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

LossScaleArg = Union[None, float, int, str]


class LossScaler:
    """Holds the current scale and, when dynamic, grows/backs it off like GradScaler.

    Dynamic: start at ``init_scale`` (2**16), multiply by ``backoff_factor`` (0.5) on every
    step with inf/nan gradients, and by ``growth_factor`` (2.0) after ``growth_interval``
    (2000) consecutive clean steps -- the defaults of ``torch.amp.GradScaler``.
    """

    def __init__(
        self,
        scale: float,
        *,
        dynamic: bool,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        self._scale = float(scale)
        self._tracker = 0
        self._device: Optional[Any] = None  # (tensor, scale slot, tracker slot) once attached
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval

    # The scale and the growth tracker (consecutive clean steps since the last change) are
    # host numbers, or device values once attached.
    @property
    def scale(self) -> float:
        if self._device is not None:
            t, slot, _ = self._device
            return float(t[slot])
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self._scale = float(value)
        if self._device is not None:
            t, slot, _ = self._device
            t[slot] = self._scale

    @property
    def growth_tracker(self) -> int:
        if self._device is not None:
            t, _, slot = self._device
            return int(t[slot])
        return self._tracker

    @growth_tracker.setter
    def growth_tracker(self, value: int) -> None:
        self._tracker = int(value)
        if self._device is not None:
            t, _, slot = self._device
            t[slot] = float(self._tracker)

    def attach(self, state: Any, scale_slot: int, tracker_slot: int) -> None:
        """Keep the scale in ``state[scale_slot]`` (a device tensor) from now on; the device
        step updates it, so :meth:`update` does nothing."""
        scale, tracker = self._scale, self._tracker
        self._device = (state, scale_slot, tracker_slot)
        self.scale, self.growth_tracker = scale, tracker

    def scale_tensor(self) -> Any:
        """The scale as a 0-dim device tensor (attached), to multiply a loss without a sync."""
        t, slot, _ = self._device
        return t[slot]

    @classmethod
    def from_arg(cls, loss_scale: LossScaleArg) -> Optional["LossScaler"]:
        """Parse the ``loss_scale=`` constructor argument (None, a positive number, or "dynamic")."""
        if loss_scale is None:
            return None
        if isinstance(loss_scale, str):
            if loss_scale != "dynamic":
                raise ValueError(
                    f"Invalid loss_scale: {loss_scale!r}; pass None, a positive number, or \"dynamic\""
                )
            return cls(2.0**16, dynamic=True)
        if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
            raise TypeError(
                f"Invalid loss_scale: {loss_scale!r} ({type(loss_scale).__name__}); "
                "pass None, a positive number, or \"dynamic\""
            )
        if not (math.isfinite(loss_scale) and loss_scale > 0):
            raise ValueError(f"Invalid loss_scale: {loss_scale}; a static loss scale must be finite and > 0")
        return cls(float(loss_scale), dynamic=False)

    def update(self, found_inf: bool) -> None:
        """Called once per optimizer step (skipped or not); on the device, finalize does it."""
        if not self.dynamic or self._device is not None:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
        else:
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.scale *= self.growth_factor
                self.growth_tracker = 0

    def state_dict(self) -> Dict[str, Any]:
        return {
            "scale": self.scale,
            "dynamic": self.dynamic,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "growth_tracker": self.growth_tracker,
        }

    @staticmethod
    def check_state(sd: Any) -> None:
        """Refuse a saved scaler whose values would stall or poison the run (scale 0 or NaN...)."""
        if not isinstance(sd, dict):
            raise ValueError(f"the state_dict's loss_scaler is {type(sd).__name__}, expected a dict")
        missing = [k for k in ("scale", "dynamic", "growth_factor", "backoff_factor", "growth_interval",
                               "growth_tracker") if k not in sd]
        if missing:
            raise ValueError(f"the state_dict's loss_scaler lacks {missing}: it is corrupt")
        for key in ("scale", "growth_factor", "backoff_factor"):
            v = sd[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"the state_dict's loss_scaler {key} is {v!r}; it must be a finite number > 0")
        for key, low in (("growth_interval", 1), ("growth_tracker", 0)):
            v = sd[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"the state_dict's loss_scaler {key} is {v!r}; it must be an int >= {low}")

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self.check_state(sd)
        self.scale = float(sd["scale"])
        self.dynamic = bool(sd["dynamic"])
        self.growth_factor = float(sd["growth_factor"])
        self.backoff_factor = float(sd["backoff_factor"])
        self.growth_interval = int(sd["growth_interval"])
        self.growth_tracker = int(sd["growth_tracker"])
