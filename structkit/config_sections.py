"""The config sections that name what is trained: ``model``, ``data`` (with ``data.split``) and ``optimizer``, each
checked against its registry (:mod:`structkit.models`, :mod:`structkit.data`, :mod:`structkit.solvers`) and the
signature of the builder, loader or solver it names. :class:`Section` is the base of every section.
"""
from __future__ import annotations

import inspect
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config_io import did_you_mean

__all__ = ["Section", "ModelConfig", "SplitConfig", "DataConfig", "OptimizerConfig", "check_options"]

#: structure keys of a param group: they come from the structure rules, not from optimizer.options
_STRUCTURE_KEYS = {"self", "params", "regularizer", "lam", "group_dim", "group_index"}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info) -> Any:
        """YAML ``true``/``false`` is not a number (pydantic would read it as 1/0)."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            args = set(getattr(annotation, "__args__", ()) or (annotation,))
            if args & {int, float} and bool not in args:
                raise ValueError(f"{info.field_name} must be a number, not the boolean {str(value).lower()}")
        return value


def check_options(builder: Any, options: dict[str, Any], what: str, given_by: dict[str, str]) -> None:
    """Reject keys of ``options`` that ``builder`` does not take (when its signature says so), naming the closest."""
    for key, source in given_by.items():
        if key in options:
            raise ValueError(f"{what}.options.{key} is set by {source}; drop it")
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if n not in given_by
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    for key in options:
        if key not in accepted:
            raise ValueError(f"{what}.options: {builder.__name__}() has no option {key!r}"
                             f"{did_you_mean(key, accepted)}; accepted: {', '.join(accepted) or 'none'}")


class ModelConfig(Section):
    """``model``: what to train, and the weights it starts from."""

    name: str = Field(description="a built-in model (structkit.models.list_models()), a torchvision "
                                  "classification model name, 'timm:<name>' (the zoo extra), or "
                                  "'package.module:callable'")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the model builder")
    init: str = Field("random", min_length=1,
                      description="random, pretrained (torchvision/timm weights from the local cache; never "
                                  "downloaded), or the path of a state dict / checkpoint / structkit run folder")

    @field_validator("name")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from . import zoo
        from .models import list_models
        if value in list_models():
            return value
        if zoo.is_timm(value):
            try:
                return zoo.check_timm_name(value)
            except ImportError as err:
                raise ValueError(str(err)) from None
        if ":" in value:
            _import(value, "model")
            return value
        known = list_models() + zoo.torchvision_names()
        if value not in known:
            raise ValueError(f"unknown model {value!r}{did_you_mean(value, known)}; use a built-in "
                             f"({', '.join(list_models())}), a torchvision classification model name, 'timm:<name>', "
                             f"or 'package.module:callable' for your own builder")
        return value

    @model_validator(mode="after")
    def _known_options(self) -> ModelConfig:
        from . import zoo
        from .models import list_models, model_builder
        given_by = {"input_shape": "the data set", "num_classes": "the data set", "init": "model.init"}
        if self.name in list_models():
            check_options(model_builder(self.name), self.options, "model", given_by)
        elif zoo.is_timm(self.name):  # timm.create_model takes **kwargs: only the keys structkit sets are checked
            check_options(zoo.require_timm().create_model, self.options, "model",
                           {**zoo.TIMM_RESERVED, "init": "model.init"})
        elif ":" in self.name:
            check_options(_import(self.name, "model"), self.options, "model", given_by)
        else:
            import torchvision.models
            check_options(torchvision.models.get_model_builder(self.name), self.options, "model",
                           {"num_classes": "the data set", "weights": "model.init", "init": "model.init"})
        if self.init == "pretrained" and not zoo.has_pretrained(self.name):
            raise ValueError(f"model.init: pretrained: {self.name!r} has no pretrained weights (only torchvision and "
                             f"timm models have them); set model.init to the path of a state dict, or to random")
        return self


class SplitConfig(Section):
    """``data.split``: for a 'package.module:callable' data set, how the validation and test splits it does not
    return are carved out of its training set."""

    val_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of the training set held out for validation")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="fraction of the training set held out for testing")
    seed: int = Field(0, ge=0, description="seed of the held-out examples")

    @model_validator(mode="after")
    def _leaves_training(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must leave training examples; got {self.val_fraction} + "
                             f"{self.test_fraction}")
        return self


class DataConfig(Section):
    """``data``: which data set, its loader options, and how it is read."""

    name: str = Field(description="a registered data set (structkit.data.list_datasets(): fashion_mnist, digits, "
                                  "image_folder) or 'package.module:callable' returning Datasets")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="keyword arguments of the data set loader (root, transforms, ...)")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes that read and transform examples "
                                                  "(0 = in the training process)")
    split: SplitConfig | None = Field(None, description="'package.module:callable' data sets only: fractions of "
                                                        "its training set held out when it returns no val/test set")

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        from .data import list_datasets
        if value in list_datasets():
            return value
        if ":" in value:
            _import(value, "data set")
            return value
        known = list_datasets()
        raise ValueError(f"unknown data set {value!r}{did_you_mean(value, known)}; registered: {', '.join(known)}; "
                         f"or 'package.module:callable' for your own")

    @model_validator(mode="after")
    def _known_options(self) -> DataConfig:
        from .data import dataset_loader, list_datasets
        loader = dataset_loader(self.name)
        check = getattr(loader, "check_options", None)
        if check is not None:
            check(self.options)
        else:
            check_options(loader, self.options, "data", {})
        if self.split is not None and self.name in list_datasets():
            raise ValueError(f"data.split applies to 'package.module:callable' data sets; {self.name} takes its split "
                             f"options in data.options")
        return self


def _import(name: str, what: str) -> Any:
    """``package.module:callable`` imported at config time; every failure is a ValueError (a config error)."""
    from ._imports import import_callable
    try:
        return import_callable(name, what)
    except TypeError as err:
        raise ValueError(str(err)) from None


class OptimizerConfig(Section):
    """``optimizer``: the solver, its hyperparameters and the stage milestones."""

    name: str = Field("ramda", description="solver: ramda, rmda, proxsgd, proxgen, adamw, sgd")
    lr: float | None = Field(None, gt=0, allow_inf_nan=False, description="learning rate; None = the solver's default")
    momentum: float | None = Field(None, ge=0, le=1, description="momentum / averaging weight (ramda, rmda, proxsgd: "
                                                                 "in (0, 1], 0.1 is typical); None = the solver's default")
    lam: float | None = Field(None, ge=0, allow_inf_nan=False, description="default lam for structure rules that give "
                                                                           "none (e.g. 1.0e-4 .. 1.0e-3)")
    options: dict[str, Any] = Field(default_factory=dict, description="other keyword arguments of the solver")
    milestones: list[int] = Field(default_factory=list,
                                  description="epochs after which a new stage starts (restart; the last one ramps "
                                              "the momentum to 1 so exact zeros appear)")
    gamma: float = Field(0.1, gt=0, allow_inf_nan=False, description="lr (and eps) factor at each milestone")

    @field_validator("name")
    @classmethod
    def _known_solver(cls, value: str) -> str:
        from .solvers import list_solvers
        key = value.lower()
        if key not in list_solvers():
            raise ValueError(f"unknown solver {value!r}{did_you_mean(key, list_solvers())}; "
                             f"accepted: {', '.join(list_solvers())}")
        return key

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(m <= 0 for m in value) or value != sorted(set(value)):
            raise ValueError(f"milestones must be strictly increasing epoch numbers > 0 (e.g. [4] for 5 epochs); "
                             f"got {value}")
        return value

    @model_validator(mode="after")
    def _solver_accepts(self) -> OptimizerConfig:
        from .solvers import get_solver
        accepted = [p for p in inspect.signature(get_solver(self.name).__init__).parameters if p not in _STRUCTURE_KEYS]
        if self.momentum is not None and "momentum" not in accepted:
            raise ValueError(f"solver {self.name!r} takes no momentum; drop optimizer.momentum "
                             f"(its hyperparameters: {', '.join(accepted)})")
        for key in self.options:
            if key in ("lr", "momentum"):
                raise ValueError(f"give {key} as optimizer.{key}, not in optimizer.options")
            if key in _STRUCTURE_KEYS:
                raise ValueError(f"optimizer.options.{key} is not a solver option: regularizer, lam and groups come "
                                 f"from the structure rules")
            if key not in accepted:
                raise ValueError(f"solver {self.name!r} has no option {key!r}{did_you_mean(key, accepted)}; "
                                 f"accepted: {', '.join(a for a in accepted if a not in ('lr', 'momentum'))}")
        self._solver_takes_values()
        return self

    def _solver_takes_values(self) -> None:
        """Every value the solver would refuse when built is refused here, naming the field: its own range checks
        one by one (a structkit solver's ``check_hyperparameters``), then a build on a stand-in parameter (what
        depends on several values, and all of torch's own optimizers' checks)."""
        import torch

        from .solvers import get_solver
        solver, kwargs = get_solver(self.name), self.solver_kwargs()

        def field(key: str) -> str:
            return f"optimizer.{key}" if key in ("lr", "momentum") else f"optimizer.options.{key}"

        check = getattr(solver, "check_hyperparameters", None)
        for key, value in kwargs.items():
            try:
                if check is not None:
                    check({key: value})
            except ValueError as err:
                raise ValueError(f"{field(key)}: {err}") from None
        try:
            solver([torch.zeros(1, requires_grad=True)], **kwargs)
        except (ValueError, TypeError) as err:  # name the field when the message names one key ("beta" for betas)
            named = [key for key in kwargs if re.search(rf"\b{re.escape(key.rstrip('s') or key)}", str(err), re.I)]
            where = f"{field(named[0])}: " if len(named) == 1 else ""
            raise ValueError(f"{where}solver {self.name!r} refuses these hyperparameters: {err}") from None

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the solver class (unset lr/momentum fall back to the solver's defaults)."""
        kwargs = dict(self.options)
        if self.lr is not None:
            kwargs["lr"] = self.lr
        if self.momentum is not None:
            kwargs["momentum"] = self.momentum
        return kwargs
