"""Checks of the paths a channel group takes through torch-pruning's dependency graph (kind ``channels``).

Each ``*_problem`` function returns why removing a group would not be exact (ops that mix, reduce, reorder or
split the channels, parameters torch-pruning does not resize, indices that do not fit), or None when it is safe.
``structkit/structure/channels.py`` explains what a channel group holds and why removal is then exact.
"""
from __future__ import annotations

from torch import nn

from ._guard import broken_nodes

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



def node_name(node, names: dict) -> str:
    m = node.module
    if isinstance(m, nn.Module) and m in names:
        return names[m]
    return ""


def is_in_fn(dg, handler) -> bool:
    return dg.is_in_channel_pruning_fn(handler) and not dg.is_out_channel_pruning_fn(handler)


def is_out_fn(dg, handler) -> bool:
    return dg.is_out_channel_pruning_fn(handler) and not dg.is_in_channel_pruning_fn(handler)


def op_name(node) -> str:
    return node.grad_fn.name() if node.grad_fn is not None and hasattr(node.grad_fn, "name") else ""


def elementwise_problem(node, name: str) -> str | None:
    """Why an op torch-pruning treats as element-wise mixes the channels of the group (None if it does not)."""
    op = op_name(node)
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
        dims, shape = saved_value(saved, "_saved_dim"), saved_value(saved, "_saved_self_sym_sizes")
        if dims is None or shape is None or touches_channels(dims, len(shape)):
            return f"{where} reduces over a dimension that can hold its channels, so removing a zero one changes it"
        return None
    if any(k in low for k in _REORDER_OPS):
        return f"its channels are reordered or regrouped by {where}, which torch-pruning maps as if nothing moved"
    if any(k in low for k in _LAYOUT_OPS):
        shape = saved_value(saved, "_saved_self_sym_sizes")
        if shape is not None and len(shape) > 4:
            return (f"its channels are regrouped by {where} on a {len(shape)}-d view (channel shuffle or head split), "
                    "which torch-pruning maps as if nothing moved")
        return None
    return None


_KNOWN_STATE = {"params": {"weight", "bias"}, "buffers": {"running_mean", "running_var", "num_batches_tracked"}}


def unknown_state(m, kind) -> str | None:
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


def weight_transform(node) -> str | None:
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
    bad = [op_name(n) or n.type.name for n in ops if not any(k in op_name(n).lower() for k in _WEIGHT_LAYOUT_OPS)]
    return bad[0] if bad else None


def split_problem(node, kind) -> str | None:
    """Why a split / unbind / channel slice in the path of a group makes its removal unsafe (None if it does not).

    The sizes of a split along the channels are either stored in the model (mixed-kernel convs, Res2Net,
    partial convs, CSP blocks: the forward crashes after removal) or computed from the width (``chunk(2)``:
    after an uneven removal the halves no longer line up, silently). torch-pruning updates neither. A slice
    along another dimension (ViT's ``x[:, 1:]`` over tokens) passes the channels unchanged."""
    from torch_pruning.ops import OPTYPE

    op = op_name(node) or kind.name.lower()
    if kind == OPTYPE.SLICE:
        dim, shape = saved_value(node.grad_fn, "_saved_dim"), saved_value(node.grad_fn, "_saved_self_sym_sizes")
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


def saved_value(grad_fn, attr: str):
    try:
        value = getattr(grad_fn, attr)
    except Exception:  # missing, or a saved value torch cannot return
        return None
    return value


def touches_channels(dims, ndim: int) -> bool:
    """Whether reducing over ``dims`` of an ``ndim``-d tensor can reduce over channels: dim 1 (N, C, ...) and,
    for 2-d and 3-d tensors, the last dim (tokens x features)."""
    dims = [dims] if isinstance(dims, int) else list(dims)
    if not dims:  # reduce over everything
        return True
    dims = {d % ndim for d in dims if -ndim <= d < ndim} if ndim else set()
    channel = {1, ndim - 1} if ndim in (2, 3) else ({1} if ndim >= 4 else {0})
    return bool(dims & channel)


def dim_size(dg, node, handler) -> int | None:
    try:
        return dg.get_in_channels(node) if is_in_fn(dg, handler) else dg.get_out_channels(node)
    except Exception:  # torch-pruning's size query failed on this node: no range to check
        return None


def index_problem(dg, group, requested: list[int], names: dict) -> str | None:
    """Check a torch-pruning group before anything uses its indices: each entry's indices are unique and in
    range; the layers that produce the channels (and norms) carry exactly one index per requested channel,
    all of the requested ones; consumers carry a whole multiple of them (a flatten repeats each channel).
    Returns the reason for a refusal, or None."""
    from torch_pruning.ops import OPTYPE

    want = set(requested)
    root = node_name(group.items[0].dep.target, names) if group.items else "?"
    producers = (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.IN, OPTYPE.PRELU, OPTYPE.GN,
                 OPTYPE.LN)
    for item in group.items:
        node, handler = item.dep.target, item.dep.handler
        idxs, roots = list(item.idxs), list(getattr(item, "root_idxs", item.idxs))
        where = f"{node_name(node, names) or repr(node.module)} ({handler.__name__})"
        if node in broken_nodes(dg):
            return f"index check: torch-pruning could not map indices through {where} ({broken_nodes(dg)[node]})"
        if len(set(idxs)) != len(idxs):
            return f"index check: torch-pruning gives {where} duplicate indices for the channels of '{root}'"
        size = dim_size(dg, node, handler)
        if size is not None and idxs and (min(idxs) < 0 or max(idxs) >= size):
            bad = [i for i in idxs if not 0 <= i < size][:3]
            return f"index check: torch-pruning gives {where} indices {bad} outside 0..{size - 1} for '{root}'"
        if any(r is None for r in roots) or not set(roots) <= want:
            return f"index check: {where} is coupled to channels of '{root}' that were not asked for"
        if node.type in producers and not is_in_fn(dg, handler):
            if len(idxs) != len(requested) or set(roots) != want:
                return (f"index check: {where} gets {len(idxs)} indices for {len(requested)} channels of '{root}' "
                        "(channels coupled through concatenation/split or a shared module; not supported)")
        elif is_in_fn(dg, handler) and (len(idxs) % len(requested) or set(roots) != want):
            return (f"index check: consumer {where} gets {len(idxs)} input indices for {len(requested)} channels of "
                    f"'{root}' (several channels reach the same input: concatenation/split into a shared module; "
                    "not supported)")
    return None

