"""ProxGen (Yun et al., NeurIPS 2021): proximal Adam, sharing RAMDA's inexact subproblem solver."""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .base import StructuredOptimizer, _is_number


class ProxGen(StructuredOptimizer):
    r"""Proximal Adam, per param group:

    .. math::
        m_t = \beta_1 m + (1-\beta_1) g,\quad v_t = \beta_2 v + (1-\beta_2) g^2,\quad
        D_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon

        W_t \approx \arg\min_W \langle \text{lr}\,\hat m_t, W\rangle + \tfrac12\|W - W_{t-1}\|^2_{D_t}
                    + \text{lr}\,\lambda\psi(W),\qquad \hat m_t = m_t / (1 - \beta_1^t)

    i.e. the diagonal-metric subproblem with ``z = W_{t-1} - lr m_hat / D``, solved exactly when the
    regularizer allows and by proximal gradient otherwise (tolerance ``inner_tol / t^(0.5+inner_delta)``
    relative to ``||D z||``). Args: lr (1e-3), betas ((0.9, 0.999)), eps (1e-8), inner_tol, inner_delta,
    inner_max_iter, subproblem, regularizer, lam, group_dim, group_index.
    """

    _positive = ("lr", "eps", "inner_tol", "inner_max_iter")
    _nonnegative = ("lam", "inner_delta")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *,
                 regularizer="none", lam: float = 0.0, group_dim: int | None = None, inner_tol: float = 1e-2,
                 inner_delta: float = 0.05, inner_max_iter: int = 100, subproblem: str = "auto"):
        self.check_hyperparameters({"betas": betas})
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, regularizer=regularizer, lam=lam,
                                      group_dim=group_dim, inner_tol=inner_tol, inner_delta=inner_delta,
                                      inner_max_iter=inner_max_iter, subproblem=subproblem))

    @classmethod
    def check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        super().check_hyperparameters(values)
        betas = values.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise ValueError(f"Invalid betas for ProxGen: {betas!r}; two numbers, both in [0, 1).")

    _restart_scales_eps = False  # a new stage only scales lr: ProxGen has no dual state, and Adam keeps its eps

    def _update(self, group, state, params, layout, reg):
        if not state:
            state["step"] = 0
            state["m"] = params[0].new_zeros(layout.numel)
            state["v"] = params[0].new_zeros(layout.numel)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        m, v = state["m"], state["v"]
        grads = self._lerp_grads_(params, m, layout, 1 - beta1)
        v.mul_(beta2)
        torch._foreach_addcmul_(self._with_grad(params, layout.split(v))[0], grads, grads, value=1 - beta2)
        D, step = self._scaling(group, state, out=self._buffer(group, "D", v))
        tau = group["lr"] * group["lam"]
        if tau == 0:
            torch._foreach_addcdiv_(list(params), layout.split(m), layout.split(D), value=-step)
            return
        z = self._buffer(group, "z", v)
        torch._foreach_copy_(layout.split(z), list(params))
        z.addcdiv_(m, D, value=-step)
        w_new, _ = self._solve(group, state, reg, z, D, tau, layout, lambda: layout.flatten(params))
        torch._foreach_copy_(list(params), layout.split(w_new))

    @staticmethod
    def _scaling(group, state, out=None) -> tuple[torch.Tensor, float]:
        """``D_t`` (into ``out`` if given) and the step ``lr / (1 - beta1^t)`` that scales ``m`` (class docstring)."""
        t = state["step"]
        beta1, beta2 = group["betas"]
        D = torch.sqrt(state["v"], out=out).mul_(1 / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        return D, group["lr"] / (1 - beta1 ** t)

    def _step_point(self, group, state):
        """``(W - lr m_hat / D, D, lr lam)``: the subproblem of a step with the current moments (no new gradient)."""
        tau = group["lr"] * group["lam"]
        if "m" not in state or tau == 0:
            return None
        D, step = self._scaling(group, state)
        z = self._layout(group).flatten(group["params"]).addcdiv_(state["m"], D, value=-step)
        return z, D, tau
