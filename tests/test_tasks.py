"""The Task seam (structkit/tasks/): the sentence-distillation task (a tiny random BERT saved to disk, Jane Austen's
sentences) and the causal LM task (a tiny transformer on Austen's characters) run through ``structkit.pipeline.run``
with resume, exactly like a classification config."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from structkit import pipeline
from structkit.config import ConfigError, load_config, training_hash
from structkit.tasks import get_task, list_tasks

ROOT = Path(__file__).resolve().parents[1]
QUIET = pipeline.Log(quiet=True)


def _austen_available() -> bool:
    try:
        from structkit.text import AUSTEN_DB
        import rdata  # noqa: F401
    except ImportError:
        return False
    return AUSTEN_DB.with_suffix(".rdb").exists()


needs_austen = pytest.mark.skipif(not _austen_available(),
                                  reason="Jane Austen's novels (r-cran-janeaustenr + rdata) not installed")


def _resume_equals(done: Path, out: Path, epochs: int, config, report: dict) -> dict:
    """Copy the state a run leaves when it dies after its first epochs, resume it, compare with the full run."""
    (out / "checkpoints").mkdir(parents=True)
    for epoch in range(1, epochs):
        shutil.copy(done / f"checkpoints/epoch_{epoch:04d}.pt", out / "checkpoints")
    shutil.copy(done / "config.yaml", out)
    resumed = pipeline.run(config, out, resume=True, log=QUIET)
    a = torch.load(done / f"checkpoints/epoch_{epochs:04d}.pt", weights_only=True)
    b = torch.load(out / f"checkpoints/epoch_{epochs:04d}.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key in ("metric", report["metric"], "sparsity", "params", "macs", "layers"):
        assert resumed[key] == report[key], key
    return resumed


def test_task_names_and_the_config_field():
    assert {"classification", "causal_lm", "sentence_distillation"} <= set(list_tasks())
    assert get_task("classification").primary_metric == "accuracy"
    digits = load_config(ROOT / "configs" / "digits.yaml")
    assert digits.task == "classification"
    assert training_hash(digits) == training_hash(load_config(ROOT / "configs" / "digits.yaml", ["task=classification"]))
    with pytest.raises(ConfigError, match="did you mean 'causal_lm'"):
        load_config(ROOT / "configs" / "digits.yaml", ["task=causal_ml"])


def test_minilm_config_validates_and_rejects_bad_task_options():
    cfg = load_config(ROOT / "configs" / "minilm.yaml")
    assert cfg.task == "sentence_distillation" and cfg.model.name == "sentence_encoder"
    assert cfg.data.options["batches_per_epoch"] * cfg.schedule.epochs == 80  # docs/minilm.md: 80 steps + 120 refit
    assert cfg.data.options["batches_per_epoch"] * cfg.finetune.epochs == 120
    with pytest.raises(ConfigError, match="has no option 'sentense'"):
        load_config(ROOT / "configs" / "minilm.yaml", ["data.options.sentense=3"])
    with pytest.raises(ConfigError, match="loss is invalid"):
        load_config(ROOT / "configs" / "minilm.yaml", ["data.options.loss=l1"])
    with pytest.raises(ConfigError, match="has no option 'dropuot'"):
        load_config(ROOT / "configs" / "minilm.yaml", ["model.options.dropuot=false"])


# ------------------------------------------------------------------------------------------------ sentences

@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from tests.test_distill import WORDS, tiny_bert
    folder = tmp_path_factory.mktemp("tiny_bert")
    tiny_bert(layers=2).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    return folder


def sentence_config(folder: Path, cache: Path) -> dict:
    return {"task": "sentence_distillation",
            "model": {"name": "sentence_encoder", "options": {"path": str(folder)}},
            "data": {"name": "austen_sentences",
                     "options": {"batches_per_epoch": 2, "held_out": 24, "val_sentences": 8, "eval_max_length": 60,
                                 "bench_seq_len": 32, "teacher_cache": str(cache)}},
            "optimizer": {"name": "ramda", "lr": 1e-3, "momentum": 0.5, "milestones": [2]},
            "schedule": {"epochs": 4, "batch_size": 4, "precision": "fp32", "bn_recalibration_batches": 0},
            "structure": [{"kind": "heads", "lam": 4e-4},
                          {"kind": "channels", "select": "*intermediate.dense", "types": ["Linear"], "lam": 6e-4}],
            "finetune": {"epochs": 1, "lr": 1e-3},
            "deploy": {"batch_sizes": [1, 2], "runs": 2, "warmup": 0, "graph_optimization": "all"}}


@needs_austen
def test_sentence_distillation_runs_through_the_pipeline_and_resumes(tiny_bert_folder, tmp_path):
    from structkit import load_slim
    from structkit.tasks.sentence import SentenceEmbedder, layer_sizes
    config = sentence_config(tiny_bert_folder, tmp_path / "cache.pt")
    done = tmp_path / "run"
    report = pipeline.run(config, done, log=QUIET)
    assert report["metric"] == "cosine_mean"
    q = report["cosine_mean"]
    assert 0 < q["trained"] <= 1 and 0 < q["slim"] <= 1 and q["val_final"] is not None
    assert q["slim_pruned"] == pytest.approx(q["trained"], abs=1e-5)  # pruning removed exact zeros only
    assert report["verify"]["max_abs_diff_torch"] <= report["verify"]["tolerance_torch"]
    assert report["verify"]["max_abs_diff_onnx"] < 1e-4 and set(report["latency"]) == {"1", "2"}
    exported = json.loads((done / "results" / "export.json").read_text())
    assert exported["slim"]["max_abs_diff_at_seq_len"] < 1e-4  # the dynamic sequence axis, at the timed length
    history = [json.loads(line) for line in (done / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2, 3, 4] and "val_cosine_mean" in history[0]
    comp = json.loads((done / "results" / "compress.json").read_text())
    assert comp["finetune"]["history"][0]["val_cosine_mean"] > 0
    slim = load_slim(done / "slim.pt")  # the Hugging Face encoder, rebuilt from its recorded config
    sizes = layer_sizes(slim)
    assert sizes["heads"] == [max(comp["layers"][f"encoder.layer.{i}.attention.self"]["kept"], 1) for i in range(2)]
    assert sum(sizes["heads"]) < 8 or sum(sizes["ffn"]) < 128  # something was removed
    with torch.no_grad():
        emb = SentenceEmbedder(slim)(torch.tensor([[1, 7, 9, 2]]), torch.ones(1, 4, dtype=torch.long))
    assert emb.shape == (1, 32) and torch.allclose(emb.norm(), torch.tensor(1.0))
    assert "test cosine_mean" in (done / "report.md").read_text()
    _resume_equals(done, tmp_path / "resumed", 4, config, report)
    # the Torch-Pruning reference: cut to the structured run's sizes by magnitude, then distilled with AdamW
    reference = {**config, "model": {"name": "sentence_encoder",
                                     "options": {"path": str(tiny_bert_folder), "prune_to": str(done)}},
                 "optimizer": {"name": "adamw", "lr": 1e-3}, "finetune": {"epochs": 0},
                 "structure": [{**r, "lam": 0.0} for r in config["structure"]]}
    ref = pipeline.run(reference, tmp_path / "magnitude", log=QUIET)
    assert ref["params"]["before"] == ref["params"]["after"] == report["params"]["after"]
    assert layer_sizes(load_slim(tmp_path / "magnitude" / "slim.pt")) == sizes


@needs_austen
def test_sentence_distillation_reaches_a_params_target_with_the_fixed_final_stage(tiny_bert_folder, tmp_path):
    """``compress.target`` on a model whose inputs are a dict of tensors: lam adapted, the final stage trains the
    structure chosen for the target, the slim model is verified and its parameters meet the target."""
    from structkit.config import ConfigError
    from structkit.tasks.sentence import layer_sizes
    config = sentence_config(tiny_bert_folder, tmp_path / "cache.pt")
    config["compress"] = {"target": {"params": 0.8}, "final_stage": "fixed"}
    report = pipeline.run(config, tmp_path / "run", log=QUIET)
    t = report["target"]
    assert t["metric"] == "params" and t["reached"] <= 0.8 and t["within_tolerance"], t
    assert t["added_groups"] == 0  # the fixed final stage: nothing projected after training
    assert t["reached"] == pytest.approx(report["params"]["after"] / report["params"]["before"])
    assert report["verify"]["max_abs_diff_torch"] <= report["verify"]["tolerance_torch"]
    from structkit import load_slim
    sizes = layer_sizes(load_slim(tmp_path / "run" / "slim.pt"))
    assert sum(sizes["heads"]) < 8 or sum(sizes["ffn"]) < 128
    config["compress"] = {"target": {"latency": 0.8, "batch": 2}}
    with pytest.raises((ConfigError, ValueError), match="latency is not supported for task sentence_distillation"):
        pipeline.run(config, tmp_path / "latency", log=QUIET)


@needs_austen
def test_sentence_batches_per_epoch_continue_across_epochs_and_into_finetuning(tiny_bert_folder, tmp_path):
    from structkit.setup import build
    config = pipeline._as_config(sentence_config(tiny_bert_folder, tmp_path / "cache.pt"))
    setup = build(config)
    train, val, test = setup.task.loaders(setup, seed=0)
    ft, _, _ = setup.task.loaders(setup, seed=7, stage="finetune")
    seen = []
    for epoch in range(1, 5):
        train.set_epoch(epoch)
        seen += [tuple(enc["input_ids"][:, 1].tolist()) for enc, _ in train]
    ft.set_epoch(1)
    seen += [tuple(enc["input_ids"][:, 1].tolist()) for enc, _ in ft]
    # (4 + 1) epochs x 2 batches: every training batch once, in the order drawn
    assert seen == [tuple(enc["input_ids"][:, 1].tolist()) for _, enc in setup.splits.train_batches]
    assert val.count == 8 and test.count == 24 and len(setup.splits.train) == 40


# ------------------------------------------------------------------------------------------------ causal LM

@needs_austen
def test_causal_lm_config_runs_through_the_pipeline_and_resumes(tmp_path):
    config = load_config(ROOT / "configs" / "austen_lm.yaml", [
        "data.options.limit_chars=60000", "data.options.seq_len=32", "model.options.max_len=32",
        "model.options.d_model=32", "model.options.d_ff=64", "schedule.epochs=3", "optimizer.milestones=[2]",
        "schedule.batch_size=32", "deploy.batch_sizes=[1]", "deploy.runs=2", "deploy.warmup=0"])
    done = tmp_path / "lm"
    report = pipeline.run(config, done, log=QUIET)
    assert report["metric"] == "perplexity"
    ppl = report["perplexity"]
    assert 1 < ppl["trained"] < 90 and ppl["slim"] == pytest.approx(ppl["trained"], rel=1e-4)
    history = [json.loads(line) for line in (done / "metrics.jsonl").read_text().splitlines()]
    assert {"val_accuracy", "val_perplexity"} <= set(history[-1])
    _resume_equals(done, tmp_path / "resumed", 3, config, report)
