"""Structure kinds: what turns matched modules into parameter groups, and removes the groups that end up zero.

A kind is a small class registered under a name::

    @register_kind("my_kind")
    class MyKind(StructureKind):
        handles = "Linear layers"                     # for error messages
        def accepts(self, module): ...                # which modules a rule of this kind may match
        def build(self, ctx, targets): ...            # -> list[Block]: the groups, as layout group indices
        def prune(self, ctx, blocks, zero): ...       # remove the groups flagged in ``zero`` from ctx.model

A :class:`Block` is the kind's unit of bookkeeping: some tensors with group indices (see
:mod:`structkit.layout`) whose offsets are local to the block, so group ``g`` of the block is
``range(num_groups)[g]``. :class:`~structkit.structure.GroupSet` places blocks side by side in optimizer
param groups; at prune time each kind gets back its blocks with one boolean per group: True where every
regularized entry of the group is exactly zero.

Built-in kinds: ``channels``, ``heads``, ``lowrank``, ``binary``, ``unstructured``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from ..registry import Registry
from ._guard import DEFAULT_GRAPH_TIMEOUT, GraphError, graph_call
from ._util import call, eval_mode

if TYPE_CHECKING:
    from .rules import StructureRule


@dataclass
class Block:
    """Groups of one structure unit (a layer's channels, an attention layer's heads, one matrix ...).

    ``tensors`` pairs canonical parameter names with group indices whose offsets count from 0 within the
    block; ``data`` is whatever the kind needs at prune time (kept JSON-like)."""

    kind: str
    label: str
    tensors: list[tuple[str, Any]]
    num_groups: int
    regularizer: str
    lam: float
    rule: int
    data: dict[str, Any] = field(default_factory=dict)


class Target(NamedTuple):
    """A module a rule assigned to a kind."""

    name: str
    module: nn.Module
    rule_index: int
    rule: StructureRule


class BuildContext:
    """What a kind sees while building groups: the model, the example inputs, the rule assignments, the
    tensors other blocks already claimed, and a lazily built torch-pruning dependency graph."""

    def __init__(self, model: nn.Module, example_inputs: Any, rules: list[StructureRule],
                 graph_timeout: float | None = DEFAULT_GRAPH_TIMEOUT):
        self.model = model
        self.graph_timeout = graph_timeout
        self.example_inputs = example_inputs
        self.rules = rules
        self.names: dict[nn.Module, str] = {m: n for n, m in model.named_modules()}
        self.param_names: dict[int, str] = {id(p): n for n, p in model.named_parameters()}
        self.assigned: dict[str, tuple[int, str]] = {}   # module name -> (rule index, kind name)
        self.excluded: dict[str, int] = {}               # module name -> index of the rule that excluded it
        self.claimed: dict[str, str] = {}                # parameter name -> label of the block that owns it
        self.skipped: list[tuple[str, str]] = []
        self._graph = None
        self._graph_error: GraphError | None = None

    def param(self, module: nn.Module, attr: str) -> str | None:
        """Canonical name (as in ``model.named_parameters()``) of ``module.<attr>``, or None if it is no
        parameter (absent bias, ...)."""
        p = getattr(module, attr, None)
        return self.param_names.get(id(p)) if isinstance(p, nn.Parameter) else None

    def skip(self, module: str, reason: str) -> None:
        """Record that ``module`` gets no group, and why (shown by ``GroupSet.describe()``)."""
        self.skipped.append((module, reason))

    def dependency_graph(self):
        """torch-pruning's dependency graph of the model, traced once in eval mode on the example inputs, under
        the time limit (``graph_timeout``). Raises :class:`~structkit.structure._guard.GraphError` (one line,
        chained to torch-pruning's error) if tracing fails or times out; the error is remembered."""
        if self._graph_error is not None:
            raise self._graph_error
        if self._graph is None:
            try:
                self._graph = build_graph(self.model, self.example_inputs, self.graph_timeout)
            except GraphError as err:
                self._graph_error = err
                raise
        return self._graph


def build_graph(model: nn.Module, example_inputs: Any, timeout: float | None):
    """Trace ``model`` with torch-pruning (eval mode, gradients on) under the time limit and cleanup of
    :func:`~structkit.structure._guard.graph_call`."""
    import torch_pruning as tp

    def trace():
        with torch.enable_grad(), eval_mode(model):
            return tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=lambda m, x: call(m, x),
                                                         verbose=False)
    return graph_call(trace, "tracing the model (build_dependency)", timeout=timeout, model=model)


@dataclass
class PruneContext:
    """What a kind sees while pruning: the model being slimmed (edit it in place, or replace submodules),
    the options, and the report entries it fills."""

    model: nn.Module
    example_inputs: Any
    round_to: int | None = None
    graph_timeout: float | None = DEFAULT_GRAPH_TIMEOUT
    widths: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def record(self, layer: str, kind: str, unit: str, before: int, after: int, removed_groups: int,
               total_groups: int) -> None:
        """One layer's width change (``unit``: "channels", "heads", "rank", ...)."""
        self.widths[layer] = dict(kind=kind, unit=unit, before=before, after=after,
                                  removed_groups=removed_groups, total_groups=total_groups)

    def skip(self, module: str, reason: str) -> None:
        """A removal that was possible but not done (last channel of a layer, alignment, ...), and why."""
        self.skipped.append(dict(module=module, reason=reason))

    def detail(self, kind: str, **entry: Any) -> None:
        """A kind-specific report entry (low-rank factorizations, binary packing, sparsity ...)."""
        self.details.setdefault(kind, []).append(entry)


class StructureKind:
    """Base class of structure kinds (see the module docstring).

    Class attributes: ``default_regularizer``; ``regularizer_groupings`` -- the ``grouping`` values of
    regularizers that make sense on this kind's groups; ``supports_block`` -- whether ``block: N`` applies;
    ``handles`` -- the modules it accepts, in words; ``claim_priority`` -- kinds with a lower value claim
    shared tensors first; ``prune_order`` -- kinds prune in increasing order (channels first, because it
    needs torch-pruning's graph of the unmodified module types)."""

    name: ClassVar[str] = ""
    default_regularizer: ClassVar[str] = "group_lasso"
    regularizer_groupings: ClassVar[tuple[str, ...]] = ("rows", "element")
    supports_block: ClassVar[bool] = False
    handles: ClassVar[str] = "modules"
    claim_priority: ClassVar[int] = 0
    prune_order: ClassVar[int] = 50

    def accepts(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def build(self, ctx: BuildContext, targets: list[Target]) -> list[Block]:
        raise NotImplementedError

    def prune(self, ctx: PruneContext, blocks: list[Block], zero: list[torch.Tensor]) -> None:
        """Remove the zero groups of ``blocks`` from ``ctx.model``. The default removes nothing."""

    def kept(self, block: Block, zero: torch.Tensor) -> dict[str, dict[str, Any]]:
        """Per-layer ``{"kept", "total", "unit"}`` for ``GroupSet.metrics()`` (default: nothing to report)."""
        return {}

    def __repr__(self) -> str:
        return f"<structure kind {self.name!r}>"


_KINDS: Registry[StructureKind] = Registry("structure kind", how="add your own with @structkit.structure.register_kind")


def register_kind(name: str, *, replace: bool = False):
    """Class decorator registering a :class:`StructureKind` subclass under ``name`` (an instance is kept)."""
    if not isinstance(name, str) or not name:
        raise ValueError("register_kind needs a non-empty name, e.g. @register_kind('my_kind').")

    def decorate(cls: type[StructureKind]) -> type[StructureKind]:
        if not (isinstance(cls, type) and issubclass(cls, StructureKind)):
            raise TypeError(f"@register_kind('{name}') must decorate a subclass of StructureKind.")
        _KINDS.add(name, cls(), replace=replace)  # a taken name is refused before cls.name changes
        cls.name = name
        return cls

    return decorate


def get_kind(name: str) -> StructureKind:
    """The registered kind called ``name``; unknown names raise ValueError with the closest match."""
    return _KINDS.get(name)


def list_kinds() -> list[str]:
    """Registered kind names, sorted."""
    return _KINDS.names()
