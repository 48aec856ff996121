"""Stage-wise training: the schedule that RAMDA's structure guarantee relies on."""
from __future__ import annotations

from torch.optim import Optimizer


class StageScheduler:
    """Call :meth:`step` once per epoch. At each milestone epoch it starts a new stage:
    ``optimizer.restart(gamma)`` scales lr (and eps for RAMDA) by ``gamma`` and restarts the dual state at the
    current point (t = 0, alpha = 0, W0 = W, V = U = 0). The stage started at the last milestone ramps the
    averaging momentum, ``c_t = min(c sqrt(t), 1)``, so the iterate becomes ``W_hat`` -- whose exact zeros
    are the structure the model ends with. Plain torch optimizers (AdamW, SGD: the dense references) only get
    their lr scaled.

    ``milestones`` are epoch counts, strictly increasing and > 0 (e.g. ``[4]`` for 5 epochs: the 5th is the
    final stage).
    """

    def __init__(self, optimizer: Optimizer, milestones=(), gamma: float = 0.1, ramp_final_stage: bool = True):
        milestones = list(milestones)
        if any(not isinstance(m, int) or m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"milestones must be strictly increasing positive epoch numbers, got {milestones}.")
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0 (0.1 is typical), got {gamma}.")
        self.optimizer = optimizer
        self.milestones = milestones
        self.gamma = gamma
        self.ramp_final_stage = ramp_final_stage
        self.epoch = 0

    def step(self) -> None:
        """Mark the end of an epoch; start a new stage if it is a milestone."""
        self.epoch += 1
        if self.epoch not in self.milestones:
            return
        final = self.ramp_final_stage and self.epoch == self.milestones[-1]
        if hasattr(self.optimizer, "restart"):
            self.optimizer.restart(self.gamma, momentum_ramp=final)
        else:
            for group in self.optimizer.param_groups:
                group["lr"] *= self.gamma

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "milestones": list(self.milestones), "gamma": self.gamma,
                "ramp_final_stage": self.ramp_final_stage}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.milestones = list(state["milestones"])
        self.gamma = state["gamma"]
        self.ramp_final_stage = state["ramp_final_stage"]
