"""``compress.final_stage: fixed`` -- the final stage of a ``compress.target`` run trains the selected structure.

A regularized final stage (``compress.final_stage: regularized``, the default) keeps the group lasso on until the
end, so every group that survives is still shrunk towards zero by ``tau w_g / ||W_g||``, and the final selection
(:func:`structkit.selection.select_groups`) may project more groups to zero after training. With ``fixed``:

1. at the start of the final stage (the epoch after the last milestone; the last epoch without milestones) the
   groups the target needs are chosen exactly as the final selection chooses them (the exact zeros, then the smallest
   RMS per cost factor, never a layer's last group, and only groups the pruner removes) and set to exactly zero;
   dead groups that ``round_to`` would keep as padding are re-initialised (structkit/padding.py). If training
   overshot (the exact zeros alone fall more than ``compress.tolerance`` below the target), the exact zeros closest
   to coming back (the zero margins of a step from there, highest first: RAMDA's / RMDA's dual state,
   ProxGen's moments) are re-initialised instead, as many as keep the
   cost at or below the target, so the stage starts at the target rather than below it. Kept groups that the
   solver is zeroing (margin <= 1: heading to zero, their gradient fading with them) are re-initialised as well;
2. the dual state restarts at that point (RAMDA/RMDA: the stage's start point must hold the zeros), the group
   lasso's lam (the lam the target adapts) goes to 0, so the surviving groups train unshrunk (RAMDA becomes MADGRAD, ProxGen Adam), and
3. the chosen groups stay exactly zero: their gradients are masked (so no solver state builds up on them) and they
   are set to zero again after every solver step.

The training therefore ends at the target with exact zeros, the pruner removes them with nothing projected, and the
identification phase (the stages before) is what the regularizer is for. A resumed run finds the fixed groups as
the exactly-zero groups of its checkpoint, so it continues the same way.
"""
from __future__ import annotations

from typing import Any

import torch

from .padding import reinitialise, revive_padding
from .selection import target_summary
from .target import selection_for

__all__ = ["FixedFinalStage", "fixed_stage_for"]


class FixedFinalStage:
    """Call :meth:`begin_epoch` before every training epoch and :meth:`close` when training ends."""

    def __init__(self, config, setup, solver):
        self.config, self.setup, self.solver = config, setup, solver
        milestones = config.optimizer.milestones
        self.first_epoch = milestones[-1] + 1 if milestones else config.schedule.epochs
        self.active = False
        self._handles: list[Any] = []

    def begin_epoch(self, epoch: int, log=print) -> None:
        if self.active or epoch < self.first_epoch:
            return
        groupset = self.setup.groupset
        if epoch == self.first_epoch:  # the stage starts here (also when a run resumes at this epoch)
            # an overshoot (more exact zeros than the target needs) is undone by re-initialising the zero groups
            # closest to coming back: highest margin of a step from here (RAMDA/RMDA: the dual state's; ProxGen:
            # its moments'; None for ProxSGD)
            margins = groupset.solver_margins(self.solver)
            selection = selection_for(self.config, self.setup,
                                      revive_scores=groupset.solver_margins(self.solver, step=True))
            seed = self.config.schedule.seed + epoch
            reinitialise(self.setup.model, groupset, selection.revived_ids, seed=seed)
            groupset.zero_(selection.added_ids)
            dying = sorted(set(dying_groups(groupset, margins)) - set(selection.revived_ids))
            reinitialise(self.setup.model, groupset, dying, seed=seed + 1)
            revived = revive_padding(self.setup.model, groupset, selection.removed, seed=seed)
            log(f"compress.final_stage fixed, from epoch {epoch}: {target_summary(selection)}; lam 0 from here on"
                + (f"; {len(dying)} kept group(s) the solver was zeroing re-initialised" if dying else "")
                + (f"; {len(revived)} dead group(s) that round_to keeps re-initialised" if revived else ""))
            for group in self.solver.param_groups:
                if group.get("regularizer") == "group_lasso":  # the groups the target's controller adapts
                    group["lam"] = 0.0
            ramp = self.solver.param_groups[0]
            if hasattr(self.solver, "restart"):  # the dual state restarts at the point with the zeros
                self.solver.restart(1.0, momentum_ramp=ramp.get("momentum_ramp", False),
                                    ramp_steps=ramp.get("ramp_steps"))
        # the zero groups of the group-lasso param groups (the first param groups are the GroupSet's, in order);
        # other rules (low rank, L1) keep their own regularizer and nothing of theirs is fixed
        flags = [f if group.get("regularizer") == "group_lasso" else torch.zeros_like(f)
                 for f, group in zip(groupset.zero_flags(), self.solver.param_groups)]
        self._fix(groupset.entries(flags, None))

    def _fix(self, entries) -> None:
        """Keep the entries of the exactly-zero groups at zero (``entries``: :meth:`GroupSet.entries`)."""
        params = dict(self.setup.model.named_parameters())
        fixed = [(params[name], mask) for name, _, mask in entries]
        for p, mask in fixed:
            self._handles.append(p.register_hook(lambda g, m=mask: g.masked_fill(m, 0)))

        @torch.no_grad()
        def rezero(*_):
            for p, mask in fixed:
                p.masked_fill_(mask, 0)

        self._handles.append(self.solver.register_step_post_hook(rezero))
        self.active = True

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self.active = [], False


def dying_groups(groupset, margins: torch.Tensor | None) -> list[int]:
    """The groups the target keeps (not exactly zero) that the solver is zeroing: zero margin <= 1, so the solution
    of its subproblem is zero and the averaged iterate is on its way there (RAMDA/RMDA; none without margins)."""
    if margins is None:
        return []
    kept = ~torch.cat(groupset.zero_flags())
    return (kept & (margins <= 1)).nonzero().flatten().tolist()


def fixed_stage_for(config, setup, solver) -> FixedFinalStage | None:
    """The run's :class:`FixedFinalStage`, or None (no target, or ``compress.final_stage: regularized``)."""
    c = config.compress
    if c.target is None or c.final_stage != "fixed":
        return None
    return FixedFinalStage(config, setup, solver)
