"""Tasks: what a run learns. The pipeline (:mod:`structkit.pipeline`) owns the stages, the solver, resume, DDP,
pruning, export and the report; a :class:`Task` supplies the rest -- data, model, loss, metrics and the inputs the
model is traced, verified, exported and timed with.

Built-in tasks (the config's top-level ``task:``, default ``classification``):

* ``classification`` (this module's :class:`Task`): ``(input, label)`` examples, cross entropy, accuracy;
* ``causal_lm`` (:mod:`structkit.tasks.causal_lm`): next-token prediction (logits ``[N, T, V]``, labels
  ``[N, T]``), accuracy and perplexity; the registered data set ``austen_chars``;
* ``sentence_distillation`` (:mod:`structkit.tasks.sentence`): a sentence encoder distilled from its frozen
  dense copy (configs/minilm.yaml).

A task module is imported when a config names its task (so its data sets and models register then); a task of
your own: subclass :class:`Task` and :func:`register_task` it.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..registry import Registry

__all__ = ["Task", "register_task", "get_task", "list_tasks"]

#: built-in task name -> "module:class", imported on first use (the sentence task needs transformers)
_BUILTIN = {"classification": "structkit.tasks:Task", "causal_lm": "structkit.tasks.causal_lm:CausalLM",
            "sentence_distillation": "structkit.tasks.sentence:SentenceDistillation"}
_TASKS: Registry[type] = Registry("task", how="subclass structkit.tasks.Task and register it with "
                                                "@structkit.tasks.register_task(name)")


class Task:
    """Classification, and the defaults every task inherits. Methods take the run's config or its
    :class:`~structkit.setup.Setup` (``setup.splits``: what :meth:`build_data` returned)."""

    name = "classification"
    #: the metric the report leads with (a key of :meth:`evaluate`'s result) and whether higher is better
    primary_metric = "accuracy"
    #: the final stage's momentum ramp: False = reach 1 by the stage's middle (structkit.solvers.StageScheduler);
    #: True = the paper's min(c sqrt(t), 1) when it reaches 1 within the stage (what the MiniLM runs measured)
    paper_ramp = False
    #: None: train_epoch's cross entropy on model(x); else batch_loss(model, batch) -> (loss, examples)
    batch_loss: Callable[..., tuple[torch.Tensor, int]] | None = None

    def build_data(self, config):
        """The data: :class:`structkit.data.Splits` (or an object with ``train``, ``val``, ``test``)."""
        from ..setup import load_data
        return load_data(config)

    def build_model(self, config, splits, *, load_init: bool = True) -> torch.nn.Module:
        from ..models import get_model
        return get_model(config.model.name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                         init=config.model.init if load_init else "random", **config.model.options)

    def example_inputs(self, splits, split: str, n: int) -> Any:
        """The inputs of the first ``n`` examples of ``split`` (train, val or test): the inputs the model is traced
        (train), verified and its ONNX export checked with (val), and timed with (test)."""
        from ..setup import first_inputs
        return first_inputs(getattr(splits, split), n)

    def loaders(self, setup, *, seed: int, pin_memory: bool = False, stage: str = "train"):
        """``(train, val, test)`` loaders; ``stage`` is ``train`` or ``finetune`` (which draws its own order). A
        training loader may have ``set_epoch(epoch)`` (called before each epoch) and has a ``generator``."""
        from ..data import make_loaders
        s = setup.config.schedule
        return make_loaders(setup.splits, s.batch_size, seed=seed, eval_batch_size=s.eval_batch_size,
                            pin_memory=pin_memory, num_workers=setup.config.data.num_workers)

    def evaluate(self, model, loader, precision: str = "fp32", device=None) -> dict[str, float]:
        """Metrics over ``loader``: at least ``loss`` and :attr:`primary_metric`."""
        from ..training import evaluate
        return evaluate(model, loader, precision, device=device)

    def finetune_start(self, setup, slim: torch.nn.Module) -> torch.nn.Module:
        """The model the fine-tuning stage starts from (default: the verified slim model itself)."""
        return slim

    def slim_source(self, setup) -> dict[str, Any] | None:
        """How :func:`structkit.load_slim` rebuilds the dense model (None: the model records it, e.g. Hugging Face)."""
        from ..slim import structkit_source
        c = setup.config.model
        return structkit_source(c.name, c.options, setup.splits.input_shape, setup.splits.num_classes)

    def export(self, setup, model: torch.nn.Module, path, *, opset: int, exporter: str) -> dict[str, Any]:
        """Write ``model`` (dense or slim) to the ONNX file ``path``, checked against torch in ONNX Runtime;
        returns :func:`structkit.deploy.export_onnx`'s record."""
        from ..deploy import export_onnx
        return export_onnx(model, setup.verify_inputs[:64], path, opset=opset, exporter=exporter)

    def bench_inputs(self, setup) -> Callable[[int], dict[str, np.ndarray]]:
        """``make_inputs(batch) -> {onnx input name: array}`` for the latency measurement."""
        import math
        images = self.example_inputs(setup.splits, "test", max(setup.config.deploy.batch_sizes)).numpy()

        def make_inputs(batch: int) -> dict[str, np.ndarray]:
            reps = math.ceil(batch / len(images))
            return {"input": np.ascontiguousarray(np.concatenate([images] * reps)[:batch])}
        return make_inputs


def register_task(name: str, *, replace: bool = False) -> Callable[[type], type]:
    """Class decorator: make a :class:`Task` subclass available as ``task: name`` (a taken name is refused unless
    ``replace``)."""
    return _TASKS.register(name, replace=replace)


def list_tasks() -> list[str]:
    return sorted(set(_BUILTIN) | set(_TASKS.names()))


def get_task(name: str) -> Task:
    """The task called ``name`` (imports a built-in task's module on first use). ValueError for an unknown name."""
    if name not in _TASKS and name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        _TASKS.add(name, getattr(importlib.import_module(module), cls))
    if name not in _TASKS:
        import difflib
        close = difflib.get_close_matches(name, list_tasks(), n=1)
        raise ValueError(f"unknown task {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; "
                         f"accepted: {', '.join(list_tasks())}")
    return _TASKS.get(name)()


def check_task(name: str) -> str:
    """The config's validator of ``task``: a known name (its module imported, so its data sets and models exist)."""
    get_task(name)
    return name
