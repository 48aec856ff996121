"""``group_parameters`` (rules -> groups) and ``GroupSet`` (the groups, their norms and metrics, and the
optimizer param groups that hand them to a structkit solver).

Groups are numbered globally ``0 .. len(groupset) - 1``: param group by param group, inside each one in the order
of :class:`~structkit.layout.GroupLayout` ids. Statistics: one layout reduction per param group (no loop over groups).
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..layout import GroupLayout
from ._guard import DEFAULT_GRAPH_TIMEOUT, check_timeout
from ._util import check_inputs
from .kinds import Block, BuildContext, Target, get_kind
from .matrix import numerical_rank
from .rules import RuleLike, parse_rules, regularizer_grouping


def group_parameters(model: nn.Module, example_inputs: Any, rules: RuleLike | Iterable[RuleLike], *,
                     graph_timeout: float | None = DEFAULT_GRAPH_TIMEOUT) -> GroupSet:
    """Build the groups that ``rules`` ask for on ``model``.

    ``example_inputs`` is one batch the model accepts: a tensor (called as ``model(x)``), a tuple
    (``model(*x)``) or a dict (``model(**x)``); it is used to trace the model (channels) and to check that
    zeroed groups really are removable. Rules are validated, and the inputs checked, before any tracing.
    Raises ValueError for a rule that matches no module, an unknown kind or regularizer, a negative lam,
    and example inputs that do not fit the model.

    ``graph_timeout``: seconds each call into torch-pruning's dependency graph may take (default 60; None or
    0: no limit). A layer whose group search times out, loops or fails inside torch-pruning gets no group and
    is listed by :meth:`GroupSet.describe` with a one-line reason; if tracing the whole model fails, every
    ``channels`` layer is listed that way. Every module a rule assigned that ends up in no group is listed.
    """
    rules = parse_rules(rules)
    ctx = BuildContext(model, example_inputs, rules, graph_timeout=check_timeout(graph_timeout))
    targets = _assign(ctx)
    check_inputs(model, example_inputs)
    blocks: list[Block] = []
    for kind_name in sorted(targets, key=lambda k: get_kind(k).claim_priority):
        for block in get_kind(kind_name).build(ctx, targets[kind_name]):
            taken = next((p for p, _ in block.tensors if p in ctx.claimed), None)
            if taken:
                ctx.skip(block.label, f"{taken} already belongs to the {ctx.claimed[taken]} group")
                continue
            ctx.claimed.update({p: f"{block.kind} '{block.label}'" for p, _ in block.tensors})
            blocks.append(block)
    _list_left_out(ctx, targets)
    if not blocks:
        reasons = "; ".join(f"{m or '<root>'}: {r}" for m, r in ctx.skipped[:5])
        raise ValueError(f"the rules produced no group: every module they matched was left out ({reasons}). "
                         "Select layers whose structure can be removed exactly (see docs/structure.md).")
    return GroupSet(model, blocks, ctx.skipped)


def _list_left_out(ctx: BuildContext, targets: dict[str, list[Target]]) -> None:
    """Record every assigned module that no block touches and no kind explained (so describe() lists it)."""
    explained = {m for m, _ in ctx.skipped}
    for kind_targets in targets.values():
        for t in kind_targets:
            own = {ctx.param_names.get(id(p)) for p in t.module.parameters()}
            if t.name in explained or own & set(ctx.claimed):
                continue
            ctx.skip(t.name, f"assigned to kind {t.rule.kind!r} by rule #{t.rule_index} but no group covers it")


def _assign(ctx: BuildContext) -> dict[str, list[Target]]:
    """Resolve which rule (hence kind) each module gets; a later rule wins for the modules it matches."""
    named = list(ctx.model.named_modules())
    excluded: dict[str, int] = {}
    for i, rule in enumerate(ctx.rules):
        kind = get_kind(rule.kind)
        selected = [(n, m) for n, m in named if rule.selects(n, m)]
        if not selected:
            raise ValueError(f"structure rule #{i} (kind {rule.kind!r}, select {rule.select!r}"
                             + (f", types {rule.types}" if rule.types else "") + ") matches no module. "
                             + _naming_hint(rule.select, rule.types, named))
        accepted = [(n, m) for n, m in selected if not rule.excludes(n) and kind.accepts(m)]
        if not accepted:
            some = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in selected[:4])
            raise ValueError(f"structure rule #{i} selects {len(selected)} module(s) ({some}{', ...' if len(selected) > 4 else ''}) "
                             f"but kind {rule.kind!r} handles {kind.handles}, and none of them (after exclude) "
                             "qualifies. Adjust select/types, or pick another kind.")
        excluded.update({n: i for n, m in selected if rule.excludes(n) and kind.accepts(m)})
        ctx.assigned.update({n: (i, rule.kind) for n, _ in accepted})
    ctx.excluded = {n: i for n, i in excluded.items() if n not in ctx.assigned}
    targets: dict[str, list[Target]] = {}
    for n, m in named:
        if n in ctx.assigned:
            i, kind_name = ctx.assigned[n]
            targets.setdefault(kind_name, []).append(Target(n, m, i, ctx.rules[i]))
    return targets


def _naming_hint(select: str, types: list[str] | None, named: list[tuple[str, nn.Module]]) -> str:
    names = [n for n, _ in named if n]
    close = difflib.get_close_matches(select.removeprefix("re:"), names, n=3, cutoff=0.4)
    hint = f"Close module names: {', '.join(close)}. " if close else f"Module names look like: {', '.join(names[:6])}. "
    if types:
        present = sorted({type(m).__name__ for _, m in named})
        hint += f"Module types in the model: {', '.join(present)}. "
    return hint + "Globs match whole dotted names ('layer1.*'); use 're:...' for a regex."


def _shift(index: Any, base: int) -> Any:
    return {**index, "offset": index["offset"] + base} if isinstance(index, dict) else index


class _ParamGroup:
    """The blocks that share one optimizer param group (same regularizer, lam, dtype, device, and element-wise
    or not), their tensors, and the structural layout of their groups."""

    def __init__(self, regularizer: str, lam: float, element: bool):
        self.regularizer, self.lam, self.element = regularizer, lam, element
        self.names: list[str] = []
        self.indices: list[Any] = []
        self.blocks: list[tuple[Block, int]] = []  # (block, first group id in this param group)
        self.num_groups = 0
        self._layouts: dict[tuple, GroupLayout] = {}

    def add(self, block: Block) -> None:
        self.blocks.append((block, self.num_groups))
        for name, index in block.tensors:
            self.names.append(name)
            self.indices.append(_shift(index, self.num_groups))
        self.num_groups += block.num_groups

    def layout(self, tensors: list[torch.Tensor]) -> GroupLayout:
        key = (tensors[0].device, tensors[0].dtype)
        cached = self._layouts.get(key) or next(iter(self._layouts.values()), None)
        if cached is not None and cached.shapes != [t.shape for t in tensors]:
            raise ValueError("the model's parameters changed shape since it was grouped (pruned in place?); "
                             "call group_parameters again on the current model.")
        if key not in self._layouts:
            layout = GroupLayout([t.shape for t in tensors], self.indices, device=key[0], dtype=key[1])
            if layout.num_groups != self.num_groups:
                raise RuntimeError(f"internal error: layout has {layout.num_groups} groups, blocks declare "
                                   f"{self.num_groups}; a structure kind produced non-contiguous group ids.")
            self._layouts[key] = layout
        return self._layouts[key]

    def solver_indices(self) -> list[Any]:
        """Group indices for the solver: the regularizer's own grouping decides ("element" for L1, "tensor" for
        the nuclear norm), "rows"-grouping regularizers get the structural groups."""
        grouping = regularizer_grouping(self.regularizer)
        return list(self.indices) if grouping == "rows" else [grouping] * len(self.indices)


class GroupSet:
    """The parameter groups of a model, as built by :func:`group_parameters`.

    ``len(gs)`` is the number of groups; :meth:`norms`, :meth:`zero_` and :meth:`metrics` use the global
    group numbering; :meth:`param_groups` hands everything to a solver; :meth:`describe` explains it all.
    """

    def __init__(self, model: nn.Module, blocks: list[Block], skipped: list[tuple[str, str]]):
        self.model = model
        self.blocks = blocks
        self.skipped = skipped
        params = dict(model.named_parameters())
        self._groups: list[_ParamGroup] = []
        where: dict[tuple, _ParamGroup] = {}
        for block in blocks:
            p = params[block.tensors[0][0]]
            element = block.tensors[0][1] == "element"
            key = (block.regularizer, block.lam, element, p.dtype, p.device)
            if key not in where:
                where[key] = _ParamGroup(block.regularizer, block.lam, element)
                self._groups.append(where[key])
            where[key].add(block)
        self._start: dict[int, int] = {}  # id(block) -> global id of its first group
        start = 0
        for g in self._groups:
            for block, first in g.blocks:
                self._start[id(block)] = start + first
            start += g.num_groups
        self._len = start

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"GroupSet({self._len} groups in {len(self.blocks)} blocks, {len(self._groups)} param groups)"

    # ---- access ----
    def _tensors(self, group: _ParamGroup, model: nn.Module | None) -> list[torch.Tensor]:
        params = dict((model or self.model).named_parameters())
        missing = [n for n in group.names if n not in params]
        if missing:
            raise ValueError(f"the model has no parameter(s) {missing[:3]}; pass the model this GroupSet was built on "
                             "(or an unpruned copy of it).")
        return [params[n].detach() for n in group.names]

    def _flat(self, group: _ParamGroup, model: nn.Module | None = None) -> tuple[torch.Tensor, GroupLayout]:
        tensors = self._tensors(group, model)
        layout = group.layout(tensors)
        return layout.flatten(tensors), layout

    def groups_of(self, block: Block | str) -> torch.Tensor:
        """Global ids of the groups of a block (or of the block with that label)."""
        if isinstance(block, str):
            found = [b for b in self.blocks if b.label == block]
            if not found:
                raise ValueError(f"no block labelled {block!r}; labels: {', '.join(b.label for b in self.blocks)}")
            block = found[0]
        start = self._start[id(block)]
        return torch.arange(start, start + block.num_groups)

    # ---- statistics ----
    def norms(self) -> torch.Tensor:
        """Euclidean norm of every group over its regularized entries (float64, CPU), in global order."""
        parts = [layout.norms(flat.double()) for flat, layout in (self._flat(g) for g in self._groups)]
        return torch.cat([p.cpu() for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)

    def zero_flags(self, model: nn.Module | None = None) -> list[torch.Tensor]:
        """Per param group, True for each group whose regularized entries are all exactly zero (read from
        ``model``, default the one this set was built on). Uses max |x| == 0, which tiny values cannot fake the
        way an underflowing squared norm can."""
        flags = []
        for g in self._groups:
            flat, layout = self._flat(g, model)
            flags.append((layout.max(flat.abs()) == 0).cpu())
        return flags

    def entries(self, flags: list[torch.Tensor], model: nn.Module | None):
        """``(name, tensor, mask)`` for every tensor of the param groups with a flagged group (``flags``: per param
        group, one bool per group, as :meth:`zero_flags` gives): ``mask`` is True at the flagged groups' entries."""
        for g, f in zip(self._groups, flags):
            if not f.any():
                continue
            tensors = self._tensors(g, model)
            layout = g.layout(tensors)
            f = f.to(layout.device)
            entries = layout.expand(f) if layout.ids is not None else f
            yield from zip(g.names, tensors, layout.split(entries))

    def block_zero_flags(self, model: nn.Module | None = None) -> list[tuple[Block, torch.Tensor]]:
        """Every block with its groups' zero flags (see :meth:`zero_flags`)."""
        return self._by_block(self.zero_flags(model))

    def _by_block(self, flags: list[torch.Tensor]) -> list[tuple[Block, torch.Tensor]]:
        return [(block, f[first:first + block.num_groups]) for g, f in zip(self._groups, flags) for block, first in g.blocks]

    def rms(self) -> torch.Tensor:
        """Root mean square of every group's regularized entries (float64, CPU, global order): the group norm
        over its weight ``sqrt(size)`` in the group lasso, so groups of different sizes compare; 0 exactly for
        zero groups."""
        parts = [layout.norms(flat.double()) / layout.weights.double() for flat, layout in
                 (self._flat(g) for g in self._groups)]
        return torch.cat([p.cpu() for p in parts]) if parts else torch.zeros(0, dtype=torch.float64)

    def sizes(self) -> torch.Tensor:
        """Regularized entries of every group (float64, CPU, global order)."""
        parts = [g.layout(self._tensors(g, None)).sizes.double().cpu() for g in self._groups]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def with_lam_factors(self, factors: dict[str, float]) -> GroupSet:
        """A new GroupSet over the same model whose blocks (by label) have their lam multiplied by ``factors``
        (blocks not named keep theirs). Blocks with different lam go to different param groups, so the global
        group numbering may change; zero flags and pruning do not depend on it."""
        import dataclasses
        blocks = [dataclasses.replace(b, lam=b.lam * factors[b.label]) if b.label in factors else b for b in self.blocks]
        return GroupSet(self.model, blocks, self.skipped)

    def solver_zero_flags(self, solver) -> torch.Tensor:
        """Global ``solver.identified_zeros()`` (bool, CPU): the structure it is heading for. ``solver`` must be
        built on :meth:`param_groups` of this set (its first param groups are this set's, in order)."""
        parts = self._per_group(solver, solver.identified_zeros())
        return torch.cat([torch.zeros(g.num_groups, dtype=torch.bool) if f is None else f.cpu()
                          for g, f in zip(self._groups, parts)]) if parts else torch.zeros(0, dtype=torch.bool)

    def solver_margins(self, solver, step: bool = False) -> torch.Tensor | None:
        """Global ``solver.zero_margins()`` (``step``: ``step_margins()``, ProxGen's too), float64 on the CPU, inf for
        other regularizers' groups; None if a group-lasso param group has none (e.g. before the stage's first step)."""
        parts = self._per_group(solver, solver.step_margins() if step else solver.zero_margins())
        if any(m is None and g.regularizer == "group_lasso" for g, m in zip(self._groups, parts)):
            return None
        return torch.cat([torch.full((g.num_groups,), math.inf, dtype=torch.float64) if m is None else m.double().cpu()
                          for g, m in zip(self._groups, parts)])

    def _per_group(self, solver, values: list) -> list:
        if len(solver.param_groups) < len(self._groups) or any(
                len(pg["params"]) != len(g.names) for g, pg in zip(self._groups, solver.param_groups)):
            raise ValueError(f"the solver's param groups ({len(solver.param_groups)}) are not this GroupSet's "
                             f"({len(self._groups)}); build the solver on groupset.param_groups().")
        return values[:len(self._groups)]

    @torch.no_grad()
    def zero_(self, indices, model: nn.Module | None = None) -> GroupSet:
        """Set every regularized entry of the given groups (global ids) to exactly zero, in place, in ``model``
        (default: the one this set was built on; or an unpruned copy of it)."""
        for _, p, mask in self.entries(self.flags_of(indices), model):
            p.masked_fill_(mask, 0)
        return self

    def flags_of(self, indices) -> list[torch.Tensor]:
        """The global group ids ``indices`` as per-param-group bool flags (the form :meth:`entries` takes)."""
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self._len):
            raise IndexError(f"group ids must lie in [0, {self._len}); got range [{int(idx.min())}, {int(idx.max())}].")
        chosen = torch.zeros(self._len, dtype=torch.bool)
        chosen[idx] = True
        return list(chosen.split([g.num_groups for g in self._groups]))

    def metrics(self) -> dict[str, Any]:
        """Structure metrics of the current weights (docs/structure.md):

        * ``weighted_group_sparsity`` -- over group_lasso param groups: entries in all-zero groups / entries;
        * ``lowrank_level`` -- over nuclear-regularized matrices: singular values below the numerical-rank
          tolerance (see :func:`~structkit.structure.matrix.numerical_rank`) / min(m, n), summed over matrices;
        * ``unstructured_sparsity`` -- exactly-zero entries / entries, over every regularized param group;
        * ``zero_groups``, ``num_groups``; ``layers`` -- per layer ``{"kept", "total", "unit"}`` (channels, heads).
        A ratio with nothing to measure is None.
        """
        wgs = [0.0, 0.0]
        sparse = [0, 0]
        rank = [0, 0]
        zero_groups = 0
        flags_all = []
        for g in self._groups:
            flat, layout = self._flat(g)
            flags = (layout.max(flat.abs()) == 0).cpu()
            flags_all.append(flags)
            zero_groups += int(flags.sum())
            if g.regularizer == "group_lasso":
                sizes = layout.sizes.cpu()
                wgs[0] += float(sizes[flags].sum())
                wgs[1] += float(sizes.sum())
            if g.regularizer != "none":
                sparse[0] += int((flat == 0).sum())
                sparse[1] += flat.numel()
            if g.regularizer == "nuclear":
                zeros, total = _rank_deficit(layout.matrices(flat))
                rank[0] += zeros
                rank[1] += total
        layers: dict[str, dict[str, Any]] = {}
        for block, flags in self._by_block(flags_all):
            layers.update(get_kind(block.kind).kept(block, flags))
        return dict(
            weighted_group_sparsity=wgs[0] / wgs[1] if wgs[1] else None,
            lowrank_level=rank[0] / rank[1] if rank[1] else None,
            unstructured_sparsity=sparse[0] / sparse[1] if sparse[1] else None,
            zero_groups=zero_groups, num_groups=self._len, layers=layers)

    # ---- hand-off to the solver ----
    def param_groups(self, **solver_defaults: Any) -> list[dict[str, Any]]:
        """Optimizer param groups: one per (regularizer, lam, dtype, device) with ``params``, ``regularizer``,
        ``lam``, ``group_index`` and ``solver_defaults``; then ``{"params": rest}`` with every parameter that no
        group regularizes (left out when empty). Each parameter of the model appears exactly once."""
        params = dict(self.model.named_parameters())
        out, used = [], set()
        for g in self._groups:
            tensors = [params[n] for n in g.names]
            used.update(id(p) for p in tensors)
            out.append({"params": tensors, "regularizer": g.regularizer, "lam": g.lam,
                        "group_index": g.solver_indices(), **solver_defaults})
        rest = [p for p in self.model.parameters() if id(p) not in used]
        if rest:
            out.append({"params": rest})
        return out

    # ---- explanation ----
    def describe(self) -> str:
        """A table of the blocks (module, kind, number of groups, entries per group, regularizer, lam), then the
        modules that got no group and why."""
        rows = [("module", "kind", "groups", "group size", "regularizer", "lam")]
        for g in self._groups:
            sizes = g.layout(self._tensors(g, None)).sizes.cpu().long()
            for block, first in g.blocks:
                s = sizes[first:first + block.num_groups]
                size = str(int(s[0])) if bool((s == s[0]).all()) else f"{int(s.min())}-{int(s.max())}"
                rows.append((block.label, block.kind, str(block.num_groups), size, g.regularizer, f"{g.lam:g}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        regularized = sum(len(g.names) for g in self._groups)
        lines.append(f"{len(self)} groups over {regularized} tensors in {len(self._groups)} param group(s).")
        if self.skipped:
            lines.append("Not grouped:")
            lines += [f"  {module or '<root>'}: {reason}" for module, reason in self.skipped]
        return "\n".join(lines)


def _rank_deficit(matrices: list[torch.Tensor]) -> tuple[int, int]:
    """(number of numerically zero singular values, number of singular values) over matrices, batched by shape."""
    by_shape: dict[torch.Size, list[torch.Tensor]] = {}
    for m in matrices:
        by_shape.setdefault(m.shape, []).append(m)
    zeros = total = 0
    for shape, ms in by_shape.items():
        k = min(shape)
        ranks = numerical_rank(torch.stack(ms))
        zeros += int((k - ranks).sum())
        total += k * len(ms)
    return zeros, total
