"""Remove the exactly-zero groups of a trained model, rebuild a slim model with the same function, verify it.

>>> slim, report = structkit.prune(model, groupset, example_inputs)
>>> print(report.params_before, "->", report.params_after)

No thresholds: a channel or head goes only when every regularized entry of its group is exactly 0 (the
solvers produce exact zeros). Each structure kind removes its own groups (channels through torch-pruning,
heads by slicing whole heads, low-rank layers by factorization, binary layers by packing), in the kinds'
``prune_order``. Then :func:`verify` compares the slim model with the trained one on the example inputs in
eval mode and :func:`prune` raises if they differ by more than ``verify_tol x max(1, max |output|)``.

Saving: :func:`save_slim` pickles the whole module (``torch.save`` of the module object) together with a
record of every layer's widths and head counts; :func:`load_slim` unpickles it and checks the record. A state
dict alone cannot rebuild a slim model: the widths differ from the dense constructor's, some modules were
replaced (pruned attention, factorized and binary layers), and a Hugging Face BERT keeps its per-layer head
counts only on its layers (its config still says the dense count). Unpickling runs code: load only files you
trust, with compatible torch / structkit / transformers versions.
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .structure import GroupSet, get_kind
from .structure._util import call, check_inputs, eval_mode, flatten_outputs
from .structure.kinds import PruneContext
from .structure.modules import MAC_COUNTERS


@dataclass
class PruneReport:
    """What :func:`prune` did. ``layers``: per grouped layer ``kind``, ``unit`` (channels, heads, rank),
    width ``before``/``after``, ``removed_groups``/``total_groups`` and, where torch-pruning's counter sees the
    layer, ``params_before/after`` and ``macs_before/after``. ``skipped``: removals that were possible but not
    done, and why. ``verify_max_abs_diff`` against ``verify_tolerance`` (absolute)."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a log."""
        lines = [f"params {self.params_before:,} -> {self.params_after:,}; MACs {self.macs_before:,} -> "
                 f"{self.macs_after:,}; max |diff| {self.verify_max_abs_diff:.3g} (tolerance {self.verify_tolerance:.3g})"]
        lines += [f"  {name}: {e['before']} -> {e['after']} {e['unit']}" for name, e in self.layers.items()
                  if e["before"] != e["after"]]
        lines += [f"  kept: {s['module']}: {s['reason']}" for s in self.skipped]
        return "\n".join(lines)


def verify(trained: nn.Module, slim: nn.Module, example_inputs: Any) -> float:
    """Max absolute difference between the outputs of two models on ``example_inputs``, both in eval mode.
    Outputs may be tensors, tuples, dicts or Hugging Face ``ModelOutput``; they must have the same structure."""
    return _max_abs_diff(_outputs(trained, example_inputs), _outputs(slim, example_inputs))


def _outputs(model: nn.Module, example_inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad(), eval_mode(model):
        return [t.detach().clone() for t in flatten_outputs(call(model, example_inputs))]


def _max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise RuntimeError(f"the two models return different outputs: shapes {[tuple(x.shape) for x in a]} vs "
                           f"{[tuple(y.shape) for y in b]}")
    diffs = [(x.double() - y.double()).abs().max() for x, y in zip(a, b) if x.numel()]
    return float(torch.stack(diffs).max()) if diffs else 0.0


def _one_example(example_inputs: Any) -> Any:
    """The first example of a batch (a tensor, or a tuple / list / dict of tensors sharing the batch dimension)."""
    if isinstance(example_inputs, torch.Tensor):
        return example_inputs[:1] if example_inputs.dim() else example_inputs
    if isinstance(example_inputs, dict):
        return {k: _one_example(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(_one_example(v) for v in example_inputs)
    return example_inputs


def _count(model: nn.Module, example_inputs: Any) -> tuple[int, int, dict[str, int], dict[str, int]]:
    """MACs (per example: counted on the batch's first example, so totals and per-layer numbers agree) and params,
    in total and per module name (torch-pruning's counter, with structkit's modules)."""
    import torch_pruning as tp

    example_inputs = _one_example(example_inputs)

    tp.utils.op_counter.CUSTOM_MODULES_MAPPING.update(MAC_COUNTERS)  # the counter clears it after each call
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a warning for keyword-only inputs
        macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(model, example_inputs, layer_wise=True)
    names = {m: n for n, m in model.named_modules()}
    return (int(macs), int(params), {names[m]: int(v) for m, v in layer_macs.items() if m in names and v is not None},
            {names[m]: int(v) for m, v in layer_params.items() if m in names and v is not None})


def prune(model: nn.Module, groupset: GroupSet, example_inputs: Any, *, round_to: int | None = None,
          verify_tol: float = 1e-4, inplace: bool = False) -> tuple[nn.Module, PruneReport]:
    """Remove every exactly-zero group of ``groupset`` from (a deep copy of) ``model``.

    ``round_to=N`` keeps just enough zero channels that every pruned width is a multiple of N (ONNX Runtime's
    CPU convolutions run fastest on multiples of 8/16); kept channels are zero, so the result stays exact.
    Raises RuntimeError when the slim model's outputs differ from the trained model's by more than
    ``verify_tol x max(1, max |output|)``. Returns ``(slim_model, PruneReport)``.
    """
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer (e.g. 8 or 16) or None; got {round_to!r}.")
    if not verify_tol >= 0:
        raise ValueError(f"verify_tol must be >= 0; got {verify_tol!r}.")
    reference = check_inputs(model, example_inputs)
    flags = groupset.block_zero_flags(model)
    macs_before, params_before, layer_macs_before, layer_params_before = _count(model, example_inputs)

    slim = model if inplace else copy.deepcopy(model)
    ctx = PruneContext(slim, example_inputs, round_to)
    by_kind: dict[str, list] = {}
    for block, zero in flags:
        by_kind.setdefault(block.kind, []).append((block, zero))
    for kind_name in sorted(by_kind, key=lambda k: get_kind(k).prune_order):
        blocks, zeros = zip(*by_kind[kind_name])
        get_kind(kind_name).prune(ctx, list(blocks), list(zeros))

    diff = _max_abs_diff(reference, _outputs(slim, example_inputs))
    scale = max([1.0] + [float(t.abs().max()) for t in reference if t.numel()])
    macs_after, params_after, layer_macs_after, layer_params_after = _count(slim, example_inputs)
    layers = {}
    for name, entry in ctx.widths.items():
        costs = dict(params_before=layer_params_before.get(name), params_after=layer_params_after.get(name),
                     macs_before=layer_macs_before.get(name), macs_after=layer_macs_after.get(name))
        layers[name] = {**entry, **{k: v for k, v in costs.items() if v is not None}}
    report = PruneReport(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        verify_max_abs_diff=diff, verify_tolerance=verify_tol * scale, round_to=round_to, layers=layers,
        skipped=ctx.skipped, lowrank=ctx.details.get("lowrank", []), binary=ctx.details.get("binary", []),
        unstructured=ctx.details.get("unstructured", []))
    if diff > verify_tol * scale:
        err = RuntimeError(
            f"the pruned model's outputs differ from the trained model's by {diff:.3g} (max abs), more than "
            f"verify_tol {verify_tol:g} x {scale:.3g}. Removing exactly-zero groups should not change the function: "
            "the model probably uses an operation structkit cannot see (e.g. a mean or norm over channels written "
            "as a tensor op). Exclude the affected layers in the rules; the report is attached as err.report.")
        err.report = report
        raise err
    return slim, report


# ---------------------------------------------------------------- saving
_WIDTH_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "groups", "num_features", "embed_dim",
                "num_heads", "head_dim", "num_attention_heads", "attention_head_size", "all_head_size")
_FORMAT = "structkit.slim"


def architecture(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module with a width: its class and integer width/head-count attributes (``out_features``,
    ``num_heads``, BERT's ``num_attention_heads`` ...). Saved with a slim model and checked on load."""
    arch = {}
    for name, m in model.named_modules():
        widths = {a: getattr(m, a) for a in _WIDTH_ATTRS if isinstance(getattr(m, a, None), int)}
        if widths:
            arch[name] = {"class": type(m).__name__, **widths}
    return arch


def save_slim(model: nn.Module, path) -> None:
    """Save a (slim) model: the pickled module plus its :func:`architecture` record (see the module docstring
    for why a state dict is not enough)."""
    import structkit
    torch.save({"format": _FORMAT, "version": 1, "model": model, "architecture": architecture(model),
                "versions": {"torch": torch.__version__, "structkit": structkit.__version__}}, path)


def load_slim(path, map_location: Any = "cpu") -> nn.Module:
    """Load a model saved by :func:`save_slim` and check that every layer has the recorded widths and head
    counts. Unpickles code: only load trusted files."""
    saved = torch.load(path, map_location=map_location, weights_only=False)
    if not (isinstance(saved, dict) and saved.get("format") == _FORMAT):
        raise ValueError(f"{path} was not written by structkit.save_slim.")
    model = saved["model"]
    found = architecture(model)
    if found != saved["architecture"]:
        changed = sorted(n for n in set(found) | set(saved["architecture"]) if found.get(n) != saved["architecture"].get(n))
        raise RuntimeError(f"{path}: the loaded model's layer widths / head counts differ from the saved record in "
                           f"{changed[:5]}; the module classes changed since saving (saved with {saved['versions']}).")
    return model
