"""torchrun / DistributedDataParallel support for ``structkit run|train``.

``torchrun --nproc_per_node=N -m structkit run CONFIG`` starts N processes; each calls :func:`init` with the
config's ``schedule.device``, which joins the process group torchrun describes in the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` ...). The backend follows the run's device
(:func:`choose_backend`): NCCL when it is CUDA -- one process per GPU, process ``LOCAL_RANK`` on
``cuda:LOCAL_RANK`` -- and gloo on the CPU; ``STRUCTKIT_DIST_BACKEND`` overrides it. A combination that cannot
work (NCCL with a CPU run, more processes on a node than GPUs) is a :class:`~structkit.device.DeviceError`
raised before ``init_process_group``, not a hang. Without torchrun (``WORLD_SIZE`` unset or 1) everything here
is a no-op and the run is the plain single-process one.

Data: :class:`ShardedBatchSampler` draws the single-process run's permutation (same generator, same order) and
gives rank ``r`` the ``r``-th strided share of every global batch of ``schedule.batch_size`` examples. Each rank
reads only its shard (the role of ``torch.utils.data.DistributedSampler``) while the global batches stay those of a
one-process run, so a run and its checkpoints do not depend on the process count: a checkpoint written by N
processes resumes under M. DDP averages the gradients; :func:`global_loss_scale` makes that average the global
batch mean even when the last batch does not split evenly. Every rank then runs the same solver step on the same
gradients, so the parameters stay identical without further communication. Only rank 0 writes files and prints.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler, Sampler

from .device import DeviceError, resolve

__all__ = ["init", "choose_backend", "is_distributed", "rank", "local_rank", "world_size", "is_main", "barrier",
           "finish", "ShardedBatchSampler", "global_loss_scale", "all_sum"]

BACKENDS = ("nccl", "gloo")


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, str(default)))
    except ValueError:
        return default


def choose_backend(device: torch.device | str, requested: str | None = None, *, local_rank: int = 0,
                   local_world_size: int = 1, cuda_devices: int = 0) -> str:
    """The process-group backend for a run on ``device`` (pure: no CUDA query, no environment).

    ``requested`` is ``STRUCTKIT_DIST_BACKEND`` (None or "" = choose): NCCL for a CUDA run, gloo for a CPU run.
    Raises :class:`~structkit.device.DeviceError` for a combination that would fail or hang inside
    ``init_process_group`` or the first collective: an unknown backend, NCCL with a CPU device, a CUDA run
    without CUDA devices, or more processes on this node (``local_world_size``, ``LOCAL_RANK``) than GPUs."""
    device = torch.device(device)
    requested = (requested or "").strip().lower() or None
    if requested is not None and requested not in BACKENDS:
        raise DeviceError(f"STRUCTKIT_DIST_BACKEND={requested!r} is not a backend structkit uses; accepted: "
                          f"{', '.join(BACKENDS)} (or unset it: NCCL for schedule.device cuda, gloo for cpu)")
    if device.type == "cpu":
        if requested == "nccl":
            raise DeviceError("STRUCTKIT_DIST_BACKEND=nccl with a CPU run: NCCL only moves CUDA tensors. Set "
                              "schedule.device: cuda (one process per GPU), or unset STRUCTKIT_DIST_BACKEND "
                              "(gloo is used on the CPU)")
        return requested or "gloo"
    if device.type != "cuda":
        raise DeviceError(f"distributed training runs on cpu or cuda, not {device.type}; set schedule.device")
    if cuda_devices < 1:
        raise DeviceError("schedule.device asks for CUDA under torchrun but this machine has no CUDA device; set "
                          "schedule.device: cpu (or auto) to train with gloo on the CPU")
    if local_rank >= cuda_devices or local_world_size > cuda_devices:
        raise DeviceError(f"torchrun started {max(local_world_size, local_rank + 1)} processes on this node but it "
                          f"has {cuda_devices} CUDA device(s), and a CUDA run takes one GPU per process: pass "
                          f"--nproc_per_node={cuda_devices} (or fewer), or set schedule.device: cpu to train with "
                          f"gloo on the CPU")
    return requested or "nccl"


def init(device: str | torch.device = "auto") -> bool:
    """Join torchrun's process group when started under torchrun with more than one process; returns whether
    the run is distributed. ``device`` is the run's ``schedule.device`` (a spec such as ``auto`` or ``cuda``,
    or a ``torch.device``): it decides the backend (:func:`choose_backend`); a CUDA run's process takes
    ``cuda:LOCAL_RANK``. Errors are raised before ``init_process_group``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_world_size() <= 1 or not dist.is_available():
        return False
    lrank = _env_int("LOCAL_RANK", 0)
    lworld = _env_int("LOCAL_WORLD_SIZE", 1)
    if isinstance(device, torch.device):
        run_device = device
    else:
        run_device = resolve(device, local_rank=lrank)
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    backend = choose_backend(run_device, os.environ.get("STRUCTKIT_DIST_BACKEND"), local_rank=lrank,
                             local_world_size=lworld, cuda_devices=cuda)
    if run_device.type == "cuda":
        torch.cuda.set_device(run_device)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def local_rank() -> int:
    """This process's index on its node (torchrun's ``LOCAL_RANK``); 0 when not distributed."""
    return _env_int("LOCAL_RANK", 0) if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def finish() -> None:
    """Leave the process group (end of the command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(*values: float) -> list[float]:
    """Sum numbers over the ranks (float64; identity in a single process)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()  # the current device: init() set it to cuda:LOCAL_RANK
    dist.all_reduce(t)
    return t.cpu().tolist()


def global_loss_scale(local_count: int) -> float:
    """Factor for this rank's mean loss so that DDP's gradient *average* over ranks equals the gradient of the
    mean over the whole global batch: ``world_size * local_count / global_count``."""
    if not is_distributed():
        return 1.0
    (total,) = all_sum(float(local_count))
    return world_size() * local_count / total


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of this rank's share of each global batch of the single-process order (see the module docs).

    ``generator`` is the training loader's generator: the order is drawn by a ``RandomSampler`` on it, exactly
    as a shuffling ``DataLoader`` with that generator draws it, so one process (rank 0 of 1) gives the plain
    loader's batches."""

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, generator: torch.Generator):
        if batch_size < world_size:
            raise ValueError(f"schedule.batch_size ({batch_size}) is the global batch and must be >= the number of "
                             f"processes ({world_size}); raise it or start fewer processes")
        if 0 < n % batch_size < world_size:
            raise ValueError(f"the last global batch holds {n % batch_size} of the {n} training examples, fewer than "
                             f"the {world_size} processes (each needs at least one); change schedule.batch_size or "
                             f"the number of processes")
        self.n, self.batch_size, self.rank, self.world_size, self.generator = n, batch_size, rank, world_size, generator

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        # RandomSampler itself: the same draws from the generator as a shuffling DataLoader (whatever torch does)
        order = list(RandomSampler(range(self.n), generator=self.generator))
        for start in range(0, self.n, self.batch_size):
            share = order[start:start + self.batch_size][self.rank::self.world_size]
            yield share  # never empty (checked in __init__)
