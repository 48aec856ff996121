"""The sentence-distillation task's parts (structkit/tasks/sentence*.py, magnitude.py) on a tiny randomly initialised
BERT (no pretrained weights, no downloads): heads + FFN groups, exact pruning, save/load, the magnitude reference,
distillation steps through the pipeline's train_epoch, quality metrics, ONNX with a dynamic sequence axis. The whole
run through structkit.pipeline (with resume) is in tests/test_tasks.py."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import structkit
from structkit.solvers import RAMDA, StageScheduler
from structkit.tasks import sentence as distill
from structkit.tasks.magnitude import magnitude_prune, sizes_to_prune_to
from structkit.training import train_epoch

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


RULES = [{"kind": "heads"}, {"kind": "channels", "select": "*intermediate.dense", "types": ["Linear"]}]


def group_encoder(model, x, lam: float):
    """The groups configs/minilm.yaml declares: every attention head, every FFN neuron."""
    return structkit.group_parameters(model, x, [{**r, "lam": lam} for r in RULES])


def test_heads_and_ffn_groups_prune_exactly_save_and_reload(tmp_path):
    model, x = tiny_bert(), inputs()
    gs = group_encoder(model, x, lam=1e-3)
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
    # the magnitude reference reads a structured run's sizes from its slim.pt
    assert sizes_to_prune_to(str(tmp_path)) == ([2, 1], [32, 24])
    assert sizes_to_prune_to({"heads": [1, 2], "ffn": [3, 4]}) == ([1, 2], [3, 4])
    with pytest.raises(ValueError, match="prune_to must be"):
        sizes_to_prune_to(str(tmp_path / "nowhere"))


def test_magnitude_prune_keeps_the_largest_heads_and_neurons():
    model, x = tiny_bert(), inputs()
    att = model.encoder.layer[0].attention.self
    with torch.no_grad():  # make head 1 and FFN neuron 5 of layer 0 clearly the largest
        for lin in (att.query, att.key, att.value):
            lin.weight[8:16] *= 10
        model.encoder.layer[0].intermediate.dense.weight[5] *= 10
    reference = copy.deepcopy(model)
    magnitude_prune(model, x, heads_kept=[1, 3], ffn_kept=[1, 48])
    assert distill.layer_sizes(model) == {"heads": [1, 3], "ffn": [1, 48]}
    torch.testing.assert_close(model.encoder.layer[0].attention.self.query.weight,
                               reference.encoder.layer[0].attention.self.query.weight[8:16])
    torch.testing.assert_close(model.encoder.layer[0].intermediate.dense.weight,
                               reference.encoder.layer[0].intermediate.dense.weight[5:6])
    assert model.encoder.layer[0].attention.self.all_head_size == 8
    with torch.no_grad():
        assert distill.SentenceEmbedder(model)(**x).shape == (3, 32)


def test_distillation_steps_through_train_epoch_lower_the_loss():
    from structkit.setup import make_solver
    from structkit.tasks.sentence_data import BatchStream
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
    gs = group_encoder(student, batches[0][1], lam=1e-5)
    opt = RAMDA([{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in gs.param_groups()],
                lr=1e-3, momentum=0.5)
    frozen = student.embeddings.word_embeddings.weight.clone()
    stream, task = BatchStream(batches, target, per_epoch=3), distill.SentenceDistillation()
    scheduler = StageScheduler(opt, milestones=[4])
    for epoch in range(1, 7):  # 6 epochs of 3 steps: the stream wraps around the 6 batches
        stream.set_epoch(epoch)
        train_epoch(student, stream, opt, epoch=epoch, batch_loss=task.batch_loss)
        scheduler.step()
    assert loss() < 0.7 * before
    assert torch.equal(student.embeddings.word_embeddings.weight, frozen)
    # the pipeline's solver leaves frozen parameters out
    config = structkit.config.Config(model={"name": "mlp"}, data={"name": "digits"},
                                     structure=[{"kind": "channels", "lam": 1e-4}], optimizer={"milestones": [4]})
    solver, _ = make_solver(config, gs)
    assert all(p.requires_grad for g in solver.param_groups for p in g["params"])


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
    """The export the task makes (encoder + pooling, dynamic batch and sequence axes) runs at other shapes."""
    from types import SimpleNamespace
    from structkit.deploy import ort_session
    model, x = tiny_bert(), inputs()
    gs = group_encoder(model, x, lam=1e-3)
    gs.zero_(gs.groups_of("encoder.layer.1.attention.self")[:2])
    slim, _ = structkit.prune(model, gs, x)
    rows = {"input_ids": np.random.default_rng(0).integers(5, len(WORDS) + 5, (4, 24)),
            "attention_mask": np.ones((4, 24), np.int64)}
    task = distill.SentenceDistillation()
    task.bench_inputs = lambda setup: (lambda b: {k: v[:b] for k, v in rows.items()})
    info = task.export(SimpleNamespace(example_inputs=x), slim, tmp_path / "slim.onnx", opset=18,
                       exporter="torchscript")
    assert info["max_abs_diff"] < 1e-4 and info["max_abs_diff_at_seq_len"] < 1e-4
    session = ort_session(tmp_path / "slim.onnx")
    with torch.no_grad():
        want = distill.SentenceEmbedder(slim)(**{k: torch.from_numpy(v[:3, :17]) for k, v in rows.items()}).numpy()
    got = session.run(None, {k: v[:3, :17] for k, v in rows.items()})[0]  # another batch and sequence length
    np.testing.assert_allclose(got, want, atol=1e-5)
