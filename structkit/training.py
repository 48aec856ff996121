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

__all__ = ["train_epoch", "evaluate", "recalibrate_batchnorm", "has_batchnorm", "autocast"]


def autocast(precision: str):
    """``bf16``: the forward pass under CPU/CUDA autocast (the solver's state stays float32); ``fp32``: nothing."""
    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return F.cross_entropy(logits, labels)


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epoch: int,
                precision: str = "fp32", on_step: Callable[[int, float], None] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss (weighted by batch size).

    Raises RuntimeError naming the epoch and step when the loss or a gradient is not finite."""
    model.train()
    total, seen = 0.0, 0
    for step, (x, y) in enumerate(loader, start=1):
        optimizer.zero_grad(set_to_none=True)
        with autocast(precision):
            logits = model(x)
        loss = _loss(logits, y)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"the training loss is {value} at epoch {epoch}, step {step}; the last good "
                               f"checkpoint is kept. Lower optimizer.lr (or the structure lam) and resume.")
        loss.backward()
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise RuntimeError(f"non-finite gradient of {bad[0]} at epoch {epoch}, step {step}; lower optimizer.lr "
                               f"(or the structure lam) and resume from the last checkpoint.")
        optimizer.step()
        total += value * len(y)
        seen += len(y)
        if on_step is not None:
            on_step(step, value)
    return total / max(seen, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32") -> dict[str, float]:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy loss over ``loader``, in eval mode."""
    was_training = model.training
    model.eval()
    correct, loss, seen = 0, 0.0, 0
    try:
        for x, y in loader:
            with autocast(precision):
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
            with autocast(precision):
                model(x)
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    return used
