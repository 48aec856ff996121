"""Solvers: RAMDA and its baselines RMDA, ProxSGD, ProxGen -- each a ``torch.optim.Optimizer``.

>>> from structkit.solvers import RAMDA
>>> opt = RAMDA([{"params": convs, "regularizer": "group_lasso", "lam": 1e-3, "group_dim": 1},
...              {"params": rest}], lr=1e-2, momentum=1e-2)

``get_solver(name)`` also knows the dense references ``adamw`` and ``sgd`` (torch's own optimizers, which
ignore the structure keys of a param group).
"""
from __future__ import annotations

import difflib

import torch

from .base import StructuredOptimizer
from .proxgen import ProxGen
from .proxsgd import ProxSGD
from .ramda import RAMDA
from .rmda import RMDA
from .schedule import StageScheduler, final_stage_ramp_steps
from .subproblem import solve_subproblem

SOLVERS: dict[str, type[torch.optim.Optimizer]] = {
    "ramda": RAMDA, "rmda": RMDA, "proxsgd": ProxSGD, "proxgen": ProxGen,
    "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
}


def list_solvers() -> list[str]:
    return sorted(SOLVERS)


def get_solver(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class registered under ``name`` (case-insensitive)."""
    key = str(name).lower()
    if key in SOLVERS:
        return SOLVERS[key]
    close = difflib.get_close_matches(key, list(SOLVERS), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ValueError(f"unknown solver {name!r}.{hint} Available: {', '.join(list_solvers())}.")


__all__ = ["RAMDA", "RMDA", "ProxSGD", "ProxGen", "StageScheduler", "final_stage_ramp_steps", "StructuredOptimizer", "get_solver",
           "list_solvers", "solve_subproblem"]
