"""Group membership of the entries of one optimizer param group, as one flat vector.

A solver keeps the state of a param group in flat vectors of length N: the group's tensors laid end to end in
C order. ``GroupLayout`` says which group each flat entry belongs to and offers the few reductions the
regularizers need (per-group sum, sum of squares and max; per-group values broadcast back to entries).

Group membership is declared per tensor with a small, serialisable *group index* (a dict of ints), so
that it can live in ``optimizer.param_groups`` and in checkpoints:

``{"dim": d, "offset": o, "block": b, "period": p}``: entry ``W[..., i, ...]`` (``i`` along ``dim``)
belongs to group ``o + (i mod p) // b`` (``p = 0`` means no modulo). Everything else along the other
dims shares the group. Examples:

* rows / filters of a conv (``group_dim=0``): ``{"dim": 0, "offset": o}``;
* input channels (``group_dim=1``): ``{"dim": 1, "offset": o}``;
* blocks of 8 adjacent channels: ``{"dim": 0, "offset": o, "block": 8}``;
* head h of a fused ``in_proj_weight`` (3E x E, head size d): ``{"dim": 0, "offset": o, "block": d, "period": E}``.

Tensors that share an offset share groups: a conv's filter c, its BatchNorm weight c and bias c form one
group when all three use the same ``offset`` (this is how structure kinds couple tensors).
A group index may also be ``"tensor"`` (the whole tensor is one group, used by the nuclear norm) or
``"element"`` (every entry its own group, used by L1).

How the reductions run. Each tensor is viewed as ``(pre, n, post)`` with ``n = shape[dim]``: every group is a
set of whole slices ``[:, i, :]``. A reduction first reduces each tensor over ``pre`` and ``post`` with
``reshape``-based kernels (for rows, ``post`` is contiguous, so ``linalg.vector_norm(dim=-1)`` streams the
memory once), which leaves one value per slice -- a few thousand numbers for a ResNet-50 -- and only these
are combined into groups with a small ``index_add_``. Broadcasting back is a ``(1, n, 1)`` view multiplied or
added into each tensor. No parameter-sized index vector exists and nothing loops over groups; the only loop
is over the tensors of the param group.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

GroupIndex = Mapping[str, int] | str


def group_dim_indices(shapes: Sequence[torch.Size], dim: int) -> list[dict[str, int]]:
    """Group index of the simple case: slices along ``dim`` of each tensor are groups, tensors do not share."""
    out, offset = [], 0
    for shape in shapes:
        if len(shape) == 0:
            raise ValueError("group_dim needs tensors with at least one dimension; got a scalar parameter. "
                             "Put scalar parameters in a param group without a regularizer.")
        d = dim if dim >= 0 else dim + len(shape)
        if not 0 <= d < len(shape):
            raise ValueError(f"group_dim={dim} is out of range for a parameter of shape {tuple(shape)}; "
                             f"use 0 (rows/filters) or 1 (columns/input channels).")
        out.append({"dim": d, "offset": offset})
        offset += shape[d]
    return out


class _Part(NamedTuple):
    """One tensor of the layout: its slice of the flat vector, its ``(pre, n, post)`` view, and the group id of
    each of its ``n`` slices."""
    start: int
    stop: int
    view: tuple[int, int, int]
    ids: torch.Tensor


class GroupLayout:
    """Flat layout of a param group's tensors and the group of every flat entry.

    Attributes: ``shapes``, ``numels``, ``numel`` (N), ``num_groups`` (G), ``sizes`` (entries per group, float,
    length G), ``weights`` (sqrt(sizes)), ``elementwise`` (every entry its own group) -- nothing here depends
    on parameter values.
    """

    def __init__(self, shapes: Sequence[torch.Size], indices: Sequence[GroupIndex],
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if len(shapes) != len(indices):
            raise ValueError(f"got {len(indices)} group indices for {len(shapes)} tensors; give one per tensor.")
        self.shapes = [torch.Size(s) for s in shapes]
        self.numels = [s.numel() for s in self.shapes]
        self.numel = sum(self.numels)
        self.indices = list(indices)
        self.device = torch.device(device)
        self.elementwise = all(ix == "element" for ix in indices)
        self._ids = None
        if self.elementwise:
            self.parts: list[_Part] = []
            self.num_groups = self.numel
            self.sizes = torch.ones(self.numel, device=device, dtype=dtype)
        else:
            self.parts, start, next_free = [], 0, 0
            for shape, numel, ix in zip(self.shapes, self.numels, indices):
                view, ids = self._tensor_part(shape, ix, next_free)
                last = self.parts[-1] if self.parts else None
                if last is not None and last.view[0] == view[0] == 1 and last.view[2] == view[2]:
                    # rows of equal length back to back (a BatchNorm's weight and bias, ...): one view, fewer kernels
                    self.parts[-1] = _Part(last.start, start + numel, (1, last.view[1] + view[1], view[2]),
                                           torch.cat([last.ids, ids.to(device)]))
                else:
                    self.parts.append(_Part(start, start + numel, view, ids.to(device)))
                start += numel
                if ids.numel():
                    next_free = max(next_free, int(ids.max()) + 1)
            self.num_groups = next_free
            self._slice_counts = [p.view[1] for p in self.parts]
            self._slice_ids = torch.cat([p.ids for p in self.parts]) if self.parts else \
                torch.zeros(0, dtype=torch.long, device=device)
            # the common case (group_dim, no sharing): slice k is group k, so no index_add is needed at all
            self._identity = bool(torch.equal(self._slice_ids.cpu(), torch.arange(self.num_groups)))
            counts = [torch.full((p.view[1],), p.view[0] * p.view[2], dtype=dtype, device=device) for p in self.parts]
            self.sizes = self._combine(torch.cat(counts) if counts else torch.zeros(0, dtype=dtype, device=device),
                                       "sum")
        self.weights = self.sizes.sqrt()

    @staticmethod
    def _tensor_part(shape: torch.Size, ix: GroupIndex, next_free: int) -> tuple[tuple[int, int, int], torch.Tensor]:
        if ix == "element":
            raise ValueError("'element' group indices cannot be mixed with other kinds in one param group; "
                             "put element-wise (L1) tensors in their own param group.")
        if ix == "tensor":
            return (1, 1, shape.numel()), torch.tensor([next_free])
        if not isinstance(ix, Mapping) or "dim" not in ix:
            raise ValueError(f"a group index must be 'tensor', 'element' or a dict with 'dim' and 'offset'; got {ix!r}.")
        dim, offset = int(ix["dim"]), int(ix.get("offset", next_free))
        block, period = int(ix.get("block", 1)), int(ix.get("period", 0))
        if block < 1 or period < 0:
            raise ValueError(f"group index {dict(ix)}: block must be >= 1 and period >= 0.")
        if len(shape) == 0 or not 0 <= dim < len(shape):
            raise ValueError(f"group index dim={dim} does not fit a tensor of shape {tuple(shape)}.")
        i = torch.arange(shape[dim])
        if period:
            i = i % period
        return (math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])), offset + i // block

    # ---- per-tensor views ----
    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector, one ``(pre, n, post)`` view per tensor (groups are unions of ``[:, i, :]``)."""
        return [x[p.start:p.stop].view(p.view) for p in self.parts]

    def _per_slice(self, v: torch.Tensor) -> list[torch.Tensor]:
        """A per-group vector as one ``(1, n, 1)`` view per tensor, ready to broadcast against :meth:`views`."""
        per_slice = v if self._identity else v.index_select(0, self._slice_ids)  # one gather for all tensors
        return [vals.view(1, -1, 1) for vals in per_slice.split(self._slice_counts)]

    def _combine(self, per_slice: torch.Tensor, how: str) -> torch.Tensor:
        """Per-slice values (all tensors, concatenated) -> per-group values."""
        if self._identity:
            return per_slice
        if how == "sum":
            out = torch.zeros(self.num_groups, device=per_slice.device, dtype=per_slice.dtype)
            return out.index_add_(0, self._slice_ids, per_slice)
        out = torch.full((self.num_groups,), -math.inf, device=per_slice.device, dtype=per_slice.dtype)
        return out.scatter_reduce_(0, self._slice_ids, per_slice, reduce="amax", include_self=True)

    # ---- reductions over groups (a few kernels per tensor, any number of groups) ----
    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sum of a flat vector: ``out[g] = sum_{i in g} x[i]``."""
        if self.elementwise:
            return x
        return self._combine(torch.cat([v.sum(dim=(0, 2)) for v in self.views(x)]), "sum")

    def sumsq(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sum of squares ``||x_g||^2``, without forming ``x * x``."""
        if self.elementwise:
            return x.square()
        parts = []
        for v in self.views(x):
            pre, n, post = v.shape
            if post > 1:
                r = torch.linalg.vector_norm(v, dim=2)                                      # (pre, n)
                r = (torch.linalg.vector_norm(r, dim=0) if pre > 1 else r.view(n)).square_()
            else:
                r = v.view(pre, n).square().sum(0) if pre > 1 else v.view(n).square()
            parts.append(r)
        return self._combine(torch.cat(parts), "sum")

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group Euclidean norms ``||x_g||_2``."""
        return x.abs() if self.elementwise else self.sumsq(x).sqrt()

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group maximum of a flat vector (``-inf`` for empty groups)."""
        if self.elementwise:
            return x
        parts = [v.amax(dim=(0, 2)) if v.numel() else v.new_full((v.shape[1],), -math.inf) for v in self.views(x)]
        return self._combine(torch.cat(parts), "amax")

    # ---- per-group values back onto entries ----
    def expand(self, v: torch.Tensor | float) -> torch.Tensor | float:
        """Broadcast a per-group value to the entries of each group: a new tensor, safe to change in place
        (floats and 0-dim tensors pass through unchanged)."""
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        if self.elementwise:
            return v.clone()
        out = torch.empty(self.numel, device=v.device, dtype=v.dtype)
        for dst, val in zip(self.views(out), self._per_slice(v)):
            dst.copy_(val.expand_as(dst))
        return out

    def mul_(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``x *= expand(v)`` in place, without materialising ``expand(v)``."""
        if self.elementwise:
            return x.mul_(v)
        torch._foreach_mul_(self.views(x), self._per_slice(v))
        return x

    def add(self, x: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out = x + expand(v)`` (``out`` may be ``x``), without materialising ``expand(v)``."""
        if self.elementwise:
            return torch.add(x, v, out=out)
        for dst, src, val in zip(self.views(out), self.views(x), self._per_slice(v)):
            torch.add(src, val, out=dst)
        return out

    @property
    def ids(self) -> torch.Tensor | None:
        """The group id of every flat entry (int64, length N; ``None`` when every entry is its own group).
        Built on first use only: the solvers never need it."""
        if self.elementwise:
            return None
        if self._ids is None:
            self._ids = self.expand(torch.arange(self.num_groups, device=self.device))
        return self._ids

    # ---- flat <-> tensors ----
    def flatten(self, tensors: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Concatenate tensors (C order) into one flat vector: a new one, or ``out``."""
        return torch.cat([t.reshape(-1) for t in tensors], out=out)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the tensors (no copy)."""
        return [part.view(shape) for part, shape in zip(flat.split(self.numels), self.shapes)]

    def matrices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of each tensor as a matrix ``(shape[0], rest)`` -- conv weights become out x (in*k*k)."""
        return [part.view(shape[0] if len(shape) else 1, -1) for part, shape in zip(flat.split(self.numels), self.shapes)]
