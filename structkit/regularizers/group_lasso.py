"""``group_lasso``: psi(W) = sum_g w_g ||W_g||_2 with w_g = sqrt(|g|) -- structured (group) sparsity.

Scalar metric (closed form): ``W_g * max(0, 1 - tau w_g / ||W_g||)``.

Diagonal metric ``d`` (RAMDA's and ProxGen's subproblem) -- exact, per group, with ``T = tau w_g``:

* screening: the solution is 0 iff ``||d_g * z_g|| <= T``;
* otherwise ``y_i = d_i z_i r / (d_i r + T)`` where ``r = ||y_g|| > 0`` is the root of the decreasing,
  convex function ``f(r) = sum_i (d_i z_i / (d_i r + T))^2 - 1``. Newton's method started at the lower
  bound ``r_0 = max(0, ||z_g|| - T / min_i d_i)`` (``f(r_0) >= 0``) increases monotonically to the root,
  so it needs no safeguard; all groups iterate together (a few elementwise passes per iteration).
"""
from __future__ import annotations

import torch

from .base import Regularizer, register_regularizer


@register_regularizer("group_lasso")
class GroupLasso(Regularizer):
    grouping = "rows"
    newton_max_iter = 60   # cap; typically converges in < 15
    newton_check_every = 5  # one host sync per this many Newton steps
    newton_rtol = 1e-7      # stop when every relative Newton step is below this

    def value(self, x, layout):
        return (layout.weights * layout.norms(x)).sum()

    def prox(self, x, tau, layout):
        norms = layout.norms(x)
        factor = (1 - tau * layout.weights / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0)
        return x * layout.expand(factor)

    def screen(self, z, d, tau, layout):
        return layout.norms(d * z) <= tau * layout.weights

    def prox_diag(self, z, d, tau, layout):
        T = tau * layout.weights
        a2 = (d * z).square()
        zero = layout.sum(a2).sqrt() <= T
        d_min = -layout.max(-d)
        r = (layout.norms(z) - T / d_min).clamp_min(0)
        T_e = layout.expand(T)
        for k in range(self.newton_max_iter):
            denom = d * layout.expand(r) + T_e
            q = a2 / denom.square()
            f = layout.sum(q) - 1
            f_prime = -2 * layout.sum(q * d / denom)
            step = torch.where(zero, torch.zeros_like(f), f / f_prime)
            r = r - step
            if (k + 1) % self.newton_check_every == 0:
                if bool(((step.abs() <= self.newton_rtol * r) | zero).all()):
                    break
        r = torch.where(zero, torch.zeros_like(r), r)
        d_r = d * layout.expand(r)
        return z * d_r / (d_r + T_e).clamp_min(torch.finfo(z.dtype).tiny)
