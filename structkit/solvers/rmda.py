"""RMDA: Regularized Modernized Dual Averaging (Huang & Lee, ICLR 2022) -- RAMDA without the preconditioner."""
from __future__ import annotations

import math

import torch

from .dual_averaging import DualAveragingOptimizer


class RMDA(DualAveragingOptimizer):
    r"""RMDA, per param group:

    .. math::
        s_t = \text{lr}\sqrt{t},\quad \alpha_t = \alpha_{t-1} + s_t,\quad V_t = V_{t-1} + s_t g,\quad
        \tilde W_t = \text{prox}_{(\alpha_t/\sqrt t)\lambda\psi}\big(W_0 - V_t/\sqrt t\big),\quad
        W_t = (1 - c_t) W_{t-1} + c_t \tilde W_t

    The subproblem has a scalar metric (``sqrt(t) I``), so the regularizer's closed-form prox solves it.
    Args: lr (0.1), momentum (c, 0.1), regularizer, lam, group_dim, group_index.
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.1, *, regularizer="none", lam: float = 0.0,
                 group_dim: int | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, regularizer=regularizer, lam=lam, group_dim=group_dim))

    def _update(self, group, state, params, layout, reg):
        t, _ = self._dual_average(group, state, params, layout)
        beta = math.sqrt(t)
        w_tilde = torch.add(state["W0"], state["V"], alpha=-1 / beta, out=self._buffer(group, "w", state["V"]))
        reg.prox_(w_tilde, state["alpha"] * group["lam"] / beta, layout)
        self._average(group, params, w_tilde, layout, t)

    def _screen_point(self, group, state):
        """``(W0 - V / sqrt(t), 1, alpha lam / sqrt(t))`` at the current dual state (the prox's scalar metric)."""
        if "V" not in state or state["alpha"] * group["lam"] == 0:
            return None
        beta = math.sqrt(state["step"])
        z = torch.add(state["W0"], state["V"], alpha=-1 / beta)
        return z, torch.ones_like(z), state["alpha"] * group["lam"] / beta
