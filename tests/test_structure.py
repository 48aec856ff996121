"""Rules -> groups: rule validation and errors, which entries each kind groups, GroupSet statistics and the
solver hand-off. (Pruning exactness lives in test_prune.py.)"""
import re
import time

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

import structkit
from structkit.structure import Block, StructureKind, StructureRule, group_parameters, kinds, list_kinds, parse_rules


# ---------------------------------------------------------------- shared helpers (also used by test_prune.py)
@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are small, and on a busy 2-core machine a thread pool that waits for
    a busy core slows float64 CPU kernels by 10-100x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm weights, biases and running statistics, so a wrong removal changes the output."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def zero_some_groups(gs, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Zero a random ``fraction`` of the groups of every block (at least one per block); return their ids."""
    chosen = []
    for block in gs.blocks:
        ids = gs.groups_of(block)
        k = max(1, round(fraction * len(ids)))
        chosen.append(ids[torch.randperm(len(ids), generator=gen)[:k]])
    chosen = torch.cat(chosen)
    gs.zero_(chosen)
    return chosen


class SmallCNN(nn.Module):
    def __init__(self, act: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.act = act or nn.ReLU()
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def small_vit() -> VisionTransformer:
    vit = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=24,
                            num_classes=3)
    nn.init.normal_(vit.heads.head.weight)  # torchvision zero-initialises the head
    return vit


X_CNN = torch.randn(2, 3, 8, 8)
CHANNELS = {"kind": "channels", "lam": 1e-3}


# ---------------------------------------------------------------- rules
def test_rules_accept_dicts_models_and_lists_and_fill_kind_defaults():
    rules = parse_rules([{"kind": "channels", "lam": 0.1}, StructureRule(kind="lowrank", lam=0.2, select="fc")])
    assert [(r.kind, r.regularizer, r.lam) for r in rules] == [("channels", "group_lasso", 0.1), ("lowrank", "nuclear", 0.2)]
    assert parse_rules({"kind": "heads", "regularizer": "none"})[0].lam == 0.0
    assert parse_rules({"kind": "channels", "lam": 1, "types": "Conv2d", "exclude": "fc"})[0].types == ["Conv2d"]


@pytest.mark.parametrize("rule, message", [
    ({"kind": "chanels", "lam": 1e-3}, "Did you mean 'channels'"),
    ({"kind": "channels", "regularizer": "group_laso", "lam": 1e-3}, "Did you mean 'group_lasso'"),
    ({"kind": "channels", "lam": -1.0}, "lam: Input should be greater than or equal to 0"),
    ({"kind": "channels"}, "lam is required"),
    ({"kind": "channels", "lam": 1e-3, "round_to": 8}, "round_to is an option of structkit.prune"),
    ({"kind": "channels", "regularizer": "nuclear", "lam": 1e-3}, "does not fit kind 'channels'"),
    ({"kind": "lowrank", "lam": 1e-3, "block": 4}, "block is only meaningful"),
    ({"kind": "channels", "lam": 1e-3, "block": 0}, "block: Input should be greater than or equal to 1"),
    ({"kind": "channels", "lam": 1e-3, "select": "re:(("}, "invalid regular expression"),
])
def test_invalid_rules_raise_value_errors_that_name_the_problem(rule, message):
    with pytest.raises(ValueError, match=message):
        parse_rules([rule])


@pytest.fixture
def no_torch_pruning(monkeypatch):
    """Errors must come before torch-pruning traces anything: make tracing itself fail loudly."""
    import torch_pruning as tp

    def boom(*args, **kwargs):
        raise AssertionError("torch-pruning was called before the error was detected")
    monkeypatch.setattr(tp.DependencyGraph, "build_dependency", boom)


@pytest.mark.parametrize("rule, message", [
    ({"kind": "channels", "select": "layer9.*", "lam": 1e-3}, "matches no module.*Close module names"),
    ({"kind": "channels", "types": ["Conv2D"], "lam": 1e-3}, "matches no module.*Conv2d"),
    ({"kind": "heads", "lam": 1e-3}, "kind 'heads' handles"),
    ({"kind": "channels", "select": "fc", "exclude": ["fc"], "lam": 1e-3}, "none of them"),
])
def test_rules_that_match_nothing_usable_are_errors(no_torch_pruning, rule, message):
    with pytest.raises(ValueError, match=message):
        group_parameters(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), [rule])


def test_rules_whose_every_match_is_left_out_are_an_error():
    with pytest.raises(ValueError, match="produced no group.*fc: its channels are outputs of the model"):
        group_parameters(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), {**CHANNELS, "select": "fc"})


def test_inputs_that_do_not_fit_the_model_are_a_value_error_naming_the_expected_shape(no_torch_pruning):
    with pytest.raises(ValueError, match=r"expects a tensor of shape \(N, 3, H, W\)"):
        group_parameters(torchvision.models.resnet18(), torch.randn(1, 1, 32, 32), CHANNELS)


def test_a_later_rule_overrides_an_earlier_one_for_the_modules_it_matches():
    gs = group_parameters(SmallCNN(), X_CNN, [CHANNELS, {"kind": "unstructured", "select": "conv2", "lam": 1e-4}])
    assert {b.label: b.kind for b in gs.blocks} == {"conv2": "unstructured", "conv1": "channels"}


def test_channels_coupled_with_an_excluded_layer_are_not_grouped():
    rule = {**CHANNELS, "exclude": ["layer1.0.conv2"]}
    gs = group_parameters(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), rule)
    labels = {b.label for b in gs.blocks}
    assert "conv1" not in labels and "layer1.0.conv1" in labels  # the stem's residual stream includes layer1.0.conv2
    assert any(m == "conv1" and "rule #0 excludes" in r for m, r in gs.skipped)


def test_grouping_leaves_a_training_model_and_its_batchnorm_statistics_untouched():
    model = SmallCNN().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    group_parameters(model, X_CNN, CHANNELS)
    assert model.training and model.bn1.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


# ---------------------------------------------------------------- what the groups hold
def test_a_channel_group_holds_the_filter_its_bias_and_batchnorm_weight_and_bias_but_no_consumer_slice():
    model = SmallCNN()
    gs = group_parameters(model, X_CNN, CHANNELS)
    block = next(b for b in gs.blocks if b.label == "conv1")
    assert dict(block.tensors) == {n: {"dim": 0, "offset": 0, "block": 1}
                                   for n in ("conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias")}
    gs.zero_(gs.groups_of("conv1")[[2, 5]])
    assert model.conv1.weight[[2, 5]].abs().sum() == 0 and model.bn1.bias[[2, 5]].abs().sum() == 0
    assert model.conv2.weight[:, [2, 5]].abs().sum() > 0 and model.conv1.weight[[0, 1, 3]].abs().min() > 0


def test_residual_producers_share_group_ids_and_the_final_classifier_is_never_grouped():
    gs = group_parameters(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32), CHANNELS)
    stem = next(b for b in gs.blocks if b.label == "conv1")
    names = dict(stem.tensors)
    assert names["layer1.0.conv2.weight"] == names["conv1.weight"] == names["layer1.1.bn2.bias"]
    assert "layer1.0.conv1.weight" not in names  # a consumer of the stream
    assert any(m == "fc" and "outputs of the model" in r for m, r in gs.skipped)


def test_transformer_widths_normalised_by_layernorm_are_reported_not_grouped():
    gs = group_parameters(small_vit(), torch.randn(1, 3, 16, 16), [CHANNELS, {"kind": "heads", "lam": 1e-3}])
    kinds_by_label = {b.label: b.kind for b in gs.blocks}
    assert kinds_by_label == {"encoder.layers.encoder_layer_0.self_attention": "heads",
                              "encoder.layers.encoder_layer_1.self_attention": "heads",
                              "encoder.layers.encoder_layer_0.mlp.0": "channels",
                              "encoder.layers.encoder_layer_1.mlp.0": "channels"}
    text = gs.describe()
    assert "encoder.layers.encoder_layer_0.mlp.3: its width is normalised by LayerNorm" in text
    assert "heads.head: its channels are outputs of the model" in text


def test_mha_head_groups_take_q_k_v_rows_and_output_columns_of_each_head():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(12, 3, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x, need_weights=False)[0]

    model = Attn()
    gs = group_parameters(model, torch.randn(2, 5, 12), {"kind": "heads", "lam": 1e-3})
    gs.zero_(gs.groups_of("mha")[[1]])
    w = model.mha.in_proj_weight
    rows = torch.tensor([p * 12 + r for p in range(3) for r in range(4, 8)])
    assert w[rows].abs().sum() == 0 and model.mha.in_proj_bias[rows].abs().sum() == 0
    assert model.mha.out_proj.weight[:, 4:8].abs().sum() == 0
    others = torch.ones(36, dtype=torch.bool)
    others[rows] = False
    assert w[others].abs().min() > 0 and model.mha.out_proj.weight[:, :4].abs().min() > 0


def test_an_activation_that_does_not_map_zero_to_zero_drops_the_group_with_the_reason():
    gs = group_parameters(SmallCNN(act=nn.Sigmoid()), X_CNN, CHANNELS)
    assert {b.label for b in gs.blocks} == {"conv2"}
    assert any(m == "conv1" and "conv2 still sees non-zero inputs" in r for m, r in gs.skipped)


def test_block_groups_hold_n_adjacent_channels():
    model = SmallCNN()
    gs = group_parameters(model, X_CNN, {**CHANNELS, "block": 4})
    assert [len(gs.groups_of(b)) for b in gs.blocks] == [2, 4]  # conv1: 8 channels, conv2: 16
    gs.zero_(gs.groups_of("conv2")[[1]])
    zero_rows = (model.conv2.weight.flatten(1).abs().sum(1) == 0).nonzero().flatten().tolist()
    assert zero_rows == [4, 5, 6, 7]


# ---------------------------------------------------------------- statistics
def tiny_mlp():
    """Hand-checkable: channels on 0 (4 groups of 3 + 1 entries), a rank-2 4x4 matrix in 2, L1 on 4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.rand(4, 3) + 0.5)
        model[0].bias.copy_(torch.rand(4) + 0.5)
        model[2].weight.copy_((torch.rand(4, 2) + 0.5) @ (torch.rand(2, 4) + 0.5))
        model[4].weight.copy_(torch.rand(2, 4) + 0.5)
        model[4].weight[0, 0] = model[4].weight[0, 3] = model[4].weight[1, 2] = 0.0
    rules = [{"kind": "channels", "select": "0", "lam": 0.1}, {"kind": "lowrank", "select": "2", "lam": 0.2},
             {"kind": "unstructured", "select": "4", "lam": 0.3}]
    return model, group_parameters(model, torch.randn(5, 3), rules)


def test_metrics_match_a_hand_computation():
    model, gs = tiny_mlp()
    gs.zero_(gs.groups_of("0")[[0, 2]])
    m = gs.metrics()
    assert m["num_groups"] == len(gs) == 4 + 1 + 8
    assert m["zero_groups"] == 2 + 0 + 3
    assert m["weighted_group_sparsity"] == pytest.approx(2 * 4 / (4 * 4))
    assert m["lowrank_level"] == pytest.approx(2 / 4)
    assert m["unstructured_sparsity"] == pytest.approx((2 * 4 + 3) / (16 + 16 + 8))
    assert m["layers"] == {"0": {"kept": 2, "total": 4, "unit": "channels"}}


def test_norms_are_per_group_euclidean_norms_over_the_regularized_entries():
    model, gs = tiny_mlp()
    norms = gs.norms()
    expected = torch.cat([model[0].weight, model[0].bias[:, None]], 1).double().norm(dim=1)
    torch.testing.assert_close(norms[gs.groups_of("0")], expected)
    torch.testing.assert_close(norms[gs.groups_of("2")], model[2].weight.double().norm().reshape(1))
    torch.testing.assert_close(norms[gs.groups_of("4")], model[4].weight.double().abs().flatten())


def test_zero_only_touches_the_chosen_groups():
    model = SmallCNN()
    gs = group_parameters(model, X_CNN, CHANNELS)
    before = gs.norms()
    chosen = torch.tensor([1, 9, 20])
    gs.zero_(chosen)
    after = gs.norms()
    assert after[chosen].abs().sum() == 0
    keep = torch.ones(len(gs), dtype=torch.bool)
    keep[chosen] = False
    torch.testing.assert_close(after[keep], before[keep])
    with pytest.raises(IndexError):
        gs.zero_([len(gs)])


# ---------------------------------------------------------------- hand-off to the solvers
def mixed_vit_groupset():
    model = small_vit()
    rules = [CHANNELS, {"kind": "heads", "lam": 1e-3}, {"kind": "unstructured", "select": "heads.head", "lam": 1e-4},
             {"kind": "lowrank", "select": "conv_proj", "lam": 1e-2}]
    return model, group_parameters(model, torch.randn(2, 3, 16, 16), rules)


def test_param_groups_cover_every_parameter_exactly_once_with_the_contract_keys():
    model, gs = mixed_vit_groupset()
    groups = gs.param_groups(lr=0.01)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    *regularized, rest = groups
    assert set(rest) == {"params"}
    by_reg = {g["regularizer"]: g for g in regularized}
    assert set(by_reg) == {"group_lasso", "l1", "nuclear"}
    for g in regularized:
        assert set(g) == {"params", "regularizer", "lam", "group_index", "lr"} and len(g["group_index"]) == len(g["params"])
    assert by_reg["l1"]["group_index"] == ["element"] and by_reg["nuclear"]["group_index"] == ["tensor"]
    assert by_reg["group_lasso"]["lam"] == 1e-3


def test_param_groups_drive_a_structkit_solver():
    solvers = pytest.importorskip("structkit.solvers")
    model, gs = mixed_vit_groupset()
    opt = solvers.RAMDA(gs.param_groups(), lr=1e-2)
    model(torch.randn(2, 3, 16, 16)).square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_describe_lists_each_block_and_its_regularizer():
    _, gs = mixed_vit_groupset()
    lines = gs.describe().splitlines()
    row = next(line for line in lines if line.startswith("encoder.layers.encoder_layer_0.mlp.0"))
    assert row.split() == ["encoder.layers.encoder_layer_0.mlp.0", "channels", "24", "17", "group_lasso", "0.001"]
    assert any(line.split()[:3] == ["conv_proj", "lowrank", "1"] for line in lines)


# ---------------------------------------------------------------- custom kinds
class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 10), nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class HiddenUnits(StructureKind):
    """A user kind: hidden unit i of a TwoLayer is row i of fc1 (with its bias); tanh(0) = 0 makes it removable."""
    handles = "TwoLayer modules"

    def accepts(self, module):
        return isinstance(module, TwoLayer)

    def build(self, ctx, targets):
        rows = {"dim": 0, "offset": 0}
        return [Block(kind=self.name, label=t.name, num_groups=t.module.fc1.out_features,
                      tensors=[(ctx.param(t.module.fc1, "weight"), rows), (ctx.param(t.module.fc1, "bias"), rows)],
                      regularizer=t.rule.regularizer, lam=t.rule.lam, rule=t.rule_index) for t in targets]

    def prune(self, ctx, blocks, zero):
        import torch_pruning as tp
        for block, z in zip(blocks, zero):
            layer = ctx.model.get_submodule(block.label)
            gone = z.nonzero().flatten().tolist()
            tp.prune_linear_out_channels(layer.fc1, gone)
            tp.prune_linear_in_channels(layer.fc2, gone)
            ctx.record(block.label, self.name, "units", len(z), len(z) - len(gone), len(gone), len(z))


@pytest.fixture
def hidden_units_kind(monkeypatch):
    monkeypatch.setattr(kinds, "_KINDS", kinds._KINDS.copy())
    kinds.register_kind("hidden_units")(HiddenUnits)
    return "hidden_units"


def test_a_custom_kind_groups_and_prunes_exactly(hidden_units_kind):
    assert hidden_units_kind in list_kinds()
    model = nn.Sequential(TwoLayer(), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(4, 6)
    gs = group_parameters(model, x, {"kind": "hidden_units", "lam": 1e-3})
    assert len(gs) == 10 and gs.blocks[0].label == "0"
    gs.zero_([1, 4, 7])
    slim, report = structkit.prune(model, gs, x)
    assert slim[0].fc1.out_features == 7 and slim[0].fc2.in_features == 7
    assert report.layers["0"]["after"] == 7
    assert structkit.verify(model, slim, x) < 1e-6


def test_registering_a_taken_kind_name_needs_replace(hidden_units_kind):
    with pytest.raises(ValueError, match="already registered"):
        kinds.register_kind("channels")(HiddenUnits)
    assert type(kinds.get_kind("channels")).__name__ == "ChannelsKind"


# ---------------------------------------------------------------- issue 15: norms by type, refusals, guards
class BNAct(nn.BatchNorm2d):
    """A fused batch norm + activation (like timm's BatchNormAct2d): a BatchNorm2d subclass whose forward also
    applies the activation, so torch-pruning sees the batch-norm op *inside* the module as an extra node."""

    def forward(self, x):
        return torch.relu(super().forward(x))


class NormNamedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.normact1 = nn.Conv2d(3, 8, 3, padding=1), BNAct(8)
        self.conv2, self.normact2 = nn.Conv2d(8, 16, 3, padding=1), BNAct(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.normact2(self.conv2(self.normact1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_fused_norm_activation_modules_are_norms_by_type_and_their_channels_are_grouped():
    model = NormNamedCNN().double().eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    gs = group_parameters(model, x, CHANNELS)
    assert [b.label for b in gs.blocks] == ["conv1", "conv2"]
    tensors = {name for b in gs.blocks for name, _ in b.tensors}
    assert {"normact1.weight", "normact1.bias", "normact2.weight", "normact2.bias"} <= tensors
    gs.zero_(torch.tensor([1, 5, 8, 12]))
    slim, _ = structkit.prune(model, gs, x)
    assert slim.conv1.out_channels == 6 and slim.normact1.num_features == 6 and slim.conv2.out_channels == 14
    assert structkit.verify(model, slim, x, dtype=torch.float64) < 1e-12


def test_timm_batchnormact2d_is_a_norm():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), timm_layers.BatchNormAct2d(8, act_layer=nn.SiLU), nn.Conv2d(8, 4, 3))
    gs = group_parameters(model, torch.randn(1, 3, 8, 8), {**CHANNELS, "select": "0"})
    assert len(gs) == 8 and {"1.weight", "1.bias"} <= {n for n, _ in gs.blocks[0].tensors}


class Mixer(nn.Module):
    """conv -> (functional layer norm | group norm | channel split | channel mean) -> conv"""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
        self.gn = nn.GroupNorm(2, 8)
        self.sizes = [3, 5]

    def forward(self, x):
        y = self.a(x)
        if self.op == "layer_norm":
            y = nn.functional.layer_norm(y.permute(0, 2, 3, 1), (8,)).permute(0, 3, 1, 2)
        elif self.op == "group_norm":
            y = self.gn(y)
        elif self.op == "split":
            p, q = torch.split(y, self.sizes, dim=1)
            y = torch.cat([p, torch.relu(q)], dim=1)
        elif self.op == "chunk":
            p, q = y.chunk(2, dim=1)
            y = torch.cat([p * q, q], dim=1)
        elif self.op == "channel_mean":
            y = y - y.mean(1, keepdim=True)
        elif self.op == "shuffle":
            y = y.view(y.shape[0], 2, 4, *y.shape[2:]).transpose(1, 2).reshape(y.shape)
        return self.b(y)


@pytest.mark.parametrize("op, reason", [
    ("layer_norm", "normalised together"),
    ("group_norm", "normalised by GroupNorm"),
    ("split", "split"),
    ("chunk", "split|could not map channel indices"),
    ("channel_mean", "reduces over a dimension"),
    ("shuffle", ""),
])
def test_ops_that_mix_or_split_channels_are_refused_with_the_reason(op, reason):
    model = Mixer(op)
    with pytest.raises(ValueError, match="the rules produced no group") as err:
        group_parameters(model, torch.randn(1, 3, 4, 4), {**CHANNELS, "select": "a"})
    assert "(a: " in str(err.value) and re.search(reason, str(err.value))


class GainConv(nn.Conv2d):
    """A conv with a per-filter gain and weight standardization (like timm's ScaledStdConv2d)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1))

    def forward(self, x):
        w = nn.functional.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True)
        return nn.functional.conv2d(x, w.reshape_as(self.weight) * self.gain, self.bias, self.stride, self.padding)


class StdConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class BlurPool(nn.Module):
    """A depthwise blur as a functional conv with a stored filter (like timm's anti-aliasing downsample)."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.register_buffer("filt", torch.ones(channels, 1, 2, 2) / 4)

    def forward(self, x):
        return nn.functional.conv2d(x, self.filt, stride=2, groups=self.channels)


@pytest.mark.parametrize("middle, reason", [
    (lambda: GainConv(8, 8, 1), "parameter(s) gain"),
    (lambda: StdConv(8, 8, 1), "transforms a layer's weights"),
    (lambda: BlurPool(8), "functional convolution"),
])
def test_layers_whose_state_torch_pruning_cannot_resize_are_refused(middle, reason):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), middle(), nn.ReLU(), nn.Conv2d(8, 2, 1))
    with pytest.raises(ValueError, match="the rules produced no group") as err:
        group_parameters(model, torch.randn(1, 3, 4, 4), {**CHANNELS, "select": "0"})
    assert reason in str(err.value)


def test_a_layer_left_out_because_its_coupled_root_was_dropped_is_listed_too():
    """conv_a and conv_b are summed (one group rooted at conv_a); a sigmoid after the sum makes the zero check
    drop it: both producers are listed with a reason."""

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_a, self.conv_b, self.out = nn.Conv2d(3, 6, 1), nn.Conv2d(3, 6, 1), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.out(torch.sigmoid(self.conv_a(x) + self.conv_b(x)))

    with pytest.raises(ValueError) as err:
        group_parameters(Sum(), torch.randn(1, 3, 4, 4), {**CHANNELS, "types": ["Conv2d"], "exclude": ["out"]})
    assert "conv_a: " in str(err.value) and "conv_b: " in str(err.value)


# ---------------------------------------------------------------- guards around torch-pruning
def _hang_on(module_name, model, exc=None):
    """A get_pruning_group that loops forever (or raises ``exc``) for one root module."""
    import torch_pruning as tp
    original = tp.DependencyGraph.get_pruning_group
    target = model.get_submodule(module_name)

    def patched(self, module, fn, idxs):
        if module is target:
            if exc is not None:
                raise exc
            while True:  # a pure-Python loop, like torch-pruning's on some attention models
                pass
        return original(self, module, fn, idxs)
    return patched


def test_a_group_search_that_never_ends_is_stopped_and_that_layer_refused(monkeypatch):
    import torch_pruning as tp
    model = SmallCNN()
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", _hang_on("conv1", model))
    gs = group_parameters(model, X_CNN, CHANNELS, graph_timeout=0.5)
    assert [b.label for b in gs.blocks] == ["conv2"]
    reason = dict(gs.skipped)["conv1"]
    assert "did not finish the channel group of layer 'conv1' within 0.5 s" in reason
    assert "conv1: torch-pruning did not finish" in gs.describe()


def test_the_time_limit_also_works_outside_the_main_thread(monkeypatch):
    import threading

    import torch_pruning as tp
    model = SmallCNN()
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", _hang_on("conv2", model))
    result = {}
    worker = threading.Thread(target=lambda: result.update(gs=group_parameters(model, X_CNN, CHANNELS,
                                                                               graph_timeout=0.5)), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive()
    assert [b.label for b in result["gs"].blocks] == ["conv1"]
    assert "within 0.5 s" in dict(result["gs"].skipped)["conv2"]


def test_an_error_inside_torch_pruning_refuses_that_layer_with_a_one_line_message(monkeypatch):
    import torch_pruning as tp
    model = SmallCNN()
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", _hang_on("conv2", model, IndexError("boom")))
    gs = group_parameters(model, X_CNN, CHANNELS)
    assert [b.label for b in gs.blocks] == ["conv1"]
    reason = dict(gs.skipped)["conv2"]
    assert reason == "torch-pruning failed on the channel group of layer 'conv2': IndexError: boom"


def test_a_model_torch_pruning_cannot_trace_is_refused_with_structkit_message_first(monkeypatch):
    import torch_pruning as tp

    def broken(self, graph, *args, **kwargs):
        raise ZeroDivisionError("integer division or modulo by zero")
    monkeypatch.setattr(tp.DependencyGraph, "_build_dependency", broken)
    model = SmallCNN()
    with pytest.raises(ValueError, match="the model could not be traced: torch-pruning failed on tracing the model") \
            as err:
        group_parameters(model, X_CNN, CHANNELS)
    assert "ZeroDivisionError" in str(err.value)
    assert all(not m._forward_hooks for m in model.modules())  # torch-pruning's tracing hooks are gone


def test_a_trace_that_runs_past_the_limit_leaves_no_hooks_behind():
    class Slow(SmallCNN):
        def forward(self, x):
            if torch.is_grad_enabled():  # only while torch-pruning traces
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    pass
            return super().forward(x)

    model = Slow()
    with pytest.raises(ValueError, match="did not finish tracing the model"):
        group_parameters(model, X_CNN, CHANNELS, graph_timeout=0.3)
    assert all(not m._forward_hooks for m in model.modules())


def test_the_cycle_guard_stops_a_group_search_that_keeps_adding_entries():
    from torch_pruning.dependency import graph as tp_graph

    from structkit.structure._guard import GraphCycle, graph_call

    class Empty:
        module2node = {}

    def endless():
        group = tp_graph.Group()
        while True:
            group.add_dep(None, [0])

    with pytest.raises(GraphCycle, match="looped on a test search: the group search added more than 1000"):
        graph_call(endless, "a test search", timeout=None, graph=Empty())
    assert tp_graph.Group.add_dep is not None and tp_graph.Group.__name__ == "Group"  # restored


@pytest.mark.parametrize("timeout", [-1, "60", float("nan")])
def test_graph_timeout_must_be_a_nonnegative_number(timeout):
    with pytest.raises(ValueError, match="graph_timeout must be a number of seconds"):
        group_parameters(SmallCNN(), X_CNN, CHANNELS, graph_timeout=timeout)
