"""``structkit run``: config -> trained, verified, exported and measured slim model, in one output folder.

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
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import re
import subprocess
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._io import json_default, load_weights, save_torch, write_json, write_text
from .config import Config, ConfigError, apply_overrides, load_config, training_hash, training_view, validate
from . import distributed
from .device import describe as describe_device, resolve as resolve_device
from .training import NonFiniteError, evaluate, recalibrate_batchnorm, train_epoch

__all__ = ["run", "train", "compress", "export", "bench", "inspect", "RunFolder", "Log"]

CHECKPOINT_FORMAT = "structkit.checkpoint"
_CKPT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
#: later stages whose results a stage makes stale
_DOWNSTREAM = {"train": ("compress", "export", "bench"), "compress": ("export", "bench"), "export": ("bench",),
               "bench": ()}


# ------------------------------------------------------------------------------------------------ small helpers

class Log:
    """Progress messages to stderr, silenced by ``quiet`` (errors and the final summary are printed by the CLI)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state(generator: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate(),
             "loader": generator.get_state()}
    if device is not None and device.type == "cuda":  # dropout and the like draw from the GPU's generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_rng_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["loader"])
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global random state as a tensor and plain numbers (a checkpoint loads with weights_only=True,
    which refuses numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def _to_cpu(data: Any) -> Any:
    """``data`` (nested dicts / lists / tuples of tensors, as in a state dict) with every tensor on the CPU."""
    if torch.is_tensor(data):
        return data.detach().cpu()  # the tensor itself when it already is on the CPU
    if isinstance(data, dict):
        out = {k: _to_cpu(v) for k, v in data.items()}
        if isinstance(data, OrderedDict):  # a module's state dict: keep its _metadata (format versions)
            out = OrderedDict(out)
            if hasattr(data, "_metadata"):
                out._metadata = data._metadata
        return out
    if isinstance(data, list):
        return [_to_cpu(v) for v in data]
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        return tuple(_to_cpu(v) for v in data)
    return data


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, value in enumerate(data) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every training setting (:func:`~structkit.config.training_view`) that differs."""
    a, b = _flat(training_view(old)), _flat(training_view(new))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def git_commit() -> dict[str, Any] | None:
    """The git commit (and whether the tree is dirty) of the structkit source, if it lives in a git checkout."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata
    out = {}
    for name in ("structkit", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "onnxscript", "numpy",
                 "scikit-learn", "pydantic", "pyyaml", "matplotlib", "tqdm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


# ------------------------------------------------------------------------------------------------ the folder

class RunFolder:
    """The output folder of one run: paths, checkpoints, stage results."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"the output folder {self.path} is a file; pass another --out")

    # paths
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def results(self) -> Path:
        return self.path / "results"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def create(self) -> None:
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.results.mkdir(exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the output folder {self.path}: {err.strerror}; pass another --out") from None

    # checkpoints
    def checkpoint_files(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _CKPT_RE.match(p.name))]
        return sorted(found)

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        try:  # tensors and plain data only: opening someone else's run folder never runs code from it
            state = load_weights(path, "structkit checkpoint")
        except ValueError as err:  # truncated zip, refused pickled objects, ...: all mean the file is unusable
            raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({err}). Delete it to resume from the "
                               f"previous checkpoint.") from None
        if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
            raise RuntimeError(f"{path} is not a structkit checkpoint; delete it or pass another --out.")
        return state

    def last_checkpoint(self) -> dict[str, Any] | None:
        files = self.checkpoint_files()
        return self.load_checkpoint(files[-1][1]) if files else None

    # config
    def saved_config(self, overrides: list[str] | None = None) -> Config:
        path = self / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} holds no run (no config.yaml); run `structkit train CONFIG --out "
                                    f"{self.path}` first.")
        return load_config(path, overrides)

    # stage results
    def result(self, stage: str) -> dict[str, Any] | None:
        path = self.results / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RuntimeError(f"{path} is corrupt ({err}); rerun `structkit {stage} {self.path}`.") from None

    def save_result(self, stage: str, data: dict[str, Any]) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        for later in _DOWNSTREAM[stage]:  # what was computed from the old result is stale now
            with contextlib.suppress(FileNotFoundError):
                (self.results / f"{later}.json").unlink()
        write_json(self.results / f"{stage}.json", data)

    def require(self, stage: str, needed_by: str) -> dict[str, Any]:
        data = self.result(stage)
        if data is None:
            raise FileNotFoundError(f"{self.path} has no {stage} results; run `structkit {stage} {self.path}` before "
                                    f"`structkit {needed_by}`.")
        return data

    def record_invocation(self, command: str, config: Config | None = None) -> None:
        path = self / "run_info.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        info["git"] = git_commit()
        info["versions"] = package_versions()
        info.setdefault("invocations", []).append(
            {"command": command, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "training_hash": training_hash(config) if config is not None else None})
        write_json(path, info)


# ------------------------------------------------------------------------------------------------ building

@dataclass
class Setup:
    """Everything built from a config before training: data, model, groups."""

    config: Config
    splits: Any
    model: nn.Module
    groupset: Any
    example_inputs: torch.Tensor  # one small training batch: traces the model for the structure kinds
    verify_inputs: torch.Tensor   # validation inputs: verify pruning and check the ONNX export


def build(config: Config, *, load_init: bool = True) -> Setup:
    """Seed, load the data, build the model (starting from ``model.init``'s weights) and its groups (deterministic
    for a given config). ``load_init=False`` keeps the random initialisation: for a model whose weights come from a
    checkpoint next (a resumed run, the stages after training), so the init file is not needed any more.

    The splits may be any map-style Datasets (:class:`structkit.data.Splits`): only the few examples built here
    (example and verification inputs) are read now; training, evaluation and recalibration read through loaders."""
    from .models import get_model
    from .structure import group_parameters

    if config.schedule.threads is not None:
        torch.set_num_threads(config.schedule.threads)
    seed_everything(config.schedule.seed)
    with _naming(f"data (name {config.data.name!r}, options {config.data.options})"):
        splits = load_data(config)
    with _naming(f"model (name {config.model.name!r}, options {config.model.options})"):
        model = get_model(config.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                          init=config.model.init if load_init else "random", **config.model.options)
    example = _inputs(splits.train, 8)
    verify = _inputs(splits.val, config.prune.verify_examples)
    with _naming("structure"):
        groupset = group_parameters(model, example, [r.model_dump() for r in config.structure])
    return Setup(config, splits, model, groupset, example, verify)


_PLAIN_ERRORS = (ValueError, TypeError, RuntimeError, ImportError, ModuleNotFoundError, OSError, FileNotFoundError,
                 PermissionError, IsADirectoryError, NotADirectoryError)


@contextlib.contextmanager
def _naming(what: str):
    """Prefix a user-facing error raised while building from a config section with that section's name."""
    try:
        yield
    except _PLAIN_ERRORS as err:
        if str(err).startswith(what.split(" ")[0] + ":"):
            raise
        new = type(err)(f"{what}: {err}") if type(err) in _PLAIN_ERRORS else ConfigError(f"{what}: {err}")
        raise new from err


def load_data(config: Config):
    """The configured data set as :class:`structkit.data.Splits` (``data.split`` applies to callables only)."""
    from .data import load_dataset
    split = config.data.split.model_dump() if config.data.split is not None else {}
    return load_dataset(config.data.name, config.data.options, **split)


def _inputs(dataset, n: int) -> torch.Tensor:
    """The inputs of the first ``n`` examples, stacked (reads only those examples)."""
    n = min(n, len(dataset))
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0][:n].clone()
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])


def _recalibration_batches(setup: Setup, device: torch.device | None = None):
    """A fixed random subset of training batches (seeded by ``schedule.seed``; the same examples at every call).

    In-memory data (``TensorDataset``): a list of batches, on ``device`` when given (built once, reused). Any
    other Dataset: a DataLoader over that subset (``data.num_workers``), read again at each use, so the batches
    are never all held in memory (random training transforms then draw new augmentations each time)."""
    s = setup.config.schedule
    if s.bn_recalibration_batches == 0:
        return []
    g = torch.Generator().manual_seed(s.seed + 1)
    n = min(len(setup.splits.train), s.bn_recalibration_batches * s.batch_size)
    idx = torch.randperm(len(setup.splits.train), generator=g)[:n].tolist()
    if not hasattr(setup.splits.train, "tensors"):
        from .data import collate
        return DataLoader(Subset(setup.splits.train, idx), batch_size=s.batch_size, shuffle=False, collate_fn=collate,
                          num_workers=setup.config.data.num_workers)
    batches = list(DataLoader(Subset(setup.splits.train, idx), batch_size=s.batch_size, shuffle=False))
    return batches if device is None else [(x.to(device), y.to(device)) for x, y in batches]


def make_solver(config: Config, groupset, steps_per_epoch: int | None = None):
    """The configured solver and its StageScheduler. With ``steps_per_epoch`` the final stage ramps the momentum
    to 1 by its middle (so the run ends with exactly-zero groups whatever the momentum); a schedule whose final
    stage is too short for that is refused here, before training."""
    from .solvers import StageScheduler, get_solver
    solver = get_solver(config.optimizer.name)(groupset.param_groups(), **config.optimizer.solver_kwargs())
    length = {} if steps_per_epoch is None or not config.optimizer.milestones else \
        dict(epochs=config.schedule.epochs, steps_per_epoch=steps_per_epoch)
    try:
        scheduler = StageScheduler(solver, milestones=config.optimizer.milestones, gamma=config.optimizer.gamma,
                                   **length)
    except ValueError as err:
        raise ConfigError(f"optimizer.milestones: {err}") from err
    return solver, scheduler


def _solver_stats(solver) -> dict[str, Any]:
    if hasattr(solver, "solver_stats"):
        return solver.solver_stats(reset=True)
    return {}


def _sparsity(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if k != "layers"}


# ------------------------------------------------------------------------------------------------ train

def train(config: Config, out: str | Path, *, resume: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Train (or continue training) into ``out``; returns the last epoch's record."""
    from tqdm import tqdm

    main = distributed.is_main()  # under torchrun only rank 0 writes files and prints
    log = (log or Log()) if main else Log(quiet=True)
    # before anything is written: a CUDA run on a machine without CUDA fails here, naming the fix
    device = resolve_device(config.schedule.device,
                            local_rank=distributed.local_rank() if distributed.is_distributed() else None)
    folder = RunFolder(out)
    started = time.perf_counter()
    checkpoint = _start(folder, config, resume, log)
    distributed.barrier()
    if main:
        folder.record_invocation("train", config)
    setup = build(config, load_init=checkpoint is None)  # a resumed run's weights come from its checkpoint
    model, groupset = setup.model, setup.groupset
    model.to(device)  # in place (the GroupSet keeps its parameters); before the solver, whose state follows them
    from .data import make_loaders
    s = config.schedule
    pin = device.type == "cuda"  # page-locked batches: the host -> GPU copies do not block the host
    train_loader, val_loader, _ = make_loaders(setup.splits, s.batch_size, seed=s.seed, eval_batch_size=s.eval_batch_size,
                                               pin_memory=pin, num_workers=config.data.num_workers)
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
    solver, scheduler = make_solver(config, groupset, steps_per_epoch=len(train_loader))
    recal = _recalibration_batches(setup, device)  # in-memory data: moved once, reused
    history: list[dict[str, Any]] = []
    train_seconds = 0.0
    start_epoch = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])  # CPU tensors, copied into the parameters on `device`
        solver.load_state_dict(checkpoint["optimizer"])  # torch.optim moves the state to its parameters' device
        scheduler.load_state_dict(checkpoint["scheduler"])
        _set_rng_state(checkpoint["rng"], train_loader.generator, device)
        history = checkpoint["history"]
        train_seconds = checkpoint["train_seconds"]
        start_epoch = checkpoint["epoch"]
        log(f"resuming {folder.path} after epoch {start_epoch} of {s.epochs}")
    else:
        seed_everything(s.seed)  # the same random stream from here on, however long the set-up took
        train_loader.generator.manual_seed(s.seed)
    if main:
        write_text(folder / "config.yaml", config.to_yaml())
    log(f"model {config.model.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(groupset)} groups; solver {config.optimizer.name}; {len(setup.splits.train):,} training examples")
    log(f"training on {describe_device(device)} (schedule.device: {s.device}), precision {s.precision}")
    train_seconds += time.perf_counter() - started

    for epoch in range(start_epoch + 1, s.epochs + 1):
        t0 = time.perf_counter()
        bar = tqdm(total=len(train_loader), desc=f"epoch {epoch}/{s.epochs}", disable=log.quiet, leave=True,
                   file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        try:
            try:
                train_loss = train_epoch(step_model, train_loader, solver, epoch=epoch, precision=s.precision,
                                         on_step=on_step, device=device)
            except NonFiniteError as err:
                files = folder.checkpoint_files()
                kept = (f"the last good checkpoint {files[-1][1]} (epoch {files[-1][0]}) is kept" if files
                        else "no epoch completed, so there is no checkpoint")
                raise NonFiniteError(f"{err} ({kept})", err.epoch, err.step) from None
            lr = solver.param_groups[0]["lr"]
            scheduler.step()
            recalibrate_batchnorm(model, recal, s.precision, device=device)
            val = evaluate(model, val_loader, s.precision, device=device)
            metrics = groupset.metrics()
            stats = _solver_stats(solver)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch, "train_loss": train_loss, "val_accuracy": val["accuracy"],
                      "val_loss": val["loss"], **_sparsity(metrics), "lr": lr,
                      "mean_inner_iters": stats.get("mean_inner_iters"), "max_inner_iters": stats.get("max_inner_iters"),
                      "pg_solves": stats.get("pg_solves"), "screened_fraction": stats.get("screened_fraction"),
                      "kept": {name: e["kept"] for name, e in metrics["layers"].items()},
                      "epoch_seconds": seconds}
            history.append(record)
            train_seconds += seconds
            if main:
                _save_checkpoint(folder, epoch, config, model, solver, scheduler, train_loader.generator, history,
                                 train_seconds, device)
                _write_metrics(folder, history)  # after the checkpoint: metrics.jsonl never runs ahead of it
            wgs = metrics["weighted_group_sparsity"]
            bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val['accuracy']:.3f}",
                            wgs="-" if wgs is None else f"{wgs:.3f}",
                            inner=f"{stats.get('mean_inner_iters', 0.0):.1f}", refresh=False)
        finally:
            bar.close()
    if start_epoch == s.epochs:
        log(f"training already complete ({s.epochs} epochs)")
    if not main:
        return history[-1]
    _write_metrics(folder, history)
    folder.save_result("train", {"epochs": s.epochs, "seconds": train_seconds, "final": history[-1] if history else None,
                                 "solver": _solver_summary(config, history), "training_hash": training_hash(config),
                                 "device": str(device), "precision": s.precision})
    write_report(folder)
    return history[-1]


def _start(folder: RunFolder, config: Config, resume: bool, log: Log) -> dict[str, Any] | None:
    """Check the folder against the request; return the checkpoint to resume from, if any."""
    files = folder.checkpoint_files()
    if files and not resume:
        raise FileExistsError(f"{folder.path} already holds a run (checkpoints up to epoch {files[-1][0]}); pass "
                              f"--resume to continue it, or another --out for a new run.")
    folder.create()
    if distributed.is_main():  # a killed process's unfinished atomic writes: never complete files
        for stale in [*folder.path.glob(".*.tmp"), *folder.checkpoints.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
    if not files:
        if resume:
            log(f"no checkpoint in {folder.checkpoints}: starting from scratch")
        return None
    checkpoint = folder.load_checkpoint(files[-1][1])
    if checkpoint["training_hash"] != training_hash(config):
        diff = config_differences(checkpoint["config"], config.to_dict())
        raise ValueError(f"cannot resume {folder.path}: its checkpoints were trained with other settings ("
                         + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                         + "). Use the same config, or another --out for a new run.")
    return checkpoint


def _save_checkpoint(folder: RunFolder, epoch: int, config: Config, model, solver, scheduler, generator, history,
                     train_seconds: float, device: torch.device | None = None) -> None:
    """CPU tensors only (a GPU run's checkpoint loads on a machine without CUDA); written atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": 1, "epoch": epoch, "model": _to_cpu(model.state_dict()),
             "optimizer": _to_cpu(solver.state_dict()), "scheduler": _to_cpu(scheduler.state_dict()),
             "rng": _rng_state(generator, device),
             "history": history, "train_seconds": train_seconds, "config": config.to_dict(),
             "training_hash": training_hash(config)}
    save_torch(folder.checkpoint_path(epoch), state)


def _write_metrics(folder: RunFolder, history: list[dict[str, Any]]) -> None:
    write_text(folder / "metrics.jsonl", "".join(json.dumps(r, default=json_default) + "\n" for r in history))


def _solver_summary(config: Config, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Inner-solver statistics over the whole training (from the per-epoch records, so resume-proof)."""
    solves = sum(r.get("pg_solves") or 0 for r in history)
    iters = sum((r.get("mean_inner_iters") or 0.0) * (r.get("pg_solves") or 0) for r in history)
    return {"name": config.optimizer.name, "mean_inner_iters": iters / solves if solves else 0.0,
            "max_inner_iters": max((r.get("max_inner_iters") or 0 for r in history), default=0),
            "pg_solves": solves, "hyperparameters": config.optimizer.solver_kwargs(),
            "milestones": config.optimizer.milestones, "gamma": config.optimizer.gamma}


# ------------------------------------------------------------------------------------------------ later stages

def _trained(folder: RunFolder, config: Config, stage: str) -> tuple[Setup, dict[str, Any]]:
    """The set-up with the final trained weights loaded (training must be complete)."""
    checkpoint = folder.last_checkpoint()
    if checkpoint is None:
        raise FileNotFoundError(f"{folder.path} has no checkpoint; run `structkit train CONFIG --out {folder.path}` "
                                f"before `structkit {stage}`.")
    if checkpoint["training_hash"] != training_hash(config):
        diff = config_differences(checkpoint["config"], config.to_dict())
        raise ValueError(f"{folder.path}: --set may only change prune and deploy settings here; these differ from "
                         f"the training: " + "; ".join(diff[:8]))
    if checkpoint["epoch"] < config.schedule.epochs:
        raise RuntimeError(f"training in {folder.path} stopped after epoch {checkpoint['epoch']} of "
                           f"{config.schedule.epochs}; finish it with `structkit train CONFIG --out {folder.path} "
                           f"--resume` (or `structkit run ... --resume`).")
    setup = build(config, load_init=False)  # the trained weights replace model.init's
    setup.model.load_state_dict(checkpoint["model"])
    return setup, checkpoint


def compress(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None) -> dict[str, Any]:
    """Recalibrate BatchNorm, measure the trained model, prune it (verified), measure the slim model."""
    from .data import make_loaders
    from .prune import prune
    from .slim import save_slim, structkit_source

    log = log or Log()
    t0 = time.perf_counter()
    folder = RunFolder(out)
    config = _stage_config(folder, overrides)
    folder.record_invocation("compress", config)
    setup, _ = _trained(folder, config, "compress")
    s = config.schedule
    _say_cpu(log, folder, "compress", "BatchNorm recalibration, test accuracy, pruning and its verification")
    _, _, test_loader = make_loaders(setup.splits, s.batch_size, seed=s.seed, eval_batch_size=s.eval_batch_size,
                                     num_workers=config.data.num_workers)
    model = setup.model
    recalibrate_batchnorm(model, _recalibration_batches(setup), s.precision)
    trained = evaluate(model, test_loader, s.precision)
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
              "sparsity": _sparsity(metrics), "layers": metrics["layers"], "prune": report.to_dict(),
              "seconds": time.perf_counter() - t0}
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
    recalibration = _recalibration_batches(setup)
    history = finetune(slim, train_loader, f, checkpoints=folder.checkpoints, key=key,
                       teacher=dense if f.distill else None, precision=s.precision,
                       recalibration=recalibration, val_loader=val_loader, log=log)
    recalibrate_batchnorm(slim, recalibration, s.precision)
    slim.eval()
    return {"epochs": f.epochs, "distill": f.distill, "history": history, "seconds": time.perf_counter() - t0,
            "budget_epochs": s.epochs + f.epochs}


def export(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None) -> dict[str, Any]:
    """Export the trained (dense) and slim models to ONNX, each checked against torch in ONNX Runtime."""
    from .deploy import export_onnx

    log = log or Log()
    t0 = time.perf_counter()
    folder = RunFolder(out)
    config = _stage_config(folder, overrides)
    folder.record_invocation("export", config)
    folder.require("compress", "export")
    setup, _ = _trained(folder, config, "export")
    slim = _load_slim(folder, build=lambda: copy.deepcopy(setup.model))
    _say_cpu(log, folder, "export", "the ONNX export and its check in ONNX Runtime")
    d = config.deploy
    inputs = setup.verify_inputs[:64]
    result = {}
    for name, model in (("dense", setup.model), ("slim", slim)):
        result[name] = export_onnx(model, inputs, folder / f"{name}.onnx", opset=d.opset, exporter=d.exporter)
        result[name]["path"] = f"{name}.onnx"
        log(f"exported {name}.onnx ({result[name]['bytes']:,} bytes; max |ORT - torch| "
            f"{result[name]['max_abs_diff']:.2g})")
    result["seconds"] = time.perf_counter() - t0
    folder.save_result("export", result)
    write_report(folder)
    return result


def bench(out: str | Path, *, overrides: list[str] | None = None, log: Log | None = None) -> dict[str, Any]:
    """ONNX Runtime latency of dense.onnx and slim.onnx (see structkit.deploy.measure_latency)."""
    from .deploy import environment, measure_latency

    log = log or Log()
    t0 = time.perf_counter()
    folder = RunFolder(out)
    config = _stage_config(folder, overrides)
    folder.record_invocation("bench", config)
    folder.require("export", "bench")
    splits = load_data(config)
    images = _inputs(splits.test, max(config.deploy.batch_sizes)).numpy()

    def make_inputs(batch: int) -> dict[str, np.ndarray]:
        reps = math.ceil(batch / len(images))
        return {"input": np.ascontiguousarray(np.concatenate([images] * reps)[:batch])}

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


def _say_cpu(log: Log, folder: RunFolder, stage: str, what: str) -> None:
    """Say that a stage runs on the CPU when the training ran elsewhere (results/train.json says where)."""
    trained_on = (folder.result("train") or {}).get("device", "cpu")
    if trained_on != "cpu":
        log(f"{stage}: {what} run on the CPU, on a CPU copy of the weights trained on {trained_on} (from the "
            f"checkpoint)")


def _load_slim(folder: RunFolder, build=None) -> nn.Module:
    """slim.pt (rebuilt from ``build()``, the run's dense model; read as weights only: never runs code from the
    file), or an error that says it is unusable and how to rebuild it."""
    from .slim import load_slim
    path = folder / "slim.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rerun `structkit compress {folder.path}`.")
    try:
        return load_slim(path, build=build)
    except Exception as err:  # truncated, tampered, a file from elsewhere, another model: all mean it is unusable
        raise RuntimeError(f"{path} is corrupt, truncated or not a structkit slim model ({type(err).__name__}: "
                           f"{err}); rebuild it with `structkit compress {folder.path}`.") from None


def _stage_config(folder: RunFolder, overrides: list[str] | None) -> Config:
    config = folder.saved_config(overrides)
    if overrides:
        write_text(folder / "config.yaml", config.to_yaml())
    return config


def write_report(folder: RunFolder) -> dict[str, Any]:
    from .report import build_report, write_report_files
    report = build_report(folder)
    write_report_files(folder, report)
    return report


# ------------------------------------------------------------------------------------------------ run / inspect

def run(config: Config | dict | str | Path, out: str | Path, *, resume: bool = False, overrides: list[str] | None = None,
        log: Log | None = None) -> dict[str, Any]:
    """The whole pipeline: train -> compress -> export -> bench -> report. Returns the report (report.json)."""
    config = _as_config(config, overrides)
    log = log or Log()
    with quiet_warnings(log.quiet):
        train(config, out, resume=resume, log=log)
        if not distributed.is_main():  # under torchrun the other ranks only train
            return {}
        compress(out, log=log)
        export(out, log=log)
        bench(out, log=log)
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

