"""The slim-model format (structkit.slim): architecture as data, weights as tensors, loaded with
weights_only=True. Round trips give the same outputs (CNN, resnet18, heads-pruned MultiheadAttention, tiny BERT,
low-rank and binary layers); pickled objects, truncated or tampered files and mismatched architectures are
refused with one clear error that names the file."""
from __future__ import annotations

import os
import zipfile

import pytest
import torch
import torchvision
from torch import nn

from structkit import group_parameters, load_slim, prune, save_slim, verify
from structkit.models import get_model
from structkit.slim import structkit_source
from structkit.structure import BinaryLinear, PrunedMultiheadAttention

CHANNELS = {"kind": "channels", "lam": 1e-3}
HEADS = {"kind": "heads", "lam": 1e-3}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zero_fraction(gs, fraction: float, seed: int = 0) -> None:
    """Zero a random ``fraction`` of the groups of every block (at least one per block)."""
    gen = torch.Generator().manual_seed(seed)
    for block in gs.blocks:
        ids = gs.groups_of(block)
        gs.zero_(ids[torch.randperm(len(ids), generator=gen)[:max(1, round(fraction * len(ids)))]])


def round_trip(slim: nn.Module, path, **kwargs) -> nn.Module:
    save_slim(slim, path, **{k: v for k, v in kwargs.items() if k == "source"})
    return load_slim(path, **{k: v for k, v in kwargs.items() if k == "build"})


def test_the_quickstart_cnn_round_trips_from_its_recorded_source(tmp_path):
    model = get_model("cnn", input_shape=(1, 28, 28), num_classes=10).eval()
    x = torch.randn(4, 1, 28, 28)
    gs = group_parameters(model, x, CHANNELS)
    zero_fraction(gs, 0.4)
    slim, report = prune(model, gs, x)
    assert report.params_after < report.params_before
    loaded = round_trip(slim, tmp_path / "slim.pt", source=structkit_source("cnn", {}, (1, 28, 28), 10))
    assert [m.out_channels for m in loaded.modules() if isinstance(m, nn.Conv2d)] == \
        [m.out_channels for m in slim.modules() if isinstance(m, nn.Conv2d)]
    assert verify(slim, loaded, x) == 0.0
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after
    assert not loaded.training  # the train/eval flags are part of the record


def test_resnet18_round_trips_with_a_build_function(tmp_path):
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 32, 32)
    gs = group_parameters(model, x, CHANNELS)
    zero_fraction(gs, 0.3)
    slim, _ = prune(model, gs, x)
    save_slim(slim, tmp_path / "slim.pt")
    with pytest.raises(ValueError, match=r"slim\.pt: the file records no way to build the dense model.*build="):
        load_slim(tmp_path / "slim.pt")
    loaded = load_slim(tmp_path / "slim.pt", build=torchvision.models.resnet18)
    assert loaded.layer1[0].conv1.out_channels == slim.layer1[0].conv1.out_channels < 64
    assert verify(slim, loaded, x) == 0.0


class AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.attn = nn.Linear(8, 32), nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff, self.out = nn.Linear(32, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.out(torch.relu(self.ff(h)))


def test_heads_pruned_multihead_attention_round_trips(tmp_path):
    torch.manual_seed(0)
    model = AttentionNet().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gs = group_parameters(model, x, [HEADS])
    gs.zero_(gs.groups_of("attn")[[1, 3]])
    slim, _ = prune(model, gs, x)
    assert isinstance(slim.attn, PrunedMultiheadAttention) and slim.attn.kept_heads == [0, 2]
    loaded = round_trip(slim, tmp_path / "slim.pt", build=AttentionNet)
    assert isinstance(loaded.attn, PrunedMultiheadAttention)
    assert (loaded.attn.num_heads, loaded.attn.kept_heads, loaded.attn.source_num_heads) == (2, [0, 2], 4)
    assert loaded.attn.in_proj_weight.dtype == torch.float64  # dtypes follow the file, not the constructor
    assert verify(slim, loaded, x) == 0.0 and verify(model, loaded, x) < 1e-12


def test_lowrank_and_binary_layers_round_trip(tmp_path):
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    model = make()
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(64, 3) @ torch.randn(3, 32))      # rank 3: two thin layers
        model[2].weight.copy_(torch.rand(16, 1) * torch.randn(16, 64).sign())  # rows a_r * sign: binary
    x = torch.randn(5, 32)
    gs = group_parameters(model, x, [{"kind": "lowrank", "select": "0", "lam": 1e-2},
                                     {"kind": "binary", "select": "2", "lam": 1e-2}])
    slim, report = prune(model, gs, x)
    assert isinstance(slim[0], nn.Sequential) and isinstance(slim[2], BinaryLinear)
    loaded = round_trip(slim, tmp_path / "slim.pt", build=make)
    assert isinstance(loaded[0], nn.Sequential) and loaded[0][0].out_features == report.lowrank[0]["rank"]
    assert isinstance(loaded[2], BinaryLinear) and loaded[2].weight_shape == (16, 64)
    assert verify(slim, loaded, x) == 0.0


@pytest.mark.transformers
def test_tiny_bert_round_trips_without_a_build_function(tmp_path):
    pytest.importorskip("transformers")
    from .test_distill import inputs, tiny_bert

    model, x = tiny_bert(), inputs()
    gs = group_parameters(model, x, [HEADS, {"kind": "channels", "select": "*intermediate.dense", "lam": 1e-3}])
    gs.zero_(torch.cat([gs.groups_of("encoder.layer.0.attention.self")[[0, 2]],
                        gs.groups_of("encoder.layer.1.attention.self")[:3],
                        gs.groups_of("encoder.layer.1.intermediate.dense")[:40]]))
    slim, _ = prune(model, gs, x)
    loaded = round_trip(slim, tmp_path / "slim.pt")  # the file records BertModel and its config
    assert [layer.attention.self.num_attention_heads for layer in loaded.encoder.layer] == [2, 1]
    assert [layer.attention.self.all_head_size for layer in loaded.encoder.layer] == [16, 8]
    assert loaded.encoder.layer[1].intermediate.dense.out_features == 24
    assert loaded.config.num_attention_heads == 4  # the config keeps the dense count; the layers have theirs
    assert verify(slim, loaded, x) == 0.0


def _small_slim(tmp_path):
    model = get_model("cnn", input_shape=(1, 12, 12), num_classes=3, widths=(8, 8, 16), pool_after=(1,)).eval()
    x = torch.randn(2, 1, 12, 12)
    gs = group_parameters(model, x, CHANNELS)
    zero_fraction(gs, 0.3)
    slim, _ = prune(model, gs, x)
    path = tmp_path / "slim.pt"
    save_slim(slim, path, source=structkit_source("cnn", {"widths": [8, 8, 16], "pool_after": [1]}, (1, 12, 12), 3))
    return slim, x, path


class Evil:
    """Unpickling this runs a shell command (what a hostile slim.pt or checkpoint would hold)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_file_with_a_pickled_malicious_object_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    _, _, path = _small_slim(tmp_path)
    saved = torch.load(path, weights_only=True)
    saved["source"] = Evil(marker)  # the right format record, plus an object whose unpickling runs a command
    torch.save(saved, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"evil\.pt is not a usable structkit slim model: it holds pickled Python "
                                         r"objects \(it refers to (posix|os)\.system\).*Nothing in the file was run"):
        load_slim(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # an old-style pickled module: refused too
    with pytest.raises(ValueError, match="holds pickled Python objects"):
        load_slim(tmp_path / "module.pt")


def test_truncated_and_foreign_files_give_one_clear_error(tmp_path):
    _, _, path = _small_slim(tmp_path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"cut\.pt is not a usable structkit slim model: it is truncated, corrupt"):
        load_slim(tmp_path / "cut.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"other\.pt was not written by structkit\.save_slim"):
        load_slim(tmp_path / "other.pt")


def _tampered(path, tmp_path, change) -> os.PathLike:
    saved = torch.load(path, weights_only=True)
    change(saved)
    out = tmp_path / "tampered.pt"
    torch.save(saved, out)
    return out


def test_tampered_records_and_weights_are_refused(tmp_path):
    slim, x, path = _small_slim(tmp_path)
    assert verify(slim, load_slim(path), x) == 0.0

    def width(saved):  # a width that the weights do not have
        saved["modules"]["features.conv1"]["attrs"]["out_channels"] += 1
    with pytest.raises(ValueError, match=r"tampered\.pt: .*(widths|weights do not fit|features\.conv1)"):
        load_slim(_tampered(path, tmp_path, width))

    def weight(saved):  # weights of another shape than the record says
        w = saved["state_dict"]["features.conv1.weight"]
        saved["state_dict"]["features.conv1.weight"] = torch.zeros(w.shape[0] + 1, *w.shape[1:])
    with pytest.raises(ValueError, match=r"tampered\.pt: .*features\.conv1"):
        load_slim(_tampered(path, tmp_path, weight))

    def foreign_class(saved):  # a class outside the allowlist cannot be created from a file
        saved["modules"]["features.conv1"]["class"] = "subprocess:Popen"
    with pytest.raises(ValueError, match=r"tampered\.pt: the rebuilt dense model has .*subprocess:Popen"):
        load_slim(_tampered(path, tmp_path, foreign_class))

    def callable_source(saved):  # a source naming code to import is not followed
        saved["source"]["name"] = "os:system"
    with pytest.raises(ValueError, match=r"does not import code named in a file"):
        load_slim(_tampered(path, tmp_path, callable_source))


def test_a_build_function_returning_another_model_is_refused(tmp_path):
    _, _, path = _small_slim(tmp_path)
    with pytest.raises(ValueError, match=r"slim\.pt: the rebuilt dense model has .* build\(\) must return the model"):
        load_slim(path, build=lambda: torchvision.models.resnet18())
    other = lambda: get_model("cnn", input_shape=(1, 12, 12), num_classes=3)  # noqa: E731  (other widths)
    with pytest.raises(ValueError, match=r"slim\.pt: .*(modules differ|weights do not fit|widths)"):
        load_slim(path, build=other)


def test_files_are_plain_zip_archives_of_tensors_and_data(tmp_path):
    _, _, path = _small_slim(tmp_path)
    assert zipfile.is_zipfile(path)
    saved = torch.load(path, weights_only=True)
    assert saved["format"] == "structkit.slim" and saved["version"] == 2
    assert saved["source"] == {"kind": "structkit", "name": "cnn", "options": {"widths": [8, 8, 16], "pool_after": [1]},
                               "input_shape": [1, 12, 12], "num_classes": 3}
