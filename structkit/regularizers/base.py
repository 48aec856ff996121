"""The regularizer interface and its registry.

A regularizer is the structure-inducing term ``psi`` of ``min_W F(W) + lam * psi(W)``. The solvers never
look inside one: they ask for its value, its proximal operator under a scalar metric, and (when one is
known) its exact solution under a diagonal metric. Everything works on the flat vector of one optimizer
param group together with its :class:`~structkit.layout.GroupLayout`, so every method is a handful of
vectorised kernels over all groups at once.

``lam`` is applied by the solver: methods take ``tau`` = (step size) x lam, either a float or a
per-group tensor of length ``layout.num_groups``.
"""
from __future__ import annotations

import fnmatch
from typing import ClassVar, NamedTuple

import torch

from ..layout import GroupLayout
from ..registry import Registry


class Regularizer:
    """Base class. Subclasses implement :meth:`value` and :meth:`prox`; the rest is optional.

    Class attributes:
      ``name``      -- registry name (set by :func:`register_regularizer`);
      ``grouping``  -- how groups are formed when a param group declares none: ``"element"`` (every entry),
                       ``"rows"`` (slices along ``group_dim``, default 0), or ``"tensor"`` (whole tensors);
      ``convex``    -- False makes the inexact solver halve its step and keep the previous point when the
                       subproblem objective did not decrease.
    """

    name: ClassVar[str] = ""
    grouping: ClassVar[str] = "element"
    convex: ClassVar[bool] = True

    def value(self, x: torch.Tensor, layout: GroupLayout) -> torch.Tensor:
        """``psi(x)`` as a 0-dim tensor (no ``lam``)."""
        raise NotImplementedError

    def prox(self, x: torch.Tensor, tau: torch.Tensor | float, layout: GroupLayout) -> torch.Tensor:
        """``argmin_y 1/2 ||y - x||^2 + tau * psi(y)`` (tau per group or scalar)."""
        raise NotImplementedError

    def prox_(self, x: torch.Tensor, tau: torch.Tensor | float, layout: GroupLayout) -> torch.Tensor:
        """:meth:`prox` written into ``x`` (the solvers' scratch buffer); returns ``x``. The default copies
        :meth:`prox`'s result; built-ins override it to work in place."""
        return x.copy_(self.prox(x, tau, layout))

    def prox_diag(self, z: torch.Tensor, d: torch.Tensor, tau: float,
                  layout: GroupLayout) -> torch.Tensor | None:
        """Exact ``argmin_y 1/2 sum_i d_i (y_i - z_i)^2 + tau * psi(y)``, or None when there is no cheap exact
        solution (the solver then runs proximal gradient with :meth:`prox`)."""
        return None

    def solve_diag(self, z: torch.Tensor, d: torch.Tensor, tau: float, layout: GroupLayout, *, rtol: float,
                   warm: torch.Tensor | None = None, out: torch.Tensor | None = None,
                   check: bool = True, buffer=None, scaled: bool = False) -> "DiagSolution | None":
        """Optional fast path of the inexact solver: the same minimiser as :meth:`prox_diag`, to the stopping rule
        ``||min-norm subgradient of Q at y|| <= rtol * ||d z||`` (``rtol = 0``: to machine precision), with a
        per-group warm start ``warm`` returned by the previous call. ``out`` is a scratch buffer the result may
        be written to (it may be ``z`` itself); ``buffer(name)`` returns persistent scratch vectors of ``z``'s
        size; ``check=False`` runs a fixed number of iterations (no host sync, for accelerators);
        ``scaled=True``: ``z`` holds ``d * z`` instead (it may then be used as scratch too). None (the default)
        when the regularizer has no such method, and then ``z`` is left as it was."""
        return None

    def screen(self, z: torch.Tensor, d: torch.Tensor, tau: float, layout: GroupLayout) -> torch.Tensor | None:
        """Boolean per group: True where the diagonal-metric solution is known to be exactly zero. None if no
        exact screening rule is known."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DiagSolution(NamedTuple):
    """What :meth:`Regularizer.solve_diag` returns: the point ``y``, the norm of the minimum-norm subgradient of
    ``Q`` at ``y`` (a 0-dim tensor, not synced), the iterations run, the warm start for the next call, and
    whether ``y`` is exact (a closed form)."""
    y: torch.Tensor
    residual: torch.Tensor
    iters: int
    warm: torch.Tensor | None
    exact: bool = False


_REGISTRY: Registry[type[Regularizer]] = Registry(
    "regularizer", how="add your own with @structkit.regularizers.register_regularizer")


def register_regularizer(name: str, *, replace: bool = False):
    """Class decorator: ``@register_regularizer("my_reg")`` makes ``regularizer="my_reg"`` usable by every solver
    (a taken name is refused unless ``replace``)."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_regularizer needs a non-empty name, e.g. @register_regularizer('my_reg').")

    def decorate(cls: type[Regularizer]) -> type[Regularizer]:
        if not (isinstance(cls, type) and issubclass(cls, Regularizer)):
            raise TypeError(f"@register_regularizer('{name}') must decorate a subclass of structkit.regularizers.Regularizer.")
        if cls.grouping not in ("element", "rows", "tensor"):
            raise ValueError(f"{cls.__name__}.grouping must be 'element', 'rows' or 'tensor', not {cls.grouping!r}.")
        _REGISTRY.add(name, cls, replace=replace)
        cls.name = name
        return cls

    return decorate


def list_regularizers(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style wildcard pattern, sorted."""
    return [n for n in _REGISTRY.names() if fnmatch.fnmatch(n, pattern)]


def get_regularizer(spec: str | Regularizer | type[Regularizer] | None) -> Regularizer:
    """A regularizer instance from a registered name, an instance, a class, or None (= ``"none"``)."""
    if spec is None:
        spec = "none"
    if isinstance(spec, Regularizer):
        return spec
    if isinstance(spec, type) and issubclass(spec, Regularizer):
        return spec()
    if isinstance(spec, str) and spec in _REGISTRY:
        return _REGISTRY.get(spec)()
    raise ValueError(_REGISTRY.unknown(spec))
