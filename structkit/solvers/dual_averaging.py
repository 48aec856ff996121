"""What RAMDA and RMDA share: the regularized dual average and the averaging momentum."""
from __future__ import annotations

import math

import torch

from .base import StructuredOptimizer


class DualAveragingOptimizer(StructuredOptimizer):
    r"""Per stage: ``t += 1; s = lr sqrt(t); alpha += s; V += s g`` around the stage's start point ``W0``, and the
    iterate ``W = (1 - c_t) W + c_t W_target`` with ``c_t = momentum`` or, in a stage started with
    ``momentum_ramp=True``, ``min(max(momentum sqrt(t), sqrt(t / ramp_steps)), 1)`` (see ``restart``). Subclasses compute ``W_target`` from this state."""

    _unit_interval = ("momentum",)

    def _restart_state(self, group, state, params, layout):
        state["step"] = 0
        state["alpha"] = 0.0
        for key in self._dual_keys:
            if key in state and state[key].numel() == layout.numel:
                state[key].zero_()  # reuse the memory: a restart allocates nothing
            else:
                state[key] = params[0].new_zeros(layout.numel)
        torch._foreach_copy_(layout.split(state["W0"]), list(params))

    _dual_keys = ("W0", "V")

    def _advance(self, group, state, params, layout) -> tuple[int, float]:
        """Count the step: ``t += 1``, ``alpha += s``; return (t, s)."""
        if not state:
            self._restart_state(group, state, params, layout)
        state["step"] += 1
        t = state["step"]
        s = group["lr"] * math.sqrt(t)
        state["alpha"] += s
        return t, s

    def _dual_average(self, group, state, params, layout) -> tuple[int, float]:
        """Advance the dual average by the gradients; return (t, s) of this step."""
        t, s = self._advance(group, state, params, layout)
        views, grads = self._with_grad(params, layout.split(state["V"]))
        torch._foreach_add_(views, grads, alpha=s)
        return t, s

    @staticmethod
    def _average(group, params, target, layout, t) -> None:
        """``W = (1 - c_t) W + c_t target`` in place, ``target`` flat."""
        c = group["momentum"]
        if group["momentum_ramp"]:
            c = min(max(c * math.sqrt(t), math.sqrt(t / (group.get("ramp_steps") or math.inf))), 1.0)
        torch._foreach_lerp_(list(params), layout.split(target), c)
