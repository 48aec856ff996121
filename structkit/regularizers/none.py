"""``none``: psi = 0. Param groups without a regularizer use it, so every solver has one code path."""
from __future__ import annotations

import torch

from .base import Regularizer, register_regularizer


@register_regularizer("none")
class NoRegularizer(Regularizer):
    def value(self, x, layout):
        return x.new_zeros(())

    def prox(self, x, tau, layout):
        return x

    def prox_diag(self, z, d, tau, layout):
        return z

    def screen(self, z, d, tau, layout):
        return None
