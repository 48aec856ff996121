"""``nuclear``: psi(W) = sum over matrices of the sum of singular values -- low rank.

Each tensor of the param group is one matrix (a conv weight ``out x in x k x k`` is viewed as
``out x (in k k)``), i.e. the group index is ``"tensor"``. Prox (scalar metric): soft-threshold the singular
values, ``U max(S - tau, 0) V^T``. A diagonal metric breaks unitary invariance, so there is no closed form:
the solvers use proximal gradient. Matrices of equal shape are stacked and decomposed in one batched SVD.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from .base import Regularizer, register_regularizer


def _by_shape(layout):
    """Tensor indices grouped by matrix shape, so each shape is one batched SVD."""
    groups = defaultdict(list)
    for k, shape in enumerate(layout.shapes):
        groups[(shape[0], shape.numel() // shape[0])].append(k)
    return groups.values()


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
        out = torch.empty_like(x)
        mats, out_mats = layout.matrices(x), layout.matrices(out)
        tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device)
        for ks in _by_shape(layout):
            u, s, vh = torch.linalg.svd(torch.stack([mats[k] for k in ks]), full_matrices=False)
            t = tau if tau.dim() == 0 else tau[torch.tensor(ks, device=x.device)].unsqueeze(-1)
            s = (s - t).clamp_min(0)
            shrunk = (u * s.unsqueeze(-2)) @ vh
            for j, k in enumerate(ks):
                out_mats[k].copy_(shrunk[j])
        return out
