import pytest
import torch

from structkit import solvers
from structkit.config import validate
from structkit.registry import Registry


def test_a_registry_refuses_a_taken_name_and_names_the_closest_for_an_unknown_one():
    things = Registry("thing", how="add your own with @register_thing")

    @things.register("alpha")
    def alpha():
        return 1

    assert things.get("alpha") is alpha and "alpha" in things and things.names() == ["alpha"] and len(things) == 1
    with pytest.raises(ValueError, match=r"a thing named 'alpha' is already registered \(.*alpha\); pick another"):
        things.register("alpha")(lambda: 2)
    assert things.get("alpha") is alpha
    things.add("alpha", print, replace=True)
    assert things.get("alpha") is print
    with pytest.raises(ValueError, match=r"unknown thing 'alpah'\. Did you mean 'alpha'\? Registered: alpha; "
                                         r"add your own with @register_thing\."):
        things.get("alpah")
    with pytest.raises(ValueError, match="non-empty name"):
        things.register("")


def test_a_copy_takes_registrations_of_its_own():
    things = Registry("thing")
    things.add("a", 1)
    other = things.copy()
    other.add("b", 2)
    assert list(other) == ["a", "b"] and list(things) == ["a"]


def test_a_registered_solver_is_usable_by_name_in_a_config(monkeypatch):
    monkeypatch.setattr(solvers, "SOLVERS", solvers.SOLVERS.copy())

    @solvers.register_solver("plain_sgd")
    class PlainSGD(torch.optim.SGD):
        pass

    assert solvers.get_solver("Plain_SGD") is PlainSGD and "plain_sgd" in solvers.list_solvers()
    cfg = validate({"model": {"name": "mlp"}, "data": {"name": "digits"}, "optimizer": {"name": "plain_sgd", "lr": 0.1},
                    "structure": [{"kind": "channels", "regularizer": "none"}]})
    assert cfg.optimizer.name == "plain_sgd"
    with pytest.raises(ValueError, match="already registered"):
        solvers.register_solver("ramda")(PlainSGD)
