r"""Which groups to remove to meet a cost target, and what a removal costs.

:func:`removal_cost` measures the exact cost of the model with some groups removed (a CPU copy pruned by the same
dependency-graph pruner as the final model, counted by torch-pruning); :func:`cost_factors` is what a group of each
block costs relative to the others.

:func:`select_groups` removes exactly the groups needed: the groups in order of their RMS (:meth:`GroupSet.rms`,
divided by the block's cost factor; the exact zeros first; the largest group of each block never, so no layer is
cut), and the fewest ``k`` of them whose removal meets the target, found by bisection on ``k`` (the cost does not
increase with ``k``; with ``round_to`` it falls in steps, and the report says when the nearest step lands more
than the tolerance below the target). Groups beyond the exact zeros are set to zero in the trained model (a
projection, reported as such); the pruner then removes them exactly, verified against the projected model, and the
fine-tune stage recovers what the projection cost. If the identified zeros alone already remove more than asked,
nothing is added and the report says how far below the target the model is (or, with ``revive_scores``, which
exact zeros to bring back).
"""
from __future__ import annotations

import copy
import functools
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .padding import drop_padding

__all__ = ["Removal", "Selection", "cost_factors", "first_meeting", "ort_latency_ratio", "removable", "removal_cost",
           "select_groups", "target_summary"]


@dataclass
class Removal:
    """What removing a set of groups leaves: counts before and after (torch-pruning's count, after round_to), and
    per block label the zero groups the pruner removed (the rest of them it kept as round_to padding)."""
    macs_before: float
    macs_after: float
    params_before: int
    params_after: int
    removed: dict[str, int] = field(default_factory=dict)

    def ratio(self, metric: str) -> float:
        if metric == "params":
            return self.params_after / self.params_before
        return self.macs_after / self.macs_before


def removal_cost(model: nn.Module, groupset, example_inputs: Any, ids, *, round_to: int | None,
                 alive=()) -> tuple[nn.Module, Removal]:
    """Prune a CPU copy of ``model`` with groups ``ids`` (global ids) set to zero, besides its exact zeros, and the
    groups ``alive`` (exact zeros that will be re-initialised) kept; return the slim copy and its counts. ``model``
    is not changed."""
    from .prune import prune

    probe = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for _, t, mask in groupset.entries(groupset.flags_of(alive), probe):
            t.masked_fill_(mask, 1.0)
    groupset.zero_(ids, model=probe)
    slim, report = prune(probe, groupset, example_inputs, round_to=round_to, inplace=True)
    removed = {name: layer["removed_groups"] for name, layer in report.layers.items() if "removed_groups" in layer}
    return slim, Removal(report.macs_before, report.macs_after, report.params_before, report.params_after, removed)


def cost_factors(model: nn.Module, groupset, example_inputs: Any, *, metric: str, exponent: float) -> dict[str, float]:
    """Cost-aware lam: per group-lasso block, ``(c_b / n_b) ** exponent`` normalised to mean 1 over the groups, with
    ``c_b`` the MACs (parameters for a ``params`` target) that removing one of its groups saves -- its own
    entries and what they feed, e.g. the next layer's input channel -- and ``n_b`` the regularized entries of a
    group. The group lasso alone charges a group for its entries (about its parameters); a MACs target wants
    the channels of high-resolution layers to cost more. Measured once on the architecture (a copy whose exact
    zeros are filled in, so no other group is removed alongside)."""
    if exponent == 0:
        return {}
    probe = copy.deepcopy(model).cpu().eval()
    with torch.no_grad():
        for p in probe.parameters():
            p.masked_fill_(p == 0, 1e-3)
    sizes = groupset.sizes()
    per_entry: dict[str, float] = {}
    counts: dict[str, int] = {}
    for block in groupset.blocks:
        if block.regularizer != "group_lasso":
            continue
        first = groupset.groups_of(block)[:1]
        _, removal = removal_cost(probe, groupset, example_inputs, first, round_to=None)
        saved = (removal.params_before - removal.params_after) if metric == "params" else \
            (removal.macs_before - removal.macs_after)
        per_entry[block.label] = max(float(saved), 1.0) / float(sizes[first[0]])
        counts[block.label] = block.num_groups
    if not per_entry:
        return {}
    weighted = {label: value ** exponent for label, value in per_entry.items()}
    mean = sum(weighted[label] * counts[label] for label in weighted) / sum(counts.values())
    return {label: value / mean for label, value in weighted.items()}


def first_meeting(lo: int, hi: int, meets: Callable[[int], bool]) -> int:
    """The smallest ``k`` in ``(lo, hi]`` with ``meets(k)``, by bisection: ``meets`` is monotone in ``k``, false at
    ``lo`` and true at ``hi`` (neither end is evaluated)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid
    return hi


def removable(groupset, scores: torch.Tensor) -> torch.Tensor:
    """False for the largest-``scores`` group of every block (never removed: that would cut the layer), True else."""
    allowed = torch.ones(len(scores), dtype=torch.bool)
    for block in groupset.blocks:
        ids = groupset.groups_of(block)
        allowed[ids[scores[ids].argmax()]] = False
    return allowed


@dataclass
class Selection:
    """The groups :func:`select_groups` removes and what that reaches."""
    metric: str
    target: float
    reached: float
    exact_zero_groups: int
    added_groups: int
    added_max_rms: float
    within_tolerance: bool
    note: str = ""
    revived_groups: int = 0
    added_ids: list[int] = field(default_factory=list, repr=False)
    revived_ids: list[int] = field(default_factory=list, repr=False)  # exact zeros to re-initialise (overshoot)
    removed: dict[str, int] = field(default_factory=dict, repr=False)  # Removal.removed of the selection

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("added_ids", "revived_ids", "removed"):
            out.pop(key)
        return out


def select_groups(model: nn.Module, groupset, example_inputs: Any, *, metric: str, target: float, tolerance: float,
                  round_to: int | None, latency: Callable[[nn.Module, nn.Module], float] | None = None,
                  factors: dict[str, float] | None = None, revive_scores: torch.Tensor | None = None) -> Selection:
    """The fewest groups, in RMS order (exact zeros first), whose removal meets ``target`` (module docstring).
    ``latency(dense, slim)`` measures the latency ratio for ``metric="latency"``; ``factors`` (block label -> the
    block's cost factor, :func:`cost_factors`) divide the RMS, so at equal RMS the costlier group goes first.
    ``revive_scores`` (one per group; higher = closer to coming back, e.g. RAMDA's zero margins): when the exact
    zeros alone fall more than ``tolerance`` below the target (training overshot) and training goes on, the most
    exact zeros, highest score first, whose return still leaves the cost at or below the target are given as
    ``revived_ids`` for the caller to re-initialise (:func:`structkit.padding.reinitialise`). Changes nothing."""
    rms = groupset.rms()
    if factors:
        scale = torch.ones_like(rms)
        for block in groupset.blocks:
            scale[groupset.groups_of(block)] = factors.get(block.label, 1.0)
        rms = rms / scale
    n_zero = int((rms == 0).sum())
    # the largest group of every block is never added: removing all of a layer's channels (or heads) cuts the
    # network; it goes last in the order, after every other candidate
    protected = ~removable(groupset, rms)
    order = torch.argsort(torch.where(protected & (rms > 0), math.inf, rms), stable=True)
    candidates = len(rms) - int((protected & (rms > 0)).sum())
    dense = copy.deepcopy(model).cpu().eval() if metric == "latency" else None

    # the exact zeros (order[:n_zero]) in the order they would come back: highest revive score first; those without
    # a finite score (groups of other regularizers) never come back (n_back: how many may)
    revival, n_back = None, 0
    if revive_scores is not None:
        scores = revive_scores[order[:n_zero]].double()
        revival = torch.argsort(torch.where(torch.isfinite(scores), -scores, math.inf), stable=True)
        n_back = int(torch.isfinite(scores).sum())
    revived: list[int] = []

    @functools.lru_cache(maxsize=None)
    def measured(k: int, j: int = 0) -> tuple[float, dict[str, int]]:  # each (k, j) measured once
        ids, alive = order[:k], ()
        if j:  # the first j exact zeros in revival order come back
            zeros = order[:n_zero][revival]
            ids, alive = torch.cat([zeros[j:], order[n_zero:k]]), zeros[:j]
        slim, removal = removal_cost(model, groupset, example_inputs, ids, round_to=round_to, alive=alive)
        return (latency(dense, slim) if metric == "latency" else removal.ratio(metric)), removal.removed

    def reached(k: int) -> float:
        return measured(k)[0]

    lo, r_lo = n_zero, reached(n_zero)
    note = ""
    if r_lo <= target:
        k, r = lo, r_lo
        if r < (1 - tolerance) * target and n_back and measured(n_zero, n_back)[0] > target:
            j = first_meeting(0, n_back, lambda j: measured(n_zero, j)[0] > target) - 1
            revived = order[:n_zero][revival[:j]].tolist()
            note = (f"the exactly-zero groups alone reach {r:.3f} < {target:.3f} (training removed more than asked); "
                    f"the {j} closest to coming back are re-initialised, which reaches {measured(n_zero, j)[0]:.3f}")
            r = measured(n_zero, j)[0]
        elif r < (1 - tolerance) * target:
            note = (f"the exactly-zero groups alone reach {r:.3f} < {target:.3f}: training removed more than asked "
                    "(the controller overshot; more steps after the final milestone, or more checks per epoch, "
                    "let it settle)")
    else:
        hi, r_hi = candidates, reached(candidates)
        if r_hi > target:
            k, r = hi, r_hi
            note = (f"removing every group but the largest of each layer reaches only {r:.3f} > {target:.3f}: the "
                    "declared structure cannot reach the target (declare more layers, or aim higher)")
        else:  # reached(lo) > target >= reached(hi)
            k = first_meeting(lo, hi, lambda k: reached(k) <= target)
            r = reached(k)
            if r < (1 - tolerance) * target:
                note = (f"the nearest removable step reaches {r:.3f}, more than {tolerance:.0%} below "
                        f"{target:.3f} (round_to={round_to} moves widths in steps; a smaller round_to is finer)")
    # only the added groups the pruner removes: the others would be zeroed and kept as round_to padding
    removed = measured(k, len(revived))[1]
    added = drop_padding(groupset, order[n_zero:k].tolist(), rms == 0, removed)
    return Selection(metric=metric, target=target, reached=r, exact_zero_groups=n_zero - len(revived),
                     added_groups=len(added), added_max_rms=float(rms[added].max()) if len(added) else 0.0,
                     within_tolerance=abs(r / target - 1) <= tolerance, note=note, revived_groups=len(revived),
                     added_ids=[int(i) for i in added], revived_ids=[int(i) for i in revived], removed=removed)


def ort_latency_ratio(batch: int, example_inputs: torch.Tensor, *, threads: int = 2, warmup: int = 5,
                      runs: int = 30) -> Callable[[nn.Module, nn.Module], float]:
    """A ``latency(dense, slim)`` for :func:`select_groups`: both exported to ONNX in a temporary folder and timed
    interleaved in ONNX Runtime at ``batch`` (median slim / median dense)."""
    from .deploy import export_onnx, measure_latency

    def latency(dense: nn.Module, slim: nn.Module) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for name, m in (("dense", dense), ("slim", slim)):
                paths[name] = Path(tmp) / f"{name}.onnx"
                export_onnx(m, example_inputs[:1], paths[name])
            x = example_inputs[:1].numpy()
            reps = math.ceil(batch / x.shape[0])
            feed = x.repeat(reps, axis=0)[:batch]
            result = measure_latency(paths, lambda b: {"input": feed}, [batch], threads=threads, warmup=warmup,
                                     runs=runs, graph_optimization="all")[str(batch)]
            return result["slim_p50_ms"] / result["dense_p50_ms"]

    return latency


def target_summary(selection: Selection) -> str:
    """One line for logs and the report."""
    line = (f"target {selection.metric} {selection.target:.3f}, reached {selection.reached:.3f} "
            f"({selection.exact_zero_groups} exactly-zero groups, {selection.added_groups} more removed, largest "
            f"RMS removed {selection.added_max_rms:.3g})")
    return line + (f"; {selection.note}" if selection.note else "")
