"""What every stage starts from: a config turned into data, model and groups (:class:`Setup`, :func:`build`).

Also the solver and its stage scheduler for those groups (:func:`make_solver`), the seeding, the few input
batches built from the data (trace, verification, BatchNorm recalibration), the set-up the stages after training
work on (:func:`trained_setup`: the final checkpoint's weights, on the CPU) and the progress log. ``structkit run``
hands the set-up its training built to the later stages (:meth:`Setup.rewind` puts it back as built), so one run
loads the data and traces the model once.
"""
from __future__ import annotations

import contextlib
import random
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from .config import Config, ConfigError, training_hash
from .run_folder import RunFolder, config_differences

__all__ = ["Log", "Setup", "build", "first_inputs", "load_data", "make_solver", "recalibration_batches",
           "seed_everything", "trained_setup"]


class Log:
    """Progress messages to stderr, silenced by ``quiet`` (errors and the final summary are printed by the CLI)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global random generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything built from a config before training: data, model, groups."""

    config: Config
    splits: Any
    model: nn.Module
    groupset: Any
    example_inputs: Any  # one small training batch: traces the model for the structure kinds
    verify_inputs: Any   # validation inputs: verify pruning and check the ONNX export
    task: Any = None     # the config's structkit.tasks.Task (data, model, loss, metrics, export inputs)
    # as build() left them: the global random states and every module's train/eval flag (see rewind)
    built_rng: dict[str, Any] = field(default_factory=dict, repr=False)
    built_modes: list[bool] = field(default_factory=list, repr=False)

    def built_from(self, config: Config) -> bool:
        """Whether this set-up was built from ``config`` (the same settings, all sections)."""
        return self.config.to_dict() == config.to_dict()

    def rewind(self) -> None:
        """Put the set-up back as :func:`build` left it, for a later stage after the training used it: the model
        on the CPU (in place: the GroupSet keeps its parameters) without gradients, every module's train/eval
        flag and the global random states as built. The weights are the caller's to load (the checkpoint's), so
        a stage then sees exactly what a fresh ``build`` would have given it, without loading the data or
        tracing the model again."""
        self.model.to(torch.device("cpu"))
        for param in self.model.parameters():
            param.grad = None
        for module, training in zip(self.model.modules(), self.built_modes):
            module.training = training
        if not self.built_rng:  # not made by build(): nothing to restore
            return
        torch.set_rng_state(self.built_rng["torch"])
        np.random.set_state(self.built_rng["numpy"])
        random.setstate(self.built_rng["python"])


def build(config: Config, *, load_init: bool = True) -> Setup:
    """Seed, load the data, build the model (starting from ``model.init``'s weights) and its groups (deterministic
    for a given config). ``load_init=False`` keeps the random initialisation: for a model whose weights come from a
    checkpoint next (a resumed run, the stages after training), so the init file is not needed any more.

    The splits may be any map-style Datasets (:class:`structkit.data.Splits`): only the few examples built here
    (example and verification inputs) are read now; training, evaluation and recalibration read through loaders."""
    from .structure import group_parameters
    from .tasks import get_task

    if config.schedule.threads is not None:
        torch.set_num_threads(config.schedule.threads)
    seed_everything(config.schedule.seed)
    task = get_task(config.task)
    with _naming(f"data (name {config.data.name!r}, options {config.data.options})"):
        splits = task.build_data(config)
    with _naming(f"model (name {config.model.name!r}, options {config.model.options})"):
        model = task.build_model(config, splits, load_init=load_init)
    example = task.example_inputs(splits, "train", 8)
    verify = task.example_inputs(splits, "val", config.prune.verify_examples)
    with _naming("structure"):
        groupset = group_parameters(model, example, [r.model_dump() for r in config.structure])
    return Setup(config, splits, model, groupset, example, verify, task,
                 built_rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
                 built_modes=[m.training for m in model.modules()])


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


def first_inputs(dataset, n: int) -> torch.Tensor:
    """The inputs of the first ``n`` examples, stacked (reads only those examples)."""
    n = min(n, len(dataset))
    if hasattr(dataset, "tensors"):
        return dataset.tensors[0][:n].clone()
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in range(n)])


def recalibration_batches(setup: Setup, device: torch.device | None = None):
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


def make_solver(config: Config, groupset, steps_per_epoch: int | None = None, *, paper_ramp: bool = False):
    """The configured solver and its StageScheduler, over the trainable parameters (frozen ones are left out: a
    solver would update them with gradient 0, at full cost). With ``steps_per_epoch`` the final stage ramps the
    momentum to 1 by its middle (so the run ends with exactly-zero groups whatever the momentum); a schedule whose
    final stage is too short for that is refused here, before training. ``paper_ramp`` (a task's choice): keep the
    paper's ramp ``min(c sqrt(t), 1)`` when it reaches 1 within the final stage."""
    from .solvers import StageScheduler, get_solver
    groups = []
    for g in groupset.param_groups():
        params = [p for p in g["params"] if p.requires_grad]
        if g.get("regularizer", "none") != "none" and len(params) != len(g["params"]):
            raise ConfigError("a parameter of a structure group is frozen (requires_grad=False); do not freeze "
                              "grouped layers")
        if params:
            groups.append({**g, "params": params})
    solver = get_solver(config.optimizer.name)(groups, **config.optimizer.solver_kwargs())
    length = {} if steps_per_epoch is None or not config.optimizer.milestones else \
        dict(epochs=config.schedule.epochs, steps_per_epoch=steps_per_epoch)
    if length and paper_ramp:
        final_steps = (config.schedule.epochs - config.optimizer.milestones[-1]) * steps_per_epoch
        if (config.optimizer.momentum or 0.0) ** 2 * final_steps >= 1:
            length = {}
    try:
        scheduler = StageScheduler(solver, milestones=config.optimizer.milestones, gamma=config.optimizer.gamma,
                                   **length)
    except ValueError as err:
        raise ConfigError(f"optimizer.milestones: {err}") from err
    return solver, scheduler


def trained_setup(folder: RunFolder, config: Config, stage: str,
                  setup: Setup | None = None) -> tuple[Setup, dict[str, Any]]:
    """The set-up with the final trained weights loaded, on the CPU (training must be complete). ``setup``: the
    one this process's training built (``structkit run``), rewound and reused when it was built from ``config``;
    otherwise (a stage command) the set-up is built here."""
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
    if setup is not None and setup.built_from(config):
        setup.rewind()
    else:
        setup = build(config, load_init=False)  # the trained weights replace model.init's
    setup.model.load_state_dict(checkpoint["model"])
    return setup, checkpoint
