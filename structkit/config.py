"""The run configuration: one pydantic schema for YAML files and Python.

>>> cfg = load_config("configs/digits.yaml", overrides=["optimizer.lr=0.02", "structure.0.lam=1e-3"])
>>> cfg = Config(model={"name": "mlp"}, data={"name": "digits"}, structure=[{"kind": "channels", "lam": 1e-3}])

Every section rejects unknown keys; :func:`load_config` turns pydantic's errors into one :class:`ConfigError`
whose lines name the field, the bad value and what is accepted (with the closest key for a misspelt one).
``docs/configuration.md`` lists every field with its default.
"""
from __future__ import annotations

import difflib
import hashlib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .structure.rules import StructureRule

__all__ = ["Config", "ModelConfig", "DataConfig", "SplitConfig", "OptimizerConfig", "ScheduleConfig", "PruneConfig", "FinetuneConfig",
           "DeployConfig", "ConfigError", "load_config", "validate", "apply_overrides", "parse_yaml", "training_hash",
           "training_view", "TRAINING_SECTIONS"]

#: the sections that decide the training trajectory; a checkpoint is only resumed under the same values
TRAINING_SECTIONS = ("model", "data", "optimizer", "schedule", "structure", "compress")
#: structure keys of a param group: they come from the structure rules, not from optimizer.options
_STRUCTURE_KEYS = {"self", "params", "regularizer", "lam", "group_dim", "group_index"}
#: schedule keys that do not decide the trajectory (left out of the training hash)
_NOT_TRAJECTORY = ("threads", "device")


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem, one per line."""


class _Section(BaseModel):
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


def _check_options(builder: Any, options: dict[str, Any], what: str, given_by: dict[str, str]) -> None:
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
                             f"{_did_you_mean(key, accepted)}; accepted: {', '.join(accepted) or 'none'}")


class ModelConfig(_Section):
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
            raise ValueError(f"unknown model {value!r}{_did_you_mean(value, known)}; use a built-in "
                             f"({', '.join(list_models())}), a torchvision classification model name, 'timm:<name>', "
                             f"or 'package.module:callable' for your own builder")
        return value

    @model_validator(mode="after")
    def _known_options(self) -> ModelConfig:
        from . import zoo
        from .models import list_models, model_builder
        given_by = {"input_shape": "the data set", "num_classes": "the data set", "init": "model.init"}
        if self.name in list_models():
            _check_options(model_builder(self.name), self.options, "model", given_by)
        elif zoo.is_timm(self.name):  # timm.create_model takes **kwargs: only the keys structkit sets are checked
            _check_options(zoo.require_timm().create_model, self.options, "model",
                           {**zoo.TIMM_RESERVED, "init": "model.init"})
        elif ":" in self.name:
            _check_options(_import(self.name, "model"), self.options, "model", given_by)
        else:
            import torchvision.models
            _check_options(torchvision.models.get_model_builder(self.name), self.options, "model",
                           {"num_classes": "the data set", "weights": "model.init", "init": "model.init"})
        if self.init == "pretrained" and not zoo.has_pretrained(self.name):
            raise ValueError(f"model.init: pretrained: {self.name!r} has no pretrained weights (only torchvision and "
                             f"timm models have them); set model.init to the path of a state dict, or to random")
        return self


class SplitConfig(_Section):
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


class DataConfig(_Section):
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
        raise ValueError(f"unknown data set {value!r}{_did_you_mean(value, known)}; registered: {', '.join(known)}; "
                         f"or 'package.module:callable' for your own")

    @model_validator(mode="after")
    def _known_options(self) -> DataConfig:
        from .data import dataset_loader, list_datasets
        loader = dataset_loader(self.name)
        check = getattr(loader, "check_options", None)
        if check is not None:
            check(self.options)
        else:
            _check_options(loader, self.options, "data", {})
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


class OptimizerConfig(_Section):
    """``optimizer``: the solver, its hyperparameters and the stage milestones."""

    name: str = Field("ramda", description="solver: ramda, rmda, proxsgd, proxgen, adamw, sgd")
    lr: float | None = Field(None, description="learning rate; None = the solver's default")
    momentum: float | None = Field(None, description="momentum / averaging weight; None = the solver's default")
    lam: float | None = Field(None, description="default lam for structure rules that give none")
    options: dict[str, Any] = Field(default_factory=dict, description="other keyword arguments of the solver")
    milestones: list[int] = Field(default_factory=list,
                                  description="epochs after which a new stage starts (restart; the last one ramps "
                                              "the momentum to 1 so exact zeros appear)")
    gamma: float = Field(0.1, description="lr (and eps) factor at each milestone")

    @field_validator("name")
    @classmethod
    def _known_solver(cls, value: str) -> str:
        from .solvers import list_solvers
        key = value.lower()
        if key not in list_solvers():
            raise ValueError(f"unknown solver {value!r}{_did_you_mean(key, list_solvers())}; "
                             f"accepted: {', '.join(list_solvers())}")
        return key

    @field_validator("lr")
    @classmethod
    def _positive_lr(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr must be a finite number > 0 (e.g. 0.01); got {value}")
        return value

    @field_validator("momentum")
    @classmethod
    def _unit_momentum(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"momentum must be in [0, 1] (0.1 is typical for ramda); got {value}")
        return value

    @field_validator("lam")
    @classmethod
    def _nonnegative_lam(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"lam must be a finite number >= 0 (e.g. 1.0e-4 .. 1.0e-3); got {value}")
        return value

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(m <= 0 for m in value) or value != sorted(set(value)):
            raise ValueError(f"milestones must be strictly increasing epoch numbers > 0 (e.g. [4] for 5 epochs); "
                             f"got {value}")
        return value

    @field_validator("gamma")
    @classmethod
    def _positive_gamma(cls, value: float) -> float:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"gamma must be a number > 0 (0.1 is typical); got {value}")
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
                raise ValueError(f"solver {self.name!r} has no option {key!r}{_did_you_mean(key, accepted)}; "
                                 f"accepted: {', '.join(a for a in accepted if a not in ('lr', 'momentum'))}")
        return self

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the solver class (unset lr/momentum fall back to the solver's defaults)."""
        kwargs = dict(self.options)
        if self.lr is not None:
            kwargs["lr"] = self.lr
        if self.momentum is not None:
            kwargs["momentum"] = self.momentum
        return kwargs


class ScheduleConfig(_Section):
    """``schedule``: how long and how to train."""

    epochs: int = Field(5, description="training epochs")
    batch_size: int = Field(128, description="training batch size")
    eval_batch_size: int = Field(1024, description="batch size for evaluation and BatchNorm recalibration")
    seed: int = Field(0, description="seed of model initialisation, batch order and recalibration batches")
    bn_recalibration_batches: int = Field(20, description="training batches used to recompute BatchNorm "
                                                          "statistics before every evaluation (0 = off)")
    device: str = Field("auto", description="where training runs: auto (cuda when torch.cuda.is_available(), "
                                            "else cpu), cpu, cuda or cuda:N; compress, export and bench always "
                                            "run on the CPU")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: forward under autocast on the run's "
                                                                   "device, parameters and solver state in fp32")
    threads: int | None = Field(None, description="torch intra-op threads for training and evaluation; null = "
                                                  "torch's default (one per core)")

    @field_validator("epochs", "batch_size", "eval_batch_size")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be an integer >= 1; got {value}")
        return value

    @field_validator("device", mode="before")
    @classmethod
    def _device(cls, value: Any) -> str:
        from .device import check_spec  # the format only: whether CUDA is there is checked when training starts
        if not isinstance(value, str):
            raise ValueError(f"device must be a string: auto, cpu, cuda or cuda:N; got {value!r}")
        return check_spec(value)

    @field_validator("threads")
    @classmethod
    def _threads(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"threads must be an integer >= 1 or null (torch's default); got {value}")
        return value

    @field_validator("bn_recalibration_batches", "seed")
    @classmethod
    def _nonnegative(cls, value: int, info) -> int:
        if value < 0:
            raise ValueError(f"{info.field_name} must be an integer >= 0; got {value}")
        return value


class PruneConfig(_Section):
    """``prune``: removing the exact zeros."""

    round_to: int | None = Field(None, description="keep zero channels so every pruned width is a multiple of "
                                                   "this (8 or 16 suit ONNX Runtime's convolutions); null = off")
    verify_tol: float = Field(1e-5, description="largest allowed relative difference between slim and trained "
                                                "outputs: max |slim - trained| / (max |trained output| + 1e-12), in "
                                                "the model's dtype (float32 rounding gives about 1e-7 to 1e-6)")
    verify_examples: int = Field(256, description="validation examples used to verify the slim model")

    @field_validator("round_to")
    @classmethod
    def _positive_round(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"round_to must be an integer >= 1 (e.g. 8 or 16) or null; got {value}")
        return value

    @field_validator("verify_tol")
    @classmethod
    def _nonnegative_tol(cls, value: float) -> float:
        if not value >= 0:
            raise ValueError(f"verify_tol must be >= 0; got {value}")
        return value

    @field_validator("verify_examples")
    @classmethod
    def _positive_examples(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"verify_examples must be >= 1; got {value}")
        return value


class FinetuneConfig(_Section):
    """``finetune``: train the slim model after pruning (0 epochs = off). The epochs count in the run's budget."""

    epochs: int = Field(0, ge=0, description="fine-tuning epochs of the slim model after pruning; 0 = none")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate, decayed to 0 by a cosine schedule")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    distill: bool = Field(False, description="knowledge distillation from the trained dense model: the loss mixes "
                                             "cross entropy with T^2 KL(teacher || student) on logits at temperature T")
    temperature: float = Field(4.0, gt=0, description="distillation temperature T")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation term (1 - alpha: cross entropy)")


class TargetConfig(_Section):
    """``compress.target``: exactly one cost, as a ratio of the dense model's (e.g. ``macs: 0.5``)."""

    macs: float | None = Field(None, gt=0, lt=1, description="multiply-accumulates of the slim model / dense")
    params: float | None = Field(None, gt=0, lt=1, description="parameters of the slim model / dense")
    latency: float | None = Field(None, gt=0, lt=1, description="ONNX Runtime median latency of the slim model / "
                                                                "dense, at batch size `batch`, deploy.threads threads")
    batch: int = Field(64, ge=1, description="batch size of a latency target")

    @model_validator(mode="after")
    def _exactly_one(self) -> TargetConfig:
        given = [k for k in ("macs", "params", "latency") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of macs, params, latency (a ratio of the dense model in (0, 1), e.g. "
                             f"macs: 0.5); got {', '.join(given) or 'none'}")
        return self

    @property
    def metric(self) -> str:
        return next(k for k in ("macs", "params", "latency") if getattr(self, k) is not None)

    @property
    def ratio(self) -> float:
        return getattr(self, self.metric)


class CompressConfig(_Section):
    """``compress``: aim at a cost target instead of a hand-tuned lam (structkit/target.py has the method)."""

    target: TargetConfig | None = Field(None, description="null: remove the exact zeros the training found")
    tolerance: float = Field(0.05, gt=0, lt=1, description="how far below the target the reached ratio may be")
    checks_per_epoch: int = Field(8, ge=1, description="how often per epoch the lam controller measures the "
                                                       "identified structure and adapts lam")
    cost_exponent: float = Field(0.5, ge=0, le=2, description="cost-aware lam: each block's lam is scaled by (cost "
                                 "its groups carry per entry) ** cost_exponent, normalised; 0 = plain group lasso")


class DeployConfig(_Section):
    """``deploy``: ONNX export and the ONNX Runtime latency protocol."""

    opset: int = Field(18, description="ONNX opset version")
    exporter: Literal["torchscript", "dynamo"] = Field("torchscript", description="torch.onnx exporter")
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64], description="batch sizes to time")
    threads: int = Field(2, description="ONNX Runtime intra-op threads (the same for both models)")
    warmup: int = Field(20, description="untimed warm-up runs per model and batch size")
    runs: int = Field(100, description="timed runs per model and batch size (dense and slim interleaved)")
    graph_optimization: Literal["fastest", "all", "extended", "basic", "disabled"] = Field(
        "fastest", description="ORT graph optimization level; fastest = each model at its faster of all/extended")

    @field_validator("opset")
    @classmethod
    def _opset(cls, value: int) -> int:
        if not 7 <= value <= 25:
            raise ValueError(f"opset must be an ONNX opset between 7 and 25 (18 is a safe choice); got {value}")
        return value

    @field_validator("batch_sizes")
    @classmethod
    def _batches(cls, value: list[int]) -> list[int]:
        if not value or any(b < 1 for b in value):
            raise ValueError(f"batch_sizes must be a non-empty list of integers >= 1 (e.g. [1, 64]); got {value}")
        return value

    @field_validator("threads", "runs")
    @classmethod
    def _positive(cls, value: int, info) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be an integer >= 1; got {value}")
        return value

    @field_validator("warmup")
    @classmethod
    def _nonnegative(cls, value: int) -> int:
        if value < 0:
            raise ValueError(f"warmup must be an integer >= 0; got {value}")
        return value


class Config(_Section):
    """A whole run: ``model``, ``data``, ``structure`` are required; the other sections have defaults."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    structure: list[StructureRule] = Field(description="structure rules (see structkit.structure.rules)")
    prune: PruneConfig = Field(default_factory=PruneConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_lam(cls, data: Any) -> Any:
        """Rules without ``lam`` take ``optimizer.lam`` (when given)."""
        if not isinstance(data, dict):
            return data
        optimizer, rules = data.get("optimizer"), data.get("structure")
        lam = optimizer.get("lam") if isinstance(optimizer, dict) else getattr(optimizer, "lam", None)
        if lam is not None and isinstance(rules, list):
            data = {**data, "structure": [{**r, "lam": lam} if isinstance(r, dict) and "lam" not in r else r
                                          for r in rules]}
        return data

    @field_validator("structure")
    @classmethod
    def _some_rules(cls, value: list[StructureRule]) -> list[StructureRule]:
        if not value:
            raise ValueError("structure needs at least one rule, e.g. {select: 'features.*', kind: channels, lam: 3.0e-4}")
        for i, rule in enumerate(value):
            if not rule.select.strip() or rule.select.strip() == "re:":
                raise ValueError(f"structure.{i}.select is empty ({rule.select!r}); give a glob over module names "
                                 f"('*' = every module, 'features.*'), or 're:<regex>'")
        return value

    @model_validator(mode="after")
    def _milestones_fit(self) -> Config:
        late = [m for m in self.optimizer.milestones if m >= self.schedule.epochs]
        if late:
            raise ValueError(f"optimizer.milestones {self.optimizer.milestones} must all be < schedule.epochs "
                             f"({self.schedule.epochs}): a milestone starts a new stage after that epoch")
        regularized = any((r.lam or 0) > 0 and r.regularizer != "none" for r in self.structure)
        if self.optimizer.name in ("ramda", "rmda") and regularized and not self.optimizer.milestones:
            raise ValueError(f"optimizer.milestones is empty: {self.optimizer.name} reaches exactly-zero groups only in "
                             "a final stage, which starts at the last milestone and ramps the momentum to 1; set e.g. "
                             f"milestones: [{max(1, self.schedule.epochs - 1)}] (the last epoch is the final stage)")
        return self

    @model_validator(mode="after")
    def _target_has_lam(self) -> Config:
        if self.compress.target is None:
            return self
        if self.optimizer.name not in ("ramda", "rmda", "proxgen", "proxsgd"):
            raise ValueError(f"compress.target needs a structkit solver (ramda, rmda, proxgen, proxsgd) to adapt lam; "
                             f"optimizer.name is {self.optimizer.name}")
        lasso = [r for r in self.structure if r.regularizer in (None, "group_lasso") and r.kind in ("channels", "heads")]
        if not lasso or not all((r.lam or 0) > 0 for r in lasso):
            raise ValueError("compress.target adapts the lam of channels/heads rules (group lasso), starting from their "
                             "lam: declare at least one such rule, each with lam > 0 (e.g. lam: 1.0e-4)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready); ``Config(**cfg.to_dict())`` gives the same config."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------------ loading

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 insists on ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+][0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """YAML text -> Python data (safe loader; ``1e-3`` is a float)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML scalars or flow lists) to a copy of ``data``.
    List items are addressed by index (``structure.0.lam=1e-3``); missing dict keys are created (and then
    rejected by validation if the schema does not know them)."""
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. --set optimizer.lr=0.01")
        parts = key.strip().split(".")
        value = parse_yaml(raw, f"--set {item!r}") if raw.strip() else None
        node: Any = data
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[:depth + 1])
            if isinstance(node, list):
                if not (part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node)):
                    raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth]) or 'config'} is a list of "
                                      f"{len(node)} item(s); {part!r} is not an index of it")
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:depth])} is a {type(node).__name__}, "
                                  f"not a section; cannot set {where}")
            if last:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate. Raises :class:`ConfigError` (a ValueError)
    or FileNotFoundError with a message that names the file, the field, the value and what is accepted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found" + (" (it is a folder)" if path.is_dir() else "")
                                + "; the examples are in configs/ (e.g. configs/digits.yaml)")
    data = parse_yaml(path.read_text(), str(path))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config is a mapping of sections (model, data, optimizer, schedule, structure, "
                          f"prune, deploy), not a {type(data).__name__}")
    return validate(apply_overrides(data, overrides or []), source=str(path))


def validate(data: dict[str, Any], source: str = "config") -> Config:
    """``Config.model_validate(data)`` with errors turned into one readable :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, data, source)) from None


def format_errors(err: ValidationError, data: Any, source: str = "config") -> str:
    """One line per problem: ``field: bad value -> what is accepted`` (with did-you-mean for unknown keys)."""
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(str(p) for p in loc) or "config"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        kind = e["type"]
        if kind == "extra_forbidden":
            accepted = _accepted_keys(loc[:-1])
            msg = f"unknown key{_did_you_mean(str(loc[-1]), accepted)}; accepted here: {', '.join(accepted)}"
        elif kind == "missing":
            msg = "required but missing"
            if len(loc) == 1:
                msg += f" (a config needs sections {', '.join(n for n, f in Config.model_fields.items() if f.is_required())})"
        elif kind not in ("value_error", "assertion_error"):
            msg = f"{msg}; got {_show(e.get('input'))}"
        # a model-level check names its own field (e.g. "structure.0.select is empty"): do not repeat the section
        lines.append(f"  {msg}" if loc and msg.startswith(f"{field}.") else f"  {field}: {msg}")
    head = f"{source} is invalid ({len(lines)} problem{'s' if len(lines) > 1 else ''}):"
    return "\n".join([head, *dict.fromkeys(lines)])


def _accepted_keys(loc: list) -> list[str]:
    """Field names of the section at ``loc`` (a path into Config)."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next((a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(getattr(model, "model_fields", {}))


def _did_you_mean(value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def training_view(data: dict[str, Any]) -> dict[str, Any]:
    """The part of a config dict that decides the training trajectory: :data:`TRAINING_SECTIONS`, without
    ``schedule.threads`` and ``schedule.device`` (a thread count or a device may change the last bits of a sum,
    not the run: a run trained on a GPU resumes on the CPU and vice versa)."""
    view = {k: v for k, v in data.items() if k in TRAINING_SECTIONS}
    if isinstance(view.get("schedule"), dict):
        view["schedule"] = {k: v for k, v in view["schedule"].items() if k not in _NOT_TRAJECTORY}
    # data.num_workers only changes who reads the examples; fields added later are left out at their defaults, so
    # runs made before they existed still resume
    for section, key, ignore in (("data", "num_workers", lambda v: True), ("data", "split", lambda v: v is None),
                                 ("model", "init", lambda v: v == "random")):
        part = view.get(section)
        if isinstance(part, dict) and key in part and ignore(part[key]):
            view[section] = {k: v for k, v in part.items() if k != key}
    if not (view.get("compress") or {}).get("target"):  # without a target the section changes nothing in training
        view.pop("compress", None)
    return view


def training_hash(config: Config) -> str:
    """Hash of :func:`training_view`: a checkpoint is only resumed under the same value."""
    return hashlib.sha256(json.dumps(training_view(config.to_dict()), sort_keys=True).encode()).hexdigest()[:16]
