"""Deployment: export a model to ONNX and measure its latency in ONNX Runtime (CPU).

Three steps, one per public function:

* ``export_onnx`` writes a verified ONNX file: the model is exported in eval mode with a dynamic batch dimension,
  run in ONNX Runtime on the example inputs and compared with torch before the file appears at its path (written
  to a temporary file in the same folder, then ``os.replace``), so a path never holds a half-written or
  unverified model.
* ``ort_session`` opens a file with explicit, reproducible session settings (thread counts, graph optimization
  level, sequential execution, CPU provider).
* ``measure_latency`` is the latency protocol used to report a pruning speedup: all models in one process with the
  same thread count, warm-up, then timed runs with the models interleaved (A B, B A, A B, ...) so that drift of the
  machine (frequency, other tenants, caches) hits every model alike; p50, p90 and mean per model and batch size.

Why session settings are part of the protocol: with ``ORT_ENABLE_ALL`` ONNX Runtime runs convolutions in a blocked
channel layout (NCHWc, blocks of 16 channels with AVX-512, 8 with AVX2). Widths that are not multiples of the block
fall off that fast path, so an unaligned slim model can be slower than the dense one, while the dense model itself
can be 1.7x slower with ``ORT_ENABLE_EXTENDED`` (docs/deployment.md has the measurements). A speedup is only honest
when both models run at their own fastest setting: ``graph_optimization="fastest"`` picks it per model.

``environment()`` records what a latency number depends on (CPU, cores, library versions) for reports.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import time
import uuid
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

import structkit
from .structure._util import flatten_outputs

EXPORTERS = ("torchscript", "dynamo")
GRAPH_OPTIMIZATION = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
FASTEST_CANDIDATES = ("all", "extended")  # the levels between which graph_optimization="fastest" chooses
PILOT_RUNS = 10  # interleaved runs per model and candidate level in the "fastest" pilot

# What ONNX Runtime raises when a file cannot be loaded (missing, not protobuf, invalid graph, unknown op).
_ORT_LOAD_ERRORS = (ort_errors.Fail, ort_errors.InvalidArgument, ort_errors.InvalidGraph, ort_errors.InvalidProtobuf,
                    ort_errors.NoSuchFile, ort_errors.NotImplemented, ort_errors.RuntimeException)


def export_onnx(model: torch.nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor], path: str | Path, *,
                opset: int = 18, exporter: str = "torchscript",
                dynamic_axes: Mapping[str, Mapping[int, str] | Sequence[int]] | None = None,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                check: bool = True, atol: float = 1e-4) -> dict[str, Any]:
    """Export ``model`` in eval mode to the ONNX file ``path``, verified against torch when ``check`` is true.

    Args:
        model: the module; exported in eval mode, the training flags of its modules are restored afterwards.
        example_inputs: a tensor or a tuple of tensors, passed positionally to ``model``.
        path: the ONNX file to write; its folder is created. The export goes to a temporary file in the same folder,
            which replaces ``path`` (``os.replace``, atomic on one file system) only after export and check passed;
            on any failure the temporary file is removed and ``path`` is left as it was.
        opset: ONNX opset version.
        exporter: ``"torchscript"`` (``torch.onnx.export(..., dynamo=False)``, the default: as fast in ONNX Runtime
            as the dynamo graph on the CNN and MLP of docs/deployment.md, faster on BERT (docs/minilm.md), and
            exports in a fraction of the time) or ``"dynamo"`` (``torch.export`` based, needs onnxscript).
        dynamic_axes: extra dynamic axes in ``torch.onnx.export``'s form, ``{name: {axis: axis_name}}`` or
            ``{name: [axis, ...]}``, keyed by input or output name, e.g. ``{"input_ids": {1: "sequence"}}``. Axis 0
            of every input and output is always dynamic (``"batch"``). The dynamo exporter infers output axes from
            the input axes, so only input entries matter there; equal axis names are one dimension.
        input_names: ONNX input names; default ``"input"`` for one input, else ``"input_0"``, ``"input_1"``, ...
        output_names: ONNX output names for the flattened outputs (see ``flatten_outputs``); default ``"output"``
            for one output, else ``"output_0"``, ...
        check: run the file in ONNX Runtime on ``example_inputs`` and compare every flattened output with torch.
        atol: tolerance of the check, relative to ``max(1, max |torch output|)``.

    Returns:
        ``{"path": str, "exporter": str, "opset": int, "max_abs_diff": float (None without check), "bytes": int}``.

    Raises:
        RuntimeError: the ONNX Runtime outputs differ from torch by more than the tolerance (the message names both);
            nothing is written to ``path`` then.

    The file is self-contained (weights inside, no external data file), which limits it to protobuf's 2 GB.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"Invalid exporter {exporter!r}: use one of {EXPORTERS}")
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ImportError("exporter='dynamo' needs onnxscript (pip install onnxscript); or use exporter='torchscript'")
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors")
    path = Path(path)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            expected = flatten_outputs(model(*inputs), strict=True)
        input_names = _names(input_names, len(inputs), "input")
        output_names = _names(output_names, len(expected), "output")
        axes = _dynamic_axes(dict(zip(input_names, inputs)), dict(zip(output_names, expected)), dynamic_axes)
        path.parent.mkdir(parents=True, exist_ok=True)
        # A unique name next to path (os.replace is atomic within one file system); not mkstemp, whose 0600 mode
        # would carry over to the final file.
        tmp = str(path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"))
        try:
            _export(model, inputs, tmp, exporter, opset, input_names, output_names, axes)
            diff = _check(tmp, dict(zip(input_names, inputs)), expected, atol, exporter) if check else None
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    finally:
        for module, training in modes:
            module.training = training
    return {"path": str(path), "exporter": exporter, "opset": opset, "max_abs_diff": diff,
            "bytes": path.stat().st_size}


def _names(names: Sequence[str] | None, count: int, stem: str) -> list[str]:
    """Given names checked against the count, or default names ``stem`` / ``stem_0``, ``stem_1``, ..."""
    if names is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    if len(names) != count:
        raise ValueError(f"{len(names)} {stem} names given for {count} {stem}s of the model: {list(names)}")
    return list(names)


def _dynamic_axes(inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
                  extra: Mapping[str, Mapping[int, str] | Sequence[int]] | None) -> dict[str, dict[int, str]]:
    """Dynamic axes of every named input and output: axis 0 as ``"batch"``, merged with the caller's ``extra``."""
    axes = {name: {0: "batch"} for name, x in {**inputs, **outputs}.items() if x.dim() > 0}
    for name, given in (extra or {}).items():
        if name not in inputs and name not in outputs:
            raise ValueError(f"dynamic_axes names {name!r}, which is neither an input {list(inputs)} nor an "
                             f"output {list(outputs)}; pass input_names/output_names or use these names")
        if not isinstance(given, Mapping):
            given = {axis: f"{name}_{axis}" for axis in given}
        axes[name] = {**axes.get(name, {}), **given}
    return axes


class _Positional(torch.nn.Module):
    """Calls the wrapped model with exactly the positional inputs given (for the TorchScript exporter).

    The TorchScript exporter appends the default value of every further parameter of ``forward`` as a positional
    argument, which breaks forwards whose decorators pass such parameters by keyword (Hugging Face models in
    transformers 5: "got multiple values for argument 'use_cache'"); a ``forward(*inputs)`` has no such parameters.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *inputs: torch.Tensor) -> Any:
        return self.model(*inputs)


def _export(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], file: str, exporter: str, opset: int,
            input_names: list[str], output_names: list[str], axes: dict[str, dict[int, str]]) -> None:
    """Run the chosen torch exporter, silencing its deprecation notices (the legacy exporter announces itself)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if exporter == "torchscript":
            torch.onnx.export(_Positional(model).eval(), inputs, file, dynamo=False, opset_version=opset,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)
        else:
            dims = {dim: torch.export.Dim(dim) for name in input_names for dim in axes.get(name, {}).values()}
            shapes = tuple({axis: dims[dim] for axis, dim in axes.get(name, {}).items()} for name in input_names)
            torch.onnx.export(model, inputs, file, dynamo=True, opset_version=opset, input_names=input_names,
                              output_names=output_names, dynamic_shapes=shapes, external_data=False, verbose=False)


def _check(file: str, inputs: dict[str, torch.Tensor], expected: list[torch.Tensor], atol: float,
           exporter: str) -> float:
    """Largest absolute difference between ONNX Runtime's and torch's outputs; raises above the tolerance."""
    session = ort_session(file)
    used = {i.name for i in session.get_inputs()}  # an exporter may drop inputs the graph does not use
    got = session.run(None, {name: x.detach().cpu().numpy() for name, x in inputs.items() if name in used})
    if len(got) != len(expected):
        raise RuntimeError(f"the {exporter} export has {len(got)} outputs, the torch model {len(expected)}")
    diff, scale = 0.0, 1.0
    for i, (onnx_out, torch_out) in enumerate(zip(got, expected)):
        ref = torch_out.detach().cpu().double().numpy()
        if onnx_out.shape != ref.shape:
            raise RuntimeError(f"output {i} of the {exporter} export has shape {onnx_out.shape}, torch {ref.shape}")
        if ref.size:
            diff = max(diff, float(np.max(np.abs(onnx_out.astype(np.float64) - ref))))
            scale = max(scale, float(np.max(np.abs(ref))))
    if not diff <= atol * scale:  # also catches NaN
        raise RuntimeError(f"ONNX Runtime output of the {exporter} export differs from torch: max abs diff {diff:.3g} "
                           f"> atol {atol:g} x max(1, max|torch output|) = {atol * scale:.3g}. Try the other "
                           f"exporter, or look for ops that trace differently (data-dependent Python control "
                           f"flow); check=False skips this check.")
    return diff


def ort_session(path: str | Path, *, threads: int = 2, graph_optimization: str = "all",
                spinning: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with explicit settings: ``threads`` intra-op threads, one inter-op thread,
    sequential execution and ``graph_optimization`` in {"all", "extended", "basic", "disabled"}.

    ``spinning`` (ONNX Runtime's default) lets the intra-op worker threads busy-wait after a run, which saves their
    wake-up time when the same session runs again at once; ``measure_latency`` turns it off, because a session's
    spinning threads take cores from the next session's run (see docs/deployment.md).

    Raises ``ValueError`` naming the file when ONNX Runtime cannot load it (missing, truncated, not ONNX).
    """
    if graph_optimization not in GRAPH_OPTIMIZATION:
        raise ValueError(f"Invalid graph_optimization {graph_optimization!r}: use one of {list(GRAPH_OPTIMIZATION)}")
    if threads < 1:
        raise ValueError(f"Invalid threads {threads}: need at least 1")
    options = ort.SessionOptions()
    options.graph_optimization_level = GRAPH_OPTIMIZATION[graph_optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    except _ORT_LOAD_ERRORS as err:
        raise ValueError(f"cannot load ONNX model {path}: {err}. The file is missing or not a valid ONNX model; "
                         f"re-export it with structkit.deploy.export_onnx(model, example_inputs, path).") from err


def measure_latency(models: Mapping[str, str | Path], make_inputs: Callable[[int], dict[str, np.ndarray]],
                    batch_sizes: Sequence[int] = (1, 64), *, threads: int = 2, warmup: int = 20, runs: int = 100,
                    graph_optimization: str | Mapping[str, str] = "fastest") -> dict[str, Any]:
    """Latency of ONNX models under one protocol, for comparing them (e.g. a dense and a pruned model).

    Protocol: every model runs in this process with ``threads`` intra-op threads that sleep rather than spin
    between runs (spinning threads of one session take cores from the next: with 2 cores, interleaving spinning
    sessions made a batch-64 CNN 1.5x slower, see docs/deployment.md). Per batch size, the inputs
    ``make_inputs(batch)`` (a dict input name -> array, fed unchanged to every model) are built once; then
    ``warmup`` untimed rounds and ``runs`` timed rounds, each round running every model once, in the given order in
    even rounds and reversed in odd rounds (A B, B A, ...), so that neither model always runs first or after the
    other and drift of the machine hits all models alike. Each run is timed with ``time.perf_counter``.

    ``graph_optimization`` is a level of ``ort_session`` or ``"fastest"``, for every model, or a dict giving one of
    these per model name. ``"fastest"`` (default): per batch size, after ``warmup`` rounds, a pilot of
    ``PILOT_RUNS`` interleaved rounds runs every model at every candidate level (``FASTEST_CANDIDATES``), and each
    model is timed at its level with the lower pilot median. A speedup is only meaningful with both models at
    their fastest setting (see the module docstring).

    Returns ``{str(batch): {"<name>_p50_ms", "<name>_p90_ms", "<name>_mean_ms" for every model, "settings":
    {name: level}, and "speedup" = dense p50 / slim p50 when the models are exactly "dense" and "slim"}, ...,
    "protocol": {"threads", "warmup", "runs", "interleaved": True, "spinning": False, "graph_optimization"}}``.
    """
    if not models:
        raise ValueError("measure_latency needs at least one model")
    if runs < 1 or warmup < 0:
        raise ValueError(f"Invalid runs={runs} / warmup={warmup}: need runs >= 1 and warmup >= 0")
    candidates = _candidate_levels(models, graph_optimization)
    sessions = {(name, level): ort_session(models[name], threads=threads, graph_optimization=level, spinning=False)
                for name, levels in candidates.items() for level in levels}
    result: dict[str, Any] = {}
    for batch in batch_sizes:
        feed = {name: np.ascontiguousarray(x) for name, x in make_inputs(batch).items()}
        for (name, _), session in sessions.items():
            missing = {i.name for i in session.get_inputs()} - set(feed)
            if missing:
                raise ValueError(f"make_inputs({batch}) lacks inputs {sorted(missing)} of model {name!r}; "
                                 f"it gave {sorted(feed)}")
        if len(sessions) > len(models):
            _interleave(list(sessions.values()), feed, warmup)
            pilot = dict(zip(sessions, _interleave(list(sessions.values()), feed, PILOT_RUNS)))
            settings = {name: min(levels, key=lambda level: np.median(pilot[name, level]))
                        for name, levels in candidates.items()}
        else:
            settings = {name: levels[0] for name, levels in candidates.items()}
        chosen = [sessions[name, settings[name]] for name in models]
        _interleave(chosen, feed, warmup)
        row: dict[str, Any] = {}
        for name, seconds in zip(models, _interleave(chosen, feed, runs)):
            ms = seconds * 1e3
            row[f"{name}_p50_ms"] = float(np.percentile(ms, 50))
            row[f"{name}_p90_ms"] = float(np.percentile(ms, 90))
            row[f"{name}_mean_ms"] = float(ms.mean())
        if set(models) == {"dense", "slim"}:
            row["speedup"] = row["dense_p50_ms"] / row["slim_p50_ms"]
        row["settings"] = settings
        result[str(batch)] = row
    result["protocol"] = {"threads": threads, "warmup": warmup, "runs": runs, "interleaved": True,
                          "spinning": False, "graph_optimization": graph_optimization if
                          isinstance(graph_optimization, str) else dict(graph_optimization)}
    return result


def _candidate_levels(models: Mapping[str, Any], graph_optimization: str | Mapping[str, str]) -> dict[str, tuple]:
    """The levels each model may run at: ``FASTEST_CANDIDATES`` for "fastest", else the one level given."""
    if isinstance(graph_optimization, Mapping):
        per_model = dict(graph_optimization)
    else:
        per_model = dict.fromkeys(models, graph_optimization)
    if set(per_model) != set(models):
        raise ValueError(f"graph_optimization names models {sorted(per_model)}, but the models are {sorted(models)}")
    for name, level in per_model.items():
        if level != "fastest" and level not in GRAPH_OPTIMIZATION:
            raise ValueError(f"Invalid graph_optimization {level!r} for model {name!r}: use 'fastest' or one of "
                             f"{list(GRAPH_OPTIMIZATION)}")
    return {name: FASTEST_CANDIDATES if per_model[name] == "fastest" else (per_model[name],) for name in models}


def _interleave(sessions: list[ort.InferenceSession], feed: dict[str, np.ndarray], rounds: int) -> list[np.ndarray]:
    """Seconds of each run: ``rounds`` rounds of one run per session, order reversed every other round."""
    times = [np.empty(rounds) for _ in sessions]
    forward = list(enumerate(sessions))
    backward = forward[::-1]
    for r in range(rounds):
        for i, session in forward if r % 2 == 0 else backward:
            start = time.perf_counter()
            session.run(None, feed)
            times[i][r] = time.perf_counter() - start
    return times


def environment() -> dict[str, Any]:
    """What a latency number depends on: CPU model, logical cores, Python, platform and library versions."""
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "structkit": structkit.__version__,
        "ort_providers": ort.get_available_providers(),
    }
