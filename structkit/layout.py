"""Group membership of the entries of one optimizer param group, as one flat vector.

A solver works on the tensors of a param group concatenated (C order) into a flat vector of length N.
``GroupLayout`` says which group each flat entry belongs to and offers the few reductions the
regularizers need (per-group sum and max, broadcast back to entries), each one vectorised kernel over
every group at once -- there is no Python loop over groups.

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
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


class GroupLayout:
    """Flat layout of a param group's tensors and the group id of every flat entry.

    Attributes: ``shapes``, ``numels``, ``numel`` (N), ``num_groups`` (G), ``ids`` (int64, length N, or
    ``None`` when every entry is its own group), ``sizes`` (entries per group, float, length G),
    ``weights`` (sqrt(sizes)), ``tensor_of_group`` -- nothing here depends on parameter values.
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
        if all(ix == "element" for ix in indices):
            self.ids = None
            self.num_groups = self.numel
            self.sizes = torch.ones(self.numel, device=device, dtype=dtype)
        else:
            parts, next_free = [], 0
            for shape, ix in zip(self.shapes, indices):
                ids = self._tensor_ids(shape, ix, next_free)
                parts.append(ids.reshape(-1))
                next_free = max(next_free, int(ids.max()) + 1 if ids.numel() else next_free)
            self.ids = torch.cat(parts).to(device) if parts else torch.zeros(0, dtype=torch.long, device=device)
            self.num_groups = int(self.ids.max()) + 1 if self.ids.numel() else 0
            self.sizes = torch.zeros(self.num_groups, device=device, dtype=dtype).index_add_(
                0, self.ids, torch.ones(self.numel, device=device, dtype=dtype))
        self.weights = self.sizes.sqrt()

    @staticmethod
    def _tensor_ids(shape: torch.Size, ix: GroupIndex, next_free: int) -> torch.Tensor:
        if ix == "element":
            raise ValueError("'element' group indices cannot be mixed with other kinds in one param group; "
                             "put element-wise (L1) tensors in their own param group.")
        if ix == "tensor":
            return torch.full(shape, next_free, dtype=torch.long)
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
        ids = offset + i // block
        view = [1] * len(shape)
        view[dim] = shape[dim]
        return ids.reshape(view).expand(shape)

    # ---- reductions over groups (one kernel each, any number of groups) ----
    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group sum of a flat vector: ``out[g] = sum_{i in g} x[i]``."""
        if self.ids is None:
            return x
        return torch.zeros(self.num_groups, device=x.device, dtype=x.dtype).index_add_(0, self.ids, x)

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group maximum of a flat vector (``-inf`` for empty groups)."""
        if self.ids is None:
            return x
        out = torch.full((self.num_groups,), -math.inf, device=x.device, dtype=x.dtype)
        return out.scatter_reduce_(0, self.ids, x, reduce="amax", include_self=True)

    def norms(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group Euclidean norms ``||x_g||_2``."""
        return self.sum(x * x).sqrt() if self.ids is not None else x.abs()

    def expand(self, v: torch.Tensor | float) -> torch.Tensor | float:
        """Broadcast a per-group value to the entries of each group: a new tensor, safe to change in place
        (floats and 0-dim tensors pass through unchanged)."""
        if not isinstance(v, torch.Tensor) or v.dim() == 0:
            return v
        return v.clone() if self.ids is None else v.index_select(0, self.ids)

    # ---- flat <-> tensors ----
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate tensors (C order) into one new flat vector."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped like the tensors (no copy)."""
        return [part.view(shape) for part, shape in zip(flat.split(self.numels), self.shapes)]

    def matrices(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of each tensor as a matrix ``(shape[0], rest)`` -- conv weights become out x (in*k*k)."""
        return [part.view(shape[0] if len(shape) else 1, -1) for part, shape in zip(flat.split(self.numels), self.shapes)]
