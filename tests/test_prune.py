"""Pruning exactly-zero groups keeps the function: real architectures, heads, low rank, binary, alignment,
verification, save/load."""
import json

import pytest
import torch
import torchvision
from torch import nn

import structkit
from structkit import group_parameters, load_slim, prune, save_slim, verify
from structkit.structure import BinaryLinear, Block, PrunedMultiheadAttention, StructureKind, kinds

from .test_structure import one_thread  # noqa: F401  (autouse fixture)
from .test_structure import SmallCNN, randomize_batchnorm, small_vit, zero_some_groups

CHANNELS = {"kind": "channels", "lam": 1e-3}
HEADS = {"kind": "heads", "lam": 1e-3}


class MHAModel(nn.Module):
    """Input projection, self-attention with a residual, an FFN, a classifier."""

    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.inp, self.attn = nn.Linear(8, 32), nn.MultiheadAttention(32, 4, batch_first=batch_first)
        self.ff1, self.ff2, self.out = nn.Linear(32, 48), nn.Linear(48, 32), nn.Linear(32, 3)

    def forward(self, x):
        x = self.inp(x if self.batch_first else x.transpose(0, 1))
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.ff2(torch.relu(self.ff1(x)))
        return self.out(x)


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=16)
    torch.manual_seed(0)
    ids = torch.randint(0, 60, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return transformers.BertModel(cfg), {"input_ids": ids, "attention_mask": mask}


def case(name):
    """(model, example inputs, rules, dtype) of each architecture checked for exactness."""
    g = torch.Generator().manual_seed(1)
    img = torch.randn(1, 3, 32, 32, generator=g)
    ffn = {"kind": "channels", "select": "*intermediate.dense", "lam": 1e-3}
    return {
        "resnet18": lambda: (torchvision.models.resnet18(), torch.randn(2, 3, 32, 32, generator=g), [CHANNELS], torch.float64),
        "mobilenet_v2": lambda: (torchvision.models.mobilenet_v2(), img, [CHANNELS], torch.float64),
        "vgg11_bn": lambda: (torchvision.models.vgg11_bn(), img, [CHANNELS], torch.float32),
        "regnet_x_400mf (grouped convs)": lambda: (torchvision.models.regnet_x_400mf(), img, [CHANNELS], torch.float32),
        "densenet121 (concatenation)": lambda: (torchvision.models.densenet121(), img, [CHANNELS], torch.float32),
        "vit": lambda: (small_vit(), torch.randn(2, 3, 16, 16, generator=g), [CHANNELS, HEADS], torch.float64),
        "mha batch_first": lambda: (MHAModel(True), torch.randn(2, 5, 8, generator=g), [CHANNELS, HEADS], torch.float64),
        "mha seq_first": lambda: (MHAModel(False), torch.randn(2, 5, 8, generator=g), [CHANNELS, HEADS], torch.float64),
        "bert": lambda: (*tiny_bert(), [ffn, HEADS], torch.float64),
    }[name]()


def to_dtype(x, dtype):
    """Floating example inputs in ``dtype`` (token ids and masks stay integers)."""
    if isinstance(x, dict):
        return {k: to_dtype(v, dtype) for k, v in x.items()}
    return x.to(dtype) if x.is_floating_point() else x


@pytest.mark.parametrize("name", [
    "resnet18", "mobilenet_v2", "vit", "mha batch_first", "mha seq_first",
    pytest.param("bert", marks=pytest.mark.transformers),
    "vgg11_bn", "regnet_x_400mf (grouped convs)", "densenet121 (concatenation)",
])
def test_removing_zeroed_groups_keeps_the_function(name):
    """40% of every block's groups zeroed (BatchNorm randomised so a wrong removal shows), then pruned: the slim
    model is smaller in every grouped layer and computes the same outputs (float64: to rounding)."""
    model, x, rules, dtype = case(name)
    gen = torch.Generator().manual_seed(0)
    model, x = model.to(dtype).eval(), to_dtype(x, dtype)
    randomize_batchnorm(model, gen)
    gs = group_parameters(model, x, rules)
    zero_some_groups(gs, 0.4, gen)
    slim, report = prune(model, gs, x)
    assert report.params_after < report.params_before and report.macs_after < report.macs_before
    assert sum(p.numel() for p in slim.parameters()) == report.params_after
    assert report.layers and all(e["after"] < e["before"] for e in report.layers.values())
    assert all(e["removed_groups"] > 0 and e["params_after"] < e["params_before"] for e in report.layers.values())
    assert json.loads(json.dumps(report.to_dict()))["params_after"] == report.params_after
    with torch.no_grad():
        scale = max(1.0, max(t.abs().max().item() for t in structkit.structure._util.flatten_outputs(
            structkit.structure._util.call(model, x))))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert verify(model, slim, x) <= tol * scale
    assert report.verify_max_abs_diff <= tol * scale


@pytest.mark.transformers
def test_bert_keeps_per_layer_head_counts_and_they_survive_save_and_load(tmp_path):
    model, x = tiny_bert()
    model = model.double().eval()
    gs = group_parameters(model, x, [HEADS])
    gs.zero_(gs.groups_of("encoder.layer.0.attention.self")[[0, 2, 3]])
    gs.zero_(gs.groups_of("encoder.layer.1.attention.self")[[1]])
    slim, report = prune(model, gs, x)
    heads = [layer.attention.self.num_attention_heads for layer in slim.encoder.layer]
    assert heads == [1, 3]
    assert [layer.attention.self.all_head_size for layer in slim.encoder.layer] == [8, 24]
    assert slim.encoder.layer[0].attention.output.dense.in_features == 8
    save_slim(slim, tmp_path / "bert.pt")
    loaded = load_slim(tmp_path / "bert.pt")
    assert [layer.attention.self.num_attention_heads for layer in loaded.encoder.layer] == heads
    assert verify(model, loaded, x) < 1e-10
    record = torch.load(tmp_path / "bert.pt", weights_only=True)["architecture"]
    assert record["encoder.layer.1.attention.self"]["num_attention_heads"] == 3


def test_lowrank_layers_become_two_thin_layers_with_the_same_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(1, 8, 5))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = model[:4]
            self.conv = nn.Conv1d(64, 40, 3)

        def forward(self, x):
            return self.conv(self.mlp(x).unsqueeze(-1).expand(-1, -1, 6))

    net = Net().double()
    with torch.no_grad():  # exactly low rank in float64 up to rounding: rank 4, 6 and 5
        net.mlp[0].weight.copy_(torch.randn(64, 4, dtype=torch.float64) @ torch.randn(4, 32, dtype=torch.float64))
        net.mlp[2].weight.copy_(torch.randn(64, 6, dtype=torch.float64) @ torch.randn(6, 64, dtype=torch.float64))
        net.conv.weight.copy_((torch.randn(40, 5, dtype=torch.float64) @ torch.randn(5, 64 * 3, dtype=torch.float64))
                              .view(40, 64, 3))
    x = torch.randn(7, 32, dtype=torch.float64)
    gs = group_parameters(net, x, {"kind": "lowrank", "lam": 1e-2})
    assert gs.metrics()["lowrank_level"] == pytest.approx((28 + 58 + 35) / (32 + 64 + 40))
    slim, report = prune(net, gs, x)
    assert [(e["module"], e["rank"]) for e in report.lowrank] == [("mlp.0", 4), ("mlp.2", 6), ("conv", 5)]
    first, second = slim.mlp[0]
    assert (first.in_features, first.out_features, second.out_features) == (32, 4, 64)
    assert isinstance(slim.conv[0], nn.Conv1d) and slim.conv[0].kernel_size == (3,) and slim.conv[1].kernel_size == (1,)
    assert report.params_after < report.params_before
    scale = net(x).abs().max().item()
    assert verify(net, slim, x) <= 1e-10 * scale


def test_lowrank_keeps_layers_whose_factorization_would_not_be_smaller():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    gs = group_parameters(model, torch.randn(3, 6), {"kind": "lowrank", "select": "0", "lam": 1e-2})
    slim, report = prune(model, gs, torch.randn(3, 6))
    assert isinstance(slim[0], nn.Linear) and report.lowrank == []
    assert "would not be smaller" in report.skipped[0]["reason"]


def test_binary_layers_are_packed_to_one_bit_per_weight_and_others_are_kept():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(12, 1) * torch.randn(12, 16).sign())
    x = torch.randn(5, 16)
    gs = group_parameters(model, x, {"kind": "binary", "lam": 1e-2})
    assert [len(gs.groups_of(b)) for b in gs.blocks] == [12, 4]
    slim, report = prune(model, gs, x)
    assert isinstance(slim[0], BinaryLinear) and isinstance(slim[2], nn.Linear)
    assert report.binary == [{"module": "0", "rows": 12, "packed_bits": 12 * 16 + 12 * 32, "dense_bits": 12 * 16 * 32}]
    assert any(s["module"] == "2" and "not exactly +-a_r" in s["reason"] for s in report.skipped)
    assert verify(model, slim, x) == 0.0


def test_unstructured_zeros_are_reported_without_surgery():
    model = SmallCNN()
    x = torch.randn(2, 3, 8, 8)
    gs = group_parameters(model, x, {"kind": "unstructured", "types": ["Conv2d"], "lam": 1e-4})
    assert len(gs) == 8 * 27 + 16 * 72
    gs.zero_(torch.arange(0, len(gs), 4))
    assert gs.metrics()["unstructured_sparsity"] == pytest.approx(0.25, abs=1e-3)
    slim, report = prune(model, gs, x)
    assert report.params_after == report.params_before
    assert [e["module"] for e in report.unstructured] == ["conv1", "conv2"]
    assert report.unstructured[0]["zero_fraction"] == pytest.approx(0.25, abs=0.01)


def test_round_to_keeps_zero_channels_so_every_width_is_a_multiple_and_stays_exact():
    model, x, rules, dtype = case("resnet18")
    gen = torch.Generator().manual_seed(3)
    model, x = model.to(dtype).eval(), to_dtype(x, dtype)
    randomize_batchnorm(model, gen)
    gs = group_parameters(model, x, rules)
    zero_some_groups(gs, 0.4, gen)
    slim, report = prune(model, gs, x, round_to=8)
    widths = [e["after"] for e in report.layers.values()]
    assert all(w % 8 == 0 for w in widths) and all(e["after"] < e["before"] for e in report.layers.values())
    assert slim.conv1.out_channels == report.layers["conv1"]["after"]
    assert "conv1: 64 -> " in report.summary()
    assert any("multiple of 8" in s["reason"] for s in report.skipped)
    assert verify(model, slim, x) <= 1e-10 * max(1.0, model(x).abs().max().item())


def test_block_groups_keep_widths_multiples_of_the_block():
    model = SmallCNN().double().eval()
    gen = torch.Generator().manual_seed(0)
    randomize_batchnorm(model, gen)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gs = group_parameters(model, x, {**CHANNELS, "block": 4})
    gs.zero_(torch.cat([gs.groups_of("conv1")[[1]], gs.groups_of("conv2")[[0, 2]]]))
    slim, _ = prune(model, gs, x)
    assert (slim.conv1.out_channels, slim.conv2.out_channels, slim.fc.in_features) == (4, 8, 8)
    assert verify(model, slim, x) < 1e-12


def test_a_pruned_attention_layer_can_be_grouped_and_pruned_again():
    model = MHAModel().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gs = group_parameters(model, x, HEADS)
    gs.zero_(gs.groups_of("attn")[[1]])
    slim, _ = prune(model, gs, x)
    gs2 = group_parameters(slim, x, HEADS)
    assert len(gs2) == 3
    gs2.zero_(gs2.groups_of("attn")[[1]])  # source head 2
    slimmer, _ = prune(slim, gs2, x)
    assert slimmer.attn.num_heads == 2 and slimmer.attn.kept_heads == [0, 3]
    assert verify(slim, slimmer, x) < 1e-12


def test_the_last_channel_and_the_last_head_are_never_removed():
    model = MHAModel().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    gs = group_parameters(model, x, [CHANNELS, HEADS])
    gs.zero_(torch.cat([gs.groups_of("ff1"), gs.groups_of("attn")]))
    slim, report = prune(model, gs, x)
    assert slim.ff1.out_features == 1 and slim.attn.num_heads == 1
    assert {s["module"] for s in report.skipped if "keeps at least one" in s["reason"]} == {"ff1", "attn"}
    assert verify(model, slim, x) < 1e-12


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_attention_matches_the_stock_module_with_masks(batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, dtype=torch.float64).eval()
    with torch.no_grad():  # zero heads 1 and 3: q, k, v rows and output columns
        for h in (1, 3):
            for p in range(3):
                mha.in_proj_weight[p * 16 + h * 4: p * 16 + h * 4 + 4] = 0
                mha.in_proj_bias[p * 16 + h * 4: p * 16 + h * 4 + 4] = 0
            mha.out_proj.weight[:, h * 4: h * 4 + 4] = 0
    pruned = PrunedMultiheadAttention.from_mha(mha, [0, 2]).eval()
    b, l, s = 3, 5, 6
    q = torch.randn(b, l, 16, dtype=torch.float64)
    k = torch.randn(b, s, 16, dtype=torch.float64)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    pad = torch.zeros(b, s, dtype=torch.bool)
    pad[0, 4:] = True
    masks = [dict(), dict(attn_mask=torch.randn(l, s, dtype=torch.float64)), dict(key_padding_mask=pad),
             dict(attn_mask=torch.rand(b * 4, l, s) > 0.7, key_padding_mask=pad)]
    for kw in masks:
        for need_weights in (False, True):
            ref = mha(q, k, k, need_weights=need_weights, **kw)[0]
            out = pruned(q, k, k, need_weights=need_weights, **kw)[0]
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(pruned(q[:, 0] if batch_first else q[:, 0], k[:, 0], k[:, 0])[0],
                               mha(q[:, 0], k[:, 0], k[:, 0])[0], rtol=0, atol=1e-12)


class Sabotage(StructureKind):
    """A broken kind: its prune changes a weight, which verification must catch."""
    handles = "Linear layers"

    def accepts(self, module):
        return isinstance(module, nn.Linear)

    def build(self, ctx, targets):
        return [Block(kind=self.name, label=t.name, num_groups=1, regularizer="none", lam=0.0,
                      tensors=[(ctx.param(t.module, "weight"), "tensor")], rule=t.rule_index) for t in targets]

    def prune(self, ctx, blocks, zero):
        with torch.no_grad():
            ctx.model.get_submodule(blocks[0].label).weight.add_(1.0)


def test_prune_raises_when_the_slim_model_does_not_match(monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", kinds._KINDS.copy())
    kinds.register_kind("sabotage")(Sabotage)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    weight = model[0].weight.detach().clone()
    x = torch.randn(3, 4)
    gs = group_parameters(model, x, {"kind": "sabotage", "regularizer": "none", "select": "0"})
    with pytest.raises(RuntimeError, match="differ from the trained model's") as err:
        prune(model, gs, x)
    assert err.value.report.verify_max_abs_diff > 1e-2
    torch.testing.assert_close(model[0].weight, weight, rtol=0, atol=0)  # only the copy was changed


def test_prune_leaves_the_trained_model_untouched_unless_inplace():
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gs = group_parameters(model, x, CHANNELS)
    gs.zero_([0, 1, 9])
    widths = (model.conv1.out_channels, model.conv2.out_channels)
    slim, _ = prune(model, gs, x)
    assert slim is not model and (model.conv1.out_channels, model.conv2.out_channels) == widths
    reference = model(x)
    same, report = prune(model, gs, x, inplace=True)
    assert same is model and model.conv1.out_channels == 6 and model.conv2.out_channels == 15
    torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="changed shape since it was grouped"):
        gs.norms()


def test_save_and_load_round_trip_a_slim_cnn(tmp_path):
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    gs = group_parameters(model, x, CHANNELS)
    gs.zero_([2, 3, 12])
    slim, _ = prune(model, gs, x)
    save_slim(slim, tmp_path / "slim.pt")
    loaded = load_slim(tmp_path / "slim.pt", build=SmallCNN)  # the file holds data, not code: build the dense model
    assert loaded.conv1.out_channels == slim.conv1.out_channels == 6
    assert verify(slim, loaded, x) == 0.0
    torch.save({"model": slim.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not written by structkit.save_slim"):
        load_slim(tmp_path / "other.pt")


def test_verify_compares_dict_and_tuple_outputs():
    class Two(nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.lin, self.shift = nn.Linear(3, 2), shift

        def forward(self, x):
            y = self.lin(x)
            return {"a": y, "b": (y + self.shift, None)}

    a, b = Two(0.0), Two(0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    assert verify(a, a, x) == 0.0
    scale = a(x)["a"].abs().max().item()  # the largest output entry, over every tensor
    assert verify(a, b, x) == pytest.approx(0.5 / (scale + 1e-12))
    assert verify(a, b, x, dtype=torch.float64) == pytest.approx(0.5 / (scale + 1e-12), rel=1e-6)


def test_macs_are_per_example_in_total_and_per_layer():
    """MACs do not depend on the verification batch's size, in total or per layer; a Linear's per-layer count is
    torch-pruning's closed form in x out + out (bias) per example."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    with torch.no_grad():
        model[0].weight[:6] = 0
        model[0].bias[:6] = 0
    reports = []
    for batch in (1, 7):
        x = torch.randn(batch, 12)
        gs = group_parameters(model, x, [{"select": "0", "kind": "channels", "lam": 1e-3}])
        reports.append(prune(model, gs, x)[1])
    one, seven = reports
    assert (one.macs_before, one.macs_after) == (seven.macs_before, seven.macs_after)
    assert one.layers == seven.layers
    assert one.layers["0"]["macs_before"] == 12 * 16 + 16 and one.layers["0"]["macs_after"] == 12 * 10 + 10
    assert one.macs_before - one.macs_after >= 6 * (12 + 1) + 6 * 5


# ---------------------------------------------------------------- issue 15: relative verification, guards at prune time
class Nudge(Sabotage):
    """A broken kind: its prune scales a weight by (1 + 5e-4), a 5e-4 relative error."""

    def prune(self, ctx, blocks, zero):
        with torch.no_grad():
            ctx.model.get_submodule(blocks[0].label).weight.mul_(1 + 5e-4)


def test_verification_is_relative_to_the_output_scale_so_small_outputs_do_not_hide_errors(monkeypatch):
    """Outputs of size ~1e-3: a 5e-4 relative error is an absolute 5e-7, which an absolute tolerance of
    1e-4 x max(1, |out|) let through."""
    monkeypatch.setattr(kinds, "_KINDS", kinds._KINDS.copy())
    kinds.register_kind("nudge")(Nudge)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2, bias=False)).double()
    with torch.no_grad():
        model[1].weight.mul_(1e-3)
    x = torch.randn(3, 4, dtype=torch.float64)
    gs = group_parameters(model, x, {"kind": "nudge", "regularizer": "none", "select": "0"})
    with pytest.raises(RuntimeError, match="relative to the output scale") as err:
        prune(model, gs, x)
    report = err.value.report
    assert report.verify_rel_diff == pytest.approx(5e-4, rel=1e-3) and report.verify_max_abs_diff < 1e-5
    assert report.verify_rel_tol == 1e-10 and report.verify_dtype == "float64"
    slim, report = prune(model, gs, x, verify_tol=1e-3)  # an explicit, looser tolerance is honoured
    assert report.verify_max_abs_diff <= report.verify_tolerance


def test_a_float32_model_can_be_verified_in_float64():
    model = SmallCNN().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8)
    gs = group_parameters(model, x, CHANNELS)
    gs.zero_([0, 3, 9, 12])
    slim, report = prune(model, gs, x, verify_dtype=torch.float64)
    assert report.verify_dtype == "float64" and report.verify_rel_tol == 1e-10 and report.verify_rel_diff < 1e-13
    assert next(slim.parameters()).dtype == torch.float32  # only the comparison ran in float64
    assert verify(model, slim, x, dtype=torch.float64) < 1e-13
    assert 0 < verify(model, slim, x) < 1e-5  # float32 rounding
    _, report32 = prune(model, gs, x)
    assert report32.verify_dtype == "float32" and report32.verify_rel_tol == 1e-5


def _corrupt_group(monkeypatch, is_root, how):
    """Make torch-pruning's group for the root ``is_root(module)`` picks, asked at prune time (on the copy being
    slimmed), carry bad indices in its second entry."""
    import torch_pruning as tp
    original = tp.DependencyGraph.get_pruning_group

    def patched(self, module, fn, idxs):
        group = original(self, module, fn, idxs)
        if is_root(module) and len(idxs) < module.out_channels:  # at prune time (grouping asks for all)
            item = group[1]
            bad = how(list(item.idxs))
            group[1] = type(item)(item.dep, bad)
            group[1].root_idxs = list(item.root_idxs)[:len(bad)] + [item.root_idxs[0]] * (len(bad) - len(item.root_idxs))
        return group
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", patched)


@pytest.mark.parametrize("how, message", [
    (lambda idxs: idxs + idxs[:1], "duplicate indices"),
    (lambda idxs: idxs[:-1] + [10_000], "outside 0.."),
    (lambda idxs: idxs[:-1], "gets 2 indices for 3 channels"),
])
def test_indices_are_checked_before_removal_and_a_bad_group_is_kept(monkeypatch, how, message):
    model = SmallCNN().double().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gs = group_parameters(model, x, CHANNELS)
    gs.zero_([0, 3, 5, 9, 12])  # conv1: 3 channels, conv2: 2 channels
    _corrupt_group(monkeypatch, lambda m: getattr(m, "in_channels", None) == 3, how)  # conv1
    slim, report = prune(model, gs, x)
    assert slim.conv1.out_channels == 8 and slim.conv2.out_channels == 14
    reason = next(s["reason"] for s in report.skipped if s["module"] == "conv1")
    assert "index check" in reason and message in reason
    assert report.layers["conv1"]["after"] == 8 and report.layers["conv1"]["removed_groups"] == 0
    assert verify(model, slim, x) < 1e-12


def test_a_removal_that_fails_half_way_inside_torch_pruning_is_rolled_back(monkeypatch):
    """The group of conv1 is conv1 (pruned first), then bn1: make bn1's pruning fail once. conv1 must be put back
    as it was, the failure reported, and every other group still removed."""
    from torch_pruning.pruner import function

    model = SmallCNN().double().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gs = group_parameters(model, x, CHANNELS)
    gs.zero_([0, 3, 9, 12])
    original, calls = function.BatchnormPruner.prune_out_channels, []

    def flaky(self, layer, idxs):
        calls.append(layer)
        if len(calls) == 1:
            raise RuntimeError("simulated failure")
        return original(self, layer, idxs)
    monkeypatch.setattr(function.BatchnormPruner, "prune_out_channels", flaky)
    monkeypatch.setattr(function.BatchnormPruner, "prune_in_channels", flaky)
    slim, report = prune(model, gs, x)
    assert (slim.conv1.out_channels, slim.conv1.weight.shape[0], slim.bn1.num_features) == (8, 8, 8)
    assert slim.conv2.in_channels == 8 and slim.conv2.out_channels == 14 and slim.bn2.num_features == 14
    reason = next(s["reason"] for s in report.skipped if s["module"] == "conv1")
    assert reason == ("kept its 2 zero channel group(s) (layers restored): torch-pruning failed on removing the "
                      "channel group of layer 'conv1': RuntimeError: simulated failure")
    assert verify(model, slim, x) < 1e-12


def test_a_group_search_that_hangs_at_prune_time_keeps_that_layer(monkeypatch):
    import torch_pruning as tp
    model = SmallCNN().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gs = group_parameters(model, x, CHANNELS)
    gs.zero_([0, 9])
    original = tp.DependencyGraph.get_pruning_group

    def patched(self, module, fn, idxs):
        if module.out_channels == 16 and len(idxs) < 16:
            while True:
                pass
        return original(self, module, fn, idxs)
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", patched)
    slim, report = prune(model, gs, x, graph_timeout=0.5)
    assert slim.conv1.out_channels == 7 and slim.conv2.out_channels == 16
    assert "did not finish the channel group of layer 'conv2' within 0.5 s" in \
        next(s["reason"] for s in report.skipped if s["module"] == "conv2")
    assert verify(model, slim, x) < 1e-12


class Breaker(Sabotage):
    def prune(self, ctx, blocks, zero):
        layer = ctx.model.get_submodule(blocks[0].label)
        layer.weight = nn.Parameter(layer.weight[:, :-1].detach().clone())


def test_a_slim_model_that_no_longer_runs_gets_a_structkit_error_first(monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", kinds._KINDS.copy())
    kinds.register_kind("breaker")(Breaker)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    gs = group_parameters(model, x, {"kind": "breaker", "regularizer": "none", "select": "0"})
    with pytest.raises(RuntimeError, match="the pruned model fails to run on example_inputs") as err:
        prune(model, gs, x)
    assert isinstance(err.value.__cause__, RuntimeError)  # torch's own error, chained after structkit's
