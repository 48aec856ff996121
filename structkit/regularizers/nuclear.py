"""``nuclear``: psi(W) = sum over matrices of the sum of singular values -- low rank.

Each tensor of the param group is one matrix (a conv weight ``out x in x k x k`` is viewed as
``out x (in k k)``), i.e. the group index is ``"tensor"``. Prox (scalar metric): soft-threshold the singular
values, ``U max(S - tau, 0) V^T``. A diagonal metric breaks unitary invariance, so there is no closed form:
the solvers use (accelerated) proximal gradient, one prox per inner iteration.

The prox is computed from the Gram matrix of the smaller side: for ``X`` (m x n, m <= n), ``X X^T = U S^2 U^T``
(one symmetric eigendecomposition of an m x m matrix) and ``prox(X) = U diag(max(1 - tau / s, 0)) U^T X``
-- the same ``U max(S - tau, 0) V^T`` without forming ``V``; for m > n the same on ``X^T X``. This is about
1.6x cheaper than a full SVD on one CPU thread for 512 x 512 matrices. The shrink factor is continuous in
``s``, so the precision lost by squaring only moves entries by about ``eps ||X||``. Matrices of equal shape
are stacked and decomposed in one batched call.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .base import Regularizer, register_regularizer


def _by_shape(layout):
    """Tensor indices grouped by matrix shape, so each shape is one batched decomposition."""
    groups = defaultdict(list)
    for k, shape in enumerate(layout.shapes):
        groups[(shape[0], shape.numel() // shape[0])].append(k)
    return groups.values()


def _shrink(a: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular-value soft-thresholding of a batch of matrices ``a`` (B x m x n) by ``t`` (scalar or B x 1),
    through the Gram matrix of the smaller side. Returns the result and the sum of its singular values."""
    wide = a.shape[-2] <= a.shape[-1]
    gram = a @ a.mT if wide else a.mT @ a
    e, u = torch.linalg.eigh(gram)
    s = e.clamp_min(0).sqrt()
    f = torch.where(s > t, 1 - t / s.clamp_min(torch.finfo(a.dtype).tiny), torch.zeros_like(s))
    if wide:
        shrunk = (u * f.unsqueeze(-2)) @ (u.mT @ a)
    else:
        shrunk = (a @ u) @ (u * f.unsqueeze(-2)).mT
    return shrunk, (s - t).clamp_min(0).sum()


@register_regularizer("nuclear")
class Nuclear(Regularizer):
    grouping = "tensor"

    def value(self, x, layout):
        mats = layout.matrices(x)
        total = x.new_zeros(())
        for ks in _by_shape(layout):
            total = total + torch.linalg.svdvals(torch.stack([mats[k] for k in ks])).sum()
        return total

    def prox(self, x, tau, layout):
        return self.prox_with_value(x, tau, layout)[0]

    def prox_with_value(self, x, tau, layout):
        """``(prox_{tau psi}(x), psi(prox_{tau psi}(x)))``: the nuclear norm of the result comes for free from
        the thresholded singular values (the accelerated inner solver uses it for its monotone safeguard)."""
        out = torch.empty_like(x)
        mats, out_mats = layout.matrices(x), layout.matrices(out)
        tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
        total = x.new_zeros(())
        for ks in _by_shape(layout):
            t = tau if tau.dim() == 0 else tau[torch.tensor(ks, device=x.device)].unsqueeze(-1)
            shrunk, value = _shrink(torch.stack([mats[k] for k in ks]), t)
            total = total + value
            for j, k in enumerate(ks):
                out_mats[k].copy_(shrunk[j])
        return out, total
