"""Kind ``heads``: one group per attention head.

Supported attention modules:

* ``nn.MultiheadAttention`` with a fused input projection (``kdim == vdim == embed_dim``; torchvision's
  VisionTransformer uses it). Head ``h`` of width ``d`` owns rows ``p E + h d .. p E + h d + d - 1`` of
  ``in_proj_weight`` / ``in_proj_bias`` for each of q, k, v (``p = 0, 1, 2``; ``E = H d``) -- the layout index
  ``{"dim": 0, "block": d, "period": E}`` -- and columns ``h d .. h d + d - 1`` of ``out_proj.weight``
  (``{"dim": 1, "block": d}``).
* Hugging Face BERT-style self-attention (a module with ``query``/``key``/``value`` Linears,
  ``num_attention_heads`` and ``attention_head_size``, whose parent has ``output.dense``; matching the
  parent ``BertAttention`` works too): rows of head ``h`` in each of query, key, value (weights and biases)
  and the matching columns of ``output.dense``. transformers itself is never imported.

Why removal is exact: if a head's q, k, v rows and output columns are all zero, its contribution to the
output, ``W_o[:, h] @ softmax(q_h k_h^T / sqrt(d)) v_h``, is zero; removing whole heads leaves ``d`` and so
the ``1/sqrt(d)`` scale of the other heads unchanged (torch-pruning's stock attention pruning shrinks ``d``
instead, which changes the scale). The output-projection bias and the model width are untouched.

Removal slices the rows/columns and updates the head count: ``nn.MultiheadAttention`` is replaced by a
:class:`~structkit.structure.modules.PrunedMultiheadAttention` (the stock module cannot have fewer heads
than ``embed_dim / head_dim``); a BERT-style module keeps its class with ``num_attention_heads`` and
``all_head_size`` updated on that layer (``config.num_attention_heads`` keeps the dense value: per-layer
counts live on the layers, and :func:`structkit.prune.save_slim` records them). The last head of a layer
is never removed.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._util import set_submodule
from .kinds import Block, BuildContext, PruneContext, StructureKind, Target, register_kind
from .modules import PrunedMultiheadAttention


def _bert_self(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, a, None), nn.Linear) for a in ("query", "key", "value")) and \
        isinstance(getattr(module, "num_attention_heads", None), int) and \
        isinstance(getattr(module, "attention_head_size", None), int)


def _bert_parent(module: nn.Module) -> bool:
    return _bert_self(getattr(module, "self", None) or nn.Module()) and \
        isinstance(getattr(getattr(module, "output", None), "dense", None), nn.Linear)


@register_kind("heads")
class HeadsKind(StructureKind):
    default_regularizer = "group_lasso"
    handles = "nn.MultiheadAttention and BERT-style self-attention modules"
    claim_priority = 1
    prune_order = 20

    def accepts(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.MultiheadAttention, PrunedMultiheadAttention)) or \
            _bert_self(module) or _bert_parent(module)

    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        blocks, done = [], set()
        for t in targets:
            m = t.module
            if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
                spec = self._mha(ctx, t.name, m)
            else:
                self_name = f"{t.name}.self" if _bert_parent(m) else t.name
                if self_name in done:
                    continue
                done.add(self_name)
                spec = self._bert(ctx, self_name)
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
            if block.data["type"] == "mha":
                set_submodule(ctx.model, block.label,
                              PrunedMultiheadAttention.from_mha(ctx.model.get_submodule(block.label), keep))
                continue
            s, d = ctx.model.get_submodule(block.label), block.data["head_dim"]
            gone = [i * d + r for i in range(h) if i not in keep for r in range(d)]
            for a in ("query", "key", "value"):
                tp.prune_linear_out_channels(getattr(s, a), gone)
            tp.prune_linear_in_channels(ctx.model.get_submodule(block.data["output"]), gone)
            s.num_attention_heads, s.all_head_size = len(keep), len(keep) * d
