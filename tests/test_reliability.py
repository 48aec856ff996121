"""Reliability: bad input -> one clear message (exit 2, no traceback); crashes lose nothing; non-finite training stops
cleanly; bf16. See docs/reliability.md."""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from structkit import pipeline, train_stage
from structkit.cli import EXIT_ERROR, main
from structkit.config import load_config, parse_yaml

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"
QUIET = pipeline.Log(quiet=True)


def _cli(argv: list[str]) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit status, stdout, stderr). Any exception escaping main() fails."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def _assert_clean_error(code: int, err: str, context: str = "") -> None:
    assert code == EXIT_ERROR, f"{context}: exit status {code}\n{err}"
    assert err.startswith("structkit: error: "), f"{context}: not one error message:\n{err}"
    assert "Traceback" not in err, f"{context}: traceback without --debug:\n{err}"
    assert len(err) < 3000, f"{context}: message is not one paragraph ({len(err)} characters)"


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("overrides, expected", [
    (["optimizer.lam=-1"], ["optimizer.lam", "-1", "greater than or equal to 0"]),
    (["optimizer.lam=abc"], ["optimizer.lam", "'abc'", "valid number"]),
    (["optimizer.lr=abc"], ["optimizer.lr", "'abc'", "valid number"]),
    (["optimizer.lr=-0.5"], ["optimizer.lr", "-0.5", "greater than 0"]),
    (["optimizer.lr=.nan"], ["optimizer.lr", "nan", "finite"]),
    (["structure.0.select=''"], ["structure.0.select", "empty", "'*'"]),
    (["structure.0.select=nomatch.*"], ["structure rule #0", "'nomatch.*'", "matches no module",
                                        "features.conv1"]),
    (["optimizer.milestones=[3, 2]"], ["optimizer.milestones", "[3, 2]", "strictly increasing"]),
    (["schedule.batch_size=0"], ["schedule.batch_size", "got 0", "greater than or equal to 1"]),
    (["schedule.epochs=true"], ["schedule.epochs", "boolean true", "number"]),
    (["schedule=3"], ["schedule", "3", "dictionary"]),
    (["data.options.root=/nowhere"], ["data.options", "'root'", "val_fraction"]),
    (["model.options.widht=[8]"], ["model.options", "'widht'", "did you mean 'widths'"]),
    (["model.options.num_classes=3"], ["model.options.num_classes", "set by the data set"]),
    (["data.name=fashion_mnist", "data.options.root=/nowhere/fm"], ["data", "/nowhere/fm", "not found"]),
    (["optimizer.name=ramad"], ["optimizer.name", "did you mean 'ramda'"]),
    (["structure.0.kind=chanels"], ["structure.0.kind", "did you mean 'channels'"]),
    (["structure.0.regularizer=group_lass"], ["'group_lass'", "did you mean 'group_lasso'"]),
    (["model.name=cnm"], ["model.name", "did you mean 'cnn'"]),
    (["data.name=digit"], ["data.name", "did you mean 'digits'"]),
    (["shedule.epochs=3"], ["shedule", "did you mean 'schedule'"]),
])
def test_config_errors_name_field_value_and_accepted(overrides, expected, tmp_path):
    code, _, err = _cli(["run", str(DIGITS), "--out", str(tmp_path / "o"), "--quiet", "--set", *overrides])
    _assert_clean_error(code, err, str(overrides))
    for part in expected:
        assert part.lower() in err.lower(), f"{part!r} missing from:\n{err}"
    assert not (tmp_path / "o" / "checkpoints").exists() or not list((tmp_path / "o" / "checkpoints").iterdir())


def test_out_folder_that_is_a_file_and_missing_config(tmp_path):
    file = tmp_path / "taken"
    file.write_text("x")
    code, _, err = _cli(["run", str(DIGITS), "--out", str(file)])
    _assert_clean_error(code, err)
    assert "is a file" in err and str(file) in err
    code, _, err = _cli(["run", str(tmp_path / "nope.yaml")])
    _assert_clean_error(code, err)
    assert "nope.yaml not found" in err


# the mutation test: drop, retype, rename and corrupt fields of configs/digits.yaml
_BAD_VALUES = [None, True, False, -1, 0, 1.5, -2.5, 10**12, "abc", "", [], {}, [1, "x"], {"a": 1}, float("nan"),
               float("inf")]
MUTATION_COUNTS = {"tried": 0, "valid": 0, "rejected_cleanly": 0}


def _paths(data, prefix=()):
    """Every key / list index path in the parsed config."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return []
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out += _paths(value, (*prefix, key))
    return out


def _mutate(text: str, op: str, rnd: random.Random) -> str:
    data = parse_yaml(text)
    paths = _paths(data)
    path = rnd.choice(paths)
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if op == "drop":
        del parent[key]
    elif op == "retype":
        parent[key] = rnd.choice(_BAD_VALUES)
    elif op == "rename" and isinstance(key, str):
        i = rnd.randrange(len(key) + 1)
        new = rnd.choice([key[:i] + rnd.choice("abcxyz_") + key[i:], key[:i] + key[i + 1:], key.upper(), key + "s"])
        parent[new] = parent.pop(key)
    elif op == "swap":  # move a value to another place of the config
        other = rnd.choice(paths)
        source = data
        for k in other:
            source = source[k]
        parent[key] = json.loads(json.dumps(source))
    elif op == "corrupt":  # the YAML text itself: delete or insert characters
        i = rnd.randrange(len(text))
        j = min(len(text), i + rnd.randint(1, 12))
        return text[:i] + rnd.choice(["", ":", "[", "  ", "- ", "\t", "{", "'"]) + text[j:]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.sampled_from(["drop", "retype", "rename", "swap", "corrupt"]), min_size=1, max_size=3),
       seed=st.integers(0, 2**32 - 1))
def test_mutated_configs_validate_or_fail_cleanly(ops, seed):
    """Either the mutated config is accepted (``inspect`` builds its model and groups) or the CLI exits 2 with one
    message and no traceback; nothing else escapes."""
    rnd = random.Random(seed)
    text = DIGITS.read_text()
    for op in ops:
        try:
            text = _mutate(text, op, rnd)
        except Exception:  # a previous corruption made the text unparsable: keep it as it is
            break
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mutated.yaml"
        path.write_text(text)
        code, out, err = _cli(["inspect", str(path), "--quiet"])
    MUTATION_COUNTS["tried"] += 1
    if code == 0:
        MUTATION_COUNTS["valid"] += 1
        assert "# groups" in out
        return
    _assert_clean_error(code, err, f"ops {ops}, seed {seed}, config:\n{text}")
    MUTATION_COUNTS["rejected_cleanly"] += 1


def test_mutation_counts_are_reported(capsys):
    """Runs after the mutation test (file order): prints how many mutations were tried / rejected cleanly."""
    if not MUTATION_COUNTS["tried"]:
        pytest.skip("the mutation test did not run in this process")
    with capsys.disabled():
        print(f"\nmutation test: {MUTATION_COUNTS['tried']} mutated configs tried, {MUTATION_COUNTS['valid']} still "
              f"valid, {MUTATION_COUNTS['rejected_cleanly']} rejected cleanly (exit 2, one message, no traceback)")
    assert MUTATION_COUNTS["valid"] + MUTATION_COUNTS["rejected_cleanly"] == MUTATION_COUNTS["tried"]
    assert MUTATION_COUNTS["rejected_cleanly"] >= MUTATION_COUNTS["tried"] // 3, "the mutations hardly break anything"


# ------------------------------------------------------------------------------------------------ crashes lose nothing

FAST = ["deploy.warmup=2", "deploy.runs=5", "deploy.batch_sizes=[1]"]
SHORT = ["schedule.epochs=5", "optimizer.milestones=[2]"]  # 5 x ~0.7 s of training: time to kill it mid-way


def _numbers(report: dict) -> dict:
    return {k: report[k] for k in ("accuracy", "sparsity", "params", "macs", "layers", "verify")}


def _structkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "structkit", *args]


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_gives_the_uninterrupted_report(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "killed"
    cmd = _structkit("run", str(DIGITS), "--out", str(out), "--quiet", "--set", *SHORT, *FAST)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
    first = out / "checkpoints" / "epoch_0001.pt"
    killed = []

    def kill_after_first_checkpoint():
        deadline = time.monotonic() + 120
        while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(True)

    watcher = threading.Thread(target=kill_after_first_checkpoint)
    watcher.start()
    # meanwhile (the other core): the same config, uninterrupted, in this process
    reference = pipeline.run(DIGITS, tmp_path / "reference", overrides=SHORT + FAST, log=QUIET)
    watcher.join()
    proc.wait(timeout=30)
    assert killed, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    epochs = [p.name for p in sorted((out / "checkpoints").glob("epoch_*.pt"))]
    assert 1 <= len(epochs) < 5, f"killed mid-training: {epochs}"
    assert not (out / "report.json").exists() or json.loads((out / "report.json").read_text())["params"]["after"] is None
    for path in (out / "checkpoints").glob("epoch_*.pt"):  # every complete-named file is complete
        assert torch.load(path, weights_only=True)["format"] == "structkit.checkpoint"
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        json.loads(line)
    yaml.safe_load((out / "config.yaml").read_text())

    resumed = subprocess.run(_structkit("run", str(DIGITS), "--out", str(out), "--quiet", "--resume", "--set", *SHORT,
                                        *FAST), env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert _numbers(report) == _numbers(reference)
    assert report["accuracy"]["trained"] > 0.5 and report["params"]["after"] < report["params"]["before"]
    assert not list(out.rglob("*.tmp")), "a stale temporary file was left behind"
    info = json.loads((out / "run_info.json").read_text())
    assert torch.__version__.startswith(info["versions"]["torch"]) and "git" in info
    assert [i["command"] for i in info["invocations"]].count("train") == 2


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    """A 2-epoch digits training run (in-process; epoch 2 is the final stage)."""
    out = tmp_path_factory.mktemp("runs") / "one"
    config = load_config(DIGITS, ["schedule.epochs=2", "optimizer.milestones=[1]"])
    pipeline.train(config, out, log=QUIET)
    return out, config


def test_resume_refuses_another_config_listing_the_differences(one_epoch, tmp_path):
    done, _ = one_epoch
    out = tmp_path / "o"
    shutil.copytree(done, out)
    code, _, err = _cli(["run", str(DIGITS), "--out", str(out), "--resume", "--quiet", "--set", "schedule.epochs=2",
                         "optimizer.milestones=[1]", "optimizer.lr=0.05", "schedule.seed=3"])
    _assert_clean_error(code, err)
    assert "cannot resume" in err and "optimizer.lr: 0.01 -> 0.05" in err and "schedule.seed: 0 -> 3" in err
    code, _, err = _cli(["run", str(DIGITS), "--out", str(out), "--quiet", "--set", "schedule.epochs=2",
                         "optimizer.milestones=[1]"])
    _assert_clean_error(code, err)
    assert "--resume" in err


def test_truncated_files_give_a_clear_error(one_epoch, tmp_path):
    done, _ = one_epoch
    out = tmp_path / "o"
    shutil.copytree(done, out)
    ckpt = out / "checkpoints" / "epoch_0002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:5000])
    code, _, err = _cli(["train", str(DIGITS), "--out", str(out), "--resume", "--quiet", "--set", "schedule.epochs=2",
                         "optimizer.milestones=[1]"])
    _assert_clean_error(code, err)
    assert "epoch_0002.pt is corrupt or truncated" in err and "Delete it" in err
    # slim model and ONNX files: the stages that read them say which file and how to rebuild it
    (out / "slim.pt").write_bytes(b"PK\x03\x04 not really a zip")
    (out / "results" / "compress.json").write_text("{}")
    shutil.copy(done / "checkpoints" / "epoch_0002.pt", ckpt)
    code, _, err = _cli(["export", str(out), "--quiet"])
    _assert_clean_error(code, err)
    assert "slim.pt is corrupt, truncated or not a structkit slim model" in err and "structkit compress" in err
    (out / "dense.onnx").write_bytes(b"\x08\x07garbage")
    (out / "slim.onnx").write_bytes(b"")
    (out / "results" / "export.json").write_text("{}")
    code, _, err = _cli(["bench", str(out), "--quiet", "--set", "deploy.runs=1", "deploy.warmup=0"])
    _assert_clean_error(code, err)
    assert "dense.onnx" in err and "not a valid ONNX model" in err
    (out / "results" / "export.json").write_text('{"dense": ')
    code, _, err = _cli(["bench", str(out), "--quiet"])
    _assert_clean_error(code, err)
    assert "export.json is corrupt" in err


# ------------------------------------------------------------------------------------------------ non-finite, collapse

def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real = pipeline.train_epoch

    def poisoned(model, loader, optimizer, *, epoch, **kw):
        if epoch != 2:
            return real(model, loader, optimizer, epoch=epoch, **kw)

        def batches():
            for step, (x, y) in enumerate(loader, start=1):
                yield (torch.full_like(x, float("nan")) if step == 5 else x), y
        return real(model, batches(), optimizer, epoch=epoch, **kw)

    monkeypatch.setattr(train_stage, "train_epoch", poisoned)
    out = tmp_path / "nan"
    code, _, err = _cli(["train", str(DIGITS), "--out", str(out), "--quiet", "--set", "schedule.epochs=2",
                         "optimizer.milestones=[1]"])
    _assert_clean_error(code, err)
    assert "training loss is nan at epoch 2, step 5" in err
    assert "Lower optimizer.lr" in err and "lam" in err
    assert "epoch_0001.pt (epoch 1) is kept" in err
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert files == ["epoch_0001.pt"]
    state = torch.load(out / "checkpoints" / "epoch_0001.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_non_finite_gradient_is_caught_before_the_step():
    from structkit.training import NonFiniteError, train_epoch
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    model.weight.register_hook(lambda g: g * float("inf"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))] * 3
    with pytest.raises(NonFiniteError, match=r"non-finite gradient of weight at epoch 7, step 1"):
        train_epoch(model, data, opt, epoch=7)
    assert torch.equal(model.weight.detach(), before), "the bad step must not change the weights"


def test_layer_collapse_is_prevented_and_warned(one_epoch, tmp_path, capsys):
    done, config = one_epoch
    out = tmp_path / "collapse"
    shutil.copytree(done, out)
    path = out / "checkpoints" / "epoch_0002.pt"
    state = torch.load(path, weights_only=True)
    for key in ("features.conv2.weight", "features.conv2.bias", "features.bn2.weight", "features.bn2.bias"):
        if key in state["model"]:
            state["model"][key].zero_()
    torch.save(state, path)
    result = pipeline.compress(out, log=QUIET)
    assert result["prune"]["layers"]["features.conv2"]["after"] == 1, "the last group must stay"
    err = capsys.readouterr().err
    assert "structkit: warning: layer collapse" in err and "features.conv2" in err
    report = json.loads((out / "report.json").read_text())
    assert any("features.conv2" in w for w in report["warnings"])
    md = (out / "report.md").read_text()
    assert "## Warnings" in md and "layer collapse" in md


# ------------------------------------------------------------------------------------------------ bf16

def test_bf16_forward_under_autocast_with_float32_solver_state(one_epoch, tmp_path):
    config = load_config(DIGITS, ["schedule.precision=bf16", "schedule.epochs=2", "optimizer.milestones=[1]"])
    record = pipeline.train(config, tmp_path / "bf16", log=QUIET)
    assert math.isfinite(record["train_loss"]) and record["val_accuracy"] > 0.5
    fp32 = json.loads((one_epoch[0] / "metrics.jsonl").read_text().splitlines()[0])
    assert record["val_accuracy"] >= fp32["val_accuracy"] - 0.2
    state = torch.load(tmp_path / "bf16/checkpoints/epoch_0002.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    tensors = [v for s in state["optimizer"]["state"].values() for v in s.values() if torch.is_tensor(v)
               and v.is_floating_point()]
    assert tensors and all(v.dtype == torch.float32 for v in tensors)
    from structkit.training import autocast
    with autocast("bf16"):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
