"""compress.final_stage: fixed (structkit/fixed_stage.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from structkit.config import training_hash, training_view, validate

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def _digits(**compress):
    data = {"model": {"name": "mlp", "options": {"widths": [32]}}, "data": {"name": "digits"},
            "optimizer": {"name": "ramda", "milestones": [2]}, "schedule": {"epochs": 3},
            "structure": [{"select": "*", "types": ["Linear"], "kind": "channels", "lam": 1e-4}],
            "compress": {"target": {"macs": 0.5}, **compress}}
    return data


def test_config_checks_final_stage():
    assert validate(_digits(final_stage="fixed")).compress.final_stage == "fixed"
    with pytest.raises(ValueError, match="final_stage"):
        validate(_digits(final_stage="frozen"))
    one_epoch = _digits(final_stage="fixed")
    one_epoch["optimizer"] = {"name": "proxgen"}
    one_epoch["schedule"] = {"epochs": 1}
    with pytest.raises(ValueError, match="with 1 epoch and no milestones"):
        validate(one_epoch)
    # at its default the field is left out of the training view, so runs made before it existed still resume
    assert "final_stage" not in training_view(validate(_digits()).to_dict())["compress"]
    assert training_hash(validate(_digits(final_stage="fixed"))) != training_hash(validate(_digits()))


def test_fixed_final_stage_trains_the_target_structure(tmp_path):
    """final_stage fixed on digits: the final stage starts at the target's structure (exact zeros, lam 0), keeps it,
    and the pruner removes exactly those zeros -- nothing is projected after training. A run resumed inside the
    final stage ends with the same weights."""
    from structkit import pipeline
    from structkit.pipeline import Log
    from structkit.train_stage import train

    overrides = ["compress.target.macs=0.4", "compress.final_stage=fixed", "structure.0.lam=1e-3",
                 "deploy.warmup=2", "deploy.runs=5", "deploy.batch_sizes=[1]"]
    out = tmp_path / "run"
    report = pipeline.run(DIGITS, out, log=Log(quiet=True), overrides=overrides)
    t = report["target"]
    assert t["reached"] <= 0.4 and t["added_groups"] == 0, "the final stage ends with exactly the needed zeros"
    assert t["within_tolerance"] or t["note"].startswith("the final stage kept the structure selected at its start")
    assert report["accuracy"].get("projected") is None
    assert report["verify"]["max_abs_diff_torch"] <= report["verify"]["tolerance_torch"]
    ckpt = {e: torch.load(out / "checkpoints" / f"epoch_{e:04d}.pt", weights_only=True) for e in (4, 5, 6)}
    masks = [{k: v == 0 for k, v in ckpt[e]["model"].items() if k.endswith("weight")} for e in (4, 6)]
    kept = [json.loads(line)["kept"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept[3] == kept[4] == kept[5], "the structure is fixed through the final stage (epochs 4-6)"
    records = [json.loads(line)["target"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("final_stage") for r in records] == [None] * 3 + ["fixed"] * 3
    assert all(masks[1][k][masks[0][k]].all() for k in masks[0]), "entries zero at epoch 4 stay zero"
    assert all(g["lam"] == 0 for g in ckpt[6]["optimizer"]["param_groups"][:-1])

    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    (resumed / "checkpoints" / "epoch_0006.pt").unlink()
    from structkit.config import load_config
    train(load_config(DIGITS, overrides), resumed, resume=True, log=Log(quiet=True))
    again = torch.load(resumed / "checkpoints" / "epoch_0006.pt", weights_only=True)["model"]
    for k, v in ckpt[6]["model"].items():
        assert torch.equal(v, again[k]), k
