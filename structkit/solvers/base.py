"""What every structkit solver shares: param-group validation, flat state, group layouts, restarts, stats.

A structkit solver is a ``torch.optim.Optimizer``. Each param group may carry, besides the usual keys:

* ``regularizer`` -- a registered name (``structkit.regularizers.list_regularizers()``) or an instance;
  ``"none"`` by default, which trains the group unregularized;
* ``lam`` -- the regularization weight (>= 0);
* ``group_dim`` -- the simple grouping: slices along this dim of each tensor are groups (0 = rows/filters,
  1 = columns/input channels); or ``group_index`` -- one group index per tensor (see
  :mod:`structkit.layout`), which lets groups span tensors (a filter, its BatchNorm entries, ...).

Per param group the state lives in flat vectors (the group's tensors end to end, under the group's first
parameter, so ``state_dict()`` / ``load_state_dict()`` round-trip it unchanged). A step never copies the
parameters into flat form: updates that involve them are ``torch._foreach_*`` calls over per-tensor views of the
flat state (RAMDA gathers the gradients into a work vector, :meth:`_gather_grads`, for its fused pass), the rest
are single kernels over the flat vectors, and per-group
reductions go through :class:`~structkit.layout.GroupLayout`. Work vectors are allocated once per param
group and reused (:meth:`StructuredOptimizer._buffer`), so a step allocates no parameter-sized memory.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim import Optimizer

from ..layout import GroupLayout, group_dim_indices
from ..regularizers import get_regularizer
from .subproblem import METHODS, SubproblemInfo, solve_subproblem


class StructuredOptimizer(Optimizer):
    """Base class. Subclasses implement :meth:`_update` (and :meth:`_restart_state` if they keep a dual state)."""

    #: hyperparameters that must be > 0 / >= 0 / in (0, 1] (:meth:`check_hyperparameters`); subclasses extend these
    _positive: tuple[str, ...] = ("lr",)
    _nonnegative: tuple[str, ...] = ("lam",)
    _unit_interval: tuple[str, ...] = ()
    #: whether a stage restart scales eps together with lr (RAMDA: yes, as in the paper)
    _restart_scales_eps: bool = True

    def __init__(self, params, defaults: dict[str, Any]):
        base = dict(regularizer="none", lam=0.0, group_dim=None, group_index=None, momentum_ramp=False, ramp_steps=None)
        base.update(defaults)
        self._layouts: dict[int, tuple[dict, GroupLayout]] = {}
        self._workspace: dict[int, dict[str, torch.Tensor]] = {}
        self._stats = self._empty_stats()
        super().__init__(params, base)

    # ---- validation ----
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])

    @classmethod
    def check_hyperparameters(cls, values: Mapping[str, Any]) -> None:
        """Raise ValueError naming the first hyperparameter in ``values`` this solver refuses (keys it does not
        constrain are ignored). Every param group goes through these checks when the solver is built;
        :mod:`structkit.config` runs them on ``optimizer`` so that a bad value fails when the config is read."""
        name = cls.__name__
        for key in cls._positive:
            if key in values and not (_is_number(values[key]) and values[key] > 0):
                raise ValueError(f"Invalid {key} for {name}: {values[key]!r}; it must be a finite number > 0.")
        for key in cls._nonnegative:
            if key in values and not (_is_number(values[key]) and values[key] >= 0):
                raise ValueError(f"Invalid {key} for {name}: {values[key]!r}; it must be a finite number >= 0.")
        for key in cls._unit_interval:
            if key in values and not (_is_number(values[key]) and 0 < values[key] <= 1):
                raise ValueError(f"Invalid {key} for {name}: {values[key]!r}; it must be in (0, 1].")
        if "subproblem" in values and values["subproblem"] not in METHODS:
            raise ValueError(f"Invalid subproblem method {values['subproblem']!r}; use one of {METHODS}.")

    def _validate(self, group: dict[str, Any]) -> None:
        self.check_hyperparameters(group)
        reg = get_regularizer(group["regularizer"])
        params = group["params"]
        if group["group_index"] is not None and len(group["group_index"]) != len(params):
            raise ValueError(f"group_index has {len(group['group_index'])} entries for {len(params)} parameters; "
                             "give one group index per parameter.")
        if group["group_dim"] is not None and group["group_index"] is not None:
            raise ValueError("give either group_dim or group_index in a param group, not both.")
        if len({(p.dtype, p.device) for p in params}) > 1:
            raise ValueError("all parameters of one param group must share dtype and device; split the group.")
        if reg.grouping == "tensor" and group["group_index"] is not None and \
                any(ix != "tensor" for ix in group["group_index"]):
            raise ValueError(f"regularizer '{reg.name}' works on whole tensors; its group_index must be 'tensor'.")

    # ---- layouts and flat state ----
    def _layout(self, group: dict[str, Any]) -> GroupLayout:
        cached = self._layouts.get(id(group))
        if cached is not None and cached[0] is group:
            return cached[1]
        params = group["params"]
        shapes = [p.shape for p in params]
        reg = get_regularizer(group["regularizer"])
        if group["group_index"] is not None:
            indices = list(group["group_index"])
        elif reg.grouping == "rows":
            indices = group_dim_indices(shapes, group["group_dim"] or 0)
        else:
            indices = [reg.grouping] * len(params)
        layout = GroupLayout(shapes, indices, device=params[0].device, dtype=params[0].dtype)
        live = {id(g) for g in self.param_groups}
        for stale in [k for k in self._layouts if k not in live]:  # groups replaced by load_state_dict
            del self._layouts[stale]
            self._workspace.pop(stale, None)
        self._workspace.pop(id(group), None)
        self._layouts[id(group)] = (group, layout)
        return layout

    def group_layout(self, group_idx: int) -> GroupLayout:
        """The :class:`GroupLayout` of ``param_groups[group_idx]`` (for metrics and tests)."""
        return self._layout(self.param_groups[group_idx])

    def _flat_state(self, group: dict[str, Any]) -> dict[str, Any]:
        return self.state[group["params"][0]]

    def _buffer(self, group: dict[str, Any], name: str, like: torch.Tensor) -> torch.Tensor:
        """A persistent flat work buffer of the group's size (not state: never saved). Reusing buffers
        instead of allocating large temporaries every step avoids page-faulting fresh memory each time."""
        buffers = self._workspace.setdefault(id(group), {})
        n = self._layout(group).numel
        buf = buffers.get(name)
        if buf is None or buf.numel() != n or buf.dtype != like.dtype or buf.device != like.device:
            buf = buffers[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf

    # ---- the step ----
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step over every param group (parameters without a gradient count as gradient 0)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if not params or all(p.grad is None for p in params):
                continue
            if any(p.grad is not None and p.grad.is_sparse for p in params):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients.")
            self._update(group, self._flat_state(group), params, self._layout(group),
                         get_regularizer(group["regularizer"]))
        self._stats["steps"] += 1
        return loss

    def _update(self, group, state, params, layout, reg) -> None:
        """Update the parameters of one group in place."""
        raise NotImplementedError

    @staticmethod
    def _with_grad(params, views) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The per-tensor ``views`` of a flat state vector and the gradients, for the parameters that have one
        (a missing gradient counts as 0, so its entries are skipped by additive updates)."""
        pairs = [(v, p.grad) for p, v in zip(params, views) if p.grad is not None]
        return [v for v, _ in pairs], [g for _, g in pairs]

    @staticmethod
    def _gather_grads(params, layout, out: torch.Tensor) -> torch.Tensor:
        """The gradients end to end in the flat ``out`` (zeros for a parameter without one)."""
        return layout.flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], out=out)

    def _lerp_grads_(self, params, buf, layout, weight: float) -> list[torch.Tensor]:
        """``buf = (1 - weight) buf + weight g`` in place (a moving average of the gradients; a missing gradient
        counts as 0). Returns the gradients that exist."""
        views, grads = self._with_grad(params, layout.split(buf))
        if len(grads) < len(params):
            buf.mul_(1 - weight)
            torch._foreach_add_(views, grads, alpha=weight)
        else:
            torch._foreach_lerp_(views, grads, weight)
        return grads

    def _solve(self, group, state, reg, z, d, tau, layout, warm_start, scaled=False):
        """The step's subproblem (``solve_subproblem``) at tolerance ``inner_tol / t^(0.5 + inner_delta)``, in the
        group's persistent work vectors (``z`` is used as scratch; ``scaled``: it holds ``d * z``), carrying the
        regularizer's warm start in ``state["dual_warm"]`` (one number per group). Returns the solution and the
        solve's info."""
        rtol = group["inner_tol"] / state["step"] ** (0.5 + group["inner_delta"])
        y, info = solve_subproblem(reg, z, d, tau, layout, warm_start=warm_start, rtol=rtol,
                                   max_iter=int(group["inner_max_iter"]), method=group["subproblem"],
                                   dual_warm=state.get("dual_warm"), overwrite_z=True, scaled=scaled,
                                   buffer=lambda name: self._buffer(group, "solve_" + name, z))
        self._record(info, layout.num_groups)
        if info.dual_warm is not None:
            state["dual_warm"] = info.dual_warm
        return y, info

    # ---- the structure the solver is heading for ----
    @torch.no_grad()
    def identified_zeros(self) -> list[torch.Tensor | None]:
        """Per param group, a boolean per group (layout order, on the group's device): True where the point the
        solver moves the iterate to is exactly zero in that group; None for unregularized param groups.

        For proximal solvers (ProxSGD, ProxGen) that point is the iterate itself. For the dual-averaging solvers
        (RAMDA, RMDA) it is the subproblem's solution at the current dual state, found by the regularizer's exact
        screening rule (zero iff ``||d z||_g <= tau w_g`` for the group lasso; else the stored proximal-gradient
        solution's zeros), which is nonzero only while the averaging momentum is below 1: the structure the run is
        identifying, long before the iterate reaches it. One pass over the state; meant for occasional checks
        (e.g. the ``compress.target`` controller), not every step."""
        out: list[torch.Tensor | None] = []
        for group in self.param_groups:
            reg = get_regularizer(group["regularizer"])
            if not group["params"] or reg.name == "none":
                out.append(None)
                continue
            layout, state = self._layout(group), self._flat_state(group)
            point = self._screen_point(group, state)
            flags = reg.screen(*point, layout) if point is not None else None
            if flags is None and "W_hat" in state:
                flags = layout.max(state["W_hat"].abs()) == 0
            if flags is None:
                flags = layout.max(layout.flatten(group["params"]).abs()) == 0
            out.append(flags)
        return out

    @torch.no_grad()
    def zero_margins(self) -> list[torch.Tensor | None]:
        """Per group-lasso param group of a dual-averaging solver, ``kappa_g = ||d z||_g / (tau w_g)`` per group:
        the group is zero in the subproblem's solution iff ``kappa_g <= 1``, and multiplying lam by ``m`` zeroes
        exactly the groups with ``kappa_g <= m`` (at the current dual state). None elsewhere (no such margin:
        proximal solvers, other regularizers, a stage with no step yet)."""
        return self._margins(self._screen_point)

    @torch.no_grad()
    def step_margins(self) -> list[torch.Tensor | None]:
        """Per group-lasso param group, ``kappa_g = ||d z||_g / (tau w_g)`` of the subproblem of a step taken from
        the current state: a group comes out of that step zero iff ``kappa_g <= 1``. For the dual-averaging solvers
        this is :meth:`zero_margins`. Proximal solvers that keep moments (ProxGen) take the step with their current
        moments (no new gradient), so for a zero group ``kappa_g = ||m_hat||_g / (lam w_g)``: how far its averaged
        gradient is from pulling it out of zero -- which exact zeros are closest to coming back. None where a
        group has no such step (ProxSGD, other regularizers, before the first step)."""
        return self._margins(self._step_point)

    def _margins(self, point_of) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for group in self.param_groups:
            reg = get_regularizer(group["regularizer"])
            point = point_of(group, self._flat_state(group)) if group["params"] and reg.name == "group_lasso" else None
            if point is None:
                out.append(None)
                continue
            z, d, tau = point
            layout = self._layout(group)
            out.append(layout.norms(d * z) / (tau * layout.weights))
        return out

    def _step_point(self, group, state) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(z, d, tau)`` of a step from the current state (:meth:`step_margins`); the dual-averaging solvers'
        :meth:`_screen_point` unless a solver says otherwise."""
        return self._screen_point(group, state)

    def _screen_point(self, group, state) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(z, d, tau)`` of the subproblem ``min 1/2 ||y - z||_d^2 + tau psi(y)`` whose solution the solver moves
        the iterate to, for solvers that have one (None: the iterate itself is that point)."""
        return None

    # ---- stage-wise restarts ----
    @torch.no_grad()
    def restart(self, factor: float = 0.1, momentum_ramp: bool = False, ramp_steps: int | None = None) -> None:
        """Start a new stage: scale lr (and eps, for solvers with ``_restart_scales_eps``) by ``factor``,
        restart any dual state at the current point, and optionally ramp the averaging momentum to 1:
        ``c_t = min(max(c sqrt(t), sqrt(t / ramp_steps)), 1)``, which is the paper's ``min(c sqrt(t), 1)`` and in
        any case reaches 1 by step ``ramp_steps`` (``None``: the paper's ramp alone, 1 at ``t = 1 / c^2``). From
        then on the iterate is the subproblem's solution, whose zero groups are exactly zero."""
        if not _is_number(factor) or not factor > 0:
            raise ValueError(f"Invalid restart factor {factor!r}; it must be a number > 0 (0.1 is typical).")
        if ramp_steps is not None and (not isinstance(ramp_steps, int) or isinstance(ramp_steps, bool) or ramp_steps < 1):
            raise ValueError(f"Invalid ramp_steps {ramp_steps!r}; it must be an integer >= 1 or None.")
        for group in self.param_groups:
            group["lr"] *= factor
            if self._restart_scales_eps and "eps" in group:
                group["eps"] *= factor
            group["momentum_ramp"] = momentum_ramp
            group["ramp_steps"] = ramp_steps if momentum_ramp else None
            state = self._flat_state(group) if group["params"] else {}
            if state:
                self._restart_state(group, state, group["params"], self._layout(group))

    def _restart_state(self, group, state, params, layout) -> None:
        """Reset the per-stage state at the current parameters (no-op for solvers without one)."""

    # ---- statistics ----
    @staticmethod
    def _empty_stats() -> dict[str, Any]:
        return {"steps": 0, "solves": 0, "pg_solves": 0, "inner_iters": 0, "max_inner_iters": 0,
                "residual": None, "screened": None, "groups": 0}

    def _record(self, info: SubproblemInfo, num_groups: int) -> None:
        s = self._stats
        s["solves"] += 1
        if not info.exact:
            s["pg_solves"] += 1
            s["inner_iters"] += info.iters
            s["max_inner_iters"] = max(s["max_inner_iters"], info.iters)
            s["residual"] = info.residual
        s["screened"] = info.screened if s["screened"] is None else s["screened"] + info.screened
        s["groups"] += num_groups

    def solver_stats(self, reset: bool = False) -> dict[str, float]:
        """Inner-solver statistics since construction (or the last reset): mean/max inner iterations per
        proximal-gradient solve, the last certificate value, and the fraction of groups screened to zero.
        This is the only place that reads device values back to the host."""
        s = self._stats
        out = {
            "steps": s["steps"],
            "subproblem_solves": s["solves"],
            "pg_solves": s["pg_solves"],
            "mean_inner_iters": s["inner_iters"] / s["pg_solves"] if s["pg_solves"] else 0.0,
            "max_inner_iters": s["max_inner_iters"],
            "final_residual": float(s["residual"]) if s["residual"] is not None else 0.0,
            "screened_fraction": float(s["screened"]) / s["groups"] if s["screened"] is not None and s["groups"] else 0.0,
        }
        if reset:
            self._stats = self._empty_stats()
        return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
