"""The training loop's pieces: one epoch of structured training, evaluation, BatchNorm recalibration.

Classification loss only: a model maps a batch to logits ``[N, C]`` (or ``[N, ..., C]`` with labels
``[N, ...]``, as a language model does) and the loss is cross entropy. :mod:`structkit.pipeline` strings
these together with checkpoints and the output folder.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed

__all__ = ["train_epoch", "evaluate", "recalibrate_batchnorm", "has_batchnorm", "autocast", "NonFiniteError"]

_REMEDY = ("Lower optimizer.lr (e.g. by 10x) or the structure rules' lam, or use schedule.precision: fp32, and start a "
           "new run (another --out: a checkpoint only resumes under the same training settings).")


class NonFiniteError(RuntimeError):
    """The training loss or a gradient became NaN/inf; ``epoch`` and ``step`` say where (1-based)."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch, self.step = epoch, step


def autocast(precision: str, device_type: str = "cpu"):
    """``bf16``: the forward pass under CPU/CUDA autocast (the solver's state stays float32); ``fp32``: nothing."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return F.cross_entropy(logits, labels)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epoch: int,
                precision: str = "fp32", on_step: Callable[[int, float], None] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss (weighted by batch size).

    Raises :class:`NonFiniteError` (a RuntimeError) naming the epoch and step when the loss or a gradient is
    not finite, before the solver step (the weights stay those of the last good step)."""
    model.train()
    total, seen = 0.0, 0
    for step, (x, y) in enumerate(loader, start=1):
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision, x.device.type):
            logits = model(x)
        loss = _loss(logits, y)
        value = loss.item()
        scale = 1.0
        if distributed.is_distributed():  # one collective: global batch size, and whether any rank went non-finite
            count, bad_ranks = distributed.all_sum(float(len(y)), 0.0 if math.isfinite(value) else 1.0)
            scale = distributed.world_size() * len(y) / count  # DDP's average of these = the global batch mean
            if bad_ranks and math.isfinite(value):
                value = float("nan")
        if not math.isfinite(value):
            raise NonFiniteError(f"the training loss is {value} at epoch {epoch}, step {step}; training stopped "
                                 f"before the bad step changed any weight. {_REMEDY}", epoch, step)
        (loss * scale if scale != 1.0 else loss).backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise NonFiniteError(f"non-finite gradient of {bad[0]} at epoch {epoch}, step {step}; training stopped "
                                 f"before the bad step changed any weight. {_REMEDY}", epoch, step)
        optimizer.step()
        total += value * len(y)
        seen += len(y)
        if on_step is not None:
            on_step(step, value)
    total, seen = distributed.all_sum(total, float(seen))
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32") -> dict[str, float]:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy loss over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    try:
        for x, y in loader:
            with autocast(precision, x.device.type):
                logits = model(x)
            loss += float(_loss(logits, y)) * y.numel()
            correct += int((logits.argmax(-1) == y).sum())
            seen += y.numel()
    finally:
        model.train(was_training)
    return {"accuracy": correct / max(seen, 1), "loss": loss / max(seen, 1)}


_BN = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], precision: str = "fp32") -> int:
    """Recompute every BatchNorm's running statistics from ``batches`` (an iterable of ``(x, y)``).

    RAMDA's averaged iterate moves faster than BatchNorm's running statistics (momentum 0.1) can follow, so
    evaluating with them gives erratic accuracy (docs: TRAINING_NOTES.md). Here the statistics are reset and
    re-estimated as a cumulative average (``momentum=None``) over the batches, with only the BatchNorm modules in
    train mode (dropout and the like stay in eval mode and consume no random numbers). Every module's
    train/eval flag and momentum are restored. Returns the number of batches used (0 without BatchNorm)."""
    norms = [m for m in model.modules() if isinstance(m, _BN) and m.track_running_stats]
    if not norms:
        return 0
    flags = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for x, _ in batches:
            with autocast(precision, x.device.type):
                model(x)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    return used
