"""The ``compress`` stage: trained model -> recalibrated, measured, pruned (verified) and optionally fine-tuned slim
model, saved as ``slim.pt`` with its numbers in ``results/compress.json``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Config, training_hash
from .run_folder import RunFolder, open_stage, say_cpu, write_report
from .selection import target_summary
from .setup import Log, Setup, recalibration_batches, trained_setup
from .target import selection_for
from .train_stage import sparsity_summary
from .training import recalibrate_batchnorm

__all__ = ["compress"]


def compress(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None,
             setup: Setup | None = None) -> dict[str, Any]:
    """Recalibrate BatchNorm, measure the trained model, prune it (verified), measure the slim model. ``setup``:
    the one the training of this ``structkit run`` built (reused, see :func:`structkit.setup.trained_setup`)."""
    from .prune import prune
    from .slim import save_slim

    log = log or Log()
    t0 = time.perf_counter()
    folder, config = open_stage(out, overrides, "compress")
    setup, checkpoint = trained_setup(folder, config, "compress", setup)
    s = config.schedule
    say_cpu(log, folder, "compress", "BatchNorm recalibration, test accuracy, pruning and its verification")
    task, metric = setup.task, setup.task.primary_metric
    _, _, test_loader = task.loaders(setup, seed=s.seed)
    model = setup.model
    recalibrate_batchnorm(model, recalibration_batches(setup), s.precision)
    trained = task.evaluate(model, test_loader, s.precision)
    selection = projected = None
    if config.compress.target is not None:  # remove exactly the groups the target needs (structkit/target.py)
        selection = selection_for(config, setup)
        overshoot = not selection.within_tolerance and selection.added_groups == 0 and \
            selection.reached <= selection.target  # the exact zeros alone are below the target
        if config.compress.final_stage == "fixed" and overshoot:
            selection.note = (f"the final stage kept the structure selected at its start, which reaches "
                              f"{selection.reached:.3f}; the training log says why that is below the target")
        log(f"compress.target: {target_summary(selection)}")
        if selection.added_ids:  # a projection: these groups are set to zero in the trained model
            setup.groupset.zero_(selection.added_ids)
            recalibrate_batchnorm(model, recalibration_batches(setup), s.precision)
            projected = task.evaluate(model, test_loader, s.precision)
    metrics = setup.groupset.metrics()
    slim, report = prune(model, setup.groupset, setup.verify_inputs, round_to=config.prune.round_to,
                         verify_tol=config.prune.verify_tol)
    slim_eval = task.evaluate(slim, test_loader, s.precision)
    pruned_eval, finetune_record = slim_eval, None
    if config.finetune.epochs:
        slim = task.finetune_start(setup, slim)
        finetune_record = _finetune(folder, config, setup, model, slim, log, checkpoint["rng"]["torch"])
        slim_eval = task.evaluate(slim, test_loader, s.precision)
    save_slim(slim, folder / "slim.pt", source=task.slim_source(setup))
    result = {"metric": metric, metric: {"trained": trained[metric], "slim": slim_eval[metric]},
              "loss": {"trained": trained["loss"], "slim": slim_eval["loss"]},
              "metrics": {"trained": trained, "slim": slim_eval},
              "sparsity": sparsity_summary(metrics), "layers": metrics["layers"], "prune": report.to_dict(),
              "seconds": time.perf_counter() - t0}
    if selection is not None:  # "projected": the trained model with the added groups zeroed, which slim_pruned equals
        result["target"] = selection.to_dict()
        if projected is not None:
            result[metric]["projected"] = projected[metric]
    if finetune_record is not None:  # "slim" is the shipped (fine-tuned) model; "slim_pruned" the verified one
        result[metric]["slim_pruned"] = pruned_eval[metric]
        result["loss"]["slim_pruned"] = pruned_eval["loss"]
        result["finetune"] = finetune_record
    folder.save_result("compress", result)
    log(f"pruned: {report.summary()}")
    from .report import collapse_warnings
    for warning in collapse_warnings(result):
        print(f"structkit: warning: {warning}", file=sys.stderr, flush=True)  # shown even with --quiet
    log(f"test {metric}: trained {trained[metric]:.4f}, slim {slim_eval[metric]:.4f}")
    write_report(folder)
    return result


def _finetune(folder: RunFolder, config: Config, setup: Setup, dense: nn.Module, slim: nn.Module, log: Log,
              torch_rng: torch.Tensor):
    """The fine-tuning stage (structkit/finetune.py) on the slim model, resumable from its epoch checkpoints. Its
    random numbers (dropout) continue the training's stream (``torch_rng``: the last checkpoint's torch state)."""
    from .finetune import finetune

    f, s, task = config.finetune, config.schedule, setup.task
    if f.distill and task.batch_loss is not None:
        raise ValueError(f"finetune.distill (logit distillation) is for classification; task {config.task} has its "
                         f"own loss: set finetune.distill: false")
    train_loader, val_loader, _ = task.loaders(setup, seed=s.seed + 7, stage="finetune")
    key = {"training_hash": training_hash(config), "finetune": f.model_dump(mode="json"),
           "round_to": config.prune.round_to}
    log(f"fine-tuning the slim model: {f.epochs} epoch(s), AdamW lr {f.lr:g} "
        + ("with cosine decay" if f.lr_schedule == "cosine" else "constant")
        + (f", distilled from the dense model (T {f.temperature:g}, alpha {f.alpha:g})" if f.distill else ""))
    t0 = time.perf_counter()
    recalibration = recalibration_batches(setup)
    torch.set_rng_state(torch_rng)
    history = finetune(slim, train_loader, f, checkpoints=folder.checkpoints, key=key,
                       teacher=dense if f.distill else None, precision=s.precision,
                       recalibration=recalibration, val_loader=val_loader, log=log, task=task)
    recalibrate_batchnorm(slim, recalibration, s.precision)
    slim.eval()
    return {"epochs": f.epochs, "distill": f.distill, "history": history, "seconds": time.perf_counter() - t0,
            "budget_epochs": s.epochs + f.epochs}
