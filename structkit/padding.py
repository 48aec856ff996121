"""What ``round_to`` keeps: groups that would be zeroed for nothing, and dead groups kept as padding.

With ``prune.round_to = R`` the pruner removes, per layer, the largest number of its zero groups that leaves a width
divisible by R, and keeps the other zero groups as padding (structkit/structure/channels.py). Two consequences for a
``compress.target`` run, whose selection adds groups to the exact zeros until the cost meets the target:

* **groups zeroed for nothing.** An added group that the pruner keeps as padding saves no cost, yet it is zeroed:
  the slim model carries a dead channel where it could carry a trained one. :func:`drop_padding` keeps only as many
  added groups per layer as the pruner removes (the exact zeros count first, then the added groups in selection
  order), which leaves every width, and so the cost, unchanged.
* **dead padding.** When training itself zeroed (or shrank to nothing) more groups of a layer than rounding lets the
  pruner remove, the surplus stays in the slim model as channels whose weights are 0 -- at 1/2 of the quickstart
  CNN's MACs this left 1 to 15 live channels of the 16 in its first layer. Such a channel never comes back by
  training: with its BatchNorm scale at 0 its filter gets no gradient. :func:`revive_padding` re-initialises them
  (a fresh ``reset_parameters()`` of the same layers, seeded), so the fixed final stage
  (structkit/fixed_stage.py) trains them again.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["DEAD_RMS", "drop_padding", "reinitialise", "revive_padding"]

#: a group whose RMS is at most this fraction of the largest RMS in its layer counts as dead
DEAD_RMS = 1e-4


def drop_padding(groupset, added: list[int], exact_zero: torch.Tensor, removed: dict[str, int]) -> list[int]:
    """The groups of ``added`` (global ids, in selection order) that the pruner removes: per block with a count in
    ``removed`` (block label -> zero groups the pruner removed, as the prune report's ``removed_groups`` gives
    them, with ``added`` and the exact zeros zeroed), the first ``removed - exact zeros`` added groups of that
    block; blocks without a count keep all of theirs."""
    block_of = {}
    for block in groupset.blocks:
        for i in groupset.groups_of(block).tolist():
            block_of[i] = block
    budget = {}
    for block in groupset.blocks:
        if block.label in removed:
            budget[block.label] = removed[block.label] - int(exact_zero[groupset.groups_of(block)].sum())
    kept = []
    for i in added:
        label = block_of[i].label
        if label not in budget:
            kept.append(i)
        elif budget[label] > 0:
            budget[label] -= 1
            kept.append(i)
    return kept


def revive_padding(model: nn.Module, groupset, removed: dict[str, int], *, seed: int) -> list[int]:
    """Re-initialise, in place, the dead groups (exactly zero, or RMS <= ``DEAD_RMS`` x the largest in the block) that
    the pruner would keep as padding: per block with a count in ``removed``, every dead group beyond the ``removed``
    zero groups it removes (the pruner removes the first zero groups by index). Their entries get the values of a
    fresh ``reset_parameters()`` of a copy of ``model``, under ``torch.manual_seed(seed)``. Returns their ids."""
    rms = groupset.rms()
    zero_flags = groupset.zero_flags()
    zero = torch.cat(zero_flags)
    revive = torch.zeros(len(rms), dtype=torch.bool)
    for block in groupset.blocks:
        if block.label not in removed:
            continue
        ids = groupset.groups_of(block)
        padding = ids[zero[ids]][removed[block.label]:]  # the zero groups the pruner keeps
        revive[padding] = True
        tiny = ids[(~zero[ids]) & (rms[ids] <= DEAD_RMS * rms[ids].max())]
        revive[tiny] = True
    ids = revive.nonzero().flatten().tolist()
    reinitialise(model, groupset, ids, seed=seed)
    return ids


def reinitialise(model: nn.Module, groupset, ids: list[int], *, seed: int) -> None:
    """Give the groups ``ids`` (global ids), in place, the values a fresh ``reset_parameters()`` of a copy of
    ``model`` gives them under ``torch.manual_seed(seed)``; every other entry is left alone."""
    if not len(ids):
        return
    flags = groupset.flags_of(ids)
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in fresh.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    with torch.no_grad():
        for (_, t, mask), (_, new, _) in zip(groupset.entries(flags, model), groupset.entries(flags, fresh)):
            t[mask] = new.to(t.device, t.dtype)[mask]
