"""Structure rules: which modules get which structure, with which regularizer and strength.

One schema for both front doors (YAML and Python). A rule is::

    select: "features.*"        # glob on module names ("re:<regex>" for a regex; the whole name must match)
    types: [Conv2d, Linear]     # optional: class names (a subclass matches its parents' names too)
    exclude: ["classifier.2"]   # globs (or "re:...") of module names this rule does not apply to
    kind: channels              # a registered structure kind (see structkit.structure.list_kinds())
    regularizer: group_lasso    # a registered regularizer; default: the kind's own
    lam: 1.0e-3                 # regularization strength, >= 0 (may be omitted only with regularizer "none")
    block: 1                    # channels only: this many adjacent channels form one group

Rules apply in order; a later rule overrides earlier ones for the modules it matches (and its kind handles).
"""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .kinds import get_kind

_BUILTIN_REGULARIZERS = ("none", "l1", "group_lasso", "nuclear", "binary")


def available_regularizers() -> list[str]:
    """Names accepted by ``regularizer``: the registry of :mod:`structkit.regularizers` when it imports,
    otherwise the five built-in names."""
    try:
        from ..regularizers import list_regularizers
    except ImportError:
        return list(_BUILTIN_REGULARIZERS)
    return list_regularizers()


def regularizer_grouping(name: str) -> str:
    """How a regularizer forms groups on its own: ``"element"``, ``"rows"`` or ``"tensor"``
    (the registry's ``grouping`` attribute; ``"none"`` counts as element-wise)."""
    try:
        from ..regularizers import get_regularizer
    except ImportError:
        return {"l1": "element", "nuclear": "tensor", "group_lasso": "rows", "binary": "rows"}.get(name, "element")
    return get_regularizer(name).grouping


def name_matches(pattern: str, name: str) -> bool:
    """Glob match on a dotted module name, or a full regex match for ``"re:<regex>"``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class StructureRule(BaseModel):
    """One structure rule (see the module docstring). Unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")

    select: str = "*"
    types: list[str] | None = None
    exclude: list[str] = []
    kind: str
    regularizer: str | None = None
    lam: float | None = Field(None, ge=0, allow_inf_nan=False)
    block: int = Field(1, ge=1)

    @field_validator("types", "exclude", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("select", "exclude")
    @classmethod
    def _valid_patterns(cls, value: Any) -> Any:
        for pattern in _as_list(value):
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as err:
                    raise ValueError(f"invalid regular expression {pattern[3:]!r}: {err}") from None
        return value

    @field_validator("types")
    @classmethod
    def _nonempty_types(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("types is an empty list; leave it out to accept every module type.")
        return value

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        get_kind(value)  # raises with a did-you-mean suggestion
        return value

    @model_validator(mode="after")
    def _consistent(self) -> StructureRule:
        kind = get_kind(self.kind)
        if self.regularizer is None:
            self.regularizer = kind.default_regularizer
        known = available_regularizers()
        if self.regularizer not in known:
            import difflib
            close = difflib.get_close_matches(self.regularizer, known, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"unknown regularizer {self.regularizer!r}.{hint} Registered: {', '.join(known)}.")
        grouping = regularizer_grouping(self.regularizer)
        if self.regularizer != "none" and grouping not in kind.regularizer_groupings:
            raise ValueError(
                f"regularizer {self.regularizer!r} groups by {grouping!r}, which does not fit kind {self.kind!r} "
                f"(it needs a regularizer grouping by {' or '.join(kind.regularizer_groupings)}; "
                f"its default is {kind.default_regularizer!r}).")
        if self.lam is None:
            if self.regularizer != "none":
                raise ValueError(f"lam is required with regularizer {self.regularizer!r} (e.g. lam: 1.0e-3).")
            self.lam = 0.0
        if self.block > 1 and not kind.supports_block:
            raise ValueError(f"block is only meaningful for kinds that group channels; kind {self.kind!r} "
                             "does not support it. Use round_to in prune() to align widths instead.")
        return self

    def selects(self, name: str, module: Any) -> bool:
        """Whether ``select`` and ``types`` match a module (``exclude`` is checked separately)."""
        if not name_matches(self.select, name):
            return False
        return self.types is None or any(c.__name__ in self.types for c in type(module).__mro__)

    def excludes(self, name: str) -> bool:
        return any(name_matches(p, name) for p in self.exclude)


RuleLike = StructureRule | Mapping[str, Any]


def parse_rules(rules: RuleLike | Iterable[RuleLike]) -> list[StructureRule]:
    """Rules from a dict, a :class:`StructureRule`, or a list of either. Errors name the rule and the field."""
    if isinstance(rules, (StructureRule, Mapping)):
        rules = [rules]
    parsed = []
    for i, rule in enumerate(rules):
        if isinstance(rule, StructureRule):
            parsed.append(rule)
            continue
        if not isinstance(rule, Mapping):
            raise ValueError(f"structure rule #{i} must be a dict or a StructureRule, not {type(rule).__name__}.")
        try:
            parsed.append(StructureRule.model_validate(dict(rule)))
        except ValidationError as err:
            problems = []
            for e in err.errors():
                field = ".".join(str(p) for p in e["loc"]) or "rule"
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    msg = (f"unknown field; a rule has {', '.join(StructureRule.model_fields)}"
                           + (" (round_to is an option of structkit.prune)" if field == "round_to" else ""))
                problems.append(f"{field}: {msg}")
            raise ValueError(f"structure rule #{i} {dict(rule)!r} is invalid: " + "; ".join(problems)) from None
    if not parsed:
        raise ValueError("no structure rules given; pass at least one, e.g. {'kind': 'channels', 'lam': 1e-3}.")
    return parsed
