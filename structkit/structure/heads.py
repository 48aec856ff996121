"""Kind ``heads``: one group per attention head (per key/value group under grouped-query attention).

Supported attention modules (matched by structure; transformers and timm are never imported):

* ``nn.MultiheadAttention`` with a fused input projection (``kdim == vdim == embed_dim``; torchvision's
  VisionTransformer uses it). Head ``h`` of width ``d`` owns rows ``p E + h d .. p E + h d + d - 1`` of
  ``in_proj_weight`` / ``in_proj_bias`` for each of q, k, v (``p = 0, 1, 2``; ``E = H d``) -- the layout index
  ``{"dim": 0, "block": d, "period": E}`` -- and columns ``h d .. h d + d - 1`` of ``out_proj.weight``
  (``{"dim": 1, "block": d}``).
* Hugging Face BERT-style self-attention (a module with ``query``/``key``/``value`` Linears,
  ``num_attention_heads`` and ``attention_head_size``, whose parent has ``output.dense``; matching the
  parent ``BertAttention`` works too): rows of head ``h`` in each of query, key, value (weights and biases)
  and the matching columns of ``output.dense``.
* Hugging Face DistilBERT (``q_lin``/``k_lin``/``v_lin``/``out_lin`` Linears, ``n_heads``; head size
  ``attention_head_size`` or ``dim / n_heads``): as BERT, with ``out_lin`` as the output projection;
  ``n_heads`` is updated.
* timm ViT fused attention (``qkv`` Linear of ``3 H d`` rows, ``proj`` Linear, ``num_heads``, ``head_dim``;
  ``q_norm``/``k_norm`` over ``head_dim`` allowed, ``norm`` must be Identity and ``gate`` absent): rows
  ``{"dim": 0, "block": d, "period": H d}`` of ``qkv`` and columns of ``proj``; ``num_heads`` and ``attn_dim``
  are updated.
* Hugging Face GPT-2 (``c_attn``/``c_proj`` ``Conv1D`` layers, whose weight is ``(in, out)``, transposed
  relative to Linear; fused q, k, v in ``c_attn``; ``num_heads``, ``head_dim``, ``split_size``): columns
  ``{"dim": 1, "block": d, "period": H d}`` of ``c_attn.weight``, the same entries of ``c_attn.bias`` and rows
  of ``c_proj.weight``; ``num_heads`` and ``split_size`` (and the Conv1D ``nf``/``nx``) are updated.
  Cross-attention (``q_attn``) is refused.
* Llama-style attention (``q_proj``/``k_proj``/``v_proj``/``o_proj`` Linears, ``head_dim``,
  ``num_key_value_groups``; optional per-head ``q_norm``/``k_norm``), grouped-query attention included: a group
  is one *key/value group* -- key head ``j``, value head ``j``, the ``r = num_key_value_groups`` query heads
  ``j r .. j r + r - 1`` that read it and their ``o_proj`` columns. Query head ``i`` reads key/value head
  ``i // r``, so removing whole groups keeps ``r`` and every kept pairing. transformers 5's forward reads only
  ``head_dim`` and ``num_key_value_groups`` (both unchanged) and reshapes with ``-1``, so the layer's widths
  live in its Linears; ``num_heads`` / ``num_attention_heads`` / ``num_key_value_heads`` are updated where the
  module has them (older transformers versions store and read them).

A module that looks like attention (an integer head count and a child named like a q/k/v or output
projection) but matches none of these -- unknown children that could hold per-head state, direct parameters,
a norm over all heads, mismatched widths -- is refused with a reason that ``GroupSet.describe()`` lists.

Why removal is exact: if a head's q, k, v rows and output columns are all zero, its contribution to the
output, ``W_o[:, h] @ softmax(q_h k_h^T / sqrt(d)) v_h``, is zero; removing whole heads leaves ``d`` and so
the ``1/sqrt(d)`` scale of the other heads unchanged (torch-pruning's stock attention pruning shrinks ``d``
instead, which changes the scale). The output-projection bias and the model width are untouched.

Removal slices the rows/columns and updates the head count: ``nn.MultiheadAttention`` is replaced by a
:class:`~structkit.structure.modules.PrunedMultiheadAttention` (the stock module cannot have fewer heads
than ``embed_dim / head_dim``); the other styles keep their class with the head-count attributes updated on
that layer (``config.num_attention_heads`` keeps the dense value: per-layer counts live on the layers, and
:func:`structkit.prune.save_slim` records them). The last head of a layer is never removed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._util import set_submodule
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, register_kind
from .modules import PrunedMultiheadAttention

_HEAD_COUNTS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "num_key_value_heads", "heads")
_PROJ_NAMES = {"qkv", "q", "k", "v", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "q_lin",
               "k_lin", "v_lin", "out_lin", "c_attn", "c_proj", "q_attn", "in_proj", "out_proj", "proj", "to_qkv",
               "to_q", "to_k", "to_v", "to_out", "wq", "wk", "wv", "wo", "kv", "qkv_proj"}
_DROPOUT = (nn.Dropout, nn.Identity)


def _bert_self(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")) and \
        isinstance(getattr(module, "num_attention_heads", None), int) and \
        isinstance(getattr(module, "attention_head_size", None), int)


def _bert_parent(module: nn.Module) -> bool:
    return _bert_self(getattr(module, "self", None) or nn.Module()) and \
        isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)


def _conv1d(m: Any) -> bool:
    """A Hugging Face ``Conv1D``: ``y = x @ weight + bias`` with weight ``(nx, nf)``."""
    return isinstance(m, nn.Module) and type(m).__name__ == "Conv1D" and isinstance(getattr(m, "nf", None), int) \
        and isinstance(getattr(m, "nx", None), int) and isinstance(getattr(m, "weight", None), nn.Parameter) \
        and tuple(m.weight.shape) == (m.nx, m.nf)


def _attention_like(module: nn.Module) -> bool:
    """An integer head count and a child named like an attention projection: refused with a reason if no style
    below matches, rather than ignored."""
    return any(isinstance(getattr(module, a, None), int) and not isinstance(getattr(module, a), bool)
               for a in _HEAD_COUNTS) and any(n in _PROJ_NAMES for n, _ in module.named_children())


def _extra(module: nn.Module, allowed: dict[str, Any]) -> str | None:
    """Why ``module`` may hold state the style does not know about: a direct parameter, or a child that is not
    in ``allowed`` (name -> predicate on the child)."""
    own = [n for n, _ in module.named_parameters(recurse=False)]
    if own:
        return f"has parameters of its own ({', '.join(own)}), possibly per head, that removal would not slice"
    for n, c in module.named_children():
        if n not in allowed:
            return f"has a child {n!r} ({type(c).__name__}) the '{_style_name(module)}' layout does not cover"
        if not allowed[n](c):
            return f"its child {n!r} ({type(c).__name__}) is not supported here"
    return None


def _style_name(module: nn.Module) -> str:
    for style, test in _STYLES:
        if test(module):
            return style
    return "attention"


def _per_head_norm(d: int):
    """A child that is Identity or a norm whose parameters all have ``d`` entries (applied per head)."""
    return lambda c: isinstance(c, nn.Identity) or all(tuple(p.shape) == (d,) for p in c.parameters())


def _linears(m: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(m, a, None), nn.Linear) for a in names)


def _ints(m: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(m, a, None), int) for a in names)


#: (layout name, test) of the styles after MHA and BERT; the kind's ``_<name>`` method builds the block
_STYLES = [
    ("distilbert", lambda m: _linears(m, "q_lin", "k_lin", "v_lin", "out_lin") and _ints(m, "n_heads")),
    ("timm", lambda m: _linears(m, "qkv", "proj") and _ints(m, "num_heads", "head_dim")),
    ("gpt2", lambda m: _conv1d(getattr(m, "c_attn", None)) and _conv1d(getattr(m, "c_proj", None))
     and _ints(m, "num_heads", "head_dim")),
    ("gqa", lambda m: _linears(m, "q_proj", "k_proj", "v_proj", "o_proj")
     and _ints(m, "head_dim", "num_key_value_groups")),
]


def _rows(d: int, period: int = 0, dim: int = 0) -> dict[str, int]:
    return {"dim": dim, "offset": 0, "block": d, **({"period": period} if period else {})}


@register_kind("heads")
class HeadsKind(StructureKind):
    default_regularizer = "group_lasso"
    handles = ("nn.MultiheadAttention, BERT-style, DistilBERT, GPT-2 (Conv1D), Llama-style (grouped-query) and "
               "timm ViT (fused qkv) attention modules")
    claim_priority = 1
    prune_order = 20

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)) or \
            _bert_self(module) or _bert_parent(module) or any(test(module) for _, test in _STYLES) or \
            _attention_like(module)

    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        blocks, done = [], set()
        for t in targets:
            m = t.module
            if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
                spec = self._mha(ctx, t.name, m)
            elif _bert_self(m) or _bert_parent(m):
                self_name = f"{t.name}.self" if _bert_parent(m) else t.name
                if self_name in done:
                    continue
                done.add(self_name)
                spec = self._bert(ctx, self_name)
            else:
                style = next((s for s, test in _STYLES if test(m)), None)
                spec = getattr(self, f"_{style}")(ctx, t.name, m) if style else (
                    f"attention module {type(m).__module__}.{type(m).__name__} is not a recognised layout (supported: "
                    f"{self.handles}); its heads are left in place")
            if isinstance(spec, str):
                ctx.skip(t.name, spec)
                continue
            name, tensors, heads, data = spec
            blocks.append(Block(kind=self.name, label=name, tensors=tensors, num_groups=heads,
                                regularizer=t.rule.regularizer, lam=t.rule.lam, rule=t.rule_index, data=data))
        return blocks

    @staticmethod
    def _mha(ctx: BuildContext, name: str, m: nn.Module):
        fused = isinstance(m, PrunedMultiheadAttention) or m._qkv_same_embed_dim
        if not fused or m.in_proj_weight is None:
            return "needs the fused in_proj_weight (kdim == vdim == embed_dim)"
        if getattr(m, "bias_k", None) is not None or getattr(m, "add_zero_attn", False):
            return "add_bias_kv / add_zero_attn are not supported"
        h, d = m.num_heads, m.head_dim
        rows = {"dim": 0, "offset": 0, "block": d, "period": h * d}
        tensors = [(ctx.param(m, "in_proj_weight"), rows)]
        if m.in_proj_bias is not None:
            tensors.append((ctx.param(m, "in_proj_bias"), dict(rows)))
        tensors.append((ctx.param(m.out_proj, "weight"), {"dim": 1, "offset": 0, "block": d}))
        return name, tensors, h, {"type": "mha", "heads": h}

    @staticmethod
    def _bert(ctx: BuildContext, self_name: str):
        s = ctx.model.get_submodule(self_name)
        parent_name = self_name.rpartition(".")[0]
        dense = getattr(getattr(ctx.model.get_submodule(parent_name), "output", None), "dense", None)
        if not isinstance(dense, nn.Linear):
            return f"found no Linear {parent_name}.output.dense (the attention output projection)"
        h, d = s.num_attention_heads, s.attention_head_size
        if any(getattr(s, a).out_features != h * d for a in ("query", "key", "value")) or dense.in_features != h * d:
            return f"query/key/value/output widths do not equal num_attention_heads x attention_head_size = {h * d}"
        rows = {"dim": 0, "offset": 0, "block": d}
        tensors = []
        for a in ("query", "key", "value"):
            lin = getattr(s, a)
            tensors += [(ctx.param(lin, "weight"), dict(rows))] + \
                ([(ctx.param(lin, "bias"), dict(rows))] if lin.bias is not None else [])
        dense_name = f"{parent_name}.output.dense"
        tensors.append((ctx.param(dense, "weight"), {"dim": 1, "offset": 0, "block": d}))
        return self_name, tensors, h, {"type": "bert", "heads": h, "head_dim": d, "output": dense_name}

    @staticmethod
    def _separate(ctx: BuildContext, name: str, m: nn.Module, q: str, kv: tuple[str, ...], o: str, heads: int,
                  d: int, per_group: int, data: dict[str, Any]):
        """Separate q / k / v Linears and an output Linear; group g = ``per_group`` query heads (rows of q,
        columns of o) and one head of each of ``kv`` (rows)."""
        tensors = []
        for a, block in [(q, per_group * d)] + [(a, d) for a in kv]:
            lin = getattr(m, a)
            tensors += [(ctx.param(lin, "weight"), _rows(block))] + \
                ([(ctx.param(lin, "bias"), _rows(block))] if lin.bias is not None else [])
        tensors.append((ctx.param(getattr(m, o), "weight"), _rows(per_group * d, dim=1)))
        return name, tensors, heads, {**data, "heads": heads, "head_dim": d}

    def _distilbert(self, ctx: BuildContext, name: str, m: nn.Module):
        h = m.n_heads
        d = getattr(m, "attention_head_size", None)
        d = d if isinstance(d, int) else m.q_lin.out_features // max(h, 1)
        if any(getattr(m, a).out_features != h * d for a in ("q_lin", "k_lin", "v_lin")) or \
                m.out_lin.in_features != h * d:
            return f"q_lin/k_lin/v_lin/out_lin widths do not equal n_heads x head size = {h} x {d}"
        allowed = {a: lambda c: True for a in ("q_lin", "k_lin", "v_lin", "out_lin")}
        why = _extra(m, allowed | {"dropout": lambda c: isinstance(c, _DROPOUT)})
        if why:
            return why
        return self._separate(ctx, name, m, "q_lin", ("k_lin", "v_lin"), "out_lin", h, d, 1, {"type": "distilbert"})

    def _gqa(self, ctx: BuildContext, name: str, m: nn.Module):
        d, r = m.head_dim, m.num_key_value_groups
        h, kvh = m.q_proj.out_features // max(d, 1), m.k_proj.out_features // max(d, 1)
        if d < 1 or r < 1 or h * d != m.q_proj.out_features or kvh * d != m.k_proj.out_features or \
                m.v_proj.out_features != kvh * d or h != kvh * r or m.o_proj.in_features != h * d:
            return (f"q_proj/k_proj/v_proj/o_proj widths ({m.q_proj.out_features}, {m.k_proj.out_features}, "
                    f"{m.v_proj.out_features}, {m.o_proj.in_features}) do not fit head_dim {d} with "
                    f"num_key_value_groups {r}")
        for a, want in (("num_heads", h), ("num_attention_heads", h), ("num_key_value_heads", kvh)):
            if isinstance(getattr(m, a, None), int) and getattr(m, a) != want:
                return f"{a} = {getattr(m, a)} disagrees with the projection widths ({want})"
        allowed = {a: lambda c: True for a in ("q_proj", "k_proj", "v_proj", "o_proj")}
        allowed |= {a: _per_head_norm(d) for a in ("q_norm", "k_norm")}
        why = _extra(m, allowed)
        if why:
            return why
        return self._separate(ctx, name, m, "q_proj", ("k_proj", "v_proj"), "o_proj", kvh, d, r,
                              {"type": "gqa", "per_group": r})

    @staticmethod
    def _timm(ctx: BuildContext, name: str, m: nn.Module):
        h, d = m.num_heads, m.head_dim
        inner = h * d
        if m.qkv.out_features != 3 * inner or m.proj.in_features != inner or \
                getattr(m, "attn_dim", inner) != inner:
            return f"qkv/proj widths ({m.qkv.out_features}, {m.proj.in_features}) do not fit {h} heads of {d}"
        if getattr(m, "gate", None) is not None:
            return "a gated attention output (gate) is not supported"
        allowed = {"qkv": lambda c: True, "proj": lambda c: True, "attn_drop": lambda c: isinstance(c, _DROPOUT),
                   "proj_drop": lambda c: isinstance(c, _DROPOUT), "q_norm": _per_head_norm(d),
                   "k_norm": _per_head_norm(d), "norm": lambda c: isinstance(c, nn.Identity)}
        why = _extra(m, allowed)
        if why:
            return why if "'norm'" not in why else "a norm over all heads (scale_norm) is not supported: " + why
        rows = _rows(d, inner)
        tensors = [(ctx.param(m.qkv, "weight"), rows)]
        if m.qkv.bias is not None:
            tensors.append((ctx.param(m.qkv, "bias"), dict(rows)))
        tensors.append((ctx.param(m.proj, "weight"), _rows(d, dim=1)))
        return name, tensors, h, {"type": "timm", "heads": h, "head_dim": d}

    @staticmethod
    def _gpt2(ctx: BuildContext, name: str, m: nn.Module):
        h, d = m.num_heads, m.head_dim
        inner = h * d
        if getattr(m, "is_cross_attention", False) or hasattr(m, "q_attn"):
            return "cross-attention (q_attn) is not supported"
        if m.c_attn.nf != 3 * inner or m.c_proj.nx != inner or getattr(m, "split_size", inner) != inner:
            return f"c_attn/c_proj widths ({m.c_attn.nf}, {m.c_proj.nx}) do not fit {h} heads of {d}"
        dropout = lambda c: isinstance(c, _DROPOUT)  # noqa: E731
        why = _extra(m, {"c_attn": lambda c: True, "c_proj": lambda c: True, "attn_dropout": dropout,
                         "resid_dropout": dropout})
        if why:
            return why
        tensors = [(ctx.param(m.c_attn, "weight"), _rows(d, inner, dim=1))]
        if isinstance(getattr(m.c_attn, "bias", None), nn.Parameter):
            tensors.append((ctx.param(m.c_attn, "bias"), _rows(d, inner)))
        tensors.append((ctx.param(m.c_proj, "weight"), _rows(d)))
        return name, tensors, h, {"type": "gpt2", "heads": h, "head_dim": d}

    def kept(self, block: Block, zero: torch.Tensor) -> dict[str, dict[str, Any]]:
        h = block.data["heads"]
        return {block.label: dict(kept=h - int(zero.sum()), total=h, unit="heads")}

    def prune(self, ctx: PruneContext, blocks: list[Block], zero: list[torch.Tensor]) -> None:
        import torch_pruning as tp

        for block, z in zip(blocks, zero):
            h = block.data["heads"]
            keep = (~z).nonzero().flatten().tolist()
            if not keep:
                keep = [0]
                ctx.skip(block.label, "kept one all-zero head: a layer keeps at least one")
            ctx.record(block.label, self.name, "heads", h, len(keep), h - len(keep), h)
            if len(keep) == h:
                continue
            kind = block.data["type"]
            if kind == "mha":
                set_submodule(ctx.model, block.label,
                              PrunedMultiheadAttention.from_mha(ctx.model.get_submodule(block.label), keep))
                continue
            s, d = ctx.model.get_submodule(block.label), block.data["head_dim"]
            if kind == "bert":
                gone = [i * d + r for i in range(h) if i not in keep for r in range(d)]
                for a in ("query", "key", "value"):
                    tp.prune_linear_out_channels(getattr(s, a), gone)
                tp.prune_linear_in_channels(ctx.model.get_submodule(block.data["output"]), gone)
                s.num_attention_heads, s.all_head_size = len(keep), len(keep) * d
                continue
            _prune_style(s, kind, keep, h, d, block.data.get("per_group", 1))


def _take(module: nn.Module, attr: str, dim: int, index: torch.Tensor) -> None:
    """Replace parameter ``module.<attr>`` (if any) by its entries at ``index`` along ``dim``."""
    p = getattr(module, attr, None)
    if isinstance(p, nn.Parameter):
        setattr(module, attr, nn.Parameter(p.data.index_select(dim, index.to(p.device)).clone(),
                                           requires_grad=p.requires_grad))


def _linear(lin: nn.Linear, out: torch.Tensor | None = None, inp: torch.Tensor | None = None) -> None:
    if out is not None:
        _take(lin, "weight", 0, out)
        _take(lin, "bias", 0, out)
        lin.out_features = len(out)
    if inp is not None:
        _take(lin, "weight", 1, inp)
        lin.in_features = len(inp)


def _units(keep: list[int], width: int, copies: int = 1, period: int = 0) -> torch.Tensor:
    """Indices of the kept blocks of ``width`` entries, repeated ``copies`` times at ``period`` apart."""
    return torch.tensor([c * period + g * width + r for c in range(copies) for g in keep for r in range(width)])


def _prune_style(s: nn.Module, kind: str, keep: list[int], h: int, d: int, per_group: int) -> None:
    n = len(keep)
    if kind == "distilbert":
        rows = _units(keep, d)
        for a in ("q_lin", "k_lin", "v_lin"):
            _linear(getattr(s, a), out=rows)
        _linear(s.out_lin, inp=rows)
        s.n_heads = n
    elif kind == "gqa":
        q_rows, kv_rows = _units(keep, per_group * d), _units(keep, d)
        _linear(s.q_proj, out=q_rows)
        _linear(s.k_proj, out=kv_rows)
        _linear(s.v_proj, out=kv_rows)
        _linear(s.o_proj, inp=q_rows)
        for attr, value in (("num_heads", n * per_group), ("num_attention_heads", n * per_group),
                            ("num_key_value_heads", n)):
            if isinstance(getattr(s, attr, None), int):  # only those the module has (save_slim restores those)
                setattr(s, attr, value)
    elif kind == "timm":
        rows = _units(keep, d, 3, h * d)
        _linear(s.qkv, out=rows)
        _linear(s.proj, inp=_units(keep, d))
        s.num_heads = n
        if isinstance(getattr(s, "attn_dim", None), int):
            s.attn_dim = n * d
    elif kind == "gpt2":
        cols = _units(keep, d, 3, h * d)
        _take(s.c_attn, "weight", 1, cols)
        _take(s.c_attn, "bias", 0, cols)
        s.c_attn.nf = len(cols)
        _take(s.c_proj, "weight", 0, _units(keep, d))
        s.c_proj.nx = n * d
        s.num_heads, s.split_size = n, n * d
    else:
        raise ValueError(f"unknown head layout {kind!r}")
