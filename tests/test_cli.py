"""The ``structkit`` command: argument handling, and bad input -> one clear message, exit status 2, no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from structkit.cli import EXIT_ERROR, build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "configs" / "digits.yaml"


@pytest.mark.parametrize("overrides, expected", [
    (["schedule.epoch=3"], "did you mean 'epochs'"),
    (["structure.0.lam=-1"], "structure.0.lam: Input should be greater than or equal to 0; got -1"),
    (["schedule.batch_size=0"], "schedule.batch_size: Input should be greater than or equal to 1; got 0"),
    (["optimizer.milestones=[3, 1]"], "milestones must be strictly increasing"),
    (["optimizer.name=adamm"], "unknown solver 'adamm' (did you mean 'adam"),
    (["model.options.widths=[8]"], "pool_after counts convolutions"),  # raised while building the model
])
def test_bad_config_exits_2_with_one_message(overrides, expected, tmp_path, capsys):
    code = main(["run", str(DIGITS), "--out", str(tmp_path / "out"), "--quiet", "--set", *overrides])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert expected in err, err
    assert err.startswith("structkit: error: ") and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="batch_size"):
        main(["run", str(DIGITS), "--out", str(tmp_path), "--debug", "--set", "schedule.batch_size=0"])


def test_missing_config_and_folder_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == EXIT_ERROR
    assert "nope.yaml not found" in capsys.readouterr().err
    assert main(["compress", str(tmp_path)]) == EXIT_ERROR
    assert "holds no run (no config.yaml)" in capsys.readouterr().err
    file = tmp_path / "a_file"
    file.write_text("")
    assert main(["run", str(DIGITS), "--out", str(file)]) == EXIT_ERROR
    assert "is a file" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["run", "train"])
def test_cuda_asked_for_without_cuda_is_one_clear_error(command, tmp_path, capsys, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu"
    code = main([command, str(DIGITS), "--out", str(out), "--quiet", "--set", "schedule.device=cuda"])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert err.startswith("structkit: error: schedule.device is 'cuda' but CUDA is not available") and "Traceback" not in err
    assert "schedule.device: cpu" in err and "auto" in err
    assert not out.exists()
    assert main(["run", str(DIGITS), "--out", str(out), "--set", "schedule.device=gpu"]) == EXIT_ERROR
    assert "schedule.device: device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_console_entry_point_exit_status_and_no_traceback(tmp_path):
    """The real process: ``python -m structkit`` exits 2 and prints no traceback on a bad config."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "structkit", "run", str(DIGITS), "--out", str(tmp_path / "o"),
                           "--set", "optimizer.milestones=[9]"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "optimizer.milestones [9] must all be < schedule.epochs (6)" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_quiet_prints_only_the_summary_line(tmp_path, capsys):
    code = main(["train", str(DIGITS), "--out", str(tmp_path / "q"), "--quiet",
                 "--set", "schedule.epochs=2", "optimizer.milestones=[1]"])
    captured = capsys.readouterr()
    assert code == 0
    assert captured.err == ""
    assert captured.out.count("\n") == 1 and captured.out.startswith("structkit: trained")
    assert (tmp_path / "q" / "checkpoints" / "epoch_0001.pt").is_file()


def test_set_accepts_several_values_and_repeats():
    args = build_parser().parse_args(["run", "c.yaml", "--set", "a=1", "b=2", "--set", "c=3", "--quiet"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.quiet and not args.resume
    args = build_parser().parse_args(["bench", "runs/x", "--set", "deploy.runs=10"])
    assert args.out == Path("runs/x") and args.overrides == ["deploy.runs=10"]


def test_inspect_prints_the_groups(capsys):
    assert main(["inspect", str(DIGITS)]) == 0
    out = capsys.readouterr().out
    assert "features.conv2" in out and "channels" in out and "# config" in out


def test_pyproject_declares_the_console_script():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'structkit = "structkit.cli:main"' in text
