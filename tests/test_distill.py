"""structkit.distill on a tiny randomly initialised BERT (no pretrained weights, no downloads): heads + FFN groups,
exact pruning, save/load, magnitude reference, distillation steps, quality metrics, ONNX with a dynamic sequence
axis, the config file, and the whole run end to end (when Jane Austen's novels are installed)."""
from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import structkit
from structkit import distill
from structkit.solvers import RAMDA, StageScheduler

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[1]
WORDS = ("it is a truth universally acknowledged that single man in possession of good fortune must be want "
         "wife however little known the feelings or views such may on his first entering neighbourhood").split()


def tiny_bert(seed: int = 0, layers: int = 2, heads: int = 4, hidden: int = 32, ffn: int = 64):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


class WordTokenizer:
    """Enough of a Hugging Face tokenizer for make_batches: [CLS]=1 words [SEP]=2, unknown words 3, pad 0."""

    def __call__(self, texts, truncation=True, max_length=64, padding=False, return_tensors=None):
        ids = [[1] + [WORDS.index(w) + 5 if w in WORDS else 3 for w in t.lower().split()][:max_length - 2] + [2]
               for t in texts]
        if not padding:
            return {"input_ids": ids}
        width = max(len(i) for i in ids)
        pad = [i + [0] * (width - len(i)) for i in ids]
        mask = [[1] * len(i) + [0] * (width - len(i)) for i in ids]
        return {"input_ids": torch.tensor(pad), "attention_mask": torch.tensor(mask)}


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)]


def inputs(batch: int = 3, length: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(WORDS) + 5, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length - 3:] = 0  # padding: pruning must stay exact under the attention mask
    return {"input_ids": ids, "attention_mask": mask}


def test_heads_and_ffn_groups_prune_exactly_save_and_reload(tmp_path):
    model, x = tiny_bert(), inputs()
    gs = distill.group_encoder(model, x, lam=1e-3)
    kinds = {b.label: (b.kind, b.num_groups) for b in gs.blocks}
    assert kinds == {"encoder.layer.0.attention.self": ("heads", 4), "encoder.layer.1.attention.self": ("heads", 4),
                     "encoder.layer.0.intermediate.dense": ("channels", 64),
                     "encoder.layer.1.intermediate.dense": ("channels", 64)}
    gs.zero_(torch.cat([gs.groups_of("encoder.layer.0.attention.self")[[0, 2]],
                        gs.groups_of("encoder.layer.1.attention.self")[:3],
                        gs.groups_of("encoder.layer.0.intermediate.dense")[::2],
                        gs.groups_of("encoder.layer.1.intermediate.dense")[:40]]))
    slim, report = structkit.prune(model, gs, x)
    assert distill.layer_sizes(slim) == {"heads": [2, 1], "ffn": [32, 24]}
    assert distill.layer_sizes(model) == {"heads": [4, 4], "ffn": [64, 64]}  # pruned a copy
    assert report.params_after < report.params_before
    with torch.no_grad():
        for seed in range(3):  # other batches and sequence lengths than the one pruning verified on
            x2 = inputs(batch=4, length=5 + 4 * seed, seed=seed + 1)
            want = distill.SentenceEmbedder(model)(**x2)
            got = distill.SentenceEmbedder(slim)(**x2)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    structkit.save_slim(slim, tmp_path / "slim.pt")
    loaded = structkit.load_slim(tmp_path / "slim.pt")
    assert distill.layer_sizes(loaded) == {"heads": [2, 1], "ffn": [32, 24]}
    assert structkit.verify(slim, loaded, x) == 0.0


def test_magnitude_prune_keeps_the_largest_heads_and_neurons():
    model, x = tiny_bert(), inputs()
    att = model.encoder.layer[0].attention.self
    with torch.no_grad():  # make head 1 and FFN neuron 5 of layer 0 clearly the largest
        for lin in (att.query, att.key, att.value):
            lin.weight[8:16] *= 10
        model.encoder.layer[0].intermediate.dense.weight[5] *= 10
    reference = copy.deepcopy(model)
    distill.magnitude_prune(model, x, heads_kept=[1, 3], ffn_kept=[1, 48])
    assert distill.layer_sizes(model) == {"heads": [1, 3], "ffn": [1, 48]}
    torch.testing.assert_close(model.encoder.layer[0].attention.self.query.weight,
                               reference.encoder.layer[0].attention.self.query.weight[8:16])
    torch.testing.assert_close(model.encoder.layer[0].intermediate.dense.weight,
                               reference.encoder.layer[0].intermediate.dense.weight[5:6])
    assert model.encoder.layer[0].attention.self.all_head_size == 8
    with torch.no_grad():
        assert distill.SentenceEmbedder(model)(**x).shape == (3, 32)


def test_distillation_steps_lower_the_loss():
    teacher = tiny_bert(seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a perturbed student has something to learn
        for p in student.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in student.embeddings.parameters():
        p.requires_grad_(False)
    for p in student.pooler.parameters():
        p.requires_grad_(False)
    texts = sentences(48)
    batches = distill.make_batches(WordTokenizer(), texts, 8, 32, seed=0)
    assert sorted(int(i) for idx, _ in batches for i in idx) == list(range(48))
    target = distill.encode(teacher, batches, len(texts))
    torch.testing.assert_close(target.norm(dim=1), torch.ones(48))

    def loss() -> float:
        return float(distill.distillation_loss(distill.encode(student, batches, len(texts)), target))

    before = loss()
    gs = distill.group_encoder(student, batches[0][1], lam=1e-5)
    opt = RAMDA(distill._trainable_param_groups(gs.param_groups()), lr=1e-3, momentum=0.5)
    history = distill.train_student(student, target, batches, opt, StageScheduler(opt, milestones=[20]), 30,
                                    log_every=10, dropout=False, groupset=gs)
    assert [h["step"] for h in history] == [10, 20, 30]
    assert all(len(h["heads_kept"]) == 2 and len(h["ffn_kept"]) == 2 for h in history)
    assert loss() < 0.7 * before


def test_losses_and_quality_metrics():
    a = torch.nn.functional.normalize(torch.randn(50, 16), dim=1)
    assert distill.distillation_loss(a, a).abs() < 1e-6
    assert torch.isclose(distill.distillation_loss(a, -a, "mse"), 2 * distill.distillation_loss(a, -a, "cosine"))
    q = distill.quality(a, a)
    assert q["cosine_mean"] == pytest.approx(1) and q["retrieval_agreement"] == 1 and q["pool"] == 50
    noisy = distill.quality(a, a + 0.3 * torch.randn(50, 16))
    assert noisy["cosine_p5"] <= noisy["cosine_mean"] < 1 and noisy["retrieval_agreement"] < 1
    mask = torch.tensor([[1, 1, 0]])
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    torch.testing.assert_close(distill.mean_pool(hidden, mask), torch.tensor([[1.0, 0.0]]))


def test_onnx_export_has_dynamic_batch_and_sequence(tmp_path):
    from structkit.deploy import ort_session
    model, x = tiny_bert(), inputs()
    gs = distill.group_encoder(model, x, lam=1e-3)
    gs.zero_(gs.groups_of("encoder.layer.1.attention.self")[:2])
    slim, _ = structkit.prune(model, gs, x)
    rows = {"input_ids": np.random.default_rng(0).integers(5, len(WORDS) + 5, (4, 24)), "attention_mask": np.ones((4, 24), np.int64)}
    dep = distill.validate_config({"deploy": {"batch_sizes": [1, 3], "runs": 2, "warmup": 1, "seq_len": 24,
                                              "graph_optimization": "all"}})["deploy"]
    result = distill.export_and_time(model, slim, tmp_path, dep, x, rows)
    assert result["latency"]["3"]["speedup"] > 0 and result["latency"]["protocol"]["seq_len"] == 24
    session = ort_session(tmp_path / "slim.onnx")
    with torch.no_grad():
        want = distill.SentenceEmbedder(slim)(**{k: torch.from_numpy(v[:3, :17]) for k, v in rows.items()}).numpy()
    got = session.run(None, {k: v[:3, :17] for k, v in rows.items()})[0]  # another batch and sequence length
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_config_file_parses_and_validates():
    cfg = distill.load_config(ROOT / "configs" / "minilm.yaml")
    assert cfg["task"] == "sentence_distillation" and cfg["optimizer"]["name"] == "ramda"
    assert cfg["deploy"]["seq_len"] == 128 and cfg["deploy"]["batch_sizes"] == [1, 32]
    assert all(0 < m < cfg["train"]["steps"] for m in cfg["optimizer"]["milestones"])
    cfg = distill.load_config(ROOT / "configs" / "minilm.yaml", ["structure.lam=2e-4", "optimizer.name=ProxGen"])
    assert cfg["structure"]["lam"] == 2e-4 and cfg["optimizer"]["name"] == "proxgen"
    with pytest.raises(ValueError, match="did you mean 'steps'"):
        distill.validate_config({"train": {"step": 10}})
    with pytest.raises(ValueError, match="milestones"):
        distill.validate_config({"train": {"steps": 10}, "optimizer": {"milestones": [10]}})
    with pytest.raises(ValueError, match="structured needs a structkit solver"):
        distill.validate_config({"optimizer": {"name": "adamw"}})
    with pytest.raises(ValueError, match="magnitude.heads_kept"):
        distill.validate_config({"method": "magnitude"})


def test_train_device_is_validated_and_cuda_without_cuda_fails_first(tmp_path, monkeypatch):
    assert distill.validate_config({})["train"]["device"] == "auto"
    assert distill.validate_config({"train": {"device": "CUDA:1"}})["train"]["device"] == "cuda:1"
    with pytest.raises(ValueError, match="train.device must be auto, cpu, cuda or cuda:N"):
        distill.validate_config({"train": {"device": "gpu"}})
    from structkit.device import DeviceError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match="CUDA is not available"):
        distill.run_sentence_distillation({"train": {"device": "cuda"}}, tmp_path / "run", log=lambda m: None)
    assert not (tmp_path / "run").exists()


def _austen_available() -> bool:
    try:
        from structkit.text import AUSTEN_DB
        import rdata  # noqa: F401
    except ImportError:
        return False
    return AUSTEN_DB.with_suffix(".rdb").exists()


@pytest.mark.skipif(not _austen_available(), reason="Jane Austen's novels (r-cran-janeaustenr + rdata) not installed")
def test_run_sentence_distillation_end_to_end(tmp_path):
    """The whole job on a tiny random BERT saved to disk with a word-level vocabulary: every report field."""
    folder = tmp_path / "tiny"
    tiny_bert(layers=2).save_pretrained(folder)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = {"model": {"path": str(folder)}, "structure": {"lam": 1e-2},
           "optimizer": {"lr": 1e-3, "momentum": 0.5, "milestones": [2]},
           "train": {"steps": 4, "batch_size": 4, "log_every": 2, "precision": "fp32"}, "finetune": {"steps": 2},
           "data": {"held_out": 12, "teacher_cache": str(tmp_path / "cache.pt")},
           "deploy": {"seq_len": 16, "batch_sizes": [1, 2], "runs": 2, "warmup": 0, "graph_optimization": "all",
                      "keep_onnx": False}}
    report = distill.run_sentence_distillation(cfg, tmp_path / "run", log=lambda message: None)
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    s = report["summary"]
    assert len(s["heads_kept"]) == 2 and s["params"] <= report["dense"]["params"]
    assert {"b1_speedup", "b2_speedup", "cosine_mean", "cosine_p5", "retrieval_agreement"} <= set(s)
    assert report["prune"]["verify_max_abs_diff"] <= report["prune"]["verify_tolerance"]
    assert report["prune"]["max_abs_diff_vs_trained_embeddings"] < 1e-5 and "finetune" in report
    assert not (tmp_path / "run" / "dense.onnx").exists() and (tmp_path / "run" / "slim.pt").exists()
    assert (tmp_path / "cache.pt").exists()
    # the magnitude reference at the sizes the structured run reached, from its report
    ref = distill.run_sentence_distillation({**cfg, "method": "magnitude",
                                             "magnitude": {"from_report": str(tmp_path / "run" / "report.json")},
                                             "optimizer": {"name": "adamw", "lr": 1e-3, "momentum": None,
                                                           "milestones": [2]}},
                                            tmp_path / "mag", log=lambda message: None)
    assert ref["slim"]["heads"] == report["slim"]["heads"] and ref["slim"]["ffn"] == report["slim"]["ffn"]
    assert "quality_before_training" in ref
