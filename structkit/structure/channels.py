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

What is never offered (and reported by ``GroupSet.describe()``, one line per layer): widths that reach the model
output (the final classifier), widths normalised across channels (LayerNorm / GroupNorm: their statistics span
the width, e.g. a transformer's residual stream), widths that are attention head dimensions, embedding widths,
free parameters (class tokens), BatchNorm without affine parameters, layers coupled to a module a rule excluded
or gave another kind, and paths through ops torch-pruning treats as element-wise or bookkeeping but that break
exact removal: splits and channel slices (stored or computed sizes), reductions over the channels,
reorderings and regrouping transposes, weight transforms, functional convolutions, modules with parameters or
buffers torch-pruning does not resize, and nodes whose index mapping torch-pruning failed to compute. Norms
are recognised by type: any ``_BatchNorm`` subclass (including fused norm + activation modules such as timm's
``BatchNormAct2d``) and affine ``_InstanceNorm`` without running statistics.

Checks before anything is used: every group's indices are validated (:func:`._channel_checks.index_problem`: unique, in
range, one per channel for producers and norms, a whole multiple for consumers), at grouping time and again
right before each removal. After the groups are chosen, forward passes with all of them zeroed, then with random
halves zeroed, check that every consumer sees zeros exactly where torch-pruning says those channels arrive; a
group that fails (an activation with ``f(0) != 0``, or a wrong index mapping) is dropped with the reason.
Every torch-pruning call runs under :mod:`._guard` (time limit, cycle / size guard, rollback).

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
move after every removal), checks its indices, rolls back a removal torch-pruning fails on half-way (the layer
then keeps its zero groups, reported), never removes a layer's last group, and with ``round_to = R`` keeps just enough
zero groups that each width stays a multiple of ``R`` (kept channels are zero, so this stays exact).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ._channel_checks import (elementwise_problem, index_problem, is_in_fn, is_out_fn, node_name, op_name,
                              split_problem, unknown_state, weight_transform)
from ._channel_layout import Channels, Entry, Slice, lay_out, unit_channels, zero_check
from ._guard import GraphError, ModuleSnapshot, broken_nodes, graph_call
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, build_graph, register_kind


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
        try:
            dg = ctx.dependency_graph()
        except GraphError as err:
            for t in targets:
                ctx.skip(t.name, f"the model could not be traced: {err}")
            return []
        covered: set[str] = set()
        found: list[Channels] = []
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

    def _analyse(self, ctx: BuildContext, dg, t: Target) -> Channels | str:
        """The channels of root ``t`` with their slices, or the reason they cannot be removed exactly.

        Three passes over torch-pruning's group: what each entry *is* (refusing ops and modules that make the
        removal inexact, with the most specific reason), then the index check (:func:`index_problem`), then
        the slices to regularize."""
        from torch_pruning.ops import OPTYPE

        pruner = dg.get_pruner_of_module(t.module)
        width = pruner.get_out_channels(t.module)
        if width % t.rule.block:
            return f"width {width} is not a multiple of block {t.rule.block}"
        try:
            group = graph_call(lambda: dg.get_pruning_group(t.module, pruner.prune_out_channels, list(range(width))),
                               f"the channel group of layer '{t.name}'", timeout=ctx.graph_timeout, graph=dg,
                               reuse_mapping=True,  # nothing is pruned while grouping: mappings stay valid
                               stop=self._early_stop(ctx, dg))
        except GraphError as err:
            return str(err)
        reasons = [r for r in (self._entry_problem(ctx, dg, item) for item in group.items) if r]
        if reasons:  # the most telling one: attention heads explain splits and reshapes around them
            return next((r for r in reasons if "attention head" in r), reasons[0])
        problem = index_problem(dg, group, list(range(width)), ctx.names)
        if problem:
            return problem
        ch = Channels(root=t.name, width=width, block=t.rule.block, rule=t.rule_index)
        conv_groups = []
        for item in group.items:
            node, handler = item.dep.target, item.dep.handler
            m, kind = node.module, node.type
            name = node_name(node, ctx.names)
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            grouped = kind == OPTYPE.CONV and m.groups > 1
            if grouped and not torch.equal(idxs, roots):
                return f"grouped convolution {name} sees these channels behind a concatenation (not supported)"
            if grouped:
                conv_groups.append(m.groups)
            if kind in (OPTYPE.CONV, OPTYPE.LINEAR) and is_in_fn(dg, handler):
                ch.consumers.append((name, idxs, roots))  # consumers keep their own groups; their slices go with the channel
            elif kind in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
                transposed = getattr(m, "transposed", False)
                ch.producers.append(name)
                ch.slices.append(Slice(ctx.param(m, "weight"), 1 if transposed else 0, idxs, roots))
                if ctx.param(m, "bias"):
                    ch.slices.append(Slice(ctx.param(m, "bias"), 0, idxs, roots))
            elif kind in (OPTYPE.BN, OPTYPE.IN) and m.affine:
                ch.slices += [Slice(ctx.param(m, "weight"), 0, idxs, roots), Slice(ctx.param(m, "bias"), 0, idxs, roots)]
        if conv_groups:
            ch.period = width // math.lcm(*conv_groups)
            if ch.period % ch.block:
                return f"grouped convolutions leave {ch.period} channels per conv group, not a multiple of block {ch.block}"
        return ch

    def _early_stop(self, ctx: BuildContext, dg):
        """A ``stop`` check for the group search: the first entry that makes the group unusable ends it (some
        searches through dual-path concatenations take 10 s each). A split problem waits a little, in case an
        attention op (the more telling reason) follows."""
        pending: list = []

        def stop(dep) -> str | None:
            reason = self._entry_problem(ctx, dg, Entry(dep))
            if reason and ("attention head" in reason or "split" not in reason and "slice" not in reason):
                return reason
            if reason and not pending:
                pending.append(reason)
            if pending:
                pending.append(None)
                if len(pending) > 200:
                    return pending[0]
            return None
        return stop

    def _entry_problem(self, ctx: BuildContext, dg, item) -> str | None:
        """Why one entry of a group makes removing its channels inexact or unsupported (None if it does not)."""
        from torch_pruning.ops import OPTYPE

        node, handler = item.dep.target, item.dep.handler
        m, kind = node.module, node.type
        name = node_name(node, ctx.names)
        broken = broken_nodes(dg).get(node)
        if broken:
            return (f"torch-pruning could not map channel indices through {op_name(node) or kind.name} ({broken}), "
                    "so it cannot tell which entries go with these channels")
        extra = unknown_state(m, kind)
        if extra:
            return (f"{type(m).__name__} {name} has {extra} that torch-pruning does not resize with the channels "
                    "(e.g. a weight gain), so removal is refused")
        weight_op = weight_transform(node)
        if weight_op:
            return (f"{weight_op} transforms a layer's weights before use (e.g. weight standardization), which "
                    "changes when torch-pruning removes entries")
        if kind in (OPTYPE.CONV, OPTYPE.LINEAR) and is_in_fn(dg, handler):
            return None  # a consumer
        if kind == OPTYPE.OUTPUT or not node.outputs or any(o.type == OPTYPE.OUTPUT for o in node.outputs):
            return f"its channels are outputs of the model (through {name or 'an op'}), e.g. the final classifier"
        if kind in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
            if kind != OPTYPE.DEPTHWISE_CONV and not is_out_fn(dg, handler):
                return f"torch-pruning couples it to {name} through {handler.__name__}, which structkit does not handle"
            if kind == OPTYPE.CONV and m.groups > 1 and getattr(m, "transposed", False):
                return f"grouped transposed convolution {name} is not supported"
            if ctx.excluded.get(name) is not None:
                return f"coupled with {name}, which rule #{ctx.excluded[name]} excludes"
            other = ctx.assigned.get(name)
            if other is not None and other[1] != self.name:
                return f"coupled with {name}, which rule #{other[0]} gives kind {other[1]!r}"
            return None
        if kind in (OPTYPE.BN, OPTYPE.IN):
            # by type: every torch.nn _BatchNorm / _InstanceNorm subclass, including fused norm + activation
            # modules such as timm's BatchNormAct2d (its activation is checked by the zero pass)
            what = f"{type(m).__name__} {name}"
            if kind == OPTYPE.IN and getattr(m, "track_running_stats", False):
                return f"{what} tracks running statistics, which torch-pruning does not shrink"
            if kind == OPTYPE.BN and not m.affine:
                return f"{what} has no affine weight and bias, so a zero channel becomes -mean/std, not 0"
            return None  # instance norm without affine: (0 - 0) / sqrt(0 + eps) = 0
        if kind == OPTYPE.ELEMENTWISE:
            return elementwise_problem(node, name)
        if kind in (OPTYPE.SPLIT, OPTYPE.UNBIND, OPTYPE.SLICE):
            return split_problem(node, kind)
        if kind in (OPTYPE.PRELU, OPTYPE.CONCAT, OPTYPE.RESHAPE, OPTYPE.EXPAND):
            return None  # channel-wise or pure bookkeeping: removed with the channel, nothing to regularize
        if kind in (OPTYPE.LN, OPTYPE.GN):
            return (f"its width is normalised by {type(m).__name__} {name}, whose statistics span several channels, "
                    "so removing even a zero channel changes the output (e.g. a transformer residual stream)")
        if kind == OPTYPE.MHA:
            return f"its width is the embedding width of MultiheadAttention {name} (use kind 'heads' for its heads)"
        if kind == OPTYPE.EMBED:
            return f"its width is the embedding width of {name}"
        if kind == OPTYPE.PARAMETER:
            return f"its width is shared with the free parameter {ctx.param_names.get(id(m), '?')} (e.g. a class token)"
        return f"its width passes through {type(m).__name__} {name} ({kind.name}), which structkit does not remove exactly"

    def _blocks(self, ctx: BuildContext, found: list[Channels]) -> list[Block]:
        """Lay the channel groups out, drop those whose zero-invariance fails, and make one block per set of
        roots that share a tensor (through concatenation)."""
        live = []
        for ch in found:
            taken = next((s.param for s in ch.slices if s.param in ctx.claimed), None)
            if taken:
                for other in dict.fromkeys(ch.producers or [ch.root]):
                    ctx.skip(other, f"shares {taken} with the {ctx.claimed[taken]} group of another kind")
            else:
                live.append(ch)
        while True:
            components, dropped = lay_out(ctx, live)
            if not dropped:
                dropped = zero_check(ctx, live) or zero_check(ctx, live, torch.Generator().manual_seed(0)) or \
                    zero_check(ctx, live, torch.Generator().manual_seed(1))
                if not dropped:
                    break
            for ch in live:
                if ch.root in dropped:
                    ctx.skip(ch.root, dropped[ch.root])
                    for other in dict.fromkeys(ch.producers):
                        if other != ch.root:
                            ctx.skip(other, f"its channels go with those of {ch.root}, which was left out")
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
        todo = []
        for block, z in zip(blocks, zero):
            for c in block.data["channels"]:
                units = _removable_units(ctx, c, z[c["offset"]:c["offset"] + c["units"]])
                todo.append((c, units))
        if not any(units for _, units in todo):
            for c, _ in todo:
                ctx.record(c["root"], self.name, "channels", c["width"], c["width"], 0, c["units"])
            return
        try:
            dg = build_graph(ctx.model, ctx.example_inputs, ctx.graph_timeout)
        except GraphError as err:
            for c, units in todo:
                ctx.record(c["root"], self.name, "channels", c["width"], c["width"], 0, c["units"])
                if units:
                    ctx.skip(c["root"], f"kept its {len(units)} zero channel group(s): the model could not be traced: {err}")
            return
        for c, units in todo:
            removed = self._remove(ctx, dg, c, units) if units else 0
            ctx.record(c["root"], self.name, "channels", c["width"], c["width"] - removed * c["unit"], removed, c["units"])

    @staticmethod
    def _remove(ctx: PruneContext, dg, c: dict[str, Any], units: list[int]) -> int:
        """Remove the given groups of one root layer; returns how many were removed (0 if torch-pruning failed,
        looped or timed out, or its indices did not check out: the layer is then restored and keeps them)."""
        names = {m: n for n, m in ctx.model.named_modules()}
        module = ctx.model.get_submodule(c["root"])
        pruner = dg.get_pruner_of_module(module)
        channels = unit_channels(units, c["width"], c["block"], c["period"])
        where = f"the channel group of layer '{c['root']}'"
        try:
            # asked right before pruning: earlier removals move concatenation offsets
            group = graph_call(lambda: dg.get_pruning_group(module, pruner.prune_out_channels, channels),
                               where, timeout=ctx.graph_timeout, graph=dg)
        except GraphError as err:
            ctx.skip(c["root"], f"kept its {len(units)} zero channel group(s): {err}")
            return 0
        problem = index_problem(dg, group, channels, names)
        if problem:
            ctx.skip(c["root"], f"kept its {len(units)} zero channel group(s): {problem}")
            return 0
        snapshot = ModuleSnapshot(item.dep.target.module for item in group.items)
        try:
            graph_call(lambda: group.prune(record_history=False), f"removing {where}", timeout=ctx.graph_timeout)
        except GraphError as err:
            snapshot.restore()
            ctx.skip(c["root"], f"kept its {len(units)} zero channel group(s) (layers restored): {err}")
            return 0
        return len(units)


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

