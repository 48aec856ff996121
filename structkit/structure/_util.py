"""Small helpers shared by the structure kinds and the pruner: calling a model, reading its outputs,
finding and replacing submodules, and running a model in eval mode without losing its train/eval flags."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn


def call(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on example inputs: a dict is passed as keyword arguments, a tuple or list as positional
    arguments, anything else (a tensor) as the single argument. The same convention is handed to
    torch-pruning, whose own default would unpack a tensor along its batch dimension."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def flatten_outputs(out: Any, *, strict: bool = False) -> list[torch.Tensor]:
    """Every tensor of a model output, in order -- the order the ONNX exporters emit graph outputs in: a tensor
    is one output; a tuple or list contributes its items in order; a dict -- including a Hugging Face
    ``ModelOutput``, an ordered dict without its ``None`` fields -- its values in insertion order; ``None``
    contributes nothing. Nesting is flattened depth first. Anything else is skipped, or with ``strict`` (ONNX
    export, where every output must be a tensor) a TypeError naming its type."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v, strict=strict)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v, strict=strict)]
    if strict and out is not None:
        raise TypeError(f"cannot export a model output of type {type(out).__name__}: return tensors, or tuples, "
                        f"lists or dicts of tensors")
    return []


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own flag afterwards (torch-pruning's tracer
    calls ``model.eval()`` and never switches back)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in flags:
            m.training = training


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def describe_inputs(inputs: Any) -> str:
    """Shapes of example inputs, for error messages."""
    if isinstance(inputs, torch.Tensor):
        return f"tensor of shape {tuple(inputs.shape)} ({inputs.dtype})"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe_inputs(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, Sequence) and not isinstance(inputs, str):
        return "(" + ", ".join(describe_inputs(v) for v in inputs) + ")"
    return type(inputs).__name__


def expected_input(model: nn.Module) -> str:
    """What the first layer with parameters expects, in words (used when example inputs do not fit)."""
    for name, m in model.named_modules():
        if next(m.parameters(recurse=False), None) is None and not isinstance(m, nn.MultiheadAttention):
            continue
        where = f"The model's first layer '{name}' ({type(m).__name__})"
        if isinstance(m, nn.modules.conv._ConvNd):
            spatial = ", ".join("HWD"[i] for i in range(len(m.kernel_size)))
            return f"{where} expects a tensor of shape (N, {m.in_channels}, {spatial})"
        if isinstance(m, nn.Linear):
            return f"{where} expects a tensor of shape (..., {m.in_features})"
        if isinstance(m, nn.Embedding):
            return f"{where} expects integer token ids in [0, {m.num_embeddings})"
        if isinstance(m, nn.MultiheadAttention):
            return f"{where} expects (query, key, value) tensors of width {m.embed_dim}"
        return f"{where} has no known input shape"
    return "The model has no parameters"


def check_inputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Run the model once on the example inputs (eval mode, no grad) and return its output tensors; turn a
    failure into a ValueError that names the expected input (called before any tracing starts)."""
    try:
        with torch.no_grad(), eval_mode(model):
            out = call(model, inputs)
    except Exception as err:  # any failure inside forward means the inputs do not fit
        raise ValueError(
            f"example_inputs do not fit the model: calling it on {describe_inputs(inputs)} raised "
            f"{type(err).__name__}: {err}. {expected_input(model)}. Pass a tensor (called as "
            f"model(x)), a tuple (model(*x)) or a dict (model(**x)) shaped like one real batch."
        ) from err
    if not flatten_outputs(out):
        raise ValueError("the model's output on example_inputs contains no tensor; structkit compares outputs "
                         "to verify pruning, so the model must return tensors (or tuples/dicts of them).")
    return [t.detach().clone() for t in flatten_outputs(out)]
