"""RAMDA: Regularized Adaptive Momentum Dual Averaging (Huang & Lee, NeurIPS 2024)."""
from __future__ import annotations

import torch

from .dual_averaging import DualAveragingOptimizer
from ..kernels import dual_point, dual_step


class RAMDA(DualAveragingOptimizer):
    r"""RAMDA, per param group, with gradient ``g`` at step ``t`` of the current stage:

    .. math::
        s_t = \text{lr}\sqrt{t},\quad \alpha_t = \alpha_{t-1} + s_t,\quad
        V_t = V_{t-1} + s_t g,\quad U_t = U_{t-1} + s_t g^2,\quad P_t = U_t^{1/3} + \epsilon

        \hat W_t \approx \arg\min_W \langle V_t, W - W_0\rangle + \tfrac12 \|W - W_0\|^2_{P_t}
                      + \alpha_t\,\lambda\,\psi(W)

        W_t = (1 - c_t) W_{t-1} + c_t \hat W_t

    The subproblem is solved inexactly by :func:`~structkit.solvers.subproblem.solve_subproblem` with the
    paper's stopping rule (minimum-norm subgradient <= ``inner_tol / t^(0.5 + inner_delta)`` times ``||P z||``):
    for the group lasso by the regularizer's own Newton iteration on the per-group multipliers, warm-started
    from the previous step's solution (state ``dual_warm``, one number per group); otherwise by accelerated proximal
    gradient warm-started at the previous step's ``W_hat`` (state ``W_hat``, a fourth parameter-sized vector
    kept only on this path). State: ``W0``, ``V``, ``U`` (three parameter-sized vectors); work vectors ``P``,
    ``z`` and the solver's two are reused every step. With ``lam = 0`` this is MADGRAD.
    ``c_t = momentum``, or ``min(momentum * sqrt(t), 1)`` in a stage started with ``momentum_ramp=True``
    (see :class:`~structkit.solvers.StageScheduler`), so the final iterate is ``W_hat`` and carries its
    exact structure.

    Args: params (iterable or param groups, see :mod:`structkit.solvers.base` for the structure keys),
    lr (1e-2), momentum (c, in (0, 1], 1e-2), eps (1e-6), inner_tol (1e-2), inner_delta (0.05),
    inner_max_iter (100), subproblem ("auto" | "exact" | "pg" | "apg"), regularizer, lam, group_dim, group_index.
    """

    _positive = ("lr", "eps", "inner_tol", "inner_max_iter")
    _nonnegative = ("lam", "inner_delta")
    def __init__(self, params, lr: float = 1e-2, momentum: float = 1e-2, eps: float = 1e-6, *,
                 regularizer="none", lam: float = 0.0, group_dim: int | None = None,
                 inner_tol: float = 1e-2, inner_delta: float = 0.05, inner_max_iter: int = 100,
                 subproblem: str = "auto"):
        super().__init__(params, dict(lr=lr, momentum=momentum, eps=eps, regularizer=regularizer, lam=lam,
                                      group_dim=group_dim, inner_tol=inner_tol, inner_delta=inner_delta,
                                      inner_max_iter=inner_max_iter, subproblem=subproblem))

    _dual_keys = ("W0", "V", "U")  # the three parameter-sized state vectors

    def _restart_state(self, group, state, params, layout):
        super()._restart_state(group, state, params, layout)
        state.pop("W_hat", None)  # a new stage warm-starts its first inexact solve at the restart point
        state.pop("dual_warm", None)

    def _update(self, group, state, params, layout, reg):
        t, s = self._advance(group, state, params, layout)
        V, U = state["V"], state["U"]
        P, z = self._buffer(group, "P", U), self._buffer(group, "z", U)
        tau = state["alpha"] * group["lam"]
        # the gradients end to end in z (0 for a parameter without one), then V, U, P and the centre in one pass;
        # z holds the scaled centre P z when there is a subproblem
        self._gather_grads(params, layout, z)
        dual_step(z, V, U, state["W0"], s, group["eps"], P, tau != 0)
        if tau == 0:
            return self._average(group, params, z, layout, t)
        # primal warm start (proximal-gradient paths): the previous step's subproblem solution, else the
        # current iterate (the averaged iterate lags behind W_hat by the momentum averaging)
        warm = state["W_hat"] if "W_hat" in state else (lambda: layout.flatten(params))
        w_hat, info = self._solve(group, state, reg, z, P, tau, layout, warm, scaled=True)
        if info.dual_warm is None and not info.exact:  # a proximal-gradient solve: its point is the next warm start
            if "W_hat" in state:
                state["W_hat"].copy_(w_hat)
            else:
                state["W_hat"] = w_hat.clone()
        self._average(group, params, w_hat, layout, t)

    def _screen_point(self, group, state):
        """``(W0 - V / P, P, alpha lam)`` at the current dual state (P recomputed from U)."""
        tau = state.get("alpha", 0.0) * group["lam"]
        if "V" not in state or tau == 0:
            return None
        U = state["U"]
        P, z = torch.empty_like(U), torch.empty_like(U)
        dual_point(U, state["V"], state["W0"], group["eps"], P, z, False)
        return z, P, tau
