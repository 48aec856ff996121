"""torchrun / DDP: a 2-process gloo run equals the 1-process run; only rank 0 writes; checkpoints resume under
another process count. See docs/distributed.md."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from structkit import pipeline
from structkit.config import load_config
from structkit.distributed import ShardedBatchSampler

QUIET = pipeline.Log(quiet=True)
# digits with an MLP (no BatchNorm: per-rank batch statistics would differ from the global batch's)
CONFIG = {
    "model": {"name": "mlp", "options": {"widths": [32, 32]}},
    "data": {"name": "digits"},
    "optimizer": {"name": "ramda", "lr": 1.0e-2, "momentum": 0.1, "milestones": [1]},
    "schedule": {"epochs": 2, "batch_size": 32, "seed": 0, "threads": 1},
    "structure": [{"select": "*", "types": ["Linear"], "kind": "channels", "lam": 4.0e-3}],
    "deploy": {"batch_sizes": [1], "warmup": 1, "runs": 2},
}


def _batches(loader, epochs=2):
    return [[b[1].tolist() for b in loader] for _ in range(epochs)]


@pytest.mark.parametrize("n, batch", [(103, 8), (64, 16), (6, 4)])
def test_shards_are_the_single_process_batches_split(n, batch):
    data = TensorDataset(torch.zeros(n), torch.arange(n))
    plain = _batches(DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(3)))

    def sharded(rank, world):
        g = torch.Generator().manual_seed(3)
        return _batches(DataLoader(data, batch_sampler=ShardedBatchSampler(n, batch, rank, world, g), generator=g))

    assert sharded(0, 1) == plain, "one process must see exactly the plain loader's batches"
    shards = [sharded(r, 2) for r in range(2)]
    for epoch in range(2):
        for i, global_batch in enumerate(plain[epoch]):
            parts = [shards[r][epoch][i] for r in range(2)]
            assert sorted(parts[0] + parts[1]) == sorted(global_batch)
            assert not set(parts[0]) & set(parts[1])
    with pytest.raises(ValueError, match="global batch"):
        ShardedBatchSampler(10, 1, 0, 2, torch.Generator())
    with pytest.raises(ValueError, match="last global batch holds 1"):
        ShardedBatchSampler(5, 4, 0, 2, torch.Generator())


@pytest.mark.slow
def test_two_process_gloo_run_equals_one_process_and_only_rank0_writes(tmp_path):
    cfg = tmp_path / "mlp.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    out2 = tmp_path / "two"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "STRUCTKIT_DIST_BACKEND": "gloo"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "structkit", "run", str(cfg), "--out", str(out2)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distributed: 2 processes (gloo), global batch 32" in proc.stderr
    assert proc.stdout.count("structkit: test accuracy") == 1, proc.stdout  # one summary line: rank 0's
    assert proc.stderr.count("model mlp:") == 1, "only rank 0 prints progress"

    config = load_config(cfg)
    out1 = tmp_path / "one"
    pipeline.train(config, out1, log=QUIET)
    a = torch.load(out1 / "checkpoints/epoch_0002.pt", weights_only=True)
    b = torch.load(out2 / "checkpoints/epoch_0002.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], atol=1e-5, rtol=0, msg=key)
    assert b["history"][-1]["train_loss"] == pytest.approx(a["history"][-1]["train_loss"], abs=1e-5)

    # rank 0 alone wrote: one report, one invocation record, no stray temporary files
    assert len(list(tmp_path.rglob("report.md"))) == 2  # out2's and the 1-process reference's (train writes one)
    info = json.loads((out2 / "run_info.json").read_text())
    assert [i["command"] for i in info["invocations"]] == ["train", "compress", "export", "bench"]
    assert json.loads((out2 / "report.json").read_text())["accuracy"]["trained"] > 0.5
    assert not list(out2.rglob("*.tmp"))

    # a checkpoint written by 2 processes resumes in 1 process and ends where the 1-process run ends
    out3 = tmp_path / "resumed"
    (out3 / "checkpoints").mkdir(parents=True)
    shutil.copy(out2 / "checkpoints/epoch_0001.pt", out3 / "checkpoints")
    pipeline.train(config, out3, resume=True, log=QUIET)
    c = torch.load(out3 / "checkpoints/epoch_0002.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(c["model"][key], a["model"][key], atol=1e-5, rtol=0, msg=key)


# ------------------------------------------------------------------------------------------------ backend and device

from structkit.device import DeviceError  # noqa: E402
from structkit.distributed import choose_backend  # noqa: E402


@pytest.mark.parametrize("device, requested, kw, expected", [
    ("cpu", None, {}, "gloo"),
    ("cpu", "", {}, "gloo"),
    ("cpu", "gloo", {}, "gloo"),
    ("cuda:0", None, {"cuda_devices": 1}, "nccl"),
    ("cuda:1", None, {"local_rank": 1, "local_world_size": 2, "cuda_devices": 2}, "nccl"),
    ("cuda:0", "GLOO", {"cuda_devices": 1}, "gloo"),  # gloo moves CUDA tensors too (slowly): allowed
])
def test_backend_follows_the_device(device, requested, kw, expected):
    assert choose_backend(device, requested, **kw) == expected


@pytest.mark.parametrize("device, requested, kw, expected", [
    ("cpu", "nccl", {}, "NCCL only moves CUDA tensors"),
    ("cpu", "mpi", {}, "accepted: nccl, gloo"),
    ("cuda:0", None, {"cuda_devices": 0}, "no CUDA device"),
    ("cuda:2", None, {"local_rank": 2, "local_world_size": 3, "cuda_devices": 2}, "--nproc_per_node=2"),
    ("cuda:0", None, {"local_rank": 0, "local_world_size": 4, "cuda_devices": 1}, "4 processes on this node"),
])
def test_a_wrong_backend_device_combination_is_a_clear_error(device, requested, kw, expected):
    with pytest.raises(DeviceError, match=expected) as info:
        choose_backend(device, requested, **kw)
    assert "schedule.device" in str(info.value) or "STRUCTKIT_DIST_BACKEND" in str(info.value)


def _fake_torchrun(monkeypatch, world=2, local_rank=0, backend=None, cuda=0):
    """torchrun's environment for one process, with ``cuda`` fake CUDA devices, and an init_process_group that
    must not be reached."""
    import torch.distributed as dist
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(world))
    if backend is None:
        monkeypatch.delenv("STRUCTKIT_DIST_BACKEND", raising=False)
    else:
        monkeypatch.setenv("STRUCTKIT_DIST_BACKEND", backend)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail("set_device reached"))

    def never(*a, **k):
        pytest.fail("init_process_group was reached: the error must come before it")
    monkeypatch.setattr(dist, "init_process_group", never)


@pytest.mark.parametrize("device, setup, expected", [
    ("cpu", {"backend": "nccl"}, "NCCL only moves CUDA tensors"),
    ("cuda", {}, "CUDA is not available"),                       # a CPU-only machine
    ("cuda", {"world": 4, "local_rank": 3, "cuda": 2}, "2 CUDA device"),  # more processes than GPUs
    ("auto", {"world": 4, "local_rank": 0, "cuda": 2}, "4 processes on this node"),
    ("cuda:1", {"cuda": 2}, "each process trains on its own GPU"),
])
def test_init_refuses_before_init_process_group(monkeypatch, device, setup, expected):
    from structkit import distributed
    _fake_torchrun(monkeypatch, **setup)
    with pytest.raises(DeviceError, match=expected):
        distributed.init(device)


def test_init_is_a_no_op_without_torchrun(monkeypatch):
    from structkit import distributed
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init("cuda") is False  # the single-process run reports the device when training starts
