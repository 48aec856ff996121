"""The training loop's pieces: one epoch of structured training, evaluation, BatchNorm recalibration.

The default loss is classification's: a model maps a batch to logits ``[N, C]`` (or ``[N, ..., C]`` with labels
``[N, ...]``, as a language model does) and the loss is cross entropy; a task with its own loss
(:mod:`structkit.tasks`) passes ``batch_loss`` to :func:`train_epoch`. :mod:`structkit.pipeline` strings
these together with checkpoints and the output folder.

Devices: every function here runs on the device of the model's parameters and moves each batch there
(``non_blocking``); pass ``device`` to say it explicitly. A training step reads one value back to the host: the
loss and a finiteness probe of the gradients, fetched together after ``backward()`` so a non-finite loss or
gradient stops training before the solver step changes any weight.
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


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); the CPU for a model without either."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _to(t: Any, device: torch.device) -> Any:
    """``t`` on ``device``; host -> GPU copies are queued without waiting (``non_blocking``). Dicts, lists and
    tuples of tensors (a task's batch) are moved item by item."""
    if isinstance(t, dict):
        return {k: _to(v, device) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(_to(v, device) for v in t)
    if not isinstance(t, torch.Tensor):
        return t
    return t if t.device == device else t.to(device, non_blocking=device.type == "cuda")


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if logits.dim() > 2:
        return F.cross_entropy(logits.flatten(0, -2), labels.flatten())
    return F.cross_entropy(logits, labels)


def _grad_probe(grads: list[torch.Tensor]) -> torch.Tensor:
    """One number on the gradients' device that is non-finite whenever a gradient entry is (NaN and inf
    propagate through the sum of 2-norms); it may also overflow for huge finite gradients, so a non-finite
    probe is confirmed entry by entry before training stops."""
    if not grads:
        return torch.zeros(())
    return torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum()


def train_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer, *, epoch: int,
                precision: str = "fp32", on_step: Callable[[int, float], None] | None = None,
                device: torch.device | str | None = None,
                loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                batch_loss: Callable[[nn.Module, Any], tuple[torch.Tensor, int]] | None = None) -> float:
    """One pass over ``loader``; returns the mean training loss (weighted by batch size).

    Batches go to ``device`` (default: the model's device). Raises :class:`NonFiniteError` (a RuntimeError)
    naming the epoch and step when the loss or a gradient is not finite, before the solver step (the weights
    stay those of the last good step). One host sync per step (the loss and the gradient probe, read together);
    under torchrun one more, the collective on the batch size. ``loss_fn(logits, x, y)`` replaces the cross
    entropy (fine-tuning with distillation uses it). ``batch_loss(model, batch) -> (loss, examples)`` replaces the
    forward pass and the loss altogether (a task's loss, :mod:`structkit.tasks`; it runs under the autocast)."""
    device = torch.device(device) if device is not None else _model_device(model)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    model.train()
    total, seen = 0.0, 0
    for step, batch in enumerate(loader, start=1):
        optimizer.zero_grad(set_to_none=True)
        if batch_loss is not None:
            with autocast(precision, device.type):
                loss, n = batch_loss(model, _to(batch, device))
        else:
            x, y = _to(batch[0], device), _to(batch[1], device)
            n = len(y)
            with autocast(precision, device.type):
                logits = model(x)
            loss = _loss(logits, y) if loss_fn is None else loss_fn(logits, x, y)
        scale = 1.0
        if distributed.is_distributed():  # one collective: global batch size, and whether any rank went non-finite
            value = loss.item()
            count, bad_ranks = distributed.all_sum(float(n), 0.0 if math.isfinite(value) else 1.0)
            scale = distributed.world_size() * n / count  # DDP's average of these = the global batch mean
            if bad_ranks and math.isfinite(value):
                value = float("nan")
            if not math.isfinite(value):
                raise _loss_error(value, epoch, step)
        (loss * scale if scale != 1.0 else loss).backward()
        grads = [p.grad for _, p in params if p.grad is not None]
        value, probe = torch.stack([loss.detach().float(), _grad_probe(grads).to(loss.device)]).tolist()
        if not math.isfinite(value):
            raise _loss_error(value, epoch, step)
        if not math.isfinite(probe):  # rare: find the culprit entry by entry (a huge finite gradient passes)
            bad = [n for n, p in params if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad:
                raise NonFiniteError(f"non-finite gradient of {bad[0]} at epoch {epoch}, step {step}; training "
                                     f"stopped before the bad step changed any weight. {_REMEDY}", epoch, step)
        optimizer.step()
        total += value * n
        seen += n
        if on_step is not None:
            on_step(step, value)
    total, seen = distributed.all_sum(total, float(seen))
    return total / max(seen, 1)


def _loss_error(value: float, epoch: int, step: int) -> NonFiniteError:
    return NonFiniteError(f"the training loss is {value} at epoch {epoch}, step {step}; training stopped before the "
                          f"bad step changed any weight. {_REMEDY}", epoch, step)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32",
             device: torch.device | str | None = None) -> dict[str, float]:
    """Accuracy (fraction in [0, 1]) and mean cross-entropy loss over ``loader``, in eval mode, on ``device``
    (default: the model's device); the sums stay on the device and are read once at the end."""
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    try:
        for x, y in loader:
            x, y = _to(x, device), _to(y, device)
            with autocast(precision, device.type):
                logits = model(x)
            loss += _loss(logits, y).double() * y.numel()
            correct += (logits.argmax(-1) == y).sum()
            seen += y.numel()
    finally:
        model.train(was_training)
    return {"accuracy": int(correct) / max(seen, 1), "loss": float(loss) / max(seen, 1)}


_BN = (nn.modules.batchnorm._BatchNorm,)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BN) and m.track_running_stats for m in model.modules())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[Any], precision: str = "fp32",
                          device: torch.device | str | None = None) -> int:
    """Recompute every BatchNorm's running statistics from ``batches`` (an iterable of ``(x, y)``).

    RAMDA's averaged iterate moves faster than BatchNorm's running statistics (momentum 0.1) can follow, so
    evaluating with them gives erratic accuracy (docs/configuration.md, bn_recalibration_batches). Here the statistics are reset and
    re-estimated as a cumulative average (``momentum=None``) over the batches, with only the BatchNorm modules in
    train mode (dropout and the like stay in eval mode and consume no random numbers). Every module's
    train/eval flag and momentum are restored. Batches go to ``device`` (default: the model's device). Returns
    the number of batches used (0 without BatchNorm)."""
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
    device = torch.device(device) if device is not None else _model_device(model)
    used = 0
    try:
        for x, _ in batches:
            with autocast(precision, device.type):
                model(_to(x, device))
            used += 1
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        for m, training in flags:
            m.training = training
    return used
