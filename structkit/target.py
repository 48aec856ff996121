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

**After training** :func:`structkit.selection.select_groups` removes exactly the groups needed
(:func:`selection_for` runs it on the run's trained model).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .prune import first_examples
from .selection import (Selection, cost_factors, first_meeting, ort_latency_ratio, removable, removal_cost,
                        select_groups)

__all__ = ["LamController", "controller_for", "cost_weighted", "lam_factor", "selection_for"]

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
