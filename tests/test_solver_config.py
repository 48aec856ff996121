"""Every hyperparameter value a solver refuses when it is built is refused by the config already, with a message
naming the field (``optimizer.momentum``, ``optimizer.options.eps``, ...), so a run never fails at its first step
on a value the config accepted (``momentum: 0`` did)."""
import math

import pytest
import torch

from structkit.config import ConfigError, validate
from structkit.solvers import StructuredOptimizer, get_solver, list_solvers

TOP_LEVEL = ("lr", "momentum")
BUILT_IN = ("adamw", "proxgen", "proxsgd", "ramda", "rmda", "sgd")


def _field(key: str) -> str:
    return f"optimizer.{key}" if key in TOP_LEVEL else f"optimizer.options.{key}"


def _config(name: str, **hyper) -> dict:
    optimizer = {"name": name, "milestones": [1]}
    for key, value in hyper.items():
        if key in TOP_LEVEL:
            optimizer[key] = value
        else:
            optimizer.setdefault("options", {})[key] = value
    return {"model": {"name": "mlp"}, "data": {"name": "digits"}, "optimizer": optimizer,
            "schedule": {"epochs": 2}, "structure": [{"kind": "channels", "lam": 1e-3}]}


def _refused_by_the_solver(name: str, key: str, value) -> bool:
    try:
        get_solver(name)([torch.zeros(2, requires_grad=True)], **{key: value})
    except (ValueError, TypeError):
        return True
    return False


def _range_cases():
    """(solver, key, value) for every range a structkit solver declares, at and beyond its ends."""
    bad = {"_positive": [0, -1.0, math.inf, math.nan], "_nonnegative": [-1e-3, math.inf, math.nan],
           "_unit_interval": [0, -0.1, 1.5, math.nan]}
    for name in BUILT_IN:
        solver = get_solver(name)
        if not issubclass(solver, StructuredOptimizer):
            continue
        for attr, values in bad.items():
            for key in getattr(solver, attr):
                if key == "lam":  # not a solver option in a config: optimizer.lam and the rules' lam (below)
                    continue
                for value in values:
                    yield name, key, value


EXTRA_CASES = [
    ("ramda", "subproblem", "newton"), ("proxgen", "subproblem", "fista"),
    ("proxgen", "betas", [1.0, 0.999]), ("proxgen", "betas", [0.9, -0.1]), ("proxgen", "betas", [0.9]),
    ("adamw", "eps", -1.0), ("adamw", "weight_decay", -0.1), ("adamw", "betas", [1.0, 0.9]),
    ("sgd", "momentum", -0.5), ("sgd", "weight_decay", -1.0), ("sgd", "nesterov", True),
]


def test_the_built_in_solvers_are_all_covered():
    assert set(BUILT_IN) <= set(list_solvers())


@pytest.mark.parametrize("name, key, value", [*_range_cases(), *EXTRA_CASES])
def test_a_value_the_solver_refuses_is_refused_by_the_config(name, key, value):
    assert _refused_by_the_solver(name, key, value), f"{name} accepts {key}={value!r}: not a refusal case"
    with pytest.raises(ConfigError) as err:
        validate(_config(name, **{key: value}))
    assert _field(key) in str(err.value), str(err.value)


@pytest.mark.parametrize("value", [-1e-3, math.inf, math.nan])
def test_a_lam_the_solvers_refuse_is_refused_in_optimizer_and_in_rules(value):
    assert _refused_by_the_solver("ramda", "lam", value)
    data = _config("ramda")
    data["optimizer"]["lam"] = value
    with pytest.raises(ConfigError, match=r"optimizer\.lam"):
        validate(data)
    data = _config("ramda")
    data["structure"][0]["lam"] = value
    with pytest.raises(ConfigError, match=r"structure\.0\.lam"):
        validate(data)


@pytest.mark.parametrize("name", BUILT_IN)
def test_each_solver_builds_from_a_config_it_validates(name):
    hyper = {"momentum": 0.1} if name in ("ramda", "rmda", "proxsgd", "sgd") else {}
    cfg = validate(_config(name, lr=0.01, **hyper))
    get_solver(cfg.optimizer.name)([torch.zeros(2, requires_grad=True)], **cfg.optimizer.solver_kwargs())


def test_momentum_zero_names_the_field_and_the_range():
    with pytest.raises(ConfigError) as err:
        validate(_config("ramda", momentum=0))
    assert "optimizer.momentum: Invalid momentum for RAMDA: 0.0; it must be in (0, 1]" in str(err.value)
