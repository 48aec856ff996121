"""The deployment stages: ``export`` (dense.onnx and slim.onnx, each checked against torch in ONNX Runtime) and
``bench`` (their ONNX Runtime latency, interleaved), with their numbers in ``results/export.json`` and
``results/bench.json``.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import torch

from .run_folder import open_stage, read_slim, say_cpu, write_report
from .setup import Log, Setup, trained_setup

__all__ = ["export", "bench"]


def export(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None,
           setup: Setup | None = None) -> dict[str, Any]:
    """Export the trained (dense) and slim models to ONNX, each checked against torch in ONNX Runtime. ``setup``:
    the one the training of this ``structkit run`` built (reused, see :func:`structkit.setup.trained_setup`)."""
    log = log or Log()
    t0 = time.perf_counter()
    folder, config = open_stage(out, overrides, "export", needs="compress")
    setup, _ = trained_setup(folder, config, "export", setup)
    slim = read_slim(folder, build=lambda: copy.deepcopy(setup.model))
    say_cpu(log, folder, "export", "the ONNX export and its check in ONNX Runtime")
    d = config.deploy
    result = {}
    for name, model in (("dense", setup.model), ("slim", slim)):
        result[name] = setup.task.export(setup, model, folder / f"{name}.onnx", opset=d.opset, exporter=d.exporter)
        result[name]["path"] = f"{name}.onnx"
        log(f"exported {name}.onnx ({result[name]['bytes']:,} bytes; max |ORT - torch| "
            f"{result[name]['max_abs_diff']:.2g})")
    result["seconds"] = time.perf_counter() - t0
    folder.save_result("export", result)
    write_report(folder)
    return result


def bench(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None,
          setup: Setup | None = None) -> dict[str, Any]:
    """ONNX Runtime latency of dense.onnx and slim.onnx (see structkit.deploy.measure_latency). ``setup``: the one
    the training of this ``structkit run`` built; its test split gives the inputs (otherwise the data is loaded:
    :meth:`structkit.tasks.Task.bench_inputs` makes them)."""
    from .deploy import environment, measure_latency

    log = log or Log()
    t0 = time.perf_counter()
    folder, config = open_stage(out, overrides, "bench", needs="export")
    if setup is None or not setup.built_from(config):  # the data only (no model, no groups): what the inputs need
        from .tasks import get_task
        task = get_task(config.task)
        setup = Setup(config, task.build_data(config), None, None, None, None, task)
    make_inputs = setup.task.bench_inputs(setup)

    d = config.deploy
    log(f"timing dense.onnx and slim.onnx at batch {', '.join(map(str, d.batch_sizes))} "
        f"({d.threads} threads, {d.warmup} warm-up + {d.runs} timed runs, interleaved; ONNX Runtime on the CPU)")
    latency = measure_latency({"dense": folder / "dense.onnx", "slim": folder / "slim.onnx"}, make_inputs,
                              d.batch_sizes, threads=d.threads, warmup=d.warmup, runs=d.runs,
                              graph_optimization=d.graph_optimization)
    env = environment()
    env["torch_threads"] = torch.get_num_threads()
    result = {"latency": latency, "environment": env, "seconds": time.perf_counter() - t0}
    folder.save_result("bench", result)
    for batch in map(str, d.batch_sizes):
        row = latency[batch]
        log(f"batch {batch}: dense {row['dense_p50_ms']:.3f} ms, slim {row['slim_p50_ms']:.3f} ms (p50) -> "
            f"{row['speedup']:.2f}x")
    write_report(folder)
    return result
