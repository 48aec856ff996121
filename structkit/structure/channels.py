"""Kind ``channels``: output channels of Conv/Linear layers, found and removed with torch-pruning's dependency graph.

Which entries a channel group holds (and why they make removal exact)
--------------------------------------------------------------------
torch-pruning's ``get_pruning_group(layer, prune_out_channels, idxs)`` lists every tensor slice that goes
with output channel ``c`` of ``layer``: the rows of every layer that *produces* the channel (several when
residual additions or concatenations join them), BatchNorm entries, depthwise convolutions it passes
through, and the input slices of every layer that *consumes* it. We regularize the producer side only:
the producers' rows and biases, the depthwise rows and biases, and BatchNorm weight **and** bias. If all
of them are zero, the channel is exactly 0 after each BatchNorm (``gamma (x - mu) / sigma + beta = 0``
whatever the running statistics), stays 0 through activations with ``f(0) = 0`` (ReLU, ReLU6, SiLU,
GELU, Hardswish) and through gates that only multiply it, so the consumers' input slices multiply zeros
and can be removed with the channel. Consumers' input slices belong to the consumer's own channel groups
(or to no group), so groups never overlap.

What is never offered (and reported by ``GroupSet.describe()``): widths that reach the model output (the
final classifier), widths normalised across channels (LayerNorm / GroupNorm: their statistics span the
width, e.g. a transformer's residual stream), widths that are attention head dimensions, embedding widths,
free parameters (class tokens), BatchNorm without affine parameters, and layers coupled to a module a rule
excluded or gave another kind. After the groups are chosen, one forward pass with all of them zeroed
checks that every consumer really sees zeros on those channels; a group that fails (an activation with
``f(0) != 0`` in between) is dropped with that reason.

Layout of the group ids
-----------------------
Group ``u`` of a root layer with width ``W`` and ``block: N`` holds channels ``u N .. u N + N - 1``.
Grouped (non-depthwise) convolutions with ``g`` groups that see the channels need the *same* relative
positions removed in every conv group (otherwise the groups become unequal), so the channels get period
``P = W / lcm(g)``: group ``u`` holds channels ``k P + u N + r``. Concatenation places one root's channels at
an offset inside another tensor (a DenseNet BatchNorm sees the channels of several layers); a weighted
union-find assigns each tensor an offset so that every slice maps to its root's group ids, which keeps one
``{"dim", "offset", "block", "period"}`` index per tensor. Layers whose offsets cannot be reconciled are
skipped with the reason.

Removal re-asks torch-pruning for each group right before pruning it (concatenation offsets of later groups
move after every removal), never removes a layer's last group, and with ``round_to = R`` keeps just enough
zero groups that each width stays a multiple of ``R`` (kept channels are zero, so this stays exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._util import call, eval_mode
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, register_kind

# grad_fn names (lower case) of traced ops that mix channels, so a zero channel cannot simply be dropped
_ATTENTION_OPS = ("attention", "softmax", "bmm")
_NORM_OPS = ("norm",)


@dataclass
class _Slice:
    param: str
    dim: int
    idxs: torch.Tensor       # indices along ``dim`` of the parameter
    root_idxs: torch.Tensor  # the root layer's channel each one belongs to


@dataclass
class _Channels:
    """One torch-pruning group: the output channels of one root layer and every slice that goes with them."""

    root: str
    width: int
    block: int
    rule: int
    period: int = 0
    producers: list[str] = field(default_factory=list)
    slices: list[_Slice] = field(default_factory=list)
    consumers: list[tuple[str, torch.Tensor]] = field(default_factory=list)

    @property
    def units(self) -> int:
        return (self.period or self.width) // self.block

    @property
    def unit_size(self) -> int:
        return self.block * (self.width // self.period if self.period else 1)


def _unit_channels(units: list[int], width: int, block: int, period: int) -> list[int]:
    """Root channels of the given group ids (see the module docstring for the layout)."""
    step = period or width
    return sorted(k * step + u * block + r for u in units for k in range(width // step) for r in range(block))


@register_kind("channels")
class ChannelsKind(StructureKind):
    default_regularizer = "group_lasso"
    supports_block = True
    handles = "Conv and Linear layers (their output channels)"
    claim_priority = 2
    prune_order = 10

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))

    # ---------------------------------------------------------------- building
    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        dg = ctx.dependency_graph()
        covered: set[str] = set()
        found: list[_Channels] = []
        for t in targets:
            if t.name in covered:
                continue
            if t.module not in dg.module2node:
                parent = ctx.model.get_submodule(t.name.rpartition(".")[0])
                ctx.skip(t.name, "output projection inside MultiheadAttention: its width is the attention width "
                                 "(use kind 'heads')" if isinstance(parent, nn.MultiheadAttention) else
                                 "not reached by the example forward pass, so torch-pruning cannot trace it")
                continue
            ch = self._analyse(ctx, dg, t)
            if isinstance(ch, str):
                ctx.skip(t.name, ch)
                continue
            covered.update(ch.producers)
            found.append(ch)
        return self._blocks(ctx, found)

    def _analyse(self, ctx: BuildContext, dg, t: Target) -> _Channels | str:
        """The channels of root ``t`` with their slices, or the reason they cannot be removed exactly."""
        import torch_pruning as tp
        from torch_pruning.ops import OPTYPE

        out_fns = (tp.prune_conv_out_channels, tp.prune_linear_out_channels)
        in_fns = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
        pruner = dg.get_pruner_of_module(t.module)
        width = pruner.get_out_channels(t.module)
        if width % t.rule.block:
            return f"width {width} is not a multiple of block {t.rule.block}"
        group = dg.get_pruning_group(t.module, pruner.prune_out_channels, list(range(width)))
        ch = _Channels(root=t.name, width=width, block=t.rule.block, rule=t.rule_index)
        conv_groups = []
        for item in group.items:
            node, handler = item.dep.target, item.dep.handler
            m, kind = node.module, node.type
            name = ctx.names.get(m, "") if isinstance(m, nn.Module) else ""
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            grouped = kind == OPTYPE.CONV and m.groups > 1
            if grouped and not torch.equal(idxs, roots):
                return f"grouped convolution {name} sees these channels behind a concatenation (not supported)"
            if kind in (OPTYPE.CONV, OPTYPE.LINEAR) and handler in in_fns:
                ch.consumers.append((name, idxs))
                if grouped:
                    conv_groups.append(m.groups)
                continue  # consumers keep their own groups; their slices are removed with the channel
            if kind == OPTYPE.OUTPUT or not node.outputs or any(o.type == OPTYPE.OUTPUT for o in node.outputs):
                return f"its channels are outputs of the model (through {name or 'an op'}), e.g. the final classifier"
            if kind in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
                if kind != OPTYPE.DEPTHWISE_CONV and handler not in out_fns:
                    return f"torch-pruning couples it to {name} through {handler.__name__}, which structkit does not handle"
                transposed = getattr(m, "transposed", False)
                if grouped:
                    if transposed:
                        return f"grouped transposed convolution {name} is not supported"
                    conv_groups.append(m.groups)
                if ctx.excluded.get(name) is not None:
                    return f"coupled with {name}, which rule #{ctx.excluded[name]} excludes"
                other = ctx.assigned.get(name)
                if other is not None and other[1] != self.name:
                    return f"coupled with {name}, which rule #{other[0]} gives kind {other[1]!r}"
                ch.producers.append(name)
                ch.slices.append(_Slice(ctx.param(m, "weight"), 1 if transposed else 0, idxs, roots))
                if ctx.param(m, "bias"):
                    ch.slices.append(_Slice(ctx.param(m, "bias"), 0, idxs, roots))
            elif kind == OPTYPE.BN:
                if not m.affine:
                    return f"BatchNorm {name} has no affine weight and bias, so a zero channel becomes -mean/std, not 0"
                ch.slices += [_Slice(ctx.param(m, "weight"), 0, idxs, roots), _Slice(ctx.param(m, "bias"), 0, idxs, roots)]
            elif kind == OPTYPE.ELEMENTWISE:
                op = node.grad_fn.name() if node.grad_fn is not None else ""
                if any(s in op.lower() for s in _ATTENTION_OPS):
                    return f"its channels are attention head dimensions (they reach {op}); use kind 'heads'"
                if any(s in op.lower() for s in _NORM_OPS):
                    return f"its channels are normalised together by {op}, so removing one changes the others"
                continue
            elif kind in (OPTYPE.PRELU, OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.RESHAPE, OPTYPE.SLICE, OPTYPE.UNBIND,
                          OPTYPE.EXPAND):
                continue  # channel-wise or pure bookkeeping: removed with the channel, nothing to regularize
            elif kind in (OPTYPE.LN, OPTYPE.GN):
                return (f"its width is normalised by {type(m).__name__} {name}, whose statistics span every channel, "
                        "so removing even a zero channel changes the output (e.g. a transformer residual stream)")
            elif kind == OPTYPE.MHA:
                return f"its width is the embedding width of MultiheadAttention {name} (use kind 'heads' for its heads)"
            elif kind == OPTYPE.EMBED:
                return f"its width is the embedding width of {name}"
            elif kind == OPTYPE.PARAMETER:
                return f"its width is shared with the free parameter {ctx.param_names.get(id(m), '?')} (e.g. a class token)"
            else:
                return f"its width passes through {type(m).__name__} {name} ({kind.name}), which structkit does not remove exactly"
        if conv_groups:
            ch.period = width // math.lcm(*conv_groups)
            if ch.period % ch.block:
                return f"grouped convolutions leave {ch.period} channels per conv group, not a multiple of block {ch.block}"
        return ch

    def _blocks(self, ctx: BuildContext, found: list[_Channels]) -> list[Block]:
        """Lay the channel groups out, drop those whose zero-invariance fails, and make one block per set of
        roots that share a tensor (through concatenation)."""
        live = []
        for ch in found:
            taken = next((s.param for s in ch.slices if s.param in ctx.claimed), None)
            if taken:
                ctx.skip(ch.root, f"shares {taken} with the {ctx.claimed[taken]} group of another kind")
            else:
                live.append(ch)
        while True:
            components, dropped = _lay_out(ctx, live)
            if not dropped:
                dropped = _zero_check(ctx, live)
                if not dropped:
                    break
            for ch in live:
                if ch.root in dropped:
                    ctx.skip(ch.root, dropped[ch.root])
            live = [ch for ch in live if ch.root not in dropped]
        blocks = []
        for chans, offsets, tensors, size in components:
            first = chans[0]
            rule = ctx.rules[first.rule]
            label = first.root if len(chans) == 1 else f"{first.root} (+{len(chans) - 1} concatenated)"
            blocks.append(Block(
                kind=self.name, label=label, tensors=tensors, num_groups=size,
                regularizer=rule.regularizer, lam=rule.lam, rule=first.rule,
                data={"channels": [dict(root=ch.root, offset=offsets[ch.root], units=ch.units, unit=ch.unit_size,
                                        width=ch.width, block=ch.block, period=ch.period, producers=ch.producers)
                                   for ch in chans]}))
        return blocks

    # ---------------------------------------------------------------- metrics and pruning
    def kept(self, block: Block, zero: torch.Tensor) -> dict[str, dict[str, Any]]:
        out = {}
        for c in block.data["channels"]:
            zero_units = int(zero[c["offset"]:c["offset"] + c["units"]].sum())
            out[c["root"]] = dict(kept=c["width"] - zero_units * c["unit"], total=c["width"], unit="channels")
        return out

    def prune(self, ctx: PruneContext, blocks: list[Block], zero: list[torch.Tensor]) -> None:
        import torch_pruning as tp
        with torch.enable_grad(), eval_mode(ctx.model):
            dg = tp.DependencyGraph().build_dependency(ctx.model, ctx.example_inputs,
                                                       forward_fn=lambda m, x: call(m, x), verbose=False)
        for block, z in zip(blocks, zero):
            for c in block.data["channels"]:
                units = _removable_units(ctx, c, z[c["offset"]:c["offset"] + c["units"]])
                after = c["width"] - len(units) * c["unit"]
                ctx.record(c["root"], self.name, "channels", c["width"], after, len(units), c["units"])
                if not units:
                    continue
                module = ctx.model.get_submodule(c["root"])
                pruner = dg.get_pruner_of_module(module)
                # asked right before pruning: earlier removals move concatenation offsets
                group = dg.get_pruning_group(module, pruner.prune_out_channels,
                                             _unit_channels(units, c["width"], c["block"], c["period"]))
                group.prune()


def _removable_units(ctx: PruneContext, c: dict[str, Any], zero: torch.Tensor) -> list[int]:
    """Zero groups to remove: all of them, except one when the layer would be left empty, and except as many
    as needed to make the width a multiple of ``ctx.round_to``."""
    units = zero.nonzero().flatten().tolist()
    if units and len(units) == c["units"]:
        units = units[:-1]
        ctx.skip(c["root"], "kept one all-zero group: a layer keeps at least one")
    if ctx.round_to and units:
        r = len(units)
        while r and (c["width"] - r * c["unit"]) % ctx.round_to:
            r -= 1
        if (c["width"] - r * c["unit"]) % ctx.round_to:
            ctx.skip(c["root"], f"no removable count of zero groups makes width {c['width']} a multiple of "
                                f"{ctx.round_to}; removed them all")
        elif r < len(units):
            ctx.skip(c["root"], f"kept {len(units) - r} zero group(s) so the width is a multiple of {ctx.round_to}")
            units = units[:r]
    return units


# -------------------------------------------------------------------- layout (weighted union-find)
class _Offsets:
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


def _lay_out(ctx: BuildContext, chans: list[_Channels]):
    """Assign each regularized tensor an offset so that entry ``i`` lands in its root's group.

    Returns ``(components, dropped)``: components as ``(channels, root offsets, tensor indices, size)`` and
    ``{root: reason}`` for roots that cannot be laid out (the caller drops them and asks again)."""
    uf = _Offsets()
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
    comps: dict[Any, list[_Channels]] = {}
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


def _zero_check(ctx: BuildContext, chans: list[_Channels]) -> dict[str, str]:
    """Zero every regularized slice, run the example inputs once, and return the roots whose consumers still
    see a non-zero value on their channels (with the reason). Parameters are restored afterwards."""
    if not chans:
        return {}
    params = dict(ctx.model.named_parameters())
    names = sorted({s.param for ch in chans for s in ch.slices})
    saved = {n: params[n].detach().clone() for n in names}
    seen: dict[tuple[str, str], bool] = {}
    by_consumer: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for ch in chans:
        for name, idxs in ch.consumers:
            by_consumer.setdefault(name, []).append((ch.root, idxs))

    def hook(name):
        def check(module, args):
            if not args:  # called with keyword arguments only: nothing to inspect (verification still runs)
                return
            x = args[0]
            dim = x.dim() - len(module.kernel_size) - 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
            for root, idxs in by_consumer[name]:
                zero = not bool(x.index_select(dim, idxs.to(x.device)).any())
                seen[(root, name)] = seen.get((root, name), True) and zero
        return check

    handles = [ctx.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in by_consumer]
    try:
        with torch.no_grad():
            for n in names:
                params[n].zero_()
            with eval_mode(ctx.model):
                call(ctx.model, ctx.example_inputs)
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])
        for h in handles:
            h.remove()
    return {root: f"with its groups zeroed, {consumer} still sees non-zero inputs on these channels "
                  "(an operation in between does not map 0 to 0)"
            for (root, consumer), ok in seen.items() if not ok}
