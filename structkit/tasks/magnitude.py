"""The Torch-Pruning reference of the sentence task (docs/minilm.md): cut a BERT encoder's heads and FFN neurons of
smallest weight magnitude to given sizes before any training (``model.options.prune_to`` of ``sentence_encoder``),
then distil it like the structured run -- the same sentences, the same budget, no structure-inducing solver.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["magnitude_prune", "sizes_to_prune_to"]


def sizes_to_prune_to(spec: Any) -> tuple[list[int], list[int]]:
    """``prune_to``: ``{heads: [per layer], ffn: [per layer]}``, or a structured run's folder (the sizes of its
    slim.pt)."""
    if isinstance(spec, dict) and set(spec) == {"heads", "ffn"}:
        return [int(h) for h in spec["heads"]], [int(f) for f in spec["ffn"]]
    if isinstance(spec, str) and (Path(spec) / "slim.pt").is_file():
        from ..slim import load_slim
        from .sentence_data import layer_sizes
        sizes = layer_sizes(load_slim(Path(spec) / "slim.pt"))
        return sizes["heads"], sizes["ffn"]
    raise ValueError(f"prune_to must be {{heads: [per layer], ffn: [per layer]}} or the folder of a run with a slim.pt; "
                     f"got {spec!r}")


def magnitude_prune(model: nn.Module, example: dict[str, torch.Tensor], heads_kept: list[int],
                    ffn_kept: list[int]) -> nn.Module:
    """The reference a user would try first: Torch-Pruning's dependency graph and ``GroupMagnitudeImportance``
    (L2 norm over every coupled slice: q, k, v rows, output columns; intermediate rows, output columns), keeping
    the ``heads_kept[i]`` heads and ``ffn_kept[i]`` FFN neurons of largest magnitude in layer ``i``. Whole heads
    are removed (head_dim and the attention scale unchanged), the layer's ``num_attention_heads`` and
    ``all_head_size`` set by hand (transformers 5 has no prune_heads). In place; returns the model."""
    import torch_pruning as tp

    layers = model.encoder.layer
    if len(heads_kept) != len(layers) or len(ffn_kept) != len(layers):
        raise ValueError(f"need one head count and one FFN width per layer ({len(layers)}); got {heads_kept}, "
                         f"{ffn_kept}")
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    for i, layer in enumerate(layers):
        att = layer.attention.self
        h, d = att.num_attention_heads, att.attention_head_size
        if not 1 <= heads_kept[i] <= h or not 1 <= ffn_kept[i] <= layer.intermediate.dense.out_features:
            raise ValueError(f"layer {i}: cannot keep {heads_kept[i]} heads of {h} / {ffn_kept[i]} FFN neurons")
        # a fresh graph for every removal: groups computed before an earlier removal go stale
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        group = dg.get_pruning_group(att.query, tp.prune_linear_out_channels, idxs=list(range(h * d)))
        score = imp(group).view(h, d).sum(1)
        keep = sorted(score.argsort(descending=True)[:heads_kept[i]].tolist())
        gone = [k * d + r for k in range(h) if k not in keep for r in range(d)]
        if gone:
            dg.get_pruning_group(att.query, tp.prune_linear_out_channels, idxs=gone).prune()
            att.num_attention_heads, att.all_head_size = len(keep), len(keep) * d
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        inter = layer.intermediate.dense
        n = inter.out_features
        group = dg.get_pruning_group(inter, tp.prune_linear_out_channels, idxs=list(range(n)))
        score = imp(group)
        gone = sorted(score.argsort(descending=True)[ffn_kept[i]:].tolist())
        if gone:
            dg.get_pruning_group(inter, tp.prune_linear_out_channels, idxs=gone).prune()
    return model
