"""torchrun / DistributedDataParallel support for ``structkit run|train``.

``torchrun --nproc_per_node=N -m structkit run CONFIG`` starts N processes; each calls :func:`init`, which joins
the process group torchrun describes in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ...), with
NCCL when CUDA is available and gloo otherwise (override with ``STRUCTKIT_DIST_BACKEND``). Without torchrun
(``WORLD_SIZE`` unset or 1) everything here is a no-op and the run is the plain single-process one.

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

__all__ = ["init", "is_distributed", "rank", "world_size", "is_main", "barrier", "finish", "ShardedBatchSampler",
           "global_loss_scale", "all_sum"]


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def init() -> bool:
    """Join torchrun's process group when started under torchrun with more than one process; returns whether
    the run is distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if _env_world_size() <= 1 or not dist.is_available():
        return False
    backend = os.environ.get("STRUCTKIT_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


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
        t = t.cuda()
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
