"""``structkit run`` end to end on the digits config, resume, the stage commands, and the training pieces."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from structkit import pipeline
from structkit.config import load_config, training_hash
from structkit.pipeline import Log, RunFolder
from structkit.prune import load_slim
from structkit.training import recalibrate_batchnorm

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
FAST_BENCH = ["deploy.warmup=5", "deploy.runs=20"]
QUIET = Log(quiet=True)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The digits config run once, uninterrupted (shared by the tests below)."""
    out = tmp_path_factory.mktemp("runs") / "digits"
    report = pipeline.run(DIGITS, out, overrides=FAST_BENCH, log=QUIET)
    return out, report


def _numbers(report):
    """The parts of a report that must not depend on timing."""
    keep = ("accuracy", "sparsity", "params", "macs", "verify", "layers", "solver")
    return {k: report[k] for k in keep}


def test_digits_end_to_end(digits_run):
    out, report = digits_run
    for name in ("config.yaml", "run_info.json", "metrics.jsonl", "dense.onnx", "slim.onnx", "slim.pt", "report.json",
                 "report.md", "training.png", "layers.png", "latency.png", "checkpoints/epoch_0006.pt"):
        assert (out / name).is_file(), name
    assert report == json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert 0.0 <= acc["trained"] <= 1.0 and 0.0 <= acc["slim"] <= 1.0
    assert acc["trained"] > 0.8, "the digits config should learn"
    assert acc["slim"] == acc["trained"], "removing exact zeros must not change a single prediction"
    assert 0 < report["sparsity"]["weighted_group_sparsity"] < 1
    assert report["params"]["after"] < report["params"]["before"]
    assert report["macs"]["after"] < report["macs"]["before"]
    assert report["verify"]["max_abs_diff_torch"] <= 1e-4
    assert report["verify"]["max_abs_diff_onnx"] <= 1e-4
    assert set(report["latency"]) == {"1", "64"}
    for row in report["latency"].values():
        assert row["dense_p50_ms"] > 0 and row["slim_p50_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_p50_ms"] / row["slim_p50_ms"])
    assert report["solver"]["name"] == "ramda" and report["solver"]["mean_inner_iters"] >= 0
    assert report["environment"]["onnxruntime"] and report["environment"]["cpu"]
    assert report["config"]["data"]["name"] == "digits"
    assert report["wall_time_s"] > 0
    assert report["versions"]["torch"]

    # the per-layer widths in the report are the slim model's real widths
    slim = load_slim(out / "slim.pt")
    for name, layer in report["layers"].items():
        assert slim.get_submodule(name).out_channels == layer["after"]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, 7))
    assert {"train_loss", "val_accuracy", "weighted_group_sparsity", "mean_inner_iters", "epoch_seconds"} <= set(history[0])
    assert history[-1]["weighted_group_sparsity"] == report["sparsity"]["weighted_group_sparsity"]
    md = (out / "report.md").read_text()
    assert f"{acc['slim']:.4f}" in md and "| batch |" in md and "Per-layer widths" in md
    assert not list(out.rglob("*.tmp")), "atomic writes leave no temporary files behind"


def test_resume_after_a_stop_equals_the_uninterrupted_run(digits_run, tmp_path):
    done, report = digits_run
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    # the state a run leaves when it dies after epoch 2: its first checkpoints and its config
    for epoch in (1, 2):
        shutil.copy(done / f"checkpoints/epoch_{epoch:04d}.pt", out / "checkpoints")
    shutil.copy(done / "config.yaml", out)
    resumed = pipeline.run(DIGITS, out, resume=True, overrides=FAST_BENCH, log=QUIET)
    assert _numbers(resumed) == _numbers(report)
    a = torch.load(done / "checkpoints/epoch_0006.pt", weights_only=True)
    b = torch.load(out / "checkpoints/epoch_0006.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    no_time = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in a["history"]]
    assert no_time == [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in b["history"]]
    assert (out / "metrics.jsonl").read_text().count("\n") == 6


def test_resume_refuses_other_training_settings(digits_run, tmp_path):
    done, _ = digits_run
    out = tmp_path / "other"
    shutil.copytree(done / "checkpoints", out / "checkpoints")
    config = load_config(DIGITS, ["structure.0.lam=1e-3"])
    with pytest.raises(ValueError, match=r"structure\.0\.lam: 0\.004 -> 0\.001"):
        pipeline.train(config, out, resume=True, log=QUIET)
    with pytest.raises(FileExistsError, match="--resume"):
        pipeline.train(load_config(DIGITS), out, resume=False, log=QUIET)


def test_corrupt_checkpoint_is_named(digits_run, tmp_path):
    done, _ = digits_run
    out = tmp_path / "corrupt"
    shutil.copytree(done / "checkpoints", out / "checkpoints")
    last = out / "checkpoints/epoch_0006.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="epoch_0006.pt is corrupt or truncated"):
        pipeline.train(load_config(DIGITS), out, resume=True, log=QUIET)


def test_compress_again_with_round_to_realigns_widths_and_invalidates_later_stages(digits_run, tmp_path):
    done, report = digits_run
    out = tmp_path / "again"
    shutil.copytree(done, out)
    result = pipeline.compress(out, overrides=["prune.round_to=8"], log=QUIET)
    widths = {name: e["after"] for name, e in result["prune"]["layers"].items()}
    assert all(w % 8 == 0 for w in widths.values()), widths
    assert result["prune"]["params_after"] >= report["params"]["after"]
    assert result["accuracy"]["slim"] == result["accuracy"]["trained"] == report["accuracy"]["trained"]
    folder = RunFolder(out)
    assert folder.result("export") is None and folder.result("bench") is None, "stale results were kept"
    assert "prune:\n  round_to: 8" in (out / "config.yaml").read_text()
    new = json.loads((out / "report.json").read_text())
    assert new["latency"] is None and new["params"]["after"] == result["prune"]["params_after"]
    with pytest.raises(FileNotFoundError, match="structkit export"):
        pipeline.bench(out, log=QUIET)
    with pytest.raises(ValueError, match="may only change prune and deploy"):
        pipeline.compress(out, overrides=["schedule.seed=3"], log=QUIET)


def test_later_stages_need_finished_training(digits_run, tmp_path):
    done, _ = digits_run
    out = tmp_path / "half"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copy(done / "checkpoints/epoch_0002.pt", out / "checkpoints")
    shutil.copy(done / "config.yaml", out)
    with pytest.raises(RuntimeError, match="stopped after epoch 2 of 6"):
        pipeline.compress(out, log=QUIET)
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        pipeline.compress(tmp_path / "empty", log=QUIET)


def test_out_folder_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        pipeline.train(load_config(DIGITS), path, log=QUIET)


def test_inspect_shows_config_and_groups():
    text = pipeline.inspect(DIGITS)
    assert "features.conv1" in text and "group_lasso" in text and "name: ramda" in text


# ------------------------------------------------------------------------------------------------ BatchNorm

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_recalibration_is_the_plain_average_over_the_batches():
    torch.manual_seed(0)
    net = _Net().eval()
    net.bn.running_mean.fill_(5.0)  # stale statistics
    net.bn.running_var.fill_(9.0)
    batches = [(torch.randn(8, 1, 6, 6), None) for _ in range(3)]
    rng = torch.get_rng_state()
    assert recalibrate_batchnorm(net, batches) == 3
    with torch.no_grad():
        feats = [net.conv(x) for x, _ in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    n = feats[0].numel() / 4
    var = torch.stack([f.var((0, 2, 3), unbiased=False) * n / (n - 1) for f in feats]).mean(0)
    torch.testing.assert_close(net.bn.running_mean, mean)
    torch.testing.assert_close(net.bn.running_var, var)
    assert net.bn.momentum == 0.1 and not net.training and not net.bn.training and not net.drop.training
    assert torch.equal(torch.get_rng_state(), rng), "dropout must stay off (no random numbers drawn)"


def test_recalibration_restores_train_mode():
    net = _Net().train()
    recalibrate_batchnorm(net, [(torch.randn(4, 1, 6, 6), None)])
    assert net.training and net.bn.training and net.drop.training


def test_bf16_precision_trains_with_float32_state(tmp_path):
    config = load_config(DIGITS, ["schedule.precision=bf16", "schedule.epochs=2", "optimizer.milestones=[1]"])
    record = pipeline.train(config, tmp_path / "bf16", log=QUIET)
    assert record["train_loss"] == record["train_loss"] and record["val_accuracy"] > 0.3
    state = torch.load(tmp_path / "bf16/checkpoints/epoch_0001.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ devices

def _all_tensors(data):
    if torch.is_tensor(data):
        yield data
    elif isinstance(data, dict):
        for v in data.values():
            yield from _all_tensors(v)
    elif isinstance(data, (list, tuple)):
        for v in data:
            yield from _all_tensors(v)


def test_cuda_without_cuda_fails_before_training_naming_the_fix(tmp_path, monkeypatch):
    from structkit.device import DeviceError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match=r"CUDA is not available.*schedule\.device: cpu.*auto"):
            pipeline.train(load_config(DIGITS, [f"schedule.device={device}"]), tmp_path / "gpu", log=QUIET)
    assert not (tmp_path / "gpu").exists(), "nothing is written before the device is known to work"
    assert pipeline.resolve_device("auto") == torch.device("cpu")


def test_cuda_index_out_of_range_names_the_devices(tmp_path, monkeypatch):
    from structkit.device import DeviceError
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError, match=r"'cuda:2' but this machine has 2 CUDA device\(s\) \(cuda:0 \.\. cuda:1\)"):
        pipeline.train(load_config(DIGITS, ["schedule.device=cuda:2"]), tmp_path / "gpu", log=QUIET)
    assert pipeline.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert pipeline.resolve_device("auto") == torch.device("cuda", 0)


def test_checkpoints_hold_cpu_tensors_and_load_with_map_location(digits_run, monkeypatch):
    out, _ = digits_run
    assert json.loads((out / "results/train.json").read_text())["device"] == "cpu"
    seen = []
    real = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    state = RunFolder(out).load_checkpoint(out / "checkpoints/epoch_0006.pt")
    assert seen == ["cpu"], "a GPU run's checkpoint must load on a machine without CUDA"
    tensors = list(_all_tensors({k: state[k] for k in ("model", "optimizer", "scheduler", "rng")}))
    assert tensors and all(t.device.type == "cpu" for t in tensors)


def test_to_cpu_keeps_state_dict_structure_and_metadata():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    sd = net.state_dict()
    moved = pipeline._to_cpu({"model": sd, "list": [torch.ones(1), (torch.zeros(1), 3)], "x": None})
    assert list(moved["model"]) == list(sd) and moved["model"]._metadata == sd._metadata
    assert isinstance(moved["list"][1], tuple) and moved["list"][1][1] == 3
    nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)).load_state_dict(moved["model"])


def test_a_run_trained_elsewhere_resumes_on_the_cpu(digits_run, tmp_path):
    """A checkpoint written under schedule.device: cuda (here: its config says so) resumes under cpu and gives
    the uninterrupted run's weights: the device is not a training setting and checkpoints hold CPU tensors."""
    done, _ = digits_run
    out = tmp_path / "moved"
    (out / "checkpoints").mkdir(parents=True)
    for epoch in (1, 2, 3, 4, 5):
        state = torch.load(done / f"checkpoints/epoch_{epoch:04d}.pt", weights_only=True)
        state["config"]["schedule"]["device"] = "cuda"
        state["training_hash"] = training_hash(load_config(DIGITS, ["schedule.device=cuda"]))
        torch.save(state, out / f"checkpoints/epoch_{epoch:04d}.pt")
    (out / "config.yaml").write_text((done / "config.yaml").read_text().replace("device: auto", "device: cuda"))
    pipeline.train(load_config(DIGITS, ["schedule.device=cpu"]), out, resume=True, log=QUIET)
    a = torch.load(done / "checkpoints/epoch_0006.pt", weights_only=True)
    b = torch.load(out / "checkpoints/epoch_0006.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_training_pieces_move_batches_to_the_model_device(device):
    from structkit.training import NonFiniteError, evaluate, train_epoch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(device)
    data = [(torch.randn(16, 4), torch.randint(0, 3, (16,))) for _ in range(4)]  # CPU batches
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    loss = train_epoch(model, data, opt, epoch=1, on_step=lambda step, value: steps.append((step, value)))
    assert [s for s, _ in steps] == [1, 2, 3, 4] and all(isinstance(v, float) for _, v in steps)
    assert loss == pytest.approx(sum(v for _, v in steps) / 4)
    assert recalibrate_batchnorm(model, data) == 4
    result = evaluate(model, data)
    assert 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    assert all(p.device.type == device.type for p in model.parameters())
    model[0].weight.register_hook(lambda g: g * float("nan"))
    before = model[0].weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of 0\.weight at epoch 2, step 1"):
        train_epoch(model, data, opt, epoch=2)
    assert torch.equal(model[0].weight.detach(), before)


def test_a_huge_finite_gradient_is_not_mistaken_for_a_non_finite_one():
    from structkit.training import train_epoch
    model = nn.Linear(3, 2)
    model.weight.register_hook(lambda g: torch.full_like(g, 3e38))  # its 2-norm overflows float32; it is finite
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train_epoch(model, [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))], opt, epoch=1)


@pytest.mark.cuda
def test_digits_end_to_end_on_cuda_then_resumed_on_the_cpu(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA path is untested on this machine")
    out = tmp_path / "digits_cuda"
    report = pipeline.run(DIGITS, out, overrides=[*FAST_BENCH, "schedule.device=cuda"], log=QUIET)
    train = json.loads((out / "results/train.json").read_text())
    assert train["device"].startswith("cuda")
    acc = report["accuracy"]
    assert acc["trained"] > 0.8, "the digits config should learn on the GPU too"
    assert acc["slim"] == acc["trained"], "pruning (on the CPU) removes only exact zeros"
    assert 0 < report["sparsity"]["weighted_group_sparsity"] < 1
    assert report["params"]["after"] < report["params"]["before"]
    assert report["verify"]["max_abs_diff_torch"] <= 1e-4 and report["verify"]["max_abs_diff_onnx"] <= 1e-4
    state = torch.load(out / "checkpoints/epoch_0006.pt", map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in _all_tensors({k: state[k] for k in ("model", "optimizer")}))
    # the GPU run's checkpoints resume on the CPU
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "checkpoints/epoch_0005.pt", moved / "checkpoints")
    record = pipeline.train(load_config(DIGITS, ["schedule.device=cpu"]), moved, resume=True, log=QUIET)
    assert record["epoch"] == 6 and record["val_accuracy"] > 0.8


@pytest.mark.cuda
def test_bf16_on_cuda_keeps_float32_parameters_and_solver_state(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA path is untested on this machine")
    config = load_config(DIGITS, ["schedule.device=cuda", "schedule.precision=bf16", "schedule.epochs=2",
                                  "optimizer.milestones=[1]"])
    record = pipeline.train(config, tmp_path / "bf16", log=QUIET)
    assert record["train_loss"] == record["train_loss"] and record["val_accuracy"] > 0.5
    state = torch.load(tmp_path / "bf16/checkpoints/epoch_0002.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    tensors = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)
               and v.is_floating_point()]
    assert tensors and all(v.dtype == torch.float32 and v.device.type == "cpu" for v in tensors)


def test_finetune_stage_trains_the_slim_model_reports_it_and_resumes(tmp_path):
    """finetune.epochs > 0: the verified slim model is fine-tuned (with distillation), slim.pt holds the
    fine-tuned weights, the report keeps the pruned accuracy, and re-running the stage resumes (no retraining)."""
    from structkit.slim import load_slim
    out = tmp_path / "ft"
    config = load_config(DIGITS, ["schedule.epochs=2", "optimizer.milestones=[1]", "finetune.epochs=2",
                                  "finetune.distill=true", "finetune.lr=2e-3"])
    pipeline.train(config, out, log=pipeline.Log(quiet=True))
    result = pipeline.compress(out, log=pipeline.Log(quiet=True))
    ft = result["finetune"]
    assert [r["epoch"] for r in ft["history"]] == [1, 2] and ft["budget_epochs"] == 4 and ft["distill"]
    assert 0 <= result["accuracy"]["slim_pruned"] <= 1 and 0 <= result["accuracy"]["slim"] <= 1
    assert sorted(p.name for p in (out / "checkpoints").glob("finetune_*.pt")) == ["finetune_0001.pt", "finetune_0002.pt"]
    again = pipeline.compress(out, log=pipeline.Log(quiet=True))  # resumes after epoch 2: same weights, no training
    assert again["accuracy"]["slim"] == result["accuracy"]["slim"] and again["finetune"]["history"] == ft["history"]
    slim = load_slim(out / "slim.pt")
    assert sum(p.numel() for p in slim.parameters()) == result["prune"]["params_after"]
    assert "fine-tuned for 2 epoch(s) with distillation" in (out / "report.md").read_text()


def test_distillation_loss_is_cross_entropy_at_alpha_zero_and_zero_kl_for_equal_logits():
    import torch.nn.functional as F
    from structkit.finetune import distillation_loss
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    ce = F.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, torch.randn(8, 5), labels, temperature=4.0, alpha=0.0), ce)
    assert torch.allclose(distillation_loss(logits, logits, labels, temperature=3.0, alpha=0.5), 0.5 * ce, atol=1e-6)
