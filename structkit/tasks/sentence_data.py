"""The data of ``task: sentence_distillation`` (:mod:`structkit.tasks.sentence`): Jane Austen's sentences,
tokenised into batches of similar length, the frozen teacher's embeddings of them (cached), the training stream and
the held-out sets, and the quality metrics of a student's embeddings against the teacher's.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._io import load_weights, save_torch
from ..data import register_dataset

__all__ = ["mean_pool", "SentenceEmbedder", "layer_sizes", "make_batches", "encode", "quality", "austen_sentences_data", "SentenceData", "BatchStream", "HeldOut",
           "teacher_embeddings", "cache_key", "austen", "option_defaults"]


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


def layer_sizes(model: nn.Module) -> dict[str, list[int]]:
    """Per encoder layer: attention heads and FFN neurons the model has now."""
    layers = model.encoder.layer
    return {"heads": [int(layer.attention.self.num_attention_heads) for layer in layers],
            "ffn": [int(layer.intermediate.dense.out_features) for layer in layers]}


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
def encode(model: nn.Module, batches, count: int, device: torch.device | None = None) -> torch.Tensor:
    """Embeddings (pooled, normalised) of the sentences in ``batches`` (as from :func:`make_batches`), in the
    sentences' order, computed on ``device`` (default: the CPU) and returned on the CPU."""
    embedder = SentenceEmbedder(model)
    modes = [(m, m.training) for m in embedder.modules()]
    embedder.eval()
    out = None
    try:
        for idx, enc in batches:
            emb = embedder(**{k: v.to(device) if device is not None else v for k, v in enc.items()}).float().cpu()
            if out is None:
                out = torch.zeros(count, emb.shape[1])
            out[torch.as_tensor(idx)] = emb
    finally:
        for m, training in modes:
            m.training = training
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
        return sim.topk(min(5, len(e) - 1), dim=1).indices

    nd, ns = ranking(F.normalize(dense, dim=-1)), ranking(F.normalize(slim, dim=-1))
    top1 = (nd[:, 0] == ns[:, 0]).double().mean().item()
    top5 = (ns == nd[:, :1]).any(1).double().mean().item()
    return {"cosine_mean": float(cos.mean()), "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_min": float(cos.min()), "retrieval_agreement": top1, "retrieval_dense_nn_in_slim_top5": top5,
            "pool": int(len(cos))}


def teacher_embeddings(teacher, batches, count: int, cache: str | None, key: str) -> tuple[torch.Tensor, float]:
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


def cache_key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=2)
def austen(seed: int = 0) -> tuple[list[str], list[str]]:
    """Jane Austen's sentences, (train, held_out) -- parsed once per process."""
    from ..text import austen_sentences
    return austen_sentences(seed=seed)


@register_dataset("austen_sentences")
def austen_sentences_data(sentences: int | None = None, batches_per_epoch: int = 5, max_length: int = 64,
                          held_out: int = 1000, val_sentences: int = 100, eval_max_length: int = 128,
                          teacher_cache: str | None = None, bench_seq_len: int = 128, loss: str = "cosine"):
    """Jane Austen's sentences for ``task: sentence_distillation`` (the task builds them; the options are checked
    here). ``sentences``: training sentences drawn (null: ``(schedule.epochs + finetune.epochs) x batches_per_epoch
    x schedule.batch_size``, none repeated); ``batches_per_epoch``: optimizer steps per epoch; ``max_length``:
    tokens per training sentence; ``held_out``: held-out sentences, the test set (the cosine set and retrieval
    pool); ``val_sentences``: the first of them, evaluated after every epoch; ``eval_max_length``: their tokens;
    ``teacher_cache``: a file caching the teacher's embeddings (shared by sweeps); ``bench_seq_len``: the timed
    sequence length; ``loss``: cosine or mse."""
    raise ValueError("the data set austen_sentences needs task: sentence_distillation")


def _check_options(options: dict[str, Any]) -> None:
    """data.options of austen_sentences: known keys, valid values (the config check, before anything loads)."""
    known = option_defaults(austen_sentences_data)
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ValueError(f"data.options: austen_sentences has no option {unknown[0]!r}; accepted: {', '.join(known)}")
    o = {**known, **options}
    ints = [k for k in known if k not in ("teacher_cache", "loss", "sentences")]
    bad = [k for k in ints if not isinstance(o[k], int) or isinstance(o[k], bool)]
    if bad:
        raise ValueError(f"data.options.{bad[0]} must be an integer; got {o[bad[0]]!r}")
    checks = {"batches_per_epoch": o["batches_per_epoch"] >= 1, "max_length": o["max_length"] >= 2,
              "held_out": o["held_out"] >= 2, "val_sentences": 2 <= o["val_sentences"] <= o["held_out"],
              "eval_max_length": o["eval_max_length"] >= 8, "bench_seq_len": o["bench_seq_len"] >= 2,
              "loss": o["loss"] in ("cosine", "mse"),
              "sentences": o["sentences"] is None or isinstance(o["sentences"], int) and o["sentences"] >= 1}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"data.options.{bad[0]} is invalid ({o[bad[0]]!r}): batches_per_epoch >= 1, max_length >= 2, "
                         f"2 <= val_sentences <= held_out, eval_max_length >= 8, loss cosine or mse, sentences null or "
                         f">= 1")


austen_sentences_data.check_options = _check_options


@dataclass
class SentenceData:
    """What :meth:`SentenceDistillation.build_data` loads: training batches and held-out sets with the teacher's
    embeddings, the tokenizer, and the example batch that traces, verifies and checks the exports."""

    train: list[str]
    val: list[str]
    test: list[str]
    tokenizer: Any
    train_batches: list
    teacher_train: torch.Tensor
    val_batches: list
    test_batches: list
    teacher_test: torch.Tensor
    example: dict[str, torch.Tensor]
    options: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    name: str = "austen_sentences"
    input_shape: tuple = ()
    num_classes: int = 0


class BatchStream:
    """The training loader: ``per_epoch`` batches per epoch from a fixed list, epoch ``e`` taking the batches after
    those of the epochs before it (from ``offset``, wrapping around), so a resumed run sees the same batches.
    Items: ``({"input_ids", "attention_mask"}, teacher embeddings)``."""

    def __init__(self, batches, targets: torch.Tensor, per_epoch: int, offset: int = 0):
        self.batches, self.targets, self.per_epoch, self.offset = batches, targets, per_epoch, offset
        self.epoch = 1
        self.generator = torch.Generator()  # not used for the order; a checkpoint stores a loader generator

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_epoch

    def __iter__(self):
        start = self.offset + (self.epoch - 1) * self.per_epoch
        for i in range(start, start + self.per_epoch):
            idx, enc = self.batches[i % len(self.batches)]
            yield enc, self.targets[torch.as_tensor(idx)]


@dataclass
class HeldOut:
    """An evaluation loader: the first ``count`` held-out sentences' batches and the teacher's embeddings."""

    batches: list
    teacher: torch.Tensor
    count: int


def option_defaults(fn) -> dict[str, Any]:
    import inspect
    return {n: p.default for n, p in inspect.signature(fn).parameters.items()}
