"""The run configuration: every shipped config validates; bad values give one clear message per problem."""
from pathlib import Path

import pytest

from structkit.config import Config, ConfigError, apply_overrides, load_config, parse_yaml, training_hash

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def test_configs_folder_is_not_empty():
    names = {p.name for p in CONFIGS}
    assert {"digits.yaml", "quickstart.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)  # every task's config (minilm.yaml: sentence_distillation) is a `structkit run` config
    assert config.structure, "a config without structure rules trains nothing to prune"
    assert all(m < config.schedule.epochs for m in config.optimizer.milestones)


def test_python_and_yaml_front_doors_give_the_same_config():
    from_yaml = load_config(DIGITS)
    from_python = Config(**parse_yaml(DIGITS.read_text()))
    assert from_python == from_yaml
    assert Config(**from_yaml.to_dict()) == from_yaml


def test_overrides_are_parsed_as_yaml_values():
    config = load_config(DIGITS, ["optimizer.lr=2e-2", "structure.0.lam=1e-3", "prune.round_to=8",
                                  "deploy.batch_sizes=[1, 256]", "schedule.precision=bf16"])
    assert config.optimizer.lr == 0.02
    assert config.structure[0].lam == 1e-3
    assert config.prune.round_to == 8
    assert config.deploy.batch_sizes == [1, 256]
    assert config.schedule.precision == "bf16"
    assert load_config(DIGITS, ["prune.round_to=null"]).prune.round_to is None


def test_overrides_do_not_touch_the_input():
    data = {"a": {"b": 1}, "rules": [{"lam": 1}]}
    out = apply_overrides(data, ["a.b=2", "rules.0.lam=3", "a.c.d=4"])
    assert out == {"a": {"b": 2, "c": {"d": 4}}, "rules": [{"lam": 3}]}
    assert data == {"a": {"b": 1}, "rules": [{"lam": 1}]}


@pytest.mark.parametrize("override, expected", [
    ("optimizer", "expected key.path=value"),
    ("structure.5.lam=1", "not an index"),
    ("optimizer.lr.x=1", "not a section"),
])
def test_malformed_overrides_are_explained(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(DIGITS, [override])


def test_optimizer_lam_is_the_default_of_rules_without_one():
    data = parse_yaml(DIGITS.read_text())
    del data["structure"][0]["lam"]
    data["optimizer"]["lam"] = 7e-4
    assert Config(**data).structure[0].lam == 7e-4
    data["structure"][0]["lam"] = 1e-3  # a rule's own lam wins
    assert Config(**data).structure[0].lam == 1e-3


def _error(overrides, path=DIGITS) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


@pytest.mark.parametrize("override, expected", [
    # unknown keys: the closest valid key is suggested
    ("schedule.epoch=3", ["schedule.epoch", "unknown key", "did you mean 'epochs'"]),
    ("optimiser.lr=0.1", ["optimiser", "did you mean 'optimizer'"]),
    ("structure.0.lamb=1e-3", ["structure.0.lamb", "did you mean 'lam'"]),
    ("optimizer.options.momentun=0.1", ["momentun", "did you mean 'momentum'"]),
    # bad values: the field, the value and what is accepted
    ("structure.0.lam=-1e-3", ["structure.0.lam", "-0.001", "greater than or equal to 0"]),
    ("structure.0.lam=abc", ["structure.0.lam", "'abc'", "valid number"]),
    ("schedule.batch_size=0", ["schedule.batch_size", "got 0", "greater than or equal to 1"]),
    ("optimizer.milestones=[4, 2]", ["optimizer.milestones", "[4, 2]", "strictly increasing"]),
    ("optimizer.milestones=[9]", ["milestones", "< schedule.epochs"]),
    ("optimizer.name=ramdaa", ["optimizer.name", "'ramdaa'", "did you mean 'ramda'", "proxsgd"]),
    ("optimizer.lr=-1", ["optimizer.lr", "greater than 0", "got -1"]),
    ("optimizer.momentum=2", ["optimizer.momentum", "less than or equal to 1", "got 2"]),
    ("schedule.precision=fp16", ["schedule.precision", "'fp32' or 'bf16'", "'fp16'"]),
    ("structure.0.kind=channel", ["structure.0.kind", "did you mean 'channels'"]),
    ("structure.0.regularizer=group_laso", ["did you mean 'group_lasso'"]),
    ("model.name=cnnn", ["model.name", "did you mean 'cnn'"]),
    ("data.name=digit", ["data.name", "did you mean 'digits'"]),
    ("deploy.exporter=tracing", ["deploy.exporter", "'torchscript' or 'dynamo'"]),
    ("structure=[]", ["structure", "at least one rule"]),
])
def test_bad_values_name_field_value_and_accepted(override, expected):
    message = _error([override])
    for part in expected:
        assert part.lower() in message.lower(), f"{part!r} missing from:\n{message}"


def test_every_problem_is_reported_at_once():
    message = _error(["schedule.batch_size=0", "optimizer.lr=-1"])
    assert "2 problems" in message and "batch_size" in message and "optimizer.lr" in message


def test_solver_options_are_checked_against_the_solver():
    assert "has no option 'betas'" in _error(["optimizer.options.betas=[0.9, 0.99]"])
    assert "takes no momentum" in _error(["optimizer.name=adamw"])
    ok = load_config(DIGITS, ["optimizer.name=proxgen", "optimizer.momentum=null", "optimizer.options.betas=[0.9, 0.99]"])
    assert ok.optimizer.solver_kwargs() == {"lr": 0.01, "betas": [0.9, 0.99]}


def test_missing_sections_and_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {name: digits}\n")
    message = _error([], bad)
    assert "model: required but missing" in message and "structure: required but missing" in message
    bad.write_text("- just\n- a list\n")
    assert "mapping of sections" in _error([], bad)
    bad.write_text("model: [unclosed\n")
    assert "not valid YAML" in _error([], bad)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_training_hash_covers_training_settings_only():
    base = training_hash(load_config(DIGITS))
    assert training_hash(load_config(DIGITS, ["deploy.runs=7", "prune.round_to=8", "schedule.threads=2"])) == base
    assert training_hash(load_config(DIGITS, ["structure.0.lam=1e-3"])) != base
    assert training_hash(load_config(DIGITS, ["schedule.seed=1"])) != base


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
                                             ("CUDA:0", "cuda:0"), (" cpu ", "cpu")])
def test_schedule_device_accepts_auto_cpu_cuda_and_cuda_n(value, expected):
    # only the format is checked here (no CUDA query): a config written for a GPU machine loads anywhere
    assert load_config(DIGITS, [f"schedule.device='{value}'"]).schedule.device == expected
    assert load_config(DIGITS).schedule.device == "auto"


@pytest.mark.parametrize("value", ["gpu", "cpu:0", "cuda:x", "cuda:-1", "mps", "1", "auto:0", "null"])
def test_schedule_device_rejects_other_strings_naming_the_accepted_ones(value):
    message = _error([f"schedule.device={value}"])
    assert "schedule.device" in message and "auto, cpu, cuda or cuda:N" in message, message


def test_device_is_not_a_training_setting_so_runs_resume_across_devices():
    base = load_config(DIGITS)
    for device in ("cpu", "cuda", "cuda:3"):
        assert training_hash(load_config(DIGITS, [f"schedule.device={device}"])) == training_hash(base)
    # and the hash is the one a config from before schedule.device existed had (old checkpoints still resume)
    import hashlib
    import json
    from structkit.config import training_view
    old = base.to_dict()
    del old["schedule"]["device"]
    view = training_view(old)
    assert hashlib.sha256(json.dumps(view, sort_keys=True).encode()).hexdigest()[:16] == training_hash(base)


def test_a_structured_dual_averaging_run_without_a_final_stage_is_refused_before_training():
    """RAMDA/RMDA reach exact zeros only in the final stage: no milestones -> a config error naming the fix."""
    import yaml
    from structkit.config import ConfigError, validate
    data = yaml.safe_load(DIGITS.read_text())
    data["optimizer"]["milestones"] = []
    with pytest.raises(ConfigError, match=r"milestones is empty.*final stage.*milestones: \[5\]"):
        validate(data)
    data["optimizer"]["name"], data["optimizer"]["momentum"] = "proxgen", None  # a prox step is exact every step
    validate(data)


# ------------------------------------------------------------------------------------------------ your own data and models

@pytest.mark.parametrize("override, expected", [
    # data: image_folder options, validated before anything is read
    (["data.name=image_folder", "data.options={root: /x, transforms: [{rezise: 8}]}"],
     ["data.options.transforms.0: unknown transform 'rezise'", "did you mean 'resize'"]),
    (["data.name=image_folder", "data.options={root: /x, transforms: [{center_crop: 0}]}"],
     ["data.options.transforms.0.center_crop", "greater than or equal to 1"]),
    (["data.name=image_folder", "data.options={transforms: []}"], ["data.options.root: required"]),
    (["data.name=image_folder", "data.options={root: /x, val: /y, val_fraction: 0.1}"], ["either val"]),
    # data: callables are imported when the config is read
    (["data.name=no_such_module_xyz:load"], ["data.name", "cannot import module 'no_such_module_xyz'"]),
    (["data.name=tests.test_data:nothing"], ["data.name", "has no attribute 'nothing'"]),
    (["data.name=tests.test_data:AUGMENT"], ["data.name", "is a list, not a callable"]),
    (["data.name=tests.test_data:blobs", "data.options={size: 3}"],
     ["data.options", "blobs() has no option 'size'", "accepted: n, classes, seed"]),
    (["data.name=tests.test_data:blobs", "data.split={val_fraction: 0.5, test_fraction: 0.5}"],
     ["data.split", "must leave training examples"]),
    (["data.split={val_fraction: 0.2}"], ["data.split applies to 'package.module:callable' data sets"]),
    (["data.num_workers=-1"], ["data.num_workers", "greater than or equal to 0"]),
    # models: timm names, callables, init
    (["model.name=timm:resnet_18"], ["model.name", "unknown timm model 'resnet_18'", "did you mean 'timm:resnet18'"]),
    (["model.name=timm:resnet18", "model.options={num_classes: 3}"], ["model.options.num_classes is set by the data set"]),
    (["model.name=tests.test_models:nope"], ["model.name", "has no attribute 'nope'"]),
    (["model.name=tests.test_models:build_tiny", "model.options={hiden: 2}"], ["did you mean 'hidden'"]),
    (["model.init=pretrained"], ["model.init: pretrained: 'cnn' has no pretrained weights"]),
    (["model.options={init: random}"], ["model.options.init is set by model.init"]),
    (["model.name=resnet18", "model.options={weights: DEFAULT}"], ["model.options.weights is set by model.init"]),
])
def test_own_data_and_model_errors_at_config_time(override, expected):
    pytest.importorskip("timm")
    message = _error(override)
    for part in expected:
        assert part in message, (part, message)


def test_own_data_and_model_configs_validate():
    pytest.importorskip("timm")
    config = load_config(DIGITS, ["data.name=image_folder", "data.num_workers=2",
                                  "data.options={root: /data/train, transforms: [{resize: 36}, {random_crop: {size: 32, "
                                  "padding: 4}}, {horizontal_flip: true}, {normalize: {mean: [0.5, 0.5, 0.5], "
                                  "std: [0.2, 0.2, 0.2]}}]}",
                                  "model.name=timm:resnet18", "model.options={drop_rate: 0.1}", "model.init=pretrained"])
    assert config.data.num_workers == 2 and config.model.init == "pretrained"  # files are looked for at build time
    assert config.data.options["transforms"][2] == {"horizontal_flip": True}  # the config keeps what was written
    callable_data = load_config(DIGITS, ["data.name=tests.test_data:blobs", "data.options={n: 50}",
                                         "data.split={val_fraction: 0.2}", "model.init=runs/base"])
    assert callable_data.data.split.val_fraction == 0.2 and callable_data.data.split.test_fraction == 0.1
    assert load_config(DIGITS).model.init == "random" and load_config(DIGITS).data.num_workers == 0


def test_training_hash_ignores_worker_count_and_new_fields_at_their_defaults():
    """Runs made before model.init / data.split / data.num_workers existed still resume; a real change does not."""
    base = load_config(DIGITS)
    assert training_hash(base) == training_hash(load_config(DIGITS, ["data.num_workers=2"]))
    assert training_hash(base) != training_hash(load_config(DIGITS, ["model.init=/tmp/weights.pt"]))
