"""``structkit run`` end to end on the digits config, resume, the stage commands, and the training pieces."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from structkit import pipeline
from structkit.config import load_config
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
    a = torch.load(done / "checkpoints/epoch_0006.pt", weights_only=False)
    b = torch.load(out / "checkpoints/epoch_0006.pt", weights_only=False)
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
    config = load_config(DIGITS, ["schedule.precision=bf16", "schedule.epochs=1", "optimizer.milestones=[]"])
    record = pipeline.train(config, tmp_path / "bf16", log=QUIET)
    assert record["train_loss"] == record["train_loss"] and record["val_accuracy"] > 0.3
    state = torch.load(tmp_path / "bf16/checkpoints/epoch_0001.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
