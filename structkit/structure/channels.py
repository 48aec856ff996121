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

Checks before anything is used: every group's indices are validated (:func:`_index_problem`: unique, in
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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ._guard import GraphError, ModuleSnapshot, broken_nodes, graph_call
from ._util import call, eval_mode
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, build_graph, register_kind

# Traced ops that torch-pruning calls "element-wise" but that mix channels, so a zero channel cannot simply be
# dropped: matched on the lower-case grad_fn name. Batch norm (NativeBatchNormBackward0, CudnnBatchNormBackward0,
# ...) is per channel: it shows up here when a fused norm + activation module (timm's BatchNormAct2d) or a
# functional call runs it; the module itself is recognised by type (``_BatchNorm``), and its weight and bias
# are regularized like any BatchNorm's.
_ATTENTION_OPS = ("attention", "softmax", "bmm")
_CHANNELWISE_NORM_OPS = ("batchnorm",)
_MIXING_NORM_OPS = ("layernorm", "groupnorm", "rmsnorm", "norm")  # after batchnorm: vector norms, F.normalize
# reductions: a zero channel changes a mean/max/var over the channels (a sum is fine: it adds 0)
_REDUCTION_OPS = ("mean", "var", "std", "amax", "amin", "maxbackward", "minbackward", "logsumexp", "prod",
                  "median", "cumsum", "cumprod", "sort", "topk")
# ops that move entries between positions of a dimension (gather, roll, flip ...): torch-pruning maps them as
# identity, so the channel indices after them are not the ones before
_REORDER_OPS = ("gather", "indexbackward", "index_select", "indexselect", "roll", "flip", "pixelshuffle",
                "pixelunshuffle", "pixel_shuffle", "pixel_unshuffle", "unfold", "im2col", "col2im", "repeat",
                "channelshuffle", "channel_shuffle", "scatter", "take", "narrow")
# layout ops that are fine when they keep a dimension whole but regroup channels on a view with more than 4 dims
# (channel shuffle: view(N, g, C/g, H, W).transpose(1, 2); attention heads: reshape(B, N, 3, H, D).permute)
_LAYOUT_OPS = ("transpose", "permute")


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
    consumers: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (name, idxs, root idxs)

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


class _Entry:
    """A group entry as seen while torch-pruning is still searching (the dependency, no indices yet)."""

    def __init__(self, dep):
        self.dep = dep


def _node_name(node, names: dict) -> str:
    m = node.module
    if isinstance(m, nn.Module) and m in names:
        return names[m]
    return ""


def _is_in_fn(dg, handler) -> bool:
    return dg.is_in_channel_pruning_fn(handler) and not dg.is_out_channel_pruning_fn(handler)


def _is_out_fn(dg, handler) -> bool:
    return dg.is_out_channel_pruning_fn(handler) and not dg.is_in_channel_pruning_fn(handler)


def _op_name(node) -> str:
    return node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else ""


def _elementwise_problem(node, name: str) -> str | None:
    """Why an op torch-pruning treats as element-wise mixes the channels of the group (None if it does not)."""
    op = _op_name(node)
    low = op.lower()
    where = f"{op} (module {name})" if name else op
    if "convolution" in low:
        return (f"its channels pass through a functional convolution ({where}) whose weights or groups the model "
                "stores outside any Conv module (e.g. an anti-aliasing filter), which torch-pruning does not resize")
    if any(k in low for k in _ATTENTION_OPS):
        return f"its channels are attention head dimensions (they reach {where}); use kind 'heads'"
    if any(k in low for k in _CHANNELWISE_NORM_OPS):
        return None
    if any(k in low for k in _MIXING_NORM_OPS):
        return f"its channels are normalised together by {where}, so removing one changes the others"
    saved = node.grad_fn
    if any(k in low for k in _REDUCTION_OPS):
        dims, shape = _saved(saved, "_saved_dim"), _saved(saved, "_saved_self_sym_sizes")
        if dims is None or shape is None or _touches_channels(dims, len(shape)):
            return f"{where} reduces over a dimension that can hold its channels, so removing a zero one changes it"
        return None
    if any(k in low for k in _REORDER_OPS):
        return f"its channels are reordered or regrouped by {where}, which torch-pruning maps as if nothing moved"
    if any(k in low for k in _LAYOUT_OPS):
        shape = _saved(saved, "_saved_self_sym_sizes")
        if shape is not None and len(shape) > 4:
            return (f"its channels are regrouped by {where} on a {len(shape)}-d view (channel shuffle or head split), "
                    "which torch-pruning maps as if nothing moved")
        return None
    return None


_KNOWN_STATE = {"params": {"weight", "bias"}, "buffers": {"running_mean", "running_var", "num_batches_tracked"}}


def _unknown_state(m, kind) -> str | None:
    """Own parameters / buffers of a Conv, Linear, norm or PReLU module that torch-pruning's pruner for it does
    not know (its pruners resize weight, bias and the running statistics only)."""
    from torch_pruning.ops import OPTYPE

    if kind not in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.IN, OPTYPE.PRELU) or \
            not isinstance(m, nn.Module):
        return None
    params = [k for k, v in m._parameters.items() if v is not None and k not in _KNOWN_STATE["params"]]
    buffers = [k for k, v in m._buffers.items() if v is not None and k not in _KNOWN_STATE["buffers"]]
    if params or buffers:
        return " and ".join(filter(None, [f"parameter(s) {', '.join(params)}" if params else "",
                                          f"buffer(s) {', '.join(buffers)}" if buffers else ""]))
    return None


# ops that only change a tensor's layout: applied to a layer's own weight (``weight.t()`` inside F.linear on
# 3-d inputs) they move entries without mixing them, and the layer's pruner resizes the weight itself
_WEIGHT_LAYOUT_OPS = ("tbackward", "transposebackward", "permutebackward", "viewbackward", "reshapealias",
                      "unsafeviewbackward", "unsqueezebackward", "squeezebackward", "clonebackward",
                      "tocopybackward", "aliasbackward", "expandbackward")


def _weight_transform(node) -> str | None:
    """If ``node`` is computed from parameters only (no input from the data path; torch-pruning does not trace
    the parameters of the layers it knows, so such a node has no inputs or only such inputs), the first op of
    that computation that is more than a layout change, e.g. the batch norm of weight standardization."""
    from torch_pruning.ops import OPTYPE

    if isinstance(node.module, nn.Module) and node.type not in (OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE, OPTYPE.EXPAND,
                                                                 OPTYPE.SLICE, OPTYPE.SPLIT, OPTYPE.CONCAT,
                                                                 OPTYPE.UNBIND):
        return None
    seen, stack, ops = set(), [node], []
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.type == OPTYPE.PARAMETER:
            continue
        if n.type not in (OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE, OPTYPE.EXPAND, OPTYPE.SLICE, OPTYPE.SPLIT,
                          OPTYPE.CONCAT, OPTYPE.UNBIND) or len(seen) > 64:
            return None  # reaches the data path (a module, or a long chain): not a weight-only computation
        ops.append(n)
        stack.extend(n.inputs)
    bad = [_op_name(n) or n.type.name for n in ops if not any(k in _op_name(n).lower() for k in _WEIGHT_LAYOUT_OPS)]
    return bad[0] if bad else None


def _split_problem(node, kind) -> str | None:
    """Why a split / unbind / channel slice in the path of a group makes its removal unsafe (None if it does not).

    The sizes of a split along the channels are either stored in the model (mixed-kernel convs, Res2Net,
    partial convs, CSP blocks: the forward crashes after removal) or computed from the width (``chunk(2)``:
    after an uneven removal the halves no longer line up, silently). torch-pruning updates neither. A slice
    along another dimension (ViT's ``x[:, 1:]`` over tokens) passes the channels unchanged."""
    from torch_pruning.ops import OPTYPE

    op = _op_name(node) or kind.name.lower()
    if kind == OPTYPE.SLICE:
        dim, shape = _saved(node.grad_fn, "_saved_dim"), _saved(node.grad_fn, "_saved_self_sym_sizes")
        if isinstance(dim, int) and shape is not None:
            ndim = len(shape)
            channel = {1} if ndim >= 4 else ({ndim - 1} if ndim in (2, 3) else {0})
            if dim % max(ndim, 1) not in channel:
                return None
        return (f"its channels pass through a slice along the channels ({op}) with bounds fixed in the model's "
                "code, which torch-pruning does not update")
    return (f"its channels pass through a split ({op}) whose sizes the model stores or computes from the width "
            "(mixed kernels, Res2Net, partial convs, chunk); torch-pruning does not update them, so removal is "
            "refused")


def _saved(grad_fn, attr: str):
    try:
        value = getattr(grad_fn, attr)
    except Exception:  # missing, or a saved value torch cannot return
        return None
    return value


def _touches_channels(dims, ndim: int) -> bool:
    """Whether reducing over ``dims`` of an ``ndim``-d tensor can reduce over channels: dim 1 (N, C, ...) and,
    for 2-d and 3-d tensors, the last dim (tokens x features)."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:  # reduce over everything
        return True
    dims = {d % ndim for d in dims if -ndim <= d < ndim} if ndim else set()
    channel = {1, ndim - 1} if ndim in (2, 3) else ({1} if ndim >= 4 else {0})
    return bool(dims & channel)


def _dim_size(dg, node, handler) -> int | None:
    try:
        return dg.get_in_channels(node) if _is_in_fn(dg, handler) else dg.get_out_channels(node)
    except Exception:  # torch-pruning's size query failed on this node: no range to check
        return None


def _index_problem(dg, group, requested: list[int], names: dict) -> str | None:
    """Check a torch-pruning group before anything uses its indices: each entry's indices are unique and in
    range; the layers that produce the channels (and norms) carry exactly one index per requested channel,
    all of the requested ones; consumers carry a whole multiple of them (a flatten repeats each channel).
    Returns the reason for a refusal, or None."""
    from torch_pruning.ops import OPTYPE

    want = set(requested)
    root = _node_name(group.items[0].dep.target, names) if group.items else "?"
    producers = (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.IN, OPTYPE.PRELU, OPTYPE.GN,
                 OPTYPE.LN)
    for item in group.items:
        node, handler = item.dep.target, item.dep.handler
        idxs, roots = list(item.idxs), list(getattr(item, "root_idxs", item.idxs))
        where = f"{_node_name(node, names) or repr(node.module)} ({handler.__name__})"
        if node in broken_nodes(dg):
            return f"index check: torch-pruning could not map indices through {where} ({broken_nodes(dg)[node]})"
        if len(set(idxs)) != len(idxs):
            return f"index check: torch-pruning gives {where} duplicate indices for the channels of '{root}'"
        size = _dim_size(dg, node, handler)
        if size is not None and idxs and (min(idxs) < 0 or max(idxs) >= size):
            bad = [i for i in idxs if not 0 <= i < size][:3]
            return f"index check: torch-pruning gives {where} indices {bad} outside 0..{size - 1} for '{root}'"
        if any(r is None for r in roots) or not set(roots) <= want:
            return f"index check: {where} is coupled to channels of '{root}' that were not asked for"
        if node.type in producers and not _is_in_fn(dg, handler):
            if len(idxs) != len(requested) or set(roots) != want:
                return (f"index check: {where} gets {len(idxs)} indices for {len(requested)} channels of '{root}' "
                        "(channels coupled through concatenation/split or a shared module; not supported)")
        elif _is_in_fn(dg, handler) and (len(idxs) % len(requested) or set(roots) != want):
            return (f"index check: consumer {where} gets {len(idxs)} input indices for {len(requested)} channels of "
                    f"'{root}' (several channels reach the same input: concatenation/split into a shared module; "
                    "not supported)")
    return None


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
        """The channels of root ``t`` with their slices, or the reason they cannot be removed exactly.

        Three passes over torch-pruning's group: what each entry *is* (refusing ops and modules that make the
        removal inexact, with the most specific reason), then the index check (:func:`_index_problem`), then
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
        problem = _index_problem(dg, group, list(range(width)), ctx.names)
        if problem:
            return problem
        ch = _Channels(root=t.name, width=width, block=t.rule.block, rule=t.rule_index)
        conv_groups = []
        for item in group.items:
            node, handler = item.dep.target, item.dep.handler
            m, kind = node.module, node.type
            name = _node_name(node, ctx.names)
            idxs = torch.as_tensor(item.idxs, dtype=torch.long)
            roots = torch.as_tensor(item.root_idxs, dtype=torch.long)
            grouped = kind == OPTYPE.CONV and m.groups > 1
            if grouped and not torch.equal(idxs, roots):
                return f"grouped convolution {name} sees these channels behind a concatenation (not supported)"
            if grouped:
                conv_groups.append(m.groups)
            if kind in (OPTYPE.CONV, OPTYPE.LINEAR) and _is_in_fn(dg, handler):
                ch.consumers.append((name, idxs, roots))  # consumers keep their own groups; their slices go with the channel
            elif kind in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
                transposed = getattr(m, "transposed", False)
                ch.producers.append(name)
                ch.slices.append(_Slice(ctx.param(m, "weight"), 1 if transposed else 0, idxs, roots))
                if ctx.param(m, "bias"):
                    ch.slices.append(_Slice(ctx.param(m, "bias"), 0, idxs, roots))
            elif kind in (OPTYPE.BN, OPTYPE.IN) and m.affine:
                ch.slices += [_Slice(ctx.param(m, "weight"), 0, idxs, roots), _Slice(ctx.param(m, "bias"), 0, idxs, roots)]
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
            reason = self._entry_problem(ctx, dg, _Entry(dep))
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
        name = _node_name(node, ctx.names)
        broken = broken_nodes(dg).get(node)
        if broken:
            return (f"torch-pruning could not map channel indices through {_op_name(node) or kind.name} ({broken}), "
                    "so it cannot tell which entries go with these channels")
        extra = _unknown_state(m, kind)
        if extra:
            return (f"{type(m).__name__} {name} has {extra} that torch-pruning does not resize with the channels "
                    "(e.g. a weight gain), so removal is refused")
        weight_op = _weight_transform(node)
        if weight_op:
            return (f"{weight_op} transforms a layer's weights before use (e.g. weight standardization), which "
                    "changes when torch-pruning removes entries")
        if kind in (OPTYPE.CONV, OPTYPE.LINEAR) and _is_in_fn(dg, handler):
            return None  # a consumer
        if kind == OPTYPE.OUTPUT or not node.outputs or any(o.type == OPTYPE.OUTPUT for o in node.outputs):
            return f"its channels are outputs of the model (through {name or 'an op'}), e.g. the final classifier"
        if kind in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
            if kind != OPTYPE.DEPTHWISE_CONV and not _is_out_fn(dg, handler):
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
            return _elementwise_problem(node, name)
        if kind in (OPTYPE.SPLIT, OPTYPE.UNBIND, OPTYPE.SLICE):
            return _split_problem(node, kind)
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

    def _blocks(self, ctx: BuildContext, found: list[_Channels]) -> list[Block]:
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
            components, dropped = _lay_out(ctx, live)
            if not dropped:
                dropped = _zero_check(ctx, live) or _zero_check(ctx, live, torch.Generator().manual_seed(0)) or \
                    _zero_check(ctx, live, torch.Generator().manual_seed(1))
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
        channels = _unit_channels(units, c["width"], c["block"], c["period"])
        where = f"the channel group of layer '{c['root']}'"
        try:
            # asked right before pruning: earlier removals move concatenation offsets
            group = graph_call(lambda: dg.get_pruning_group(module, pruner.prune_out_channels, channels),
                               where, timeout=ctx.graph_timeout, graph=dg)
        except GraphError as err:
            ctx.skip(c["root"], f"kept its {len(units)} zero channel group(s): {err}")
            return 0
        problem = _index_problem(dg, group, channels, names)
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


def _zero_check(ctx: BuildContext, chans: list[_Channels], gen: torch.Generator | None = None) -> dict[str, str]:
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
            mask[_unit_channels(units, ch.width, ch.block, ch.period)] = True
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
