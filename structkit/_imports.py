"""``"package.module:callable"`` names in configs (models, data sets): import them, with errors that say what is
wrong (the module does not import, has no such attribute, or the attribute is not callable)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["import_callable"]


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable named by ``spec`` (``"package.module:attr"``, ``attr`` may be dotted: ``"pkg.mod:Class.build"``).

    ``what`` names the config field in errors (``"model"``, ``"data set"``). Raises ValueError when the module cannot
    be imported (whatever the import raised) or lacks the attribute, TypeError when the attribute is not callable.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name.strip() or not attr.strip():
        raise ValueError(f"{what} {spec!r}: expected 'package.module:callable' (a module, a colon, a name in it)")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while being imported
        raise ValueError(f"{what} {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}). Check the "
                         f"spelling and that it is installed or on PYTHONPATH.") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ValueError(f"{what} {spec!r}: module {module_name!r} has no attribute {attr!r}.") from e
    if not callable(obj):
        raise TypeError(f"{what} {spec!r}: {module_name}.{attr} is a {type(obj).__name__}, not a callable.")
    return obj
