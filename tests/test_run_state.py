"""``structkit run`` builds its state once: one data set load and one model trace per run, handed from the training
to the later stages, which then compute exactly what the stand-alone stage commands compute."""
import json
from pathlib import Path

import pytest

from structkit import data, pipeline, structure
from structkit.config import load_config

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"
TINY = ["schedule.epochs=2", "optimizer.milestones=[1]", "finetune.epochs=1", "finetune.distill=true",
        "deploy.warmup=1", "deploy.runs=2", "deploy.batch_sizes=[1]"]
QUIET = pipeline.Log(quiet=True)


@pytest.fixture
def counts(monkeypatch):
    """How often the data set is loaded and the model traced into groups (patched where the stages look them up)."""
    seen = {"loads": 0, "traces": 0}
    real_load, real_group = data.load_dataset, structure.group_parameters

    def load_dataset(*args, **kwargs):
        seen["loads"] += 1
        return real_load(*args, **kwargs)

    def group_parameters(*args, **kwargs):
        seen["traces"] += 1
        return real_group(*args, **kwargs)

    monkeypatch.setattr(data, "load_dataset", load_dataset)
    monkeypatch.setattr(structure, "group_parameters", group_parameters)
    return seen


def _numbers(out: Path) -> dict:
    """compress.json and the ONNX checks of export.json, without the timings."""
    compress = json.loads((out / "results" / "compress.json").read_text())
    export = json.loads((out / "results" / "export.json").read_text())
    compress.pop("seconds")
    compress["finetune"].pop("seconds")
    return {"compress": compress, "onnx": {k: export[k]["max_abs_diff"] for k in ("dense", "slim")}}


def test_run_loads_the_data_and_traces_once_and_matches_the_stage_commands(tmp_path, counts):
    report = pipeline.run(DIGITS, tmp_path / "run", overrides=TINY, log=QUIET)
    assert counts == {"loads": 1, "traces": 1}
    assert report["latency"]["1"]["slim_p50_ms"] > 0

    pipeline.run(DIGITS, tmp_path / "run", resume=True, overrides=TINY, log=QUIET)  # nothing left to train
    assert counts == {"loads": 2, "traces": 2}

    # the stand-alone commands build their own set-up each (bench only loads the data), with the same results
    pipeline.train(load_config(DIGITS, TINY), tmp_path / "stages", log=QUIET)
    pipeline.compress(tmp_path / "stages", log=QUIET)
    pipeline.export(tmp_path / "stages", log=QUIET)
    pipeline.bench(tmp_path / "stages", log=QUIET)
    assert counts == {"loads": 2 + 4, "traces": 2 + 3}
    assert _numbers(tmp_path / "stages") == _numbers(tmp_path / "run")
