"""Kinds that act on one weight matrix at a time: ``lowrank``, ``binary`` and ``unstructured``.

* ``lowrank`` -- the weight of a Linear/Conv layer is one group for the nuclear norm (a conv weight is read as
  the matrix ``out x (in k_1 k_2 ...)``). Pruning replaces a matrix of rank ``r`` by two thin layers,
  ``W = U_r S_r V_r^T = (U_r S_r^1/2)(S_r^1/2 V_r^T)``: ``Linear(in, r)`` then ``Linear(r, out)``, or a ``k x k``
  conv with ``r`` outputs then a ``1 x 1`` conv, when ``r (in + out) < in out`` (fewer parameters and MACs).
  Rank: singular values of a matrix that is exactly rank ``r`` in exact arithmetic are not exactly zero in
  floating point, so ``r`` counts singular values above ``s_max * max(m, n) * eps(dtype)`` (the usual
  numerical-rank tolerance, as in ``numpy.linalg.matrix_rank``; about ``6e-5 s_max`` for a 512-wide float32
  matrix). Dropping singular values below it changes outputs by at most that much per unit input, which the
  pruner's verification then measures.
* ``binary`` -- rows pulled to ``{-a_r, +a_r}``. Pruning checks that every row of a layer is exactly
  ``a_r * sign(W_r)`` and stores it as a :class:`~structkit.structure.modules.BinaryLinear` /
  ``BinaryConv2d``: one bit per weight plus one float per row. Layers with any non-binary row stay as they
  are, and the report says how many rows were off.
* ``unstructured`` -- L1 on every entry of a layer's weight matrices (its own parameters with 2 or more
  dims; biases are left out). Pruning does no surgery: dense kernels gain nothing from scattered zeros; the
  report gives the exact-zero fraction per layer.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._util import set_submodule
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, register_kind
from .modules import BinaryConv2d, BinaryLinear


def numerical_rank(matrices: torch.Tensor) -> torch.Tensor:
    """Rank of each matrix of a batch ``(..., m, n)``: singular values above ``s_max max(m, n) eps(dtype)``
    (singular values computed in float64)."""
    s = torch.linalg.svdvals(matrices.detach().double())
    tol = s.amax(-1, keepdim=True) * max(matrices.shape[-2:]) * torch.finfo(matrices.dtype).eps
    return (s > tol).sum(-1)


def _matrix_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (
        isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups == 1 and module.padding_mode == "zeros")


def _weight_blocks(kind: str, ctx: BuildContext, targets: list[Target], index) -> list[Block]:
    """One block per layer, grouping its weight with ``index(weight)`` -> (group index, number of groups)."""
    blocks = []
    for t in targets:
        ix, n = index(t.module.weight)
        blocks.append(Block(kind=kind, label=t.name, tensors=[(ctx.param(t.module, "weight"), ix)],
                            num_groups=n, regularizer=t.rule.regularizer, lam=t.rule.lam, rule=t.rule_index))
    return blocks


@register_kind("lowrank")
class LowRankKind(StructureKind):
    default_regularizer = "nuclear"
    regularizer_groupings = ("tensor",)
    handles = "Linear and Conv1d/2d/3d layers (groups=1, zero padding)"
    prune_order = 30

    def accepts(self, module: nn.Module) -> bool:
        return _matrix_layer(module)

    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        return _weight_blocks(self.name, ctx, targets, lambda w: ("tensor", 1))

    def prune(self, ctx: PruneContext, blocks: list[Block], zero: list[torch.Tensor]) -> None:
        for block in blocks:
            layer = ctx.model.get_submodule(block.label)
            w = layer.weight.detach()
            m = w.flatten(1)
            rows, cols = m.shape
            r = max(int(numerical_rank(m)), 1)
            ctx.record(block.label, self.name, "rank", min(rows, cols), r, min(rows, cols) - r, min(rows, cols))
            if r * (rows + cols) >= rows * cols:
                ctx.skip(block.label, f"rank {r} of a {rows} x {cols} matrix: two thin layers would not be smaller")
                continue
            u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
            root = s[:r].sqrt()
            first_w = (root[:, None] * vh[:r]).to(w.dtype)   # r x cols
            second_w = (u[:, :r] * root).to(w.dtype)         # rows x r
            first, second = _factor_layers(layer, r)
            with torch.no_grad():
                first.weight.copy_(first_w.view_as(first.weight))
                second.weight.copy_(second_w.view_as(second.weight))
                if layer.bias is not None:
                    second.bias.copy_(layer.bias)
            new = nn.Sequential(first, second).train(layer.training)
            set_submodule(ctx.model, block.label, new)
            ctx.detail(self.name, module=block.label, shape=[rows, cols], rank=r,
                       params_before=rows * cols, params_after=r * (rows + cols))


def _factor_layers(layer: nn.Module, r: int) -> tuple[nn.Module, nn.Module]:
    """Empty thin layers ``in -> r -> out`` with the same kind, geometry, dtype and device as ``layer``."""
    opts = dict(device=layer.weight.device, dtype=layer.weight.dtype)
    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        return nn.Linear(layer.in_features, r, bias=False, **opts), nn.Linear(r, layer.out_features, bias=bias, **opts)
    conv = type(layer)
    first = conv(layer.in_channels, r, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                 dilation=layer.dilation, bias=False, **opts)
    return first, conv(r, layer.out_channels, 1, bias=bias, **opts)


@register_kind("binary")
class BinaryKind(StructureKind):
    default_regularizer = "binary"
    regularizer_groupings = ("rows",)
    handles = "Linear and Conv2d layers (zero padding)"
    prune_order = 40

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.padding_mode == "zeros")

    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        return _weight_blocks(self.name, ctx, targets, lambda w: ({"dim": 0, "offset": 0}, w.shape[0]))

    def prune(self, ctx: PruneContext, blocks: list[Block], zero: list[torch.Tensor]) -> None:
        for block in blocks:
            layer = ctx.model.get_submodule(block.label)
            mag = layer.weight.detach().flatten(1).abs()
            off = int((mag != mag.amax(1, keepdim=True)).any(1).sum())
            if off:
                ctx.skip(block.label, f"{off} of {mag.shape[0]} rows are not exactly +-a_r: kept in floating point")
                continue
            new = (BinaryLinear(layer) if isinstance(layer, nn.Linear) else BinaryConv2d(layer)).train(layer.training)
            set_submodule(ctx.model, block.label, new)
            ctx.detail(self.name, module=block.label, rows=mag.shape[0], packed_bits=new.packed_bits(),
                       dense_bits=mag.numel() * layer.weight.element_size() * 8)


@register_kind("unstructured")
class UnstructuredKind(StructureKind):
    default_regularizer = "l1"
    regularizer_groupings = ("element",)
    handles = "layers with weight matrices (parameters of 2 or more dims)"
    prune_order = 50

    def accepts(self, module: nn.Module) -> bool:
        return any(p.dim() >= 2 for p in module.parameters(recurse=False))

    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        blocks = []
        for t in targets:
            params = [(n, p) for n, p in t.module.named_parameters(recurse=False) if p.dim() >= 2]
            blocks.append(Block(kind=self.name, label=t.name,
                                tensors=[(ctx.param(t.module, n), "element") for n, _ in params],
                                num_groups=sum(p.numel() for _, p in params),
                                regularizer=t.rule.regularizer, lam=t.rule.lam, rule=t.rule_index))
        return blocks

    def prune(self, ctx: PruneContext, blocks: list[Block], zero: list[torch.Tensor]) -> None:
        for block, z in zip(blocks, zero):
            ctx.detail(self.name, module=block.label, zero_fraction=float(z.float().mean()) if z.numel() else math.nan,
                       note="no surgery: scattered zeros stay in the dense weights")
