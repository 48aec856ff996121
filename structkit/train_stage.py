"""The ``train`` stage: train (or resume training) a config's model with its structured solver into a run folder.

One epoch after another: the solver steps (:func:`structkit.training.train_epoch`), the stage scheduler,
BatchNorm recalibration, validation and the GroupSet's sparsity, then a checkpoint and ``metrics.jsonl``
(:mod:`structkit.run_folder`); under torchrun every rank trains its share and only rank 0 writes. A resumed run
continues from the last checkpoint with its random states, so it produces exactly the numbers of an
uninterrupted one.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ._io import write_text
from .config import Config, training_hash
from . import distributed
from .device import describe as describe_device, resolve as resolve_device
from .run_folder import RunFolder, checkpoint_to_resume, save_checkpoint, set_rng_state, write_metrics, write_report
from .setup import Log, Setup, build, make_solver, recalibration_batches, seed_everything
from .fixed_stage import fixed_stage_for
from .target import controller_for, cost_weighted
from .training import NonFiniteError, recalibrate_batchnorm, train_epoch

__all__ = ["train", "train_keeping_setup", "sparsity_summary"]


def _solver_stats(solver) -> dict[str, Any]:
    if hasattr(solver, "solver_stats"):
        return solver.solver_stats(reset=True)
    return {}


def sparsity_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """GroupSet metrics without the per-layer table."""
    return {k: v for k, v in metrics.items() if k != "layers"}


def train(config: Config, out: str | Path, *, resume: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Train (or continue training) into ``out``; returns the last epoch's record."""
    return train_keeping_setup(config, out, resume=resume, log=log)[0]


def train_keeping_setup(config: Config, out: str | Path, *, resume: bool = False,
                        log: Log | None = None) -> tuple[dict[str, Any], Setup]:
    """:func:`train`, also returning the set-up it built (data, model with the final weights, groups), for the
    later stages of the same ``structkit run`` (:func:`structkit.setup.trained_setup` rewinds it)."""
    from tqdm import tqdm

    main = distributed.is_main()  # under torchrun only rank 0 writes files and prints
    log = (log or Log()) if main else Log(quiet=True)
    # before anything is written: a CUDA run on a machine without CUDA fails here, naming the fix
    device = resolve_device(config.schedule.device,
                            local_rank=distributed.local_rank() if distributed.is_distributed() else None)
    folder = RunFolder(out)
    started = time.perf_counter()
    checkpoint = checkpoint_to_resume(folder, config, resume, log)
    distributed.barrier()
    if main:
        folder.record_invocation("train", config)
    setup = build(config, load_init=checkpoint is None)  # a resumed run's weights come from its checkpoint
    setup.groupset = cost_weighted(config, setup)  # compress.target: lam scaled per block by its cost
    model, groupset = setup.model, setup.groupset
    model.to(device)  # in place (the GroupSet keeps its parameters); before the solver, whose state follows them
    s, task = config.schedule, setup.task
    pin = device.type == "cuda"  # page-locked batches: the host -> GPU copies do not block the host
    train_loader, val_loader, _ = task.loaders(setup, seed=s.seed, pin_memory=pin)
    step_model: nn.Module = model
    if distributed.is_distributed():  # this rank's share of every global batch; DDP averages the gradients
        train_loader = DataLoader(setup.splits.train, num_workers=config.data.num_workers, generator=train_loader.generator,
                                  collate_fn=train_loader.collate_fn,
                                  pin_memory=pin, batch_sampler=distributed.ShardedBatchSampler(
                                      len(setup.splits.train), s.batch_size, distributed.rank(),
                                      distributed.world_size(), train_loader.generator))
        step_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        log(f"distributed: {distributed.world_size()} processes ({torch.distributed.get_backend()}), global batch "
            f"{s.batch_size}")
    solver, scheduler = make_solver(config, groupset, steps_per_epoch=len(train_loader), paper_ramp=task.paper_ramp)
    controller = controller_for(config, solver, setup, len(train_loader))  # compress.target: adapts lam
    fixed = fixed_stage_for(config, setup, solver)  # compress.final_stage: fixed
    recal = recalibration_batches(setup, device)  # in-memory data: moved once, reused
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # CPU tensors, copied into the parameters on `device`
        solver.load_state_dict(checkpoint["optimizer"])  # torch.optim moves the state to its parameters' device
        scheduler.load_state_dict(checkpoint["scheduler"])
        set_rng_state(checkpoint["rng"], train_loader.generator, device)
        history = checkpoint["history"]
        train_seconds = checkpoint["train_seconds"]
        start_epoch = checkpoint["epoch"]
        log(f"resuming {folder.path} after epoch {start_epoch} of {s.epochs}")
    else:
        seed_everything(s.seed)  # the same random stream from here on, however long the set-up took
        train_loader.generator.manual_seed(s.seed)
    if main:
        write_text(folder / "config.yaml", config.to_yaml())
    log(f"task {config.task}; model {config.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(groupset)} groups; solver {config.optimizer.name}; {len(setup.splits.train):,} training examples")
    log(f"training on {describe_device(device)} (schedule.device: {s.device}), precision {s.precision}")
    train_seconds += time.perf_counter() - started

    for epoch in range(start_epoch + 1, s.epochs + 1):
        t0 = time.perf_counter()
        if fixed is not None:
            fixed.begin_epoch(epoch, log)
        structure_fixed = fixed is not None and fixed.active  # then the controller has nothing to adapt
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{s.epochs}", disable=log.quiet, leave=True,
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if controller is not None and not structure_fixed:
                controller.after_step(step)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        try:
            if hasattr(train_loader, "set_epoch"):  # a task's loader whose batches depend on the epoch
                train_loader.set_epoch(epoch)
            try:
                train_loss = train_epoch(step_model, train_loader, solver, epoch=epoch, precision=s.precision,
                                         on_step=on_step, device=device, batch_loss=task.batch_loss)
            except NonFiniteError as err:
                files = folder.checkpoint_files()
                kept = (f"the last good checkpoint {files[-1][1]} (epoch {files[-1][0]}) is kept" if files
                        else "no epoch completed, so there is no checkpoint")
                raise NonFiniteError(f"{err} ({kept})", err.epoch, err.step) from None
            lr = solver.param_groups[0]["lr"]
            scheduler.step()
            recalibrate_batchnorm(model, recal, s.precision, device=device)
            val = task.evaluate(model, val_loader, s.precision, device=device)
            metrics = groupset.metrics()
            stats = _solver_stats(solver)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch, "train_loss": train_loss, **{f"val_{k}": v for k, v in val.items()},
                      **sparsity_summary(metrics), "lr": lr,
                      "mean_inner_iters": stats.get("mean_inner_iters"), "max_inner_iters": stats.get("max_inner_iters"),
                      "pg_solves": stats.get("pg_solves"), "screened_fraction": stats.get("screened_fraction"),
                      "kept": {name: e["kept"] for name, e in metrics["layers"].items()},
                      "epoch_seconds": seconds}
            if controller is not None:  # the last check of the epoch: the identified structure's cost and lam
                record["target"] = controller.epoch_summary()
                if structure_fixed:  # no checks: the structure is fixed, lam is 0
                    record["target"].update(final_stage="fixed", lam=0.0)
            history.append(record)
            train_seconds += seconds
            if main:
                save_checkpoint(folder, epoch, config, model, solver, scheduler, train_loader.generator, history,
                                train_seconds, device)
                write_metrics(folder, history)  # after the checkpoint: metrics.jsonl never runs ahead of it
            wgs = metrics["weighted_group_sparsity"]
            bar.set_postfix(loss=f"{train_loss:.3f}", **{f"val_{task.primary_metric}": f"{val[task.primary_metric]:.3f}"},
                            wgs="-" if wgs is None else f"{wgs:.3f}",
                            inner=f"{stats.get('mean_inner_iters', 0.0):.1f}", refresh=False)
        finally:
            bar.close()
    if fixed is not None:
        fixed.close()
    if start_epoch == s.epochs:
        log(f"training already complete ({s.epochs} epochs)")
    if not main:
        return history[-1], setup
    write_metrics(folder, history)
    folder.save_result("train", {"epochs": s.epochs, "seconds": train_seconds, "final": history[-1] if history else None,
                                 "solver": _solver_summary(config, history), "training_hash": training_hash(config),
                                 "device": str(device), "precision": s.precision})
    write_report(folder)
    return history[-1], setup


def _solver_summary(config: Config, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Inner-solver statistics over the whole training (from the per-epoch records, so resume-proof)."""
    solves = sum(r.get("pg_solves") or 0 for r in history)
    iters = sum((r.get("mean_inner_iters") or 0.0) * (r.get("pg_solves") or 0) for r in history)
    return {"name": config.optimizer.name, "mean_inner_iters": iters / solves if solves else 0.0,
            "max_inner_iters": max((r.get("max_inner_iters") or 0 for r in history), default=0),
            "pg_solves": solves, "hyperparameters": config.optimizer.solver_kwargs(),
            "milestones": config.optimizer.milestones, "gamma": config.optimizer.gamma}
