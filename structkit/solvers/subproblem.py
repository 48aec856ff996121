"""The inexact subproblem solver shared by RAMDA and ProxGen.

Both solvers need, every step, the minimiser of

    Q(y) = 1/2 sum_i d_i (y_i - z_i)^2 + tau * psi(y)

(for RAMDA: d = P = U^(1/3) + eps, z = W0 - V / P, tau = alpha * lam; this is the paper's
``<V, W - W0> + 1/2 ||W - W0||_P^2 + alpha psi(W)`` up to a constant). With a non-uniform diagonal ``d``
there is in general no closed form, so :func:`solve_subproblem`

1. uses the regularizer's exact diagonal solution when it has one (``method="auto"`` or ``"exact"``; L1
   and the group lasso's 1-D root solve), otherwise
2. runs proximal gradient, warm-started at the previous iterate:
       y_{j+1} = prox_{theta tau psi}(y_j - theta * d * (y_j - z)),   theta_g = 1 / max_{i in g} d_i
   (per group, valid because psi is separable over groups; halved for non-convex psi), zeroing the groups
   that exact screening already proves zero, and stopping when the certificate
       ||(y_j - y_{j+1}) / theta||  >=  dist(0, dQ(y_{j+1})) / 2
   falls below ``rtol * ||d z||`` -- the paper's subgradient stopping rule -- or after ``max_iter`` iterations.
   Convergence is checked every ``check_every`` iterations only (one host sync each time).
   For non-convex psi the result is replaced by the warm start if Q did not decrease (Q(y) <= Q(y_prev)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import GroupLayout
from ..regularizers import Regularizer

METHODS = ("auto", "exact", "pg")


@dataclass
class SubproblemInfo:
    """What one solve did: inner iterations (0 for an exact solve), the last certificate value (a 0-dim
    tensor; not synced), and the number of groups screened to zero (a 0-dim tensor)."""
    iters: int
    residual: torch.Tensor
    screened: torch.Tensor
    exact: bool


def subproblem_objective(reg: Regularizer, y, z, d, tau, layout) -> torch.Tensor:
    """Q(y) = 1/2 sum d (y - z)^2 + tau psi(y)."""
    return 0.5 * (d * (y - z).square()).sum() + tau * reg.value(y, layout)


def solve_subproblem(reg: Regularizer, z: torch.Tensor, d: torch.Tensor, tau: float, layout: GroupLayout, *,
                     warm_start: torch.Tensor, rtol: float, max_iter: int = 100,
                     check_every: int = 5, method: str = "auto") -> tuple[torch.Tensor, SubproblemInfo]:
    """Approximately minimise ``Q`` (see the module docstring). The certificate must fall below
    ``rtol * ||d z||`` (the subgradient scale of Q at 0, so the rule does not depend on units);
    ``method`` is ``"auto"`` (exact when available), ``"exact"`` or ``"pg"``."""
    if method not in METHODS:
        raise ValueError(f"subproblem method must be one of {METHODS}, got {method!r}.")
    zero = z.new_zeros(())
    if method != "pg":
        exact = reg.prox_diag(z, d, tau, layout)
        if exact is not None:
            return exact, SubproblemInfo(0, zero, zero, True)
        if method == "exact":
            raise ValueError(f"regularizer '{reg.name}' has no exact diagonal-metric solution; use method='pg' or 'auto'.")

    theta = 1.0 / layout.max(d)
    if not reg.convex:
        theta = theta / 2
    theta_e = layout.expand(theta)
    step_tau = theta * tau
    screened = reg.screen(z, d, tau, layout)
    keep = None if screened is None else layout.expand((~screened).to(z.dtype))
    n_screened = zero if screened is None else screened.sum().to(z.dtype)

    tol = rtol * torch.linalg.vector_norm(d * z)
    y = warm_start if keep is None else warm_start * keep
    residual, iters = zero, 0
    for j in range(max_iter):
        y_next = reg.prox(torch.addcmul(y, theta_e * d, z - y), step_tau, layout)
        if keep is not None:
            y_next = y_next * keep
        iters = j + 1
        if iters % check_every == 0 or iters == max_iter:
            residual = torch.linalg.vector_norm((y - y_next) / theta_e)
            y = y_next
            if bool(residual <= tol):
                break
        else:
            y = y_next
    if not reg.convex:
        worse = subproblem_objective(reg, y, z, d, tau, layout) > subproblem_objective(reg, warm_start, z, d, tau, layout)
        y = torch.where(worse, warm_start, y)
    return y, SubproblemInfo(iters, residual, n_screened, False)
