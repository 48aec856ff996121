"""Solvers: RAMDA and its baselines RMDA, ProxSGD, ProxGen -- each a ``torch.optim.Optimizer``.

>>> from structkit.solvers import RAMDA
>>> opt = RAMDA([{"params": convs, "regularizer": "group_lasso", "lam": 1e-3, "group_dim": 1},
...              {"params": rest}], lr=1e-2, momentum=1e-2)

``get_solver(name)`` also knows the dense references ``adamw`` and ``sgd`` (torch's own optimizers, which
ignore the structure keys of a param group).
"""
from __future__ import annotations

import torch

from ..registry import Registry
from .base import StructuredOptimizer
from .proxgen import ProxGen
from .proxsgd import ProxSGD
from .ramda import RAMDA
from .rmda import RMDA
from .schedule import StageScheduler, final_stage_ramp_steps
from .subproblem import solve_subproblem

SOLVERS: Registry[type[torch.optim.Optimizer]] = Registry("solver")
for _name, _cls in {"ramda": RAMDA, "rmda": RMDA, "proxsgd": ProxSGD, "proxgen": ProxGen,
                    "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}.items():
    SOLVERS.add(_name, _cls)
del _name, _cls


def register_solver(name: str, *, replace: bool = False):
    """Class decorator: ``@register_solver("my_solver")`` makes ``optimizer.name: my_solver`` usable in a config
    (names are lower case: :func:`get_solver` is case-insensitive). The class is built as
    ``cls(param_groups, **optimizer.solver_kwargs())``; a :class:`StructuredOptimizer` subclass also reads the
    structure keys (regularizer, lam, group_dim) of each param group. Reading a config builds the class once on a
    stand-in one-element parameter with the config's values, so that a value it refuses is a config error (a
    ``check_hyperparameters(values)`` classmethod, as :class:`StructuredOptimizer` has, lets the error name the field).
    A taken name is refused unless ``replace``."""
    if not isinstance(name, str) or name != name.lower():
        raise ValueError(f"a solver name is a lower-case string (get_solver is case-insensitive); got {name!r}")
    return SOLVERS.register(name, replace=replace)


def list_solvers() -> list[str]:
    return SOLVERS.names()


def get_solver(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class registered under ``name`` (case-insensitive)."""
    return SOLVERS.get(str(name).lower())


__all__ = ["RAMDA", "RMDA", "ProxSGD", "ProxGen", "StageScheduler", "final_stage_ramp_steps", "StructuredOptimizer", "get_solver",
           "list_solvers", "register_solver", "solve_subproblem"]
