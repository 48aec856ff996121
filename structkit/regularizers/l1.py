"""``l1``: psi(W) = sum_i |W_i| -- unstructured sparsity.

Prox (scalar metric): soft-thresholding ``sign(x) max(|x| - tau, 0)``. Under a diagonal metric the problem
stays separable, so the exact solution is soft-thresholding at ``tau / d_i``.
"""
from __future__ import annotations

import torch

from .base import DiagSolution, Regularizer, register_regularizer


def soft_threshold(x: torch.Tensor, t) -> torch.Tensor:
    """``sign(x) * max(|x| - t, 0)`` elementwise."""
    return x.sign() * (x.abs() - t).clamp_min(0)


@register_regularizer("l1")
class L1(Regularizer):
    grouping = "element"

    def value(self, x, layout):
        return x.abs().sum()

    def prox(self, x, tau, layout):
        return soft_threshold(x, layout.expand(tau))

    def prox_(self, x, tau, layout):
        return torch.copysign((x.abs() - layout.expand(tau)).clamp_min_(0), x, out=x)

    def prox_diag(self, z, d, tau, layout):
        return soft_threshold(z, tau / d)

    def solve_diag(self, z, d, tau, layout, *, rtol, warm=None, out=None, check=True, buffer=None, scaled=False):
        """The closed form ``sign(z) max(|z| - tau / d, 0)`` in persistent buffers (exact: residual 0); with
        ``scaled`` (``z`` holds ``d z``) it is ``sign(d z) max(|d z| - tau, 0) / d``."""
        if buffer is None:
            def buffer(name):
                return torch.empty_like(z)
        if scaled:
            mag = torch.abs(z, out=buffer("den")).sub_(tau).clamp_min_(0).div_(d)
            return DiagSolution(torch.copysign(mag, z, out=buffer("y")), z.new_zeros(()), 0, None, exact=True)
        shrink = torch.reciprocal(d, out=buffer("y")).mul_(tau)
        mag = torch.abs(z, out=buffer("den")).sub_(shrink).clamp_min_(0)
        return DiagSolution(torch.copysign(mag, z, out=shrink), z.new_zeros(()), 0, None, exact=True)

    def screen(self, z, d, tau, layout):
        return (d * z).abs() <= tau
