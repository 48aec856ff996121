"""The inexact subproblem solver shared by RAMDA and ProxGen.

Both solvers need, every step, the minimiser of

    Q(y) = 1/2 sum_i d_i (y_i - z_i)^2 + tau * psi(y)

(for RAMDA: d = P = U^(1/3) + eps, z = W0 - V / P, tau = alpha * lam; this is the paper's
``<V, W - W0> + 1/2 ||W - W0||_P^2 + alpha psi(W)`` up to a constant). With a non-uniform diagonal ``d``
there is in general no closed form, so :func:`solve_subproblem`

1. uses the regularizer's own diagonal-metric solver when it has one (``method="auto"``: its ``solve_diag``,
   e.g. the group lasso's warm-started Newton iteration on the per-group multiplier, stopped by the same
   subgradient rule as below; ``"exact"``: its ``prox_diag``, to machine precision; L1 is exact in closed
   form), otherwise
2. runs proximal gradient from the warm start (the solver passes its previous point):
       u_{j+1} = prox_{theta tau psi}(x_j - theta * d * (x_j - z)),   theta_g = 1 / max_{i in g} d_i
   (per group, valid because psi is separable over groups; halved for non-convex psi), zeroing the groups
   that exact screening already proves zero. Plain PG (``method="pg"``, and ``"auto"`` for non-convex psi)
   takes ``x_j = u_j``. For convex psi, ``"auto"`` (and ``"apg"``) accelerates it: monotone FISTA
   (Beck & Teboulle 2009), ``x_j = y_j + (t_{j-1}/t_j)(u_j - y_j) + ((t_{j-1}-1)/t_j)(y_j - y_{j-1})`` with
   ``y_j`` the better of ``u_j`` and ``y_{j-1}`` in Q, so Q never increases (the choice is a ``torch.where``
   on device, no sync). Its iteration count scales with ``sqrt(max d / min d)`` instead of ``max d / min d``;
   RAMDA's ``P`` spans three to four orders of magnitude, so this is the difference between hundreds and a
   few dozen SVD-priced iterations. A group's momentum restarts (O'Donoghue & Candes 2015, gradient scheme)
   when its step ``u_{j+1} - u_j`` points against its gradient mapping ``x_j - u_{j+1}``, which restores
   the linear rate of the strongly convex smooth part.

   Stopping rule (the paper's): the iterate ``u_{j+1}`` has the subgradient
       (1 / theta - d) * (x_j - u_{j+1})  in  dQ(u_{j+1}),
   and the solver stops when its norm is <= ``rtol * ||d z||``, or after ``max_iter`` iterations. It is
   checked every ``check_every`` iterations only (one host sync each time; default 5 on accelerators, 1 on
   CPU, where a sync costs nothing).
   The result never has a larger Q than the warm start: for non-convex psi, and for an accelerated solve, the
   warm start (resp. the best iterate) is returned when Q(u) > Q(warm start).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..layout import GroupLayout
from ..regularizers import Regularizer

METHODS = ("auto", "exact", "pg", "apg")


@dataclass
class SubproblemInfo:
    """What one solve did: inner iterations (0 for an exact solve), the last certificate value (a 0-dim
    tensor; not synced), the number of groups screened to zero (a 0-dim tensor), and ``dual_warm``: the
    regularizer's warm start for the next solve (``solve_diag`` path only)."""
    iters: int
    residual: torch.Tensor
    screened: torch.Tensor
    exact: bool
    dual_warm: torch.Tensor | None = None


def subproblem_objective(reg: Regularizer, y, z, d, tau, layout) -> torch.Tensor:
    """Q(y) = 1/2 sum d (y - z)^2 + tau psi(y)."""
    return 0.5 * (d * (y - z).square()).sum() + tau * reg.value(y, layout)


def _prox_with_value(reg: Regularizer, x, tau, layout):
    """``(prox(x), psi(prox(x)))``, through the regularizer's ``prox_with_value`` when it has one."""
    fn = getattr(reg, "prox_with_value", None)
    if fn is not None:
        return fn(x, tau, layout)
    y = reg.prox(x, tau, layout)
    return y, reg.value(y, layout)


def solve_subproblem(reg: Regularizer, z: torch.Tensor, d: torch.Tensor, tau: float, layout: GroupLayout, *,
                     warm_start: torch.Tensor | Callable[[], torch.Tensor], rtol: float, max_iter: int = 100,
                     check_every: int | None = None, method: str = "auto", dual_warm: torch.Tensor | None = None,
                     buffer: Callable[[str], torch.Tensor] | None = None,
                     overwrite_z: bool = False, scaled: bool = False) -> tuple[torch.Tensor, SubproblemInfo]:
    """Approximately minimise ``Q`` (see the module docstring). The certificate must fall below
    ``rtol * ||d z||`` (the subgradient scale of Q at 0, so the rule does not depend on units);
    ``method`` is ``"auto"`` (the regularizer's own solver when it has one, else accelerated PG for convex psi
    and plain PG otherwise), ``"exact"``, ``"pg"`` (plain proximal gradient) or ``"apg"`` (accelerated;
    convex psi only). ``warm_start`` (a tensor, or a function returning one, called only by the PG paths) is
    the primal start; ``dual_warm`` the previous solve's ``info.dual_warm``. ``buffer(name)`` gives
    persistent scratch vectors and ``overwrite_z`` lets the solve use ``z``'s memory: the optimizers pass
    both, so a step allocates no parameter-sized memory. ``scaled=True``: ``z`` holds ``d * z`` instead (RAMDA
    computes that directly, ``P W0 - V``, which is what a ``solve_diag`` starts from); the other paths divide it
    by ``d`` first, in place (so it needs ``overwrite_z``)."""
    if method not in METHODS:
        raise ValueError(f"subproblem method must be one of {METHODS}, got {method!r}.")
    on_cpu = z.device.type == "cpu"
    if check_every is None:  # a check is a host sync: free on CPU, so check every iteration there
        check_every = 1 if on_cpu else 5
    if scaled and not overwrite_z:
        raise ValueError("scaled=True needs overwrite_z=True: the paths without a solve_diag divide z by d in place.")
    zero = z.new_zeros(())
    if method in ("auto", "exact"):
        own = reg.solve_diag(z, d, tau, layout, rtol=rtol if method == "auto" else 0.0, warm=dual_warm,
                             out=z if overwrite_z else None, check=on_cpu or method == "exact", buffer=buffer,
                             scaled=scaled)
        if own is not None:
            screened = zero if own.warm is None else torch.isinf(own.warm).sum().to(z.dtype)
            return own.y, SubproblemInfo(own.iters, own.residual, screened, own.exact or method == "exact", own.warm)
    if scaled:
        z = z.div_(d)
    if method in ("auto", "exact"):
        exact = reg.prox_diag(z, d, tau, layout)
        if exact is not None:
            return exact, SubproblemInfo(0, zero, zero, True)
        if method == "exact":
            raise ValueError(f"regularizer '{reg.name}' has no exact diagonal-metric solution; use method='pg' or 'auto'.")
    if callable(warm_start):
        warm_start = warm_start()
    if method == "apg" and not reg.convex:
        raise ValueError(f"regularizer '{reg.name}' is not convex; the accelerated solver needs convexity (use 'pg').")
    accelerate = method == "apg" or (method == "auto" and reg.convex)

    theta = 1.0 / layout.max(d)
    if not reg.convex:
        theta = theta / 2
    theta_e = layout.expand(theta)
    inv_theta_minus_d = 1.0 / theta_e - d
    step_tau = theta * tau
    screened = reg.screen(z, d, tau, layout)
    keep = None if screened is None else layout.expand((~screened).to(z.dtype))
    n_screened = zero if screened is None else screened.sum().to(z.dtype)

    tol = rtol * torch.linalg.vector_norm(d * z)
    y = warm_start if keep is None else warm_start * keep
    if accelerate:
        return _apg(reg, z, d, tau, layout, y, warm_start, theta_e, inv_theta_minus_d, step_tau, keep, tol,
                    max_iter, check_every, n_screened)
    residual, iters = zero, 0
    for j in range(max_iter):
        y_next = reg.prox(torch.addcmul(y, theta_e * d, z - y), step_tau, layout)
        if keep is not None:
            y_next = y_next * keep
        iters = j + 1
        if iters % check_every == 0 or iters == max_iter:
            residual = torch.linalg.vector_norm(inv_theta_minus_d * (y - y_next))
            y = y_next
            if bool(residual <= tol):
                break
        else:
            y = y_next
    if not reg.convex:
        worse = subproblem_objective(reg, y, z, d, tau, layout) > subproblem_objective(reg, warm_start, z, d, tau, layout)
        y = torch.where(worse, warm_start, y)
    return y, SubproblemInfo(iters, residual, n_screened, False)


def _apg(reg, z, d, tau, layout, y, warm_start, theta_e, inv_theta_minus_d, step_tau, keep, tol, max_iter,
         check_every, n_screened):
    """Monotone FISTA with per-group adaptive restart (see the module docstring). ``y`` is the (screened)
    warm start."""
    def smooth(v):
        return 0.5 * (d * (v - z).square()).sum()

    q_warm = subproblem_objective(reg, warm_start, z, d, tau, layout)
    # without screening y is the warm start itself: reuse its Q instead of a second decomposition
    q_y = q_warm if keep is None else subproblem_objective(reg, y, z, d, tau, layout)
    x, y_prev, u = y, y, y
    t = z.new_ones(layout.num_groups)
    residual, iters, q_u = z.new_zeros(()), 0, q_y
    for j in range(max_iter):
        u_prev = u
        u, psi_u = _prox_with_value(reg, torch.addcmul(x, theta_e * d, z - x), step_tau, layout)
        if keep is not None:
            u = u * keep
        q_u = smooth(u) + tau * psi_u
        iters = j + 1
        stop = False
        if iters % check_every == 0 or iters == max_iter:
            residual = torch.linalg.vector_norm(inv_theta_minus_d * (x - u))
            stop = bool(residual <= tol)
        y_prev, y = y, torch.where(q_u <= q_y, u, y)
        q_y = torch.minimum(q_u, q_y)
        if stop:
            break
        # restart a group's momentum when its step (u - u_prev) points against its gradient mapping (x - u)
        restart = layout.sum((x - u) * (u - u_prev)) > 0
        t_next = (1 + (1 + 4 * t * t).sqrt()) / 2
        a = layout.expand(torch.where(restart, 0.0, t / t_next))
        b = layout.expand(torch.where(restart, 0.0, (t - 1) / t_next))
        x = y + a * (u - y) + b * (y - y_prev)
        t = torch.where(restart, 1.0, t_next)
    # the certified point u when it is no worse than the warm start, else the best iterate (Q(y) <= Q(warm))
    out = torch.where(q_u <= q_warm, u, y)
    return out, SubproblemInfo(iters, residual, n_screened, False)
