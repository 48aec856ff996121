"""One small name -> object registry, used for models, data sets, structure kinds, regularizers and solvers.

>>> MODELS = Registry("model", how="register more with @structkit.models.register_model")
>>> @MODELS.register("tiny")
... def tiny(**options): ...
>>> MODELS.get("tiny") is tiny, "tiny" in MODELS, MODELS.names()
(True, True, ['tiny'])

``register`` refuses a taken name (unless ``replace=True``); ``get`` of an unknown name raises ValueError naming
the closest registered name and every registered one.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind. ``what`` names the kind in messages ("model", "data set"); ``how`` ends the
    unknown-name message (how to add one, or what else is accepted)."""

    def __init__(self, what: str, *, how: str = "") -> None:
        self.what = what
        self.how = how
        self._items: dict[str, T] = {}

    def add(self, name: str, obj: T, *, replace: bool = False) -> T:
        """Register ``obj`` under ``name``; a taken name is refused unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty name; got {name!r}")
        if name in self._items and not replace:
            raise ValueError(f"a {self.what} named {name!r} is already registered ({_describe(self._items[name])}); "
                             f"pick another name, or pass replace=True to override it.")
        self._items[name] = obj
        return obj

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@registry.register("name")`` returns the decorated object unchanged."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} needs a non-empty name, e.g. @register(\"my_{self.what.replace(' ', '_')}\")")

        def decorate(obj: T) -> T:
            return self.add(name, obj, replace=replace)

        return decorate

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises ValueError (closest match, every name)."""
        if name in self._items:
            return self._items[name]
        raise ValueError(self.unknown(name))

    def unknown(self, name: object) -> str:
        """The message for an unknown ``name``: the closest registered name, all of them, and :attr:`how`."""
        return (f"unknown {self.what} {name!r}.{self.did_you_mean(name)} Registered: {', '.join(self.names()) or 'none'}"
                + (f"; {self.how}." if self.how else "."))

    def did_you_mean(self, name: object) -> str:
        """``" Did you mean 'x'?"`` for the closest registered name, or ``""``."""
        close = difflib.get_close_matches(str(name), list(self._items), n=1)
        return f" Did you mean {close[0]!r}?" if close else ""

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def copy(self) -> Registry[T]:
        """A registry with the same entries (registering in it leaves this one alone: for tests)."""
        other = Registry(self.what, how=self.how)
        other._items = dict(self._items)
        return other

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def _describe(obj: object) -> str:
    target = obj if isinstance(obj, type) or callable(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(target).__qualname__)}"
