"""ProxSGD (Yang et al., ICLR 2020), in the unit-step form used in the RAMDA comparison."""
from __future__ import annotations

from .base import StructuredOptimizer


class ProxSGD(StructuredOptimizer):
    r"""Proximal SGD with averaged momentum, per param group:

    .. math::
        b_t = (1 - m) b_{t-1} + m g \;(b_1 = g),\qquad W_t = \text{prox}_{\text{lr}\,\lambda\psi}(W_{t-1} - \text{lr}\, b_t)

    Args: lr (0.1), momentum (m, in (0, 1], 0.1), regularizer, lam, group_dim, group_index.
    """

    _unit_interval = ("momentum",)

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.1, *, regularizer="none", lam: float = 0.0,
                 group_dim: int | None = None):
        super().__init__(params, dict(lr=lr, momentum=momentum, regularizer=regularizer, lam=lam, group_dim=group_dim))

    def _update(self, group, state, w, g, layout, reg):
        if not state:
            state["buf"] = g.clone()
        else:
            state["buf"].lerp_(g, group["momentum"])
        return reg.prox(w.add_(state["buf"], alpha=-group["lr"]), group["lr"] * group["lam"], layout)
