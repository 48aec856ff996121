"""Layout of the channel groups' ids (kind ``channels``): the groups found, their offsets, and the zero checks.

Group ``u`` of a root layer with width ``W`` and ``block: N`` holds channels ``u N .. u N + N - 1``; with grouped
convolutions the channels get a period ``P`` (group ``u`` holds channels ``k P + u N + r``); concatenation places
one root's channels at an offset inside another tensor, and a weighted union-find (:class:`Offsets`) assigns each
tensor an offset so that every slice maps to its root's group ids. ``structkit/structure/channels.py`` has the
whole story.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._util import call, eval_mode
from .kinds import BuildContext

@dataclass
class Slice:
    param: str
    dim: int
    idxs: torch.Tensor       # indices along ``dim`` of the parameter
    root_idxs: torch.Tensor  # the root layer's channel each one belongs to


@dataclass
class Channels:
    """One torch-pruning group: the output channels of one root layer and every slice that goes with them."""

    root: str
    width: int
    block: int
    rule: int
    period: int = 0
    producers: list[str] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    consumers: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (name, idxs, root idxs)

    @property
    def units(self) -> int:
        return (self.period or self.width) // self.block

    @property
    def unit_size(self) -> int:
        return self.block * (self.width // self.period if self.period else 1)


def unit_channels(units: list[int], width: int, block: int, period: int) -> list[int]:
    """Root channels of the given group ids (see the module docstring for the layout)."""
    step = period or width
    return sorted(k * step + u * block + r for u in units for k in range(width // step) for r in range(block))


class Entry:
    """A group entry as seen while torch-pruning is still searching (the dependency, no indices yet)."""

    def __init__(self, dep):
        self.dep = dep



class Offsets:
    """Weighted union-find: ``offset(a) - offset(b)`` is known within a component."""

    def __init__(self):
        self.parent: dict[Any, Any] = {}
        self.pot: dict[Any, int] = {}

    def find(self, a):
        if a not in self.parent:
            self.parent[a], self.pot[a] = a, 0
        path = []
        while self.parent[a] != a:
            path.append(a)
            a = self.parent[a]
        for node in reversed(path):  # compress: node's potential becomes relative to the root
            parent = self.parent[node]
            if parent != a:
                self.pot[node] += self.pot[parent]
            self.parent[node] = a
        return a

    def offset(self, a) -> int:
        self.find(a)
        return self.pot[a]

    def union(self, a, b, delta: int) -> bool:
        """Require ``offset(a) - offset(b) = delta``; False if that contradicts what is known."""
        ra, rb = self.find(a), self.find(b)
        pa, pb = self.pot[a], self.pot[b]
        if ra == rb:
            return pa - pb == delta
        self.parent[ra], self.pot[ra] = rb, pb + delta - pa
        return True


def lay_out(ctx: BuildContext, chans: list[Channels]):
    """Assign each regularized tensor an offset so that entry ``i`` lands in its root's group.

    Returns ``(components, dropped)``: components as ``(channels, root offsets, tensor indices, size)`` and
    ``{root: reason}`` for roots that cannot be laid out (the caller drops them and asks again)."""
    uf = Offsets()
    params = dict(ctx.model.named_parameters())
    seen: dict[str, tuple[int, int, int]] = {}  # param -> (dim, block, period) as first laid out
    owners: dict[str, list[str]] = {}
    covered: dict[str, torch.Tensor] = {}
    for ch in chans:
        for s in ch.slices:
            key = (s.dim, ch.block, ch.period)
            if seen.setdefault(s.param, key) != key or (ch.period and owners.get(s.param, [ch.root]) != [ch.root]):
                return [], {ch.root: f"shares {s.param} with another channel group laid out differently "
                                     "(block size or grouped-convolution period differ)"}
            shift = s.idxs - s.root_idxs
            if ch.period and bool(shift.any()):
                return [], {ch.root: f"{s.param} sees channels of grouped convolutions at an offset (concatenation)"}
            if bool((shift % ch.block).any()) or bool((shift != shift[0]).any()):
                return [], {ch.root: f"{s.param} sees these channels at offsets that do not keep blocks of {ch.block}"}
            # entry i of the tensor is root channel i - shift: offset(tensor) + i//N = offset(root) + (i-shift)//N
            if not uf.union(("t", s.param), ("r", ch.root), -int(shift[0]) // ch.block):
                return [], {ch.root: f"its channels reach {s.param} in a different order than other channels "
                                     "there (concatenation), so they cannot share one group index"}
            owners.setdefault(s.param, []).append(ch.root)
            mask = covered.setdefault(s.param, torch.zeros(params[s.param].shape[s.dim], dtype=torch.bool))
            mask[s.idxs] = True
    for p, mask in covered.items():
        if not bool(mask.all()):
            reason = f"shares {p} with channels that are not grouped (every entry of a tensor needs a group)"
            return [], {root: reason for root in owners[p]}
    comps: dict[Any, list[Channels]] = {}
    for ch in chans:
        comps.setdefault(uf.find(("r", ch.root)), []).append(ch)
    components, dropped = [], {}
    for members in comps.values():
        spans = sorted((uf.offset(("r", ch.root)), ch.units, ch.root) for ch in members)
        for (s0, n0, _), (s1, _, r1) in zip(spans, spans[1:]):
            if s1 < s0 + n0:
                dropped[r1] = "its group ids would overlap another root's after concatenation"
        base = spans[0][0]
        size = sum(n for _, n, _ in spans)
        offsets = {ch.root: uf.offset(("r", ch.root)) - base for ch in members}
        tensors = []
        for ch in members:
            for s in ch.slices:
                if any(t[0] == s.param for t in tensors):
                    continue
                ix = {"dim": s.dim, "offset": uf.offset(("t", s.param)) - base, "block": ch.block}
                if ch.period:
                    ix["period"] = ch.period
                tensors.append((s.param, ix))
        components.append((members, offsets, tensors, size))
    return components, dropped


def zero_check(ctx: BuildContext, chans: list[Channels], gen: torch.Generator | None = None) -> dict[str, str]:
    """Zero regularized slices, run the example inputs once, and return the roots whose consumers see a
    non-zero value where torch-pruning says the zeroed channels arrive (with the reason). Parameters are
    restored afterwards.

    Without ``gen`` every group is zeroed: this catches ops between producer and consumer that do not map 0 to
    0. With ``gen`` a random half of each root's groups is zeroed: a consumer must then see zeros exactly at
    the positions of *those* channels, which catches index mappings that are wrong (a channel shuffle or
    regrouping that torch-pruning maps as if nothing moved)."""
    if not chans:
        return {}
    params = dict(ctx.model.named_parameters())
    selected: dict[str, torch.Tensor] = {}
    for ch in chans:
        mask = torch.ones(ch.width, dtype=torch.bool)
        if gen is not None and ch.units > 1:
            units = torch.randperm(ch.units, generator=gen)[:ch.units // 2].tolist()
            mask = torch.zeros(ch.width, dtype=torch.bool)
            mask[unit_channels(units, ch.width, ch.block, ch.period)] = True
        selected[ch.root] = mask
    names = sorted({s.param for ch in chans for s in ch.slices})
    saved = {n: params[n].detach().clone() for n in names}
    seen: dict[tuple[str, str], bool] = {}
    by_consumer: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for ch in chans:
        for name, idxs, roots in ch.consumers:
            keep = selected[ch.root][roots.clamp(0, ch.width - 1)] & (roots >= 0) & (roots < ch.width)
            by_consumer.setdefault(name, []).append((ch.root, idxs[keep]))

    def hook(name):
        def check(module, args):
            if not args:  # called with keyword arguments only: nothing to inspect (verification still runs)
                return
            x = args[0]
            dim = x.dim() - len(module.kernel_size) - 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
            for root, idxs in by_consumer[name]:
                if idxs.numel() and not 0 <= int(idxs.min()) <= int(idxs.max()) < x.shape[dim]:
                    zero = False  # torch-pruning's indices do not fit this input: refuse rather than guess
                else:
                    zero = not bool(x.index_select(dim, idxs.to(x.device)).any())
                seen[(root, name)] = seen.get((root, name), True) and zero
        return check

    handles = [ctx.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in by_consumer]
    try:
        with torch.no_grad():
            for ch in chans:
                for sl in ch.slices:
                    rows = sl.idxs[selected[ch.root][sl.root_idxs]]
                    params[sl.param].index_fill_(sl.dim, rows.to(params[sl.param].device), 0)
            with eval_mode(ctx.model):
                call(ctx.model, ctx.example_inputs)
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])
        for h in handles:
            h.remove()
    if gen is None:
        return {root: f"with its groups zeroed, {consumer} still sees non-zero inputs on these channels "
                      "(an operation in between does not map 0 to 0)"
                for (root, consumer), ok in seen.items() if not ok}
    return {root: f"with some of its groups zeroed, {consumer} sees non-zero inputs where torch-pruning says those "
                  "channels arrive (its index mapping is wrong here: a channel shuffle or regrouping)"
            for (root, consumer), ok in seen.items() if not ok}

