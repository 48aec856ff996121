"""RAMDA: Regularized Adaptive Momentum Dual Averaging (Huang & Lee, NeurIPS 2024)."""
from __future__ import annotations

import torch

from .dual_averaging import DualAveragingOptimizer
from .subproblem import solve_subproblem


class RAMDA(DualAveragingOptimizer):
    r"""RAMDA, per param group, with gradient ``g`` at step ``t`` of the current stage:

    .. math::
        s_t = \text{lr}\sqrt{t},\quad \alpha_t = \alpha_{t-1} + s_t,\quad
        V_t = V_{t-1} + s_t g,\quad U_t = U_{t-1} + s_t g^2,\quad P_t = U_t^{1/3} + \epsilon

        \hat W_t \approx \arg\min_W \langle V_t, W - W_0\rangle + \tfrac12 \|W - W_0\|^2_{P_t}
                      + \alpha_t\,\lambda\,\psi(W)

        W_t = (1 - c_t) W_{t-1} + c_t \hat W_t

    The subproblem is solved by :func:`~structkit.solvers.subproblem.solve_subproblem` (exact when the
    regularizer allows, else accelerated proximal gradient warm-started at the previous step's ``W_hat``, with
    the paper's stopping rule at relative tolerance ``inner_tol / t^(0.5 + inner_delta)``, relative to ``||P z||``). With ``lam = 0`` this is MADGRAD.
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

    def _restart_state(self, group, state, w):
        super()._restart_state(group, state, w)
        state["U"] = torch.zeros_like(w)
        state.pop("W_hat", None)  # a new stage warm-starts its first inexact solve at the restart point

    def _update(self, group, state, w, g, layout, reg):
        t, s = self._dual_average(group, state, w, g)
        V, U = state["V"], state["U"]
        U.addcmul_(g, g, value=s)
        P = torch.pow(U, 1 / 3, out=self._buffer(group, "P", w)).add_(group["eps"])
        z = torch.addcdiv(state["W0"], V, P, value=-1, out=self._buffer(group, "z", w))
        tau = state["alpha"] * group["lam"]
        if tau == 0:
            w_hat = z
        else:
            rtol = group["inner_tol"] / t ** (0.5 + group["inner_delta"])
            # warm start: the previous step's subproblem solution (the subproblems change slowly; the
            # averaged iterate w lags behind W_hat by the momentum averaging)
            warm = state.get("W_hat", w)
            w_hat, info = solve_subproblem(reg, z, P, tau, layout, warm_start=warm, rtol=rtol,
                                           max_iter=int(group["inner_max_iter"]), method=group["subproblem"])
            self._record(info, layout.num_groups)
            if not info.exact:
                state["W_hat"] = w_hat.clone()
        return self._average(group, w, w_hat, t)
