"""Reading a config: YAML text (``1e-3`` is a float), ``--set key.path=value`` overrides, and pydantic's errors
turned into one :class:`ConfigError` whose lines name the field, the bad value and what is accepted (with the
closest key for a misspelt one). :mod:`structkit.config` puts these together in ``load_config``/``validate``.
"""
from __future__ import annotations

import difflib
import json
import re
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["ConfigError", "parse_yaml", "apply_overrides", "format_errors", "did_you_mean"]


class ConfigError(ValueError):
    """An invalid configuration; the message lists every problem, one per line."""



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


def format_errors(err: ValidationError, data: Any, source: str = "config", root: type[BaseModel] | None = None) -> str:
    """One line per problem: ``field: bad value -> what is accepted`` (with did-you-mean for unknown keys).
    ``root``: the schema validated (default :class:`structkit.config.Config`), for the keys accepted where one
    is unknown."""
    if root is None:
        from .config import Config as root
    lines = []
    for e in err.errors():
        loc = [p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        field = ".".join(str(p) for p in loc) or "config"
        msg = e["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        kind = e["type"]
        if kind == "extra_forbidden":
            accepted = _accepted_keys(root, loc[:-1])
            msg = f"unknown key{did_you_mean(str(loc[-1]), accepted)}; accepted here: {', '.join(accepted)}"
        elif kind == "missing":
            msg = "required but missing"
            if len(loc) == 1:
                msg += f" (a config needs sections {', '.join(n for n, f in root.model_fields.items() if f.is_required())})"
        elif kind not in ("value_error", "assertion_error"):
            msg = f"{msg}; got {_show(e.get('input'))}"
        # a model-level check names its own field (e.g. "structure.0.select is empty"): do not repeat the section
        lines.append(f"  {msg}" if loc and msg.startswith(f"{field}.") else f"  {field}: {msg}")
    head = f"{source} is invalid ({len(lines)} problem{'s' if len(lines) > 1 else ''}):"
    return "\n".join([head, *dict.fromkeys(lines)])


def _accepted_keys(root: type[BaseModel], loc: list) -> list[str]:
    """Field names of the section at ``loc`` (a path into ``root``)."""
    model: Any = root
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


def did_you_mean(value: str, choices: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the choice closest to ``value``, or ``""``."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
