"""Stage-wise training: the schedule that RAMDA's structure guarantee relies on."""
from __future__ import annotations

from torch.optim import Optimizer


class StageScheduler:
    """Call :meth:`step` once per epoch. At each milestone epoch it starts a new stage:
    ``optimizer.restart(gamma)`` scales lr (and eps for RAMDA) by ``gamma`` and restarts the dual state at the
    current point (t = 0, alpha = 0, W0 = W, V = U = 0). The stage started at the last milestone ramps the
    averaging momentum to 1, so the iterate becomes ``W_hat`` -- whose exact zeros are the structure the model
    ends with. Plain torch optimizers (AdamW, SGD: the dense references) only get their lr scaled.

    ``milestones`` are epoch counts, strictly increasing and > 0 (e.g. ``[4]`` for 5 epochs: the 5th is the
    final stage). Give ``epochs`` and ``steps_per_epoch`` and the final stage's ramp reaches ``c = 1`` by the
    middle of that stage whatever the momentum (``ramp_steps`` = half the stage's steps; see
    ``StructuredOptimizer.restart``), so the second half runs at ``c = 1`` and its zero groups are exactly zero.
    Without them the ramp is the paper's ``min(c sqrt(t), 1)``, which needs ``1 / c^2`` steps (10,000 for
    ``c = 0.01``). :func:`final_stage_ramp_steps` gives the number and checks the schedule.
    """

    def __init__(self, optimizer: Optimizer, milestones=(), gamma: float = 0.1, ramp_final_stage: bool = True,
                 *, epochs: int | None = None, steps_per_epoch: int | None = None):
        milestones = list(milestones)
        if any(not isinstance(m, int) or m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"milestones must be strictly increasing positive epoch numbers, got {milestones}.")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0 (0.1 is typical), got {gamma}.")
        self.optimizer = optimizer
        self.milestones = milestones
        self.gamma = gamma
        self.ramp_final_stage = ramp_final_stage
        self.ramp_steps = None
        if (epochs is None) != (steps_per_epoch is None):
            raise ValueError("give both epochs and steps_per_epoch (to size the final stage's momentum ramp), or neither.")
        if epochs is not None and milestones and ramp_final_stage:
            self.ramp_steps = final_stage_ramp_steps(milestones, epochs, steps_per_epoch)
        self.epoch = 0

    def step(self) -> None:
        """Mark the end of an epoch; start a new stage if it is a milestone."""
        self.epoch += 1
        if self.epoch not in self.milestones:
            return
        final = self.ramp_final_stage and self.epoch == self.milestones[-1]
        if hasattr(self.optimizer, "restart"):
            self.optimizer.restart(self.gamma, momentum_ramp=final, ramp_steps=self.ramp_steps if final else None)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.gamma

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "milestones": list(self.milestones), "gamma": self.gamma,
                "ramp_final_stage": self.ramp_final_stage, "ramp_steps": self.ramp_steps}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.milestones = list(state["milestones"])
        self.gamma = state["gamma"]
        self.ramp_final_stage = state["ramp_final_stage"]
        self.ramp_steps = state.get("ramp_steps")


def final_stage_ramp_steps(milestones, epochs: int, steps_per_epoch: int) -> int:
    """Steps over which the final stage ramps the momentum to 1: half the final stage (at least 1). Raises
    ValueError, naming the fix, when the schedule has no final stage to ramp in."""
    if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an integer >= 1, got {steps_per_epoch!r}.")
    if not milestones:
        raise ValueError("no milestones: there is no final stage, so the momentum never ramps to 1 and the trained "
                         "weights have no exactly-zero groups. Set milestones, e.g. [epochs - 1].")
    final_epochs = epochs - milestones[-1]
    if final_epochs < 1:
        raise ValueError(f"the last milestone ({milestones[-1]}) is not before the last epoch ({epochs}): the final "
                         f"stage never runs, so no group becomes exactly zero. Use a last milestone <= {epochs - 1}.")
    final_steps = final_epochs * steps_per_epoch
    if final_steps < 2:
        raise ValueError(f"the final stage has {final_steps} step(s); it needs at least 2 (one to reach momentum 1, "
                         "one at 1). Train longer or with smaller batches.")
    return max(1, final_steps // 2)
