"""``group_lasso``: psi(W) = sum_g w_g ||W_g||_2 with w_g = sqrt(|g|) -- structured (group) sparsity.

Scalar metric (closed form): ``W_g * max(0, 1 - tau w_g / ||W_g||)``.

Diagonal metric ``d`` (RAMDA's and ProxGen's subproblem ``min_y 1/2 sum d (y - z)^2 + tau psi(y)``), per group,
with ``a = d z`` and ``T = tau w_g``:

* screening (exact): the solution is 0 iff ``||a_g|| <= T``;
* otherwise ``y_i = a_i / (d_i + mu)`` where the multiplier ``mu = T / ||y_g|| > 0`` is the root of

      phi(mu) = 1 / ||y(mu)|| - mu / T.

  ``1/||y(mu)||`` is concave in ``mu`` (the device of the Moré-Sorensen trust-region iteration) and exactly
  linear when ``d`` is constant on the group, so Newton's method is exact in one step for constant ``d`` and,
  started anywhere right of the root, decreases monotonically to it; left of the root a fixed-point step
  ``mu <- T / ||y(mu)||`` moves right. All groups iterate at once.

  Certificate: for any ``mu`` the point ``y(mu)`` satisfies ``d (y - z) = -mu y``, so the gradient of the
  subproblem there is ``y_g (T / ||y_g|| - mu)``, of norm ``|T - mu ||y_g|| |`` per group (0 on screened groups,
  where 0 is a subgradient). Its norm over all groups is the exact distance of 0 from the subdifferential at
  ``y`` -- the paper's subgradient stopping rule -- and it costs nothing beyond ``||y_g||``, which each
  evaluation computes anyway.

  :meth:`GroupLasso.solve_diag` warm-starts from the previous step's effective metric per group,
  ``d_g = ||a_g|| / ||y_g|| - mu`` (the constant ``d`` that would give the same solution), through the
  constant-metric root ``mu = T d_g / (||a_g|| - T)``; ``d_g`` changes slowly, so in training the first
  evaluation usually meets the stopping rule: one evaluation is three passes over the
  entries (``d + mu``, ``a / (d + mu)``, the group norms of that). A Newton step adds three more.
"""
from __future__ import annotations

import math

import torch

from .base import DiagSolution, Regularizer, register_regularizer


@register_regularizer("group_lasso")
class GroupLasso(Regularizer):
    grouping = "rows"
    newton_max_iter = 50    # cap when checking; typically 0-2 Newton steps from a warm start
    newton_fixed_iter = 1   # Newton steps without a host check (accelerators), from a warm start
    newton_cold_iter = 6    # the same without a warm start (the first step of a stage)

    def value(self, x, layout):
        return (layout.weights * layout.norms(x)).sum()

    def _shrink_factors(self, x, tau, layout):
        norms = layout.norms(x)
        return (1 - tau * layout.weights / norms.clamp_min(torch.finfo(x.dtype).tiny)).clamp_min(0)

    def prox(self, x, tau, layout):
        return self.prox_(x.clone(), tau, layout)

    def prox_(self, x, tau, layout):
        return layout.mul_(x, self._shrink_factors(x, tau, layout))

    def screen(self, z, d, tau, layout):
        return layout.norms(d * z) <= tau * layout.weights

    def prox_diag(self, z, d, tau, layout):
        if tau == 0:
            return z
        return self.solve_diag(z, d, tau, layout, rtol=0.0).y

    def solve_diag(self, z, d, tau, layout, *, rtol, warm=None, out=None, check=True, buffer=None, scaled=False):
        """Newton on ``phi`` (module docstring) from the warm start, until the certificate is <= ``rtol ||d z||``
        (``rtol = 0``: until ``mu`` stops changing). ``out`` (may be ``z``) receives ``a = d z`` and is then a
        scratch buffer (``scaled``: ``z`` already is ``a``); ``buffer(name)`` gives persistent scratch vectors
        (default: fresh ones)."""
        if buffer is None:
            def buffer(name):
                return torch.empty_like(z)
        a = z if scaled else torch.mul(d, z, out=out if out is not None else buffer("a"))
        den, y = buffer("den"), buffer("y")
        tiny = torch.finfo(z.dtype).tiny
        T = tau * layout.weights
        norm_a2 = layout.sumsq(a)
        zero = norm_a2 <= T * T
        tol = rtol * norm_a2.sum().sqrt()
        inf = torch.full_like(T, math.inf)
        # start: mu = T d_g / (||a_g|| - T), the exact root when d is constant (= d_g) on the group. d_g is the
        # group's effective metric ||a_g|| / ||y_g|| - mu from the previous solve (the warm start), which moves
        # far less between steps than mu itself (mu blows up as ||a_g|| approaches T); without one, d's mean
        # on the group (one more pass over d, skipped when every group has a warm start).
        norm_a = norm_a2.sqrt()
        valid = None if warm is None or warm.shape != T.shape else (torch.isfinite(warm) & (warm > 0)) | zero
        if valid is not None and check and bool(valid.all()):
            d_eff = warm
        else:
            d_eff = layout.sum(d) / layout.sizes
            if valid is not None:
                d_eff = torch.where(valid, warm, d_eff)
        mu = torch.where(zero, inf, T * d_eff / (norm_a - T).clamp_min(tiny))
        max_iter = self.newton_max_iter if check else \
            (self.newton_fixed_iter if warm is not None else self.newton_cold_iter)
        residual, iters, settled = T.new_zeros(()), 0, False
        for k in range(max_iter + 1):
            # evaluate y(mu) = a / (d + mu); screened groups have mu = inf, so y = 0 there exactly
            torch.div(a, layout.add(d, mu, out=den), out=y)
            norm_y = layout.sumsq(y).sqrt()
            iters = k
            # certificate: | T - mu ||y|| | per group (0 where screened)
            residual = torch.linalg.vector_norm(torch.where(zero, 0.0, T - mu * norm_y))
            if k == max_iter or settled or (check and bool(residual <= tol)):
                break
            # Newton step on phi; d phi / d mu = sum(y^2 / (d + mu)) / ||y||^3 - 1 / T
            s3 = layout.sum(torch.div(y, den, out=den).mul_(y))
            ny = norm_y.clamp_min(tiny)
            phi = 1 / ny - mu / T
            dphi = s3 / ny.pow(3) - 1 / T
            new_mu = torch.where(dphi < 0, mu - phi / dphi, T / ny).clamp_min(tiny)
            new_mu = torch.where(zero, inf, new_mu)
            # converged to machine precision (also ends a solve whose tolerance is below what float can certify)
            settled = check and bool(((new_mu - mu).abs() <= 4 * torch.finfo(z.dtype).eps * mu)[~zero].all())
            mu = new_mu
        d_eff = torch.where(zero, inf, norm_a / norm_y.clamp_min(tiny) - mu)
        return DiagSolution(y, residual, iters, d_eff)
