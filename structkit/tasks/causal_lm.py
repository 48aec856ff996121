"""``task: causal_lm``: next-token prediction. The model maps tokens ``[N, T]`` to logits ``[N, T, V]``, the labels
are the next tokens ``[N, T]`` (the data set ``austen_chars``: Jane Austen's novels, character level, registered
here); the loss is the mean cross entropy per token, the metrics are per-token accuracy and perplexity
(``exp(loss)``, the report's lead metric). Everything else is the classification task's: the pipeline's cross
entropy already averages over every position of ``[N, T, V]`` logits.
"""
from __future__ import annotations

import math

from .. import text  # noqa: F401  (registers the data set austen_chars)
from . import Task

__all__ = ["CausalLM"]


class CausalLM(Task):
    name = "causal_lm"
    primary_metric = "perplexity"

    def evaluate(self, model, loader, precision: str = "fp32", device=None) -> dict[str, float]:
        metrics = super().evaluate(model, loader, precision, device)
        return {**metrics, "perplexity": math.exp(min(metrics["loss"], 700.0))}
