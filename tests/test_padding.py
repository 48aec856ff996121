"""round_to padding (structkit/padding.py): the selection zeroes only groups the pruner removes, and the dead groups
that rounding keeps are re-initialised, deterministically."""
import copy
import math

import torch

from structkit.padding import drop_padding, reinitialise, revive_padding
from structkit.prune import prune
from structkit.selection import select_groups
from tests.test_target import _cnn, _groups


def _zero_per_block(gs, model=None):
    flags = torch.cat(gs.zero_flags(model))
    return {b.label: int(flags[gs.groups_of(b)].sum()) for b in gs.blocks}


def test_drop_padding_keeps_per_block_only_the_added_groups_the_pruner_removes():
    model = _cnn()
    gs, _ = _groups(model)
    a, b = (gs.groups_of(blk).tolist() for blk in gs.blocks[:2])
    exact = torch.zeros(len(gs), dtype=torch.bool)
    exact[a[:3]] = True
    added = a[3:13] + b[:5] + gs.groups_of(gs.blocks[2]).tolist()[:2]
    kept = drop_padding(gs, added, exact, {gs.blocks[0].label: 8, gs.blocks[1].label: 5})
    # block 0: 8 removed, 3 of them exact zeros -> the first 5 added; block 1: all 5; block 2 has no count: kept
    assert kept == a[3:8] + b[:5] + gs.groups_of(gs.blocks[2]).tolist()[:2]


def test_selection_with_round_to_zeroes_no_group_the_pruner_keeps():
    model = _cnn()
    gs, x = _groups(model)
    sel = select_groups(model, gs, x, metric="macs", target=0.5, tolerance=0.05, round_to=8)
    probe = copy.deepcopy(model)
    gs.zero_(sel.added_ids, model=probe)
    zeros = _zero_per_block(gs, probe)
    _, report = prune(probe, gs, x, round_to=8, inplace=True)
    removed = {name: layer["removed_groups"] for name, layer in report.layers.items()}
    assert sum(zeros.values()) > 0 and zeros == {k: removed[k] for k in zeros}  # every zeroed group is removed
    assert sel.removed == removed and report.macs_after / report.macs_before == sel.reached <= 0.5


def test_revive_padding_reinitialises_the_dead_groups_rounding_keeps_and_only_those():
    model = _cnn()
    gs, x = _groups(model)
    ids = gs.groups_of(gs.blocks[1]).tolist()  # 24 channels; round_to 8 removes 16 of 20 zeros
    gs.zero_(ids[:20])
    with torch.no_grad():  # a near-zero group counts as dead too
        model[3].weight[21].mul_(1e-6)
        model[3].bias[21].mul_(1e-6)
        model[4].weight[21].mul_(1e-6)
        model[4].bias[21].mul_(1e-6)
    twin = copy.deepcopy(model)
    revived = revive_padding(model, gs, {gs.blocks[1].label: 16}, seed=3)
    assert revived == ids[16:20] + [ids[21]]
    zero = torch.cat(gs.zero_flags())
    assert zero[ids[:16]].all() and not zero[ids[16:]].any()
    assert model[4].weight[16].item() == 1.0 and model[4].bias[16].item() == 0.0  # a fresh BatchNorm
    assert torch.equal(model[3].weight[22], twin[3].weight[22])  # live groups untouched
    assert not torch.equal(model[3].weight[21], twin[3].weight[21])
    gs_twin, _ = _groups(twin)
    assert revive_padding(twin, gs_twin, {gs_twin.blocks[1].label: 16}, seed=3) == revived
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))  # seeded: the same values
    _, report = prune(model, gs, x, round_to=8)
    assert report.layers[gs.blocks[1].label]["removed_groups"] == 16 and report.layers[gs.blocks[1].label]["after"] == 8


def test_an_overshoot_is_undone_by_reviving_the_zero_groups_closest_to_coming_back():
    model = _cnn()
    gs, x = _groups(model)
    n = len(gs)
    overshoot = [i for b in gs.blocks for i in gs.groups_of(b).tolist()[:-2]]  # all but 2 groups of every layer
    gs.zero_(overshoot)
    scores = torch.rand(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plain = select_groups(model, gs, x, metric="macs", target=0.5, tolerance=0.05, round_to=None)
    assert plain.reached < 0.2 and plain.revived_ids == [] and "removed more than asked" in plain.note
    sel = select_groups(model, gs, x, metric="macs", target=0.5, tolerance=0.05, round_to=None, revive_scores=scores)
    assert sel.revived_groups == len(sel.revived_ids) > 0 and sel.added_ids == []
    assert set(sel.revived_ids) <= set(overshoot)
    # the highest scores among the exact zeros come back first
    ranked = sorted(overshoot, key=lambda i: -float(scores[i]))
    assert sel.revived_ids == ranked[:len(sel.revived_ids)]
    assert sel.reached <= 0.5 and sel.exact_zero_groups == len(overshoot) - sel.revived_groups
    # maximal: one more revival would exceed the target
    probe = copy.deepcopy(model)
    probe_gs, _ = _groups(probe)
    reinitialise(probe, probe_gs, ranked[:len(sel.revived_ids) + 1], seed=0)
    _, over = prune(probe, probe_gs, x, round_to=None)
    assert over.macs_after / over.macs_before > 0.5
    # the revival the fixed stage does reaches exactly what the selection says
    reinitialise(model, gs, sel.revived_ids, seed=0)
    zero = torch.cat(gs.zero_flags())
    assert not zero[sel.revived_ids].any() and zero.sum() == len(overshoot) - sel.revived_groups
    _, report = prune(model, gs, x, round_to=None)
    assert report.macs_after / report.macs_before == sel.reached


def test_dying_groups_are_the_kept_groups_the_solver_is_zeroing():
    from structkit.fixed_stage import dying_groups
    model = _cnn()
    gs, _ = _groups(model)
    gs.zero_([0, 1])
    margins = torch.full((len(gs),), 2.0, dtype=torch.float64)
    margins[[0, 1, 5, 7]] = 0.5   # 0, 1: exact zeros (removed, not dying); 5, 7: kept but heading to zero
    margins[9] = 1.0              # the prox zeroes at margin <= 1
    assert dying_groups(gs, margins) == [5, 7, 9]
    assert dying_groups(gs, None) == []  # proximal solvers: no margins, nothing re-initialised


def test_zero_groups_without_a_finite_revive_score_never_come_back():
    model = _cnn()
    gs, x = _groups(model)
    overshoot = [i for b in gs.blocks for i in gs.groups_of(b).tolist()[:-2]]
    gs.zero_(overshoot)
    scores = torch.linspace(0.1, 0.9, len(gs), dtype=torch.float64)
    other = gs.groups_of(gs.blocks[0]).tolist()  # e.g. a rule with another regularizer: no margin (inf)
    scores[other] = math.inf
    sel = select_groups(model, gs, x, metric="macs", target=0.5, tolerance=0.05, round_to=None, revive_scores=scores)
    assert len(sel.revived_ids) > 0 and not set(sel.revived_ids) & set(other)
    assert sel.revived_ids == sorted(set(overshoot) - set(other), key=lambda i: -float(scores[i]))[:len(sel.revived_ids)]
