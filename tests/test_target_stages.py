"""compress.warmup_epochs and compress.final_stage: fixed (structkit/target.py, structkit/fixed_stage.py)."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import structkit
from structkit import target as target_mod
from structkit.config import training_hash, validate
from structkit.solvers import RAMDA, ProxGen
from structkit.target import LamController

DIGITS = Path(__file__).resolve().parents[1] / "configs" / "digits.yaml"


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5))


def _train(model, solver, steps, controller=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        y = torch.randint(0, 5, (16,), generator=gen)
        solver.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        solver.step()
        if controller is not None:
            controller.after_step(step)


def _setup(solver_cls, **kw):
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    gs = structkit.group_parameters(model, x, [{"select": "*", "types": ["Conv2d"], "kind": "channels", "lam": 1e-3}])
    solver = solver_cls(gs.param_groups(), **kw)
    ctl = LamController(solver, gs, model, x, metric="macs", target=0.5, tolerance=0.05, check_every=1,
                        warmup_epochs=1)
    return model, gs, solver, ctl


def test_warmup_holds_lam_then_sets_it_to_the_aim():
    """During the warm-up lam is WARMUP_SCALE x its start (a resumed warm-up does not scale it twice) and nothing is
    checked; then RAMDA's lam jumps to the value whose identified structure costs the aim, read off the margins."""
    model, gs, solver, ctl = _setup(RAMDA, lr=1e-2, momentum=0.1)
    ctl.begin_epoch(1)
    ctl.begin_epoch(1)  # as a run resumed inside the warm-up does
    assert solver.param_groups[0]["lam"] == pytest.approx(1e-3 * target_mod.WARMUP_SCALE)
    _train(model, solver, 20, ctl)
    assert ctl.checks == [], "no checks during the warm-up"
    assert not gs.solver_zero_flags(solver).any(), "the warm-up trains as if unregularized"
    ctl.begin_epoch(2)
    assert "lam_start" not in solver.param_groups[0]
    flags = gs.solver_zero_flags(solver)
    aim = 0.5 * (1 + target_mod.AIM_MARGIN * 0.05)
    ratio = ctl._ratio(flags.nonzero().flatten())
    assert aim <= ratio < 1, f"the jump identifies a structure at the aim {aim:.2f}: {ratio:.3f}"
    # one more margin step would cross the aim: the jump is the largest structure that meets it
    margins = gs.solver_margins(solver)
    nxt = margins[(margins > 1) & torch.isfinite(margins) & target_mod.removable(gs, margins)].min()
    assert ctl._ratio((margins <= nxt).nonzero().flatten()) < aim
    lam = solver.param_groups[0]["lam"]
    ctl.begin_epoch(3)
    assert solver.param_groups[0]["lam"] == lam, "after the jump only checks move lam"


def test_warmup_of_a_proximal_solver_restores_the_start_lam():
    _, _, solver, ctl = _setup(ProxGen, lr=1e-3)
    ctl.begin_epoch(1)
    assert solver.param_groups[0]["lam"] == pytest.approx(1e-9)
    ctl.begin_epoch(2)
    assert solver.param_groups[0]["lam"] == 1e-3


def _digits(**compress):
    data = {"model": {"name": "mlp", "options": {"widths": [32]}}, "data": {"name": "digits"},
            "optimizer": {"name": "ramda", "milestones": [2]}, "schedule": {"epochs": 3},
            "structure": [{"select": "*", "types": ["Linear"], "kind": "channels", "lam": 1e-4}],
            "compress": {"target": {"macs": 0.5}, **compress}}
    return data


def test_config_checks_warmup_and_final_stage():
    assert validate(_digits(warmup_epochs=1, final_stage="fixed")).compress.final_stage == "fixed"
    with pytest.raises(ValueError, match="warm-up must end before the final stage"):
        validate(_digits(warmup_epochs=2))
    with pytest.raises(ValueError, match="final_stage"):
        validate(_digits(final_stage="frozen"))
    # the defaults leave the training hash of runs made before these fields existed unchanged
    plain = _digits()
    assert training_hash(validate(_digits(warmup_epochs=0, final_stage="regularized"))) == \
        training_hash(validate(plain))
    assert training_hash(validate(_digits(final_stage="fixed"))) != training_hash(validate(plain))


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
    assert report["accuracy"].get("projected") is None
    assert report["verify"]["max_abs_diff_torch"] <= report["verify"]["tolerance_torch"]
    ckpt = {e: torch.load(out / "checkpoints" / f"epoch_{e:04d}.pt", weights_only=True) for e in (4, 5, 6)}
    masks = [{k: v == 0 for k, v in ckpt[e]["model"].items() if k.endswith("weight")} for e in (4, 6)]
    kept = [json.loads(line)["kept"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kept[3] == kept[4] == kept[5], "the structure is fixed through the final stage (epochs 4-6)"
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
