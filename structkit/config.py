"""The run configuration: one pydantic schema for YAML files and Python.

>>> cfg = load_config("configs/digits.yaml", overrides=["optimizer.lr=0.02", "structure.0.lam=1e-3"])
>>> cfg = Config(model={"name": "mlp"}, data={"name": "digits"}, structure=[{"kind": "channels", "lam": 1e-3}])

Every section rejects unknown keys; :func:`load_config` turns pydantic's errors into one :class:`ConfigError`
whose lines name the field, the bad value and what is accepted (with the closest key for a misspelt one).
``docs/configuration.md`` lists every field with its default.

The sections live in :mod:`structkit.config_sections` (model, data, optimizer: checked against their registries)
and :mod:`structkit.config_stages` (schedule, prune, finetune, compress, deploy); YAML, ``--set`` overrides and
error messages in :mod:`structkit.config_io`. Every name is importable from here.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from .config_io import ConfigError, apply_overrides, format_errors, parse_yaml
from .config_sections import DataConfig, ModelConfig, OptimizerConfig, Section, SplitConfig
from .config_stages import CompressConfig, DeployConfig, FinetuneConfig, PruneConfig, ScheduleConfig, TargetConfig
from .structure.rules import StructureRule

__all__ = ["Config", "ModelConfig", "DataConfig", "SplitConfig", "OptimizerConfig", "ScheduleConfig", "PruneConfig", "FinetuneConfig",
           "TargetConfig", "CompressConfig", "DeployConfig", "ConfigError", "load_config", "validate", "apply_overrides", "parse_yaml", "training_hash",
           "training_view", "TRAINING_SECTIONS"]

#: the sections that decide the training trajectory; a checkpoint is only resumed under the same values
TRAINING_SECTIONS = ("task", "model", "data", "optimizer", "schedule", "structure", "compress")
#: schedule keys that do not decide the trajectory (left out of the training hash)
_NOT_TRAJECTORY = ("threads", "device")


class Config(Section):
    """A whole run: ``model``, ``data``, ``structure`` are required; the other sections have defaults."""

    task: str = Field("classification", validate_default=True, description="what the run learns (structkit.tasks)")
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

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from .tasks import check_task  # imports the task's module: its data sets and models register
        return check_task(value)

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
        if self.compress.final_stage == "fixed" and not self.optimizer.milestones and self.schedule.epochs < 2:
            raise ValueError("compress.final_stage: fixed selects the structure at the start of the final stage, from "
                             "what the epochs before it trained; with 1 epoch and no milestones there are none: use "
                             "more epochs, or final_stage: regularized")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON/YAML-ready); ``Config(**cfg.to_dict())`` gives the same config."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


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
        raise ConfigError(format_errors(err, data, source, Config)) from None


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
                                 ("model", "init", lambda v: v == "random"),
                                 ("compress", "final_stage", lambda v: v == "regularized")):
        part = view.get(section)
        if isinstance(part, dict) and key in part and ignore(part[key]):
            view[section] = {k: v for k, v in part.items() if k != key}
    if view.get("task") == "classification":  # the default, left out: runs made before tasks existed resume
        view.pop("task")
    if not (view.get("compress") or {}).get("target"):  # without a target the section changes nothing in training
        view.pop("compress", None)
    return view


def training_hash(config: Config) -> str:
    """Hash of :func:`training_view`: a checkpoint is only resumed under the same value."""
    return hashlib.sha256(json.dumps(training_view(config.to_dict()), sort_keys=True).encode()).hexdigest()[:16]
