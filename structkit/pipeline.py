"""``structkit run``: config -> trained, verified, exported and measured slim model, in one output folder.

One pipeline for every task (the config's ``task``: classification, causal_lm, sentence_distillation; see
:mod:`structkit.tasks`): the task supplies data, model, loss, metrics and the example inputs; the stages below,
the solver, resume, DDP, pruning, fine-tuning, export and the report are the same for all of them. "Test
accuracy" below is the task's lead metric (cosine_mean for sentence distillation, perplexity for a causal LM).

Stages (each also a CLI command), and what each one leaves in the output folder ``out``::

    train     checkpoints/epoch_NNNN.pt (atomic, one per epoch), metrics.jsonl, config.yaml, run_info.json
    compress  slim.pt, results/compress.json   (recalibrate BN -> test accuracy -> GroupSet metrics -> prune
                                                 (verified) -> slim test accuracy)
    export    dense.onnx, slim.onnx, results/export.json   (each checked in ONNX Runtime against torch)
    bench     results/bench.json                (ONNX Runtime latency, dense and slim interleaved)
    (every stage then rewrites report.json, report.md and the plots from whatever results exist)

Resuming (``resume=True``) continues from the last checkpoint: model, optimizer and stage-scheduler state,
the torch / numpy / Python random states and the training loader's generator are restored, so a resumed run
produces exactly the numbers of an uninterrupted one. A checkpoint is only resumed under the same training
settings (:data:`structkit.config.TRAINING_SECTIONS`); prune and deploy settings may change.

Devices: ``train`` runs on ``schedule.device`` (model, batches, solver state; :mod:`structkit.device`).
Checkpoints hold CPU tensors and are read with ``map_location="cpu"``, and the device is not part of the
training settings, so a run trained on a GPU resumes on the CPU and vice versa. ``compress`` (BatchNorm
recalibration, test accuracy, pruning and its verification), ``export`` and ``bench`` always run on the CPU,
on a model rebuilt from the last checkpoint (a CPU copy of the trained weights): the pruning and the ONNX export
are CPU code here, and ONNX Runtime's latency is measured with its CPU execution provider.

State: :func:`run` loads the data and traces the model once. The set-up its training built
(:class:`~structkit.setup.Setup`) goes to the later stages, which rewind it and load the last checkpoint's
weights into it, so they compute what a stand-alone stage command (which builds its own) computes.

This module is the public face of the pipeline: :func:`run`, :func:`inspect` and the names below. The work is in
:mod:`structkit.setup` (config -> data, model, groups, solver), :mod:`structkit.train_stage`,
:mod:`structkit.compress_stage`, :mod:`structkit.export_stages` (export, bench) and :mod:`structkit.run_folder`
(the output folder: checkpoints, results, run info, report).
"""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Any

# besides run and inspect, the names imported here are this module's public face (re-exported, see __all__;
# tests and benchmarks also use resolve_device, train_epoch, _to_cpu and _recalibration_batches from here)
from .config import Config, apply_overrides, load_config, validate
from . import distributed
from .compress_stage import compress
from .device import resolve as resolve_device
from .export_stages import bench, export
from .run_folder import (CHECKPOINT_FORMAT, RunFolder, _to_cpu, config_differences, git_commit, package_versions,
                         write_report)
from .setup import Log, Setup, build, load_data, make_solver, recalibration_batches, seed_everything
from .train_stage import train, train_keeping_setup
from .training import train_epoch

__all__ = ["run", "train", "compress", "export", "bench", "inspect", "RunFolder", "Log", "Setup", "build",
           "make_solver", "seed_everything", "load_data", "quiet_warnings", "write_report"]

#: the old private name (benchmarks/compare_solvers.py uses it)
_recalibration_batches = recalibration_batches


def run(config: Config | dict | str | Path, out: str | Path, *, resume: bool = False, overrides: list[str] | None = None,
        log: Log | None = None) -> dict[str, Any]:
    """The whole pipeline: train -> compress -> export -> bench -> report. Returns the report (report.json).
    The data is loaded and the model traced once: the training's set-up goes on to the later stages."""
    config = _as_config(config, overrides)
    log = log or Log()
    with quiet_warnings(log.quiet):
        _, setup = train_keeping_setup(config, out, resume=resume, log=log)
        if not distributed.is_main():  # under torchrun the other ranks only train
            return {}
        compress(out, log=log, setup=setup)
        export(out, log=log, setup=setup)
        bench(out, log=log, setup=setup)
    return json.loads((Path(out) / "report.json").read_text())


def inspect(config: Config | dict | str | Path, overrides: list[str] | None = None) -> str:
    """The config (YAML) and the table of groups its structure rules give on its model."""
    config = _as_config(config, overrides)
    setup = build(config)
    params = sum(p.numel() for p in setup.model.parameters())
    return (f"# config\n{config.to_yaml()}\n# model {config.model.name}: {params:,} parameters\n"
            f"# groups\n{setup.groupset.describe()}")


def _as_config(config: Config | dict | str | Path, overrides: list[str] | None = None) -> Config:
    if isinstance(config, (Config, dict)):
        data = config.to_dict() if isinstance(config, Config) else config
        return validate(apply_overrides(data, overrides or []))
    return load_config(config, overrides)


@contextlib.contextmanager
def quiet_warnings(quiet: bool):
    if not quiet:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

