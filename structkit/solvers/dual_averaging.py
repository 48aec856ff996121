"""What RAMDA and RMDA share: the regularized dual average and the averaging momentum."""
from __future__ import annotations

import math

import torch

from .base import StructuredOptimizer


class DualAveragingOptimizer(StructuredOptimizer):
    r"""Per stage: ``t += 1; s = lr sqrt(t); alpha += s; V += s g`` around the stage's start point ``W0``, and the
    iterate ``W = (1 - c_t) W + c_t W_target`` with ``c_t = momentum`` or, in a stage started with
    ``momentum_ramp=True``, ``min(momentum sqrt(t), 1)``. Subclasses compute ``W_target`` from this state."""

    _unit_interval = ("momentum",)

    def _restart_state(self, group, state, w):
        state["step"] = 0
        state["alpha"] = 0.0
        state["W0"] = w.clone()
        state["V"] = torch.zeros_like(w)

    def _dual_average(self, group, state, w, g) -> tuple[int, float]:
        """Advance the dual average by gradient ``g``; return (t, s) of this step."""
        if not state:
            self._restart_state(group, state, w)
        state["step"] += 1
        t = state["step"]
        s = group["lr"] * math.sqrt(t)
        state["alpha"] += s
        state["V"].add_(g, alpha=s)
        return t, s

    @staticmethod
    def _average(group, w, target, t) -> torch.Tensor:
        """``(1 - c_t) w + c_t target`` in place (``w`` is the step's flat copy)."""
        c = group["momentum"]
        if group["momentum_ramp"]:
            c = min(c * math.sqrt(t), 1.0)
        return w.lerp_(target, c)
