"""Remove the exactly-zero groups of a trained model, rebuild a slim model with the same function, verify it.

>>> slim, report = structkit.prune(model, groupset, example_inputs)
>>> print(report.params_before, "->", report.params_after)

No thresholds: a channel or head goes only when every regularized entry of its group is exactly 0 (the
solvers produce exact zeros). Each structure kind removes its own groups (channels through torch-pruning,
heads by slicing whole heads, low-rank layers by factorization, binary layers by packing), in the kinds'
``prune_order``. Then :func:`verify` compares the slim model with the trained one on the example inputs in
eval mode, **relative to the output scale**: ``max |slim - trained| / (max |trained| + 1e-12)`` over all output
tensors, and :func:`prune` raises if that exceeds ``verify_tol`` (default per dtype,
:data:`VERIFY_TOLERANCE`: ``1e-5`` in float32, ``1e-10`` in float64). ``verify(..., dtype=torch.float64)``
and ``prune(..., verify_dtype=torch.float64)`` run float64 copies of both models, where exact removal agrees
to rounding (~1e-15), so ``1e-10`` separates exact from wrong by orders of magnitude.

Saving: :func:`structkit.save_slim` / :func:`structkit.load_slim` (:mod:`structkit.slim`) store the slim
architecture as data and the weights as tensors; loading rebuilds the model and never unpickles code.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .structure import GroupSet, get_kind
from .structure._guard import DEFAULT_GRAPH_TIMEOUT, check_timeout
from .structure._util import call, check_inputs, eval_mode, flatten_outputs
from .structure.kinds import PruneContext
from .structure.modules import MAC_COUNTERS
from .slim import architecture, load_slim, save_slim  # noqa: F401  (re-exported: the old home)


#: Default relative tolerances of :func:`prune`'s check, per floating dtype of the comparison. float32 reorders
#: sums (convolution algorithms, thread counts), which moves outputs by ~1e-7 to 1e-6 of their scale on the
#: architectures in docs/structure.md; 1e-5 leaves a 10x margin. In float64 exact removal agrees to ~1e-15.
VERIFY_TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
                                              torch.bfloat16: 5e-2}
#: added to the output scale so that all-zero outputs do not divide by zero
VERIFY_EPS = 1e-12


@dataclass
class PruneReport:
    """What :func:`prune` did. ``layers``: per grouped layer ``kind``, ``unit`` (channels, heads, rank),
    width ``before``/``after``, ``removed_groups``/``total_groups`` and, where torch-pruning's counter sees the
    layer, ``params_before/after`` and ``macs_before/after``. ``skipped``: removals that were possible but not
    done, and why. Verification: ``verify_rel_diff`` (max |slim - trained| / (max |trained| + eps)) against
    ``verify_rel_tol``, in ``verify_dtype``; the same check in absolute terms is ``verify_max_abs_diff`` against
    ``verify_tolerance`` (= ``verify_rel_tol x (max |trained| + eps)``)."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    verify_max_abs_diff: float
    verify_tolerance: float
    round_to: int | None = None
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    lowrank: list[dict[str, Any]] = field(default_factory=list)
    binary: list[dict[str, Any]] = field(default_factory=list)
    unstructured: list[dict[str, Any]] = field(default_factory=list)
    verify_rel_diff: float = 0.0
    verify_rel_tol: float = 0.0
    verify_dtype: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a log."""
        lines = [f"params {self.params_before:,} -> {self.params_after:,}; MACs {self.macs_before:,} -> "
                 f"{self.macs_after:,}; relative diff {self.verify_rel_diff:.3g} (tolerance {self.verify_rel_tol:.3g}, "
                 f"{self.verify_dtype or 'model dtype'}; max |diff| {self.verify_max_abs_diff:.3g})"]
        lines += [f"  {name}: {e['before']} -> {e['after']} {e['unit']}" for name, e in self.layers.items()
                  if e["before"] != e["after"]]
        lines += [f"  kept: {s['module']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def verify(trained: nn.Module, slim: nn.Module, example_inputs: Any, *, dtype: torch.dtype | None = None) -> float:
    """Relative difference between the outputs of two models on ``example_inputs``, both in eval mode:
    ``max |slim - trained| / (max |trained| + 1e-12)``, maxima over every element of every output tensor.
    Outputs may be tensors, tuples, dicts or Hugging Face ``ModelOutput``; they must have the same structure.

    ``dtype=torch.float64`` runs float64 copies of both models (floating example inputs cast too; the models
    passed in are not changed): exact removal then agrees to ~1e-15, so compare with ``1e-10``. Without
    ``dtype`` the models run as they are; float32 rounding gives ~1e-7..1e-6 (:data:`VERIFY_TOLERANCE`)."""
    return _compare(_outputs(trained, example_inputs, dtype), _outputs(slim, example_inputs, dtype))["rel"]


def _cast(inputs: Any, dtype: torch.dtype | None) -> Any:
    """Floating tensors of example inputs in ``dtype`` (token ids and masks stay integers)."""
    if dtype is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, dict):
        return {k: _cast(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_cast(v, dtype) for v in inputs)
    return inputs


def _in_dtype(model: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """``model`` itself when it already computes in ``dtype`` (or none is asked for), else a converted copy."""
    if dtype is None:
        return model
    floats = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    if all(t.dtype == dtype for t in floats):
        return model
    return copy.deepcopy(model).to(dtype)


def _outputs(model: nn.Module, example_inputs: Any, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    model = _in_dtype(model, dtype)
    with torch.no_grad(), eval_mode(model):
        return [t.detach().clone() for t in flatten_outputs(call(model, _cast(example_inputs, dtype)))]


def _compare(a: list[torch.Tensor], b: list[torch.Tensor]) -> dict[str, float]:
    """``abs``: max |a - b|; ``scale``: max |a|; ``rel``: abs / (scale + VERIFY_EPS) (NaN where either is NaN)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise RuntimeError(f"the two models return different outputs: shapes {[tuple(x.shape) for x in a]} vs "
                           f"{[tuple(y.shape) for y in b]}")
    diffs, scales = [], []
    for x, y in zip(a, b):
        if not x.numel():
            continue
        x, y = x.detach().double(), y.detach().to(x.device).double()
        d = (x - y).abs()
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))  # equal infinities and NaN in both count as equal
        diffs.append(torch.nan_to_num(d.masked_fill(same, 0.0), nan=math.inf).max())
        finite = x[torch.isfinite(x)]
        scales.append(finite.abs().max() if finite.numel() else x.new_zeros(()))
    diff = float(torch.stack(diffs).max()) if diffs else 0.0
    scale = float(torch.stack(scales).max()) if scales else 0.0
    return {"abs": diff, "scale": scale, "rel": diff / (scale + VERIFY_EPS)}


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def first_examples(example_inputs: Any, n: int = 1) -> Any:
    """The first ``n`` examples of a batch (a tensor, or a tuple / list / dict of tensors sharing the batch
    dimension; anything else unchanged)."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:n] if example_inputs.dim() else example_inputs
    if isinstance(example_inputs, dict):
        return {k: first_examples(v, n) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(first_examples(v, n) for v in example_inputs)
    return example_inputs


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int, dict[str, int], dict[str, int], str | None]:
    """MACs (per example: counted on the batch's first example, so totals and per-layer numbers agree) and params,
    in total and per module name (torch-pruning's counter, with structkit's modules). If the counter fails, MACs
    are 0, params are counted directly, and the last item says why (else None)."""
    import torch_pruning as tp

    example_inputs = first_examples(example_inputs)

    tp.utils.op_counter.CUSTOM_MODULES_MAPPING.update(MAC_COUNTERS)  # the counter clears it after each call
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning for keyword-only inputs
            macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, example_inputs,
                                                                                   layer_wise=True)
    except Exception as err:  # the third-party counter: report, do not fail the removal over it
        tp.utils.op_counter.CUSTOM_MODULES_MAPPING.clear()
        return 0, sum(p.numel() for p in model.parameters()), {}, {}, \
            f"torch-pruning's MAC counter failed ({type(err).__name__}: {' '.join(str(err).split())[:160]}); MACs reported as 0"
    names = {m: n for n, m in model.named_modules()}
    return (int(macs), int(params), {names[m]: int(v) for m, v in layer_macs.items() if m in names and v is not None},
            {names[m]: int(v) for m, v in layer_params.items() if m in names and v is not None}, None)


def prune(model: nn.Module, groupset: GroupSet, example_inputs: Any, *, round_to: int | None = None,
          verify_tol: float | None = None, verify_dtype: torch.dtype | None = None, inplace: bool = False,
          graph_timeout: float | None = DEFAULT_GRAPH_TIMEOUT) -> tuple[nn.Module, PruneReport]:
    """Remove every exactly-zero group of ``groupset`` from (a deep copy of) ``model``.

    ``round_to=N`` keeps just enough zero channels that every pruned width is a multiple of N (ONNX Runtime's
    CPU convolutions run fastest on multiples of 8/16); kept channels are zero, so the result stays exact.

    Verification: the slim model's outputs must match the trained model's to ``verify_tol`` *relative to the
    output scale* (``max |diff| / (max |trained output| + 1e-12)``, see :func:`verify`), else RuntimeError
    (report attached as ``err.report``). ``verify_dtype=torch.float64`` compares float64 copies of both models
    (the returned model keeps its dtype). ``verify_tol=None`` takes :data:`VERIFY_TOLERANCE` of the comparison
    dtype: 1e-5 in float32, 1e-10 in float64.

    ``graph_timeout``: seconds each call into torch-pruning's dependency graph may take (None or 0: no
    limit); a layer whose call times out, loops or fails keeps its channels and is listed in
    ``report.skipped`` with the reason (see :mod:`structkit.structure._guard`).
    Returns ``(slim_model, PruneReport)``.
    """
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer (e.g. 8 or 16) or None; got {round_to!r}.")
    if verify_tol is not None and not verify_tol >= 0:
        raise ValueError(f"verify_tol must be >= 0 (relative to the output scale) or None; got {verify_tol!r}.")
    if verify_dtype is not None and not (isinstance(verify_dtype, torch.dtype) and verify_dtype.is_floating_point):
        raise ValueError(f"verify_dtype must be a floating torch dtype (e.g. torch.float64) or None; got {verify_dtype!r}.")
    graph_timeout = check_timeout(graph_timeout)
    reference = check_inputs(model, example_inputs)
    dtype = verify_dtype or _float_dtype(model)
    if verify_tol is None:
        verify_tol = VERIFY_TOLERANCE.get(dtype, 1e-5)
    if verify_dtype is not None:
        reference = _outputs(model, example_inputs, verify_dtype)
    flags = groupset.block_zero_flags(model)
    macs_before, params_before, layer_macs_before, layer_params_before, count_error = _count(model, example_inputs)

    slim = model if inplace else copy.deepcopy(model)
    ctx = PruneContext(slim, example_inputs, round_to, graph_timeout=graph_timeout)
    if count_error:
        ctx.skip("<model>", count_error)
    by_kind: dict[str, list] = {}
    for block, zero in flags:
        by_kind.setdefault(block.kind, []).append((block, zero))
    for kind_name in sorted(by_kind, key=lambda k: get_kind(k).prune_order):
        blocks, zeros = zip(*by_kind[kind_name])
        get_kind(kind_name).prune(ctx, list(blocks), list(zeros))

    try:
        slim_out = _outputs(slim, example_inputs, verify_dtype)
    except Exception as err:  # the model's own code fails on the new widths
        detail = " ".join(str(err).split())[:300]
        raise RuntimeError(
            f"the pruned model fails to run on example_inputs ({type(err).__name__}: {detail}). Some module keeps a "
            "size that removal changed (split sizes, a channel count used in its forward, a stored filter) and "
            "structkit did not recognise it. Exclude the affected layers in the rules (see GroupSet.describe()); "
            "the trained model is unchanged unless inplace=True.") from err
    cmp = _compare(reference, slim_out)
    bound = verify_tol * (cmp["scale"] + VERIFY_EPS)
    macs_after, params_after, layer_macs_after, layer_params_after, count_error = _count(slim, example_inputs)
    if count_error and not any(s["module"] == "<model>" for s in ctx.skipped):
        ctx.skip("<model>", count_error)
    layers = {}
    for name, entry in ctx.widths.items():
        costs = dict(params_before=layer_params_before.get(name), params_after=layer_params_after.get(name),
                     macs_before=layer_macs_before.get(name), macs_after=layer_macs_after.get(name))
        layers[name] = {**entry, **{k: v for k, v in costs.items() if v is not None}}
    report = PruneReport(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        verify_max_abs_diff=cmp["abs"], verify_tolerance=bound, round_to=round_to, layers=layers,
        skipped=ctx.skipped, lowrank=ctx.details.get("lowrank", []), binary=ctx.details.get("binary", []),
        unstructured=ctx.details.get("unstructured", []), verify_rel_diff=cmp["rel"], verify_rel_tol=verify_tol,
        verify_dtype=str(dtype).removeprefix("torch."))
    if not cmp["rel"] <= verify_tol:  # also catches NaN
        err = RuntimeError(
            f"the pruned model's outputs differ from the trained model's by {cmp['rel']:.3g} relative to the output "
            f"scale (max |diff| {cmp['abs']:.3g}, max |output| {cmp['scale']:.3g}, {report.verify_dtype}), more than "
            f"verify_tol {verify_tol:g}. Removing exactly-zero groups should not change the function: the model "
            "probably uses an operation structkit cannot see (e.g. a mean or norm over channels written as a tensor "
            "op). Exclude the affected layers in the rules; the report is attached as err.report.")
        err.report = report
        raise err
    return slim, report
