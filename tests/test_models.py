"""Model registry and built-in models: shapes, architecture promises, name resolution, the LM's attention."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from structkit.models import BasicBlock, get_model, list_models, register_model

VISION_MODELS = ["cnn", "mlp", "mlp7", "resnet_small", "vgg_small"]
CNNS = ["cnn", "resnet_small", "vgg_small"]


def build_tiny(input_shape, num_classes, hidden=5):
    """A user builder for the ``module:callable`` tests; names both get_model keywords."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def not_a_model(**_):
    return "oops"


def test_builtin_models_are_registered():
    assert set(list_models()) == set(VISION_MODELS) | {"tiny_transformer_lm"}


@pytest.mark.parametrize("input_shape", [(1, 8, 8), (1, 28, 28)])
@pytest.mark.parametrize("name", VISION_MODELS)
def test_vision_model_forward_gives_one_logit_per_class(name, input_shape):
    model = get_model(name, input_shape=input_shape, num_classes=7)
    assert model(torch.randn(3, *input_shape)).shape == (3, 7)
    assert model.eval()(torch.randn(1, *input_shape)).shape == (1, 7)


@pytest.mark.parametrize("name", CNNS)
def test_cnns_are_batchnorm_correct_and_exact_pruning_friendly(name):
    model = get_model(name, input_shape=(1, 28, 28), num_classes=10)
    modules = list(model.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    assert convs and all(c.bias is None for c in convs)
    for i, m in enumerate(modules):  # every conv is directly followed by a BatchNorm of its width
        if isinstance(m, nn.Conv2d):
            assert isinstance(modules[i + 1], nn.BatchNorm2d) and modules[i + 1].num_features == m.out_channels
    assert not any(isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.GELU, nn.SiLU)) for m in modules)


def test_cnn_matches_the_training_notes_architecture():
    model = get_model("cnn", input_shape=(1, 28, 28), num_classes=10)
    convs = [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(1, 32), (32, 32), (32, 64), (64, 64), (64, 128)]
    assert sum(p.numel() for p in model.parameters()) == 9 * (32 + 32 * 32 + 32 * 64 + 64 * 64 + 64 * 128) \
        + 2 * (32 + 32 + 64 + 64 + 128) + 128 * 10 + 10
    names = dict(model.named_modules())
    assert isinstance(names["features.conv5"], nn.Conv2d) and isinstance(names["features.bn1"], nn.BatchNorm2d)
    assert isinstance(names["features.pool2"], nn.MaxPool2d) and isinstance(names["classifier"], nn.Linear)


@pytest.mark.parametrize("name, input_shape, pools", [
    ("cnn", (1, 28, 28), 2), ("cnn", (1, 8, 8), 2), ("cnn", (1, 4, 4), 1), ("cnn", (1, 3, 3), 0),
    ("vgg_small", (1, 28, 28), 3), ("vgg_small", (1, 8, 8), 2)])
def test_max_pools_are_skipped_below_two_by_two(name, input_shape, pools):
    model = get_model(name, input_shape=input_shape, num_classes=10)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert model(torch.randn(2, *input_shape)).shape == (2, 10)


def test_mlp7_has_seven_linear_layers_of_width_512():
    model = get_model("mlp7", input_shape=(1, 28, 28), num_classes=10)
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(512, 784)] + [(512, 512)] * 5 + [(10, 512)]


def test_mlp_widths_option():
    model = get_model("mlp", input_shape=(1, 8, 8), num_classes=3, widths=(20, 10))
    shapes = [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]
    assert shapes == [(20, 64), (10, 20), (3, 10)]


def test_resnet_small_blocks_and_widths_options():
    model = get_model("resnet_small", input_shape=(1, 8, 8), num_classes=10, blocks=(2, 2, 2), widths=(8, 16, 32))
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 6
    assert model.classifier.in_features == 32
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="one block count"):
        get_model("resnet_small", input_shape=(1, 8, 8), num_classes=10, blocks=(1, 1))


def test_image_models_reject_flat_input_shapes():
    with pytest.raises(ValueError, match=r"cnn needs input_shape \(channels, height, width\).*'mlp'"):
        get_model("cnn", input_shape=(784,), num_classes=10)


# --------------------------------------------------------------------------------------------------- name resolution

def test_torchvision_models_are_built_by_name_without_weights():
    model = get_model("resnet18", input_shape=(3, 32, 32), num_classes=10)
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="never loads pretrained weights"):
        get_model("resnet18", input_shape=(3, 32, 32), num_classes=10, weights="DEFAULT")
    with pytest.raises(ValueError, match="expects 3-channel images"):
        get_model("resnet18", input_shape=(1, 28, 28), num_classes=10)


def test_module_callable_gets_the_options_and_the_keywords_it_names():
    model = get_model("tests.test_models:build_tiny", input_shape=(1, 6), num_classes=4, hidden=3)
    assert model[1].weight.shape == (3, 6) and model(torch.randn(2, 1, 6)).shape == (2, 4)
    # torchvision's builders take num_classes through **kwargs; input_shape is not passed to them
    assert get_model("torchvision.models:resnet18", input_shape=(3, 32, 32), num_classes=5).fc.out_features == 5
    # a callable that names neither keyword gets only the options
    linear = get_model("torch.nn:Linear", input_shape=(8,), num_classes=2, in_features=8, out_features=3)
    assert linear.out_features == 3


@pytest.mark.parametrize("name, error, message", [
    ("no_such_package_xyz:build", ValueError, "cannot import module 'no_such_package_xyz'"),
    ("tests.test_models:missing", ValueError, "has no attribute 'missing'"),
    ("tests.test_models:VISION_MODELS", TypeError, "not a callable"),
    ("tests.test_models:not_a_model", TypeError, "must return an nn.Module")])
def test_module_callable_errors_say_what_is_wrong(name, error, message):
    with pytest.raises(error, match=message):
        get_model(name, input_shape=(1, 8, 8), num_classes=10)


@pytest.mark.parametrize("name, suggestion", [("resnet_smal", "resnet_small"), ("resnet-18", "resnet18")])
def test_unknown_model_error_suggests_the_closest_name_and_the_fix(name, suggestion):
    with pytest.raises(ValueError, match=rf"unknown model '{name}'\. Did you mean '{suggestion}'\?.*"
                                         r"'package\.module:callable'"):
        get_model(name, input_shape=(1, 28, 28), num_classes=10)


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("cnn")(build_tiny)


# --------------------------------------------------------------------------------------------------- language model

@pytest.fixture
def lm():
    torch.manual_seed(0)
    return get_model("tiny_transformer_lm", input_shape=(32,), num_classes=11, d_model=32, n_heads=4,
                     d_ff=64, max_len=32).eval()


def test_lm_maps_tokens_to_logits_over_the_vocabulary(lm):
    assert lm(torch.randint(0, 11, (3, 17))).shape == (3, 17, 11)
    default = get_model("tiny_transformer_lm", input_shape=(128,), num_classes=10, vocab_size=50)
    assert default(torch.randint(0, 50, (2, 128))).shape == (2, 128, 50)
    with pytest.raises(ValueError, match="exceeds max_len=128"):
        default(torch.zeros(1, 129, dtype=torch.long))


def test_lm_is_causal(lm):
    tokens = torch.randint(0, 11, (2, 12))
    changed = tokens.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 11
    a, b = lm(tokens), lm(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_lm_attention_equals_nn_multihead_attention(lm):
    block = lm.blocks[0]
    x, mask = torch.randn(2, 9, 32), lm.causal_mask[:9, :9]
    expected, _ = block.attn(x, x, x, attn_mask=mask, need_weights=False)
    torch.testing.assert_close(block._attention(x, mask), expected)


def remove_head(attn: nn.MultiheadAttention, head: int) -> None:
    """Slice one head out of the fused q/k/v rows and the output-projection columns."""
    heads, d = attn.num_heads, attn.head_dim
    keep = torch.cat([torch.arange(h * d, (h + 1) * d) for h in range(heads) if h != head])
    rows = torch.cat([keep + part * heads * d for part in range(3)])
    attn.in_proj_weight = nn.Parameter(attn.in_proj_weight.detach()[rows])
    attn.in_proj_bias = nn.Parameter(attn.in_proj_bias.detach()[rows])
    attn.out_proj.weight = nn.Parameter(attn.out_proj.weight.detach()[:, keep])
    attn.num_heads = heads - 1


def test_lm_heads_can_be_removed_exactly(lm):
    lm = lm.double()
    attn, head, d = lm.blocks[1].attn, 2, lm.blocks[1].attn.head_dim
    with torch.no_grad():  # zero head 2 everywhere it has weights: q, k, v rows and out_proj columns
        for part in range(3):
            attn.in_proj_weight[part * 32 + head * d: part * 32 + (head + 1) * d] = 0
            attn.in_proj_bias[part * 32 + head * d: part * 32 + (head + 1) * d] = 0
        attn.out_proj.weight[:, head * d:(head + 1) * d] = 0
    slim = copy.deepcopy(lm)
    remove_head(slim.blocks[1].attn, head)
    assert slim.blocks[1].attn.in_proj_weight.shape == (72, 32)
    tokens = torch.randint(0, 11, (2, 10))
    torch.testing.assert_close(slim(tokens), lm(tokens), rtol=1e-12, atol=1e-12)


def test_lm_exports_to_onnx_with_dynamic_batch_and_length(lm, tmp_path):
    pytest.importorskip("onnxscript", reason="the torch.export-based ONNX exporter needs onnxscript")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime checks the exported graph")
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length", max=32)
    path = tmp_path / "lm.onnx"
    torch.onnx.export(lm, (torch.randint(0, 11, (2, 8)),), str(path), input_names=["tokens"],
                      output_names=["logits"], dynamic_shapes={"tokens": {0: batch, 1: length}}, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens = torch.randint(0, 11, (3, 21))
    (logits,) = session.run(None, {"tokens": tokens.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), lm(tokens).detach(), rtol=1e-4, atol=1e-5)
