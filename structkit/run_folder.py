"""The output folder of one run (:class:`RunFolder`) and everything read from or written to it between stages.

Checkpoints (what one holds, atomic writes, which one to resume from), the random states a checkpoint carries,
the stage results (``results/*.json``) and which later results a new one makes stale, ``config.yaml``,
``metrics.jsonl``, ``run_info.json`` (invocations, git commit, package versions), ``slim.pt`` and the report
files. No training, pruning or export happens here.
"""
from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ._io import json_default, load_weights, save_torch, write_json, write_text
from .config import Config, load_config, training_hash, training_view
from . import distributed

if TYPE_CHECKING:
    from .setup import Log

__all__ = ["RunFolder", "CHECKPOINT_FORMAT", "config_differences", "git_commit", "package_versions",
           "checkpoint_to_resume", "save_checkpoint", "write_metrics", "set_rng_state", "open_stage", "read_slim",
           "say_cpu", "write_report"]

CHECKPOINT_FORMAT = "structkit.checkpoint"
_CKPT_RE = re.compile(r"^epoch_(\d{4,})\.pt$")
#: later stages whose results a stage makes stale
_DOWNSTREAM = {"train": ("compress", "export", "bench"), "compress": ("export", "bench"), "export": ("bench",),
               "bench": ()}


def _rng_state(generator: torch.Generator, device: torch.device | None = None) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state(), "python": random.getstate(),
             "loader": generator.get_state()}
    if device is not None and device.type == "cuda":  # dropout and the like draw from the GPU's generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    _set_numpy_rng_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["loader"])
    if device is not None and device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _numpy_rng_state() -> dict[str, Any]:
    """numpy's global random state as a tensor and plain numbers (a checkpoint loads with weights_only=True,
    which refuses numpy arrays)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state((state["kind"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def _to_cpu(data: Any) -> Any:
    """``data`` (nested dicts / lists / tuples of tensors, as in a state dict) with every tensor on the CPU."""
    if torch.is_tensor(data):
        return data.detach().cpu()  # the tensor itself when it already is on the CPU
    if isinstance(data, dict):
        out = {k: _to_cpu(v) for k, v in data.items()}
        if isinstance(data, OrderedDict):  # a module's state dict: keep its _metadata (format versions)
            out = OrderedDict(out)
            if hasattr(data, "_metadata"):
                out._metadata = data._metadata
        return out
    if isinstance(data, list):
        return [_to_cpu(v) for v in data]
    if isinstance(data, tuple) and not hasattr(data, "_fields"):
        return tuple(_to_cpu(v) for v in data)
    return data


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        return {k: v for key, value in data.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        return {k: v for i, value in enumerate(data) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): data}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every training setting (:func:`~structkit.config.training_view`) that differs."""
    a, b = _flat(training_view(old)), _flat(training_view(new))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, "<unset>") != b.get(k, "<unset>")]


def git_commit() -> dict[str, Any] | None:
    """The git commit (and whether the tree is dirty) of the structkit source, if it lives in a git checkout."""
    where = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    from importlib import metadata
    out = {}
    for name in ("structkit", "torch", "torchvision", "torch-pruning", "onnx", "onnxruntime", "onnxscript", "numpy",
                 "scikit-learn", "pydantic", "pyyaml", "matplotlib", "tqdm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = sys.version.split()[0]
    return out


# ------------------------------------------------------------------------------------------------ the folder

class RunFolder:
    """The output folder of one run: paths, checkpoints, stage results."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise FileExistsError(f"the output folder {self.path} is a file; pass another --out")

    # paths
    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def results(self) -> Path:
        return self.path / "results"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def create(self) -> None:
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            self.results.mkdir(exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create the output folder {self.path}: {err.strerror}; pass another --out") from None

    # checkpoints
    def checkpoint_files(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir() if (m := _CKPT_RE.match(p.name))]
        return sorted(found)

    def checkpoint_path(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        try:  # tensors and plain data only: opening someone else's run folder never runs code from it
            state = load_weights(path, "structkit checkpoint")
        except ValueError as err:  # truncated zip, refused pickled objects, ...: all mean the file is unusable
            raise RuntimeError(f"checkpoint {path} is corrupt or truncated ({err}). Delete it to resume from the "
                               f"previous checkpoint.") from None
        if not (isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT):
            raise RuntimeError(f"{path} is not a structkit checkpoint; delete it or pass another --out.")
        return state

    def last_checkpoint(self) -> dict[str, Any] | None:
        files = self.checkpoint_files()
        return self.load_checkpoint(files[-1][1]) if files else None

    # config
    def saved_config(self, overrides: list[str] | None = None) -> Config:
        path = self / "config.yaml"
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} holds no run (no config.yaml); run `structkit train CONFIG --out "
                                    f"{self.path}` first.")
        return load_config(path, overrides)

    # stage results
    def result(self, stage: str) -> dict[str, Any] | None:
        path = self.results / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RuntimeError(f"{path} is corrupt ({err}); rerun `structkit {stage} {self.path}`.") from None

    def save_result(self, stage: str, data: dict[str, Any]) -> None:
        self.results.mkdir(parents=True, exist_ok=True)
        for later in _DOWNSTREAM[stage]:  # what was computed from the old result is stale now
            with contextlib.suppress(FileNotFoundError):
                (self.results / f"{later}.json").unlink()
        write_json(self.results / f"{stage}.json", data)

    def require(self, stage: str, needed_by: str) -> dict[str, Any]:
        data = self.result(stage)
        if data is None:
            raise FileNotFoundError(f"{self.path} has no {stage} results; run `structkit {stage} {self.path}` before "
                                    f"`structkit {needed_by}`.")
        return data

    def record_invocation(self, command: str, config: Config | None = None) -> None:
        path = self / "run_info.json"
        info = json.loads(path.read_text()) if path.is_file() else {}
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        info["git"] = git_commit()
        info["versions"] = package_versions()
        info.setdefault("invocations", []).append(
            {"command": command, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "training_hash": training_hash(config) if config is not None else None})
        write_json(path, info)


def checkpoint_to_resume(folder: RunFolder, config: Config, resume: bool, log: Log) -> dict[str, Any] | None:
    """Check the folder against the request; return the checkpoint to resume from, if any."""
    files = folder.checkpoint_files()
    if files and not resume:
        raise FileExistsError(f"{folder.path} already holds a run (checkpoints up to epoch {files[-1][0]}); pass "
                              f"--resume to continue it, or another --out for a new run.")
    folder.create()
    if distributed.is_main():  # a killed process's unfinished atomic writes: never complete files
        for stale in [*folder.path.glob(".*.tmp"), *folder.checkpoints.glob(".*.tmp")]:
            stale.unlink(missing_ok=True)
    if not files:
        if resume:
            log(f"no checkpoint in {folder.checkpoints}: starting from scratch")
        return None
    checkpoint = folder.load_checkpoint(files[-1][1])
    if checkpoint["training_hash"] != training_hash(config):
        diff = config_differences(checkpoint["config"], config.to_dict())
        raise ValueError(f"cannot resume {folder.path}: its checkpoints were trained with other settings ("
                         + "; ".join(diff[:8]) + (" ..." if len(diff) > 8 else "")
                         + "). Use the same config, or another --out for a new run.")
    return checkpoint


def save_checkpoint(folder: RunFolder, epoch: int, config: Config, model, solver, scheduler, generator, history,
                    train_seconds: float, device: torch.device | None = None) -> None:
    """CPU tensors only (a GPU run's checkpoint loads on a machine without CUDA); written atomically."""
    state = {"format": CHECKPOINT_FORMAT, "version": 1, "epoch": epoch, "model": _to_cpu(model.state_dict()),
             "optimizer": _to_cpu(solver.state_dict()), "scheduler": _to_cpu(scheduler.state_dict()),
             "rng": _rng_state(generator, device),
             "history": history, "train_seconds": train_seconds, "config": config.to_dict(),
             "training_hash": training_hash(config)}
    save_torch(folder.checkpoint_path(epoch), state)


def write_metrics(folder: RunFolder, history: list[dict[str, Any]]) -> None:
    write_text(folder / "metrics.jsonl", "".join(json.dumps(r, default=json_default) + "\n" for r in history))


def say_cpu(log: Log, folder: RunFolder, stage: str, what: str) -> None:
    """Say that a stage runs on the CPU when the training ran elsewhere (results/train.json says where)."""
    trained_on = (folder.result("train") or {}).get("device", "cpu")
    if trained_on != "cpu":
        log(f"{stage}: {what} run on the CPU, on a CPU copy of the weights trained on {trained_on} (from the "
            f"checkpoint)")


def read_slim(folder: RunFolder, build=None) -> nn.Module:
    """slim.pt (rebuilt from ``build()``, the run's dense model; read as weights only: never runs code from the
    file), or an error that says it is unusable and how to rebuild it."""
    from .slim import load_slim
    path = folder / "slim.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rerun `structkit compress {folder.path}`.")
    try:
        return load_slim(path, build=build)
    except Exception as err:  # truncated, tampered, a file from elsewhere, another model: all mean it is unusable
        raise RuntimeError(f"{path} is corrupt, truncated or not a structkit slim model ({type(err).__name__}: "
                           f"{err}); rebuild it with `structkit compress {folder.path}`.") from None


def open_stage(out: str | Path, overrides: list[str] | None, stage: str,
               needs: str | None = None) -> tuple[RunFolder, Config]:
    """The run folder and its config for a stage after training: the config with the stage's ``--set`` overrides
    (saved back when there are any), the invocation recorded, and the results of the stage it ``needs`` present."""
    folder = RunFolder(out)
    config = folder.saved_config(overrides)
    if overrides:
        write_text(folder / "config.yaml", config.to_yaml())
    folder.record_invocation(stage, config)
    if needs is not None:
        folder.require(needs, stage)
    return folder, config


def write_report(folder: RunFolder) -> dict[str, Any]:
    """Rewrite report.json, report.md and the plots from whatever results the folder holds."""
    from .report import build_report, write_report_files
    report = build_report(folder)
    write_report_files(folder, report)
    return report
