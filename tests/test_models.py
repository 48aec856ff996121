"""Model registry and built-in models: shapes, architecture promises, name resolution, the LM's attention."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

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
    """The package's own models, plus (only once a config named the sentence_distillation task, which imports its
    module: test order decides) that task's sentence_encoder."""
    builtin = set(VISION_MODELS) | {"tiny_transformer_lm"}
    assert builtin <= set(list_models())
    assert set(list_models()) - builtin <= {"sentence_encoder"}


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
    with pytest.raises(ValueError, match="takes no weights= option.*init='pretrained'"):
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


# --------------------------------------------------------------------------------------------------- timm by name

def test_timm_models_are_built_by_name_for_the_data_sets_channels_and_classes():
    pytest.importorskip("timm")
    model = get_model("timm:resnet18", input_shape=(1, 16, 16), num_classes=3, drop_rate=0.1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3 and model.drop_rate == 0.1
    assert model.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("name, options, message", [
    ("timm:resnt18", {}, r"unknown timm model 'resnt18' \(did you mean 'timm:resnet18'\?\)"),
    ("timm:resnet18", {"pretrained": True}, "option 'pretrained' is set by model.init"),
    ("timm:resnet18", {"in_chans": 1}, "option 'in_chans' is set by the data set"),
])
def test_timm_name_and_option_errors(name, options, message):
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=message):
        get_model(name, input_shape=(3, 16, 16), num_classes=3, **options)


def test_a_missing_timm_names_the_extra_that_installs_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(ImportError, match=r"need timm, which is not installed: pip install 'structkit\[zoo\]'"):
        get_model("timm:resnet18", input_shape=(3, 16, 16), num_classes=3)
    from structkit.config import ConfigError, validate
    with pytest.raises(ConfigError, match=r"model\.name: .*structkit\[zoo\]"):
        validate({"model": {"name": "timm:resnet18"}, "data": {"name": "digits"},
                  "structure": [{"kind": "channels", "lam": 0.0}]})


# --------------------------------------------------------------------------------------------------- init: pretrained

def test_torchvision_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import torchvision
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    file = tmp_path / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    with pytest.raises(FileNotFoundError, match=rf"not in the local cache \(looked for {file}\) and structkit never "
                                                r"downloads: download https://download\.pytorch\.org/.*put it at"):
        get_model("squeezenet1_1", input_shape=(3, 32, 32), num_classes=10, init="pretrained")
    file.parent.mkdir(parents=True)
    trained = torchvision.models.squeezenet1_1(weights=None)  # stands in for the ImageNet weights
    torch.save(trained.state_dict(), file)
    same = get_model("squeezenet1_1", input_shape=(3, 32, 32), num_classes=1000, init="pretrained")
    assert all(torch.equal(a, b) for a, b in zip(same.state_dict().values(), trained.state_dict().values()))
    with pytest.warns(UserWarning, match=r"classifier \(classifier\.1\.weight, classifier\.1\.bias\) is for 1000 "
                                         r"classes; it keeps its random initialisation for the data set's 10"):
        ten = get_model("squeezenet1_1", input_shape=(3, 32, 32), num_classes=10, init="pretrained")
    assert torch.equal(ten.features[0].weight, trained.features[0].weight)
    assert ten.classifier[1].weight.shape[0] == 10


def test_timm_pretrained_weights_come_from_the_hugging_face_cache(tmp_path, monkeypatch):
    pytest.importorskip("timm")
    import huggingface_hub.constants
    import timm
    from safetensors.torch import save_file
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=rf"timm/test_resnet\.r160_in1k in the Hugging Face cache \(\$HF_HUB_CACHE = {tmp_path}\).*"
                                                r"huggingface-cli download timm/test_resnet\.r160_in1k"):
        get_model("timm:test_resnet", input_shape=(3, 32, 32), num_classes=4, init="pretrained")
    repo = tmp_path / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    trained = timm.create_model("test_resnet", pretrained=False)
    save_file(trained.state_dict(), repo / "snapshots" / "0123abcd" / "model.safetensors")
    model = get_model("timm:test_resnet", input_shape=(3, 32, 32), num_classes=4, init="pretrained")
    body = {k: v for k, v in trained.state_dict().items() if not k.startswith(trained.default_cfg["classifier"])}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    assert model.get_classifier().out_features == 4  # timm re-initialises the head for the data set's classes


def test_models_without_pretrained_weights_refuse_init_pretrained():
    with pytest.raises(ValueError, match="'cnn' has no pretrained weights .* path of a state dict"):
        get_model("cnn", input_shape=(1, 8, 8), num_classes=10, init="pretrained")


# --------------------------------------------------------------------------------------------------- init: a path

def small_cnn(init="random"):
    return get_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(4, 8), pool_after=(1,), init=init)


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp"])
def test_init_from_a_state_dict_file_or_a_checkpoint_dict(tmp_path, wrap):
    trained = small_cnn()
    for p in trained.parameters():
        p.data.normal_()
    state = trained.state_dict()
    data = {"plain": state, "model": {"format": "x", "epoch": 3, "model": state},
            "state_dict": {"state_dict": state, "optimizer": {}},
            "ddp": {f"module.{k}": v for k, v in state.items()}}[wrap]
    torch.save(data, tmp_path / "weights.pt")
    model = small_cnn(init=tmp_path / "weights.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), state.values()))


def test_init_from_a_structkit_run_folder_takes_its_last_checkpoint(tmp_path):
    first, last = small_cnn(), small_cnn()
    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": "structkit.checkpoint", "model": first.state_dict()}, tmp_path / "checkpoints/epoch_0002.pt")
    torch.save({"format": "structkit.checkpoint", "model": last.state_dict()}, tmp_path / "checkpoints/epoch_0010.pt")
    model = small_cnn(init=str(tmp_path))
    assert torch.equal(model.features.conv1.weight, last.features.conv1.weight)
    with pytest.raises(FileNotFoundError, match="not a structkit run folder"):
        small_cnn(init=tmp_path / "checkpoints")


def test_init_mismatches_list_the_first_few_keys_and_shapes(tmp_path):
    other = get_model("cnn", input_shape=(1, 8, 8), num_classes=10, widths=(4, 16, 8), pool_after=(1,))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"do not fit the model: .* not in the model: features\.conv3\.weight, "
                                         r"features\.bn3\.weight.* and \d+ more; 5 tensor\(s\) of another shape: "
                                         r"features\.conv2\.weight \(file \(16, 4, 3, 3\), model \(8, 4, 3, 3\)\)"):
        small_cnn(init=tmp_path / "other.pt")
    torch.save({"epoch": 3, "notes": "x"}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match=r"holds a dict with keys 'epoch', 'notes'; expected a state dict"):
        small_cnn(init=tmp_path / "odd.pt")
    with pytest.raises(FileNotFoundError, match=r"model\.init: .*missing\.pt does not exist \(a relative path"):
        small_cnn(init=tmp_path / "missing.pt")


def test_init_never_unpickles_code(tmp_path):
    torch.save(small_cnn(), tmp_path / "whole_module.pt")  # a pickled nn.Module, not a state dict
    with pytest.raises(ValueError, match="holds pickled Python objects .* Nothing in the file was run"):
        small_cnn(init=tmp_path / "whole_module.pt")


def test_a_trained_model_as_init_reproduces_its_outputs_before_training(tmp_path):
    """model.init: <state dict of a trained digits model> -> the pipeline's model gives the same outputs."""
    from structkit import pipeline
    from structkit.config import load_config
    from structkit.data import make_loaders
    from structkit.training import train_epoch

    digits = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    config = load_config(digits)
    setup = pipeline.build(config)
    solver, _ = pipeline.make_solver(config, setup.groupset)
    train_epoch(setup.model, make_loaders(setup.splits, 32)[0], solver, epoch=1)
    torch.save(setup.model.state_dict(), tmp_path / "trained.pt")
    fresh = pipeline.build(config)
    started = pipeline.build(load_config(digits, [f"model.init={tmp_path / 'trained.pt'}"]))
    x = setup.verify_inputs
    with torch.no_grad():
        expected = setup.model.eval()(x)
        assert torch.equal(started.model.eval()(x), expected)
        assert not torch.allclose(fresh.model.eval()(x), expected)


def test_init_from_a_real_run_folder(tmp_path):
    """A run folder written by `structkit train` is a valid init (its checkpoints load with weights_only=True)."""
    from structkit import pipeline
    from structkit.config import load_config

    digits = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
    short = ["schedule.epochs=2", "optimizer.milestones=[1]"]
    pipeline.train(load_config(digits, short), tmp_path / "base", log=pipeline.Log(quiet=True))
    expected = pipeline.RunFolder(tmp_path / "base").last_checkpoint()["model"]
    setup = pipeline.build(load_config(digits, [*short, f"model.init={tmp_path / 'base'}"]))
    assert all(torch.equal(setup.model.state_dict()[k], v) for k, v in expected.items())
