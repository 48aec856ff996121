"""ONNX export and the ONNX Runtime latency protocol of structkit.deploy (tiny models; the file runs in seconds)."""
from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from structkit import deploy
from structkit.deploy import environment, export_onnx, flatten_outputs, measure_latency, ort_session

try:
    import onnxscript  # noqa: F401  (the dynamo exporter needs it)
    HAS_ONNXSCRIPT = True
except ImportError:
    HAS_ONNXSCRIPT = False

SKIP_DYNAMO = pytest.mark.skipif(not HAS_ONNXSCRIPT, reason="the dynamo exporter needs onnxscript")
EXPORTERS = ["torchscript", pytest.param("dynamo", marks=SKIP_DYNAMO)]


def conv_bn_linear() -> nn.Module:
    """Conv + BatchNorm (random running statistics, so a wrong BN export shows) + pooling + linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    bn = model[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    nn.init.uniform_(bn.weight, 0.5, 2)
    nn.init.uniform_(bn.bias, -1, 1)
    return model


def mlp(hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 5))


MODELS = {"conv_bn_linear": (conv_bn_linear, (3, 12, 12)), "mlp": (mlp, (20,))}


class DictOutput(nn.Module):
    """Returns a dict with a nested tuple, like a Hugging Face ModelOutput with hidden states."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 4)

    def forward(self, x):
        h = self.body(x)
        return {"logits": h.sum(-1, keepdim=True), "hidden": (h, torch.relu(h))}


class ExportOffset(nn.Module):
    """``x * scale`` in torch, ``x * scale + 1`` in the exported graph: an ONNX file that does not match torch."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale + (1.0 if torch.onnx.is_in_onnx_export() else 0.0)


def run_ort(path, x: torch.Tensor) -> np.ndarray:
    return ort_session(path).run(None, {"input": x.numpy()})[0]


@pytest.fixture(scope="module", params=[
    pytest.param((m, e), id=f"{m}-{e}", marks=[SKIP_DYNAMO] if e == "dynamo" else [])
    for m in MODELS for e in ("torchscript", "dynamo")])
def exported(request, tmp_path_factory):
    """(model, input shape without batch, path, export_onnx result) exported with batch 2."""
    name, exporter = request.param
    build, shape = MODELS[name]
    model = build().eval()
    path = tmp_path_factory.mktemp(f"{name}-{exporter}") / "model.onnx"
    info = export_onnx(model, torch.randn(2, *shape), path, exporter=exporter)
    return model, shape, path, info


def test_ort_output_matches_torch(exported):
    model, shape, path, info = exported
    x = torch.randn(2, *shape)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(run_ort(path, x) - expected).max() <= 1e-5
    assert 0 <= info["max_abs_diff"] <= 1e-5


def test_result_describes_the_file(exported):
    _, _, path, info = exported
    assert info["path"] == str(path) and info["opset"] == 18
    assert info["bytes"] == path.stat().st_size > 0
    assert onnx.load(path).opset_import[0].version == 18


def test_batch_dimension_is_dynamic(exported):
    model, shape, path, _ = exported
    x = torch.randn(5, *shape)
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_ort(path, x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-5
    first_dim = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[0]
    assert first_dim.dim_param and not first_dim.dim_value


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_dict_and_nested_outputs_are_flattened_in_order(exporter, tmp_path):
    model = DictOutput().eval()
    x = torch.randn(3, 6)
    info = export_onnx(model, x, tmp_path / "m.onnx", exporter=exporter)
    session = ort_session(info["path"])
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1", "output_2"]
    with torch.no_grad():
        expected = flatten_outputs(model(x))
    for got, ref in zip(session.run(None, {"input": x.numpy()}), expected, strict=True):
        assert np.abs(got - ref.numpy()).max() <= 1e-5


def test_flatten_outputs_order():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert [t.item() for t in flatten_outputs({"x": a, "y": (b, None, [c])})] == [0.0, 1.0, 2.0]
    assert flatten_outputs(None) == []
    with pytest.raises(TypeError, match="str"):
        flatten_outputs("text", strict=True)


def test_extra_dynamic_axes_are_merged_with_the_batch_axis(tmp_path):
    class Mean(nn.Module):
        def forward(self, x):
            return x.mean(1)

    path = tmp_path / "m.onnx"
    export_onnx(Mean(), torch.randn(2, 7, 3), path, dynamic_axes={"input": {1: "sequence"}})
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims[:2]] == ["batch", "sequence"]
    x = torch.randn(4, 11, 3)
    assert np.abs(run_ort(path, x) - x.mean(1).numpy()).max() <= 1e-6
    with pytest.raises(ValueError, match="neither an input"):
        export_onnx(Mean(), torch.randn(2, 7, 3), path, dynamic_axes={"tokens": {1: "sequence"}})


def test_export_restores_training_modes(tmp_path):
    model = conv_bn_linear().train()
    model[1].eval()  # e.g. frozen BatchNorm statistics
    export_onnx(model, torch.randn(2, 3, 12, 12), tmp_path / "m.onnx")
    assert [m.training for m in model] == [True, False] + [True] * 5


@pytest.mark.transformers
def test_hugging_face_model_output_and_sequence_axis(tmp_path):
    """TorchScript exporter only: the dynamo exporter takes ~8 s here (it passed, docs/deployment.md)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()
    ids, mask = torch.randint(0, 50, (2, 7)), torch.ones(2, 7, dtype=torch.long)
    sequence = {1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about transformers' Python-side shape checks
        info = export_onnx(model, (ids, mask), tmp_path / "bert.onnx", input_names=["input_ids", "attention_mask"],
                           output_names=["last_hidden_state", "pooler_output"],
                           dynamic_axes={"input_ids": sequence, "attention_mask": sequence,
                                         "last_hidden_state": sequence})
    ids, mask = torch.randint(0, 50, (3, 11)), torch.ones(3, 11, dtype=torch.long)
    mask[0, 5:] = 0
    got = ort_session(info["path"]).run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        expected = model(ids, mask)  # a ModelOutput: last_hidden_state, pooler_output
    for onnx_out, torch_out in zip(got, flatten_outputs(expected), strict=True):
        assert np.abs(onnx_out - torch_out.numpy()).max() <= 1e-5


@pytest.mark.parametrize("old_file", [False, True])
def test_failed_export_leaves_no_file(monkeypatch, tmp_path, old_file):
    path = tmp_path / "model.onnx"
    if old_file:
        path.write_bytes(b"previous good export")

    written = []

    def crashing_export(model, args, f, **kwargs):
        written.append(Path(f))
        Path(f).write_bytes(b"half a model")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", crashing_export)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(mlp(), torch.randn(2, 20), path)
    assert written[0].parent == tmp_path and written[0] != path  # a temporary file next to path (same file system)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["model.onnx"] if old_file else [])
    if old_file:
        assert path.read_bytes() == b"previous good export"


def test_mismatching_onnx_output_raises_and_writes_nothing(tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.raises(RuntimeError, match=r"max abs diff 1 > atol 0\.0001"):
        export_onnx(ExportOffset(scale=1.0), torch.rand(2, 3), path)
    assert list(tmp_path.iterdir()) == []


def test_check_tolerance_is_relative_to_the_output_scale(tmp_path):
    x = torch.rand(2, 3) + 0.5  # max |output| >= 0.5e5, so atol 1e-4 allows a diff of >= 5
    info = export_onnx(ExportOffset(scale=1e5), x, tmp_path / "model.onnx")
    assert info["max_abs_diff"] == pytest.approx(1.0, abs=0.02)


def test_check_false_skips_the_comparison(tmp_path):
    info = export_onnx(ExportOffset(scale=1.0), torch.rand(2, 3), tmp_path / "model.onnx", check=False)
    assert info["max_abs_diff"] is None and Path(info["path"]).is_file()


@pytest.mark.parametrize("content", [b"not an onnx model \x00\x01\x02", None], ids=["corrupt", "missing"])
def test_unloadable_file_gives_a_clear_error(tmp_path, content):
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"cannot load ONNX model .*model\.onnx.*re-export it with"):
        ort_session(path)


@pytest.mark.parametrize("spinning", [True, False])
def test_session_settings_are_applied(dense_and_slim, spinning):
    session = ort_session(dense_and_slim["dense"], threads=1, graph_optimization="extended", spinning=spinning)
    options = session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == ("1" if spinning else "0")


def test_invalid_session_settings_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="graph_optimization"):
        ort_session(tmp_path / "m.onnx", graph_optimization="max")
    with pytest.raises(ValueError, match="graph_optimization"):
        measure_latency({"a": tmp_path / "m.onnx"}, lambda b: {}, graph_optimization="max")


@pytest.fixture(scope="module")
def dense_and_slim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("latency")
    x = torch.randn(2, 20)
    return {name: export_onnx(mlp(hidden), x, folder / f"{name}.onnx")["path"]
            for name, hidden in [("dense", 64), ("slim", 16)]}


def mlp_inputs(batch: int) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(batch).standard_normal((batch, 20), dtype=np.float32)}


@pytest.mark.parametrize("graph_optimization", ["all", "fastest"])
def test_measure_latency_reports_the_documented_keys(dense_and_slim, graph_optimization):
    result = measure_latency(dense_and_slim, mlp_inputs, (1, 3), warmup=2, runs=15,
                             graph_optimization=graph_optimization)
    assert set(result) == {"1", "3", "protocol"}
    assert result["protocol"] == {"threads": 2, "warmup": 2, "runs": 15, "interleaved": True, "spinning": False,
                                  "graph_optimization": graph_optimization}
    for batch in ("1", "3"):
        row = result[batch]
        for name in ("dense", "slim"):
            assert 0 < row[f"{name}_p50_ms"] <= row[f"{name}_p90_ms"]
            assert row[f"{name}_mean_ms"] > 0
        assert row["speedup"] == row["dense_p50_ms"] / row["slim_p50_ms"]
        expected = {"all"} if graph_optimization == "all" else {"all", "extended"}
        assert set(row["settings"]) == {"dense", "slim"} and set(row["settings"].values()) <= expected


def test_speedup_only_for_dense_and_slim(dense_and_slim):
    result = measure_latency({"a": dense_and_slim["dense"], "b": dense_and_slim["slim"]}, mlp_inputs, (2,),
                             warmup=0, runs=3, graph_optimization="all")
    assert "speedup" not in result["2"] and {"a_p50_ms", "b_p90_ms", "b_mean_ms"} <= set(result["2"])


def test_missing_input_is_named(dense_and_slim):
    with pytest.raises(ValueError, match=r"lacks inputs \['input'\] of model 'dense'"):
        measure_latency(dense_and_slim, lambda b: {"x": np.zeros((b, 20), np.float32)}, (1,), runs=1)


class FakeSession:
    """Stands in for an InferenceSession: records every run in a shared log and takes a set time per run."""

    def __init__(self, log, clock, name, level, seconds):
        self.log, self.clock, self.name, self.level, self.seconds = log, clock, name, level, seconds

    def get_inputs(self):
        return [SimpleNamespace(name="input")]

    def run(self, output_names, feed):
        self.log.append((self.name, self.level, id(feed)))
        self.clock[0] += self.seconds


@pytest.fixture
def fake_sessions(monkeypatch):
    """Fake sessions and a fake clock: dense is faster with "extended", slim with "all" (as with unaligned widths)."""
    log, clock = [], [0.0]
    seconds = {("dense", "all"): 2e-3, ("dense", "extended"): 1e-3,
               ("slim", "all"): 0.4e-3, ("slim", "extended"): 0.8e-3}

    def fake_ort_session(path, *, threads, graph_optimization, spinning):
        assert threads == 2 and not spinning
        return FakeSession(log, clock, str(path), graph_optimization, seconds[str(path), graph_optimization])

    monkeypatch.setattr(deploy, "ort_session", fake_ort_session)
    monkeypatch.setattr(deploy.time, "perf_counter", lambda: clock[0])
    return log


def test_fastest_uses_each_models_faster_setting(fake_sessions):
    result = measure_latency({"dense": "dense", "slim": "slim"}, mlp_inputs, (1,), warmup=1, runs=4)
    row = result["1"]
    assert row["settings"] == {"dense": "extended", "slim": "all"}
    assert row["dense_p50_ms"] == pytest.approx(1.0) and row["slim_p50_ms"] == pytest.approx(0.4)
    assert row["speedup"] == pytest.approx(2.5)
    timed = fake_sessions[-8:]
    assert {(name, level) for name, level, _ in timed} == {("dense", "extended"), ("slim", "all")}


def test_levels_can_be_given_per_model(fake_sessions):
    result = measure_latency({"dense": "dense", "slim": "slim"}, mlp_inputs, (1,), warmup=0, runs=2,
                             graph_optimization={"dense": "all", "slim": "fastest"})
    assert result["1"]["settings"] == {"dense": "all", "slim": "all"}
    assert {(name, level) for name, level, _ in fake_sessions} == {("dense", "all"), ("slim", "all"),
                                                                 ("slim", "extended")}
    with pytest.raises(ValueError, match="names models"):
        measure_latency({"dense": "dense", "slim": "slim"}, mlp_inputs, graph_optimization={"dense": "all"})


def test_runs_are_interleaved_in_alternating_order_with_one_input_dict(fake_sessions):
    measure_latency({"dense": "dense", "slim": "slim"}, mlp_inputs, (1, 2), warmup=2, runs=3,
                    graph_optimization="all")
    order = [name for name, _, _ in fake_sessions]
    per_batch = ["dense", "slim", "slim", "dense"] + ["dense", "slim", "slim", "dense", "dense", "slim"]
    assert order == per_batch * 2  # warm-up rounds, then timed rounds: A B, B A, A B, ...
    feeds = [feed for _, _, feed in fake_sessions]
    assert len(set(feeds[:10])) == 1 and len(set(feeds[10:])) == 1  # built once per batch size


def test_environment_names_cpu_cores_and_versions():
    env = environment()
    assert isinstance(env["cpu"], str) and env["logical_cores"] >= 1
    for key in ("torch", "onnxruntime", "onnx", "numpy", "structkit", "python", "platform"):
        assert isinstance(env[key], str) and env[key]
    assert "CPUExecutionProvider" in env["ort_providers"]
