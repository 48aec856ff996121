"""The ``compress`` stage: trained model -> recalibrated, measured, pruned (verified) and optionally fine-tuned slim
model, saved as ``slim.pt`` with its numbers in ``results/compress.json``.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from torch import nn

from .config import Config, training_hash
from .run_folder import RunFolder, open_stage, say_cpu, write_report
from .setup import Log, Setup, recalibration_batches, trained_setup
from .target import selection_for, target_summary
from .train_stage import sparsity_summary
from .training import evaluate, recalibrate_batchnorm

__all__ = ["compress"]


def compress(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None,
             setup: Setup | None = None) -> dict[str, Any]:
    """Recalibrate BatchNorm, measure the trained model, prune it (verified), measure the slim model. ``setup``:
    the one the training of this ``structkit run`` built (reused, see :func:`structkit.setup.trained_setup`)."""
    from .data import make_loaders
    from .prune import prune
    from .slim import save_slim, structkit_source

    log = log or Log()
    t0 = time.perf_counter()
    folder, config = open_stage(out, overrides, "compress")
    setup, _ = trained_setup(folder, config, "compress", setup)
    s = config.schedule
    say_cpu(log, folder, "compress", "BatchNorm recalibration, test accuracy, pruning and its verification")
    _, _, test_loader = make_loaders(setup.splits, s.batch_size, seed=s.seed, eval_batch_size=s.eval_batch_size,
                                     num_workers=config.data.num_workers)
    model = setup.model
    recalibrate_batchnorm(model, recalibration_batches(setup), s.precision)
    trained = evaluate(model, test_loader, s.precision)
    selection = projected = None
    if config.compress.target is not None:  # remove exactly the groups the target needs (structkit/target.py)
        selection = selection_for(config, setup)
        log(f"compress.target: {target_summary(selection)}")
        if selection.added_ids:  # a projection: these groups are set to zero in the trained model
            setup.groupset.zero_(selection.added_ids)
            recalibrate_batchnorm(model, recalibration_batches(setup), s.precision)
            projected = evaluate(model, test_loader, s.precision)
    metrics = setup.groupset.metrics()
    slim, report = prune(model, setup.groupset, setup.verify_inputs, round_to=config.prune.round_to,
                         verify_tol=config.prune.verify_tol)
    slim_eval = evaluate(slim, test_loader, s.precision)
    pruned_eval, finetune_record = slim_eval, None
    if config.finetune.epochs:
        finetune_record = _finetune(folder, config, setup, model, slim, log)
        slim_eval = evaluate(slim, test_loader, s.precision)
    save_slim(slim, folder / "slim.pt", source=structkit_source(config.model.name, config.model.options,
                                                                setup.splits.input_shape, setup.splits.num_classes))
    result = {"accuracy": {"trained": trained["accuracy"], "slim": slim_eval["accuracy"]},
              "loss": {"trained": trained["loss"], "slim": slim_eval["loss"]},
              "sparsity": sparsity_summary(metrics), "layers": metrics["layers"], "prune": report.to_dict(),
              "seconds": time.perf_counter() - t0}
    if selection is not None:  # "projected": the trained model with the added groups zeroed, which slim_pruned equals
        result["target"] = selection.to_dict()
        if projected is not None:
            result["accuracy"]["projected"] = projected["accuracy"]
    if finetune_record is not None:  # "slim" is the shipped (fine-tuned) model; "slim_pruned" the verified one
        result["accuracy"]["slim_pruned"] = pruned_eval["accuracy"]
        result["loss"]["slim_pruned"] = pruned_eval["loss"]
        result["finetune"] = finetune_record
    folder.save_result("compress", result)
    log(f"pruned: {report.summary()}")
    from .report import collapse_warnings
    for warning in collapse_warnings(result):
        print(f"structkit: warning: {warning}", file=sys.stderr, flush=True)  # shown even with --quiet
    log(f"test accuracy: trained {trained['accuracy']:.4f}, slim {slim_eval['accuracy']:.4f}")
    write_report(folder)
    return result


def _finetune(folder: RunFolder, config: Config, setup: Setup, dense: nn.Module, slim: nn.Module, log: Log):
    """The fine-tuning stage (structkit/finetune.py) on the slim model, resumable from its epoch checkpoints."""
    from .data import make_loaders
    from .finetune import finetune

    f, s = config.finetune, config.schedule
    train_loader, val_loader, _ = make_loaders(setup.splits, s.batch_size, seed=s.seed + 7,
                                               eval_batch_size=s.eval_batch_size, num_workers=config.data.num_workers)
    key = {"training_hash": training_hash(config), "finetune": f.model_dump(mode="json"),
           "round_to": config.prune.round_to}
    log(f"fine-tuning the slim model: {f.epochs} epoch(s), AdamW lr {f.lr:g} with cosine decay"
        + (f", distilled from the dense model (T {f.temperature:g}, alpha {f.alpha:g})" if f.distill else ""))
    t0 = time.perf_counter()
    recalibration = recalibration_batches(setup)
    history = finetune(slim, train_loader, f, checkpoints=folder.checkpoints, key=key,
                       teacher=dense if f.distill else None, precision=s.precision,
                       recalibration=recalibration, val_loader=val_loader, log=log)
    recalibrate_batchnorm(slim, recalibration, s.precision)
    slim.eval()
    return {"epochs": f.epochs, "distill": f.distill, "history": history, "seconds": time.perf_counter() - t0,
            "budget_epochs": s.epochs + f.epochs}
