r"""Compress to a target: ``compress.target`` asks for a model of a given cost -- MACs, parameters or ONNX Runtime
latency as a ratio ``r*`` of the dense model's -- and the run finds the regularization strength itself.

**During training** :class:`LamController` adapts lam. Every ``check_every`` solver steps it reads the structure
the solver is identifying, :meth:`StructuredOptimizer.identified_zeros` (for RAMDA and RMDA the zero groups of the
subproblem's solution at the current dual state; for ProxGen and ProxSGD the iterate's), measures the exact cost
ratio ``r`` of the model with those groups removed (:func:`removal_cost`: a CPU copy pruned by the same
dependency-graph pruner as the final model, without ``round_to``, counted by torch-pruning), and multiplies the lam of
every group-lasso param group by a factor. For RAMDA and RMDA it is read off the dual state
(:meth:`LamController._margin_factor`): lam x m zeroes exactly the groups whose margin
``||d z||_g / (tau w_g)`` is <= m, so the ``m`` whose structure costs ``(1 + 4 tolerance) r*`` is found by
bisection over the sorted margins, and lam moves by ``sqrt(m)`` (at most x2). It aims above the target because
the identified structure keeps growing after a check and a channel that went to zero rarely comes back (its
gradient dies at the ReLU); the final selection takes the last step. Proximal solvers have no margins:
:func:`lam_factor` steps lam towards the band ``[r*, (1 + 2 tolerance) r*]`` (up at most x1.15 per check,
x1.5 while nothing is identified; down at most x2). (For latency targets the controller steers
the MACs ratio, a proxy; the final selection measures latency.) lam lives in the solver's param groups, so it is
saved with the optimizer state and a resumed run continues with the adapted value. With
``compress.final_stage: fixed`` the final stage trains the selected structure with lam 0 (:mod:`structkit.fixed_stage`).

**After training** :func:`select_groups` removes exactly the groups needed: the groups in order of their RMS
(:meth:`GroupSet.rms`, divided by the layer's cost factor; the exact zeros first; the largest group of each block
never, so no layer is cut), and the
fewest ``k`` of them whose removal meets the target,
found by bisection on ``k`` (the cost does not increase with ``k``). Groups beyond the exact zeros are set to
zero in the trained model (a projection, reported as such); the pruner then removes them exactly, verified
against the projected model, and the fine-tune stage (``finetune.epochs``) recovers what the projection cost.
If the identified zeros alone already remove more than asked, nothing is added and the report says how far
below the target the model is.
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
from .prune import first_examples

__all__ = ["LamController", "Selection", "controller_for", "cost_factors", "cost_weighted", "removal_cost",
           "select_groups", "selection_for", "target_summary"]

SEARCH_FACTOR = 1.5  # lam's step up while the solver identifies no structure at all (ratio 1: searching)
UP_FACTOR = 1.15     # the most lam rises in one check once it does: dual averaging puts the active groups near the
                     # zero threshold, so the identified structure moves steeply with lam, and at a fixed lam it still
                     # grows as the stage goes on (the pull of the stage's start point fades)
AIM_MARGIN = 4       # the margin rule aims at (1 + 4 tolerance) x target: identified structure keeps growing after a
                     # check (the stage's start point fades, near-zero channels lose their gradient), and a group
                     # removed too early rarely comes back; the final selection takes the last step (measured on
                     # the quickstart CNN at macs 0.5: aiming at 1.05 x target ended at 0.40, at 1.2 x at 0.51)
DOWN_FACTOR = 2.0    # the most lam falls in one check: removing too much is what hurts (the final selection can
                     # remove more groups, never add one back), so an overshoot is corrected fast


def lam_factor(ratio: float, target: float, tolerance: float) -> float:
    """The controller's rule: aim at the band ``[target, (1 + 2 tolerance) target]``, just above the target, and
    leave the last step to the final selection. Above the band lam rises by ``ratio / upper`` (at most
    ``UP_FACTOR``, or ``SEARCH_FACTOR`` while nothing is identified); below the target it falls by
    ``ratio / target`` (at most ``DOWN_FACTOR``); inside, it stays."""
    upper = (1 + 2 * tolerance) * target
    if ratio > upper:
        return min(ratio / upper, SEARCH_FACTOR if ratio >= 1 else UP_FACTOR)
    if ratio < target:
        return max(ratio / target, 1 / DOWN_FACTOR)
    return 1.0


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


class LamController:
    """Adapts the lam of every group-lasso param group of ``solver`` until the structure it identifies meets
    ``target`` (module docstring). Call :meth:`after_step` after every solver step. Costs are counted without
    ``round_to`` (a smooth signal; rounding is the final selection's job)."""

    def __init__(self, solver, groupset, model: nn.Module, example_inputs: Any, *, metric: str, target: float,
                 tolerance: float, check_every: int):
        if metric not in ("macs", "params", "latency"):
            raise ValueError(f"metric must be macs, params or latency; got {metric!r}")
        self.solver, self.groupset, self.model = solver, groupset, model
        self.example_inputs = example_inputs
        self.metric = "macs" if metric == "latency" else metric  # latency: MACs steer training (a proxy)
        self.target, self.tolerance = float(target), float(tolerance)
        self.check_every = int(check_every)
        self.groups = [g for g in solver.param_groups if g.get("regularizer") == "group_lasso"]
        if not self.groups:
            raise ValueError("compress.target adapts the lam of group-lasso groups (kinds channels and heads), and "
                             "the structure rules declare none. Add a channels or heads rule.")
        self.last: dict[str, Any] = {}
        self.checks: list[list[float]] = []

    def after_step(self, step: int) -> None:
        if step % self.check_every == 0:
            self.check()

    def _ratio(self, ids) -> float:
        _, removal = removal_cost(self.model, self.groupset, self.example_inputs, ids, round_to=None)
        return removal.ratio(self.metric)

    @torch.no_grad()
    def check(self) -> dict[str, Any]:
        """Measure the identified structure's cost ratio and update lam; returns what it saw and did."""
        margins = self.groupset.solver_margins(self.solver)
        flags = margins <= 1 if margins is not None else self.groupset.solver_zero_flags(self.solver)
        ratio = self._ratio(flags.nonzero().flatten())
        factor = lam_factor(ratio, self.target, self.tolerance) if margins is None else self._margin_factor(margins)
        if factor != 1.0:
            for group in self.groups:
                group["lam"] *= factor
        self.last = {"identified_ratio": ratio, "identified_zero_groups": int(flags.sum()), "lam_factor": factor,
                     "lam": self.groups[0]["lam"]}
        self.checks.append([round(ratio, 4), self.groups[0]["lam"]])
        return self.last

    def _margin_factor(self, margins: torch.Tensor) -> float:
        """Dual averaging: lam x m zeroes exactly the groups with margin <= m, so the multiplier that makes the
        identified structure cost ``(1 + AIM_MARGIN tolerance) r*`` is read off the sorted margins -- the largest
        ``k`` whose removal keeps the ratio >= the aim, by bisection on ``k`` (each block's largest-margin group is never
        counted: no layer is cut) -- and ``m`` lies between the ``k``-th and ``(k+1)``-th margin. lam moves by
        ``sqrt(m)`` (damped: the margins drift as the stage goes on), at most x2 either way."""
        aim = (1 + AIM_MARGIN * self.tolerance) * self.target
        candidates = removable(self.groupset, margins) & torch.isfinite(margins)
        order = torch.argsort(torch.where(candidates, margins, math.inf), stable=True)[:int(candidates.sum())]
        if len(order) == 0:
            return 1.0
        # ratio(0) = 1 (nothing removed) is taken to meet the aim; k: the most groups whose removal still does
        below_aim = lambda k: self._ratio(order[:k]) < aim  # noqa: E731
        k = len(order) if not below_aim(len(order)) else first_meeting(0, len(order), below_aim) - 1
        values = margins[order]
        if k == 0:
            m = float(values[0]) * 0.99
        elif k == len(order):
            m = float(values[-1]) * 1.01
        else:
            m = math.sqrt(float(values[k - 1]) * float(values[k]))
        return min(max(math.sqrt(m), 1 / DOWN_FACTOR), DOWN_FACTOR)

    def epoch_summary(self) -> dict[str, Any]:
        """The last check, and ``checks``: [ratio, lam] of every check since the previous summary."""
        out, self.checks = {**self.last, "checks": self.checks}, []
        return out


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


def controller_for(config, solver, setup, steps_per_epoch: int) -> LamController | None:
    """The run's :class:`LamController` (None without ``compress.target``): ``compress.checks_per_epoch`` checks
    per epoch, on two of the set-up's example inputs."""
    c = config.compress
    if c.target is None:
        return None
    return LamController(solver, setup.groupset, setup.model, first_examples(setup.example_inputs, 2), metric=c.target.metric,
                         target=c.target.ratio, tolerance=c.tolerance,
                         check_every=max(1, steps_per_epoch // c.checks_per_epoch))


def selection_for(config, setup, revive_scores: torch.Tensor | None = None) -> Selection:
    """:func:`select_groups` for the run's target, on its trained model (ORT at ``target.batch`` with
    ``deploy.threads`` for a latency target)."""
    t = config.compress.target
    latency = ort_latency_ratio(t.batch, setup.example_inputs, threads=config.deploy.threads) \
        if t.metric == "latency" else None
    factors = cost_factors(setup.model, setup.groupset, first_examples(setup.example_inputs, 2), metric=t.metric,
                           exponent=config.compress.cost_exponent)
    return select_groups(setup.model, setup.groupset, first_examples(setup.example_inputs, 2), metric=t.metric, target=t.ratio,
                         tolerance=config.compress.tolerance, round_to=config.prune.round_to, latency=latency,
                         factors=factors, revive_scores=revive_scores)


def cost_weighted(config, setup):
    """``setup.groupset`` with every block's lam scaled by its :func:`cost_factors` (``compress.cost_exponent``),
    for a run with a target; else unchanged. The factors depend on the architecture only, so a resumed run gets
    the same param groups."""
    c = config.compress
    if c.target is None or c.cost_exponent == 0:
        return setup.groupset
    factors = cost_factors(setup.model, setup.groupset, first_examples(setup.example_inputs, 2), metric=c.target.metric,
                           exponent=c.cost_exponent)
    return setup.groupset.with_lam_factors(factors)
