"""``group_lasso``: psi(W) = sum_g w_g ||W_g||_2 with w_g = sqrt(|g|) -- structured (group) sparsity.

Scalar metric (closed form): ``W_g * max(0, 1 - tau w_g / ||W_g||)``.

Diagonal metric ``d`` (RAMDA's and ProxGen's subproblem) -- exact, per group, with ``T = tau w_g``:

* screening: the solution is 0 iff ``||d_g * z_g|| <= T``;
* otherwise ``y_i = d_i z_i / (d_i + mu)`` where the multiplier ``mu = T / ||y_g|| > 0`` is the root of

      phi(mu) = 1 / ||y(mu)|| - mu / T,        y_i(mu) = d_i z_i / (d_i + mu).

  ``1/||y(mu)||`` is concave and nearly linear in ``mu`` (exactly linear when ``d`` is constant on the
  group -- then one Newton step is exact), the same device that makes the Moré-Sorensen trust-region
  iteration fast. Newton's method runs on all groups at once inside the bracket
  ``T / (||z|| - T / min d) >= mu >= T / (||z|| - T / max d)``, bisecting whenever a step leaves it, so it
  always converges; it typically needs 2-4 iterations of a few elementwise passes each.
"""
from __future__ import annotations

import math

import torch

from .base import Regularizer, register_regularizer


@register_regularizer("group_lasso")
class GroupLasso(Regularizer):
    grouping = "rows"
    newton_max_iter = 50    # cap; typically converges in 2-4
    newton_check_every = 2  # one host sync per this many Newton steps

    def value(self, x, layout):
        return (layout.weights * layout.norms(x)).sum()

    def prox(self, x, tau, layout):
        norms = layout.norms(x)
        factor = (1 - tau * layout.weights / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0)
        return x * layout.expand(factor)

    def screen(self, z, d, tau, layout):
        return layout.norms(d * z) <= tau * layout.weights

    def prox_diag(self, z, d, tau, layout):
        if tau == 0:
            return z
        T = tau * layout.weights
        a = d * z
        a2 = a.square()
        zero = layout.sum(a2).sqrt() <= T
        norm_z = layout.norms(z)
        r_upper = norm_z - T / layout.max(d)     # > 0 for every group that is not screened
        r_lower = norm_z + T / layout.max(-d)    # ||z|| - T / min d
        lo = torch.where(zero, torch.ones_like(T), T / r_upper)
        hi = torch.where(zero | (r_lower <= 0), torch.full_like(T, math.inf), T / r_lower)
        mu = lo.clone()
        rtol = 100 * torch.finfo(z.dtype).eps
        for k in range(self.newton_max_iter):
            inv = layout.expand(mu).add_(d).reciprocal_()   # 1 / (d + mu)
            q = a2 * inv
            norm_y = layout.sum(q.mul_(inv)).sqrt()           # ||y(mu)||
            dphi = layout.sum(q.mul_(inv)) / norm_y.pow(3) - 1 / T
            phi = 1 / norm_y - mu / T
            lo = torch.where(phi > 0, mu, lo)
            hi = torch.where(phi < 0, mu, hi)
            step = mu - phi / dphi
            bisect = torch.where(torch.isinf(hi), 2 * lo, (lo + hi) / 2)
            new_mu = torch.where(zero, mu, torch.where((step > lo) & (step < hi), step, bisect))
            done = (new_mu - mu).abs() <= rtol * mu
            mu = new_mu
            if (k + 1) % self.newton_check_every == 0 and bool(done.all()):
                break
        # y = d z / (d + mu); screened groups get mu = inf, i.e. y = 0
        mu = torch.where(zero, torch.full_like(mu, math.inf), mu)
        return a.div_(layout.expand(mu).add_(d))
