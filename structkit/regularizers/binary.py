"""``binary``: pull every entry toward {-a_r, +a_r}, with a_r = mean_i |W_ri| per row (output channel).

psi(W) = sum_r sum_i dist(W_ri, {-a_r, +a_r}) = sum_r sum_i | |W_ri| - a_r |  (non-convex).
Prox with the targets ``b = sign(W) a_r`` held at their current values: move each entry toward its target
by at most tau, ``b + soft_threshold(W - b, tau)``. Under a diagonal metric the solvers use proximal
gradient (with the halved step and monotone safeguard used for non-convex terms). When lam is large enough
every entry reaches its target exactly, so each row is ``a_r * sign(W_r)``: 1 bit per weight plus one scale.
"""
from __future__ import annotations

import torch

from .base import Regularizer, register_regularizer
from .l1 import soft_threshold


def binary_targets(x: torch.Tensor, layout) -> torch.Tensor:
    """The nearest binary value of each entry, ``+a_r`` for entries >= 0 and ``-a_r`` otherwise."""
    scale = layout.expand(layout.sum(x.abs()) / layout.sizes)
    return torch.where(x >= 0, scale, -scale)


@register_regularizer("binary")
class Binary(Regularizer):
    grouping = "rows"
    convex = False

    def value(self, x, layout):
        return (x - binary_targets(x, layout)).abs().sum()

    def prox(self, x, tau, layout):
        b = binary_targets(x, layout)
        return b + soft_threshold(x - b, layout.expand(tau))
