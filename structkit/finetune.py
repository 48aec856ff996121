"""Fine-tuning the slim model after pruning: AdamW with cosine decay, optionally distilled from the dense model.

Pruning removes exactly-zero groups, so the slim model starts with the trained model's function (verified);
fine-tuning then trains the smaller network for ``finetune.epochs`` more epochs, which count in the run's
budget. With ``finetune.distill`` the loss is

    (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)),

the teacher being the trained dense model (frozen, eval mode) -- the usual logit distillation, whose ``T^2``
keeps the gradient scale independent of the temperature. Each epoch writes ``checkpoints/finetune_NNNN.pt``
(weights, AdamW and schedule state, batch-order RNG), and a re-run of the stage resumes from the last one.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._io import load_weights, save_torch
from .training import recalibrate_batchnorm, train_epoch

__all__ = ["distillation_loss", "finetune"]

_FT_RE = re.compile(r"^finetune_(\d{4})\.pt$")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """``(1 - alpha) CE + alpha T^2 KL(teacher || student)`` on logits (see the module docstring)."""
    ce = F.cross_entropy(student_logits.float(), labels)
    if alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * t * t * kl


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := _FT_RE.match(p.name)))


def finetune(slim: nn.Module, train_loader, settings, *, checkpoints: Path, key: dict[str, Any],
             teacher: nn.Module | None = None, precision: str = "fp32", recalibration=(),
             val_loader=None, log: Callable[[str], None] = print, task=None) -> list[dict[str, Any]]:
    """Fine-tune ``slim`` in place for ``settings.epochs`` epochs (``settings``: a ``FinetuneConfig``); returns
    one record per epoch (loss, validation accuracy). ``key`` identifies the run (training hash and fine-tune
    settings): a checkpoint with another key is not resumed from but started over. ``teacher``: the dense model for
    distillation. ``recalibration``: batches for BatchNorm statistics before each validation. ``task``: the run's
    :class:`structkit.tasks.Task` (its loss, when it has its own, and its metrics; default: classification)."""
    if task is None:
        from .tasks import get_task
        task = get_task("classification")
    metric = task.primary_metric
    steps = settings.epochs * len(train_loader)
    opt = torch.optim.AdamW(slim.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1)) \
        if getattr(settings, "lr_schedule", "cosine") == "cosine" else torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    generator = getattr(train_loader, "generator", None)
    history: list[dict[str, Any]] = []
    start = 0
    found = _checkpoints(checkpoints)
    if found:
        state = load_weights(found[-1][1], "structkit fine-tuning checkpoint")
        if state.get("key") == key:
            slim.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            if generator is not None:
                generator.set_state(state["generator"])
            start, history = state["epoch"], list(state["history"])
            log(f"fine-tuning: resuming after epoch {start} of {settings.epochs}")
        else:
            log("fine-tuning: earlier checkpoints are from other settings; starting over")
            for _, path in found:
                path.unlink()
    if teacher is not None:
        teacher.eval()

    def loss_fn(logits, x, y):
        if teacher is None:
            return F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(logits, target, y, temperature=settings.temperature, alpha=settings.alpha)

    for epoch in range(start + 1, settings.epochs + 1):
        if hasattr(train_loader, "set_epoch"):  # a task's loader whose batches depend on the epoch
            train_loader.set_epoch(epoch)
        loss = train_epoch(slim, train_loader, opt, epoch=epoch, precision=precision, loss_fn=loss_fn,
                           batch_loss=task.batch_loss,
                           on_step=lambda step, value: sched.step())  # the cosine schedule steps with the optimizer
        record: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "lr": opt.param_groups[0]["lr"]}
        if val_loader is not None:
            recalibrate_batchnorm(slim, recalibration, precision)
            record[f"val_{metric}"] = task.evaluate(slim, val_loader, precision)[metric]
        history.append(record)
        log(f"fine-tuning epoch {epoch}/{settings.epochs}: loss {loss:.4f}"
            + (f", validation {metric} {record[f'val_{metric}']:.4f}" if f"val_{metric}" in record else ""))
        checkpoints.mkdir(parents=True, exist_ok=True)
        save_torch(checkpoints / f"finetune_{epoch:04d}.pt",
                   {"key": key, "epoch": epoch, "model": slim.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "history": history,
                    "generator": generator.get_state() if generator is not None else None})
    return history
