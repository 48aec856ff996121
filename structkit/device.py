"""Where a run trains: ``schedule.device`` (``auto | cpu | cuda | cuda:N``) -> a ``torch.device``.

:func:`check_spec` validates the string when the config is read (no CUDA query: a config written for a GPU
machine still loads, inspects and compresses on a laptop). :func:`resolve` decides the device when training
starts and raises :class:`DeviceError` -- naming the fix, ``schedule.device: cpu`` or ``auto`` -- when CUDA
was asked for and is absent or the index is out of range. Training (model, batches, solver state) runs on
that device; compress (pruning, verification), export and ONNX Runtime latency always run on the CPU.
"""
from __future__ import annotations

import re

import torch

__all__ = ["DEVICE_SPECS", "DeviceError", "check_spec", "resolve", "describe"]

#: what ``schedule.device`` accepts (the N of ``cuda:N`` is a CUDA device index)
DEVICE_SPECS = "auto, cpu, cuda or cuda:N"
_SPEC = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")
_FIX = ("set schedule.device: cpu (e.g. --set schedule.device=cpu), or auto (CUDA when present, else the CPU)")


class DeviceError(ValueError):
    """The configured device cannot be used on this machine (or in this torchrun launch)."""


def check_spec(spec: str) -> str:
    """The normalised spec (lower case, no blanks), or ValueError saying what is accepted."""
    text = str(spec).strip().lower()
    m = _SPEC.match(text)
    if m is None or (m.group(2) is not None and m.group(1) != "cuda"):
        raise ValueError(f"device must be {DEVICE_SPECS} (e.g. cuda:0); got {spec!r}")
    return text


def resolve(spec: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """The ``torch.device`` a run trains on.

    ``auto`` is ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``. ``local_rank``: set under torchrun
    with more than one process; then ``cuda`` (and ``auto`` on a CUDA machine) means ``cuda:LOCAL_RANK``, one
    process per GPU, and an explicit ``cuda:N`` is refused (every process would share GPU N). Raises
    :class:`DeviceError` when CUDA is asked for and absent, or an index is out of range."""
    text = check_spec(spec)
    kind, _, index = text.partition(":")
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"schedule.device is {text!r} but CUDA is not available on this machine (torch "
                          f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); {_FIX}.")
    count = torch.cuda.device_count()
    if local_rank is not None:
        if index:
            raise DeviceError(f"schedule.device is {text!r} under torchrun with several processes: each process "
                              f"trains on its own GPU, cuda:LOCAL_RANK; set schedule.device: cuda (or cpu).")
        if local_rank >= count:
            raise DeviceError(f"torchrun started local rank {local_rank} but this machine has {count} CUDA "
                              f"device(s): start at most {count} process(es) per node (--nproc_per_node), "
                              f"or {_FIX}.")
        return torch.device("cuda", local_rank)
    n = int(index) if index else 0
    if n >= count:
        raise DeviceError(f"schedule.device is {text!r} but this machine has {count} CUDA device(s) "
                          f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''}); pick one of them, or {_FIX}.")
    return torch.device("cuda", n)


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)`` for the log."""
    if device.type == "cuda":
        try:
            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # a name is decoration; never fail a run over it
            return str(device)
    return str(device)
